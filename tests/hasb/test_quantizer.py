"""Double Rounding quantizer: integer formulas, ranges, idempotence, per-channel LSQ gradients."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hasb import quantizer as Q

BIT_PAIRS = [(h, l) for h in (8, 6, 4, 3) for l in range(2, h + 1)]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(BIT_PAIRS), st.lists(st.integers(-128, 127), min_size=1, max_size=64))
def test_half_up_equals_integer_add_and_shift(hl, ints):
    h, l = hl
    lo, hi = Q.int_range(h)
    w_h = torch.tensor([min(max(v, lo), hi) for v in ints], dtype=torch.int32)
    d = h - l
    expect = (w_h + (1 << (d - 1))) >> d if d else w_h
    qn, qp = Q.int_range(l)
    expect = expect.clamp(qn, qp)
    got_float = Q.derive_int(w_h.float(), l, h, "half_up")
    got_int = Q.derive_int(w_h, l, h, "half_up")
    assert torch.equal(got_float.to(torch.int32), expect)
    assert torch.equal(got_int, expect)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(BIT_PAIRS), st.lists(st.integers(-128, 127), min_size=1, max_size=64))
def test_half_even_equals_torch_round(hl, ints):
    h, l = hl
    lo, hi = Q.int_range(h)
    w_h = torch.tensor([min(max(v, lo), hi) for v in ints], dtype=torch.float32)
    qn, qp = Q.int_range(l)
    expect = torch.round(w_h / 2 ** (h - l)).clamp(qn, qp)
    assert torch.equal(Q.derive_int(w_h, l, h, "half_even"), expect)


def _top_bits(v: int, h: int, l: int) -> int:
    """The top l bits of v's h-bit two's-complement code, read as a signed l-bit integer (by string slicing)."""
    code = format(v % 2**h, f"0{h}b")[:l]
    u = int(code, 2)
    return u - 2**l if code[0] == "1" else u


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(BIT_PAIRS), st.lists(st.integers(-128, 127), min_size=1, max_size=64))
def test_msb_keeps_the_top_bits_of_the_stored_code(hl, ints):
    h, l = hl
    lo, hi = Q.int_range(h)
    vals = [min(max(v, lo), hi) for v in ints]
    expect = torch.tensor([_top_bits(v, h, l) for v in vals], dtype=torch.int32)
    w_h = torch.tensor(vals, dtype=torch.int32)
    assert torch.equal(Q.derive_int(w_h, l, h, "msb"), expect)  # integer path: w >> Δ
    assert torch.equal(Q.derive_int(w_h.float(), l, h, "msb").to(torch.int32), expect)  # float path: floor


def test_msb_scale_relation_and_truncation_bias():
    # Ŵ_l = (W_h >> Δ)·s_h·2^Δ: never above the INT-h value, at most (2^Δ - 1)·s_h below it
    torch.manual_seed(0)
    w = torch.randn(6, 50)
    s = Q.init_weight_scale(w, 8)
    w8 = Q.quantize_weight(w, s, 8, 8, "msb")
    for bit in (6, 4, 2):
        gap = (w8 - Q.quantize_weight(w, s, bit, 8, "msb")) / s[:, None]
        assert gap.min() >= 0 and gap.max() <= 2 ** (8 - bit) - 1 + 1e-4
        assert gap.mean() > 0.25 * (2 ** (8 - bit) - 1)  # a real downward bias (uniform residues: mean ≈ half)


def test_roundings_differ_on_ties():
    # 6/4 = 1.5 and -6/4 = -1.5: half-up gives 2 and -1, half-even gives 2 and -2
    w = torch.tensor([6.0, -6.0, 2.0, -2.0])
    assert Q.derive_int(w, 6, 8, "half_up").tolist() == [2, -1, 1, 0]
    assert Q.derive_int(w, 6, 8, "half_even").tolist() == [2, -2, 0, -0]
    assert Q.derive_int(w, 6, 8, "msb").tolist() == [1, -2, 0, -1]  # floor: the top bits


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([(8, 8), (8, 6), (8, 4), (8, 2), (4, 3), (4, 2)]),
    st.integers(0, 2**31 - 1),
    st.sampled_from(Q.ROUNDINGS),
)
def test_ranges_and_idempotence(hl, seed, rounding):
    h, l = hl
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 3, 3, 3, generator=g) * 0.3
    s = Q.init_weight_scale(w, h) * (0.5 + torch.rand(5, generator=g))
    w_int = Q.derive_int(Q.stored_int(w, s, h), l, h, rounding)
    qn, qp = Q.int_range(l)
    assert w_int.min() >= qn and w_int.max() <= qp
    assert torch.equal(w_int, torch.round(w_int))
    wq = Q.quantize_weight(w, s, l, h, rounding)
    # value is exactly W_l · s_h · 2^(h-l)
    assert torch.equal(wq, w_int * (s * 2 ** (h - l)).view(-1, 1, 1, 1))
    # quantizing an already-quantized weight changes nothing
    assert torch.equal(Q.quantize_weight(wq, s, l, h, rounding), wq)


def lsq_reference_scale_grad(w, s, G, bit, h, rounding):
    """Hand-written LSQ scale gradient (per channel) for L = Σ Ŵ·G."""
    d = h - bit
    qn, qp = Q.int_range(bit)
    s_eff = (s * 2**d).view(-1, *[1] * (w.dim() - 1))
    q = w / s_eff
    w_l = Q.derive_int(Q.stored_int(w, s, h), bit, h, rounding)
    inner = torch.where(q < qn, torch.full_like(q, qn), torch.where(q > qp, torch.full_like(q, qp), w_l - q))
    g = 1.0 / math.sqrt(w[0].numel() * qp)
    return g * 2**d * (inner * G).reshape(w.shape[0], -1).sum(1)


@pytest.mark.parametrize("bit", [8, 6, 4, 2])
@pytest.mark.parametrize("rounding", Q.ROUNDINGS)
@pytest.mark.parametrize("composite", [False, True], ids=["fused", "composite"])
def test_per_channel_scale_gradient_matches_lsq_reference(bit, rounding, composite):
    if composite:
        with Q.composite_ops():
            return test_per_channel_scale_gradient_matches_lsq_reference(bit, rounding, False)
    torch.manual_seed(bit)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * torch.linspace(0.05, 1.0, 6, dtype=torch.float64).view(
        -1, 1, 1, 1
    )
    w.requires_grad_(True)
    s = (Q.init_weight_scale(w, 8) * 0.7).requires_grad_(True)  # < 3σ range at 8 bit: some clipping
    G = torch.randn_like(w)
    (Q.quantize_weight(w, s, bit, 8, rounding) * G).sum().backward()
    ref = lsq_reference_scale_grad(w.detach(), s.detach(), G, bit, 8, rounding)
    torch.testing.assert_close(s.grad, ref, rtol=1e-10, atol=1e-12)
    # per channel: not one value broadcast to every channel (the reference code's bug)
    assert s.grad.unique().numel() == s.grad.numel()
    # weight gradient: straight-through inside the clip range, zero outside
    q = w.detach() / (s.detach() * 2 ** (8 - bit)).view(-1, 1, 1, 1)
    qn, qp = Q.int_range(bit)
    inside = (q >= qn) & (q <= qp)
    torch.testing.assert_close(w.grad, G * inside)
    if bit == 2:
        assert (~inside).any(), "test should exercise clipping"


@pytest.mark.parametrize("composite", [False, True], ids=["fused", "composite"])
def test_activation_lsq_values_and_gradient(composite):
    if composite:
        with Q.composite_ops():
            return test_activation_lsq_values_and_gradient(False)
    x = torch.tensor([-1.0, 0.04, 0.26, 0.5, 2.0], requires_grad=True)
    s = torch.tensor(0.1, requires_grad=True)
    y = Q.quantize_activation(x, s, 2, signed=False)  # range 0..3
    assert torch.allclose(y, torch.tensor([0.0, 0.0, 0.3, 0.3, 0.3]))
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    inner = torch.tensor([0.0, 0.0 - 0.4, 3.0 - 2.6, 3.0, 3.0])
    g = 1 / math.sqrt(5 * 3)
    assert s.grad.item() == pytest.approx(g * inner.sum().item(), rel=1e-6)
    ys = Q.quantize_activation(torch.tensor([-0.31, 0.31]), torch.tensor(0.1), 2, signed=True)  # -2..1
    assert torch.allclose(ys, torch.tensor([-0.2, 0.1]))


def test_exported_integers_reproduce_every_bit_with_integer_ops():
    from hasb.export import derive_from_export

    torch.manual_seed(0)
    w = torch.randn(8, 16)
    s = Q.init_weight_scale(w, 8)
    w8 = Q.stored_int(w, s, 8).to(torch.int8)
    for bit in (6, 4, 2):
        for r in Q.ROUNDINGS:
            expect = Q.derive_int(Q.stored_int(w, s, 8), bit, 8, r).to(torch.int8)
            assert torch.equal(derive_from_export(w8, bit, 8, r), expect)


def test_fused_and_composite_paths_agree_and_composite_is_twice_differentiable():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    s = Q.init_weight_scale(w, 8)
    for bit in (8, 4, 2):
        a = Q.quantize_weight(w, s, bit, 8)
        with Q.composite_ops():
            b = Q.quantize_weight(w, s, bit, 8)
        assert torch.equal(a, b)
    # second derivative through the straight-through path exists (zero curvature of the quantizer itself)
    wr = w.clone().requires_grad_(True)
    with Q.composite_ops():
        y = (Q.quantize_weight(wr, s, 4, 8) ** 2).sum()
        (gw,) = torch.autograd.grad(y, wr, create_graph=True)
        (hv,) = torch.autograd.grad(gw, wr, torch.ones_like(wr))
    assert torch.isfinite(hv).all()


@pytest.mark.parametrize("bit", [8, 4, 2])
def test_activation_init_minimises_mse_and_beats_percentile_rule_at_low_bits(bit):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(50_000))
    s = Q.init_activation_scale(x, bit, signed=False)
    rule = torch.quantile(x, 0.999) / (2**bit - 1)

    def mse(step):
        return (torch.clamp(torch.round(x / step), 0, 2**bit - 1) * step - x).square().mean().item()

    assert mse(s) <= mse(rule) * (1 + 1e-6)
    assert mse(s) <= mse(s * 0.9) * (1 + 1e-3)  # shrinking further only adds clipping error
    if bit == 2:
        assert mse(s) < 0.6 * mse(rule)  # the percentile rule rounds most post-ReLU values to 0


def test_one_bit_weights_signed_minus_one_zero_with_finite_gradients():
    # --bits 1 used to raise ZeroDivisionError (Qp = 0 in LSQ's g); the 1-bit signed range is [-1, 0]
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    s = Q.init_weight_scale(w, 8).requires_grad_(True)
    for high in (8, 1):
        wq = Q.quantize_weight(w, s, 1, high)
        ints = torch.round(wq.detach() / (s.detach() * 2 ** (high - 1)).view(-1, 1, 1, 1))
        assert set(ints.unique().tolist()) <= {-1.0, 0.0}
        wq.sum().backward()
        assert torch.isfinite(w.grad).all() and torch.isfinite(s.grad).all()
        w.grad = s.grad = None


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_compiled_activation_quantizers_survive_a_batch_size_change(channels_last):
    """A compiled model meets a new batch size (the last, smaller batch of an evaluation): dynamo recompiles with
    symbolic shapes, where it cannot sort on strides.  The quantizers (int bits and bits as data) still trace as
    one graph each, with eager's values and x's layout."""
    f_int = torch.compile(Q.quantize_activation, backend="aot_eager", fullgraph=True)
    f_data = torch.compile(Q.quantize_activation_c, backend="aot_eager", fullgraph=True)
    gen = torch.Generator().manual_seed(2)
    for shape in [(4, 8, 5, 5), (3, 8, 5, 5), (2, 8, 6, 6)]:
        x = (torch.randn(*shape, generator=gen) * 2).relu()
        x = x.to(memory_format=torch.channels_last) if channels_last else x
        scales, index, qrange = torch.tensor([0.2, 0.1, 0.05]), torch.tensor(1), torch.tensor([0.0, 15.0])
        ref = Q.quantize_activation(x, scales[1], 4, False)
        for out in (f_int(x, scales[1], 4, False), f_data(x, scales, index, qrange)):
            assert out.stride() == x.stride() and torch.equal(out, ref), shape
    torch._dynamo.reset()


def test_memory_order_views_and_activation_quantizer_keeps_layout_and_values():
    """The activation quantizer works on the 1-D memory-order view (a coalesced scale-gradient sum when compiled):
    same values and layout as the logical-order computation, gradients equal up to the sum's round-off."""
    torch.manual_seed(5)
    x_c = torch.randn(3, 5, 4, 6) * 2
    x_l = x_c.to(memory_format=torch.channels_last)
    view, restore = Q.memory_order(x_l)  # 1-D in memory order: NHWC
    assert view.dim() == 1 and view.data_ptr() == x_l.data_ptr()
    assert torch.equal(view, x_c.permute(0, 2, 3, 1).reshape(-1))
    assert restore(view).stride() == x_l.stride() and torch.equal(restore(view), x_c)
    flat, restore = Q.memory_order(x_c)
    assert torch.equal(flat, x_c.reshape(-1)) and restore(flat).stride() == x_c.stride()
    odd = x_c[:, :, ::2]  # not a permutation of a contiguous layout: left as it is
    assert Q.memory_order(odd)[0] is odd
    gout = torch.randn_like(x_c)
    outs, grads = [], []
    for x0 in (x_c, x_l):
        x, s = x0.clone().requires_grad_(), torch.tensor(0.3, requires_grad=True)
        with Q.composite_ops():
            out = Q.quantize_activation(x, s, 4, signed=True)
        assert out.stride() == x0.stride()
        (out * gout).sum().backward()
        outs.append(out)
        grads.append((x.grad, s.grad))
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0][0], grads[1][0])
    # the scale gradient g·Σ gout·t (t = round(q) − q inside the range, the clip bound outside) summed in two
    # orders: float32 summation error ≤ (n − 1)·2⁻²⁴·g·Σ|gout·t| for each, so twice that between them
    q = (x_c.double() / 0.3).clamp(-8, 7)
    t = torch.where((q > -8) & (q < 7), q.round() - q, q)
    g = 1 / math.sqrt(x_c.numel() * 7)
    bound = 2 * (x_c.numel() - 1) * 2**-24 * g * float((gout.double() * t).abs().sum())
    assert abs(float(grads[0][1]) - float(grads[1][1])) <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_sum_activation_lsq_equals_the_composite(dtype):
    """The compiled bits-as-data path's LSQ Function (one backward sum): the composite's values bit for bit
    (round(q) − q is exact for q in range, Sterbenz), ∂L/∂x = ∂L/∂y·1[inside] where the composite computes
    (∂L/∂y·s)/s (two roundings: within eps·|v|), ∂L/∂s within float32 summation error; and the compiled data
    path takes it."""
    torch.manual_seed(11)
    x0 = (torch.randn(4, 6, 5, 5) * 2).to(dtype).contiguous(memory_format=torch.channels_last)
    gout = torch.randn_like(x0)
    qn, qp, s0 = torch.tensor(-8.0), torch.tensor(7.0), 0.3
    g = torch.tensor(1 / math.sqrt(x0.numel() * 7))
    res = []
    for fn in (Q.lsq_fake_quant, Q.lsq_fake_quant_one_sum):
        x, s = x0.clone().requires_grad_(), torch.tensor(s0, requires_grad=True)
        out = fn(x, s, g, qn, qp)
        assert out.stride() == x0.stride() and out.dtype == dtype
        res.append((out, *torch.autograd.grad(out, (x, s), gout)))
    (a, ax, as_), (b, bx, bs) = res
    assert torch.equal(a, b)
    assert ((ax.double() - bx.double()).abs() <= torch.finfo(dtype).eps * ax.abs().double()).all()
    n, u = x0.numel(), 2**-24
    q = (x0 / torch.tensor(s0)).double()  # q as both paths round it (in x's dtype); exact from here on
    r = q.clamp(-8, 7).round()
    inner = torch.where((q >= -8) & (q <= 7), r - q, q.clamp(-8, 7))
    ref = float((gout.double() * inner).sum() * float(g))
    # the one sum: products exact in float32 (bf16·bf16 too), n − 1 additions, one multiplication by g
    assert abs(float(bs) - ref) <= (n + 1) * u * float(g) * float((gout.double() * inner).abs().sum())
    if dtype == torch.float32:  # the composite's two float32 sums Σ gout·r and Σ gout·q, three roundings a term
        mag = float((gout.double().abs() * (r.abs() + q.abs())).sum())
        assert abs(float(as_) - ref) <= (n + 3) * u * float(g) * mag
    scales, idx, qrange = torch.tensor([0.5, s0], requires_grad=True), torch.tensor(1), torch.stack([qn, qp])
    comp = torch.compile(Q.quantize_activation_c, backend="aot_eager", fullgraph=True)
    out = comp(x0, scales, idx, qrange)
    torch._dynamo.reset()
    assert torch.equal(out, a)
    (gs,) = torch.autograd.grad(out, (scales,), gout)
    assert gs[0] == 0 and torch.equal(gs[1], bs)  # the one-sum value (aot_eager runs the same eager ops)


