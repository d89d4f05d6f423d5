"""Exact per-layer Hessian traces of piecewise-linear nets from per-sample backward passes (issue 16).

The loss is the one :class:`analysis.hvp.HessianOperator` differentiates with its default
``F.cross_entropy``: the sample-weighted mean over batches of each batch's mean loss,

    L(θ) = (1/N) Σ_n ℓ_n,    ℓ_n = (1/T_n) Σ_t CE(f_nt(θ), y_nt),

with T_n = 1 for logits [B, C] and T_n = T for sequence logits [B, T, V] (the loss then averages
over every position, e.g. ``F.cross_entropy(logits.flatten(0, 1), y.flatten())``).  Its Gauss–Newton
block for a weight tensor W_l is G_ll = (1/N) Σ_n (1/T) Σ_t J_ntlᵀ (diag p_nt − p_nt p_ntᵀ) J_ntl with
J_ntl = ∂f_nt/∂W_l, and diag p − ppᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ, so

    Tr(G_ll) = (1/N) Σ_n (1/T) Σ_t Σ_c p_ntc ‖J_ntlᵀ (e_c − p_nt)‖².

One per-sample vector-Jacobian product per column u = e_c − p (at one position) gives this for
**every** layer at once (``torch.func``: one ``vjp`` per sample, ``vmap`` over samples and columns,
chunked).  The targets y do not enter: G depends on the predicted distribution only.

G_ll = H_ll (the diagonal Hessian block) when the network is piecewise linear in W_l: every op
downstream of W_l is ReLU-like, pooling, BatchNorm in eval mode, conv/linear with W_l entering once,
an add or a reshape (see :func:`exactness_check`).  hasb's straight-through quantizers keep it: their
autograd derivative is piecewise constant, so the Hessian autograd computes for the fake-quantized
network at its active config (the one :mod:`analysis.hvp` computes) has the same identity.

Many columns (e.g. V = 256 bytes per position): ``classes=k`` draws k columns per sample, a position
t uniformly and a class c ~ p_nt, and averages z = ‖J_ntlᵀ(e_c − p_nt)‖², an unbiased estimate of
the per-sample term (importance sampling by p: the weight p_c/q_c is 1, so no heavy tails); the
standard error comes from the per-sample spread of z.  With all columns the SE is 0.

The model runs in **eval mode** (restored after): per-sample functions need BatchNorm to use its
running statistics (in train mode each sample's output depends on the whole batch), and dropout
must be off.  Not distributed: every process computes the full result over the batches it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from hasb.errors import HasbError

from .linearity import exactness_check, layer_exactness
from .params import composite, eval_mode, resolve_params
from .trace import TraceResult

__all__ = ["ExactTraceError", "ExactTraceResult", "exact_layer_traces", "exactness_check", "layer_exactness"]


class ExactTraceError(HasbError):
    """Bad input to the exact estimator (output shape, column count) or a non-finite result."""


# -- the traces ------------------------------------------------------------------------------------------------
@dataclass
class ExactTraceResult(TraceResult):
    """:class:`analysis.trace.TraceResult` of the per-sample estimator, plus what it is exact for.

    ``trace[l]`` is Tr(G_ll) (Gauss–Newton) = Tr(H_ll) where ``hessian_exact[l]``; ``stderr`` is 0 with
    all columns, else the column-sampling SE.  ``exact[l]`` = all columns and ``hessian_exact[l]``.
    No HVPs are used (``n_hvp`` = 0); ``n_vjp`` counts per-sample vector-Jacobian products (one per
    sample and column, all layers at once), ``grad_equiv`` = n_vjp / n_samples in units of one
    full-data gradient's backward passes (plus two forwards per sample, not counted).
    """

    hessian_exact: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    reasons: list[str] = field(default_factory=list)
    n_samples: int = 0
    columns: int = 0  # columns per sample (C, T·V or the sampled k)
    sampled: bool = False
    n_vjp: int = 0
    grad_equiv: float = 0.0

    def to_frame(self) -> pd.DataFrame:
        """The base columns plus ``hessian_exact``."""
        frame = super().to_frame()
        frame["hessian_exact"] = self.hessian_exact
        return frame

    def to_json(self) -> dict:
        out = super().to_json()
        out.update(
            curvature="hessian" if self.hessian_exact.all() else "gauss-newton",
            reasons=self.reasons,
            n_samples=self.n_samples,
            columns=self.columns,
            sampled=self.sampled,
            n_vjp=self.n_vjp,
            grad_equiv=self.grad_equiv,
        )
        return out


def _draw(probs: torch.Tensor, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """k sampled columns per sample of probs [B, T, V]: positions t uniform, classes c ~ p_t; both [B, k] int64."""
    B, T, V = probs.shape
    t = torch.randint(0, T, (B, k), generator=gen)
    p_sel = probs[torch.arange(B)[:, None], t]  # [B, k, V]
    c = torch.multinomial(p_sel.reshape(B * k, V), 1, replacement=True, generator=gen).reshape(B, k)
    return t, c


def _columns(probs: torch.Tensor, drawn: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cotangent columns u and weights w with Σ_k w_k u_k u_kᵀ = (1/T) blockdiag_t(diag p_t − p_t p_tᵀ).

    probs: [B, T, V] (float64, CPU).  drawn=None: all T·V columns, u = e_c − p_t at position t,
    w = p_tc / T.  Else the (t, c) [B, k] of :func:`_draw`, w = 1/k (unbiased in expectation).
    Returns u [B, K, T, V] and w [B, K].
    """
    B, T, V = probs.shape
    if drawn is None:
        eye = torch.eye(V, dtype=probs.dtype)
        u = torch.zeros(B, T, V, T, V, dtype=probs.dtype)
        for t in range(T):
            u[:, t, :, t, :] = eye - probs[:, t, None, :]
        return u.reshape(B, T * V, T, V), probs.reshape(B, T * V) / T
    t, c = drawn
    k = t.shape[1]
    p_sel = probs[torch.arange(B)[:, None], t]  # [B, k, V]
    u = torch.zeros(B, k, T, V, dtype=probs.dtype)
    u[torch.arange(B)[:, None], torch.arange(k)[None, :], t] = nn.functional.one_hot(c, V).to(probs.dtype) - p_sel
    return u, torch.full((B, k), 1.0 / k, dtype=probs.dtype)


