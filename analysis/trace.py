"""Per-layer Hessian traces with standard errors (Hutchinson, layer-restricted, Hutch++ deflation).

All estimators target t_l = Tr(H_ll), the trace of the diagonal block of the
Hessian belonging to parameter block l, and report for every layer the running
mean, its standard error and the HVPs spent on it.  They stop when every
layer satisfies

    n_l ≥ min_samples   and   SE_l ≤ rtol · max(|t̂_l|, floor · max_m |t̂_m|)

or when ``max_hvp`` HVPs have been spent.  ``floor`` (default 0.01) keeps
layers whose trace is ≈ 0 (< 1% of the largest) from consuming the budget:
their *relative* error is meaningless; set ``floor=0`` for a strict rule.

Estimators (Rademacher probes throughout; z denotes one sample):

* ``"full"`` — Girard–Hutchinson with full-model probes v:
  z_l = v_lᵀ(Hv)_l = v_lᵀH_ll v_l + Σ_{m≠l} v_lᵀH_lm v_m.  Unbiased, one HVP
  serves all layers, but the variance carries every off-diagonal block:
  Var z_l = 2(‖H_l·‖_F² − Σ_i H_ii²) over the whole row block.
* ``"layer"`` — layer-restricted Hutchinson: probes supported on one block,
  z_l = v_lᵀH_ll v_l, Var = 2(‖H_ll‖_F² − Σ_i (H_ll)_ii²).  One HVP per layer
  per sample, but all layers' probes go through one graph per batch
  (:meth:`HessianOperator.block_hvp`) and only unconverged layers get more.
* ``"hutchpp"`` — Hutch++-style deflation per block (Meyer et al. 2021): a
  sketch Y = H_ll S (S: s Rademacher columns), Q = orth(Y), the exact part
  tr(QᵀH_ll Q) (s more HVPs), and layer-restricted Hutchinson on the residual
  P H_ll P, P = I − QQᵀ (z = hᵀH_ll h with h = P g).  Unbiased for *any*
  symmetric block, because tr(QᵀAQ) + E[hᵀAh | Q] = tr(A) for every Q: the
  PSD assumption of Hutch++ only enters its error guarantee, and range(H S)
  captures the large-|λ| directions of both signs.  The reported SE is the
  residual Hutchinson SE, which is the full conditional SE given Q.

``"layer"`` and ``"hutchpp"`` switch a layer to its exact trace (n_l unit
probes, SE = 0) when the projected number of samples still needed exceeds n_l:
small layers (first conv, classifier) are then cheaper exactly than randomly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .hvp import HessianOperator, _all_reduce_, _dist_on, composite, rademacher

ESTIMATORS = ("hutchpp", "layer", "full")
# Chosen by measurement (benchmarks/RESULTS.md, ResNet-20 on Fashion-MNIST, rtol 5%): layer-restricted
# Hutchinson projected 3,130 HVPs, full-model probes 8,217 and Hutch++ deflation 271,312.  The projected
# residual probes h = P g lose Rademacher's zero-diagonal variance, and conv blocks are diagonal-heavy.
DEFAULT_ESTIMATOR = "layer"


class RunningStats:
    """Welford running mean / variance of one scalar stream per layer (float64)."""

    def __init__(self, n_layers: int):
        self.n = np.zeros(n_layers, dtype=np.int64)
        self.mean = np.zeros(n_layers)
        self.m2 = np.zeros(n_layers)

    def update(self, l: int, samples: np.ndarray) -> None:
        for z in np.asarray(samples, dtype=np.float64).ravel():
            self.n[l] += 1
            d = z - self.mean[l]
            self.mean[l] += d / self.n[l]
            self.m2[l] += d * (z - self.mean[l])

    def stderr(self) -> np.ndarray:
        """SE of the mean, sqrt(s²/n) with the unbiased s²; inf below 2 samples."""
        with np.errstate(divide="ignore", invalid="ignore"):
            var = np.where(self.n > 1, self.m2 / np.maximum(self.n - 1, 1), np.inf)
            return np.sqrt(var / np.maximum(self.n, 1))


@dataclass
class TraceResult:
    """Per-layer trace estimates.  Arrays have one entry per block, in ``names`` order."""

    names: list[str]
    n_params: list[int]
    trace: np.ndarray  # t̂_l ≈ Tr(H_ll)
    stderr: np.ndarray  # SE of t̂_l (0 for exact layers)
    n_hvp: np.ndarray  # HVP columns spent on layer l (full: shared probes)
    converged: np.ndarray  # bool: stopping rule met
    exact: np.ndarray  # bool: trace computed exactly
    estimator: str
    total_hvp: int
    settings: dict = field(default_factory=dict)

    @property
    def trace_per_param(self) -> np.ndarray:
        return self.trace / np.asarray(self.n_params, dtype=np.float64)

    def to_frame(self) -> pd.DataFrame:
        """Columns: layer, n_params, trace, trace_per_param, stderr, n_hvp, converged, exact."""
        return pd.DataFrame(
            {
                "layer": self.names,
                "n_params": self.n_params,
                "trace": self.trace,
                "trace_per_param": self.trace_per_param,
                "stderr": self.stderr,
                "n_hvp": self.n_hvp,
                "converged": self.converged,
                "exact": self.exact,
            }
        )

    def to_json(self) -> dict:
        rows = self.to_frame().to_dict(orient="records")
        for r in rows:
            for k, v in r.items():
                r[k] = v.item() if hasattr(v, "item") else v
        return {
            "estimator": self.estimator,
            "total_hvp": int(self.total_hvp),
            "settings": self.settings,
            "layers": rows,
        }

    def to_json_str(self) -> str:
        return json.dumps(self.to_json(), indent=2)


def _converged(st: RunningStats, exact: np.ndarray, rtol: float, floor: float, min_samples: int) -> np.ndarray:
    scale = np.maximum(np.abs(st.mean), floor * np.max(np.abs(st.mean)))
    ok = (st.n >= min_samples) & (st.stderr() <= rtol * scale)
    return ok | exact


def _needed(st: RunningStats, rtol: float, floor: float) -> np.ndarray:
    """Projected total samples per layer for SE ≤ rtol·scale: (s / (rtol·scale))²."""
    scale = np.maximum(np.abs(st.mean), floor * np.max(np.abs(st.mean)))
    sd = st.stderr() * np.sqrt(np.maximum(st.n, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        need = np.where(scale > 0, (sd / (rtol * scale)) ** 2, np.inf)
    return np.nan_to_num(need, nan=np.inf, posinf=np.inf)


def _dot(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Row-wise inner products of [k, ...] tensors → numpy [k] (float64)."""
    return (a.reshape(a.shape[0], -1).double() * b.reshape(b.shape[0], -1).double()).sum(1).cpu().numpy()


