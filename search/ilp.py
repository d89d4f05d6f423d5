"""Exact per-layer bit allocation: a multiple-choice knapsack solved with ``scipy.optimize.milp`` (HiGHS).

Decision: one choice per *unit* (a searchable layer, or a group of tied layers
that must share their bits), a choice being a (w_bits, a_bits) pair: the model
spec's pair of each candidate bit (``QuantSpec.pair``: W = A, or W b / A at the
fixed activation width of a weight-only model), or every (w, a) when untied.  Binary variables ``x[u, c]`` with ``Σ_c x[u, c] = 1``.

Objective (minimised):

* ``"omega"`` — Σ_l Ω_l(b_l), the Hessian-weighted perturbation of the
  sensitivity analysis (``sensitivity["omega"]``).  In untied mode the
  activation bit is charged the layer's Ω at that bit as a proxy (activation
  perturbation is not measured), i.e. ½(Ω_l(w) + Ω_l(a)), so that a tied pair
  (b, b) costs exactly Ω_l(b).  When every choice shares one activation width
  (weight-only models, activations at fp or one fixed bit) only Ω_l(w) varies and
  it is the objective.
* ``"paper"`` — the reference code's *maximise* Σ_l t_l·b_l (t = trace per
  parameter), i.e. minimise −Σ t_l·b_l.

Constraints are linear in the choice: BitOPs, size in bytes, plain average bit
(``≤``, or ``=`` for the paper's equality variant).  Every coefficient comes
from :class:`hasb.CostModel` (evaluated on one-layer changes of a base config;
all three metrics are additive over layers), so the BitOPs formula lives only in
``hasb/cost.py``.

Two solvers, same answers (tested against brute-force enumeration):

* :func:`frontier` — the *complete* exact Pareto frontier of (metric, objective)
  for one metric by Nemhauser–Ullmann merging of non-dominated partial sums
  (milliseconds for ResNet-50: ~1000 points).  A budget sweep is then a lookup.
* :func:`solve` / :func:`k_best` — one MILP per query, any set of constraints;
  k-best alternatives by no-good cuts: after each solution S (one choice per
  unit, U units) the cut Σ_{(u,c)∈S} x[u,c] ≤ U − 1 excludes exactly S and
  nothing else.  Cuts are local to one budget's query, so nothing leaks between
  budgets (the reference code's bug).

HiGHS accepts rows violated within its own tolerance (~1e-6 of the row) and
scipy cannot tighten it, so a budget a hair below a config's cost used to come
back violated.  Every MILP answer is checked against ``Constraint.holds``
(relative 1e-9); a violating config gets a no-good cut and the query is
re-solved, which keeps the answer exactly optimal (the solver's set only ever
contains *more* than the truly feasible configs).  Limits are placed half-way
between two achievable values when a metric lives on a grid (plain average bits,
bytes), so such cuts are rare.  Frontier metric values within a relative 1e-9
are one value (summation-order round-off).

:func:`repair` lowers a config over the budget greedily (least Ω increase per
unit of excess removed) until it fits: Optuna's proposals over the budget are
repaired with it (``search.optuna_search``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from hasb.config import BitConfig, ConfigError, bit_str
from hasb.cost import Budget, BudgetError, CostModel
from hasb.errors import HasbError

Choice = tuple[int, int]
METRICS = ("bitops", "size_bytes", "plain_avg_bits")
BUDGET_METRIC = {
    "avg_bits": "bitops",
    "bitops": "bitops",
    "size": "size_bytes",
    "eff_bits": "size_bytes",  # effective bits are an affine function of the size (hasb.cost)
    "plain_avg": "plain_avg_bits",
}


class SearchError(HasbError):
    """The search cannot run on this input (empty search space, mismatched sensitivity, ...)."""


class InfeasibleError(BudgetError):
    """No config meets the constraints; the message states the feasible range of each constrained metric."""


# ----------------------------------------------------------------------------------------------------------
# the search space
@dataclass
class SearchSpace:
    """Arrays describing the knapsack.  Shapes: L searchable layers, C choices, U units (tied groups).

    Attributes:
        layers: searchable layer names, execution order [L].
        choices: candidate (w_bits, a_bits) pairs [C].
        units: each a list of layer indices that share one choice [U]; a partition of range(L).
        metrics: name -> per-layer additive cost [L, C] (BitOPs per sample, bytes, bits/L); metric of a
            config = offsets[name] + Σ_l metrics[name][l, c_l].
        offsets: constant part of each metric (fixed layers and the base config).
        objective: per-layer objective [L, C] (minimised).
        allowed: [L, C] bool, choices a layer may take.
        cost: the CostModel the metrics came from (for the average-bit equivalent), optional.
    """

    layers: list[str]
    choices: list[Choice]
    units: list[list[int]]
    metrics: dict[str, np.ndarray]
    offsets: dict[str, float]
    objective: np.ndarray
    allowed: np.ndarray
    cost: CostModel | None = None
    objective_name: str = "omega"

    def __post_init__(self) -> None:
        L, C = len(self.layers), len(self.choices)
        if L == 0 or C == 0:
            raise SearchError("empty search space: no searchable layer or no candidate bit")
        covered = sorted(i for u in self.units for i in u)
        if covered != list(range(L)):
            raise SearchError("tied groups must partition the searchable layers (each layer in exactly one unit)")
        for k, v in list(self.metrics.items()):
            self.metrics[k] = np.asarray(v, dtype=float).reshape(L, C)
        self.objective = np.asarray(self.objective, dtype=float).reshape(L, C)
        self.allowed = np.asarray(self.allowed, dtype=bool).reshape(L, C)
        if not self.unit_allowed().any(axis=1).all():
            bad = [self.layers[self.units[u][0]] for u in np.flatnonzero(~self.unit_allowed().any(axis=1))]
            raise SearchError(f"empty search space: no allowed choice for {bad[0]!r}")

    # unit-level views [U, C]
    def unit_allowed(self) -> np.ndarray:
        return np.stack([self.allowed[u].all(axis=0) for u in self.units])

    def unit_matrix(self, per_layer: np.ndarray) -> np.ndarray:
        return np.stack([per_layer[u].sum(axis=0) for u in self.units])

    @property
    def n_units(self) -> int:
        return len(self.units)

    def unit_names(self) -> list[str]:
        return ["+".join(self.layers[i] for i in u) for u in self.units]

    # converting solutions
    def layer_choice(self, unit_choice: Sequence[int]) -> np.ndarray:
        """Unit choices [U] -> per-layer choice indices [L]."""
        out = np.empty(len(self.layers), dtype=int)
        for u, c in zip(self.units, unit_choice, strict=True):
            out[u] = c
        return out

    def config(self, unit_choice: Sequence[int]) -> BitConfig:
        lc = self.layer_choice(unit_choice)
        return BitConfig({n: self.choices[c] for n, c in zip(self.layers, lc, strict=True)})

    def unit_choice_of(self, config: BitConfig | Mapping) -> np.ndarray:
        """Inverse of :meth:`config` (ConfigError if the config is not in the space)."""
        cfg = config if isinstance(config, BitConfig) else BitConfig(dict(config))
        idx = {ch: i for i, ch in enumerate(self.choices)}
        out = []
        for u in self.units:
            cs = {idx.get(tuple(cfg.layers.get(self.layers[i], (None, None)))) for i in u}
            if len(cs) != 1 or None in cs:
                raise ConfigError(f"config is not in the search space at {self.layers[u[0]]!r}")
            out.append(cs.pop())
        return np.array(out)

    def evaluate(self, unit_choice: Sequence[int]) -> dict[str, float]:
        """Objective and every metric of a unit choice vector."""
        lc = self.layer_choice(unit_choice)
        rows = np.arange(len(self.layers))
        out = {"objective": float(self.objective[rows, lc].sum())}
        for k, m in self.metrics.items():
            out[k] = float(self.offsets.get(k, 0.0) + m[rows, lc].sum())
        if self.cost is not None and "bitops" in out:
            out["avg_bit_equivalent"] = self.cost.bitops_to_avg_bits(out["bitops"])
        if self.cost is not None and "size_bytes" in out:
            out["effective_bits"] = self.cost.size_to_eff_bits(out["size_bytes"])
        return out

    def metric_range(self, metric: str) -> tuple[float, float]:
        """(smallest, largest) achievable value of one metric over the whole space (allowed choices only)."""
        m = np.where(self.unit_allowed(), self.unit_matrix(self.metrics[metric]), np.nan)
        off = self.offsets.get(metric, 0.0)
        return float(off + np.nanmin(m, axis=1).sum()), float(off + np.nanmax(m, axis=1).sum())


def _choices(bits: Sequence[int], tied_wa: bool, pair=None) -> list[Choice]:
    """Candidate (w, a) pairs, highest first: ``pair(b)`` of each bit when tied (default (b, b); a model's
    ``CostModel.pair`` / ``QuantSpec.pair``), every (w, a) combination when not."""
    bits = sorted({int(b) for b in bits}, reverse=True)
    if tied_wa:
        return [tuple(pair(b)) if pair is not None else (b, b) for b in bits]
    return [(w, a) for w in bits for a in bits]


def build_space(
    cost: CostModel,
    *,
    sensitivity: Mapping | None = None,
    objective: str | np.ndarray = "omega",
    tied_wa: bool = True,
    groups: Sequence[Sequence[str]] | None = None,
    bits: Sequence[int] | None = None,
) -> SearchSpace:
    """The search space of a model from its CostModel and (for the objective) its sensitivity dict.

    Args:
        cost: ``hasb.CostModel.from_model(model)``; its searchable layers are the decision layers.
        sensitivity: the analysis contract dict (``omega``, ``layers[].trace_per_param``); required unless
            ``objective`` is an explicit [L, C] array.
        objective: ``"omega"`` (minimise Σ Ω), ``"paper"`` (maximise Σ t·b) or an array [L, C].
        tied_wa: W = A per layer (default); False searches (w, a) pairs.
        groups: tied layer groups (lists of layer names forced to the same choice), e.g. from
            :func:`tied_groups`; layers not named form singleton units.
        bits: candidate bits (default ``cost.candidate_bits``).
    """
    layers = cost.names
    if not layers:
        raise SearchError("empty search space: the model has no searchable layer")
    if cost.weight_only and not tied_wa:
        raise SearchError(
            "untied (w, a) search needs switchable activations; this model is weight-only (activations fixed at "
            f"{bit_str(cost.pair(1)[1])}): search it tied"
        )
    choices = _choices(bits or cost.candidate_bits, tied_wa, cost.pair)
    metrics, offsets = linearize_costs(cost, layers, choices)
    if isinstance(objective, str):
        if sensitivity is None:
            raise SearchError(f"objective {objective!r} needs a sensitivity dict")
        obj = objective_matrix(sensitivity, layers, choices, kind=objective)
        name = objective
    else:
        obj = np.asarray(objective, dtype=float)
        name = "custom"
    units = make_units(layers, groups)
    return SearchSpace(
        layers=list(layers),
        choices=choices,
        units=units,
        metrics=metrics,
        offsets=offsets,
        objective=obj,
        allowed=np.ones((len(layers), len(choices)), bool),
        cost=cost,
        objective_name=name,
    )


def linearize_costs(
    cost: CostModel, layers: Sequence[str], choices: Sequence[Choice]
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-layer additive coefficients [L, C] and offsets of BitOPs, size and plain average bit.

    Computed only through CostModel: coef[l, c] = f(base with layer l at choice c) − f(base), offset = f(base),
    which is exact because every metric is a sum over layers.
    """
    base = BitConfig({n: choices[0] for n in layers})
    fns = {"bitops": cost.bitops, "size_bytes": cost.size_bytes, "plain_avg_bits": cost.plain_avg_bits}
    offsets = {k: float(f(base)) for k, f in fns.items()}
    mats = {k: np.zeros((len(layers), len(choices))) for k in fns}
    for l, name in enumerate(layers):
        for c, ch in enumerate(choices[1:], start=1):
            cfg = base.with_layers({name: ch})
            for k, f in fns.items():
                mats[k][l, c] = float(f(cfg)) - offsets[k]
    return mats, offsets


