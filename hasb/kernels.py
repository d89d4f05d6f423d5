"""Fused Triton kernels for the Double Rounding + LSQ weight quantizer (issue 15).

:func:`quantize_weight` has the signature and semantics of
:func:`hasb.quantizer.quantize_weight` (Eq. 1-3 of the quantizer's docstring)
and runs it as two CUDA launches per layer and step:

* forward (one launch, grid [C_out, ceil(K / BLOCK)]):
  Ŵ_l = clip(R(clip(round(W / s_h)) / 2^Δ)) · s_h · 2^Δ, bit-identical to the
  composite (correctly rounded division, round-half-even for Eq. 1, the chosen
  ``rounding`` for Eq. 2);
* backward (one launch, one program per output channel):
  ∂L/∂W = ∂L/∂Ŵ · 1[Qn ≤ q ≤ Qp] and the per-channel LSQ scale gradient
  ∂L/∂s_h[c] = g · 2^Δ · Σ_k ∂L/∂Ŵ · (W_l - q if inside else clip(q)),
  with q = W / (s_h 2^Δ) and g = 1/sqrt(K · Qp_l), reduced inside the kernel.

The PyTorch composite stays the reference: it is used off CUDA, for non-float32
weights, inside :func:`hasb.quantizer.composite_ops` (the Hessian engine),
under ``torch.compile`` (inductor fuses the composite), and for double backward
(``create_graph=True``: the backward then re-derives the composite's gradient
with a differentiable graph, so second derivatives are the composite's).
Forward-mode AD (``torch.func.jvp``) is not supported by the fused Function;
run it inside ``composite_ops()`` as the Hessian engine does.
"""
from __future__ import annotations

import math

import torch

from . import quantizer as Q

try:  # optional: Triton ships with the CUDA builds of torch, not the CPU ones
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_BLOCK_FWD = 1024
_BLOCK_BWD = 512
_reference_weight = Q.quantize_weight   # bound once: the fallback, even if the module attribute is patched


