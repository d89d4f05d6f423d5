"""Fused Triton kernels for the Double Rounding + LSQ weight quantizer (issue 15).

:func:`quantize_weight` has the signature and semantics of
:func:`hasb.quantizer.quantize_weight` (Eq. 1-3 of the quantizer's docstring)
and runs it as two CUDA launches per layer and step:

* forward (one launch, grid [C_out, ceil(K / BLOCK)]):
  Ŵ_l = clip(R(clip(round(W / s_h)) / 2^Δ)) · s_h · 2^Δ, bit-identical to the
  composite (correctly rounded division, round-half-even for Eq. 1, the chosen
  ``rounding`` for Eq. 2: half-up, half-even or ``msb`` truncation);
* backward (one launch, one program per output channel):
  ∂L/∂W = ∂L/∂Ŵ · 1[Qn ≤ q ≤ Qp] and the per-channel LSQ scale gradient
  ∂L/∂s_h[c] = g · 2^Δ · Σ_k ∂L/∂Ŵ · (W_l - q if inside else clip(q)),
  with q = W / (s_h 2^Δ) and g = 1/sqrt(K · max(Qp_l, 1)), reduced inside the kernel.

The PyTorch composite stays the reference: it is used off CUDA, for non-float32
weights, inside :func:`hasb.quantizer.composite_ops` (the Hessian engine),
under ``torch.compile`` (inductor fuses the composite), and for double backward
(``create_graph=True``: the backward then re-derives the composite's gradient
with a differentiable graph, so second derivatives are the composite's).
Forward-mode AD (``torch.func.jvp``) is not supported by the fused Function;
run it inside ``composite_ops()`` as the Hessian engine does.

:func:`quantize_weights` runs the same math for all layers of a forward pass
in one launch forward and one backward (one program per output channel of any
layer, the layers' constants read from a table): a quantized model's forward
pre-hook (:func:`hasb.modules.prequantize_weights`) uses it, because an eager
step is bound by the host's ~0.2 ms per autograd Function and launch, not by
these kernels.  Traced by torch.compile (int bits), the same two launches are
two custom ops (:func:`quantize_weights_traced`), where inductor would make
one to three small kernels per layer.

:func:`quantize_activation` does the same for per-tensor LSQ activations (one
launch forward; backward = one launch writing ∂L/∂x and per-block partial sums
of the scale gradient, then one deterministic sum), with the values and
gradients of the composite path of :func:`hasb.quantizer.quantize_activation`
(x / s, not ATen's x · (1/s) of its fused fake-quant kernel), also for
bf16/fp16 inputs, whose dtype rounding it reproduces.  Traced by torch.compile
(int bits), the activation keeps the composite forward, which inductor fuses
into its producer, and its backward is that backward kernel as one custom op
(:func:`lsq_act_backward`); inductor's own backward fused badly with batch
norm's (:class:`_LSQCompiledKernel`).  Activation launches skip Triton's
per-call argument binding and its Python runner after the first (:func:`launch`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from . import quantizer as Q

try:  # optional: Triton ships with the CUDA builds of torch, not the CPU ones
    import triton
    import triton.language as tl
    from triton.compiler import CompiledKernel
    from triton.language.extra import libdevice

    _LAUNCHABLE: tuple[type, ...] = (CompiledKernel,)
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    _LAUNCHABLE = ()

_BLOCK_FWD = 1024
_BLOCK_BWD = 512
_BLOCK_ACT = 2048
# bound once: the fallbacks, even if the module attributes are patched to point here
_reference_weight = Q.quantize_weight
_reference_activation = Q.quantize_activation


# Roundings the weight kernel implements; any other mode (added to the quantizer later) takes the composite.
KERNEL_ROUNDINGS = ("half_up", "half_even", "msb")
# The layers use the kernels wherever they apply (CUDA eager); HASB_KERNELS=0 or :func:`enable` (False) turns
# them off, e.g. to measure them against the composite in one process.
_enabled = os.environ.get("HASB_KERNELS", "1") != "0"


def enable(on: bool = True) -> bool:
    """Switch the fused kernels on or off for every quantized layer; returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(on)
    return prev


