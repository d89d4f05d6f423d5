"""The fused quantizer kernels (hasb.kernels) against the composite reference (hasb.quantizer).

Scale gradients are checked twice: tightly against the composite's formula evaluated exactly (float64) on the
same float32 quotient q (the kernels' only error is then their own products and reduction tree), and against the
composite itself within the composite's worst-case float32 error (it forms W_l - q by cancellation, so each of its
terms carries round-off relative to |q|, and its reduction order is PyTorch's).
"""

import contextlib
import copy
import math

import pytest
import torch

import hasb
from hasb import kernels as K
from hasb import quantizer as Q
from hasb.models import build_model
from hasb.modules import QuantMixin

cuda = pytest.mark.skipif(not K.available(), reason="needs CUDA and Triton")

# conv and linear weight shapes, odd sizes, K below / equal to / above the kernels' block sizes
SHAPES = [(64, 3, 7, 7), (37, 5, 3, 3), (128, 64, 3, 3), (10, 512), (1000, 513), (3, 4607), (5, 1)]
BITS = [(8, 8), (6, 8), (4, 8), (2, 8), (3, 6), (2, 4)]  # (bit, high_bit)
U = 2.0**-24  # float32 unit round-off
UNIT = {torch.float32: U, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _case(shape, high_bit, device, seed=0):
    """A weight with heavy tails and a scale 0.7x the init, so both clip ranges are hit."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * (1 + 3 * torch.rand(shape, generator=gen) ** 4)
    scale = 0.7 * Q.init_weight_scale(w, high_bit)
    grad = torch.randn(shape, generator=gen)
    return (w.to(device).requires_grad_(), scale.to(device).requires_grad_(), grad.to(device))


def _composite(fn, x, scale, grad, *args):
    """Output and (∂x, ∂s) of the pure composite path of ``fn`` (detach tricks, no autograd.Function)."""
    x = x.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    with Q.composite_ops():
        out = fn(x, scale, *args)
    out.backward(grad)
    return out.detach(), x.grad, scale.grad


def _weight_terms(w, scale, bit, high_bit, rounding, grad):
    """float64 [C, K] terms g·2^Δ·grad·(W_l - q | clip(q)) of the scale gradient, q the float32 quotient."""
    delta = high_bit - bit
    qn, qp = Q.int_range(bit)
    g = Q.lsq_g(w[0].numel(), qp)
    c = w.shape[0]
    with torch.no_grad():
        w_l = Q.derive_int(Q.stored_int(w, scale, high_bit), bit, high_bit, rounding).reshape(c, -1).double()
        q = (w / (scale.reshape((-1,) + (1,) * (w.dim() - 1)) * 2.0**delta)).reshape(c, -1).double()
    inner = torch.where((q >= qn) & (q <= qp), w_l - q, q.clamp(qn, qp))
    return grad.reshape(c, -1).double() * inner * (g * 2.0**delta), q


def _check_weight_scale_grad(got, ref, w, scale, bit, high_bit, rounding, grad):
    terms, q = _weight_terms(w, scale, bit, high_bit, rounding, grad)
    k = terms.shape[1]
    # kernel: one rounding per product, ceil(K/512) sequential adds per lane, then the 512 lanes' sum with the
    # launches' default 4 warps: ≤ 3 sequential adds per thread (4 lanes each), 5 shuffle levels, ≤ 3 adds across
    # warps (the compiler picks the layout, so the order varies between launches of different shapes), the scaling
    tight = (math.ceil(k / 512) + 11 + 3) * U * terms.abs().sum(1)
    assert bool(((got.double() - terms.sum(1)).abs() <= tight).all())
    # composite: a few round-offs relative to |grad|·(|q| + |W_l| + 1) per term, any summation order (γ_K)
    g = 2.0 ** (high_bit - bit) * Q.lsq_g(k, Q.int_range(bit)[1])
    mag = (grad.reshape(w.shape[0], -1).double().abs() * (q.abs() + 2 ** (bit - 1) + 1)).sum(1)
    loose = 2 * (k + 8) * U * g * mag + tight
    assert bool(((got.double() - ref.double()).abs() <= loose).all())


@cuda
@pytest.mark.parametrize("rounding", Q.ROUNDINGS)
@pytest.mark.parametrize("bit,high_bit", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_weight_equals_composite(shape, bit, high_bit, rounding):
    w, scale, grad = _case(shape, high_bit, "cuda")
    ref_out, ref_gw, ref_gs = _composite(Q.quantize_weight, w, scale, grad, bit, high_bit, rounding)
    assert K.fused_applies(w, scale)
    out = K.quantize_weight(w, scale, bit, high_bit, rounding)
    assert type(out.grad_fn).__name__.startswith("FusedDoubleRoundLSQ")
    out.backward(grad)
    assert torch.equal(out, ref_out)  # integers times s_h·2^Δ: bit-exact
    # ∂W: the composite forms grad·s_eff/s_eff (two roundings), the kernel passes grad through: ≤ 2 ulp
    assert torch.allclose(w.grad, ref_gw, rtol=4 * U, atol=0)
    assert torch.equal(w.grad == 0, ref_gw == 0)  # the same STE mask
    _check_weight_scale_grad(scale.grad, ref_gs, w, scale, bit, high_bit, rounding, grad)


@cuda
def test_fused_weight_channels_last_and_eager_function():
    """Channels-last weights run in place (same strides out); ∂W equals the eager autograd.Function's bit for bit."""
    w, scale, grad = _case((96, 32, 3, 3), 8, "cuda", seed=1)
    wc = w.detach().to(memory_format=torch.channels_last).requires_grad_()
    out_ref = Q.quantize_weight(w, scale, 4, 8, "half_up")
    gw_ref, _ = torch.autograd.grad(out_ref, (w, scale), grad)
    out = K.quantize_weight(wc, scale, 4, 8, "half_up")
    gw, gs = torch.autograd.grad(out, (wc, scale), grad)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, out_ref) and torch.equal(gw, gw_ref)
    ref = _composite(Q.quantize_weight, w, scale, grad, 4, 8, "half_up")[2]
    _check_weight_scale_grad(gs, ref, w, scale, 4, 8, "half_up", grad)


# (shape, bit, high_bit, channels_last): Δ = 0, 1-bit, K below / above the blocks, a channels_last conv weight
MANY = [((64, 3, 7, 7), 8, 8, False), ((37, 5, 3, 3), 4, 8, True), ((10, 512), 2, 8, False),
        ((1000, 513), 1, 8, False), ((3, 4607), 3, 6, False), ((5, 1), 6, 8, False), ((96, 32, 3, 3), 4, 8, True)]  # fmt: skip


