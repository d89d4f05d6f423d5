"""Per-layer bit samplers for the mixed-precision supernet (HASB, Alg. 1 + Alg. A.3 of arXiv 2502.01199).

Each training step runs one pass per candidate ("base") bit, high → low.  In a
pass every searchable layer keeps the base bit, except that with probability
``σ_e`` it switches to a bit drawn from its own distribution ``p_l``:

    σ_e = 0                         for epoch e < warmup_epochs
    σ_e = σ · (e + 1) / E           afterwards (σ = 0.5 by default)

Weight bit = activation bit per layer (as the reference).  Layers are addressed
by name, never by a global call counter (the reference's counter is off by one
and rotates the mapping every forward).

Distributions ``p_l`` (over the candidate bits):

* :class:`HASBSampler` — from per-parameter Hessian traces ``t_l`` of the
  searchable layers (first/last layers are fixed and excluded from the mean):
  ``t_l ≥ mean(t)`` → sensitive → ``p_l(b) ∝ b``; else uniform.
* :class:`UniformSampler` — uniform for every layer (the ablation baseline).
* :class:`TemperedSampler` — ``p_l(b) ∝ exp(−Ω̂_l(b)/τ)`` with Ω the
  Hessian-weighted quantization perturbation of the sensitivity file.  Ω is
  normalised so that τ has a model-independent meaning: negative Ω (negative
  traces) are clamped to 0, then Ω̂ = Ω / mean_l Ω_l(b_min), i.e. the average
  layer's lowest-bit perturbation is 1.  τ → ∞ gives uniform; τ = 1 makes the
  average layer's lowest bit e ≈ 2.7× less likely than its highest.

Samplers hold no random state: ``sample`` takes a ``torch.Generator`` that the
trainer owns and checkpoints, so resuming reproduces the same draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .config import BitConfig
from .sensitivity_file import SensitivityError, load_sensitivity, traces_for_model

SAMPLERS = ("hasb", "uniform", "tempered")


def sigma_schedule(epoch: int, epochs: int, sigma: float = 0.5, warmup_epochs: int = 0) -> float:
    """Switching probability σ_e at 0-based ``epoch`` of ``epochs``."""
    if epoch < warmup_epochs:
        return 0.0
    return float(sigma) * (epoch + 1) / max(int(epochs), 1)


def default_warmup(epochs: int) -> int:
    """The paper's 10 warm-up epochs of 90, scaled to the schedule."""
    return int(round(epochs * 10 / 90))


def hasb_probabilities(traces: Sequence[float], bits: Sequence[int]) -> torch.Tensor:
    """Alg. 1: [L, n_bits] probabilities (columns in the order of ``bits``).

    Sensitive layers (t_l ≥ mean t) draw b with p ∝ b; the others uniformly.
    """
    t = torch.as_tensor(list(traces), dtype=torch.float64)
    b = torch.as_tensor(list(bits), dtype=torch.float64)
    sens = t >= t.mean()
    prop = (b / b.sum()).expand(len(t), -1)
    uni = torch.full_like(prop, 1.0 / len(b))
    return torch.where(sens[:, None], prop, uni)


def tempered_probabilities(omega: torch.Tensor, bits: Sequence[int], tau: float = 1.0) -> torch.Tensor:
    """[L, n_bits] softmax of −Ω̂/τ, Ω normalised as described in the module docstring.

    Args:
        omega: [L, n_bits] Ω_l(b), columns in the order of ``bits``.
    """
    if tau <= 0:
        raise ValueError(f"temperature must be > 0, got {tau}")
    om = torch.as_tensor(omega, dtype=torch.float64).clamp_min(0.0)
    low = min(range(len(bits)), key=lambda i: bits[i])
    ref = om[:, low].mean()
    if not torch.isfinite(ref) or ref <= 0:
        ref = torch.tensor(1.0, dtype=torch.float64)
    return torch.softmax(-(om / ref) / tau, dim=1)