def available() -> bool:
    """Whether the fused kernels can run here (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _double_round(
        w, s, qn_h, qp_h, qn, qp, inv_pow, HALF_EVEN: tl.constexpr, TRUNC: tl.constexpr, DELTA0: tl.constexpr
    ):
        """Eq. 1 then Eq. 2 on float32 lanes: the INT-l code W_l as float."""
        w_h = libdevice.rint(tl.div_rn(w, s))  # torch.round: half to even
        w_h = tl.minimum(tl.maximum(w_h, qn_h), qp_h)
        if DELTA0:
            return w_h
        x = w_h * inv_pow  # exact: division by a power of two
        if HALF_EVEN:
            r = libdevice.rint(x)
        elif TRUNC:  # MSB slicing: floor = arithmetic shift right
            r = tl.floor(x)
        else:
            r = tl.floor(x + 0.5)
        return tl.minimum(tl.maximum(r, qn), qp)

    @triton.jit
    def _wq_fwd_block(
        w_ptr,
        w_base,
        out_ptr,
        base,
        offs,
        K,
        s,
        qn_h,
        qp_h,
        qn,
        qp,
        inv_pow,
        pow2,
        HALF_EVEN: tl.constexpr,
        TRUNC: tl.constexpr,
        DELTA0: tl.constexpr,
    ):
        """Ŵ_l of the lanes ``offs`` (< K) of the channel whose K values start at ``w_base`` of ``w_ptr`` and at
        ``base`` of ``out_ptr``."""
        mask = offs < K
        w = tl.load(w_ptr + w_base + offs, mask=mask, other=0.0)
        w_l = _double_round(w, s, qn_h, qp_h, qn, qp, inv_pow, HALF_EVEN, TRUNC, DELTA0)
        # out_ptr float32, or autocast's dtype (a pass under autocast): rounded to nearest even, as autocast's cast
        tl.store(out_ptr + base + offs, (w_l * (s * pow2)).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _wq_bwd_channel(
        w_ptr,
        w_base,
        go_ptr,
        gw_ptr,
        base,
        K,
        s,
        qn_h,
        qp_h,
        qn,
        qp,
        inv_pow,
        pow2,
        HALF_EVEN: tl.constexpr,
        TRUNC: tl.constexpr,
        DELTA0: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Writes one channel's ∂L/∂W and returns Σ_k ∂L/∂Ŵ · (W_l - q if inside else clip(q)) (before g · 2^Δ);
        its K weights start at ``w_base`` of ``w_ptr``, its gradients at ``base`` of ``go_ptr`` and ``gw_ptr``."""
        s_eff = s * pow2
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            w = tl.load(w_ptr + w_base + offs, mask=mask, other=0.0)
            go = tl.load(go_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            w_l = _double_round(w, s, qn_h, qp_h, qn, qp, inv_pow, HALF_EVEN, TRUNC, DELTA0)
            q = tl.div_rn(w, s_eff)
            inside = (q >= qn) & (q <= qp)
            tl.store(gw_ptr + base + offs, tl.where(inside, go, 0.0), mask=mask)
            inner = tl.where(inside, w_l - q, tl.minimum(tl.maximum(q, qn), qp))
            acc += go * inner  # masked lanes carry go = 0
        return tl.sum(acc, axis=0)

    @triton.jit
    def _wq_fwd_kernel(
        w_ptr,
        s_ptr,
        out_ptr,
        K,
        qn_h,
        qp_h,
        qn,
        qp,
        inv_pow,
        pow2,
        HALF_EVEN: tl.constexpr,
        TRUNC: tl.constexpr,
        DELTA0: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        s = tl.load(s_ptr + c)
        base = c.to(tl.int64) * K
        _wq_fwd_block(
            w_ptr, base, out_ptr, base, offs, K, s, qn_h, qp_h, qn, qp, inv_pow, pow2, HALF_EVEN, TRUNC, DELTA0
        )

    @triton.jit
    def _wq_bwd_kernel(
        w_ptr,
        s_ptr,
        go_ptr,
        gw_ptr,
        gs_ptr,
        K,
        qn_h,
        qp_h,
        qn,
        qp,
        inv_pow,
        pow2,
        gfac,
        HALF_EVEN: tl.constexpr,
        TRUNC: tl.constexpr,
        DELTA0: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        s = tl.load(s_ptr + c)
        base = c.to(tl.int64) * K
        total = _wq_bwd_channel(
            w_ptr,
            base,
            go_ptr,
            gw_ptr,
            base,
            K,
            s,
            qn_h,
            qp_h,
            qn,
            qp,
            inv_pow,
            pow2,
            HALF_EVEN,
            TRUNC,
            DELTA0,
            BLOCK,
        )
        tl.store(gs_ptr + c, total * gfac)

    # Many layers in one launch (a model's forward pass): one program per output channel of any layer.  Channel
    # c's K[c] values start at off[c] of the flat (memory-order) output buffers; its layer's constants are row
    # layer[c] of par [L, 8] = (Qn_h, Qp_h, Qn_l, Qp_l, 2^-Δ, 2^Δ, g·2^Δ, 0).  Δ = 0 takes the general path: an
    # integer code rounds to itself, so the values are the per-layer kernels' bit for bit.  The weights and steps
    # are read from flat buffers too (TABLE False: a compiled graph's concatenations), or in place (TABLE True: the
    # eager pass): w_ptr and s_ptr are then [L] int64 tables of each layer's weight and step addresses, and
    # channel c is channel lch[c] of its layer.
    @triton.jit
    def _layer_consts(par_ptr, layer_ptr, c):
        p = par_ptr + tl.load(layer_ptr + c).to(tl.int64) * 8
        return (
            tl.load(p),
            tl.load(p + 1),
            tl.load(p + 2),
            tl.load(p + 3),
            tl.load(p + 4),
            tl.load(p + 5),
            tl.load(p + 6),
        )

    @triton.jit
    def _channel_source(w_ptr, s_ptr, layer_ptr, lch_ptr, c, base, K, TABLE: tl.constexpr):
        """(pointer, offset) of channel c's K weights and its step s_h: in the flat buffers, or in place."""
        if TABLE:
            layer = tl.load(layer_ptr + c).to(tl.int64)
            j = tl.load(lch_ptr + c).to(tl.int64)
            w_src = tl.load(w_ptr + layer).to(tl.pointer_type(tl.float32))
            s = tl.load(tl.load(s_ptr + layer).to(tl.pointer_type(tl.float32)) + j)
            return w_src, j * K, s
        else:
            return w_ptr, base, tl.load(s_ptr + c)

    @triton.jit
    def _wq_fwd_many_kernel(
        w_ptr,
        s_ptr,
        out_ptr,
        off_ptr,
        k_ptr,
        layer_ptr,
        lch_ptr,
        par_ptr,
        HALF_EVEN: tl.constexpr,
        TRUNC: tl.constexpr,
        TABLE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        base, K = tl.load(off_ptr + c), tl.load(k_ptr + c)
        w_src, w_base, s = _channel_source(w_ptr, s_ptr, layer_ptr, lch_ptr, c, base, K, TABLE)
        qn_h, qp_h, qn, qp, inv_pow, pow2, _ = _layer_consts(par_ptr, layer_ptr, c)
        for k0 in range(0, K, BLOCK):
            _wq_fwd_block(
                w_src,
                w_base,
                out_ptr,
                base,
                k0 + tl.arange(0, BLOCK),
                K,
                s,
                qn_h,
                qp_h,
                qn,
                qp,
                inv_pow,
                pow2,
                HALF_EVEN,
                TRUNC,
                False,
            )

    @triton.jit
    def _wq_bwd_many_kernel(
        w_ptr,
        s_ptr,
        go_ptr,
        gw_ptr,
        gs_ptr,
        off_ptr,
        k_ptr,
        layer_ptr,
        lch_ptr,
        par_ptr,
        HALF_EVEN: tl.constexpr,
        TRUNC: tl.constexpr,
        TABLE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        c = tl.program_id(0)
        base, K = tl.load(off_ptr + c), tl.load(k_ptr + c)
        w_src, w_base, s = _channel_source(w_ptr, s_ptr, layer_ptr, lch_ptr, c, base, K, TABLE)
        qn_h, qp_h, qn, qp, inv_pow, pow2, gfac = _layer_consts(par_ptr, layer_ptr, c)
        total = _wq_bwd_channel(
            w_src, w_base, go_ptr, gw_ptr, base, K, s, qn_h, qp_h, qn, qp, inv_pow, pow2, HALF_EVEN, TRUNC, False, BLOCK
        )
        tl.store(gs_ptr + c, total * gfac)

    @triton.jit
    def _aq_fwd_kernel(x_ptr, s_ptr, out_ptr, N, qn, qp, LOWP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr)
        if LOWP:  # the composite's type promotion: the 0-dim float32 step and x / s are rounded to x's dtype
            s = s.to(out_ptr.dtype.element_ty).to(tl.float32)
            q = tl.div_rn(x, s).to(out_ptr.dtype.element_ty).to(tl.float32)
        else:
            q = tl.div_rn(x, s)
        r = libdevice.rint(tl.minimum(tl.maximum(q, qn), qp))
        tl.store(out_ptr + offs, (r * s).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _aq_bwd_kernel(x_ptr, s_ptr, go_ptr, gx_ptr, part_ptr, N, qn, qp, g, LOWP: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr)
        if LOWP:
            s = s.to(gx_ptr.dtype.element_ty).to(tl.float32)
            q = tl.div_rn(x, s).to(gx_ptr.dtype.element_ty).to(tl.float32)
        else:
            q = tl.div_rn(x, s)
        inside = (q >= qn) & (q <= qp)
        tl.store(gx_ptr + offs, tl.where(inside, go, 0.0).to(gx_ptr.dtype.element_ty), mask=mask)
        qc = tl.minimum(tl.maximum(q, qn), qp)
        inner = tl.where(inside, libdevice.rint(qc) - qc, qc)  # masked lanes: go = 0
        tl.store(part_ptr + pid, tl.sum(go * inner, axis=0) * g)


def _consts(bit: int, high_bit: int) -> tuple[float, ...]:
    """Runtime scalars of the weight kernels: (Qn_h, Qp_h, Qn_l, Qp_l, 2^-Δ, 2^Δ)."""
    qn_h, qp_h = Q.int_range(high_bit)
    qn, qp = Q.int_range(bit)
    delta = high_bit - bit
    return float(qn_h), float(qp_h), float(qn), float(qp), 2.0**-delta, 2.0**delta


def _scale_grad_factor(g: float, bit: int, high_bit: int) -> float:
    """g · 2^Δ: the factor of a weight's per-channel scale gradient (Ŵ_l carries s_h · 2^Δ, Δ = high_bit - bit)."""
    return g * 2.0 ** (high_bit - bit)


def _rounding_flags(rounding: str) -> dict[str, bool]:
    """The weight kernels' compile-time rounding switches for Eq. 2 (half-up is neither)."""
    return {"HALF_EVEN": rounding == "half_even", "TRUNC": rounding == "msb"}


def _weight_g(k: int, bit: int) -> float:
    """LSQ's g of a weight at ``bit`` with K = ``k`` values per output channel (one step per channel)."""
    return Q.lsq_g(k, Q.int_range(bit)[1])


def _dense(t: torch.Tensor) -> bool:
    """Row-major or channels-last storage: each output channel's K values are one contiguous block."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` (shaped like ``ref``, which is dense) in ``ref``'s memory order: the kernels index both through one
    flat offset.  Strides need only agree on the dimensions longer than 1: a 1×1 or depthwise convolution's
    weight gradient comes with other strides in its size-1 dimensions than the channels_last weight, in the same
    memory order (copied before session 26: 51 device copies per eager MobileNetV2 step)."""
    same = zip(t.stride(), ref.stride(), ref.shape, strict=True)
    if t.stride() == ref.stride() or all(a == b for a, b, n in same if n > 1):
        return t
    return torch.empty_like(ref, dtype=t.dtype).copy_(t)


def _launch_forward(w: torch.Tensor, scale: torch.Tensor, bit: int, high_bit: int, rounding: str) -> torch.Tensor:
    """Ŵ_l of a dense float32 weight [C, ...] (same strides out); ``scale`` [C] float32."""
    out = torch.empty_like(w)
    c, k = w.shape[0], w[0].numel()
    grid = (c, triton.cdiv(k, _BLOCK_FWD))
    _wq_fwd_kernel[grid](
        w,
        scale,
        out,
        k,
        *_consts(bit, high_bit),
        **_rounding_flags(rounding),
        DELTA0=bit == high_bit,
        BLOCK=_BLOCK_FWD,
    )
    return out


def _launch_backward(w, scale, grad, bit, high_bit, rounding, g):
    """(∂L/∂W like ``w``, ∂L/∂s_h [C]) from the saved weight/scale and ∂L/∂Ŵ (same strides as ``w``)."""
    grad_w = torch.empty_like(w)
    grad_s = torch.empty_like(scale)
    c, k = w.shape[0], w[0].numel()
    gfac = _scale_grad_factor(g, bit, high_bit)
    _wq_bwd_kernel[(c,)](
        w,
        scale,
        grad,
        grad_w,
        grad_s,
        k,
        *_consts(bit, high_bit),
        gfac,
        **_rounding_flags(rounding),
        DELTA0=bit == high_bit,
        BLOCK=_BLOCK_BWD,
    )
    return grad_w, grad_s


class FusedDoubleRoundLSQ(torch.autograd.Function):
    """Ŵ_l with LSQ gradients through the Triton kernels; see the module docstring.

    Inputs: w [C_out, ...] dense float32 CUDA, scale [C_out] float32 CUDA, then the
    python scalars bit, high_bit, rounding, g.
    """

    @staticmethod
    def forward(ctx, w, scale, bit, high_bit, rounding, g):
        ctx.save_for_backward(w, scale)
        ctx.meta = (bit, high_bit, rounding, g)
        return _launch_forward(w, scale, bit, high_bit, rounding)

    @staticmethod
    def backward(ctx, grad_out):
        w, scale = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite instead
            bit, high_bit, rounding, _ = ctx.meta
            return _composite_grads(ctx, (w, scale), grad_out, Q.quantize_weight, bit, high_bit, rounding)
        grad_w, grad_s = _launch_backward(w.detach(), scale.detach(), _like(grad_out, w), *ctx.meta)
        return grad_w, grad_s, None, None, None, None


def _composite_grads(ctx, inputs, grad_out, fn, *args):
    """The composite path's gradients w.r.t. ``inputs`` as a differentiable graph (for double backward)."""
    with Q.composite_ops():
        out = fn(*inputs, *args)
    grads = _composite_grads_of(inputs, ctx.needs_input_grad[: len(inputs)], [out], [grad_out])
    return grads + (None,) * (len(ctx.needs_input_grad) - len(inputs))


def _composite_grads_of(inputs, needs, outs, grad_outs) -> tuple:
    """∂(outs · grad_outs)/∂inputs with ``create_graph``; None where ``needs`` is False."""
    want = [t for t, need in zip(inputs, needs, strict=True) if need]
    grads = iter(torch.autograd.grad(outs, want, grad_outs, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs)


def fused_applies(w: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`quantize_weight` takes the kernel path for these tensors in the current context."""
    return batch_applies() and weights_fit(w, scale)


def batch_applies() -> bool:
    """Whether the kernels may run in the current context (on, Triton present, eager, not inside
    :func:`hasb.quantizer.composite_ops`); :func:`weights_fit` then decides per tensor."""
    return _enabled and triton is not None and Q._use_fused()


def weights_fit(w: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether a weight and its per-channel step are tensors the weight kernels take (dense float32 CUDA)."""
    return (
        w.is_cuda
        and w.dtype == torch.float32
        and scale.dtype == torch.float32
        and w.dim() >= 1
        and w.numel() > 0
        and scale.numel() == w.shape[0]
        and scale.is_contiguous()
        and scale.device == w.device
        and _dense(w)
    )


def quantize_weight(
    w: torch.Tensor, scale: torch.Tensor, bit: int, high_bit: int, rounding: Q.Rounding = "half_up"
) -> torch.Tensor:
    """Drop-in for :func:`hasb.quantizer.quantize_weight` (same args, shapes, values and gradients).

    Args:
        w: float weight [C_out, ...]; scale: per-channel step s_h [C_out], positive.
        bit: target bit l ≤ high_bit; rounding: ``half_up``, ``half_even`` or ``msb`` (Eq. 2).
    Returns:
        Ŵ_l, same shape as ``w``, through the fused kernels when :func:`fused_applies`,
        else through the composite reference.
    """
    if rounding not in Q.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; accepted: {', '.join(Q.ROUNDINGS)}")
    if bit > high_bit:
        raise ValueError(f"bit {bit} exceeds the highest candidate bit {high_bit}")
    if rounding not in KERNEL_ROUNDINGS or not fused_applies(w, scale):
        return _reference_weight(w, scale, bit, high_bit, rounding)
    return FusedDoubleRoundLSQ.apply(w, scale, bit, high_bit, rounding, _weight_g(w.numel() // w.shape[0], bit))


# -- many layers per launch: a model's weights in one forward and one backward launch per pass -----------------
_TABLES: dict[tuple, tuple[torch.Tensor, ...]] = {}
_PARAMS: dict[tuple, torch.Tensor] = {}
_ADDRESSES: dict[tuple, torch.Tensor] = {}
_ROWS: dict[tuple[int, int, int], list[float]] = {}


def _remember(cache: dict, key, value):
    """``cache[key] = value``, emptied first past 64 entries (a long-lived process that builds many models, or a
    supernet that samples a new configuration every pass)."""
    if len(cache) >= 64:
        cache.clear()
    cache[key] = value
    return value


def _shapes(ws: list[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """(C_i, numel_i) per weight: what the channel tables and the layer constants depend on."""
    return tuple((w.shape[0], w.numel()) for w in ws)


def _channel_tables(shapes: tuple[tuple[int, int], ...], dev: torch.device) -> tuple[torch.Tensor, ...]:
    """(start offset int64, K int32, layer index int32, channel index in its layer int32), each [ΣC], of every
    output channel in the flat buffer of the weights of ``shapes`` (:func:`_shapes`), concatenated; cached (they
    never change)."""
    if (tables := _TABLES.get((dev, shapes))) is not None:
        return tables
    return _remember(_TABLES, (dev, shapes), tuple(t.to(dev) for t in _host_channel_tables(shapes)))


def _host_channel_tables(shapes: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, ...]:
    """:func:`_channel_tables` in host memory."""
    off: list[int] = []
    ks: list[int] = []
    layer: list[int] = []
    lch: list[int] = []
    start = 0
    for i, (c, n) in enumerate(shapes):
        k = n // c
        off += range(start, start + n, k)
        ks += [k] * c
        layer += [i] * c
        lch += range(c)
        start += n
    i64, i32 = torch.int64, torch.int32
    return (
        torch.tensor(off, dtype=i64),
        torch.tensor(ks, dtype=i32),
        torch.tensor(layer, dtype=i32),
        torch.tensor(lch, dtype=i32),
    )


@functools.lru_cache(maxsize=64)
def _starts(shapes: tuple[tuple[int, int], ...]) -> tuple[tuple[int, ...], int, int]:
    """(each layer's start in the flat buffer, its length ΣN, the channels ΣC) of the weights of ``shapes``."""
    starts, total = [], 0
    for _, n in shapes:
        starts.append(total)
        total += n
    return tuple(starts), total, sum(c for c, _ in shapes)


def _stream(dev: torch.device) -> int:
    """The handle of ``dev``'s current stream (0 off CUDA): a key of the caches of device tables."""
    return torch._C._cuda_getCurrentRawStream(dev.index) if dev.type == "cuda" else 0


def _addresses(ts: Sequence[torch.Tensor], dev: torch.device, stream: int) -> torch.Tensor:
    """[L] int64 on ``dev``: each tensor's address, what a TABLE launch of the pass kernels reads them through
    (instead of a concatenated copy: on the H200's host the copy of 52 weights cost 0.27 ms a call, session 26).
    Cached per (stream, addresses): a model's parameters keep theirs from step to step, so the copy to the device
    (from pinned memory, without blocking the host, on ``stream``: the cache is per stream, as _layer_params')
    runs once.  The key is the tensors' live addresses, so a table is never read for tensors moved since."""
    key = (dev, stream, tuple([t.data_ptr() for t in ts]))
    if (table := _ADDRESSES.get(key)) is None:
        host = torch.tensor(key[2], dtype=torch.int64, pin_memory=dev.type == "cuda")
        table = _remember(_ADDRESSES, key, host.to(dev, non_blocking=True))
    return table


def _layer_row(k: int, bit: int, high_bit: int) -> list[float]:
    """(Qn_h, Qp_h, Qn_l, Qp_l, 2^-Δ, 2^Δ, g·2^Δ, 0) of a layer of K values per channel: the per-layer launches'
    numbers."""
    key = (k, bit, high_bit)
    if (row := _ROWS.get(key)) is None:
        g = _weight_g(k, bit)
        row = _remember(_ROWS, key, [*_consts(bit, high_bit), _scale_grad_factor(g, bit, high_bit), 0.0])
    return row


def _layer_params(
    shapes, bits: Sequence[int], high_bits: Sequence[int], dev: torch.device, stream: int | None = None
) -> torch.Tensor:
    """[L, 8] float32 on ``dev``: :func:`_layer_row` per layer, cached per configuration (read-only on the device);
    a new one is copied from pinned memory without blocking the host, on the current stream (``stream``: its
    handle, if the caller has it), so the cache is also per stream (a pass on another stream must not read it
    before that copy is done)."""
    if stream is None:
        stream = _stream(dev)
    key = (dev, stream, shapes, tuple(bits), tuple(high_bits))
    if (par := _PARAMS.get(key)) is None:
        host = _host_layer_params(shapes, bits, high_bits, pin=dev.type == "cuda")
        par = _remember(_PARAMS, key, host.to(dev, non_blocking=True))
    return par


def _host_layer_params(shapes, bits: Sequence[int], high_bits: Sequence[int], pin: bool = False) -> torch.Tensor:
    """:func:`_layer_params` in host memory (pinned if ``pin``)."""
    rows: list[float] = []
    for (c, n), bit, high in zip(shapes, bits, high_bits, strict=True):
        rows += _layer_row(n // c, bit, high)
    return torch.tensor(rows, dtype=torch.float32, pin_memory=pin).view(-1, 8)


def _flat(ts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' storage spans, concatenated: each is dense (:func:`_dense`: its values fill one span, output
    channel first), so its span read as 1-D is its memory order, one view instead of a permutation."""
    return torch.cat([t.as_strided((t.numel(),), (1,)) for t in ts])


def _unflat(flat: torch.Tensor, likes: Sequence[torch.Tensor], starts: Sequence[int]) -> list[torch.Tensor]:
    """Views of ``flat`` in the shapes and strides of ``likes``, the i-th at ``starts[i]`` (the inverse of
    :func:`_flat`; one view each, no split)."""
    return [flat.as_strided(t.shape, t.stride(), o) for t, o in zip(likes, starts, strict=True)]


class FusedDoubleRoundLSQMany(torch.autograd.Function):
    """Ŵ of L layers through one forward and one backward launch; per layer the values and gradients of
    :class:`FusedDoubleRoundLSQ`: Ŵ and ∂W bit for bit; ∂s_h the same sum, whose order within a channel follows the
    register layout the compiler picks for each kernel (equal bit for bit under Triton's interpreter; within the
    per-layer kernel's round-off bound on the H200).  The kernels read the weights and steps in place, through
    tables of their addresses (:func:`_addresses`).

    Inputs: ``meta`` = (bits, high_bits, rounding, out_dtype), then w_1..w_L (dense float32 CUDA) and s_1..s_L
    ([C_i]).  Ŵ comes out in ``out_dtype`` (None: float32), and its gradients are read in that dtype.
    """

    @staticmethod
    def forward(ctx, meta, *tensors):
        bits, high_bits, rounding, out_dtype = meta
        n = len(tensors) // 2
        ws, scales = tensors[:n], tensors[n:]
        shapes, dev = _shapes(ws), ws[0].device
        stream = _stream(dev)
        tables = _channel_tables(shapes, dev)
        par = _layer_params(shapes, bits, high_bits, dev, stream)
        starts, total, channels = layout = _starts(shapes)
        # every input is saved: the backward reads them in place, and unpacking checks they were not changed since
        ctx.save_for_backward(*tensors, par)
        ctx.meta = meta, tables, layout
        out = torch.empty(total, device=dev, dtype=out_dtype or torch.float32)
        w_tab, s_tab = _addresses(ws, dev, stream), _addresses(scales, dev, stream)
        flags = _rounding_flags(rounding)
        _wq_fwd_many_kernel[(channels,)](w_tab, s_tab, out, *tables, par, **flags, TABLE=True, BLOCK=_BLOCK_FWD)
        return tuple(_unflat(out, ws, starts))

    @staticmethod
    def backward(ctx, *grads):
        *tensors, par = ctx.saved_tensors
        n = len(tensors) // 2
        ws, scales = tensors[:n], tensors[n:]
        (bits, high_bits, rounding, out_dtype), tables, (starts, total, channels) = ctx.meta
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite instead
            with Q.composite_ops():
                outs = [
                    Q.quantize_weight(w, s, b, h, rounding).to(out_dtype or w.dtype)
                    for w, s, b, h in zip(ws, scales, bits, high_bits, strict=True)
                ]
            return (None, *_composite_grads_of(tensors, ctx.needs_input_grad[1:], outs, grads))
        dev = ws[0].device
        stream = _stream(dev)  # the backward's own: the address tables' cache is per stream
        flat_g = _flat([_like(g, w) for g, w in zip(grads, ws, strict=True)])
        grad_w = torch.empty(total, device=dev)
        grad_s = torch.empty(channels, device=dev)
        w_tab, s_tab = _addresses(ws, dev, stream), _addresses(scales, dev, stream)
        flags = _rounding_flags(rounding)
        _wq_bwd_many_kernel[(channels,)](
            w_tab, s_tab, flat_g, grad_w, grad_s, *tables, par, **flags, TABLE=True, BLOCK=_BLOCK_BWD
        )
        return (None, *_unflat(grad_w, ws, starts), *grad_s.split([w.shape[0] for w in ws]))


def quantize_weights(
    ws: list[torch.Tensor],
    scales: list[torch.Tensor],
    bits: list[int],
    high_bits: list[int],
    rounding: Q.Rounding,
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Ŵ of many layers at once: :func:`quantize_weight` per layer (see :class:`FusedDoubleRoundLSQMany`), as
    one launch for the forward and one for the backward.  Every pair must satisfy :func:`fused_applies`.

    Args:
        ws: L weights [C_i, ...]; scales: their steps s_h [C_i]; bits, high_bits: l_i ≤ h_i per layer.
        rounding: one of :data:`KERNEL_ROUNDINGS`, shared by the L layers.
        out_dtype: Ŵ's dtype (None: float32).  Under autocast, autocast's: the layers' convolutions then skip
            their weight casts (a launch and an autograd node each way per layer), with the same values.
    """
    if not ws:
        return []
    _check_pass(bits, high_bits, rounding)
    meta = (tuple(bits), tuple(high_bits), rounding, out_dtype)
    return list(FusedDoubleRoundLSQMany.apply(meta, *ws, *scales))


def _check_pass(bits: Sequence[int], high_bits: Sequence[int], rounding: str) -> None:
    """A pass's arguments as the pass kernels take them (the per-layer launch checks the same)."""
    if rounding not in KERNEL_ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; accepted: {', '.join(KERNEL_ROUNDINGS)}")
    if any(b > h for b, h in zip(bits, high_bits, strict=True)):
        raise ValueError(f"a bit exceeds its layer's highest candidate bit: bits {bits}, highest {high_bits}")


# -- the same in a compiled graph: one custom op each way for all layers of a pass ------------------------------
# A captured CUDA graph reads these tables at every replay, so, unlike the eager caches, none is ever dropped: one
# entry per (layer shapes, bits) that a compiled graph quantizes (each bit configuration is a graph of its own).
_GRAPH_TABLES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _pairs(shapes: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """[C_1, N_1, C_2, N_2, ...] (an op's int list) → ((C_1, N_1), ...), as :func:`_shapes` gives them."""
    return tuple(zip(shapes[::2], shapes[1::2], strict=True))


def _graph_tables(shapes, bits: Sequence[int], high_bits: Sequence[int], dev: torch.device) -> tuple:
    """(offset, K, layer, channel in layer, par) as :func:`_channel_tables` and :func:`_layer_params` make them,
    kept for good.

    Inductor's CUDA graphs run every graph once before capturing it, so the entry exists before a capture reads
    it.  During that first run the calling thread allocates from the graphs' private memory pool, which must hold
    only the graphs' tracked outputs: the tables are copied to the device by a thread of their own."""
    key = (dev, shapes, tuple(bits), tuple(high_bits))
    if (tables := _GRAPH_TABLES.get(key)) is not None:
        return tables
    host = (*_host_channel_tables(shapes), _host_layer_params(shapes, bits, high_bits))
    if dev.type != "cuda":
        tables = host
    elif torch.cuda.is_current_stream_capturing():
        raise RuntimeError("hasb::quantize_weights_forward: first run inside a CUDA graph capture; run it once first")
    else:  # from pageable memory: each copy is done when .to returns
        with ThreadPoolExecutor(max_workers=1) as pool:
            tables = pool.submit(lambda: tuple(t.to(dev) for t in host)).result()
    _GRAPH_TABLES[key] = tables
    return tables


def _spans(flat: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Each layer's [C, K] block of a flat memory-order buffer (output channel first)."""
    return [t.view(c, n // c) for t, (c, n) in zip(flat.split([n for _, n in shapes]), shapes, strict=True)]


@torch.library.custom_op("hasb::quantize_weights_forward", mutates_args=())
def quantize_weights_forward(
    flat_w: torch.Tensor,
    flat_s: torch.Tensor,
    shapes: list[int],
    bits: list[int],
    high_bits: list[int],
    rounding: str,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Ŵ of L layers from their weights' memory-order spans concatenated (``flat_w``, float32) and their steps
    (``flat_s`` [ΣC]); ``shapes`` = [C_1, N_1, ...].  Out: the flat Ŵ in ``out_dtype``.  CUDA: one launch of the
    many-layer kernel; elsewhere each layer's composite (the CPU tests of the traced path)."""
    pairs = _pairs(shapes)
    out = torch.empty_like(flat_w, dtype=out_dtype)
    if flat_w.is_cuda and triton is not None:
        *tables, par = _graph_tables(pairs, bits, high_bits, flat_w.device)
        flags = _rounding_flags(rounding)
        _wq_fwd_many_kernel[(flat_s.numel(),)](
            flat_w, flat_s, out, *tables, par, **flags, TABLE=False, BLOCK=_BLOCK_FWD
        )
        return out
    scales = flat_s.split([c for c, _ in pairs])
    for w, s, o, bit, high in zip(_spans(flat_w, pairs), scales, _spans(out, pairs), bits, high_bits, strict=True):
        o.copy_(_reference_weight(w, s, bit, high, rounding))  # type: ignore[arg-type]
    return out


@quantize_weights_forward.register_fake
def _quantize_weights_forward_fake(flat_w, flat_s, shapes, bits, high_bits, rounding, out_dtype):
    return torch.empty_like(flat_w, dtype=out_dtype)


@torch.library.custom_op("hasb::quantize_weights_backward", mutates_args=())
def quantize_weights_backward(
    flat_w: torch.Tensor,
    flat_s: torch.Tensor,
    grad: torch.Tensor,
    shapes: list[int],
    bits: list[int],
    high_bits: list[int],
    rounding: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂flat_w, ∂L/∂flat_s) of :func:`quantize_weights_forward`, given ∂L/∂Ŵ (``grad``, flat, Ŵ's dtype)."""
    pairs = _pairs(shapes)
    grad_w, grad_s = torch.empty_like(flat_w), torch.empty_like(flat_s)
    if flat_w.is_cuda and triton is not None:
        *tables, par = _graph_tables(pairs, bits, high_bits, flat_w.device)
        flags = _rounding_flags(rounding)
        _wq_bwd_many_kernel[(flat_s.numel(),)](
            flat_w, flat_s, grad.contiguous(), grad_w, grad_s, *tables, par, **flags, TABLE=False, BLOCK=_BLOCK_BWD
        )
        return grad_w, grad_s
    channels = [c for c, _ in pairs]
    layers = zip(
        _spans(flat_w, pairs),
        flat_s.split(channels),
        _spans(grad, pairs),
        _spans(grad_w, pairs),
        grad_s.split(channels),
        bits,
        high_bits,
        strict=True,
    )
    for w, s, go, gw, gs, bit, high in layers:  # each layer's composite gradients, written into its spans
        w_l = Q.derive_int(Q.stored_int(w, s, high), bit, high, rounding)  # type: ignore[arg-type]
        gw_l, gs_l = Q.double_round_grads(w, s, w_l, go.float(), bit, high - bit, _weight_g(w.shape[1], bit))
        gw.copy_(gw_l)
        gs.copy_(gs_l)
    return grad_w, grad_s


@quantize_weights_backward.register_fake
def _quantize_weights_backward_fake(flat_w, flat_s, grad, shapes, bits, high_bits, rounding):
    return torch.empty_like(flat_w), torch.empty_like(flat_s)


def _quantize_weights_setup(ctx, inputs, output) -> None:
    flat_w, flat_s, shapes, bits, high_bits, rounding, _ = inputs
    ctx.save_for_backward(flat_w, flat_s)
    ctx.meta = (shapes, bits, high_bits, rounding)


def _quantize_weights_grad(ctx, grad):
    flat_w, flat_s = ctx.saved_tensors
    grad_w, grad_s = quantize_weights_backward(flat_w, flat_s, grad, *ctx.meta)
    return grad_w, grad_s, None, None, None, None, None


quantize_weights_forward.register_autograd(_quantize_weights_grad, setup_context=_quantize_weights_setup)


def traced_batch_applies() -> bool:
    """Whether a compiled graph quantizes the pass's weights through :func:`quantize_weights_traced` (kernels on,
    Triton present, traced by torch.compile, not inside :func:`hasb.quantizer.composite_ops`);
    :func:`weights_fit` then decides per tensor."""
    return _enabled and triton is not None and torch.compiler.is_compiling() and not Q.composite_requested()


def quantize_weights_traced(
    ws: list[torch.Tensor],
    scales: list[torch.Tensor],
    bits: Sequence[int],
    high_bits: Sequence[int],
    rounding: Q.Rounding,
    out_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """:func:`quantize_weights` as torch.compile traces it: the weights' memory-order views concatenated, one
    :func:`quantize_weights_forward` op (its backward one :func:`quantize_weights_backward`), each layer's Ŵ a view
    of the result.  Why: inductor makes each layer's composite a forward kernel and one or two backward kernels,
    small ones whose fixed cost adds up over a model's layers; here a pass has one launch each way.  On the H200
    with CUDA graphs, the module compiled (benchmarks/RESULTS.md, session 19): ResNet-18@224 W4A4 1.094x the float
    step against 1.106x per layer; the byte LM 1.319x against 1.317x, its 4-pass step 4.792x against 4.893x."""
    if not ws:
        return []
    _check_pass(bits, high_bits, rounding)
    views = [Q.memory_order(w) for w in ws]
    shapes = [d for w in ws for d in (w.shape[0], w.numel())]
    out = quantize_weights_forward(
        torch.cat([v for v, _ in views]),
        torch.cat(scales),
        shapes,
        list(bits),
        list(high_bits),
        rounding,
        out_dtype or torch.float32,
    )
    chunks = out.split([w.numel() for w in ws])
    return [restore(chunk) for (_, restore), chunk in zip(views, chunks, strict=True)]


# -- launches without Triton's per-call argument binding ------------------------------------------------------
def launch_key(args: Sequence) -> tuple:
    """What a compiled Triton kernel is specialized on, as a key at least as fine as Triton's own: each tensor's
    dtype and address mod 16, each int's (and bool's: constexprs) value, each float's type (Triton does not
    specialize floats on their value)."""
    return tuple(  # a list, not a generator: 1.4 vs 1.7 µs a key, twice per eager activation
        [
            (a.dtype, a.data_ptr() % 16) if isinstance(a, torch.Tensor) else a if isinstance(a, int) else type(a)
            for a in args
        ]
    )


def act_launch_key(x: torch.Tensor, n: int, *others: torch.Tensor) -> tuple:
    """A key at least as fine as :func:`launch_key` of an activation kernel's arguments, from what varies between
    its launches: ``x``'s dtype (which also sets the LOWP constexpr), ``n`` and every tensor's address mod 16.
    The other tensors' dtypes are x's or float32 (the callers add any that could differ); Qn, Qp and g are
    floats; BLOCK is fixed.  Why not the general key: it looks at each of the 8 or 11 arguments in turn, 2.0 µs
    against 0.7 on the CPU, twice per eager activation."""
    return (x.dtype, n, x.data_ptr() % 16, *[t.data_ptr() % 16 for t in others])


def _hooked(hook) -> bool:
    """Whether a Triton launch hook is set: a function, or a non-empty ``HookChain`` (Triton 3.6 keeps an empty
    chain where older versions keep None, and its runner then builds the launch metadata for every launch)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _direct_launcher(compiled, hooks, stream_of: Callable[[int], int]) -> Callable[[int, int, tuple], None]:
    """``go(blocks, device, args)``: ``compiled[(blocks, 1, 1)](*args)`` as one call of its C launch function.

    Triton's runner (``CompiledKernel.__getitem__``) makes a closure, looks up the device, stream, launch
    metadata and hooks, and goes through ``CudaLauncher.__call__``'s scratch checks in Python on every launch;
    ``go`` looks them up once, here, and asks ``stream_of`` (``device``) for the current stream per call (torch's
    stream, as the runner does).  A kernel that needs scratch memory, a launcher without the attributes read here
    (another Triton) and any launch while ``hooks`` (``triton.knobs.runtime``) has a launch hook set (a profiler)
    take the runner instead."""
    run = compiled.run
    try:
        fn, function, meta = run.launch, compiled.function, compiled.packed_metadata
        coop, pdl = run.launch_cooperative_grid, run.launch_pdl
        plain = run.global_scratch_size == 0 and run.profile_scratch_size == 0
    except AttributeError:
        plain = False

    def runner(blocks: int, device: int, args: tuple) -> None:
        compiled[(blocks, 1, 1)](*args)

    if not plain:
        return runner

    def go(blocks: int, device: int, args: tuple) -> None:
        if _hooked(hooks.launch_enter_hook) or _hooked(hooks.launch_exit_hook):
            return runner(blocks, device, args)
        # the C launch's arguments: grid, stream, function, cooperative, PDL, the two scratch buffers (none),
        # the packed metadata, the launch metadata (only hooks read it) and the two hooks, then the kernel's
        fn(blocks, 1, 1, stream_of(device), function, coop, pdl, None, None, meta, None, None, None, *args)

    return go


def launch(kernel, blocks: int, *args, key: tuple | None = None) -> None:
    """``kernel[(blocks,)](*args)`` (every argument positional, constexprs too, in the kernel's order).

    Triton binds and specializes the arguments of each JIT launch in Python, about 10 µs of host time per launch;
    an eager step pays it twice per quantized activation (session 14 on the H200: 101 → 81 µs per activation
    quantizer, forward and backward).  The first launch of each key (``key``, at least as fine as
    :func:`launch_key` (args), which is the default, and the current device) goes through the JIT, which compiles
    where needed, and its compiled kernel is kept; later launches with that key call the compiled kernel's C
    launch function (:func:`_direct_launcher`; session 25 on the H200: 18-20 → 11 µs a launch, and the eager
    MobileNetV2 W4A4 step 0.931x [0.902, 0.962] of the one through Triton's runner).
    """
    cache = getattr(kernel, "_hasb_compiled", None)  # {key: launcher, or None: a JIT launch every time}
    if cache is None:  # kept on the kernel object: a kernel patched in (tests, benchmarks) has its own
        cache = kernel._hasb_compiled = {}
    device = torch.cuda.current_device()
    key = (device, launch_key(args) if key is None else key)
    go = cache.get(key, False)
    if go is False:
        if len(cache) >= 4096:  # e.g. a new batch size every step: keep the cache bounded
            cache.clear()
        done = kernel[(blocks,)](*args)
        if isinstance(done, _LAUNCHABLE):
            cache[key] = _direct_launcher(done, triton.knobs.runtime, torch._C._cuda_getCurrentRawStream)
        else:
            cache[key] = None
    elif go is None:
        kernel[(blocks,)](*args)
    else:
        go(blocks, device, args)


# -- activations: per-tensor LSQ ------------------------------------------------------------------------------
_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launch_act_forward(x: torch.Tensor, scale: torch.Tensor, qn: float, qp: float) -> torch.Tensor:
    """round(clip(x / s)) · s of a dense ``x`` (any of _ACT_DTYPES), ``scale`` a one-element float32 tensor."""
    out = torch.empty_like(x)
    n = x.numel()
    blocks = (n + _BLOCK_ACT - 1) // _BLOCK_ACT
    key = act_launch_key(x, n, scale, out)
    launch(_aq_fwd_kernel, blocks, x, scale, out, n, qn, qp, x.dtype != torch.float32, _BLOCK_ACT, key=key)
    return out


def _launch_act_backward(x, scale, grad, qn: float, qp: float, g: float):
    """(∂L/∂x like ``x``, ∂L/∂s shaped like ``scale``, float32): per-block partial sums, then one deterministic
    sum.  Each eager layer pays this function's host time (see :func:`hasb.modules.prequantize_weights`), so no
    reshape or cast runs where none is needed."""
    grad_x = torch.empty_like(x)
    n = x.numel()
    blocks = (n + _BLOCK_ACT - 1) // _BLOCK_ACT
    partial = torch.empty(blocks, device=x.device, dtype=torch.float32)
    key = (grad.dtype, *act_launch_key(x, n, scale, grad, grad_x, partial))  # grad: x's dtype in autograd
    lowp = x.dtype != torch.float32
    launch(_aq_bwd_kernel, blocks, x, scale, grad, grad_x, partial, n, qn, qp, g, lowp, _BLOCK_ACT, key=key)
    total = partial.sum()  # 0-dim float32
    return grad_x, total if scale.dim() == 0 else total.view(scale.shape)


@functools.lru_cache(maxsize=512)
def _act_meta(bit: int, signed: bool, n: int) -> tuple[int, bool, float, float, float]:
    """(bit, signed, Qn, Qp, g) of an activation of ``n`` values at ``bit``, the floats as the kernels take them:
    :class:`FusedLSQActivation`'s one Python argument, from one lookup per call (an eager step pays this path's
    host time once per layer)."""
    qn, qp = Q.int_range(bit, signed)
    return bit, signed, float(qn), float(qp), Q.lsq_g(n, qp)


class FusedLSQActivation(torch.autograd.Function):
    """Per-tensor LSQ fake quantization through the Triton kernels (values and gradients of the composite).

    Low-precision ``x`` (bf16/fp16) reproduces the composite's dtype semantics: the step is rounded to x's dtype
    (type promotion of a 0-dim float32 tensor), and x/s and the output are rounded to x's dtype.

    Inputs: x, scale (see :func:`quantize_activation`) and ``meta`` = :func:`_act_meta` (bit, signed, x.numel()),
    one tuple: each argument of ``apply`` costs the host time of every eager layer.
    """

    @staticmethod
    def forward(ctx, x, scale, meta):
        dense = _dense(x)
        ctx.save_for_backward(x, scale)
        ctx.meta = meta, dense
        _, _, qn, qp, _ = meta
        return _launch_act_forward(x if dense else x.contiguous(), scale, qn, qp)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale = ctx.saved_tensors
        (bit, signed, qn, qp, g), dense = ctx.meta
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite instead
            return _composite_grads(ctx, (x, scale), grad_out, Q.quantize_activation, bit, signed)
        xd = x if dense else x.contiguous()  # no graph is recorded here (grad mode is off): no detach
        grad_x, grad_s = _launch_act_backward(xd, scale, _like(grad_out, xd), qn, qp, g)
        return grad_x, grad_s, None


def _act_kernel_fits(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the activation kernels take these tensors (kernels on, Triton, CUDA, their dtypes)."""
    return (
        _enabled
        and triton is not None
        and x.is_cuda
        and x.dtype in _ACT_DTYPES
        and scale.dtype == torch.float32
        and scale.numel() == 1
        and scale.device == x.device
        and x.numel() > 0
    )


def act_fused_applies(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`quantize_activation` takes the kernel path for these tensors in the current context."""
    return _act_kernel_fits(x, scale) and Q._use_fused()


def act_compiled_applies(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`quantize_activation`, traced by torch.compile, keeps the composite forward but puts one
    backward kernel in the graph (:class:`_LSQCompiledKernel`)."""
    return torch.compiler.is_compiling() and not Q.composite_requested() and _act_kernel_fits(x, scale)


@torch.library.custom_op("hasb::lsq_act_backward", mutates_args=())
def lsq_act_backward(
    x: torch.Tensor, scale: torch.Tensor, grad: torch.Tensor, qn: float, qp: float, g: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂x, ∂L/∂s) of per-tensor LSQ as one op of a compiled graph: :func:`_launch_act_backward` (one read of
    ``x`` and ``grad``, one write of ∂L/∂x, one sum of the blocks' partials).  ``x`` dense, ``scale`` one float32
    element; ∂L/∂s comes shaped like ``scale``."""
    return _launch_act_backward(x, scale, _like(grad, x), qn, qp, g)


@lsq_act_backward.register_fake
def _lsq_act_backward_fake(x, scale, grad, qn, qp, g):
    return torch.empty_like(x), torch.empty_like(scale)


class _LSQCompiledKernel(torch.autograd.Function):
    """Per-tensor LSQ inside a compiled graph (int bits): the composite's forward, which inductor fuses into the
    activation's producer, and the backward as one :func:`lsq_act_backward` call.  Why: inductor fuses the
    composite's backward badly with batch norm's; the step gradient sums over every element while BN's
    reductions run per channel, so it either builds a slow joint reduction or writes the masked gradient out and
    sums it in passes of their own (MobileNetV2@224: +3.4 ms per step; benchmarks/RESULTS.md, session 13).
    Where the gradient goes into a max pool's or a residual add's backward, inductor's own fusion is cheaper:
    everywhere, the op cost ResNet-18@224 3-4% of a step (session 15), so :func:`hasb.quantize_model` marks only
    layers fed by a batch norm (``QuantMixin.act_backward_op``).  With that rule ResNet-18 runs 1.118x the float
    step against 1.146x with the op everywhere and 1.116x with none; MobileNetV2 1.259x against 1.270x (session
    16; with none 1.338x, session 14).  After LayerNorm, too, inductor's fusion is cheaper: the byte LM's pass
    1.282x without the op, 1.324x with it (session 17).  A group of convolutions that share an input quantizer
    takes the op wherever its input comes from (:func:`hasb.modules.share_input_quantizer`, session 24).

    Forward values are the composite's (round(q) · s equals (q + (round(q) - q)) · s exactly); the gradients are
    the eager kernels' (:class:`FusedLSQActivation`).  ``x``: the 1-D memory-order view
    (:func:`hasb.quantizer.memory_order`); ``qn``, ``qp``, ``g``: Python floats.
    """

    @staticmethod
    def forward(ctx, x, scale, qn, qp, g):
        ctx.save_for_backward(x, scale)
        ctx.consts = (qn, qp, g)
        return torch.round(torch.clamp(x / scale, qn, qp)) * scale

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        grad_x, grad_s = lsq_act_backward(x, scale, grad, *ctx.consts)
        return grad_x, grad_s, None, None, None


def _compiled_activation(x: torch.Tensor, scale: torch.Tensor, bit: int, signed: bool) -> torch.Tensor:
    """:func:`quantize_activation` as traced by torch.compile where the kernels fit (:func:`act_compiled_applies`)."""
    qn, qp = Q.int_range(bit, signed)
    xm, restore = Q.memory_order(x)
    return restore(_LSQCompiledKernel.apply(xm, scale, float(qn), float(qp), Q.lsq_g(x.numel(), qp)))


def quantize_activation(
    x: torch.Tensor, scale: torch.Tensor, bit: int, signed: bool, backward_op: bool = True
) -> torch.Tensor:
    """Drop-in for :func:`hasb.quantizer.quantize_activation` with the values/gradients of its composite path.

    Args:
        x: any shape, float32/bf16/fp16 CUDA for the kernel path.
        scale: the step s_b, a one-element float32 tensor.
        backward_op: in a compiled graph, the backward as one kernel op (:class:`_LSQCompiledKernel`); False
            leaves it to inductor, which fuses it well into a max pool's or a residual add's backward (ResNet-18,
            benchmarks/RESULTS.md, sessions 15-16) and badly into batch norm's.
    Returns:
        round(clip(x / s, Qn, Qp)) · s, shape and dtype of ``x``; ∂/∂s is LSQ's with g = 1/sqrt(numel · Qp).
    """
    if not act_fused_applies(x, scale):
        if backward_op and act_compiled_applies(x, scale):
            return _compiled_activation(x, scale, bit, signed)
        return _reference_activation(x, scale, bit, signed)
    return FusedLSQActivation.apply(x, scale, _act_meta(bit, bool(signed), x.numel()))