@cuda
@pytest.mark.parametrize("rounding", K.KERNEL_ROUNDINGS)
def test_many_layers_in_one_launch_equal_the_per_layer_kernels(rounding):
    """One launch for a pass's weights gives each layer's Ŵ and ∂W of its own launch bit for bit (Δ = 0 through
    the general path, where an integer code rounds to itself).  ∂s_h is a sum whose order within a channel follows
    the layout the compiler picks (the per-layer kernel knows K's alignment, the pass kernel reads K from a table),
    so it is held to the per-layer kernel's own bound against the exact sum."""
    per, many = [], []
    for i, (shape, bit, high, cl) in enumerate(MANY):
        w, scale, grad = _case(shape, high, "cuda", seed=i)
        if cl:
            w = w.detach().to(memory_format=torch.channels_last).requires_grad_()
        per.append((w, scale, grad, bit, high))
        many.append((w.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()))
    ref = []
    for w, scale, grad, bit, high in per:
        out = K.quantize_weight(w, scale, bit, high, rounding)
        out.backward(grad)
        ref.append((out, w.grad))
    bits, highs = [p[3] for p in per], [p[4] for p in per]
    outs = K.quantize_weights([w for w, _ in many], [s for _, s in many], bits, highs, rounding)
    assert type(outs[0].grad_fn).__name__.startswith("FusedDoubleRoundLSQMany")
    torch.autograd.backward(outs, [p[2] for p in per])
    for (out, gw), got, (w, s), (_, _, grad, bit, high) in zip(ref, outs, many, per, strict=True):
        assert got.stride() == out.stride() == w.stride()
        assert torch.equal(got, out) and torch.equal(w.grad, gw)
        composite_gs = _composite(Q.quantize_weight, w, s, grad, bit, high, rounding)[2]
        _check_weight_scale_grad(s.grad, composite_gs, w, s, bit, high, rounding, grad)


@cuda
def test_many_layers_double_backward_is_the_composites():
    w1, s1, g1 = _case((16, 8, 3, 3), 8, "cuda", seed=3)
    w2, s2, g2 = _case((12, 20), 8, "cuda", seed=4)

    def second(fn):
        outs = fn()
        grads = torch.autograd.grad(outs, (w1, s1, w2, s2), (g1, g2), create_graph=True)
        return torch.autograd.grad(sum((g**2).sum() for g in grads), (w1, s1, w2, s2))

    with Q.composite_ops():
        ref = second(lambda: (Q.quantize_weight(w1, s1, 4, 8), Q.quantize_weight(w2, s2, 2, 8)))
    got = second(lambda: K.quantize_weights([w1, w2], [s1, s2], [4, 2], [8, 8], "half_up"))
    for u, v in zip(got, ref, strict=True):
        assert torch.allclose(u, v, rtol=1e-5, atol=1e-7)


def test_a_pass_flattens_weights_by_their_storage_spans_and_restores_their_layouts():
    """The pass kernels read each weight's storage span as its 1-D memory order; the inverse gives views of the flat
    buffer with the weights' own shapes and strides (channels_last, a storage offset, 2-D)."""
    torch.manual_seed(0)
    conv = torch.randn(4, 3, 3, 3)
    cl = torch.randn(5, 2, 3, 3).to(memory_format=torch.channels_last)
    offset = torch.randn(6, 7)[1:]  # rows 1..5: dense, starting 7 values into its storage
    lin = torch.randn(3, 8)
    ts = [conv, cl, offset, lin]
    flat = K._flat(ts)
    in_memory_order = [conv.reshape(-1), cl.permute(0, 2, 3, 1).reshape(-1), offset.reshape(-1), lin.reshape(-1)]
    assert torch.equal(flat, torch.cat(in_memory_order))
    starts, total, channels = K._starts(K._shapes(ts))
    assert (total, channels) == (flat.numel(), 4 + 5 + 5 + 3)
    back = K._unflat(flat * 2, ts, starts)
    for t, b in zip(ts, back, strict=True):
        assert b.shape == t.shape and b.stride() == t.stride()
        assert torch.equal(b, t * 2)


def test_gradients_in_the_weights_memory_order_are_not_copied():
    """``_like`` keeps a tensor whose strides differ from the weight's only in size-1 dimensions (a 1×1 or depthwise
    convolution's weight gradient against its channels_last weight: the same memory order), and copies one in
    another order into the weight's strides."""
    for shape in ((8, 4, 1, 1), (8, 1, 3, 3)):
        w = torch.randn(shape).to(memory_format=torch.channels_last)
        g = torch.randn(shape)  # contiguous: other strides, same memory order
        assert g.stride() != w.stride() and K._like(g, w) is g
        assert torch.equal(K._flat([g]), K._flat([w.detach().copy_(g)]))
    w = torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    g = torch.randn(8, 4, 3, 3)
    moved = K._like(g, w)
    assert moved is not g and moved.stride() == w.stride() and torch.equal(moved, g)


def test_a_pass_reads_each_channel_in_place_where_the_flat_buffer_has_it():
    """The channel tables of the in-place (TABLE) launches: channel c of the flat buffer, at off[c], is channel
    lch[c] of layer layer[c], whose K[c] values start lch[c] · K[c] values into that layer's weight; the address
    tables hold each tensor's address and are rebuilt when one moves."""
    torch.manual_seed(0)
    ts = [torch.randn(4, 3, 3, 3), torch.randn(5, 2, 3, 3).to(memory_format=torch.channels_last), torch.randn(3, 8)]
    flat = K._flat(ts)
    off, ks, layer, lch = K._host_channel_tables(K._shapes(ts))
    for c in range(len(off)):
        t = ts[int(layer[c])]
        span = t.as_strided((t.numel(),), (1,))  # the weight's values in memory order
        k, j = int(ks[c]), int(lch[c])
        assert torch.equal(flat[int(off[c]) : int(off[c]) + k], span[j * k : (j + 1) * k])
    cpu = torch.device("cpu")
    table = K._addresses(ts, cpu, 0)
    assert table.tolist() == [t.data_ptr() for t in ts] and K._addresses(ts, cpu, 0) is table
    moved = [ts[0], ts[1].contiguous(), ts[2]]
    assert K._addresses(moved, cpu, 0).tolist() == [t.data_ptr() for t in moved]


def test_a_pass_layer_constants_are_the_per_layer_launch_numbers_cached_per_configuration():
    shapes = K._shapes([torch.empty(4, 3, 3, 3), torch.empty(10, 16)])
    cpu = torch.device("cpu")
    p = K._layer_params(shapes, (4, 2), (8, 8), cpu)
    assert K._layer_params(shapes, [4, 2], [8, 8], cpu) is p  # the same configuration: no new copy
    other = K._layer_params(shapes, (2, 4), (8, 8), cpu)
    for row, k, bit in ((p[0], 27, 4), (p[1], 16, 2), (other[0], 27, 2), (other[1], 16, 4)):
        g = Q.lsq_g(k, Q.int_range(bit)[1])
        assert row.tolist() == pytest.approx([*K._consts(bit, 8), g * 2.0 ** (8 - bit), 0.0], rel=1e-7)