@pytest.mark.parametrize("data", [False, True], ids=["int_bits", "bits_as_data"])
def test_compiled_backward_reads_the_saved_activation_in_memory_order(data):
    """What inductor (C++ here; Triton on CUDA does the same) hands the backward of a channels_last conv graph:
    every saved activation-sized tensor is stored in the activation's memory order (NHWC), so the scale
    gradient's sum reads it coalesced.  A 4-D permuted view of the activation failed this: inductor's layout
    optimisation gave the saved x / s channels_last strides of its *permuted* dims, a transpose (H fastest),
    which the H200 read at about 1/20 of its bandwidth (benchmarks/RESULTS.md, session 10).  Sizes are
    distinct so each dim is known by its size."""
    import re

    from torch._inductor.utils import run_and_get_code

    n, c, h, w = 2, 8, 6, 10
    conv1, conv2 = torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.Conv2d(c, 4, 3, padding=1)
    scale = torch.tensor(0.1, requires_grad=True)
    cl = torch.channels_last

    def f(x):
        a = torch.nn.functional.max_pool2d(torch.relu(conv1(x)), 2)  # as ResNet's stem: x / s gets saved
        if data:
            t = torch.tensor
            a = Q.lsq_fake_quant_one_sum(a, scale, t(0.01), t(0.0), t(15.0))
        else:
            a = Q.lsq_fake_quant(a, scale, 0.01, 0, 15)
        return conv2(a).sum()

    conv1.to(memory_format=cl), conv2.to(memory_format=cl)
    x = torch.randn(n, 3, 2 * h, 2 * w).to(memory_format=cl)
    torch._dynamo.reset()
    compiled = torch.compile(f)
    _, codes = run_and_get_code(lambda: compiled(x).backward())
    torch._dynamo.reset()
    label = {n: "N", c: "C", h: "H", w: "W"}
    # the graph inputs' asserts: tagged 'input' by recent inductors, untagged by older ones (torch 2.11)
    asserts = re.findall(r"assert_size_stride\((\w+), \(([\d, ]+)\), \(([\d, ]+)\)(?:, '([^']*)')?\)", codes[-1])
    saved = [(name, size, stride) for name, size, stride, tag in asserts if tag in ("", "input")]
    orders = {}
    for name, size, stride in saved:
        size, stride = [int(v) for v in size.split(",") if v.strip()], [int(v) for v in stride.split(",") if v.strip()]
        if math.prod(size) == n * c * h * w and len(size) == 4:
            orders[name] = "".join(label[size[d]] for d in sorted(range(4), key=lambda d: -stride[d]))
    assert saved and all(o == "NHWC" for o in orders.values()), orders
    assert scale.grad is not None and torch.isfinite(scale.grad)