class BitSampler:
    """Per-layer stochastic bit switching around a base bit.

    Args:
        layers: searchable layer names (execution order).
        bits: candidate bits.
        probs: [L, n_bits] distribution of each layer over ``bits``.
        sigma, epochs, warmup_epochs: the σ_e schedule.
    """

    kind = "custom"

    def __init__(
        self,
        layers: Sequence[str],
        bits: Sequence[int],
        probs: torch.Tensor,
        *,
        sigma: float = 0.5,
        epochs: int = 1,
        warmup_epochs: int = 0,
    ):
        self.layers = list(layers)
        self.bits = [int(b) for b in sorted(set(bits), reverse=True)]
        if list(bits) != self.bits:
            raise ValueError("pass bits in descending order")
        probs = torch.as_tensor(probs, dtype=torch.float64)
        if probs.shape != (len(self.layers), len(self.bits)):
            raise ValueError(f"probs must be [{len(self.layers)}, {len(self.bits)}], got {list(probs.shape)}")
        if (probs < 0).any() or not torch.allclose(probs.sum(1), torch.ones(len(self.layers), dtype=torch.float64)):
            raise ValueError("each layer's probabilities must be non-negative and sum to 1")
        if not 0.0 <= sigma <= 1.0:
            raise ValueError(f"sigma must be in [0, 1], got {sigma}")
        self.probs = probs
        self.sigma, self.epochs, self.warmup_epochs = float(sigma), int(epochs), int(warmup_epochs)

    def sigma_at(self, epoch: int) -> float:
        return sigma_schedule(epoch, self.epochs, self.sigma, self.warmup_epochs)

    def probabilities(self) -> dict[str, dict[int, float]]:
        """layer → {bit: p} of a switching layer's draw."""
        return {
            n: {b: float(p) for b, p in zip(self.bits, row, strict=True)}
            for n, row in zip(self.layers, self.probs, strict=True)
        }

    def sample(self, base_bit: int, epoch: int, generator: torch.Generator | None = None) -> BitConfig:
        """One pass's config: each layer switches with probability σ_e to a draw from p_l, else keeps ``base_bit``.

        Always consumes the same amount of randomness (L uniforms + L draws), so the
        generator stream does not depend on σ_e.
        """
        if base_bit not in self.bits:
            raise ValueError(f"base bit {base_bit} is not a candidate; accepted: {self.bits}")
        s = self.sigma_at(epoch)
        u = torch.rand(len(self.layers), generator=generator, dtype=torch.float64)
        idx = torch.multinomial(self.probs, 1, replacement=True, generator=generator).squeeze(1)
        bits = torch.tensor(self.bits)[idx]
        chosen = torch.where(u < s, bits, torch.full_like(bits, int(base_bit))).tolist()
        return BitConfig({n: (b, b) for n, b in zip(self.layers, chosen, strict=True)})

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "layers": list(self.layers),
            "bits": list(self.bits),
            "probs": self.probs.clone(),
            "sigma": self.sigma,
            "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs,
        }

    def load_state_dict(self, d: Mapping) -> None:
        if list(d["layers"]) != self.layers or list(d["bits"]) != self.bits:
            raise ValueError("sampler state is for other layers/bits")
        self.probs = torch.as_tensor(d["probs"], dtype=torch.float64).clone()
        self.sigma, self.epochs, self.warmup_epochs = float(d["sigma"]), int(d["epochs"]), int(d["warmup_epochs"])


class HASBSampler(BitSampler):
    """Hessian-aware sampler (Alg. 1) from per-parameter traces ``{layer: t_l}`` of the searchable layers."""

    kind = "hasb"

    def __init__(self, layers: Sequence[str], bits: Sequence[int], traces: Mapping[str, float], **kw):
        missing = [n for n in layers if n not in traces]
        if missing:
            raise SensitivityError(f"no trace for layer(s) {missing[:3]}")
        self.traces = {n: float(traces[n]) for n in layers}
        super().__init__(layers, bits, hasb_probabilities([self.traces[n] for n in layers], bits), **kw)

    def sensitive(self) -> list[str]:
        m = sum(self.traces.values()) / len(self.traces)
        return [n for n, t in self.traces.items() if t >= m]


class UniformSampler(BitSampler):
    """Every layer draws uniformly over the candidate bits (the ablation baseline)."""

    kind = "uniform"

    def __init__(self, layers: Sequence[str], bits: Sequence[int], **kw):
        super().__init__(layers, bits, torch.full((len(layers), len(bits)), 1.0 / len(bits), dtype=torch.float64), **kw)


class TemperedSampler(BitSampler):
    """p_l(b) ∝ exp(−Ω̂_l(b)/τ) from ``omega[layer][bit]`` (see module docstring for the normalisation)."""

    kind = "tempered"

    def __init__(
        self, layers: Sequence[str], bits: Sequence[int], omega: Mapping[str, Mapping], tau: float = 1.0, **kw
    ):
        try:
            om = torch.tensor(
                [[float(omega[n][str(b)] if str(b) in omega[n] else omega[n][b]) for b in bits] for n in layers],
                dtype=torch.float64,
            )
        except (KeyError, TypeError) as e:
            raise SensitivityError(f"omega lacks an entry for a searchable layer/bit: {e}") from None
        self.tau = float(tau)
        super().__init__(layers, bits, tempered_probabilities(om, list(bits), tau), **kw)


def build_sampler(
    kind: str,
    layers: Sequence[str],
    bits: Sequence[int],
    *,
    sensitivity: dict | None = None,
    model_name: str | None = None,
    sigma: float = 0.5,
    epochs: int = 1,
    warmup_epochs: int = 0,
    tau: float = 1.0,
) -> BitSampler:
    """The sampler named ``kind`` (one of SAMPLERS); hasb/tempered need a loaded sensitivity dict."""
    bits = sorted({int(b) for b in bits}, reverse=True)
    kw = dict(sigma=sigma, epochs=epochs, warmup_epochs=warmup_epochs)
    if kind == "uniform":
        return UniformSampler(layers, bits, **kw)
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler {kind!r}; accepted: {', '.join(SAMPLERS)}")
    if sensitivity is None:
        raise SensitivityError(f"sampler {kind!r} needs a sensitivity file (--sensitivity PATH)")
    traces = traces_for_model(sensitivity, model_name, layers)
    if kind == "hasb":
        return HASBSampler(layers, bits, traces, **kw)
    omega = sensitivity.get("omega")
    if not isinstance(omega, dict):
        raise SensitivityError("sensitivity file has no 'omega' table (needed by the tempered sampler)")
    return TemperedSampler(layers, bits, omega, tau=tau, **kw)


__all__ = [
    "SAMPLERS",
    "SensitivityError",
    "sigma_schedule",
    "default_warmup",
    "hasb_probabilities",
    "tempered_probabilities",
    "BitSampler",
    "HASBSampler",
    "UniformSampler",
    "TemperedSampler",
    "load_sensitivity",
    "traces_for_model",
    "build_sampler",
]