def test_a_pass_quantizes_its_weights_together_and_releases_them(monkeypatch):
    """The model's forward pre-hook hands every layer with a weight bit to one ``quantize_weights`` call per pass
    (the kernels' entry point, replaced here by the per-layer reference so the plumbing runs on the CPU); the
    layers use those Ŵ and no per-layer quantizer; the forward hook releases them, also after an exception; the
    outputs and gradients are the per-layer path's."""
    import hasb
    from hasb.models import build_model
    from hasb.modules import QuantMixin

    torch.manual_seed(0)
    model = hasb.quantize_model(build_model("resnet20"), bits=(8, 6, 4, 2))
    x = torch.randn(8, 1, 28, 28)
    hasb.init_quantizers(model, x)
    layers = [m for m in model.modules() if isinstance(m, QuantMixin)]
    for i, m in enumerate(layers):  # mixed bits; the fixed first/last layers stay fp (no weight bit)
        if m.w_bit is not None:
            m.set_bits((8, 6, 4, 2)[i % 4], m.a_bit)
    quantized = [m for m in layers if m.w_bit is not None]

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = run()  # the per-layer path (no kernels on the CPU)
    calls = []

    def many(ws, scales, bits, high_bits, rounding, out_dtype):
        calls.append(list(bits))
        assert out_dtype is None  # no autocast here: Ŵ in float32
        return [Q.quantize_weight(w, s, b, h, rounding) for w, s, b, h in zip(ws, scales, bits, high_bits, strict=True)]

    def per_layer(*args, **kwargs):
        raise AssertionError("a layer quantized its own weight inside the batched pass")

    monkeypatch.setattr(K, "batch_applies", lambda: True)
    monkeypatch.setattr(K, "weights_fit", lambda w, s: True)
    monkeypatch.setattr(K, "quantize_weights", many)
    monkeypatch.setattr(K, "quantize_weight", per_layer)
    out, grads = run()
    assert calls == [[m.w_bit for m in quantized]]
    assert all(m._w_pass is None for m in layers)
    assert torch.equal(out, ref_out) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    # two forwards, one backward (gradient accumulation): each forward has its own Ŵ and graph
    model.zero_grad()
    (model(x).sum() + model(x).sum()).backward()
    assert len(calls) == 3
    # an exception inside the forward still releases the pass's Ŵ
    handle = quantized[len(quantized) // 2].register_forward_hook(lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        model(x)
    handle.remove()
    assert len(calls) == 4 and all(m._w_pass is None for m in layers)


def test_a_pass_under_autocast_hands_out_autocasts_dtype_and_only_where_autocast_is_on(monkeypatch):
    """Under autocast the pass makes Ŵ in autocast's dtype (what each layer's conv would cast it to); a layer
    running with autocast off (a user's ``autocast(enabled=False)`` block) quantizes its own float32 Ŵ instead.
    Plumbing on the CPU: autocast's state is faked, the pass is the per-layer reference cast to that dtype."""
    import hasb
    from hasb import modules as M
    from hasb.models import build_model

    torch.manual_seed(0)
    model = hasb.quantize_model(build_model("resnet20"), bits=(8, 6, 4, 2))
    hasb.init_quantizers(model, torch.randn(8, 1, 28, 28))
    hasb.set_config(model, 4)
    quantized = [m for m in model.modules() if isinstance(m, M.QuantMixin) and m.w_bit is not None]
    dtypes, own = [], []

    def many(ws, scales, bits, high_bits, rounding, out_dtype):
        dtypes.append(out_dtype)
        args = zip(ws, scales, bits, high_bits, strict=True)
        return [Q.quantize_weight(w, s, b, h, rounding).to(out_dtype) for w, s, b, h in args]

    def per_layer(w, scale, bit, high_bit, rounding):
        own.append(bit)
        return Q.quantize_weight(w, scale, bit, high_bit, rounding)

    autocast = {"on": True}
    monkeypatch.setattr(K, "batch_applies", lambda: True)
    monkeypatch.setattr(K, "weights_fit", lambda w, s: True)
    monkeypatch.setattr(K, "quantize_weights", many)
    monkeypatch.setattr(K, "quantize_weight", per_layer)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: autocast["on"])
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type=None: torch.bfloat16)
    M.prequantize_weights(model, None)
    assert dtypes == [torch.bfloat16]
    assert all(m.quant_weight().dtype == torch.bfloat16 for m in quantized) and own == []
    autocast["on"] = False  # inside a layer that turned autocast off
    first = quantized[0]
    w_hat = first.quant_weight()
    assert w_hat.dtype == torch.float32 and own == [first.w_bit]
    assert torch.equal(w_hat.to(torch.bfloat16), first._w_pass[1])  # the same values, before autocast's cast
    M.release_weights(model, None, None)


@cuda
def test_a_pass_under_autocast_equals_autocasts_cast_of_the_float32_pass(monkeypatch):
    """A quantized model under bf16 autocast: the pass's bf16 Ŵ (no cast per layer) gives the output and every
    parameter gradient of the float32 pass followed by autocast's casts, bit for bit."""
    import hasb
    from hasb.models import build_model

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # the same conv algorithms in both runs
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    model = hasb.quantize_model(build_model("resnet20"), bits=(8, 6, 4, 2)).cuda()
    x = torch.randn(16, 1, 28, 28, device="cuda")
    hasb.init_quantizers(model, x)
    hasb.set_config(model, 4)
    orig, seen = K.quantize_weights, []
    results = []
    for low in (True, False):

        def many(*args, low=low):  # out_dtype dropped: the float32 pass, cast by autocast in each layer
            seen.append(args[5])
            return orig(*args) if low else orig(*args[:5])

        K.quantize_weights = many
        try:
            model.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(x)
            out.float().square().sum().backward()
        finally:
            K.quantize_weights = orig
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert seen == [torch.bfloat16, torch.bfloat16]
    (o1, g1), (o2, g2) = results
    assert o1.dtype == torch.bfloat16 and torch.equal(o1, o2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[n], g2[n]) for n in g1)


