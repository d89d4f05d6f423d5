"""Per-layer bit sensitivity from Hessian traces: Ω_l(b) = (Tr(H_l)/n_l) · ‖Q_b(W_l) − W_l‖².

HAWQ-V2/V3's objective with hasb's Double Rounding quantizer: the second-order
Taylor term ½ΔWᵀH_llΔW of a perturbation ΔW_l = Q_b(W_l) − W_l, with H_ll
replaced by its isotropic average (Tr(H_ll)/n_l)·I.  The per-parameter trace
t_l = Tr(H_ll)/n_l is the vector HASB turns into bit probabilities.  Traces are
computed on a network someone trained: a float model as it is; a hasb quantized
model at a named config (default its highest candidate bit) or, with ``at="fp"``,
its float twin (``hasb.quantize.float_twin``) — never its fp path, whose BatchNorm
entries training never updated (issue 10: zero or 14x-too-large traces).
‖Q_b(W)−W‖² uses ``layer.quant_weight(b)``, on a quantized deep copy when a float
model is given.  Degenerate results (a saturated softmax, a non-finite loss,
all-zero or non-finite traces/SEs) raise :class:`DegenerateSensitivityError`.

Uncertainty (one convention): ``stderr`` is 1 standard error (SE) of ``trace``,
``stderr_per_param`` = stderr/n_l is 1 SE of ``trace_per_param``; tables and
figures show trace_per_param ± 1 SE and say on which split and how many images.

Negative traces (policy).  Away from a minimum, or by estimation noise, t̂_l can
be < 0.  ``trace``/``trace_per_param`` are always reported raw, with the column
``negative`` (t̂_l < 0) and ``significant_negative`` (t̂_l + 2·SE < 0), and the
layers listed in JSON "negative_traces".  Ω uses **max(t̂_l, 0)**: the isotropic
quadratic model predicts a loss change of t_l·‖ΔW‖²/2, and a quantization error
cannot be expected to *lower* the loss of a trained model, so the best
non-negative estimate of the expected increase is the projection onto [0, ∞).
|t_l| was rejected because it would rank a layer as *sensitive* exactly when the
curvature estimate says perturbing it is harmless or noise.  Ties at Ω = 0 are
ranked by the raw trace.

Estimator and curvature (issue 16, :mod:`analysis.curvature`): ``estimator="auto"`` (default) measures with the
exact per-sample estimator where the net is piecewise linear in every measured layer (then Gauss–Newton =
Hessian, no SE) and with layer-restricted Hutchinson otherwise, recording the Gauss–Newton trace beside the
Hessian one (``hessian_trace``/``gn_trace`` per layer); ``curvature`` ("hessian" default, or "gn") picks which
drives t_l and Ω.  The choice and its reason are printed and recorded in ``meta.estimator_choice``.

Language models (issue 13): the loss is the data source's task loss (:func:`hasb.data.loss_fn`; next-byte
cross-entropy for ``task="lm"``), the batches are byte windows, the saturation check uses the per-byte max
probability, and ``measured_on`` records windows × bytes (and the Python version for python-stdlib).  Ω is
the weight perturbation only; a weight-only model (``spec.weight_only``) skips activation traces.

CLI::

    python -m analysis.sensitivity --model resnet20 --checkpoint runs/r20/multi/model.pt --out runs/r20 [--at 8|fp]
    python -m analysis.sensitivity --model lm_tiny --data python-stdlib --data-opt limit=2000000 --batch-size 32 \
        --checkpoint runs/lm/multi/model.pt --out runs/lm [--curvature gn]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import hasb
from hasb import atomic_write_text, outset
from hasb.cli import (
    add_options,
    check_out_dir,
    config_from_args,
    data_dir_option,
    data_option,
    data_opts_option,
    device_option,
    force_option,
    model_option,
    option,
    out_lock,
    parse_bits,
    quiet_option,
    resolve_device,
    run_cli,
    seed_option,
    set_threads,
    threads_option,
)
from hasb.config import BitConfig
from hasb.data import load_dataset
from hasb.data import loss_fn as task_loss_fn
from hasb.errors import HasbError
from hasb.export import FORMAT, CheckpointError, load_quantized, read_checkpoint
from hasb.models import build_model, build_record, check_model_name
from hasb.plots import plot_traces, save_figure
from hasb.quantize import (
    DEFAULT_BITS,
    float_twin,
    get_config,
    quantized_layers,
    use_config,
)
from hasb.sensitivity_file import (
    LAYER_KEYS,
    VERSION,
    SensitivityError,
    load_sensitivity,
    validate_sensitivity,
)

from .curvature import (
    AUTO,
    CURVATURES,
    DEFAULT_CURVATURE,
    DEFAULT_GN_COLUMNS,
    ESTIMATOR_CHOICES,
    EstimatorChoice,
    both_traces,
    choose_estimator,
    gn_meta,
    per_layer_exactness,
)
from .exact import exact_layer_traces
from .hvp import BACKENDS, HessianOperator
from .spectrum import operator_matvec, slq_density, top_eigenvalues
from .trace import activation_traces, estimate_traces

# auto, the exact per-sample estimator of analysis.exact, and the Hutchinson estimators of analysis.trace
SENSITIVITY_ESTIMATORS = ESTIMATOR_CHOICES

__all__ = [
    "SensitivityConfig",
    "SensitivityResult",
    "compute_sensitivity",
    "DegenerateSensitivityError",
    "SensitivityError",
    "load_sensitivity",
    "validate_sensitivity",
    "LAYER_KEYS",
    "main",
]


@dataclass
class SensitivityResult:
    """Per-layer traces, Ω table and ranking.

    ``frame`` columns: layer, n_params, trace, trace_per_param, stderr, stderr_per_param (of the curvature that
    drives Ω: ``meta["curvature"]``), n_hvp, converged, exact, hessian_trace, hessian_stderr, gn_trace,
    gn_stderr (both curvatures; NaN = not measured), hessian_exact (Gauss–Newton block = Hessian block for this
    layer), searchable, negative, significant_negative, omega_<b> for each bit (NaN for fixed layers), rank
    (1 = most sensitive by Ω at the lowest bit; searchable layers only).
    """

    frame: pd.DataFrame
    bits: list[int]
    omega: dict[str, dict[str, float]]
    negative_traces: list[str]
    model_name: str = ""
    fingerprint: str = ""
    eigenvalues: list[float] | None = None
    density: dict | None = None
    activation: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)
    measured_at: dict = field(default_factory=dict)  # which network: see measured_network
    measured_on: dict = field(default_factory=dict)  # which examples: data, split, sizes (see _measured_on)

    def table(self) -> str:
        """The printed table: per-parameter traces with their own ± 1 SE, under a header saying what they were
        measured on."""
        on = self.measured_on
        where = ", ".join(f"{k} {on[k]}" for k in ("data", "split") if k in on)
        if on.get("task") == "lm":
            size = f"{on['n_windows']} windows × {on['bytes_per_window']} bytes = {on['n_bytes']} bytes"
        else:
            size = f"{on.get('n_images', '?')} images"
        tr = "Tr(G_l)/n_l (Gauss-Newton)" if self.meta.get("curvature") == "gauss-newton" else "Tr(H_l)/n_l"
        head = (
            f"{tr} ± 1 SE (stderr_per_param = stderr/n_params), measured on {where + ', ' if where else ''}"
            f"{size}; network: {_describe(self.measured_at)}"
        )
        cols = ["layer", "n_params", "trace_per_param", "stderr_per_param", "n_hvp", "rank"]
        f = self.frame[cols].copy()
        both = self.frame.reindex(columns=["hessian_trace", "gn_trace"])
        if both.notna().all().all() and not both.hessian_trace.equals(both.gn_trace):  # the other curvature, ± 1 SE
            other = "hessian" if self.meta.get("curvature") == "gauss-newton" else "gn"
            f[f"{other}_per_param"] = self.frame[f"{other}_trace"] / self.frame.n_params
            f[f"{other}_stderr_per_param"] = self.frame[f"{other}_stderr"] / self.frame.n_params
        return head + "\n" + f.to_string(index=False)

    @property
    def trace_per_param(self) -> dict[str, float]:
        """t_l = Tr(H_ll)/n_l of the searchable layers (HASB's input), raw (may be negative)."""
        f = self.frame[self.frame.searchable]
        return dict(zip(f.layer, f.trace_per_param.astype(float), strict=False))

    def ranking(self) -> list[str]:
        """Searchable layers, most sensitive first."""
        f = self.frame[self.frame.searchable].sort_values("rank")
        return list(f.layer)

    def to_dict(self) -> dict:
        rows = []
        for r in self.frame.to_dict(orient="records"):
            rows.append({k: _py(v) for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))})
        d = {
            "version": VERSION,
            "model": self.model_name,
            "fingerprint": self.fingerprint,
            "bits": list(self.bits),
            "layers": rows,
            "omega": self.omega,
            "negative_traces": list(self.negative_traces),
            "measured_at": self.measured_at,
            "measured_on": self.measured_on,
            "se_convention": SE_CONVENTION,
            "meta": self.meta,
        }
        if self.eigenvalues is not None:
            d["eigenvalues"] = [float(e) for e in self.eigenvalues]
        if self.density is not None:
            d["density"] = {
                "grid": [float(v) for v in self.density["grid"]],
                "density": [float(v) for v in self.density["density"]],
            }
        if self.activation is not None:
            d["activation"] = [{k: _py(v) for k, v in r.items()} for r in self.activation.to_dict(orient="records")]
        return d

    def to_json(self, path: str | Path) -> Path:
        """Write the contract JSON atomically (temp file + rename)."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False))

    def to_csv(self, path: str | Path) -> Path:
        return atomic_write_text(path, self.frame.to_csv(index=False))


SE_CONVENTION = (
    "stderr: 1 standard error of trace; stderr_per_param = stderr / n_params: 1 standard error of "
    "trace_per_param; error bars and tables show ± 1 SE"
)


def _describe(measured_at: dict) -> str:
    kind = measured_at.get("network", "?")
    if kind == "float_twin":
        return f"float twin (BN entries of bit {measured_at.get('bn_bit')})"
    if kind == "quantized":
        u = measured_at.get("uniform_bit")
        return f"quantized at {u} bits" if u is not None else "quantized at a mixed config"
    return kind


def _py(v):
    if isinstance(v, (np.generic,)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# -- the library function -----------------------------------------------------------------------------------
def weight_perturbation(layer: nn.Module, bit: int) -> float:
    """‖Q_b(W) − W‖² (float64 sum over the weight tensor) with the layer's Double Rounding quantizer."""
    with torch.no_grad():
        return float((layer.quant_weight(bit).double() - layer.weight.double()).pow(2).sum())