def objective_matrix(
    sensitivity: Mapping, layers: Sequence[str], choices: Sequence[Choice], kind: str = "omega"
) -> np.ndarray:
    """Objective coefficients [L, C] (minimised) from a sensitivity dict (see module docstring)."""
    if kind == "omega":
        omega = sensitivity.get("omega") or {}
        missing = [n for n in layers if n not in omega]
        if missing:
            raise SearchError(
                f"sensitivity has no omega for searchable layer {missing[0]!r} "
                f"({len(missing)} missing): was it computed for this model?"
            )
        out = np.zeros((len(layers), len(choices)))
        one_act = len({a for _, a in choices}) == 1  # weight-only: the activation term is the same everywhere
        for l, n in enumerate(layers):
            om = {str(k): float(v) for k, v in omega[n].items()}
            for c, (w, a) in enumerate(choices):
                a = w if one_act else a
                for b in {w, a}:
                    if str(b) not in om:
                        raise SearchError(
                            f"sensitivity omega of {n!r} has no entry for bit {b} "
                            f"(has {sorted(om)}); recompute it with bits including {b}"
                        )
                out[l, c] = 0.5 * (om[str(w)] + om[str(a)])
        return out
    if kind == "paper":
        tpp = {d["layer"]: float(d["trace_per_param"]) for d in sensitivity.get("layers", [])}
        missing = [n for n in layers if n not in tpp]
        if missing:
            raise SearchError(f"sensitivity has no trace for searchable layer {missing[0]!r}")
        one_act = len({a for _, a in choices}) == 1
        return np.array([[-tpp[n] * 0.5 * (w + (w if one_act else a)) for (w, a) in choices] for n in layers])
    raise SearchError(f"unknown objective {kind!r}; accepted: omega, paper")


