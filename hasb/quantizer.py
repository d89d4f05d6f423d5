"""Double Rounding quantization (arXiv 2502.01199, Sec. 3.1), as pure functions.

Weights keep one per-output-channel symmetric scale ``s_h`` shared by every
bit-width.  The stored model is the INT-h tensor

    W_h = clip(round(W / s_h), -2^(h-1), 2^(h-1) - 1)                       (Eq. 1)

and every lower bit l is derived from W_h alone (the second rounding):

    W_l = clip(R(W_h / 2^Δ), -2^(l-1), 2^(l-1) - 1),   Δ = h - l            (Eq. 2)
    Ŵ_l = W_l · s_h · 2^Δ                                                   (Eq. 3)

``R`` is ``half_up`` (add 2^(Δ-1) then arithmetic shift right: what integer
hardware does, and our default) or ``half_even`` (``torch.round``: what the
reference code trains with).  Train and deploy with the same one; ties are
frequent because W_h is an integer.

``msb`` is MSB slicing (MatQuant-style) instead of a second rounding: R = floor,
i.e. W_l = W_h >> Δ (arithmetic shift, no rounding offset), so W_l is exactly the
top l bits of the two's-complement INT-h code and never needs the clip.  The
scale relation is the same as for the other modes, s_l = s_h · 2^(h-l) (Eq. 3),
so Ŵ_l = (W_h >> Δ) · s_h · 2^Δ: truncation moves every weight down by
(W_h mod 2^Δ) · s_h ∈ [0, (2^Δ - 1) · s_h], a bias of about -(2^Δ - 1)/2 · s_h on
average that the LSQ scale (and the weights) must learn around.  Its gradients are
the same LSQ formulas with W_l the sliced code (see :func:`quantize_weight`).

Gradients are LSQ's (Esser et al. 2020), made right where the reference code is
not: the scale gradient is kept **per channel** (the reference sums it over the
whole tensor, so every channel moves identically), includes the chain factor
∂s_eff/∂s_h = 2^Δ, and is multiplied by LSQ's g = 1/sqrt(N_per_channel · Qp_l).
Weights get the straight-through estimator inside the clip range, zero outside.

Activations use per-tensor LSQ with an independent scale per candidate bit,
unsigned [0, 2^b - 1] or signed [-2^(b-1), 2^(b-1) - 1].

At 1 bit the signed range is [-1, 0] (two's complement; a weight keeps the sign bit of its stored integer) and
LSQ's g = 1/sqrt(N · max(Qp, 1)) stays finite.

Everything is written with detach tricks rather than a custom autograd.Function
so that ``torch.compile`` and forward-mode AD (used by the Hessian engine) see
plain differentiable ops.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Literal

import torch

Rounding = Literal["half_up", "half_even", "msb"]
ROUNDINGS = ("half_up", "half_even", "msb")

_state = threading.local()


@contextlib.contextmanager
def composite_ops() -> Iterator[None]:
    """Use only plain differentiable ops (no fused fake-quant kernel) inside this block.

    Needed for higher-order autograd (double backward, ``torch.func.jvp``): the
    fused kernel's backward has no derivative of its own.
    """
    prev = getattr(_state, "composite", False)
    _state.composite = True
    try:
        yield
    finally:
        _state.composite = prev


def composite_requested() -> bool:
    """Whether the caller is inside :func:`composite_ops` (plain differentiable ops only)."""
    return getattr(_state, "composite", False)


def _use_fused() -> bool:
    # inductor fuses the composite ops with their neighbours; in eager the fused kernel saves ~4 passes
    return not composite_requested() and not torch.compiler.is_compiling()


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """Integer clip range [Qn, Qp] of a ``bits``-bit code (full signed range, as the paper)."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_g(n: int, qp: int) -> float:
    """LSQ's gradient scale g = 1/sqrt(n · max(Qp, 1)) for ``n`` values sharing one step.

    At 1 bit the signed range is two's complement [-1, 0] (Qp = 0): the top bit of the stored integer, which keeps
    Double Rounding's nesting; g then uses the range's magnitude 1, not 1/0."""
    return 1.0 / math.sqrt(n * max(qp, 1))