def _traced_pass(monkeypatch, device):
    """MANY's weights, steps and output gradients on ``device``, and :func:`hasb.kernels.quantize_weights_traced`
    compiled (aot_eager: the op's own implementation runs, the kernel on CUDA and each layer's composite
    elsewhere), with the graphs' forward op calls counted."""
    cases = []
    for i, (shape, bit, high, cl) in enumerate(MANY):
        w, scale, grad = _case(shape, high, device, seed=i)
        if cl:
            w = w.detach().to(memory_format=torch.channels_last).requires_grad_()
        cases.append((w, scale, grad, bit, high))
    ops: list = []

    def backend(gm, example_inputs):
        ops.extend(n for n in gm.graph.nodes if n.target is torch.ops.hasb.quantize_weights_forward.default)
        return gm.forward

    def run(rounding, out_dtype=None):
        f = torch.compile(K.quantize_weights_traced, backend=backend, fullgraph=True)
        ws, ss = [c[0] for c in cases], [c[1] for c in cases]
        return f(ws, ss, [c[3] for c in cases], [c[4] for c in cases], rounding, out_dtype)

    return cases, ops, run


@pytest.mark.parametrize("rounding", Q.ROUNDINGS)
def test_a_traced_pass_is_one_op_each_way_with_each_layers_composite_values(rounding, monkeypatch):
    """Traced by torch.compile, a pass's weights are one forward op (and its backward one op): each layer's Ŵ in
    the weight's own layout, equal to its composite; ∂W within the composite's round-off; ∂s_h within the bound
    of the float64 sum of its terms.  On the CPU the ops run each layer's composite on its memory-order span."""
    cases, ops, run = _traced_pass(monkeypatch, "cpu")
    grads_of = []
    monkeypatch.setattr(Q, "double_round_grads", lambda *a, f=Q.double_round_grads: grads_of.append(1) or f(*a))
    outs = run(rounding)
    torch.autograd.backward(outs, [c[2] for c in cases])
    assert len(ops) == 1 and len(grads_of) == len(cases)  # one backward op: each layer's gradient once
    for out, (w, scale, grad, bit, high) in zip(outs, cases, strict=True):
        ref_out, ref_gw, ref_gs = _composite(Q.quantize_weight, w, scale, grad, bit, high, rounding)
        assert out.stride() == w.stride() and torch.equal(out, ref_out)
        assert torch.allclose(w.grad, ref_gw, rtol=4 * U, atol=0)
        _check_weight_scale_grad(scale.grad, ref_gs, w, scale, bit, high, rounding, grad)


@cuda
@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_a_traced_pass_equals_the_eager_pass_kernels(out_dtype, monkeypatch):
    """On CUDA the traced pass's ops launch the pass kernels: Ŵ (float32 or autocast's bf16) and ∂W equal the
    eager per-layer kernels' bit for bit, ∂s_h within the kernels' own bound (session 18 ran this check on the
    H200 as a script: equal, ∂s within 2e-7 relative)."""
    cases, ops, run = _traced_pass(monkeypatch, "cuda")
    outs = run("half_up", out_dtype)
    torch.autograd.backward(outs, [c[2].to(out_dtype or torch.float32) for c in cases])
    assert len(ops) == 1
    for out, (w, scale, grad, bit, high) in zip(outs, cases, strict=True):
        wr, sr = w.detach().clone().requires_grad_(), scale.detach().clone().requires_grad_()
        ref = K.quantize_weight(wr, sr, bit, high, "half_up")
        ref = ref if out_dtype is None else ref.to(out_dtype)
        ref.backward(grad.to(ref.dtype))
        assert out.stride() == w.stride() and torch.equal(out, ref) and torch.equal(w.grad, wr.grad)
        composite_gs = _composite(Q.quantize_weight, w, scale, grad.to(ref.dtype).float(), bit, high, "half_up")[2]
        _check_weight_scale_grad(scale.grad, composite_gs, w, scale, bit, high, "half_up", grad.to(ref.dtype).float())


@pytest.mark.parametrize("whole_call", [False, True])
def test_a_compiled_model_quantizes_its_weights_in_its_forward_graph(whole_call, monkeypatch):
    """A compiled quantized model (the module, or a function that calls it, hooks and all) is one graph with one
    weight op, made by the first quantized layer's forward, and one output; the steps after the first reuse it (no recompile);
    loss and gradients are those of the per-layer composites compiled; no Ŵ outlives a forward.  The gate is
    forced open on the CPU (it asks for Triton and CUDA tensors)."""
    import hasb
    from hasb.models import build_model

    torch.manual_seed(0)
    model = hasb.quantize_model(build_model("lm_tiny", context=16), bits=(8, 6, 4, 2))
    x, y = torch.randint(0, 256, (4, 16)), torch.randint(0, 256, (4, 16))
    hasb.init_quantizers(model, x)
    model.train()
    hasb.set_config(model, 4)
    monkeypatch.setattr(K, "weights_fit", lambda w, s: w.dtype == torch.float32 and s.numel() == w.shape[0])
    results, graphs = [], []
    for batched in (True, False):
        monkeypatch.setattr(K, "traced_batch_applies", lambda on=batched: on and torch.compiler.is_compiling())
        m = copy.deepcopy(model)
        n_ops = []

        def backend(gm, example_inputs, n_ops=n_ops):
            n_ops.append(sum(n.target is torch.ops.hasb.quantize_weights_forward.default for n in gm.graph.nodes))
            (out,) = (n for n in gm.graph.nodes if n.op == "output")
            assert len(out.args[0]) == 1  # the logits only: no Ŵ leaves the graph (each layer marks its taken)
            return gm.forward

        torch._dynamo.reset()
        f = torch.compile((lambda x, m=m: m(x)) if whole_call else m, backend=backend)
        for _ in range(2):
            m.zero_grad()
            loss = torch.nn.functional.cross_entropy(f(x).flatten(0, 1), y.flatten())
            loss.backward()
        graphs.append(n_ops)
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
        assert all(q._w_pass is None for q in m.modules() if isinstance(q, QuantMixin))
    assert graphs == [[1], [0]]  # one graph each, compiled once; the weight op only where the gate is open
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2) and g1.keys() == g2.keys()
    for n in g1:  # Ŵ are equal, so ∂W are too up to the step gradient's summation order and one product
        assert torch.allclose(g1[n], g2[n], rtol=1e-5, atol=1e-6 * float(g2[n].abs().max())), n
    torch._dynamo.reset()