def make_units(layers: Sequence[str], groups: Sequence[Sequence[str]] | None) -> list[list[int]]:
    """Partition layer indices into units: each given group (names) is one unit, other layers are singletons."""
    idx = {n: i for i, n in enumerate(layers)}
    seen: dict[int, int] = {}
    units: list[list[int]] = []
    for g in groups or ():
        members = []
        for n in g:
            if n not in idx:
                raise SearchError(f"tied group names {n!r}, which is not a searchable layer")
            members.append(idx[n])
        # merge groups sharing a layer (transitivity of "same bit")
        hit = {seen[i] for i in members if i in seen}
        if hit:
            keep = min(hit)
            for h in sorted(hit - {keep}, reverse=True):
                units[keep].extend(units[h])
                units[h] = []
            units[keep].extend(members)
            target = keep
        else:
            units.append(list(members))
            target = len(units) - 1
        for i in units[target]:
            seen[i] = target
    units = [sorted(set(u)) for u in units if u]
    grouped = {i for u in units for i in u}
    units += [[i] for i in range(len(layers)) if i not in grouped]
    units.sort(key=lambda u: u[0])
    return units


def tied_groups(model) -> list[list[str]]:
    """Residual shortcut 1×1 convs tied to their block's first conv, for hasb zoo ResNets.

    Detected by name and shape: ``<block>.shortcut`` (pre-activation ResNet-20) or ``<block>.downsample.0``
    (torchvision-style ResNet-18/50) paired with ``<block>.conv1`` when both are searchable convs reading the
    same input (same in_channels).  The reference code lets the shortcut follow its block's bit.
    """
    from hasb.quantize import searchable_layers

    names = set(searchable_layers(model))
    out = []
    for n in sorted(names):
        m = re.fullmatch(r"(.*)\.(shortcut|downsample\.0)", n)
        if not m:
            continue
        partner = f"{m.group(1)}.conv1"
        if partner not in names:
            continue
        a, b = model.get_submodule(n), model.get_submodule(partner)
        if getattr(a, "in_channels", None) == getattr(b, "in_channels", -1) and tuple(a.kernel_size) == (1, 1):
            out.append([partner, n])
    return out