def round_shift(w_int: torch.Tensor, delta: int, rounding: Rounding = "half_up") -> torch.Tensor:
    """R(w_int / 2^delta) for integer-valued ``w_int`` (any float or int dtype).

    ``half_up`` equals the integer op ``(w + 2^(delta-1)) >> delta`` (arithmetic
    shift); ``half_even`` equals ``torch.round(w / 2^delta)``; ``msb`` equals
    ``w >> delta`` (floor: the top bits of the two's-complement code).  Exact in
    float32 for |w| < 2^24 because division by a power of two is exact.
    """
    if delta == 0:
        return w_int
    if w_int.dtype.is_floating_point:
        x = w_int / float(2**delta)
        if rounding == "half_up":
            return torch.floor(x + 0.5)
        if rounding == "half_even":
            return torch.round(x)
        if rounding == "msb":
            return torch.floor(x)
    else:
        if rounding == "half_up":
            return (w_int + (1 << (delta - 1))) >> delta
        if rounding == "half_even":
            return torch.round(w_int.double() / 2**delta).to(w_int.dtype)
        if rounding == "msb":
            return w_int >> delta
    raise ValueError(f"unknown rounding {rounding!r}; accepted: {', '.join(ROUNDINGS)}")


def stored_int(w: torch.Tensor, scale: torch.Tensor, high_bit: int) -> torch.Tensor:
    """Eq. 1: the stored INT-h weights (float tensor of integers), scale broadcast per output channel."""
    qn, qp = int_range(high_bit)
    return torch.clamp(torch.round(w / _per_channel(scale, w)), qn, qp)


def derive_int(w_h: torch.Tensor, bit: int, high_bit: int, rounding: Rounding = "half_up") -> torch.Tensor:
    """Eq. 2: INT-l weights derived from INT-h weights alone (works on int tensors too)."""
    if bit > high_bit:
        raise ValueError(f"bit {bit} exceeds the highest candidate bit {high_bit}")
    qn, qp = int_range(bit)
    return torch.clamp(round_shift(w_h, high_bit - bit, rounding), qn, qp)


def grad_scale(x: torch.Tensor, g: float | torch.Tensor) -> torch.Tensor:
    """Value of ``x``, gradient multiplied by ``g`` (LSQ's gradient scaling)."""
    xg = x * g
    return x.detach() + (xg - xg.detach())  # value exactly x (no float round-off), gradient g