def omega_table(t_per_param: dict[str, float], perturb: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    """Ω_l(b) = max(t_l, 0) · ‖Q_b(W_l) − W_l‖² (see module docstring for the negative-trace policy)."""
    return {n: {str(b): max(t_per_param[n], 0.0) * d for b, d in perturb[n].items()} for n in perturb}


class DegenerateSensitivityError(SensitivityError):
    """The measured network or its traces are degenerate (saturated softmax, non-finite loss, zero or non-finite
    traces): an untrained path or a broken checkpoint, not input HASB and the ILP may use."""


# The softmax of a cross-entropy model is "saturated" above this mean max-probability on the calibration images.
# Why 0.999: the Hessian of the cross-entropy w.r.t. the logits is diag(p) - p pᵀ, whose trace 1 - Σ_k p_k² is
# ≤ 2 (1 - p_max); at a mean p_max > 0.999 every layer's Gauss-Newton curvature is scaled by < 0.002 (and in
# float32, 1 - p_max rounds to exactly 0 once logit gaps exceed ~17, giving exactly zero traces: the fp path of
# an export seen in issue 10 had logits up to 14,427). A trained classifier on its own calibration images sits
# far below (ResNet-20 / Fashion-MNIST at 93%: about 0.95). Set max_confidence=1.0 to switch the check off.
MAX_CONFIDENCE = 0.999


def measured_network(model: nn.Module, at=None) -> tuple[nn.Module, contextlib.AbstractContextManager, dict]:
    """(network whose Hessian is measured, context that switches it there, JSON record of which one).

    A float model is measured as it is (``at`` must be None or "fp"). A hasb quantized model is never measured
    on its fp path (its BatchNorm 'fp' entries are never trained): ``at="fp"`` measures its float twin
    (``hasb.quantize.float_twin``: float weights, BN entries of the top bit); ``at`` = a bit, a BitConfig or a
    {layer: bits} dict measures the quantized model at that config; ``at=None`` = the highest candidate bit.
    """
    if getattr(model, "hasb_spec", None) is None:
        if at not in (None, "fp"):
            raise SensitivityError(
                f"at={at!r} applies to hasb quantized models; a float model is measured as it is (pass at=None or 'fp')"
            )
        return model, contextlib.nullcontext(), {"network": "float"}
    top = int(model.hasb_spec.bits[0])
    if at == "fp":
        return float_twin(model, top), contextlib.nullcontext(), {"network": "float_twin", "bn_bit": top}
    cfg = top if at is None else at
    with use_config(model, cfg):  # validates cfg against the model now, before any work
        active = get_config(model)
    uniform = active.is_uniform()
    record = {"network": "quantized", "uniform_bit": uniform, "config": json.loads(active.to_json(indent=None))}
    return model, use_config(model, cfg), record


def check_outputs(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_fn=None,
    max_confidence: float = MAX_CONFIDENCE,
    task: str = "classification",
) -> dict:
    """Mean loss and mean max softmax probability over ``batches``; DegenerateSensitivityError if unusable.

    The loss is ``loss_fn`` (default: the task's, :func:`hasb.data.loss_fn`), sample-weighted over batches.
    The max probability is averaged per prediction: per sample for logits [B, C], per byte for an LM's
    [B, T, 256] (its softmax saturates the same way).  A non-finite loss is always an error; the saturation
    check applies to the task's softmax cross-entropy only (another loss_fn gets NaN and no check).
    Returns {"loss": float, "mean_max_prob": float, "n_samples": int, "n_predictions": int} (+ "n_images" for
    classification).
    """
    task_loss = loss_fn is None
    loss_fn = loss_fn or (lambda out, y: task_loss_fn(task, out, y))
    dev = next(model.parameters()).device
    model.eval()
    tot_loss = tot_p = 0.0
    n = n_pred = 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x.to(dev))
            tot_loss += float(loss_fn(out, y.to(dev))) * len(y)
            pmax = out.double().softmax(-1).amax(-1)  # [B] or [B, T]
            tot_p, n, n_pred = tot_p + float(pmax.sum()), n + len(y), n_pred + pmax.numel()
    loss, pmax = tot_loss / n, tot_p / n_pred
    unit = "windows" if task == "lm" else "images"
    if not math.isfinite(loss):
        raise DegenerateSensitivityError(
            f"the measured network's loss is {loss} on the {n} calibration {unit}; "
            "check the checkpoint (was it trained?) and which network is measured (--at)"
        )
    if not task_loss:
        pmax = float("nan")  # the softmax check is the cross-entropy's; other losses are the caller's
    elif pmax > max_confidence:
        per = "per byte " if task == "lm" else ""
        raise DegenerateSensitivityError(
            f"saturated softmax: mean max-probability {per}{pmax:.6f} > {max_confidence} on the {n} calibration "
            f"{unit} (its Hessian is ~0); check the checkpoint was trained and that --at names a trained network "
            "(e.g. --at 8, or --at fp for the float twin)"
        )
    out = {"loss": loss, "mean_max_prob": pmax, "n_samples": n, "n_predictions": n_pred}
    return out if task == "lm" else {**out, "n_images": n}