# ----------------------------------------------------------------------------------------------------------
# constraints
@dataclass(frozen=True)
class Constraint:
    """metric ≤ limit (or = limit when ``equality``).  metric in METRICS; limit in BitOPs, bytes or bits."""

    metric: str
    limit: float
    equality: bool = False
    text: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise SearchError(f"unknown constraint metric {self.metric!r}; accepted: {', '.join(METRICS)}")
        if not math.isfinite(self.limit):
            raise BudgetError(f"constraint limit must be finite, got {self.limit}")

    def describe(self) -> str:
        op = "=" if self.equality else "≤"
        if self.metric == "bitops":
            return f"BitOPs {op} {self.limit / 1e9:.4g} G"
        if self.metric == "size_bytes":
            return f"size {op} {self.limit / 1e6:.4g} MB"
        return f"plain average bit {op} {self.limit:g}"

    def holds(self, value: float, tol: float = 1e-9) -> bool:
        scale = max(abs(self.limit), 1.0)
        if self.equality:
            return abs(value - self.limit) <= tol * scale
        return value <= self.limit + tol * scale


def constraint_from_budget(budget: Budget, equality: bool = False) -> Constraint:
    """hasb.Budget (from CostModel.parse_budget) -> Constraint; avg-bit budgets become their BitOPs limit."""
    metric = BUDGET_METRIC[budget.kind]
    limit = budget.value if budget.kind == "plain_avg" else budget.limit
    return Constraint(metric, float(limit), equality=equality and budget.kind == "plain_avg", text=budget.text)


def _as_constraints(cons) -> list[Constraint]:
    out = []
    for c in cons or ():
        out.append(constraint_from_budget(c) if isinstance(c, Budget) else c)
    return out


def infeasible_message(space: SearchSpace, cons: Sequence[Constraint]) -> str:
    parts = []
    for c in cons:
        lo, hi = space.metric_range(c.metric)
        if c.metric == "bitops":
            rng = f"BitOPs {lo / 1e9:.4g}–{hi / 1e9:.4g} G"
            if space.cost is not None:
                rng += (
                    f" (average-bit equivalent {space.cost.bitops_to_avg_bits(lo):.3g}–"
                    f"{space.cost.bitops_to_avg_bits(hi):.3g})"
                )
        elif c.metric == "size_bytes":
            rng = f"size {lo / 1e6:.4g}–{hi / 1e6:.4g} MB"
            if space.cost is not None:
                rng += f" (effective bits {space.cost.size_to_eff_bits(lo):.3g}–{space.cost.size_to_eff_bits(hi):.3g})"
        else:
            rng = f"plain average bit {lo:g}–{hi:g}"
        parts.append(rng)
    what = " and ".join(c.describe() for c in cons)
    return f"no bit config meets {what}; feasible range: {'; '.join(parts)}"


