"""ALRS — Adaptive Learning Rate Scaling (arXiv 2502.01199, Sec. 3.2), as pure functions.

Multi-precision training steps the optimizer once per candidate bit (high → low).
Lower precisions produce larger, noisier gradients on the quantization scales, so
the learning rate of the *scales group* is shrunk per pass:

* ``"code"`` (the reference implementation): ``lr_b = λ · α^k`` where ``k`` is the
  rank of ``b`` counted from the top bit (0 for the highest), ``α = 0.1``.
  {8,6,4,2} → 1, 0.1, 0.01, 0.001;  {4,3,2} → 1, 0.1, 0.01.
* ``"paper"`` (Eq. 7): ``η_b = 10^(−Δ/2)`` for even ``Δ = h − b``,
  ``5·10^(−(Δ+1)/2)`` for odd Δ.  {8,6,4,2} → 1, 0.1, 0.01, 0.001;
  {4,3,2} → 1, 0.5, 0.1.
* ``"off"``: factor 1 at every bit.

Eq. 6's gradient term (λ minus a mean of clipped max |∇s|) is not used: as printed
it yields negative learning rates for λ = 5e-4, and the reference code does not
implement it either (method notes §2).  Weights always keep the scheduled λ.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

ALRS_MODES = ("code", "paper", "off")


def eta_code(bits: Iterable[int], alpha: float = 0.1) -> dict[int, float]:
    """Reference-code factors ``α^k``, k = rank from the highest bit."""
    order = sorted({int(b) for b in bits}, reverse=True)
    return {b: float(alpha) ** k for k, b in enumerate(order)}


def eta_paper(bits: Iterable[int]) -> dict[int, float]:
    """Paper Eq. 7 factors from Δ = h − b."""
    order = sorted({int(b) for b in bits}, reverse=True)
    h = order[0]
    out = {}
    for b in order:
        d = h - b
        out[b] = 10.0 ** (-d / 2) if d % 2 == 0 else 5.0 * 10.0 ** (-(d + 1) / 2)
    return out


def alrs_factors(bits: Iterable[int], mode: str = "code", alpha: float = 0.1) -> dict[int, float]:
    """Per-bit multiplier of the scales group's learning rate for ``mode`` in ``ALRS_MODES``."""
    if mode == "code":
        return eta_code(bits, alpha)
    if mode == "paper":
        return eta_paper(bits)
    if mode == "off":
        return {int(b): 1.0 for b in bits}
    raise ValueError(f"unknown ALRS mode {mode!r}; accepted: {', '.join(ALRS_MODES)}")


def cosine_factor(step: int, total_steps: int, final: float = 0.0) -> float:
    """Cosine annealing multiplier at ``step`` of ``total_steps`` (1 → ``final``), no warm-up."""
    if total_steps <= 0:
        return 1.0
    t = min(max(step, 0), total_steps) / total_steps
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def group_lrs(
    base_lrs: Mapping[str, float],
    schedule: float,
    bit: int,
    factors: Mapping[int, float],
    alrs_groups: Sequence[str] = ("scales",),
) -> dict[str, float]:
    """Learning rate of every parameter group for one bit pass.

    Args:
        base_lrs: group name → initial lr λ₀.
        schedule: scheduler multiplier at this step (λ = λ₀ · schedule).
        bit: the pass's (base) bit.
        factors: ``alrs_factors(...)`` output.
        alrs_groups: groups scaled by ALRS (default: the scales group only).
    """
    return {g: lr * schedule * (factors[int(bit)] if g in alrs_groups else 1.0) for g, lr in base_lrs.items()}


__all__ = ["ALRS_MODES", "eta_code", "eta_paper", "alrs_factors", "cosine_factor", "group_lrs"]
