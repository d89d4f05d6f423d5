"""The one cost model: MACs, params, BitOPs, size, average-bit equivalent, budgets.

Definitions (the only place they live):

* MACs of a layer: multiply-accumulates per input sample, measured by tracing
  one forward pass.  Conv2d: out_elems · (C_in/groups) · k_h · k_w; Linear:
  out_elems · in_features (out_elems counts every token of a sequence).
  Activation×activation products (attention's QKᵀ, AV) are not Conv/Linear and
  are not counted: they are not quantized by hasb.
* BitOPs of a layer = MACs · b_w · b_a, with ``fp`` counted as 32 bits.  A
  model's BitOPs sum over all Conv/Linear layers, fixed ones at their precision.
* Size in bytes = Σ weight_params · b_w / 8 + bias_params · 4 (biases stay fp32).
* Average-bit equivalent of a config: the uniform bit b for which the network
  with every searchable layer at the spec's pair of b (W b / A b; weight-only
  models: W b / A at their fixed activation width) has the config's BitOPs (fixed
  layers at their fixed precision): b = sqrt((BitOPs − BitOPs_fixed) / Σ_searchable
  MACs), or (BitOPs − BitOPs_fixed) / (Σ_searchable MACs · b_a) in weight-only mode.
* Effective bits of a config (the "bits per weight" of llama.cpp's
  ``--target-bpw`` and ModelOpt's ``effective_bits``): the parameter-weighted mean
  weight bit over the SEARCHABLE layers, Σ_l n_l·b_w,l / Σ_l n_l (weights only,
  biases and fixed layers excluded: they are the same in every config).  It is an
  affine function of the size: size = size_other + eff·Σ_l n_l / 8, where
  size_other (fixed layers, all biases) is constant, so an effective-bits budget
  is exactly the size budget ``uniform_size(eff)``.
* Plain average bit: the reference code's unweighted mean of per-layer weight
  bits over searchable layers (kept for fidelity; it ignores layer size).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .config import Bit, BitConfig, ConfigError
from .errors import HasbError
from .quantize import DEFAULT_BITS, QuantSpec, _example

FP_BITS = 32
BUDGET_KINDS = ("avg_bits", "bitops", "size", "eff_bits", "plain_avg")
KIND_WORDS = {
    "avg_bits": "average-bit",
    "bitops": "BitOPs",
    "size": "size",
    "eff_bits": "effective-bits",
    "plain_avg": "plain average bit",
}


def eff_bits(b: Bit) -> int:
    """Bits a precision costs: fp counts 32."""
    return FP_BITS if b is None else int(b)


def _bits(b: Bit | float) -> float:
    """Bits a precision costs, fractional values kept (uniform equivalents): fp counts 32."""
    return float(FP_BITS) if b is None else float(b)


def layer_bitops(macs: float, w_bits: Bit, a_bits: Bit) -> float:
    """BitOPs = MACs · b_w · b_a (fp = 32 bits)."""
    return macs * eff_bits(w_bits) * eff_bits(a_bits)


class BudgetError(HasbError):
    """A budget that cannot be parsed or cannot be met."""


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # "conv" or "linear"
    macs: int  # per sample
    weight_params: int
    bias_params: int
    searchable: bool
    fixed_bit: Bit = None


@dataclass(frozen=True)
class Budget:
    """A parsed budget. ``kind`` in BUDGET_KINDS; ``limit`` in BitOPs (avg_bits, bitops), bytes (size, eff_bits)
    or bits (plain_avg)."""

    kind: str
    value: float
    limit: float
    text: str

    def describe(self) -> str:
        if self.kind == "avg_bits":
            return f"average-bit equivalent ≤ {self.value:g} (≤ {self.limit / 1e9:.4g} GBitOPs)"
        if self.kind == "bitops":
            return f"BitOPs ≤ {self.limit / 1e9:.4g} G"
        if self.kind == "size":
            return f"size ≤ {self.limit / 1e6:.4g} MB"
        if self.kind == "eff_bits":
            return f"effective bits ≤ {self.value:g} (≤ {self.limit / 1e6:.4g} MB)"
        return f"plain average bit ≤ {self.value:g}"


class CostModel:
    """Per-layer costs of a (quantized) model.  ``layers`` is in execution order.

    ``spec``: the model's QuantSpec (set by :meth:`from_model`); its ``pair`` says which (w, a) bits a searchable
    layer runs at when its weights take bit b — (b, b), or (b, fixed activation width) for weight-only models.
    None = (b, b).
    """

    def __init__(self, layers: Sequence[LayerCost], candidate_bits: Sequence[int], spec: QuantSpec | None = None):
        self.layers = list(layers)
        self.spec = spec
        self.candidate_bits = tuple(sorted(set(candidate_bits), reverse=True))
        self._by_name = {l.name: l for l in self.layers}
        if not self.searchable:
            raise ConfigError("empty search space: the model has no searchable layer")

    # -- construction ------------------------------------------------------------
    @classmethod
    def from_model(
        cls, model: nn.Module, example_input: torch.Tensor | None = None, candidate_bits: Sequence[int] | None = None
    ) -> CostModel:
        """Trace one forward pass (batch size taken from ``example_input``) and record every Conv2d/Linear.

        MACs per sample are summed over every call of a module (a weight-shared module applied twice, or at two
        resolutions, does the work of each call); its parameters and size are counted once.
        """
        spec = getattr(model, "hasb_spec", None)
        x = _example(model, example_input)
        batch = x.shape[0]
        records: dict[str, LayerCost] = {}
        hooks = []
        for name, m in model.named_modules():
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                continue

            def hook(mod, inp, out, name=name):
                per_out = (
                    (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
                    if isinstance(mod, nn.Conv2d)
                    else mod.in_features
                )
                macs = out.numel() // batch * per_out
                if name in records:  # a further call of the same module: its work adds up
                    records[name] = dataclasses.replace(records[name], macs=records[name].macs + int(macs))
                    return
                fixed = spec is not None and name in spec.fixed
                records[name] = LayerCost(
                    name=name,
                    kind="conv" if isinstance(mod, nn.Conv2d) else "linear",
                    macs=int(macs),
                    weight_params=mod.weight.numel(),
                    bias_params=0 if mod.bias is None else mod.bias.numel(),
                    searchable=not fixed,
                    fixed_bit=spec.fixed_bit if fixed else None,
                )

            hooks.append(m.register_forward_hook(hook))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in hooks:
                h.remove()
            model.train(was)
        bits = candidate_bits or (spec.bits if spec is not None else DEFAULT_BITS)
        return cls(list(records.values()), bits, spec)

    # -- views ---------------------------------------------------------------------
    def pair(self, bit):
        """(weight bits, activation bits) of a searchable layer whose weights take ``bit`` (see the class doc)."""
        return self.spec.pair(bit) if self.spec is not None else (bit, bit)

    @property
    def weight_only(self) -> bool:
        return self.spec is not None and self.spec.weight_only

    @property
    def searchable(self) -> list[LayerCost]:
        return [l for l in self.layers if l.searchable]

    @property
    def names(self) -> list[str]:
        return [l.name for l in self.searchable]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([l.__dict__ for l in self.layers])

    def macs_vector(self) -> np.ndarray:
        return np.array([l.macs for l in self.searchable], dtype=float)

    def fixed_bitops(self) -> float:
        return float(sum(layer_bitops(l.macs, l.fixed_bit, l.fixed_bit) for l in self.layers if not l.searchable))

    def fixed_bytes(self) -> float:
        return float(
            sum(
                l.weight_params * eff_bits(l.fixed_bit) / 8 + l.bias_params * 4 for l in self.layers if not l.searchable
            )
        )

    def total_macs(self) -> int:
        return sum(l.macs for l in self.layers)

    # -- costs of a config -----------------------------------------------------------
    def _pairs(self, config: BitConfig) -> list[tuple[LayerCost, Bit, Bit]]:
        out = []
        for l in self.searchable:
            if l.name not in config.layers:
                raise ConfigError(f"config misses searchable layer {l.name!r}")
            w, a = config.layers[l.name]
            out.append((l, w, a))
        return out

    def bitops(self, config: BitConfig) -> float:
        """Total BitOPs per sample of ``config`` (fixed layers at their precision)."""
        return self.fixed_bitops() + sum(layer_bitops(l.macs, w, a) for l, w, a in self._pairs(config))

    def size_bytes(self, config: BitConfig) -> float:
        return self.fixed_bytes() + sum(
            l.weight_params * eff_bits(w) / 8 + l.bias_params * 4 for l, w, _ in self._pairs(config)
        )

    def uniform_bitops(self, bit: float) -> float:
        """BitOPs with every searchable layer at the pair of weight bit ``bit`` (may be fractional)."""
        w, a = self.pair(bit)
        return self.fixed_bitops() + float(self.macs_vector().sum()) * _bits(w) * _bits(a)

    def uniform_size(self, bit: float) -> float:
        return self.fixed_bytes() + sum(l.weight_params * bit / 8 + l.bias_params * 4 for l in self.searchable)

    def avg_bit_equivalent(self, config: BitConfig) -> float:
        """The uniform bit whose BitOPs equal the config's (see module docstring)."""
        return self.bitops_to_avg_bits(self.bitops(config))

    def bitops_to_avg_bits(self, bitops: float) -> float:
        """Inverse of :meth:`uniform_bitops`: the (fractional) uniform weight bit with these BitOPs."""
        per_bit2 = max(bitops - self.fixed_bitops(), 0.0) / float(self.macs_vector().sum())
        if self.weight_only:  # BitOPs linear in the weight bit: the activation width is fixed
            return per_bit2 / _bits(self.pair(1)[1])
        return math.sqrt(per_bit2)

    def searchable_params(self) -> int:
        """Weights of the searchable layers (biases excluded): the denominator of the effective bits."""
        return sum(l.weight_params for l in self.searchable)

    def effective_bits(self, config: BitConfig) -> float:
        """Parameter-weighted mean weight bit over the searchable layers (see module docstring)."""
        return sum(l.weight_params * eff_bits(w) for l, w, _ in self._pairs(config)) / self.searchable_params()

    def size_to_eff_bits(self, size_bytes: float) -> float:
        """Inverse of :meth:`uniform_size`: the effective bits of a config of this size."""
        return (size_bytes - self.uniform_size(0.0)) * 8 / self.searchable_params()

    def plain_avg_bits(self, config: BitConfig) -> float:
        """Unweighted mean weight bit over searchable layers (the reference code's budget)."""
        return float(np.mean([eff_bits(w) for _, w, _ in self._pairs(config)]))

    def summary(self, config: BitConfig) -> dict:
        return {
            "bitops": self.bitops(config),
            "gbitops": self.bitops(config) / 1e9,
            "size_bytes": self.size_bytes(config),
            "avg_bit_equivalent": self.avg_bit_equivalent(config),
            "effective_bits": self.effective_bits(config),
            "plain_avg_bits": self.plain_avg_bits(config),
        }

    # -- budgets ---------------------------------------------------------------------
    def feasible_range(self, kind: str) -> tuple[float, float]:
        """(smallest, largest) value of a budget of ``kind`` reachable with the candidate bits."""
        lo, hi = min(self.candidate_bits), max(self.candidate_bits)
        if kind in ("avg_bits", "plain_avg", "eff_bits"):
            return float(lo), float(hi)
        if kind == "bitops":
            return self.uniform_bitops(lo), self.uniform_bitops(hi)
        if kind == "size":
            return self.uniform_size(lo), self.uniform_size(hi)
        raise BudgetError(f"unknown budget kind {kind!r}")

    def parse_budget(self, text, kind: str | None = None) -> Budget:
        """Parse ``3.5`` (average-bit equivalent), ``25.1GBOPs`` / ``2.51e10`` (BitOPs), ``4.2MB`` (size),
        ``3.5ebits`` (effective bits).

        ``kind`` forces an interpretation (one of BUDGET_KINDS).
        Raises BudgetError (one line, with the feasible range) for negative, NaN,
        non-numeric or infeasible budgets.  A budget above the largest config is accepted.
        """
        b = parse_budget_text(text, kind)
        lo, hi = self.feasible_range(b.kind)
        if b.kind in ("avg_bits", "eff_bits"):
            lim = self.uniform_bitops(b.value) if b.kind == "avg_bits" else self.uniform_size(b.value)
            b = Budget(b.kind, b.value, lim, b.text)
            lo_v, hi_v = lo, hi
            val = b.value
        else:
            val = b.limit if b.kind in ("bitops", "size") else b.value
            lo_v, hi_v = lo, hi
        if val < lo_v * (1 - 1e-12):
            raise BudgetError(f"budget {b.text!r} is infeasible: {_fmt_range(b.kind, lo_v, hi_v)}")
        return b

    def within(self, config: BitConfig, budget: Budget, tol: float = 1e-9) -> bool:
        if budget.kind in ("avg_bits", "bitops"):
            return self.bitops(config) <= budget.limit * (1 + tol)
        if budget.kind in ("size", "eff_bits"):
            return self.size_bytes(config) <= budget.limit * (1 + tol)
        return self.plain_avg_bits(config) <= budget.value + tol