def repair(
    space: SearchSpace, unit_choice: Sequence[int] | np.ndarray, constraints: Iterable = ()
) -> np.ndarray | None:
    """The config lowered greedily until it meets every inequality budget; None when no change can get it there.

    Each step takes the one unit/choice change with the least increase of the objective (Σ Ω) per unit of budget
    excess it removes; a config within the budgets comes back unchanged.  The excess removed is summed over the
    constraints, each relative to its limit, and clipped at what is left to remove: for one budget that is the
    BitOPs (bytes, bits) saved, so a change that overshoots the budget is credited only the part that was needed.
    Equality budgets are not repaired (lowering cannot aim at an equality).  Every step lowers the summed excess,
    so it ends.  Costs and objective are the space's own per-unit arrays (``unit_matrix``), no formula of its own.

    Args:
        unit_choice: choice index per unit [U].
    Returns the repaired unit choices [U] (a new array), or None.
    """
    cons = [c for c in _as_constraints(constraints) if not c.equality]
    allowed = space.unit_allowed()
    obj = space.unit_matrix(space.objective)  # [U, C]
    mats = [space.unit_matrix(space.metrics[c.metric]) for c in cons]
    rows = np.arange(space.n_units)
    uc = np.array(unit_choice, dtype=int)
    while True:
        vals = [space.offsets.get(c.metric, 0.0) + float(m[rows, uc].sum()) for c, m in zip(cons, mats, strict=True)]
        if all(c.holds(v) for c, v in zip(cons, vals, strict=True)):
            return uc
        removed = np.zeros(allowed.shape)  # [U, C] excess removed by moving unit u to choice c
        for c, m, v in zip(cons, mats, vals, strict=True):
            after = v - m[rows, uc][:, None] + m
            removed += (max(v - c.limit, 0.0) - np.maximum(after - c.limit, 0.0)) / max(abs(c.limit), 1e-300)
        ok = allowed & (removed > 0)
        if not ok.any():
            return None
        ratio = np.where(ok, (obj - obj[rows, uc][:, None]) / np.where(ok, removed, 1.0), np.inf)
        u, ch = np.unravel_index(int(np.argmin(ratio)), ratio.shape)  # ties: the first unit, then the highest bit
        uc[u] = ch


# ----------------------------------------------------------------------------------------------------------
# MILP
@dataclass
class Solution:
    """One config: unit choices [U], its objective and metrics, and its rank among alternatives (0 = optimum)."""

    unit_choice: np.ndarray
    objective: float
    metrics: dict[str, float]
    rank: int = 0

    def config(self, space: SearchSpace) -> BitConfig:
        return space.config(self.unit_choice)

    def key(self) -> tuple[int, ...]:
        return tuple(int(c) for c in self.unit_choice)