def _sq_norms(
    model: nn.Module, names: list[str], primals: tuple, x: torch.Tensor, u: torch.Tensor, col_chunk: int
) -> torch.Tensor:
    """‖J_nlᵀ u_nk‖² for x [S, *in] and u [S, K, *out] (out: one sample's logits shape) → [S, L, K] float64."""
    from torch.func import functional_call, vjp, vmap

    def one(x_n, u_n):
        def f(*ps):
            out = functional_call(model, dict(zip(names, ps, strict=True)), (x_n.unsqueeze(0),), strict=False)
            return out.squeeze(0)

        _, vjp_fn = vjp(f, *primals)  # one forward per sample, shared by its columns
        parts = []
        for j in range(0, u_n.shape[0], col_chunk):
            gs = vmap(vjp_fn)(u_n[j : j + col_chunk])
            parts.append(torch.stack([g.flatten(1).square().sum(1, dtype=torch.float64) for g in gs]))
        return torch.cat(parts, 1)

    # no_grad: other parameters (biases, BN) still require grad; torch.func's transforms ignore it
    with torch.no_grad(), composite():
        return vmap(one)(x, u)


def _probs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Softmax of the logits as [B, T, V] float64 on the CPU (T = 1 for [B, C] logits), and whether 3-D."""
    with torch.no_grad(), composite():
        logits = model(x)
    if logits.dim() not in (2, 3):
        raise ExactTraceError(
            f"model output has shape {tuple(logits.shape)}; accepted: logits [B, C] or "
            f"sequence logits [B, T, V] with softmax cross-entropy"
        )
    if not torch.isfinite(logits).all():
        raise ExactTraceError("model output has non-finite logits: the curvature is undefined")
    seq = logits.dim() == 3
    p = torch.softmax(logits.double(), dim=-1).cpu()
    return (p if seq else p[:, None, :]), seq


_MAX_COLUMN_ELEMENTS = 1 << 27  # one sample's exact cotangent block [T·V, T, V]: 1 GiB in float64


def _batch_terms(model, names, primals, x, probs, seq, k, gen, chunk):
    """One batch: per-sample contributions Σ_k w_k z_k [B, L] and, when sampled, the per-sample
    unbiased variance of z over its k columns [B, L] (None when exact); and the columns per sample.
    Columns are built per chunk of samples, so their memory is bounded like the gradients'."""
    B, T, V = probs.shape
    K = T * V if k is None else k
    if k is None and K * T * V > _MAX_COLUMN_ELEMENTS:
        raise ExactTraceError(
            f"all {T}×{V} (position, class) columns of one sample make a {K}×{T}×{V} cotangent "
            f"block; pass classes=k (e.g. 64) to sample columns, with a standard error"
        )
    per_call = max(1, chunk // K)
    col_chunk = max(1, min(K, chunk))
    drawn = None if k is None else _draw(probs, k, gen)  # all draws first: results independent of chunk
    zs, ws = [], []
    for s in range(0, B, per_call):
        u, w = _columns(
            probs[s : s + per_call], None if drawn is None else (drawn[0][s : s + per_call], drawn[1][s : s + per_call])
        )
        u = (u if seq else u[:, :, 0]).to(x.device, primals[0].dtype)  # [S, K, *out]
        zs.append(_sq_norms(model, names, primals, x[s : s + per_call], u, col_chunk).cpu())
        ws.append(w)
    z, w = torch.cat(zs), torch.cat(ws)  # [B, L, K], [B, K]
    contrib = (z * w[:, None, :]).sum(-1)
    var = z.var(dim=-1, unbiased=True) if k is not None else None
    return contrib, var, K


def _check_exact_args(batches: list, chunk: int, classes: int | None) -> None:
    """ExactTraceError unless there is a batch, ``chunk`` is an int ≥ 1 and ``classes`` is None or an int ≥ 2."""
    if not batches:
        raise ExactTraceError("no batches given: the traces need at least one (x, y) batch")
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ExactTraceError(f"chunk must be an int ≥ 1 (backward passes per vmap call); got {chunk!r}")
    if classes is not None and (not isinstance(classes, int) or classes < 2):
        raise ExactTraceError(
            f"classes must be None (all columns) or an int ≥ 2 (sampled, with an SE); got {classes!r}"
        )


def _sum_batches(model, names, primals, batches, classes, gen, chunk):
    """Sums over ``batches`` (model already in eval mode): (Σ contributions [L] float64, Σ variance/K [L],
    samples N, backward passes, whether any batch sampled columns, columns per sample K of the last batch)."""
    L = len(names)
    dev = primals[0].device
    total, var_sum = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
    n = n_vjp = 0
    sampled = False
    for x, y in batches:
        x = x.to(dev)
        probs, seq = _probs(model, x)
        k = classes if classes is not None and classes < probs.shape[1] * probs.shape[2] else None
        contrib, var, K = _batch_terms(model, names, primals, x, probs, seq, k, gen, chunk)
        total += contrib.sum(0)
        if var is not None:
            var_sum += var.sum(0) / K
            sampled = True
        n += len(y)
        n_vjp += K * x.shape[0]
    return total, var_sum, n, n_vjp, sampled, K


def _finite_mean(total: torch.Tensor, n: int, names: list[str]) -> np.ndarray:
    """Per-layer trace total / n [L] as numpy; ExactTraceError naming the layers whose trace is not finite."""
    trace = (total / n).numpy()
    if not np.isfinite(trace).all():
        bad = [nm for nm, t in zip(names, trace, strict=True) if not np.isfinite(t)]
        raise ExactTraceError(f"non-finite traces for {bad}: the model's outputs or weights are not finite")
    return trace


def exact_layer_traces(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params=None,
    *,
    chunk: int = 64,
    classes: int | None = None,
    seed: int = 0,
) -> ExactTraceResult:
    """Per-layer traces Tr(G_ll) (= Tr(H_ll) where :func:`exactness_check` allows) of the softmax
    cross-entropy loss averaged over all samples (and positions) of ``batches``.

    Args:
        model: x → logits [B, C] or [B, T, V] (float or hasb quantized at its active config); run in eval mode.
        batches: list of (x [B, ...], y [B] or [B, T]); y is not used (G depends on p only), N = Σ len(y).
        params: weight subset as in :func:`analysis.hvp.resolve_params` (default: every Conv2d/Linear weight).
        chunk: most per-sample backward passes (samples × columns) in one ``vmap`` call: memory
            ≈ chunk × (number of selected weights) floats plus chunk's activations.
        classes: None for all columns (C, or T·V for sequences): exact, SE 0.  An int k ≥ 2 samples k
            columns per sample (fewer than all) and reports the SE; k ≥ all columns falls back to exact.
        seed: seed of the column sampling (CPU generator: device-independent).
    Returns:
        :class:`ExactTraceResult`: trace (per layer, loss units per weight²), stderr, hessian_exact, reasons.
    """
    batches = list(batches)
    _check_exact_args(batches, chunk, classes)
    named = resolve_params(model, params)
    if not named:
        raise ExactTraceError("the parameter subset is empty")
    names, primals = list(named), tuple(p.detach() for p in named.values())
    dev, gen, L = primals[0].device, torch.Generator().manual_seed(seed), len(names)
    with eval_mode(model):
        _probs(model, batches[0][0].to(dev))  # also hasb's lazy scale init, on batch 0 as hvp does
        per_layer = layer_exactness(model, batches[0][0][:1].to(dev), named)
        total, var_sum, n, n_vjp, sampled, K = _sum_batches(model, names, primals, batches, classes, gen, chunk)
    trace = _finite_mean(total, n, names)
    hess = np.array([not per_layer[nm] for nm in names])
    return ExactTraceResult(
        names=names,
        n_params=[p.numel() for p in primals],
        trace=trace,
        stderr=(var_sum.sqrt() / n).numpy(),
        n_hvp=np.zeros(L, np.int64),
        converged=np.ones(L, bool),
        exact=hess & (not sampled),
        estimator="exact" if hess.all() else "gauss-newton",
        total_hvp=0,
        settings=dict(chunk=chunk, classes=classes, seed=seed),
        hessian_exact=hess,
        reasons=[f"{nm}: {r}" for nm in names for r in per_layer[nm]],
        n_samples=n,
        columns=K,
        sampled=sampled,
        n_vjp=n_vjp,
        grad_equiv=n_vjp / n,
    )