class _SharedLayerNet(torch.nn.Module):
    """Four linears, the middle two called twice (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        return self.d(self.c(self.b(self.c(self.b(self.a(x))))))


def test_a_compiled_layer_called_twice_takes_the_pass_once_then_quantizes_its_own(monkeypatch):
    """A layer called twice in one compiled forward uses the pass's Ŵ once (then marked taken) and quantizes its
    own weight the second time: one weight op, the composite's output, no Ŵ left after the forward."""
    torch.manual_seed(0)
    model = hasb.quantize_model(_SharedLayerNet(), bits=(8, 6, 4, 2), example_input=torch.randn(2, 16))
    x = torch.randn(4, 16)
    hasb.init_quantizers(model, x)
    hasb.set_config(model, 4)
    assert [m.w_bit for m in (model.b, model.c)] == [4, 4]  # the first and last layers stay at full precision
    monkeypatch.setattr(K, "weights_fit", lambda w, s: w.dtype == torch.float32 and s.numel() == w.shape[0])
    monkeypatch.setattr(K, "traced_batch_applies", lambda: torch.compiler.is_compiling())
    ops = []

    def backend(gm, example_inputs):
        ops.append(sum(n.target is torch.ops.hasb.quantize_weights_forward.default for n in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(x)
    with Q.composite_ops():
        ref = model(x)
    assert ops == [1] and torch.equal(out, ref)
    assert all(m._w_pass is None for m in model.modules() if isinstance(m, QuantMixin))
    torch._dynamo.reset()


def test_a_compiled_layer_called_on_its_own_leaves_no_weights_for_the_next_forward(monkeypatch):
    """A quantized layer compiled and called outside its model's forward makes a pass nobody releases; the model's
    next forward drops those Ŵ first (its pre-hook), so it quantizes the weights as they are now."""
    import hasb
    from hasb.models import build_model

    torch.manual_seed(0)
    model = hasb.quantize_model(build_model("lm_tiny", context=16), bits=(8, 6, 4, 2))
    x = torch.randint(0, 256, (4, 16))
    hasb.init_quantizers(model, x)
    hasb.set_config(model, 4)
    monkeypatch.setattr(K, "weights_fit", lambda w, s: w.dtype == torch.float32 and s.numel() == w.shape[0])
    monkeypatch.setattr(K, "traced_batch_applies", lambda: torch.compiler.is_compiling())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(x)
    layer = model.blocks[0].attn.k  # q is the first layer: full precision
    torch.compile(layer, backend="aot_eager")(torch.randn(4, 16, 64))
    assert all(m._w_pass is not None for m in model.modules() if isinstance(m, QuantMixin) and m.w_bit is not None)
    with torch.no_grad():  # new weights: the Ŵ left behind are stale
        for m in model.modules():
            if isinstance(m, QuantMixin):
                m.weight.mul_(1.5)
    out = compiled(x)
    with Q.composite_ops():
        ref = model(x)
    assert torch.equal(out, ref)
    torch._dynamo.reset()


def _second_derivatives(fn, x, scale, grad, *args):
    out = fn(x, scale, *args)
    gx, gs = torch.autograd.grad(out, (x, scale), grad, create_graph=True)
    return torch.autograd.grad((gs**2).sum() + (gx * x).sum(), (x, scale))


@cuda
def test_double_backward_falls_back_to_composite():
    """create_graph=True: the gradient is the composite's graph, so second derivatives equal the composite's."""
    w, scale, grad = _case((16, 8, 3, 3), 8, "cuda", seed=2)
    x = torch.randn(4, 8, 5, 5, device="cuda").requires_grad_()
    s_x = torch.tensor(0.05, device="cuda", requires_grad=True)
    for fn, ref_fn, a, s, gr, args in (
        (K.quantize_weight, Q.quantize_weight, w, scale, grad, (4, 8, "half_up")),
        (K.quantize_activation, Q.quantize_activation, x, s_x, torch.randn_like(x), (4, True)),
    ):
        with Q.composite_ops():
            ref = _second_derivatives(ref_fn, a, s, gr, *args)
        got = _second_derivatives(fn, a, s, gr, *args)
        for u, v in zip(got, ref, strict=True):
            assert torch.allclose(u, v, rtol=1e-5, atol=1e-7)


def _act_case(shape, bit, signed, dtype, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 2
    x = (x if signed else x.relu()).to("cuda", dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    scale = (0.8 * Q.init_activation_scale(x.float(), bit, signed)).float()
    return x.requires_grad_(), scale.requires_grad_(), torch.randn(shape, generator=gen).to("cuda", dtype)


def _act_terms(x, scale, bit, signed, grad):
    """float64 terms g·grad·(round(q) - q | clip(q)) of the composite's scale gradient, q as the composite forms it."""
    qn, qp = Q.int_range(bit, signed)
    s = scale.detach().to(x.dtype).float()
    q = (x.detach().float() / s).to(x.dtype).double()
    inner = torch.where((q >= qn) & (q <= qp), torch.round(q) - q, q.clamp(qn, qp))
    return grad.double() * inner / math.sqrt(x.numel() * max(qp, 1))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bit,signed", [(8, False), (4, True), (2, False), (3, True)])
@pytest.mark.parametrize("shape,channels_last", [((64, 16, 8, 8), False), ((7, 333), False), ((4, 8, 9, 9), True)])
def test_fused_activation_equals_composite(shape, channels_last, bit, signed, dtype):
    x, scale, grad = _act_case(shape, bit, signed, dtype, channels_last=channels_last)
    ref_out, ref_gx, ref_gs = _composite(Q.quantize_activation, x, scale, grad, bit, signed)
    assert K.act_fused_applies(x, scale)
    out = K.quantize_activation(x, scale, bit, signed)
    assert type(out.grad_fn).__name__.startswith("FusedLSQActivation")
    out.backward(grad)
    assert out.dtype == dtype and torch.equal(out, ref_out)
    # ∂x: the composite's (grad·s)/s is two roundings in x's dtype away from grad; in fp16, grad·s can fall into
    # the subnormals (spacing 2^-24), an absolute error of up to 2^-25/s after the division
    s_x = float(scale.detach().to(dtype))
    atol = 2.0**-24 / s_x if dtype == torch.float16 else 0.0
    assert torch.allclose(x.grad.float(), ref_gx.float(), rtol=4 * UNIT[dtype], atol=atol)
    big = grad.abs() > 1e-2
    assert torch.equal((x.grad == 0)[big], (ref_gx == 0)[big])
    terms = _act_terms(x, scale, bit, signed, grad)
    blocks = math.ceil(x.numel() / 2048)
    tight = (11 + blocks + 4) * U * terms.abs().sum()  # products, 11-level block tree, sum of block partials
    assert abs(scale.grad.double() - terms.sum()) <= tight
    # the composite forms each term by cancellation in x's dtype (round-off ∝ |q|), any summation order
    qmag = (grad.double().abs() * (x.detach().double().abs() / scale.detach().double() + 2**bit + 1)).sum()
    loose = 2 * (x.numel() + 8) * UNIT[dtype] * qmag / math.sqrt(x.numel() * max(Q.int_range(bit, signed)[1], 1))
    assert abs(scale.grad.double() - ref_gs.double()) <= loose + tight


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_activation_step_gradient_of_a_large_tensor(dtype):
    """4.2 M values (2,050 blocks): the step's gradient is the float64 sum of its terms within the summation
    bound (the fp16 composite itself overflows to inf here), the same bits in a second run, and a second backward
    over the retained graph adds the same value again."""
    x, scale, grad = _act_case((2050, 2048), 8, False, dtype, seed=3)
    out = K.quantize_activation(x, scale, 8, False)
    out.backward(grad, retain_graph=True)
    first = scale.grad.clone()
    terms = _act_terms(x, scale, 8, False, grad)
    blocks = math.ceil(x.numel() / 2048)
    assert abs(first.double() - terms.sum()) <= (11 + blocks + 4) * U * terms.abs().sum()  # as in the test above
    out.backward(grad)
    assert torch.equal(scale.grad, 2 * first)
    scale.grad = None
    K.quantize_activation(x, scale, 8, False).backward(grad)
    assert torch.equal(scale.grad, first)


def test_launch_key_separates_what_triton_specializes_on():
    """A compiled kernel is reused only where Triton would pick the same one: a different dtype, address mod 16
    or int value (1 and multiples of 16 are specialized; i32 vs i64) gives another key; a float's value does not."""
    buf = torch.zeros(64)
    a, b = buf[:32], buf[4:36]  # b starts 16 bytes in (aligned), c 4 bytes in
    c = buf[1:33]
    key = K.launch_key
    assert key((a, 32, 0.5, True)) == key((b, 32, 0.25, True))
    assert key((a, 32, 0.5, True)) != key((c, 32, 0.5, True))
    assert key((a,)) != key((a.to(torch.bfloat16),))
    assert key((a, 32)) != key((a, 33)) and key((a, 1)) != key((a, 2)) and key((a, 2**31)) != key((a, 2**31 + 16))
    assert key((a, True)) != key((a, False)) and key((a, 0.5)) != key((a, 1))  # a float is not an int


def test_activation_launch_key_is_at_least_as_fine_as_the_general_key():
    """Two forward launches with one activation key have one general key (so one compiled kernel serves both):
    over dtypes, sizes (1, multiples of 16, odd) and addresses off by 1 to 8 elements, for each tensor."""
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        buf = torch.zeros(200, dtype=dtype)
        sbuf = torch.zeros(8)
        for n in (1, 16, 17, 32):
            for xo, so, oo in ((0, 0, 0), (1, 0, 0), (8, 0, 0), (0, 1, 0), (0, 4, 0), (0, 0, 1), (2, 1, 3)):
                x, s, out = buf[xo : xo + n], sbuf[so], buf[100 + oo : 100 + oo + n]
                args = (x, s, out, n, -8.0, 7.0, dtype != torch.float32, 2048)
                cases.append((K.act_launch_key(x, n, s, out), K.launch_key(args)))
    general_of: dict = {}
    for act, general in cases:
        assert general_of.setdefault(act, general) == general
    assert len(general_of) > 3 * 4 * 3  # the cases do differ in what Triton specializes on


class _FakeCompiled:
    """A compiled kernel's stand-in with the attributes :func:`hasb.kernels._direct_launcher` reads: its C
    launch function and its runner note their calls."""

    def __init__(self, scratch=0, launcher=True):
        self.calls = []
        launch = lambda *a: self.calls.append(("c", a))  # noqa: E731
        fields = dict(launch_cooperative_grid=False, launch_pdl=True, global_scratch_size=scratch)
        fields |= dict(profile_scratch_size=0, launch=staticmethod(launch)) if launcher else {}
        self.run = type("Launcher", (), fields)()
        self.function, self.packed_metadata = 1234, (4, 1, 0)

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("runner", grid, args))


def test_direct_launcher_calls_the_c_launch_with_the_runners_arguments():
    """One call of the C launch function with what Triton's runner passes it (grid, the device's current
    stream, function, flags, no scratch, the metadata, no hooks, then the kernel's arguments); the runner where
    a hook is set or the kernel needs scratch memory, or where the launcher lacks what the direct call reads."""
    hooks = type("Hooks", (), dict(launch_enter_hook=None, launch_exit_hook=None))()
    fake = _FakeCompiled()
    go = K._direct_launcher(fake, hooks, lambda device: 100 + device)
    go(5, 2, ("x", 7, 0.5))
    assert fake.calls == [
        ("c", (5, 1, 1, 102, 1234, False, True, None, None, (4, 1, 0), None, None, None, "x", 7, 0.5))
    ]
    hooks.launch_enter_hook = type("HookChain", (), dict(calls=[]))()  # Triton 3.6: an empty chain, no hook
    go(5, 2, ("x",))
    assert fake.calls[-1][0] == "c"
    hooks.launch_enter_hook.calls.append(print)
    go(5, 2, ("x",))
    assert fake.calls[-1] == ("runner", (5, 1, 1), ("x",))
    hooks.launch_enter_hook = None
    hooks.launch_exit_hook = print
    go(5, 2, ("x",))
    assert fake.calls[-2:] == [("runner", (5, 1, 1), ("x",))] * 2
    for other in (_FakeCompiled(scratch=64), _FakeCompiled(launcher=False)):
        K._direct_launcher(other, hooks, lambda device: 0)(3, 0, ("y",))
        assert other.calls == [("runner", (3, 1, 1), ("y",))]


class _CountingKernel:
    """A Triton kernel that counts its JIT launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.jit = kernel, 0

    def __getitem__(self, grid):
        self.jit += 1
        return self.kernel[grid]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_direct_launches_equal_the_jit_launches(dtype):
    """The second launch of a key skips the JIT and writes what a JIT launch writes, also at odd sizes, at
    addresses off 16 bytes (a view) and with other float arguments (Qn, Qp, g) than the first launch's."""
    fwd, seen = _CountingKernel(K._aq_fwd_kernel), set()
    for n in (1, 7, 2048, 4097):
        for off in (0, 1, 8):
            x = torch.randn(n + off, device="cuda").to(dtype)[off:]
            s = torch.tensor(0.05, device="cuda")
            blocks = math.ceil(n / 2048)
            lowp = dtype != torch.float32
            seen.add((n, x.data_ptr() % 16))  # the outputs are fresh allocations: aligned
            for qn, qp in ((0.0, 15.0), (-8.0, 7.0)):
                want = torch.empty_like(x)
                K._aq_fwd_kernel[(blocks,)](x, s, want, n, qn, qp, LOWP=lowp, BLOCK=2048)
                for _ in range(2):
                    got = torch.full_like(x, float("nan"))
                    K.launch(fwd, blocks, x, s, got, n, qn, qp, lowp, 2048)
                    assert torch.equal(got, want)
    assert fwd.jit == len(seen)  # one JIT launch per size and x's alignment; the float values share it
    g = torch.randn(4097, device="cuda").to(dtype)
    x = torch.randn(4097, device="cuda").to(dtype)
    s = torch.tensor(0.05, device="cuda")
    want = K._launch_act_backward(x, s, g, -8.0, 7.0, 0.01)
    for _ in range(2):
        got = K._launch_act_backward(x, s, g, -8.0, 7.0, 0.01)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@cuda
def test_a_launch_hook_sees_every_direct_launch():
    """While a launch hook is set (a profiler's), a key's later launches go through Triton's runner, which calls
    it, and write the same values; once it is unset, a launch calls it no more."""
    import triton

    x, s = torch.randn(5000, device="cuda"), torch.tensor(0.05, device="cuda")
    want = K._launch_act_forward(x, s, -8.0, 7.0)  # the key's first launch (the JIT)
    runtime, seen = triton.knobs.runtime, []
    old = runtime.launch_enter_hook
    runtime.launch_enter_hook = seen.append
    try:
        for _ in range(2):
            assert torch.equal(K._launch_act_forward(x, s, -8.0, 7.0), want)
    finally:
        runtime.launch_enter_hook = old
    assert len(seen) == 2
    assert torch.equal(K._launch_act_forward(x, s, -8.0, 7.0), want) and len(seen) == 2


def _backward_math(calls):
    """The activation backward kernel's math in torch ops (CPU): (∂L/∂x, ∂L/∂s), and each call noted."""

    def run(x, scale, grad, qn, qp, g):
        calls.append(x.shape)
        q = x / scale
        inside = (q >= qn) & (q <= qp)
        qc = q.clamp(qn, qp)
        inner = torch.where(inside, torch.round(qc) - qc, qc)
        grad_s = ((grad.double() * inner.double()).sum() * g).float().reshape(scale.shape)
        return torch.where(inside, grad, torch.zeros_like(grad)), grad_s

    return run


def test_compiled_quantizer_keeps_the_composite_forward_and_calls_one_backward_op(monkeypatch):
    """Traced by torch.compile where the kernels fit, the quantizer's forward is the composite's and its backward
    one ``hasb::lsq_act_backward`` call on the 1-D memory-order view; results come back in x's layout.  On the CPU
    the fit is forced and the op's launch replaced by the kernel's math in torch ops."""
    calls: list = []
    monkeypatch.setattr(K, "_act_kernel_fits", lambda x, s: True)
    monkeypatch.setattr(K, "_launch_act_backward", _backward_math(calls))
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 8, 5, 5, generator=gen) * 2).relu().to(memory_format=torch.channels_last)
    scale = 0.8 * Q.init_activation_scale(x, 4, False)
    grad = torch.randn(4, 8, 5, 5, generator=gen)
    ref_out, ref_gx, _ = _composite(Q.quantize_activation, x, scale, grad, 4, False)
    xa, sa = x.clone().requires_grad_(), scale.clone().requires_grad_()
    f = torch.compile(lambda x, s: K.quantize_activation(x, s, 4, False), backend="aot_eager", fullgraph=True)
    out = f(xa, sa)
    out.backward(grad)
    assert calls == [(x.numel(),)]
    assert torch.equal(out, ref_out) and out.stride() == x.stride()
    assert torch.allclose(xa.grad, ref_gx, rtol=4 * U, atol=0) and xa.grad.stride() == x.stride()
    terms = _act_terms(x, scale, 4, False, grad)  # float64; the op's math sums in float64 too: the float32
    assert abs(sa.grad.double() - terms.sum()) <= 4 * U * terms.abs().sum()  # rounding of g and of the result


def test_compiled_quantizer_keeps_the_memory_order_view_after_a_batch_size_change(monkeypatch):
    """Recompiled with dynamic shapes (a new batch size), the channels_last activation still reaches the backward op
    as its 1-D memory-order view, once per step, with the composite's values."""
    calls: list = []
    monkeypatch.setattr(K, "_act_kernel_fits", lambda x, s: True)
    monkeypatch.setattr(K, "_launch_act_backward", _backward_math(calls))
    f = torch.compile(lambda x, s: K.quantize_activation(x, s, 4, False), backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(3)
    for shape in [(4, 8, 5, 5), (3, 8, 5, 5), (2, 8, 6, 6)]:
        x = (torch.randn(*shape, generator=gen) * 2).relu().to(memory_format=torch.channels_last)
        scale = (0.8 * Q.init_activation_scale(x, 4, False)).requires_grad_()
        out = f(x.requires_grad_(), scale)
        out.backward(torch.ones_like(out))
        assert calls.pop() == (x.numel(),) and not calls
        assert out.stride() == x.stride() and torch.equal(
            out, Q.quantize_activation(x.detach(), scale.detach(), 4, False)
        )
    torch._dynamo.reset()


def test_compiled_quantizer_leaves_the_backward_to_inductor_where_asked(monkeypatch):
    """``backward_op=False``: no op in the compiled graph, and the results are the composite's."""
    calls: list = []
    monkeypatch.setattr(K, "_act_kernel_fits", lambda x, s: True)
    monkeypatch.setattr(K, "_launch_act_backward", _backward_math(calls))
    x = (torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(1)) * 2).relu()
    scale = 0.8 * Q.init_activation_scale(x, 4, False)
    grad = torch.randn_like(x)
    ref_out, ref_gx, ref_gs = _composite(Q.quantize_activation, x, scale, grad, 4, False)
    xa, sa = x.clone().requires_grad_(), scale.clone().requires_grad_()
    f = torch.compile(lambda x, s: K.quantize_activation(x, s, 4, False, False), backend="aot_eager", fullgraph=True)
    out = f(xa, sa)
    out.backward(grad)
    assert calls == []
    assert torch.equal(out, ref_out) and torch.equal(xa.grad, ref_gx) and torch.equal(sa.grad, ref_gs)


def test_compiled_model_takes_the_backward_op_where_quantize_model_marked_it(monkeypatch):
    """A compiled quantized ResNet calls the backward op once per quantized activation marked
    ``act_backward_op`` (after a batch norm, or shared by convolutions: one call per shared input) and leaves the
    others (after a residual add or the max pool) to inductor."""
    calls: list = []
    monkeypatch.setattr(K, "_act_kernel_fits", lambda x, s: True)
    monkeypatch.setattr(K, "act_fused_applies", lambda x, s: False)  # eager passes take the composite
    monkeypatch.setattr(K, "_launch_act_backward", _backward_math(calls))
    torch.manual_seed(0)
    model = hasb.quantize_model(build_model("resnet18", num_classes=10, in_channels=3, image_size=64))
    x = torch.randn(2, 3, 64, 64)
    hasb.init_quantizers(model, x)
    model.train()
    hasb.set_config(model, 4)
    acts = [m for m in model.modules() if isinstance(m, QuantMixin) and m.a_bit is not None]
    marked = [m for m in acts if m.act_backward_op]
    assert 0 < len(marked) < len(acts)
    inputs = [m for m in marked if m._group is None or m._group[0] is m]  # a group's others take its first's x̂
    assert len(marked) - len(inputs) == len(model.hasb_spec.shared_inputs) == 3
    torch.compile(model, backend="aot_eager", fullgraph=True)(x).sum().backward()
    assert len(calls) == len(inputs)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_quantizer_gradients_are_the_eager_kernels(dtype, monkeypatch):
    """Compiled by inductor on CUDA: one backward kernel call per backward, whose gradients equal the eager kernel
    path's bit for bit (the same kernel on the same x and ∂L/∂y); the forward is inductor's, within one step of
    eager's everywhere (its x / s, in float32 where eager rounds to x's dtype, may round the other way at a .5
    boundary), plus each output's own rounding to x's dtype."""
    real, calls = K._launch_act_backward, []
    monkeypatch.setattr(K, "_launch_act_backward", lambda *a: calls.append(1) or real(*a))
    x, scale, grad = _act_case((16, 24, 14, 14), 4, False, dtype, channels_last=True)
    ref = K.quantize_activation(x, scale, 4, False)
    ref.backward(grad)
    ref_gx, ref_gs = x.grad.clone(), scale.grad.clone()
    x.grad = scale.grad = None
    calls.clear()
    out = torch.compile(lambda x, s: K.quantize_activation(x, s, 4, False), fullgraph=True)(x, scale)
    out.backward(grad)
    assert calls == [1]
    assert torch.equal(x.grad, ref_gx) and torch.equal(scale.grad, ref_gs)
    step = float(scale.detach().to(dtype))
    assert out.dtype == dtype and out.stride() == x.stride()
    bound = step * (1 + UNIT[dtype]) + UNIT[dtype] * (out.float().abs() + ref.float().abs())
    assert ((out.float() - ref.float()).abs() <= bound).all()


@cuda
def test_composite_contexts_take_the_reference():
    w, scale, _ = _case((8, 4), 8, "cuda")
    x = torch.randn(3, 5, device="cuda")
    s = torch.tensor(0.1, device="cuda")
    with Q.composite_ops():
        assert not K.fused_applies(w, scale) and not K.act_fused_applies(x, s)
    assert not K.fused_applies(w.double(), scale.double())
    assert not K.act_fused_applies(x.double(), s)
    assert not K.fused_applies(w.detach().t(), scale[:4])  # not dense rows: composite


def test_cpu_takes_the_composite(monkeypatch):
    """Off-GPU the kernels are never launched and the results (values and gradients) are the reference's."""

    def boom(*args, **kwargs):
        raise AssertionError("kernel launched off-GPU")

    for name in ("_launch_forward", "_launch_backward", "_launch_act_forward", "_launch_act_backward"):
        monkeypatch.setattr(K, name, boom)
    for rounding in Q.ROUNDINGS:
        w, scale, grad = _case((12, 5, 3, 3), 6, "cpu")
        assert not K.fused_applies(w, scale)
        out = K.quantize_weight(w, scale, 3, 6, rounding)
        out.backward(grad)
        ref_out, ref_gw, ref_gs = _composite(Q.quantize_weight, w, scale, grad, 3, 6, rounding)
        assert torch.equal(out, ref_out)
        assert torch.allclose(w.grad, ref_gw, rtol=4 * U, atol=0)
        _check_weight_scale_grad(scale.grad, ref_gs, w, scale, 3, 6, rounding, grad)
    x = torch.randn(4, 6, requires_grad=True)
    s = torch.tensor(0.2, requires_grad=True)
    assert not K.act_fused_applies(x, s)
    out = K.quantize_activation(x, s, 4, True)
    ref = Q.quantize_activation(x, s, 4, True)
    assert torch.equal(out, ref)
    assert all(
        torch.equal(a, b)
        for a, b in zip(torch.autograd.grad(out.sum(), (x, s)), torch.autograd.grad(ref.sum(), (x, s)), strict=True)
    )


def test_bad_arguments_rejected():
    w, scale, _ = _case((4, 3), 8, "cpu")
    with pytest.raises(ValueError, match="rounding"):
        K.quantize_weight(w, scale, 4, 8, "stochastic")
    with pytest.raises(ValueError, match="exceeds"):
        K.quantize_weight(w, scale, 8, 4)
    for many in (K.quantize_weights, K.quantize_weights_traced):  # a pass: eager or as torch.compile traces it
        with pytest.raises(ValueError, match="rounding"):
            many([w], [scale], [4], [8], "stochastic")
        with pytest.raises(ValueError, match="exceeds"):
            many([w], [scale], [8], [4], "half_up")


@cuda
@pytest.mark.parametrize("bit", [8, 4, 2])
def test_quantized_model_uses_kernels_with_the_composite_values(bit):
    """The layers take the kernels by default on CUDA: a whole quantized network's output equals the composite's
    exactly and its parameter gradients agree to float32 accumulation-order noise; switching them off works."""
    import hasb
    from hasb.models import build_model

    torch.manual_seed(0)
    model = hasb.quantize_model(build_model("resnet20"), bits=(8, 6, 4, 2)).cuda()
    x = torch.randn(16, 1, 28, 28, device="cuda")
    hasb.init_quantizers(model, x)
    hasb.set_config(model, bit)
    model.eval()
    launched = []
    orig = K.quantize_weights
    try:  # the layers' weights go through the one-launch-per-pass entry point
        K.quantize_weights = lambda *a: launched.append(1) or orig(*a)
        results = []
        for on in (True, False):
            prev = K.enable(on)
            try:
                model.zero_grad()
                with contextlib.nullcontext() if on else Q.composite_ops():  # the plain-ops reference
                    out = model(x)
                    out.square().sum().backward()
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                results.append((out.detach(), grads))
            finally:
                K.enable(prev)
    finally:
        K.quantize_weights = orig
    assert launched == [1]  # the kernel path ran while enabled, once for the pass
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    assert g1.keys() == g2.keys()
    # scale gradients are sums with cancellation over a whole tensor, summed in another order by the kernels
    # (their exact bound is checked per layer above): compare them on the scale of all scale gradients
    scale_max = max(float(g.abs().max()) for n, g in g2.items() if "scale" in n)
    for n, b in g2.items():
        atol = 1e-4 * scale_max if "scale" in n else 1e-5 * float(b.abs().max())
        assert torch.allclose(g1[n], b, rtol=1e-3, atol=atol), n