def _exact_block_trace(op: HessianOperator, l: int, chunk: int = 256) -> float:
    """Tr(H_ll) from n_l unit-vector HVPs (Σ_i e_iᵀH_ll e_i)."""
    n, total = op.numels[l], 0.0
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        E = torch.zeros(k, n, dtype=op.dtype, device=op.device)
        E[torch.arange(k), torch.arange(s, s + k)] = 1
        HE = op.block_hvp({l: E.reshape(k, *op.shapes[l])})[l]
        total += float(HE.reshape(k, -1)[torch.arange(k), torch.arange(s, s + k)].double().sum())
    return total


def _result(op, st, exact, conv, n_hvp, est, start, settings) -> TraceResult:
    se = st.stderr()
    se = np.where(exact, 0.0, se)
    return TraceResult(
        names=list(op.names),
        n_params=list(op.numels),
        trace=st.mean.copy(),
        stderr=se,
        n_hvp=n_hvp.copy(),
        converged=conv.copy(),
        exact=exact.copy(),
        estimator=est,
        total_hvp=op.n_hvp - start,
        settings=settings,
    )


def hutchinson_full(
    op: HessianOperator,
    *,
    rtol: float = 0.05,
    max_hvp: int = 1000,
    block: int = 8,
    seed: int = 0,
    floor: float = 0.01,
    min_samples: int = 8,
    progress=None,
) -> TraceResult:
    """Girard–Hutchinson with full-model Rademacher probes; per-layer samples v_lᵀ(Hv)_l."""
    gen = torch.Generator().manual_seed(seed)
    L, start = len(op.names), op.n_hvp
    st, exact = RunningStats(L), np.zeros(L, bool)
    n_hvp = np.zeros(L, np.int64)
    conv = exact.copy()
    while op.n_hvp - start < max_hvp:
        k = min(block, max_hvp - (op.n_hvp - start))
        V = [rademacher((k, *s), gen, op.dtype, op.device) for s in op.shapes]
        HV = op.hvp(V)
        for l in range(L):
            st.update(l, _dot(V[l], HV[l]))
        n_hvp += k
        _tick(progress, k)
        conv = _converged(st, exact, rtol, floor, min_samples)
        if conv.all():
            break
    return _result(
        op,
        st,
        exact,
        conv,
        n_hvp,
        "full",
        start,
        dict(rtol=rtol, max_hvp=max_hvp, block=block, seed=seed, floor=floor, min_samples=min_samples),
    )