def check_traces(frame: pd.DataFrame, max_hvp: int) -> None:
    """DegenerateSensitivityError on all-zero traces or any non-finite trace / standard error."""
    bad = frame[~np.isfinite(frame.trace.to_numpy(float))]
    if len(bad):
        raise DegenerateSensitivityError(
            f"non-finite trace for layer(s) {list(bad.layer)[:3]}; check the checkpoint and the measured network (--at)"
        )
    bad = frame[~np.isfinite(frame.stderr.to_numpy(float))]
    if len(bad):
        raise DegenerateSensitivityError(
            f"no finite standard error for layer(s) {list(bad.layer)[:3]} (fewer than 2 "
            f"probes within max_hvp={max_hvp}); raise --max-hvp"
        )
    if (frame.trace == 0).all():
        raise DegenerateSensitivityError(
            "every layer's Hessian trace is exactly 0: the measured network has no "
            "curvature (saturated or dead); check the checkpoint and --at"
        )


def _q_reference(model: nn.Module, bits, example: torch.Tensor) -> tuple[nn.Module, list[int]]:
    """(quantized model that supplies Q_b for Ω, bits sorted high → low); checks ``bits``."""
    if getattr(model, "hasb_spec", None) is not None:
        spec_bits = tuple(model.hasb_spec.bits)
        bits = tuple(spec_bits if bits is None else bits)
        bad = [b for b in bits if b not in spec_bits]
        if bad:
            raise SensitivityError(
                f"bits {bad} are not candidates of the quantized model; accepted: {', '.join(map(str, spec_bits))}"
            )
        return model, sorted({int(b) for b in bits}, reverse=True)
    bits = tuple(DEFAULT_BITS if bits is None else bits)
    if not bits or any(not isinstance(b, int) or not 1 <= b <= 8 for b in bits):
        raise SensitivityError(f"bits must be integers in 1..8, got {list(bits)}")
    p0 = next(model.parameters())
    ex = example[:2].to(p0.device)
    ex = ex.to(p0.dtype) if ex.is_floating_point() else ex  # byte LMs take integer ids, not floats
    q = hasb.quantize_model(copy.deepcopy(model), bits=bits, example_input=ex)
    return q, sorted({int(b) for b in bits}, reverse=True)