def _per_channel(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.reshape((-1,) + (1,) * (like.dim() - 1))


def quantize_weight(
    w: torch.Tensor,
    scale: torch.Tensor,
    bit: int,
    high_bit: int,
    rounding: Rounding = "half_up",
) -> torch.Tensor:
    """Fake-quantized weight Ŵ_l (Eq. 1-3) with LSQ gradients.

    Args:
        w: float weight, shape [C_out, ...].
        scale: per-output-channel step s_h, shape [C_out], positive.
        bit: target bit l (≤ high_bit).
        high_bit: h, the bit of the stored integers.
    Returns:
        Ŵ_l, same shape as ``w``: W_l · s_h · 2^(h-l).

    Backward: ∂Ŵ/∂W = 1 inside [Qn, Qp] (in units of the effective step), 0
    outside; ∂Ŵ/∂s_h = g · 2^Δ · (W_l - q) inside, g · 2^Δ · Qn|Qp outside,
    summed per channel, with q = W / (s_h 2^Δ) and g = 1/sqrt(N_c · Qp_l).
    """
    delta = high_bit - bit
    qn, qp = int_range(bit)
    n_per_channel = w[0].numel()
    g = lsq_g(n_per_channel, qp)
    if _use_fused():
        return _DoubleRoundLSQ.apply(w, scale, bit, high_bit, rounding, g)
    s_h = _per_channel(grad_scale(scale, g), w)
    s_eff = s_h * float(2**delta)
    with torch.no_grad():
        w_l = derive_int(stored_int(w, scale, high_bit), bit, high_bit, rounding)
    q = torch.clamp(w / s_eff, qn, qp)
    # gradient path: LSQ through q (STE inside, clip constant outside) ...
    t = (q + (w_l - q).detach()) * s_eff
    # ... value path: exactly W_l·s_eff, so two float weights with the same integers give bit-identical outputs
    return w_l * s_eff.detach() + (t - t.detach())


class _DoubleRoundLSQ(torch.autograd.Function):
    """The same forward and gradients as the composite path of :func:`quantize_weight`, in ~4x fewer kernels.

    Eager training is launch-bound on weight tensors (small, one chain of ops per
    layer and step); this keeps the chain short.  Not twice differentiable: the
    Hessian engine runs inside :func:`composite_ops`.
    """

    @staticmethod
    def forward(ctx, w, scale, bit, high_bit, rounding, g):
        delta = high_bit - bit
        s_eff = _per_channel(scale, w) * float(2**delta)
        w_l = derive_int(stored_int(w, scale, high_bit), bit, high_bit, rounding)
        ctx.save_for_backward(w, scale, w_l)
        ctx.meta = (bit, delta, g)
        return w_l * s_eff

    @staticmethod
    def backward(ctx, grad_out):
        w, scale, w_l = ctx.saved_tensors
        return (*double_round_grads(w, scale, w_l, grad_out, *ctx.meta), None, None, None, None)


def double_round_grads(
    w: torch.Tensor, scale: torch.Tensor, w_l: torch.Tensor, grad_out: torch.Tensor, bit: int, delta: int, g: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂L/∂W, ∂L/∂s_h) of Ŵ_l = W_l · s_h · 2^Δ (Eq. 3, LSQ): STE inside the clip range, the step's gradient
    g · 2^Δ · Σ_k ∂L/∂Ŵ · (W_l - q inside, clip(q) outside) per output channel, q = W / (s_h 2^Δ).

    w, w_l (the INT-l code as float), grad_out: [C, ...]; scale: [C]; bit l, Δ = h - l; g LSQ's factor."""
    qn, qp = int_range(bit)
    q = w / (_per_channel(scale, w) * float(2**delta))
    inside = (q >= qn) & (q <= qp)
    grad_w = grad_out * inside
    inner = torch.where(inside, w_l - q, q.clamp(qn, qp))
    grad_s = (grad_out * inner).reshape(w.shape[0], -1).sum(1) * (g * 2**delta)
    return grad_w, grad_s.to(scale.dtype)


def quantize_activation(
    x: torch.Tensor,
    scale: torch.Tensor,
    bit: int,
    signed: bool,
) -> torch.Tensor:
    """Per-tensor LSQ fake quantization of an activation at ``bit`` bits.

    Args:
        x: any shape.
        scale: scalar step s_b (0-dim or 1-element tensor), positive.
        signed: signed range [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b - 1].
    """
    qn, qp = int_range(bit, signed)
    g = lsq_g(x.numel(), qp)
    if _use_fused():
        # ATen's fused LSQ kernel: same forward (round-half-even) and the same x / scale gradients
        s1 = scale.reshape(1).float()
        return torch._fake_quantize_learnable_per_tensor_affine(x, s1, torch.zeros_like(s1), qn, qp, g)
    return lsq_fake_quant(x, scale, g, qn, qp)


def lsq_fake_quant(x: torch.Tensor, scale: torch.Tensor, g, qn, qp) -> torch.Tensor:
    """round(clip(x / s, Qn, Qp)) · s with LSQ's gradients (STE for x, g-scaled for the step), computed on the
    memory-order view of ``x`` (:func:`memory_order`) and returned in its layout.  ``scale``: 0-dim step s;
    ``g``, ``qn``, ``qp``: Python numbers (int path) or 0-dim tensors (bits as data)."""
    xm, restore = memory_order(x)
    s = grad_scale(scale, g)
    q = torch.clamp(xm / s, qn, qp)
    return restore((q + (torch.round(q) - q).detach()) * s)


def lsq_fake_quant_one_sum(x: torch.Tensor, scale: torch.Tensor, g, qn, qp) -> torch.Tensor:  # g, qn, qp: 0-dim
    """:func:`lsq_fake_quant` through :class:`_LSQCompiled`: the same values, the gradients up to round-off,
    the backward one pass with one sum.  What compiled bits-as-data graphs use (measured on the H200,
    ResNet-18@224 b256 W4A4 with CUDA graphs, one process: 20.31 vs 21.61 ms per step; with int bits inductor
    fuses the composite better, 19.09 / 19.56 vs 18.40 / 18.95 ms, so that path keeps it)."""
    xm, restore = memory_order(x)
    return restore(_LSQCompiled.apply(xm, scale, g, qn, qp))


class _LSQCompiled(torch.autograd.Function):
    """:func:`lsq_fake_quant`'s composite as one Function, for inductor.

    Same forward values (round(q)·s equals the composite's (q + (round(q) - q))·s exactly: for q in [Qn, Qp] the
    difference round(q) - q is exact by Sterbenz's lemma and adding it back gives the integer).  Gradients up to
    float round-off: ∂L/∂x = ∂L/∂y · 1[Qn ≤ x/s ≤ Qp] (the composite's (∂L/∂y · s) / s) and
    ∂L/∂s = g · Σ ∂L/∂y · (round(q) - q inside, clip(q) outside) as one sum, where the composite's autograd
    makes two sums (in the bits-as-data graph inductor then read each large activation three times).
    """

    @staticmethod
    def forward(ctx, x, s, g, qn, qp):  # g, qn, qp: 0-dim tensors (bits as data)
        ctx.save_for_backward(x, s, g, qn, qp)
        return torch.round(torch.clamp(x / s, qn, qp)) * s

    @staticmethod
    def backward(ctx, grad):
        x, s, g, qn, qp = ctx.saved_tensors
        q = x / s
        inside = (q >= qn) & (q <= qp)
        inner = torch.where(inside, torch.round(q) - q, torch.clamp(q, qn, qp))
        grad_s = (grad.float() * inner.float()).sum() * g
        return grad * inside, grad_s.to(s.dtype), None, None, None


def memory_order(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``x`` as a 1-D view in memory order (NHWC for a channels_last batch), and the function that gives a result
    of that view back in ``x``'s shape and layout (``restore(view)`` is ``x`` again, same strides).

    Why: the scale gradient of an activation quantizer sums over every element, and inductor lowers a full
    reduction in logical order; over a channels_last activation that reads memory with a stride of C (1.4 ms
    per 51 M-element layer on the H200).  A 4-D permuted view fixed that order but not the layout of the tensor
    inductor saves for the backward (x / s): its layout optimisation gives every 4-D intermediate of a conv graph
    the channels_last strides of its *logical* dims, which for an NHWC view is a transpose, and the backward's
    sum gathered it with a stride of H (0.79 ms per launch, about 20x its memory traffic; benchmarks/RESULTS.md,
    session 10).  A 1-D view has one layout.  Elementwise results are unchanged; only the order of the sum (its
    float round-off) follows memory.  Tensors that are not a permutation of a contiguous layout come back as they
    are.
    """
    strides = x.stride()
    if torch.compiler.is_compiling():
        perm = _traced_perm(x)  # dynamo cannot sort on strides once shapes are dynamic (a batch-size change)
    else:
        perm = sorted(range(x.dim()), key=lambda d: -strides[d])  # stable: ties (size-1 dims) keep their order
    view = x.permute(perm)
    if not view.is_contiguous():
        return x, _same
    back = [perm.index(d) for d in range(x.dim())]
    shape = view.shape
    return view.view(-1), lambda y: y.view(shape).permute(back)


def _traced_perm(x: torch.Tensor) -> list[int]:
    """:func:`memory_order`'s permutation as traced by torch.compile, where the strides may be symbolic and dynamo
    cannot sort on them: the two layouts of real activations, contiguous and 4-D channels_last, tested (and
    guarded) by dynamo; for any other the identity, which :func:`memory_order` then returns unchanged."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return [0, 2, 3, 1]
    return list(range(x.dim()))


def _same(y: torch.Tensor) -> torch.Tensor:
    return y


# -- bits as data: the same math with the bit a 0-dim tensor (one compiled graph for every bit config) -------------
#
# The int versions above specialise on the bit (Python ints: torch.compile guards on each value and recompiles per
# config).  These take the active bit as a 0-dim float32 tensor holding an integer 1..8 and compute every constant
# from it, so the graph is the same whatever bit the tensor holds.  Values and gradients equal the composite path of
# the int versions bit for bit (tested); full precision ('fp') is not a bit here: callers branch on it in Python.


def int_range_t(bit: torch.Tensor, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`int_range` of a 0-dim float bit tensor: (Qn, Qp) as 0-dim tensors (exp2 is exact at integers)."""
    if signed:
        half = torch.exp2(bit - 1)
        return -half, half - 1
    return torch.zeros_like(bit), torch.exp2(bit) - 1


def lsq_g_t(n: int, qp: torch.Tensor) -> torch.Tensor:
    """LSQ's g = 1/sqrt(n · max(Qp, 1)), 0-dim float32.

    Computed in float64 and rounded once to float32: the value the int path's Python float g takes when it
    multiplies a float32 tensor, so gradients match bit for bit.
    """
    return (1.0 / torch.sqrt(qp.double().clamp_min(1.0) * n)).float()


def round_shift_t(w_int: torch.Tensor, pow2: torch.Tensor, rounding: Rounding = "half_up") -> torch.Tensor:
    """:func:`round_shift` of a float tensor of integers by ``pow2`` = 2^Δ (0-dim tensor; Δ = 0 is the identity)."""
    x = w_int / pow2  # exact: division by a power of two
    if rounding == "half_up":
        return torch.floor(x + 0.5)
    if rounding == "half_even":
        return torch.round(x)
    if rounding == "msb":
        return torch.floor(x)
    raise ValueError(f"unknown rounding {rounding!r}; accepted: {', '.join(ROUNDINGS)}")


def quantize_weight_t(
    w: torch.Tensor,
    scale: torch.Tensor,
    bit: torch.Tensor,
    high_bit: int,
    rounding: Rounding = "half_up",
) -> torch.Tensor:
    """:func:`quantize_weight` (composite path) with the target bit as data.

    Args:
        w: float weight, shape [C_out, ...].
        scale: per-output-channel step s_h, shape [C_out], positive.
        bit: target bit l as a 0-dim float32 tensor holding an integer in 1..high_bit (not checked: no sync).
        high_bit: h, the bit of the stored integers (a Python int: fixed per layer).
    Returns:
        Ŵ_l = W_l · s_h · 2^Δ, same shape as ``w``; the STE / per-channel LSQ gradients of :func:`quantize_weight`
        with 2^Δ = exp2(h - l) and g = 1/sqrt(N_c · max(Qp_l, 1)) as tensors.
    """
    pow2 = torch.exp2(high_bit - bit)
    qn, qp = int_range_t(bit)
    consts = torch.stack([qn, qp, pow2, lsq_g_t(w[0].numel(), qp)])
    return quantize_weight_c(w, scale, consts, high_bit, rounding)


def weight_consts(bit: int, high_bit: int, n: int) -> tuple[float, float, float, float]:
    """(Qn, Qp, 2^Δ, g) of :func:`quantize_weight` at ``bit`` for ``n`` weights per output channel: the numbers the
    int path uses (stored in a float32 tensor, g rounds as the int path's multiply by a Python float rounds it)."""
    qn, qp = int_range(bit)
    return float(qn), float(qp), float(2 ** (high_bit - bit)), lsq_g(n, qp)


def quantize_weight_c(
    w: torch.Tensor,
    scale: torch.Tensor,
    consts: torch.Tensor,
    high_bit: int,
    rounding: Rounding = "half_up",
) -> torch.Tensor:
    """:func:`quantize_weight_t` with the bit's constants precomputed: ``consts`` [4] float32 = (Qn, Qp, 2^Δ, g)
    (:func:`weight_consts`).  A compiled kernel then only loads them: computed from a bit tensor inside the graph,
    inductor recomputes exp2 and a float64 sqrt for every vector of weights (measured on CPU)."""
    qn, qp, pow2, g = consts.unbind()
    s_eff = _per_channel(grad_scale(scale, g), w) * pow2
    with torch.no_grad():
        w_l = torch.clamp(round_shift_t(stored_int(w, scale, high_bit), pow2, rounding), qn, qp)
    q = torch.clamp(w / s_eff, qn, qp)
    t = (q + (w_l - q).detach()) * s_eff
    return w_l * s_eff.detach() + (t - t.detach())


def quantize_activation_t(
    x: torch.Tensor,
    scales: torch.Tensor,
    index: torch.Tensor,
    bit: torch.Tensor,
    signed: bool,
) -> torch.Tensor:
    """:func:`quantize_activation` (composite path) with the bit and its step picked by data.

    Args:
        x: any shape.
        scales: the per-bit steps stacked, shape [K] (e.g. ``torch.stack`` of a layer's ``act_scales``).
        index: 0-dim int64, which entry of ``scales`` is the active bit's step; only that entry gets a gradient
            (the others get zeros: an index_select, no device sync).
        bit: the active bit as a 0-dim float32 tensor (an integer in 1..8).
        signed: signed or unsigned range (a Python bool: fixed per layer once initialised).
    """
    qn, qp = int_range_t(bit, signed)
    return quantize_activation_c(x, scales, index, torch.stack([qn, qp]))


def quantize_activation_c(x: torch.Tensor, scales: torch.Tensor, index: torch.Tensor, qrange: torch.Tensor):
    """:func:`quantize_activation_t` with the active bit's range precomputed: ``qrange`` [2] float32 = (Qn, Qp)
    (no exp2 of the bit inside the compiled kernels); ``scales``, ``index`` as there."""
    scale = scales.index_select(0, index.reshape(1)).reshape(())
    qn, qp = qrange.unbind()
    # compiled: one backward sum; the composite's two sums made inductor read a large activation three times
    compiled = torch.compiler.is_compiling() and not composite_requested()
    return (lsq_fake_quant_one_sum if compiled else lsq_fake_quant)(x, scale, lsq_g_t(x.numel(), qp), qn, qp)


def init_weight_scale(w: torch.Tensor, high_bit: int) -> torch.Tensor:
    """Data-free per-channel init: max(|μ-3σ|, |μ+3σ|) / 2^(h-1) (the reference code's rule), shape [C_out]."""
    flat = w.detach().reshape(w.shape[0], -1)
    mu = flat.mean(1)
    sd = flat.std(1, unbiased=False) if flat.shape[1] > 1 else torch.zeros_like(mu)
    r = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs())
    r = torch.where(r > 0, r, flat.abs().amax(1).clamp_min(1e-8))
    return r / 2 ** (high_bit - 1)


def init_activation_scale(
    x: torch.Tensor, bit: int, signed: bool, max_samples: int = 1 << 16, grid: int = 64
) -> torch.Tensor:
    """Data-driven init: the step that minimises the quantization MSE on a subsample of ``x``.

    Searched over ``grid`` steps between 1% and 100% of the percentile range
    (P99.9 - P0.1) / (Qp - Qn), the multi-precision code's rule.  At 8 bits the
    optimum sits near that rule; at 2 bits it is several times smaller (the rule
    rounds most post-ReLU values to 0), and because ALRS gives low-bit scales a
    tiny learning rate, a poor low-bit init would stay poor.
    """
    flat = x.detach().reshape(-1).float()
    if flat.numel() > max_samples:
        idx = torch.randperm(flat.numel(), device=flat.device)[:max_samples]
        flat = flat[idx]
    lo, hi = torch.quantile(flat, torch.tensor([0.001, 0.999], device=flat.device))
    qn, qp = int_range(bit, signed)
    if not signed:
        lo = torch.zeros_like(lo)
    s_max = torch.clamp((hi - lo) / (qp - qn), min=1e-6)
    steps = s_max * torch.linspace(0.01, 1.0, grid, device=flat.device)  # [grid]
    q = torch.clamp(torch.round(flat[None, :] / steps[:, None]), qn, qp) * steps[:, None]
    mse = (q - flat[None, :]).square().mean(1)
    return steps[torch.argmin(mse)]
