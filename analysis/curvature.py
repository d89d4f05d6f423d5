"""Which curvature drives Ω, and which estimator measures it (issue 16): the Hessian or the Gauss–Newton trace.

Two per-layer quantities of the softmax cross-entropy loss L (mean over samples, and over positions for
sequence logits) are measured:

* the **Hessian** block trace Tr(H_ll), by Hutchinson HVPs (:mod:`analysis.trace`), or exactly by the
  per-sample estimator (:mod:`analysis.exact`) where the net is piecewise linear in every measured layer
  (ReLU-like activations, BatchNorm in eval mode, each weight used once): there G_ll = H_ll;
* the **Gauss–Newton** block trace Tr(G_ll), G = Jᵀ ∇²ℓ J (PSD), by :func:`analysis.exact.exact_layer_traces`:
  exact with all (position, class) columns when a sample has at most ``gn_columns`` of them, else
  ``gn_columns`` sampled columns per sample, with a standard error.

Which estimator (``estimator="auto"``, the default): ``exact`` where :func:`analysis.exact.exactness_check`
says the network is piecewise linear in every measured layer (then both quantities are one, with no SE), else
layer-restricted Hutchinson for the Hessian and, beside it, the Gauss–Newton trace (both reported per layer).
A loss other than the task's softmax cross-entropy has no Gauss–Newton trace here (``analysis.exact``
differentiates the softmax cross-entropy only): auto then picks Hutchinson and nothing else.

Which drives Ω (``curvature``): ``"hessian"`` (default: the second-order Taylor term of the loss itself) or
``"gn"`` (PSD by construction: never a negative trace, but it drops the residual term Σ (p − y)·∇²f, which for
GELU / softmax-attention nets is not zero).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from hasb.errors import HasbError

from .exact import ExactTraceResult, layer_exactness
from .hvp import eval_mode
from .trace import ESTIMATORS, TraceResult

AUTO = "auto"
ESTIMATOR_CHOICES = (AUTO, "exact", *ESTIMATORS)  # the sensitivity CLI's --estimator
CURVATURES = ("hessian", "gn")  # the sensitivity CLI's --curvature
DEFAULT_CURVATURE = "hessian"
HUTCHINSON = "layer"  # auto's Hutchinson estimator: the measured default of analysis.trace
DEFAULT_GN_COLUMNS = 64  # GN columns per sample: exact up to 64 classes; sampled beyond (e.g. 256 bytes × T)


class CurvatureError(HasbError):
    """An estimator / curvature combination that cannot give what was asked for."""


@dataclass
class EstimatorChoice:
    """What measures the traces and why: recorded in sensitivity.json ``meta["estimator_choice"]``.

    requested: the user's --estimator (``auto`` or a name); used: ``exact`` or a Hutchinson estimator;
    piecewise_linear: G_ll = H_ll for every measured layer; why: one line; reasons: the ops that make a layer's
    Gauss–Newton block differ from its Hessian block (``"<weight>: <op> in <module>"``, at most 20);
    hessian_by: "exact", "hutchinson" or None (not measured); gn: whether the Gauss–Newton trace is measured.
    """

    requested: str
    used: str
    piecewise_linear: bool
    why: str
    reasons: list[str] = field(default_factory=list)
    hessian_by: str | None = None
    gn: bool = False
    curvature: str = DEFAULT_CURVATURE

    def to_dict(self) -> dict:
        return asdict(self)


def per_layer_exactness(net: nn.Module, example: torch.Tensor, params: dict) -> dict[str, list[str]]:
    """``analysis.exact.layer_exactness`` of ``net`` in eval mode on one sample of ``example`` (its mode restored)."""
    with eval_mode(net), torch.no_grad():
        net(example)  # hasb's lazy activation-scale init happens outside the op-tracing mode
    with eval_mode(net):
        return layer_exactness(net, example, params)


def choose_estimator(
    requested: str, curvature: str, per_layer: dict[str, list[str]], task_loss: bool, needs_hvp: bool = False
) -> EstimatorChoice:
    """The estimator for ``requested`` (auto or a name) given the exactness check; CurvatureError if impossible.

    ``per_layer``: :func:`per_layer_exactness`; ``task_loss``: the loss is the task's softmax cross-entropy;
    ``needs_hvp``: eigenvalues, a density or activation traces were asked for (they need the HVP operator, so
    auto picks Hutchinson).
    """
    if requested not in ESTIMATOR_CHOICES:
        raise CurvatureError(f"unknown estimator {requested!r}; accepted: {', '.join(ESTIMATOR_CHOICES)}")
    if curvature not in CURVATURES:
        raise CurvatureError(f"unknown curvature {curvature!r}; accepted: {', '.join(CURVATURES)}")
    reasons = [f"{n}: {r}" for n, rs in per_layer.items() for r in rs]
    pl = not reasons
    first = f"{reasons[0]}{f' (+{len(reasons) - 1} more)' if len(reasons) > 1 else ''}" if reasons else ""
    if not task_loss and (requested == "exact" or curvature == "gn"):
        raise CurvatureError(
            "the exact estimator and --curvature gn need the task's softmax cross-entropy loss; "
            "with another loss use a Hutchinson estimator (layer, hutchpp, full) and --curvature hessian"
        )
    if requested == "exact" and not pl and curvature == "hessian":
        raise CurvatureError(
            f"--estimator exact gives the Gauss-Newton trace of this net, not its Hessian (not piecewise linear: "
            f"{first}); pass --curvature gn to let it drive Ω, or --estimator auto (Hutchinson for the Hessian)"
        )
    used, why = requested, f"--estimator {requested} requested"
    if requested == AUTO:
        if not task_loss:
            used, why = HUTCHINSON, "a loss other than the softmax cross-entropy: Hutchinson (exact assumes it)"
        elif needs_hvp:
            used, why = HUTCHINSON, "--top-k / --density / --activations need Hessian-vector products: Hutchinson"
        elif pl:
            used = "exact"
            why = (
                "piecewise linear in every measured layer (ReLU-like, BatchNorm in eval, each weight used once): "
                "exact per-sample Gauss-Newton columns = the Hessian block traces"
            )
        else:
            used = HUTCHINSON
            why = f"not piecewise linear ({first}): Hutchinson for the Hessian, the Gauss-Newton trace beside it"
    hessian_by = "hutchinson" if used != "exact" else ("exact" if pl else None)
    gn = task_loss and (used == "exact" or not pl or curvature == "gn")
    return EstimatorChoice(requested, used, pl, why, reasons[:20], hessian_by, gn, curvature)


def both_traces(
    hess: TraceResult | None, gn: ExactTraceResult | None, choice: EstimatorChoice, per_layer: dict[str, list[str]]
) -> tuple[TraceResult, pd.DataFrame]:
    """(the result that drives Ω, per-layer columns of both quantities).

    Columns (one row per layer, in the driving result's order): ``hessian_trace``, ``hessian_stderr`` (NaN
    when not measured), ``gn_trace``, ``gn_stderr`` (NaN when not measured), ``hessian_exact`` (G_ll = H_ll
    for this layer by the exactness check).  Where the net is piecewise linear and exact, Hessian = GN.
    """
    if choice.used == "exact" and choice.piecewise_linear:
        hess = gn
    drive = hess if choice.curvature == "hessian" else gn
    if drive is None:
        raise CurvatureError(f"no {choice.curvature} trace was measured")  # excluded by choose_estimator
    L = len(drive.names)
    nan = np.full(L, np.nan)
    cols = pd.DataFrame(
        {
            "hessian_trace": hess.trace if hess is not None else nan,
            "hessian_stderr": hess.stderr if hess is not None else nan,
            "gn_trace": gn.trace if gn is not None else nan,
            "gn_stderr": gn.stderr if gn is not None else nan,
            "hessian_exact": [not per_layer.get(n, []) for n in drive.names],
        }
    )
    return drive, cols


def gn_meta(gn: ExactTraceResult | None) -> dict | None:
    """How the Gauss–Newton traces were measured (``meta["gauss_newton"]``), or None when they were not."""
    if gn is None:
        return None
    return {
        "columns_per_sample": int(gn.columns),
        "sampled": bool(gn.sampled),
        "n_samples": int(gn.n_samples),
        "n_vjp": int(gn.n_vjp),
        "grad_equiv": float(gn.grad_equiv),
        "settings": gn.settings,
    }