def _adaptive_restricted(
    op: HessianOperator,
    st: RunningStats,
    exact: np.ndarray,
    n_hvp: np.ndarray,
    draw,
    *,
    rtol,
    max_hvp,
    block,
    floor,
    min_samples,
    start,
    exact_switch,
    progress,
):
    """Shared loop of the restricted estimators: each round, every unconverged layer gets ``block`` samples.

    ``draw(l, k) -> (probes [k, *shape_l], finish)`` builds layer l's probes; ``finish(HV)`` maps
    H_ll·probes to k samples.  A layer whose projected remaining need exceeds n_l is computed exactly.
    """
    conv = _converged(st, exact, rtol, floor, min_samples)
    while not conv.all() and op.n_hvp - start < max_hvp:
        budget = max_hvp - (op.n_hvp - start)
        if exact_switch:
            need = _needed(st, rtol, floor) - st.n
            for l in map(int, np.flatnonzero(~conv)):
                cost = op.numels[l]
                if st.n[l] >= min_samples and need[l] >= cost and cost <= budget:
                    t = _exact_block_trace(op, l)
                    st.mean[l], exact[l] = t, True
                    n_hvp[l] += cost
                    budget -= cost
                    _tick(progress, cost)
            conv = _converged(st, exact, rtol, floor, min_samples)
            if conv.all() or budget <= 0:
                break
        active = [int(i) for i in np.flatnonzero(~conv)]
        per = max(1, min(block, budget // max(len(active), 1)))
        active = active[: max(1, budget // per)]
        probes, finishers = {}, {}
        for l in active:
            probes[int(l)], finishers[int(l)] = draw(int(l), per)
        HV = op.block_hvp(probes)
        for l in probes:
            st.update(l, finishers[l](HV[l]))
            n_hvp[l] += per
        _tick(progress, per * len(probes))
        conv = _converged(st, exact, rtol, floor, min_samples)
    return conv


def hutchinson_layer(
    op: HessianOperator,
    *,
    rtol: float = 0.05,
    max_hvp: int = 1000,
    block: int = 8,
    seed: int = 0,
    floor: float = 0.01,
    min_samples: int = 8,
    exact_switch: bool = True,
    progress=None,
) -> TraceResult:
    """Layer-restricted Hutchinson: z_l = v_lᵀH_ll v_l, all layers' probes batched through one graph per batch."""
    gen = torch.Generator().manual_seed(seed)
    L, start = len(op.names), op.n_hvp
    st, exact, n_hvp = RunningStats(L), np.zeros(L, bool), np.zeros(L, np.int64)

    def draw(l, k):
        v = rademacher((k, *op.shapes[l]), gen, op.dtype, op.device)
        return v, lambda hv: _dot(v, hv)

    conv = _adaptive_restricted(
        op,
        st,
        exact,
        n_hvp,
        draw,
        rtol=rtol,
        max_hvp=max_hvp,
        block=block,
        floor=floor,
        min_samples=min_samples,
        start=start,
        exact_switch=exact_switch,
        progress=progress,
    )
    return _result(
        op,
        st,
        exact,
        conv,
        n_hvp,
        "layer",
        start,
        dict(
            rtol=rtol,
            max_hvp=max_hvp,
            block=block,
            seed=seed,
            floor=floor,
            min_samples=min_samples,
            exact_switch=exact_switch,
        ),
    )


def _orth(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis [n, r] of the columns of Y [n, s], dropping numerically dependent directions."""
    Q, R = torch.linalg.qr(Y.double())
    d = R.diagonal().abs()
    keep = d > d.max().clamp_min(1e-300) * 1e-10 if d.numel() else d.bool()
    return Q[:, keep]


def _hutchpp_deflate(
    op: HessianOperator, sketch: int, gen: torch.Generator, st: RunningStats, exact: np.ndarray, n_hvp: np.ndarray
) -> tuple[dict[int, torch.Tensor], dict[int, float]]:
    """Hutch++ phases 1-2 for every layer: basis Q_l [n_l, r_l] float64 of the sketch H_ll S_l and the exact
    deflated trace tr(Q_lᵀH_llQ_l); counts the HVPs in ``n_hvp`` and marks layers fully spanned as exact."""
    L = len(op.names)
    s = {l: min(sketch, op.numels[l]) for l in range(L)}
    # phase 1: sketch Y_l = H_ll S_l for every layer at once
    S = {l: rademacher((s[l], *op.shapes[l]), gen, op.dtype, op.device) for l in range(L)}
    Y = op.block_hvp(S)
    Q = {l: _orth(Y[l].reshape(s[l], -1).T) for l in range(L)}  # [n_l, r_l] float64
    for l in range(L):
        if Q[l].shape[1] < s[l] and s[l] == op.numels[l]:
            Q[l] = torch.eye(op.numels[l], dtype=torch.float64, device=Q[l].device)  # rank-deficient block
    # phase 2: the deflated part exactly
    QT = {l: Q[l].T.to(op.dtype).reshape(Q[l].shape[1], *op.shapes[l]) for l in range(L)}
    HQ = op.block_hvp(QT)
    defl = {l: float(_dot(QT[l], HQ[l]).sum()) for l in range(L)}
    for l in range(L):
        n_hvp[l] += s[l] + Q[l].shape[1]
        if Q[l].shape[1] >= op.numels[l]:
            st.mean[l], exact[l] = defl[l], True
    return Q, defl


def hutchpp_layer(
    op: HessianOperator,
    *,
    sketch: int = 16,
    rtol: float = 0.05,
    max_hvp: int = 1000,
    block: int = 8,
    seed: int = 0,
    floor: float = 0.01,
    min_samples: int = 8,
    exact_switch: bool = True,
    progress=None,
) -> TraceResult:
    """Hutch++ deflation on every layer block: exact tr(QᵀH_llQ) on a sketched subspace + Hutchinson on the rest.

    Cost per layer: 2·min(sketch, n_l) HVPs up front (sketch and exact part), then one HVP per
    residual sample.  Layers with n_l ≤ sketch are exact after the first phase.
    """
    gen = torch.Generator().manual_seed(seed)
    L, start = len(op.names), op.n_hvp
    st, exact, n_hvp = RunningStats(L), np.zeros(L, bool), np.zeros(L, np.int64)
    Q, defl = _hutchpp_deflate(op, sketch, gen, st, exact, n_hvp)
    _tick(progress, int(n_hvp.sum()))

    def draw(l, k):
        g = rademacher((k, op.numels[l]), gen, torch.float64, op.device)
        h = g - (g @ Q[l]) @ Q[l].T
        h = h.to(op.dtype).reshape(k, *op.shapes[l])
        return h, lambda hv: defl[l] + _dot(h, hv)

    run = dict(rtol=rtol, max_hvp=max_hvp, block=block, floor=floor, min_samples=min_samples)
    conv = _adaptive_restricted(
        op, st, exact, n_hvp, draw, start=start, exact_switch=exact_switch, progress=progress, **run
    )
    settings = dict(rtol=rtol, max_hvp=max_hvp, block=block, seed=seed, floor=floor, min_samples=min_samples)
    settings.update(sketch=sketch, exact_switch=exact_switch)
    return _result(op, st, exact, conv, n_hvp, "hutchpp", start, settings)


def estimate_traces(op: HessianOperator, estimator: str = DEFAULT_ESTIMATOR, **kw) -> TraceResult:
    """Dispatch to :func:`hutchinson_layer` (default), :func:`hutchpp_layer` or :func:`hutchinson_full`."""
    if estimator == "hutchpp":
        return hutchpp_layer(op, **kw)
    kw.pop("sketch", None)
    if estimator == "layer":
        return hutchinson_layer(op, **kw)
    if estimator == "full":
        kw.pop("exact_switch", None)
        return hutchinson_full(op, **kw)
    raise ValueError(f"unknown trace estimator {estimator!r}; accepted: {', '.join(ESTIMATORS)}")


def _tick(progress, n: int) -> None:
    if progress is not None:
        progress.update(n)


def _input_hook(eps: list, i: int):
    """Forward pre-hook adding a zero tensor ε (requires grad, stored in ``eps[i]``) to the layer's input."""

    def fn(mod, inp):
        e = torch.zeros_like(inp[0], requires_grad=True)
        eps[i] = e
        return (inp[0] + e,) + tuple(inp[1:])

    return fn


def _activation_graphs(model: torch.nn.Module, local, layers: Sequence[str], loss_fn) -> tuple[list, list[int]]:
    """Per batch: (ε per layer, ∂L_b/∂ε per layer with its graph kept, n_b); and each layer's per-sample input size.

    One graph per batch is kept: activation probes are cheap compared with rebuilding it.
    """
    dev = next(model.parameters()).device
    mods = [model.get_submodule(n) for n in layers]
    graphs, numel = [], [0] * len(layers)
    for x, y in local:
        eps: list = [None] * len(layers)
        hs = [m.register_forward_pre_hook(_input_hook(eps, i)) for i, m in enumerate(mods)]
        try:
            with torch.enable_grad(), composite():
                loss = loss_fn(model(x.to(dev)), y.to(dev))
                g = torch.autograd.grad(loss, eps, create_graph=True)
        finally:
            for h in hs:
                h.remove()
        graphs.append((eps, g, float(len(y))))
        numel = [e[0].numel() for e in eps]
    return graphs, numel


def _global_samples(local, on: bool) -> float:
    """Number of samples in ``local`` batches, summed over all ranks when torch.distributed is on."""
    n_total_t = torch.tensor([float(sum(len(y) for _, y in local))], dtype=torch.float64)
    if on:
        dist.all_reduce(n_total_t)
    return float(n_total_t.item())


def _probe_sums(graphs: list, active: list[int], k: int, gen: torch.Generator) -> torch.Tensor:
    """One probe round: Σ_b n_b·vᵀ(∇²_ε L_b)v for k Rademacher probes per active layer, [len(active), k] float64."""
    sums = torch.zeros(len(active), k, dtype=torch.float64)
    for eps, g, w in graphs:
        for a, l in enumerate(active):
            v = rademacher((k, *eps[l].shape), gen, eps[l].dtype, eps[l].device)
            for j in range(k):
                (hv,) = torch.autograd.grad(g[l], eps[l], grad_outputs=v[j], retain_graph=True)
                sums[a, j] += w * float((v[j].double() * hv.double()).sum())
    return sums


def activation_traces(
    model: torch.nn.Module,
    batches,
    layers: Sequence[str],
    *,
    loss_fn=None,
    rtol: float = 0.05,
    max_probes: int = 256,
    block: int = 8,
    seed: int = 0,
    floor: float = 0.01,
    min_samples: int = 8,
    progress=None,
) -> TraceResult:
    """Traces of the Hessian of the loss w.r.t. each layer's *input* activation (Rademacher, layer-restricted).

    A forward pre-hook adds a zero tensor ε_l (requires grad) to layer l's input, so ∂²L/∂ε_l² is the
    activation Hessian at the unperturbed point.  With L the sample-weighted mean over batches, its
    trace is the per-sample average of tr(∇²_{x_l} ℓ_s); ``n_params`` is the per-sample activation size,
    so ``trace_per_param`` is the per-element average.  Model in eval mode (see analysis.hvp).
    ``n_hvp`` counts probe rounds per layer (each round: one probe per batch); ``max_probes`` caps them.
    With torch.distributed initialised, batches are sharded and the per-round sums all-reduced.
    """
    loss_fn = loss_fn or F.cross_entropy
    model.eval()
    batches = list(batches)
    on = _dist_on()
    local = batches[dist.get_rank() :: dist.get_world_size()] if on else batches
    n_total = _global_samples(local, on)
    graphs, numel = _activation_graphs(model, local, layers, loss_fn)
    L = len(layers)
    gen = torch.Generator().manual_seed(seed + 1000003 * (dist.get_rank() if on else 0))
    st, exact, n_round = RunningStats(L), np.zeros(L, bool), np.zeros(L, np.int64)
    conv = _converged(st, exact, rtol, floor, min_samples)
    while not conv.all() and n_round.max() < max_probes:
        active = [int(i) for i in np.flatnonzero(~conv)]
        k = max(1, min(block, max_probes - int(n_round.max())))
        sums = _probe_sums(graphs, active, k, gen)
        if on:
            _all_reduce_([sums])
        for a, l in enumerate(active):
            st.update(int(l), (sums[a] / n_total).numpy())
            n_round[l] += k
        _tick(progress, k * len(active))
        conv = _converged(st, exact, rtol, floor, min_samples)
    total = int(n_round.sum())
    return TraceResult(
        names=list(layers),
        n_params=numel,
        trace=st.mean.copy(),
        stderr=st.stderr(),
        n_hvp=n_round,
        converged=conv,
        exact=exact,
        estimator="activation-layer",
        total_hvp=total,
        settings=dict(rtol=rtol, max_probes=max_probes, block=block, seed=seed, floor=floor),
    )