@dataclass
class SensitivityConfig:
    """Estimator settings of :func:`compute_sensitivity` (no I/O; the CLI builds one from its flags).

    bits: candidate bits for Ω (None: the model's candidates, else 8,6,4,2). estimator: "auto" (exact where the
    net is piecewise linear, else Hutchinson "layer": :mod:`analysis.curvature`), "exact", or a Hutchinson
    estimator of analysis.trace ("layer", "hutchpp", "full"). curvature: which trace drives Ω, "hessian" or
    "gn" (Gauss–Newton). gn_columns: Gauss–Newton columns per sample (all when a sample has at most this many,
    else this many sampled, with an SE; 0 = always all). rtol, max_hvp, floor, block, sketch, seed: see
    analysis.trace. backend: "auto", "double_backward" or "func". include_fixed: also estimate the fixed
    (first/last) layers (searchable=False). top_k: top Hessian eigenvalues (Lanczos); density: an SLQ
    eigenvalue density; activations: activation-Hessian traces (skipped for weight-only models). at: which
    network of a quantized model (see :func:`measured_network`). max_confidence: see MAX_CONFIDENCE.
    """

    bits: Sequence[int] | None = None
    rtol: float = 0.05
    max_hvp: int = 2000
    estimator: str = AUTO
    curvature: str = DEFAULT_CURVATURE
    gn_columns: int = DEFAULT_GN_COLUMNS
    backend: str = "auto"
    seed: int = 0
    include_fixed: bool = True
    floor: float = 0.01
    block: int = 8
    sketch: int = 16
    top_k: int = 0
    density: bool = False
    activations: bool = False
    at: Any = None
    max_confidence: float = MAX_CONFIDENCE

    def validate(self) -> None:
        if self.estimator not in SENSITIVITY_ESTIMATORS:
            raise SensitivityError(
                f"unknown estimator {self.estimator!r}; accepted: {', '.join(SENSITIVITY_ESTIMATORS)}"
            )
        if self.curvature not in CURVATURES:
            raise SensitivityError(f"unknown curvature {self.curvature!r}; accepted: {', '.join(CURVATURES)}")
        if self.estimator == "exact" and self.needs_hvp:
            raise SensitivityError(
                "--estimator exact gives traces only; use --estimator layer with --top-k, --density or --activations"
            )
        if self.backend not in BACKENDS:
            raise SensitivityError(f"unknown backend {self.backend!r}; accepted: {', '.join(BACKENDS)}")
        if not (self.rtol >= 0 and self.max_hvp >= 1):
            raise SensitivityError(f"rtol must be ≥ 0 and max_hvp ≥ 1 (got rtol={self.rtol}, max_hvp={self.max_hvp})")
        if not (isinstance(self.gn_columns, int) and self.gn_columns >= 0 and self.gn_columns != 1):
            raise SensitivityError(f"gn_columns must be 0 (all) or an int ≥ 2, got {self.gn_columns!r}")

    @property
    def needs_hvp(self) -> bool:
        """Whether something besides the traces needs the HVP operator (eigenvalues, density, activations)."""
        return bool(self.top_k or self.density or self.activations)


def _hutchinson(op: HessianOperator, estimator: str, c: SensitivityConfig, progress: bool):
    """Hessian traces by the Hutchinson ``estimator`` on ``op`` (with a tqdm bar of HVPs when ``progress``)."""
    pbar = None
    try:
        if progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=c.max_hvp, desc="HVPs", unit="hvp", file=sys.stderr)
        return estimate_traces(
            op,
            estimator,
            rtol=c.rtol,
            max_hvp=c.max_hvp,
            block=c.block,
            seed=c.seed,
            floor=c.floor,
            sketch=c.sketch,
            progress=pbar,
        )
    finally:
        if pbar is not None:
            pbar.close()