def _solver_objective(obj: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Unit objective [U, C] shifted and scaled for HiGHS, same argmin over one-choice-per-unit configs.

    HiGHS stops at an absolute gap of 1e-6 (``mip_abs_gap``, not settable through scipy), which made
    Ω ~ 1e-5 objectives come back suboptimal.  Subtracting each unit's best allowed value (a constant per
    config) and scaling the summed per-unit spread to 1e6 makes that gap 1e-12 of the objective's range.
    """
    best = np.where(allowed, obj, np.inf).min(axis=1, keepdims=True)
    shifted = np.where(allowed, obj - best, 0.0)
    spread = shifted.max(axis=1).sum()
    return shifted * (1e6 / spread) if spread > 0 else shifted


class _Milp:
    """The fixed part of the MILP of one space (built once; rows appended per query)."""

    def __init__(self, space: SearchSpace):
        self.space = space
        U, C = space.n_units, len(space.choices)
        self.U, self.C = U, C
        self.c = _solver_objective(space.unit_matrix(space.objective), space.unit_allowed()).ravel()
        allowed = space.unit_allowed().ravel()
        self.ub = allowed.astype(float)  # disallowed choices fixed to 0
        rows = np.repeat(np.arange(U), C)
        self.one_hot = csr_matrix((np.ones(U * C), (rows, np.arange(U * C))), shape=(U, U * C))
        self.metric_rows = {k: space.unit_matrix(m).ravel() for k, m in space.metrics.items()}
        self.grids = {k: value_grid(r) for k, r in self.metric_rows.items()}

    def solve(
        self, cons: Sequence[Constraint], cuts: Sequence[tuple[int, ...]] = (), time_limit: float | None = None
    ) -> np.ndarray | None:
        """Unit choices [U] of the solver's optimum, None when HiGHS proves the problem infeasible.

        HiGHS accepts rows violated within its own feasibility tolerance (~1e-6 of the scaled row), so the
        answer can break a constraint by a relative ~1e-6; :func:`_best_feasible` checks and cuts.
        """
        A = [LinearConstraint(self.one_hot, 1, 1), *self._metric_rows(cons)]
        if cuts:
            A.append(self._cut_rows(cuts))
        opts = {"mip_rel_gap": 0.0, "disp": False}
        if time_limit:
            opts["time_limit"] = time_limit
        res = milp(self.c, integrality=np.ones_like(self.c), bounds=Bounds(0, self.ub), constraints=A, options=opts)
        if res.status == 2:  # proven infeasible
            return None
        if res.status != 0 or res.x is None:
            raise SearchError(f"MILP solver stopped without an optimum: {res.message}")
        return res.x.reshape(self.U, self.C).argmax(axis=1)

    def _metric_rows(self, cons: Sequence[Constraint]) -> list[LinearConstraint]:
        out = []
        for con in cons:
            row = self.metric_rows[con.metric]
            rhs = con.limit - self.space.offsets.get(con.metric, 0.0)
            # scale rows to O(1) so HiGHS' absolute feasibility tolerance is relative to the budget
            s = max(np.abs(row).max(), abs(rhs), 1e-300)
            q = self.grids[con.metric]
            if not con.equality and q > 1e-4 * s:
                # every config's value lies on offset + q·Z: a limit half-way between two grid points admits the
                # same configs and keeps HiGHS' ~1e-6·s tolerance from reaching the next point above (fewer cuts)
                tol = 1e-9 * max(abs(con.limit), 1.0)
                rhs = (math.floor((rhs + tol) / q) + 0.5) * q
            lb = rhs / s if con.equality else -np.inf
            # a hair of slack on ≤ so a config sitting exactly on the budget is not lost to rounding; checked after
            out.append(LinearConstraint(row[None, :] / s, lb, rhs / s + (0 if con.equality else 1e-12)))
        return out

    def _cut_rows(self, cuts: Sequence[tuple[int, ...]]) -> LinearConstraint:
        """No-good cuts: Σ_{(u,c)∈S} x[u,c] ≤ U − 1 for each excluded choice vector S (excludes exactly S)."""
        cols = np.arange(self.U)[None, :] * self.C + np.asarray(cuts, dtype=int)
        rows = np.repeat(np.arange(len(cuts)), self.U)
        M = csr_matrix((np.ones(cols.size), (rows, cols.ravel())), shape=(len(cuts), self.U * self.C))
        return LinearConstraint(M, -np.inf, self.U - 1)


def value_grid(values: np.ndarray, rel_tol: float = 1e-9) -> float:
    """The largest q such that every value is an integer multiple of q (float Euclid); 0.0 when there is none.

    Values within ``rel_tol`` · max|values| of a multiple count as multiples (round-off of e.g. bits / L).
    Used only to place a ≤ limit between two achievable values; any q returned is a true common divisor.
    """
    v = np.abs(np.asarray(values, dtype=float).ravel())
    tol = rel_tol * (v.max() if v.size else 0.0)
    g = 0.0
    for x in np.unique(v[v > tol]):
        a, b = max(g, x), min(g, x)
        while b > tol:
            r = math.fmod(a, b)
            a, b = b, (0.0 if r < tol or b - r < tol else r)
        g = a
    if g <= tol or not np.allclose(v / g, np.round(v / g), rtol=0, atol=1e-6):
        return 0.0
    return float(g)


def _best_feasible(
    mdl: _Milp, cons: Sequence[Constraint], cuts: list[tuple[int, ...]]
) -> tuple[np.ndarray, dict[str, float]] | None:
    """The optimum over configs that truly meet ``cons`` (``Constraint.holds``) and are not in ``cuts``.

    The solver's feasible set contains every truly feasible config (its tolerance only ever *adds* configs
    within ~1e-6 of a limit), so a returned config that truly holds is optimal.  One that does not is cut
    by a no-good cut (appended to ``cuts``, it is infeasible for every later query of this call) and the
    problem is re-solved; this ends because each round removes one config.  None: none is feasible.
    """
    while True:
        uc = mdl.solve(cons, cuts)
        if uc is None:
            return None
        ev = mdl.space.evaluate(uc)
        if all(c.holds(ev[c.metric]) for c in cons):
            return uc, ev
        cuts.append(tuple(int(c) for c in uc))


def solve(space: SearchSpace, constraints: Iterable = (), *, exclude: Sequence[Sequence[int]] = ()) -> Solution:
    """The optimal config under all constraints (Budgets or Constraints).  Raises InfeasibleError."""
    sols = k_best(space, constraints, 1, exclude=exclude)
    return sols[0]


def k_best(
    space: SearchSpace,
    constraints: Iterable = (),
    k: int = 1,
    *,
    exclude: Sequence[Sequence[int]] = (),
    _model: _Milp | None = None,
) -> list[Solution]:
    """The k best distinct configs (ordered by objective, ties broken arbitrarily) under all constraints.

    Each found solution adds one no-good cut that excludes exactly it; the cuts live only in this call.
    Returns fewer than k when the space runs out.  Raises InfeasibleError when none is feasible.
    """
    cons = _as_constraints(constraints)
    if k < 1:
        raise SearchError(f"k must be ≥ 1, got {k}")
    mdl = _model or _Milp(space)
    cuts: list[tuple[int, ...]] = [tuple(int(c) for c in e) for e in exclude]
    out: list[Solution] = []
    for r in range(k):
        found = _best_feasible(mdl, cons, cuts)
        if found is None:
            break
        sol = Solution(found[0], found[1]["objective"], found[1], rank=r)
        out.append(sol)
        cuts.append(sol.key())
    if not out:
        raise InfeasibleError(infeasible_message(space, cons))
    return out


# ----------------------------------------------------------------------------------------------------------
# exact frontier (Nemhauser–Ullmann) and budget sweeps
@dataclass
class Frontier:
    """All Pareto-optimal (metric, objective) points, metric ascending / objective descending.

    ``metric_values`` [P] and ``objective_values`` [P]; configs recovered with :meth:`unit_choice`.
    """

    space: SearchSpace
    metric: str
    metric_values: np.ndarray
    objective_values: np.ndarray
    _back: list[np.ndarray] = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return len(self.metric_values)

    def unit_choice(self, i: int) -> np.ndarray:
        U, C = self.space.n_units, len(self.space.choices)
        out = np.empty(U, dtype=int)
        j = int(i)
        for u in range(U - 1, -1, -1):
            flat = int(self._back[u][j])
            j, out[u] = divmod(flat, C)
        return out

    def best_index(self, limit: float) -> int | None:
        """Index of the best point with metric ≤ limit (None if none)."""
        tol = 1e-9 * max(abs(limit), 1.0)
        i = int(np.searchsorted(self.metric_values, limit + tol, side="right")) - 1
        return None if i < 0 else i

    def to_frame(self) -> pd.DataFrame:
        rows = [_row(self.space, self.unit_choice(i), source="ilp") for i in range(len(self))]
        return pd.DataFrame(rows)


def frontier(space: SearchSpace, metric: str = "bitops", max_points: int = 2_000_000) -> Frontier:
    """The complete exact Pareto frontier of (metric ↓, objective ↓) over the space.

    Merges units one at a time, keeping only non-dominated partial sums (the final set is exactly the
    frontier since any sub-sum of a Pareto-optimal total is Pareto-optimal for its units).  Cost is
    O(U · P · C log) with P the frontier size; ``max_points`` guards against pathological blow-up.
    """
    if metric not in space.metrics:
        raise SearchError(f"unknown metric {metric!r}; accepted: {', '.join(space.metrics)}")
    cost = space.unit_matrix(space.metrics[metric])
    obj = space.unit_matrix(space.objective)
    allowed = space.unit_allowed()
    scale = max(np.abs(obj).sum(axis=1).max(), 1e-300)
    Pc = np.array([space.offsets.get(metric, 0.0)])
    Po = np.zeros(1)
    back: list[np.ndarray] = []
    for u in range(space.n_units):
        cc = (Pc[:, None] + np.where(allowed[u], cost[u], np.inf)[None, :]).ravel()
        oo = (Po[:, None] + obj[u][None, :]).ravel()
        keep = pareto_keep(cc, oo, 1e-12 * scale)
        Pc, Po = cc[keep], oo[keep]
        back.append(keep)
        if len(Pc) > max_points:
            raise SearchError(f"frontier exceeds {max_points} points; use sweep(..., method='milp')")
    return Frontier(space, metric, Pc, Po, back)


def pareto_keep(cost: np.ndarray, obj: np.ndarray, obj_tol: float = 0.0, rel_tol: float = 1e-9) -> np.ndarray:
    """Indices of the non-dominated (cost ↓, obj ↓) points [P], cost ascending; non-finite costs dropped.

    Costs equal within round-off are one value: sorted costs closer than ``rel_tol`` · max(|c|, 1) to their
    neighbour form a group (so 3.9999999999999996 and 4.0 are equal); a group keeps only its lowest objective
    (its first such point), and keeps it only if that is below every cheaper group's by more than ``obj_tol``.
    """
    order = np.lexsort((obj, cost))
    order = order[np.isfinite(cost[order])]
    if order.size == 0:
        return order
    cs, os_ = cost[order], obj[order]
    new_group = np.concatenate([[True], np.diff(cs) > rel_tol * np.maximum(np.abs(cs[1:]), 1.0)])
    gid = np.cumsum(new_group) - 1
    gmin = np.minimum.reduceat(os_, np.flatnonzero(new_group))
    best_at = np.flatnonzero(os_ == gmin[gid])
    _, first = np.unique(gid[best_at], return_index=True)  # each group's first point at its minimum
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], gmin[:-1]]))
    return order[best_at[first][gmin < best_before - obj_tol]]


def _row(space: SearchSpace, uc: np.ndarray, **extra) -> dict:
    ev = space.evaluate(uc)
    cfg = space.config(uc)
    d = {**extra, **ev, "config": cfg.short(), "digest": cfg.digest(), "unit_choice": tuple(int(c) for c in uc)}
    if "bitops" in d:
        d["gbitops"] = d["bitops"] / 1e9
    return d


def sweep(
    space: SearchSpace,
    budgets: Sequence[float],
    metric: str = "bitops",
    *,
    k: int = 1,
    constraints: Iterable = (),
    method: str = "auto",
    dedupe: bool = True,
) -> pd.DataFrame:
    """Optimal (and k-best) configs for each budget ``metric ≤ b`` (plus any fixed ``constraints``).

    ``method``: ``"frontier"`` (exact frontier lookup; k = 1 and no extra constraints), ``"milp"`` (one MILP per
    budget; reuses the previous optimum when still feasible, since an optimum of a looser problem that is
    feasible for a tighter one is optimal there), or ``"auto"``.

    Returns a DataFrame: budget, rank, objective, bitops, gbitops, size_bytes, plain_avg_bits,
    avg_bit_equivalent, config (short string), digest, unit_choice.  Infeasible budgets give no row.
    ``dedupe`` keeps one row per distinct config (its loosest budget's row).
    """
    cons = _as_constraints(constraints)
    budgets = np.asarray(sorted({float(b) for b in budgets}, reverse=True))
    if method == "auto":
        method = "frontier" if (k == 1 and not cons) else "milp"
    rows: list[dict] = []
    if method == "frontier":
        if k != 1 or cons:
            raise SearchError("method='frontier' supports k=1 without extra constraints")
        fr = frontier(space, metric)
        for b in budgets:
            i = fr.best_index(b)
            if i is not None:
                rows.append(_row(space, fr.unit_choice(i), budget=float(b), rank=0, source="ilp"))
    elif method == "milp":
        mdl = _Milp(space)
        prev: Solution | None = None
        for b in budgets:
            con = Constraint(metric, float(b))
            if k == 1 and prev is not None and con.holds(prev.metrics[metric]):
                sols = [prev]
            else:
                try:
                    sols = k_best(space, [*cons, con], k, _model=mdl)
                except InfeasibleError:
                    continue
                prev = sols[0]
            rows += [_row(space, s.unit_choice, budget=float(b), rank=s.rank, source="ilp") for s in sols]
    else:
        raise SearchError(f"unknown method {method!r}; accepted: auto, frontier, milp")
    df = pd.DataFrame(rows)
    if dedupe and len(df):
        df = df.drop_duplicates("digest", keep="first").reset_index(drop=True)
    return df


def budget_grid(space: SearchSpace, n: int = 100, metric: str = "bitops") -> np.ndarray:
    """``n`` budgets spanning the feasible range of ``metric`` (for BitOPs: evenly in average-bit equivalent)."""
    lo, hi = space.metric_range(metric)
    if metric == "bitops" and space.cost is not None:
        a_lo, a_hi = space.cost.bitops_to_avg_bits(lo), space.cost.bitops_to_avg_bits(hi)
        return np.array([space.cost.uniform_bitops(a) for a in np.linspace(a_lo, a_hi, n)]).clip(lo, hi)
    return np.linspace(lo, hi, n)


def uniform_choices(space: SearchSpace) -> list[tuple[int, np.ndarray]]:
    """(weight bit, unit choice) of every uniform config in the space: every layer at the pair of one bit
    (W = A, or W b / A fixed for a weight-only model; ``hasb.quantize.uniform_config``)."""
    pair = space.cost.pair if space.cost is not None else (lambda b: (b, b))
    out = []
    for c, (w, a) in enumerate(space.choices):
        if (w, a) == tuple(pair(w)) and space.unit_allowed()[:, c].all():
            out.append((w, np.full(space.n_units, c)))
    return out


__all__ = [
    "SearchSpace",
    "build_space",
    "linearize_costs",
    "objective_matrix",
    "make_units",
    "tied_groups",
    "Constraint",
    "constraint_from_budget",
    "Solution",
    "solve",
    "k_best",
    "Frontier",
    "frontier",
    "sweep",
    "budget_grid",
    "uniform_choices",
    "pareto_keep",
    "value_grid",
    "SearchError",
    "InfeasibleError",
    "METRICS",
]
