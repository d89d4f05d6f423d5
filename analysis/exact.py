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
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from hasb.errors import HasbError

from .hvp import composite, eval_mode, resolve_params
from .trace import TraceResult

__all__ = ["ExactTraceError", "ExactTraceResult", "exact_layer_traces", "exactness_check", "layer_exactness"]


class ExactTraceError(HasbError):
    """Bad input to the exact estimator (output shape, column count) or a non-finite result."""


# -- when is the Gauss–Newton block the Hessian block? -------------------------------------------------------
# Op names (torch function __name__ with underscores stripped).  Each is piecewise linear in every tensor
# argument, so it has zero second derivative almost everywhere and passes dependence on W_l through.
_PIECEWISE_LINEAR = frozenset(
    """
    add radd iadd sub rsub isub neg pos cat concat concatenate stack hstack vstack reshape view view_as
    reshape_as flatten unflatten permute transpose t contiguous getitem mean sum cumsum avg_pool1d avg_pool2d
    avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d max_pool1d max_pool2d max_pool3d
    max_pool1d_with_indices max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d relu relu6 hardtanh leaky_relu clamp clip clamp_min clamp_max
    round floor ceil trunc sign abs pad chunk split squeeze unsqueeze expand expand_as repeat flip roll unbind
    narrow select to type float double half clone where masked_fill max amax min amin maximum minimum
    index_select gather pixel_shuffle channel_shuffle interpolate identity batch_norm dropout dropout1d
    dropout2d dropout3d feature_alpha_dropout alpha_dropout
""".split()
)
# Linear in each argument separately: nonlinear in W_l only if two arguments both depend on W_l.
_MULTILINEAR = frozenset(
    """
    conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d linear bilinear matmul rmatmul mm
    bmm mul rmul imul einsum addmm baddbmm outer dot tensordot
""".split()
)
_DIVISION = {"div": 1, "truediv": 1, "true_divide": 1, "divide": 1, "itruediv": 1, "rtruediv": 0}
_NO_DEPENDENCE = frozenset({"detach", "zeros_like", "ones_like", "empty_like", "randn_like", "rand_like"})


def _op_name(func) -> str:
    return getattr(func, "__name__", str(func)).strip("_")


def _train_flag(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a batch_norm / dropout call runs in training mode (batch statistics, random masks)."""
    if name == "batch_norm":
        return bool(kwargs.get("training", args[5] if len(args) > 5 else False))
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    return bool(kwargs.get("training", args[2] if len(args) > 2 else True)) and float(p) > 0


class _Dependence(TorchFunctionMode):
    """Tracks which selected weights each tensor depends on through one forward; flags nonlinear uses.

    ``flags[l]`` collects reasons why the network is not piecewise linear in weight l.  Tensors made
    under ``no_grad`` or by ``detach`` depend on nothing (autograd does not differentiate them).
    """

    def __init__(self, weights: Sequence[torch.Tensor], names: Sequence[str], where):
        super().__init__()
        self.deps = {id(w): frozenset({l}) for l, w in enumerate(weights)}
        self.keep = list(weights)  # ids stay unique while the tensors are alive
        self.names, self.where = list(names), where
        self.flags: list[list[str]] = [[] for _ in names]

    def _flag(self, layers, why: str) -> None:
        for l in sorted(layers):
            if why not in self.flags[l]:
                self.flags[l].append(why)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if not outs or not torch.is_grad_enabled() or name in _NO_DEPENDENCE:
            return out  # sizes, dtypes: no tensor; detached / no_grad tensors: constants
        arg_deps = [
            self.deps.get(id(t), frozenset()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        ]
        union = frozenset().union(*arg_deps) if arg_deps else frozenset()
        if not union:
            return out
        at = f"{name} in {self.where()}"
        if name in ("batch_norm",) or "dropout" in name:
            if _train_flag(name, args, kwargs):
                self._flag(union, f"{at} runs in training mode (batch statistics / random mask)")
        elif name in _MULTILINEAR:
            twice = [l for l in union if sum(l in d for d in arg_deps) > 1]
            self._flag(twice, f"{at} multiplies two tensors that both depend on the weight (used twice)")
        elif name in _DIVISION:
            i = _DIVISION[name]
            den = self.deps.get(id(args[i]), frozenset()) if len(args) > i else frozenset()
            self._flag(den, f"{at} divides by a tensor that depends on the weight")
        elif name not in _PIECEWISE_LINEAR:
            self._flag(union, f"{at} is not piecewise linear")
        for t in outs:
            self.deps[id(t)] = union | self.deps.get(id(t), frozenset())
            self.keep.append(t)
        return out


def layer_exactness(model: nn.Module, example_input: torch.Tensor, params=None) -> dict[str, list[str]]:
    """Per selected weight: the reasons its Gauss–Newton block may differ from its Hessian block (empty: equal).

    Runs one forward of ``example_input`` (e.g. one sample, [1, ...]) in the model's current mode,
    recording every torch op: a non-piecewise-linear op (GELU, softmax, tanh, LayerNorm, ...)
    downstream of W_l, a product of two tensors that both depend on W_l, a division by one, BatchNorm or
    dropout in training mode, a module that owns W_l called more than once, or W_l registered under two
    names (tied weights) all mark W_l.  ``params`` as in :func:`analysis.hvp.resolve_params`.
    """
    named = resolve_params(model, params)
    names, weights = list(named), list(named.values())
    stack: list[str] = []
    calls: dict[str, int] = {}
    mod_name = {m: n for n, m in model.named_modules()}

    def pre(mod, _inp):
        n = mod_name[mod] or "<model>"
        stack.append(f"{n} ({type(mod).__name__})")
        calls[mod_name[mod]] = calls.get(mod_name[mod], 0) + 1

    def post(*_):
        stack.pop()  # returns None: a forward hook's return value would replace the output

    hooks = [m.register_forward_pre_hook(pre) for m in mod_name]
    hooks += [m.register_forward_hook(post) for m in mod_name]
    mode = _Dependence(weights, names, lambda: stack[-1] if stack else "<model>")
    try:
        with torch.enable_grad(), composite(), mode:
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    owners = {id(p): [] for p in weights}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in owners:
            owners[id(p)].append(pname)
    for l, (name, w) in enumerate(zip(names, weights, strict=True)):
        if len(owners[id(w)]) > 1:
            mode._flag([l], f"weight registered under several names {owners[id(w)]} (tied: used twice)")
        mod = name.rsplit(".", 1)[0] if "." in name else ""
        if calls.get(mod, 0) > 1:
            mode._flag([l], f"module {mod} is called {calls[mod]} times in one forward (weight used twice)")
    return dict(zip(names, mode.flags, strict=True))


def exactness_check(model: nn.Module, example_input: torch.Tensor, params=None) -> tuple[bool, list[str]]:
    """(exact, reasons): exact means every selected layer's Gauss–Newton trace is its Hessian block trace.

    Otherwise the traces of the flagged layers are Gauss–Newton traces; ``reasons`` lists
    "<weight>: <why>" naming the offending op and module (e.g. ``gelu in act (GELU)``).
    Checks the model in its current train/eval mode (BatchNorm must be in eval mode).
    """
    per = layer_exactness(model, example_input, params)
    reasons = [f"{n}: {r}" for n, rs in per.items() for r in rs]
    return not reasons, reasons


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