def _extras(op, net, batches, names, c: SensitivityConfig, loss_fn, weight_only: bool):
    """(top eigenvalues | None, SLQ density | None, activation-trace frame | None) from the HVP operator."""
    eig = dens = act = None
    if c.top_k > 0:
        mv, n = operator_matvec(op)
        eig = top_eigenvalues(mv, n, c.top_k, seed=c.seed, device=op.device).tolist()
    if c.density:
        mv, n = operator_matvec(op)
        dens = slq_density(mv, n, seed=c.seed, device=op.device)
    if c.activations and not weight_only:  # weight-only: activations run at a fixed width, nothing to search
        kw = dict(rtol=c.rtol, max_probes=max(c.max_hvp // 8, 16), block=c.block, seed=c.seed, floor=c.floor)
        act = activation_traces(net, batches, names, loss_fn=loss_fn, **kw).to_frame().drop(columns=["exact"])
    return eig, dens, act


def _measure(
    net, batches, names, c: SensitivityConfig, loss_fn, choice: EstimatorChoice, per_layer, progress, weight_only=False
):
    """(driving TraceResult, both-curvature columns, (eig, density, activations), HessianOperator | None,
    Gauss–Newton result | None) of ``net``: Hutchinson and/or the per-sample Gauss–Newton estimator as
    ``choice`` says."""
    params = {f"{n}.weight": net.get_submodule(n).weight for n in names}
    hess = gn = op = None
    extras: tuple = (None, None, None)
    if choice.hessian_by == "hutchinson" or c.needs_hvp:
        op = HessianOperator(net, batches, params, loss_fn=loss_fn, backend=c.backend, max_block=c.block)
        if choice.hessian_by == "hutchinson":
            hess = _hutchinson(op, choice.used, c, progress)
        extras = _extras(op, net, batches, names, c, loss_fn, weight_only)
        op.clear()
    if choice.gn:  # per-sample Gauss-Newton columns (exact, or sampled with an SE)
        gn = exact_layer_traces(net, batches, params, classes=c.gn_columns or None, seed=c.seed)
    drive, cols = both_traces(hess, gn, choice, per_layer)
    return drive, cols, extras, op, gn


def _table(res, spec, qlayers, bits: list[int], both: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """The per-layer frame (trace columns of the driving curvature, ``both`` curvatures' columns, negative flags,
    Ω per bit, rank) and the Ω dict."""
    frame = res.to_frame().drop(columns=["hessian_exact"], errors="ignore")
    if both is not None:
        frame = pd.concat([frame, both.reset_index(drop=True)], axis=1)
    frame.insert(int(frame.columns.get_loc("stderr")) + 1, "stderr_per_param", frame.stderr / frame.n_params)
    frame["layer"] = [n[: -len(".weight")] for n in frame.layer]
    frame["searchable"] = [n not in spec.fixed for n in frame.layer]
    frame["negative"] = frame.trace < 0
    frame["significant_negative"] = frame.trace + 2 * frame.stderr < 0
    t = dict(zip(frame.layer, frame.trace_per_param.astype(float), strict=False))
    perturb = {n: {b: weight_perturbation(qlayers[n], b) for b in bits} for n in frame.layer[frame.searchable]}
    omega = omega_table(t, perturb)
    for b in bits:
        frame[f"omega_{b}"] = [omega[n][str(b)] if n in omega else np.nan for n in frame.layer]
    low = f"omega_{min(bits)}"
    order = frame[frame.searchable].sort_values([low, "trace_per_param"], ascending=False).layer
    rank = {n: i + 1 for i, n in enumerate(order)}
    frame["rank"] = [rank.get(n, 0) for n in frame.layer]
    return frame, omega


def _meta(res, op, outputs: dict, quantized_input: bool, n_total: int, n_batches: int) -> dict:
    """The result's ``meta``: estimator, HVP count, backend (per-sample-vjp when ``op`` is None), settings, data."""
    return {
        "estimator": res.estimator,
        "total_hvp": int(res.total_hvp),
        "backend": op.backends_used() if op is not None else "per-sample-vjp",
        "calibration": op.calibration if op is not None else None,
        "settings": res.settings,
        "quantized_input": quantized_input,
        "outputs": outputs,
        "n_samples": n_total,
        "n_batches": n_batches,
        "negative_policy": "omega uses max(t, 0)",
        "se_convention": SE_CONVENTION,
        "torch": torch.__version__,
    }


OMEGA_TERMS = "weight perturbation only: omega_l(b) = max(t_l, 0) * ||Q_b(W_l) - W_l||^2"


def _losses(loss_fn, task: str):
    """(the caller's custom loss or None for the task's own, the loss to differentiate).  F.cross_entropy on a
    classification task is the task's loss by its other name."""
    if loss_fn is F.cross_entropy and task == "classification":
        loss_fn = None
    return loss_fn, loss_fn or functools.partial(task_loss_fn, task)


def _curvature_meta(c: SensitivityConfig, choice: EstimatorChoice, gn, weight_only: bool, task: str) -> dict:
    """``meta`` entries: the estimator choice and why, the curvature driving Ω, how the Gauss–Newton traces were
    measured (None if not), weight-only mode (activation traces skipped), Ω's terms and the task."""
    meta = {
        "estimator_choice": choice.to_dict(),
        "curvature": "gauss-newton" if c.curvature == "gn" else "hessian",
        "gauss_newton": gn_meta(gn),
        "weight_only": weight_only,
        "omega_terms": OMEGA_TERMS,
        "task": task,
    }
    if c.activations and weight_only:
        meta["activations"] = "skipped: weight-only model (activations run at a fixed width; nothing to search)"
    return meta


def _measured_on(on: dict | None, batches: list, n_total: int, task: str) -> dict:
    """What the traces were measured on: the caller's record plus sizes (images, or windows × bytes for an LM)."""
    out = {**(on or {}), "n_samples": n_total, "n_batches": len(batches), "task": task}
    if task == "lm":
        T = int(batches[0][0].shape[1])
        out.update(n_windows=n_total, bytes_per_window=T, n_bytes=n_total * T)
        out.pop("n_images", None)
    else:
        out["n_images"] = n_total
    return out


def _plan(net, batches, names, c: SensitivityConfig, task_loss: bool) -> tuple[EstimatorChoice, dict]:
    """(estimator choice, {"<layer>.weight": exactness reasons}) for ``net`` at its active config."""
    params = {f"{n}.weight": net.get_submodule(n).weight for n in names}
    per_layer = per_layer_exactness(net, batches[0][0][:1].to(next(net.parameters()).device), params)
    try:
        choice = choose_estimator(c.estimator, c.curvature, per_layer, task_loss, c.needs_hvp)
    except HasbError as e:
        raise SensitivityError(str(e)) from None
    return choice, per_layer


def compute_sensitivity(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    config: SensitivityConfig | None = None,
    *,
    loss_fn=None,
    task: str = "classification",
    progress: bool = False,
    fingerprint: str = "",
    model_name: str | None = None,
    measured_on: dict | None = None,
) -> SensitivityResult:
    """Per-layer curvature traces (with SE) of a trained network and the Ω table for ``config.bits``.

    Args:
        model: a float model (measured as it is; a quantized deep copy supplies Q_b) or a hasb quantized model,
            measured where ``config.at`` says (:func:`measured_network`; default its highest candidate bit, never
            the untrained fp path); its learned w_scale defines Q_b.
        batches: list of (x, y): images x [B, C, H, W] with labels y [B], or byte windows x, y [B, T] (task "lm");
            the curvature is of their sample-weighted mean loss.
        config: estimator settings (default ``SensitivityConfig()``: estimator auto, curvature hessian).
        loss_fn: None (default) = the task's softmax cross-entropy (:func:`hasb.data.loss_fn`, next-byte for
            "lm"); any other (logits, y) → scalar disables the Gauss–Newton trace and the saturation check.
        task: "classification" or "lm" (a :class:`hasb.data.Splits` ``task``).
        measured_on: what the batches are (e.g. {"data", "split"}), recorded in the result with the sizes.
    Raises DegenerateSensitivityError for a saturated softmax, a non-finite loss, all-zero traces or any
    non-finite trace or standard error.
    """
    c = config or SensitivityConfig()
    c.validate()
    batches = list(batches)
    if not batches:
        raise SensitivityError("no batches: the Hessian needs at least one (x, y) batch")
    loss_fn, loss = _losses(loss_fn, task)
    task_loss = loss_fn is None
    qmodel, bits = _q_reference(model, c.bits, batches[0][0])
    spec = qmodel.hasb_spec
    weight_only = bool(getattr(getattr(model, "hasb_spec", None), "weight_only", False))
    names = [n for n in spec.order if c.include_fixed or n not in spec.fixed]
    net, where, measured_at = measured_network(model, c.at)
    with where:
        outputs = check_outputs(net, batches, loss_fn, c.max_confidence, task)
        choice, per_layer = _plan(net, batches, names, c, task_loss)
        res, both, (eig, dens, act), op, gn = _measure(
            net, batches, names, c, loss, choice, per_layer, progress, weight_only
        )
    frame, omega = _table(res, spec, quantized_layers(qmodel), bits, both)
    check_traces(frame, c.max_hvp)
    n_total = int(op.n_total) if op is not None else int(gn.n_samples)
    meta = _meta(res, op, outputs, qmodel is model, n_total, len(batches))
    meta.update(_curvature_meta(c, choice, gn, weight_only, task))
    name = model_name or (build_record(model) or {}).get("name", type(model).__name__)
    on = _measured_on(measured_on, batches, n_total, task)
    negative = list(frame.layer[frame.negative])
    return SensitivityResult(frame, bits, omega, negative, name, fingerprint, eig, dens, act, meta, measured_at, on)


# -- CLI --------------------------------------------------------------------------------------------------------
STAGE_PREFIX = ".sensitivity."  # temp folders in --out; stale ones (a killed run) are removed on start
OUTPUTS = ("sensitivity.csv", "sensitivity.png", "sensitivity.json")
MANIFEST = "sensitivity.manifest.json"  # written last: sha256 of each output; the cache trusts only a match
EXPORT_KEYS = ("spec", "build", "config", "layers", "rest")


@dataclass
class SensitivityCLIConfig:
    """``python -m analysis.sensitivity``: each option declared once (hasb.cli.option) with its help."""

    model: str = model_option(required=True)
    out: Path = option(
        None,
        required=True,
        parse=Path,
        help="output folder (e.g. runs/demo): sensitivity.json, "
        ".csv, .png and a manifest; reused when model, checkpoint, data and settings are unchanged",
    )
    data: str = data_option()
    data_dir: str | None = data_dir_option()
    data_opt: dict = data_opts_option("context defaults to the LM's own")
    split: str = option(
        "calib",
        choices=("calib", "val", "train", "test"),
        help="examples (images, or byte windows of an LM): calib (a fixed train subset, the paper's ~1000 "
        "training images), val, train, test",
    )
    checkpoint: Path | None = option(
        None,
        parse=Path,
        help="hasb export (hasb.export.save_quantized) or a float "
        "state_dict; default: random init with --seed (traces of an untrained model "
        "say little)",
    )
    at: str | None = option(
        None,
        help="which network of a hasb export to measure: fp (its float twin: float "
        "weights, BN entries of the top bit), a uniform bit (e.g. 8) or a BitConfig JSON file "
        "(default: the highest candidate bit); never the export's untrained fp path",
    )
    bits: list | None = option(
        None,
        parse=parse_bits,
        help="candidate bits for Ω, e.g. 8,6,4,2 (default: the checkpoint's candidates, else 8,6,4,2)",
    )
    batches: int = option(4, help="number of batches")
    batch_size: int = option(256, help="examples (images or byte windows) per batch (4 × 256 = 1024 images)")
    rtol: float = option(
        0.05, help="stop when every layer's SE ≤ rtol·|trace| (layers below --floor of the largest use floor·largest)"
    )
    floor: float = option(0.01, help="relative floor of the stopping rule")
    max_hvp: int = option(2000, help="budget of Hessian-vector products")
    estimator: str = option(
        AUTO,
        choices=SENSITIVITY_ESTIMATORS,
        help="auto (default): exact where the net is piecewise linear in every measured layer (ReLU-like, BN in "
        "eval, each weight used once), else layer; printed and recorded with the reason. exact: per-sample "
        "Gauss-Newton columns, equal to the Hessian block trace for piecewise-linear nets (reported per layer as "
        "hessian_exact), no SE when all columns are used; layer: layer-restricted Hutchinson (fewest HVPs on "
        "ResNet-20, see benchmarks/RESULTS.md); hutchpp: per-layer Hutch++ deflation; full: full-model probes "
        "(PyHessian-style)",
    )
    curvature: str = option(
        DEFAULT_CURVATURE,
        choices=CURVATURES,
        help="which trace drives HASB and Ω: hessian (default) or gn (Gauss-Newton, PSD). For nets that are not "
        "piecewise linear (GELU, softmax attention) both are measured and recorded per layer (hessian_trace, "
        "gn_trace); for piecewise-linear ones they are equal",
    )
    gn_columns: int = option(
        DEFAULT_GN_COLUMNS,
        help="Gauss-Newton columns per sample: all (exact) when a sample has at most this many (classes, or "
        "positions × 256 bytes for an LM), else this many sampled, with an SE; 0 = always all",
    )
    sketch: int = option(16, help="hutchpp sketch columns per layer")
    block: int = option(8, help="probes per layer per round / vmap block")
    backend: str = option(
        "auto",
        choices=BACKENDS,
        help="HVP backend: auto (ggn_block for layer-restricted probes on piecewise-linear nets, else the faster of "
        "the next two, timed on the first batch), double_backward, func (vmap(jvp(grad))), ggn_block (J_lᵀ∇²L J_l v)",
    )
    top_k: int = option(0, help="also compute the top-k Hessian eigenvalues (Lanczos)")
    density: bool = option(False, help="also compute the eigenvalue density (SLQ)")
    activations: bool = option(False, help="also compute activation-Hessian traces (w.r.t. each layer's input)")
    exclude_fixed: bool = option(False, help="skip traces of fixed (first/last) layers")
    max_confidence: float = option(
        MAX_CONFIDENCE,
        help="refuse a network whose mean max softmax probability on "
        "the images exceeds this (a saturated softmax has ~0 curvature); 1 disables",
    )
    device: str = device_option()
    seed: int = seed_option()
    threads: int | None = threads_option()
    force: bool = force_option()
    progress: bool = quiet_option()

    def estimator_config(self, at) -> SensitivityConfig:
        return SensitivityConfig(
            bits=self.bits,
            rtol=self.rtol,
            max_hvp=self.max_hvp,
            estimator=self.estimator,
            curvature=self.curvature,
            gn_columns=self.gn_columns,
            backend=self.backend,
            seed=self.seed,
            include_fixed=not self.exclude_fixed,
            floor=self.floor,
            block=self.block,
            sketch=self.sketch,
            top_k=self.top_k,
            density=self.density,
            activations=self.activations,
            at=at,
            max_confidence=self.max_confidence,
        )


def parse_at(text: str):
    """``--at``: "fp" (the float twin), a uniform bit ("8") or a BitConfig JSON file → "fp", int or BitConfig."""
    t = text.strip().lower()
    if t in ("fp", "float"):
        return "fp"
    if t.isdigit():
        return int(t)
    if not Path(text).is_file():
        raise SensitivityError(f"--at {text!r} is neither 'fp', a bit (e.g. 8), nor a BitConfig JSON file")
    return BitConfig.load(text)


def remove_stale_stages(out: Path) -> None:
    """Stage folders a killed run left in ``out`` (named ``.sensitivity.*``): committed ones rolled forward,
    the others removed (hasb.outset.recover; other writers' temp files in a shared --out are left alone)."""
    outset.recover(out, STAGE_PREFIX, temp_glob=None)


_file_digest = outset.file_digest


def state_digest(model: nn.Module) -> str:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model: nn.Module, checkpoint: Path | None, data: dict, settings: dict) -> str:
    """Cache key: model build + weights + checkpoint bytes + data selection + settings."""
    blob = json.dumps(
        {
            "build": build_record(model),
            "state": state_digest(model),
            "checkpoint": _file_digest(checkpoint) if checkpoint else None,
            "data": data,
            "settings": settings,
            "version": VERSION,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def check_checkpoint(path: Path, model_name: str) -> dict:
    """The checkpoint dict, its structure checked (an export's keys, its model = ``model_name``) before any import.

    A checkpoint never chooses what code is imported: an export's recorded model must be the one named by --model.
    """
    if path.is_file() and path.stat().st_size == 0:
        raise CheckpointError(f"--checkpoint {path} is an empty file; give a hasb export or a float state_dict")
    obj = read_checkpoint(path)
    if obj.get("format") != FORMAT:
        return obj
    missing = [k for k in EXPORT_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is a malformed hasb export: missing {missing}; re-export it")
    try:
        build = json.loads(obj["build"]) or {}
        json.loads(obj["spec"]), json.loads(obj["config"])
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is a malformed hasb export: {type(e).__name__} in its JSON fields") from None
    if not isinstance(build, dict) or build.get("name") != model_name:
        got = build.get("name") if isinstance(build, dict) else build
        raise SensitivityError(f"--checkpoint {path} holds a {got!r} model, not --model {model_name!r}")
    return obj


def _float_state(checkpoint: Path, obj: dict) -> dict:
    """The tensors of a float checkpoint (a state_dict, or one under "state_dict" / "model"); CheckpointError else."""
    state = obj
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{checkpoint} is neither a hasb export nor a float state_dict (a dict of tensors)")
    return state


def load_model(name: str, checkpoint: Path | None, obj: dict | None, dims: dict, seed: int) -> nn.Module:
    """A zoo model: from a hasb export, from a float state_dict, or freshly initialised with ``seed``.

    ``dims``: build_model's keywords (num_classes, in_channels, image_size); a byte LM's float state_dict also
    fixes its context (the rows of ``pos.weight``).
    """
    if checkpoint is None:
        torch.manual_seed(seed)
        return build_model(name, **dims)
    assert obj is not None
    if obj.get("format") == FORMAT:
        return load_quantized(checkpoint, trusted_model=name)[0]
    state = _float_state(checkpoint, obj)
    if _is_lm_name(name) and isinstance(state.get("pos.weight"), torch.Tensor):
        dims = {**dims, "context": int(state["pos.weight"].shape[0])}
    model = build_model(name, **dims)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[1:2] or [str(e)[:200]]
        raise CheckpointError(f"{checkpoint} does not fit --model {name}: {first[0].strip()[:200]}") from None
    return model


LM_DIMS = dict(num_classes=256, in_channels=1, image_size=None)  # the zoo LMs ignore them (hasb.models.lm)


def _is_lm_name(name: str) -> bool:
    """A zoo byte-level language model (``lm_tiny``, ``lm_small``): built before the data, which takes its context."""
    return ":" not in name and name.startswith("lm_")


def _text_spec(spec: str) -> bool:
    return spec.strip() == "python-stdlib" or spec.strip().startswith("text:")


def load_model_and_data(cfg: SensitivityCLIConfig, obj: dict | None, calib_size: int):
    """(model, splits).  A zoo LM is built first and its context becomes the text source's window length unless
    --data-opt sets one; a vision model is built for the data's classes and shape.  Mismatches (an LM on images,
    a vision model on byte windows, windows longer than the LM's context) are one-line SensitivityErrors."""
    opts = dict(cfg.data_opt or {})
    model = None
    if _is_lm_name(cfg.model):
        model = load_model(cfg.model, cfg.checkpoint, obj, LM_DIMS, cfg.seed)
        if _text_spec(cfg.data) and getattr(model, "context", None):
            opts.setdefault("context", int(model.context))
    splits = load_dataset(cfg.data, cfg.data_dir, calib_size=calib_size, **opts)
    if (splits.task == "lm") != _is_lm_name(cfg.model) and ":" not in cfg.model:
        what = "byte windows (a language-model task)" if splits.task == "lm" else "images (classification)"
        raise SensitivityError(
            f"--data {cfg.data} gives {what}, which --model {cfg.model} does not take; accepted: lm_tiny / lm_small "
            f"with text:PATH_OR_GLOB or python-stdlib, a vision model with image data"
        )
    if model is None:
        dims = dict(num_classes=splits.num_classes, in_channels=splits.in_channels, image_size=splits.image_size)
        model = load_model(cfg.model, cfg.checkpoint, obj, dims, cfg.seed)
    ctx = getattr(model, "context", None)
    if splits.task == "lm" and isinstance(ctx, int) and splits.input_shape[0] > ctx:
        raise SensitivityError(
            f"--data windows of {splits.input_shape[0]} bytes are longer than the model's context of {ctx}; "
            f"pass --data-opt context={ctx} (or less)"
        )
    return model, splits


def validate(cfg: SensitivityCLIConfig) -> tuple[torch.device, Any, dict | None]:
    """Every cheap check before any data or HVP: numbers, --out, --device, --at, --checkpoint.

    Returns (device, parsed --at, checkpoint dict or None).
    """
    for k in ("batches", "batch_size", "max_hvp", "sketch", "block"):
        if getattr(cfg, k) < 1:
            raise SensitivityError(f"--{k.replace('_', '-')} must be ≥ 1, got {getattr(cfg, k)}")
    if cfg.top_k < 0:
        raise SensitivityError(f"--top-k must be ≥ 0, got {cfg.top_k}")
    if cfg.gn_columns < 0 or cfg.gn_columns == 1:
        raise SensitivityError(f"--gn-columns must be 0 (all columns) or ≥ 2 (sampled), got {cfg.gn_columns}")
    if not (cfg.rtol >= 0 and math.isfinite(cfg.rtol)) or not 0 <= cfg.floor < 1:
        raise SensitivityError(f"--rtol must be finite ≥ 0 and --floor in [0, 1) (got {cfg.rtol}, {cfg.floor})")
    if not 0 < cfg.max_confidence <= 1:
        raise SensitivityError(f"--max-confidence must be in (0, 1], got {cfg.max_confidence}")
    check_model_name(cfg.model)
    check_out_dir(cfg.out)
    device = resolve_device(cfg.device)
    set_threads(cfg.threads)
    at = parse_at(cfg.at) if cfg.at else None
    obj = check_checkpoint(cfg.checkpoint, cfg.model) if cfg.checkpoint is not None else None
    if at not in (None, "fp") and (obj is None or obj.get("format") != FORMAT):
        raise SensitivityError(f"--at {cfg.at} needs a hasb export as --checkpoint; a float model is measured as is")
    return device, at, obj


def cached(out: Path, fp: str) -> bool:
    """True when the manifest (written last) has fingerprint ``fp`` and every output's sha256 still matches."""
    man = outset.verify(out, MANIFEST)
    return man is not None and man.get("fingerprint") == fp and set(OUTPUTS) <= set(man["sha256"])


def write_outputs(res: SensitivityResult, out: Path, title: str) -> Path:
    """Write csv, png and json as one set (hasb.outset: rendered in a stage folder in ``out``, renamed in, the
    manifest last), so a crash at any point leaves no manifest that vouches for a mixed set."""
    with outset.staged_set(out, MANIFEST, prefix=STAGE_PREFIX) as st:
        t = st.path
        res.to_csv(t / "sensitivity.csv")
        fig = plot_traces(res.frame, value="trace_per_param", title=title)
        save_figure(fig, t / "sensitivity.png")
        plt.close(fig)
        res.to_json(t / "sensitivity.json")
        st.meta["fingerprint"] = res.fingerprint
    return out / MANIFEST


def _batches_of(cfg: SensitivityCLIConfig, splits) -> list:
    n = cfg.batches * cfg.batch_size
    x, y = getattr(splits, cfg.split)
    if len(x) < n:
        unit = "windows" if splits.task == "lm" else "images"
        raise SensitivityError(f"--batches × --batch-size = {n} exceeds the {len(x)} {unit} of split {cfg.split}")
    return [(x[i : i + cfg.batch_size], y[i : i + cfg.batch_size]) for i in range(0, n, cfg.batch_size)]


def _json_safe(d: dict) -> dict:
    """``d`` with anything JSON cannot hold (paths, numpy scalars) as strings / numbers."""
    return json.loads(json.dumps(d, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def cli_measured_on(cfg: SensitivityCLIConfig, splits) -> dict:
    """What the CLI measures on: data, split, batches, and the source's own record (``source``: splits.describe(),
    e.g. python-stdlib's Python version, files and bytes per split); ``python`` lifted to the top when present."""
    src = _json_safe(splits.describe())
    on = {"data": cfg.data, "split": cfg.split, "batches": cfg.batches, "batch_size": cfg.batch_size, "source": src}
    if "python" in src:
        on["python"] = src["python"]
    if splits.task == "lm":
        on["bytes_per_window"] = int(splits.input_shape[0])
    return on


def _where(on: dict) -> str:
    """ "<data> <split> split, N images" or "..., N windows × T bytes = M bytes" from a measured_on record."""
    head = f"{on.get('data', '?')} {on.get('split', '?')} split"
    if on.get("task") == "lm":
        return f"{head}, {on['n_windows']} windows × {on['bytes_per_window']} bytes = {on['n_bytes']} bytes"
    return f"{head}, {on.get('n_images', '?')} images"


def run_sensitivity(cfg: SensitivityCLIConfig) -> int:
    """The CLI's one library call: validate, load, reuse a verified cache or compute, write the set atomically."""
    device, at, obj = validate(cfg)
    n = cfg.batches * cfg.batch_size
    model, splits = load_model_and_data(cfg, obj, max(1024, n) if cfg.split == "calib" else 1024)
    batches = _batches_of(cfg, splits)  # the last bad-input checks: nothing is written before them
    # one writer per --out (rank 0 writes; a second run fails at once with one line instead of mixing sets)
    with out_lock(cfg.out) if _is_rank0() else contextlib.nullcontext():
        return _measure_and_write(cfg, device, at, model.to(device), splits, batches)


def _measure_and_write(cfg: SensitivityCLIConfig, device, at, model, splits, batches) -> int:
    remove_stale_stages(cfg.out)
    scfg = cfg.estimator_config(at)
    measured_on = cli_measured_on(cfg, splits)
    fp = fingerprint(model, cfg.checkpoint, measured_on, {"cfg": asdict(scfg), "at": str(cfg.at)})
    if not cfg.force and cached(cfg.out, fp):
        print(f"cached: {cfg.out / 'sensitivity.json'} (fingerprint {fp}); --force recomputes")
        return 0
    res = compute_sensitivity(
        model,
        batches,
        scfg,
        task=splits.task,
        progress=cfg.progress,
        fingerprint=fp,
        model_name=cfg.model,
        measured_on=measured_on,
    )
    res.meta.update({"checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None, "device": str(device)})
    if _is_rank0():
        _report(res, cfg)
    return 0


def _report(res: SensitivityResult, cfg: SensitivityCLIConfig) -> None:
    """Write the outputs and print what was measured, how (estimator and why, curvature) and the table."""
    m = res.meta
    ch = m["estimator_choice"]
    write_outputs(res, cfg.out, f"{cfg.model}: Tr/n_l, {m['curvature']} ({m['estimator']}; {_where(res.measured_on)})")
    print(
        f"wrote {cfg.out / 'sensitivity.json'}: {len(res.frame)} layers, {m['total_hvp']} HVPs "
        f"({m['backend']}), negative traces: {res.negative_traces or 'none'}"
    )
    print(res.table())
    print(f"estimator: {ch['used']} ({'auto: ' if ch['requested'] == 'auto' else ''}{ch['why']})")
    gn = m.get("gauss_newton")
    if gn is not None:
        how = f"{gn['columns_per_sample']} sampled columns per sample, ± 1 SE" if gn["sampled"] else "all columns"
        print(f"Gauss-Newton traces: {how}; Ω driven by the {m['curvature']} trace (--curvature)")
    if "activations" in m:
        print(f"activation traces {m['activations']}")


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _init_distributed() -> bool:
    """Join a torchrun job (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return True
    return False


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit 2), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="python -m analysis.sensitivity",
        description=(
            "Per-layer Hessian traces with standard errors and the bit-sensitivity table "
            "Ω_l(b) = Tr(H_l)/n_l · ||Q_b(W_l) - W_l||² of a trained network. Writes sensitivity.json/.csv/.png to "
            "--out; reuses them when the model, checkpoint, data and settings are unchanged."
        ),
    )
    return add_options(p, SensitivityCLIConfig)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    started = _init_distributed()
    try:
        return run_cli(lambda: run_sensitivity(config_from_args(SensitivityCLIConfig, ns)))
    finally:
        if started:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