def available() -> bool:
    """Whether the fused kernels can run here (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _double_round(w, s, qn_h, qp_h, qn, qp, inv_pow, HALF_EVEN: tl.constexpr, DELTA0: tl.constexpr):
        """Eq. 1 then Eq. 2 on float32 lanes: the INT-l code W_l as float."""
        w_h = libdevice.rint(tl.div_rn(w, s))            # torch.round: half to even
        w_h = tl.minimum(tl.maximum(w_h, qn_h), qp_h)
        if DELTA0:
            return w_h
        x = w_h * inv_pow                                # exact: division by a power of two
        if HALF_EVEN:
            r = libdevice.rint(x)
        else:
            r = tl.floor(x + 0.5)
        return tl.minimum(tl.maximum(r, qn), qp)

    @triton.jit
    def _wq_fwd_kernel(w_ptr, s_ptr, out_ptr, K, qn_h, qp_h, qn, qp, inv_pow, pow2,
                       HALF_EVEN: tl.constexpr, DELTA0: tl.constexpr, BLOCK: tl.constexpr):
        c = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < K
        base = c.to(tl.int64) * K
        w = tl.load(w_ptr + base + offs, mask=mask, other=0.0)
        s = tl.load(s_ptr + c)
        w_l = _double_round(w, s, qn_h, qp_h, qn, qp, inv_pow, HALF_EVEN, DELTA0)
        tl.store(out_ptr + base + offs, w_l * (s * pow2), mask=mask)

    @triton.jit
    def _wq_bwd_kernel(w_ptr, s_ptr, go_ptr, gw_ptr, gs_ptr, K, qn_h, qp_h, qn, qp, inv_pow, pow2, gfac,
                       HALF_EVEN: tl.constexpr, DELTA0: tl.constexpr, BLOCK: tl.constexpr):
        c = tl.program_id(0)
        base = c.to(tl.int64) * K
        s = tl.load(s_ptr + c)
        s_eff = s * pow2
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = offs < K
            w = tl.load(w_ptr + base + offs, mask=mask, other=0.0)
            go = tl.load(go_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            w_l = _double_round(w, s, qn_h, qp_h, qn, qp, inv_pow, HALF_EVEN, DELTA0)
            q = tl.div_rn(w, s_eff)
            inside = (q >= qn) & (q <= qp)
            tl.store(gw_ptr + base + offs, tl.where(inside, go, 0.0), mask=mask)
            inner = tl.where(inside, w_l - q, tl.minimum(tl.maximum(q, qn), qp))
            acc += go * inner                            # masked lanes carry go = 0
        tl.store(gs_ptr + c, tl.sum(acc, axis=0) * gfac)


def _consts(bit: int, high_bit: int) -> tuple[float, ...]:
    """Runtime scalars of the kernels: (Qn_h, Qp_h, Qn_l, Qp_l, 2^-Δ, 2^Δ)."""
    qn_h, qp_h = Q.int_range(high_bit)
    qn, qp = Q.int_range(bit)
    delta = high_bit - bit
    return float(qn_h), float(qp_h), float(qn), float(qp), 2.0 ** -delta, 2.0 ** delta


def _launch_forward(w2: torch.Tensor, scale: torch.Tensor, bit: int, high_bit: int, rounding: str) -> torch.Tensor:
    """Ŵ_l of a contiguous float32 [C, K] weight; ``scale`` [C] float32."""
    out = torch.empty_like(w2)
    c, k = w2.shape
    grid = (c, triton.cdiv(k, _BLOCK_FWD))
    _wq_fwd_kernel[grid](w2, scale, out, k, *_consts(bit, high_bit), HALF_EVEN=rounding == "half_even",
                         DELTA0=bit == high_bit, BLOCK=_BLOCK_FWD)
    return out


def _launch_backward(w2, scale, grad2, bit, high_bit, rounding, g):
    """(∂L/∂W [C, K], ∂L/∂s_h [C]) from the saved weight/scale and ∂L/∂Ŵ [C, K] (all float32 contiguous)."""
    grad_w = torch.empty_like(w2)
    grad_s = torch.empty_like(scale)
    c, k = w2.shape
    gfac = g * 2.0 ** (high_bit - bit)
    _wq_bwd_kernel[(c,)](w2, scale, grad2, grad_w, grad_s, k, *_consts(bit, high_bit), gfac,
                         HALF_EVEN=rounding == "half_even", DELTA0=bit == high_bit, BLOCK=_BLOCK_BWD)
    return grad_w, grad_s


class FusedDoubleRoundLSQ(torch.autograd.Function):
    """Ŵ_l with LSQ gradients through the Triton kernels; see the module docstring.

    Inputs: w [C_out, ...] float32 CUDA, scale [C_out] float32 CUDA, then the
    python scalars bit, high_bit, rounding, g.
    """

    @staticmethod
    def forward(ctx, w, scale, bit, high_bit, rounding, g):
        w2 = w.detach().reshape(w.shape[0], -1).contiguous()
        s = scale.detach().contiguous()
        ctx.save_for_backward(w, scale)
        ctx.meta = (bit, high_bit, rounding, g)
        return _launch_forward(w2, s, bit, high_bit, rounding).view(w.shape)

    @staticmethod
    def backward(ctx, grad_out):
        w, scale = ctx.saved_tensors
        bit, high_bit, rounding, g = ctx.meta
        if torch.is_grad_enabled():   # create_graph=True: differentiate the composite instead
            return _composite_backward(ctx, w, scale, grad_out) + (None,) * 4
        w2 = w.detach().reshape(w.shape[0], -1).contiguous()
        grad2 = grad_out.reshape(w2.shape).contiguous()
        grad_w, grad_s = _launch_backward(w2, scale.detach().contiguous(), grad2, bit, high_bit, rounding, g)
        return grad_w.view(w.shape), grad_s, None, None, None, None


def _composite_backward(ctx, w, scale, grad_out):
    """The composite path's (∂L/∂W, ∂L/∂s_h) as a differentiable graph of (w, scale, grad_out)."""
    bit, high_bit, rounding, _ = ctx.meta
    with Q.composite_ops():
        out = Q.quantize_weight(w, scale, bit, high_bit, rounding)
    want = [t for t, need in zip((w, scale), ctx.needs_input_grad[:2], strict=True) if need]
    grads = iter(torch.autograd.grad(out, want, grad_out, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:2])


def fused_applies(w: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether :func:`quantize_weight` takes the kernel path for these tensors in the current context."""
    return (triton is not None and w.is_cuda and scale.is_cuda and w.dtype == torch.float32
            and scale.dtype == torch.float32 and w.dim() >= 1 and w.numel() > 0
            and scale.numel() == w.shape[0] and Q._use_fused())


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, bit: int, high_bit: int,
                    rounding: Q.Rounding = "half_up") -> torch.Tensor:
    """Drop-in for :func:`hasb.quantizer.quantize_weight` (same args, shapes, values and gradients).

    Args:
        w: float weight [C_out, ...]; scale: per-channel step s_h [C_out], positive.
        bit: target bit l ≤ high_bit; rounding: ``half_up`` or ``half_even`` (Eq. 2).
    Returns:
        Ŵ_l, same shape as ``w``, through the fused kernels when :func:`fused_applies`,
        else through the composite reference.
    """
    if rounding not in Q.ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; accepted: {', '.join(Q.ROUNDINGS)}")
    if bit > high_bit:
        raise ValueError(f"bit {bit} exceeds the highest candidate bit {high_bit}")
    if not fused_applies(w, scale):
        return _reference_weight(w, scale, bit, high_bit, rounding)
    g = 1.0 / math.sqrt(w[0].numel() * Q.int_range(bit)[1])
    return FusedDoubleRoundLSQ.apply(w, scale, bit, high_bit, rounding, g)