def _fmt_range(kind: str, lo: float, hi: float) -> str:
    if kind == "bitops":
        return f"feasible BitOPs range is {lo / 1e9:.4g}–{hi / 1e9:.4g} GBOPs ({lo:.4g}–{hi:.4g})"
    if kind == "size":
        return f"feasible size range is {lo / 1e6:.4g}–{hi / 1e6:.4g} MB"
    if kind == "eff_bits":
        return f"feasible effective bits range is {lo:g}–{hi:g}"
    return f"feasible average bits range is {lo:g}–{hi:g}"


_UNITS_BITOPS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_UNITS_SIZE = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_NUM = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|[+-]?nan|[+-]?inf)"
_UNITS_EFF_BITS = ("ebits", "ebit")
AVG_BITS_MAX = 32.0  # a bare number at most this is an average bit; above it, BitOPs
BUDGET_ACCEPTED = (
    "accepted: an average bit like 3.5, BitOPs like 25.1GBOPs or 2.51e10, a size like 4.2MB, "
    "effective bits (parameter-weighted mean weight bit) like 3.5ebits"
)


def parse_budget_text(text, kind: str | None = None) -> Budget:
    """Syntax only (no model): returns a Budget whose ``limit`` is filled for bitops/size."""
    if kind is not None and kind not in BUDGET_KINDS:
        raise BudgetError(f"unknown budget kind {kind!r}; accepted: {', '.join(BUDGET_KINDS)}")
    s = str(text).strip()
    m = re.fullmatch(_NUM + r"\s*([A-Za-z]*)", s)
    accepted = BUDGET_ACCEPTED
    if not m:
        raise BudgetError(f"budget {s!r} is not a number; {accepted}")
    val = float(m.group(1))
    unit = m.group(2).lower()
    if math.isnan(val) or math.isinf(val):
        raise BudgetError(f"budget {s!r} is not a finite number; {accepted}")
    if val <= 0:
        raise BudgetError(f"budget {s!r} must be positive; {accepted}")
    if unit in _UNITS_SIZE or kind == "size":
        if kind not in (None, "size"):
            raise BudgetError(f"budget {s!r} is a size but a {KIND_WORDS[kind]} budget was expected")
        mult = _UNITS_SIZE.get(unit, 1) if unit else 1e6
        return Budget("size", val, val * mult, s)
    if unit in _UNITS_EFF_BITS or kind == "eff_bits":
        if kind not in (None, "eff_bits") or (unit and unit not in _UNITS_EFF_BITS):
            raise BudgetError(
                f"budget {s!r} is not in effective bits (like 3.5ebits); a {KIND_WORDS[kind or 'eff_bits']} "
                "budget was expected"
            )
        return Budget("eff_bits", val, float("nan"), s)
    um = re.fullmatch(r"([kmgt]?)(?:bops|bitops|bop)", unit)
    if um:
        if kind not in (None, "bitops"):
            raise BudgetError(f"budget {s!r} is in BitOPs but a {KIND_WORDS[kind]} budget was expected")
        return Budget("bitops", val, val * _UNITS_BITOPS[um.group(1)], s)
    if unit:
        raise BudgetError(f"budget {s!r} has unknown unit {m.group(2)!r}; {accepted}")
    if kind == "plain_avg":
        return Budget("plain_avg", val, val, s)
    if kind == "bitops" or (kind is None and val > AVG_BITS_MAX):
        return Budget("bitops", val, val, s)
    return Budget("avg_bits", val, float("nan"), s)
