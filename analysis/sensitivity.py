"""Per-layer bit sensitivity from Hessian traces: Ω_l(b) = (Tr(H_l)/n_l) · ‖Q_b(W_l) − W_l‖².

HAWQ-V2/V3's objective with hasb's Double Rounding quantizer: the second-order
Taylor term ½ΔWᵀH_llΔW of a perturbation ΔW_l = Q_b(W_l) − W_l, with H_ll
replaced by its isotropic average (Tr(H_ll)/n_l)·I.  The per-parameter trace
t_l = Tr(H_ll)/n_l is the vector HASB turns into bit probabilities.  Traces are
computed on the **float** model (the paper's setup: hasb.set_fp for a quantized
model, restored after); ‖Q_b(W)−W‖² uses ``layer.quant_weight(b)``, on a
quantized deep copy when a float model is given.

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

CLI::

    python -m analysis.sensitivity --model resnet20 --data fashion-mnist --out runs/demo
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from hasb.sensitivity_file import (LAYER_KEYS, VERSION, SensitivityError, load_sensitivity,
                                   validate_sensitivity)

from .hvp import BACKENDS, HessianOperator, weight_params
from .spectrum import operator_matvec, slq_density, top_eigenvalues
from .trace import DEFAULT_ESTIMATOR, ESTIMATORS, activation_traces, estimate_traces

DEFAULT_BITS = (8, 6, 4, 2)


@dataclass
class SensitivityResult:
    """Per-layer traces, Ω table and ranking.

    ``frame`` columns: layer, n_params, trace, trace_per_param, stderr, n_hvp, searchable, negative,
    significant_negative, exact, converged, omega_<b> for each bit (NaN for fixed layers), rank
    (1 = most sensitive by Ω at the lowest bit; searchable layers only).
    """

    frame: pd.DataFrame
    bits: list[int]
    omega: dict[str, dict[str, float]]
    negative_traces: list[str]
    model_name: str = ""
    fingerprint: str = ""
    eigenvalues: Optional[list[float]] = None
    density: Optional[dict] = None
    activation: Optional[pd.DataFrame] = None
    meta: dict = field(default_factory=dict)
    measured_at: dict = field(default_factory=dict)   # which network: see measured_network

    @property
    def trace_per_param(self) -> dict[str, float]:
        """t_l = Tr(H_ll)/n_l of the searchable layers (HASB's input), raw (may be negative)."""
        f = self.frame[self.frame.searchable]
        return dict(zip(f.layer, f.trace_per_param.astype(float)))

    def ranking(self) -> list[str]:
        """Searchable layers, most sensitive first."""
        f = self.frame[self.frame.searchable].sort_values("rank")
        return list(f.layer)

    def to_dict(self) -> dict:
        rows = []
        for r in self.frame.to_dict(orient="records"):
            rows.append({k: _py(v) for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))})
        d = {"version": VERSION, "model": self.model_name, "fingerprint": self.fingerprint, "bits": list(self.bits),
             "layers": rows, "omega": self.omega, "negative_traces": list(self.negative_traces),
             "measured_at": self.measured_at, "meta": self.meta}
        if self.eigenvalues is not None:
            d["eigenvalues"] = [float(e) for e in self.eigenvalues]
        if self.density is not None:
            d["density"] = {"grid": [float(v) for v in self.density["grid"]],
                            "density": [float(v) for v in self.density["density"]]}
        if self.activation is not None:
            d["activation"] = [{k: _py(v) for k, v in r.items()} for r in self.activation.to_dict(orient="records")]
        return d

    def to_json(self, path: Union[str, Path]) -> Path:
        """Write the contract JSON atomically (temp file + rename)."""
        from hasb import atomic_write_text
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False))

    def to_csv(self, path: Union[str, Path]) -> Path:
        from hasb import atomic_write_text
        return atomic_write_text(path, self.frame.to_csv(index=False))


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
    from hasb.quantize import float_twin, get_config, use_config

    if getattr(model, "hasb_spec", None) is None:
        if at not in (None, "fp"):
            raise SensitivityError(f"at={at!r} applies to hasb quantized models; a float model is measured as it is "
                                   "(pass at=None or 'fp')")
        return model, contextlib.nullcontext(), {"network": "float"}
    top = int(model.hasb_spec.bits[0])
    if at == "fp":
        return float_twin(model, top), contextlib.nullcontext(), {"network": "float_twin", "bn_bit": top}
    cfg = top if at is None else at
    with use_config(model, cfg):        # validates cfg against the model now, before any work
        active = get_config(model)
    uniform = active.is_uniform()
    record = {"network": "quantized", "uniform_bit": uniform, "config": json.loads(active.to_json(indent=None))}
    return model, use_config(model, cfg), record


def check_outputs(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], loss_fn=F.cross_entropy,
                  max_confidence: float = MAX_CONFIDENCE) -> dict:
    """Mean loss and mean max softmax probability over ``batches`` (sample-weighted); Degenerate... if unusable.

    Returns {"loss": float, "mean_max_prob": float (NaN for a non-default loss_fn), "n_images": int}.
    """
    dev = next(model.parameters()).device
    model.eval()
    tot_loss = tot_p = 0.0
    n = 0
    with torch.no_grad():
        for x, y in batches:
            out = model(x.to(dev))
            tot_loss += float(loss_fn(out, y.to(dev))) * len(y)
            tot_p += float(out.double().softmax(-1).amax(-1).sum())
            n += len(y)
    loss, pmax = tot_loss / n, tot_p / n
    if not math.isfinite(loss):
        raise DegenerateSensitivityError(f"the measured network's loss is {loss} on the {n} calibration images; "
                                         "check the checkpoint (was it trained?) and which network is measured (--at)")
    if loss_fn is not F.cross_entropy:
        pmax = float("nan")          # the softmax check is the cross-entropy's; other losses are the caller's
    elif pmax > max_confidence:
        raise DegenerateSensitivityError(
            f"saturated softmax: mean max-probability {pmax:.6f} > {max_confidence} on the {n} calibration images "
            "(its Hessian is ~0); check the checkpoint was trained and that --at names a trained network "
            "(e.g. --at 8, or --at fp for the float twin)")
    return {"loss": loss, "mean_max_prob": pmax, "n_images": n}


def check_traces(frame: pd.DataFrame, max_hvp: int) -> None:
    """DegenerateSensitivityError on all-zero traces or any non-finite trace / standard error."""
    bad = frame[~np.isfinite(frame.trace.to_numpy(float))]
    if len(bad):
        raise DegenerateSensitivityError(f"non-finite trace for layer(s) {list(bad.layer)[:3]}; check the checkpoint "
                                         "and the measured network (--at)")
    bad = frame[~np.isfinite(frame.stderr.to_numpy(float))]
    if len(bad):
        raise DegenerateSensitivityError(f"no finite standard error for layer(s) {list(bad.layer)[:3]} (fewer than 2 "
                                         f"probes within max_hvp={max_hvp}); raise --max-hvp")
    if (frame.trace == 0).all():
        raise DegenerateSensitivityError("every layer's Hessian trace is exactly 0: the measured network has no "
                                         "curvature (saturated or dead); check the checkpoint and --at")


def _q_reference(model: nn.Module, bits, example: torch.Tensor) -> tuple[nn.Module, list[int]]:
    """(quantized model that supplies Q_b for Ω, bits sorted high → low); checks ``bits``."""
    import hasb

    if getattr(model, "hasb_spec", None) is not None:
        spec_bits = tuple(model.hasb_spec.bits)
        bits = tuple(spec_bits if bits is None else bits)
        bad = [b for b in bits if b not in spec_bits]
        if bad:
            raise SensitivityError(f"bits {bad} are not candidates of the quantized model; accepted: "
                                   f"{', '.join(map(str, spec_bits))}")
        return model, sorted({int(b) for b in bits}, reverse=True)
    bits = tuple(DEFAULT_BITS if bits is None else bits)
    if not bits or any(not isinstance(b, int) or not 1 <= b <= 8 for b in bits):
        raise SensitivityError(f"bits must be integers in 1..8, got {list(bits)}")
    p0 = next(model.parameters())
    q = hasb.quantize_model(copy.deepcopy(model), bits=bits, example_input=example[:2].to(p0.device, p0.dtype))
    return q, sorted({int(b) for b in bits}, reverse=True)


def _check_settings(estimator: str, backend: str, rtol: float, max_hvp: int, batches) -> list:
    if estimator not in ESTIMATORS:
        raise SensitivityError(f"unknown estimator {estimator!r}; accepted: {', '.join(ESTIMATORS)}")
    if backend not in BACKENDS:
        raise SensitivityError(f"unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")
    if not (rtol >= 0 and max_hvp >= 1):
        raise SensitivityError(f"rtol must be ≥ 0 and max_hvp ≥ 1 (got rtol={rtol}, max_hvp={max_hvp})")
    batches = list(batches)
    if not batches:
        raise SensitivityError("no batches: the Hessian needs at least one (x, y) batch")
    return batches


def _measure(net: nn.Module, batches, names: list[str], s: dict, loss_fn, progress: bool):
    """(TraceResult, eigenvalues|None, density|None, activation frame|None, HessianOperator) of ``net``."""
    params = {f"{n}.weight": net.get_submodule(n).weight for n in names}
    pbar = None
    try:
        if progress:
            from tqdm.auto import tqdm
            pbar = tqdm(total=s["max_hvp"], desc="HVPs", unit="hvp", file=sys.stderr)
        op = HessianOperator(net, batches, params, loss_fn=loss_fn, backend=s["backend"], max_block=s["block"])
        res = estimate_traces(op, s["estimator"], rtol=s["rtol"], max_hvp=s["max_hvp"], block=s["block"],
                              seed=s["seed"], floor=s["floor"], sketch=s["sketch"], progress=pbar)
        eig = dens = act = None
        if s["top_k"] > 0:
            mv, n = operator_matvec(op)
            eig = top_eigenvalues(mv, n, s["top_k"], seed=s["seed"], device=op.device).tolist()
        if s["density"]:
            mv, n = operator_matvec(op)
            dens = slq_density(mv, n, seed=s["seed"], device=op.device)
        if s["activations"]:
            act = activation_traces(net, batches, names, loss_fn=loss_fn, rtol=s["rtol"],
                                    max_probes=max(s["max_hvp"] // 8, 16), block=s["block"], seed=s["seed"],
                                    floor=s["floor"]).to_frame().drop(columns=["exact"])
        op.clear()
    finally:
        if pbar is not None:
            pbar.close()
    return res, eig, dens, act, op


def _table(res, spec, qlayers, bits: list[int]) -> tuple[pd.DataFrame, dict]:
    """The per-layer frame (trace columns, negative flags, Ω per bit, rank) and the Ω dict."""
    frame = res.to_frame()
    frame["layer"] = [n[:-len(".weight")] for n in frame.layer]
    frame["searchable"] = [n not in spec.fixed for n in frame.layer]
    frame["negative"] = frame.trace < 0
    frame["significant_negative"] = frame.trace + 2 * frame.stderr < 0
    t = dict(zip(frame.layer, frame.trace_per_param.astype(float)))
    perturb = {n: {b: weight_perturbation(qlayers[n], b) for b in bits} for n in frame.layer[frame.searchable]}
    omega = omega_table(t, perturb)
    for b in bits:
        frame[f"omega_{b}"] = [omega[n][str(b)] if n in omega else np.nan for n in frame.layer]
    low = f"omega_{min(bits)}"
    order = frame[frame.searchable].sort_values([low, "trace_per_param"], ascending=False).layer
    rank = {n: i + 1 for i, n in enumerate(order)}
    frame["rank"] = [rank.get(n, 0) for n in frame.layer]
    return frame, omega


def compute_sensitivity(model: nn.Module, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                        bits: Optional[Sequence[int]] = None, rtol: float = 0.05, max_hvp: int = 2000,
                        estimator: str = DEFAULT_ESTIMATOR, backend: str = "auto", seed: int = 0,
                        include_fixed: bool = True, floor: float = 0.01, block: int = 8, sketch: int = 16,
                        top_k: int = 0, density: bool = False, activations: bool = False,
                        loss_fn=F.cross_entropy, progress: bool = False, fingerprint: str = "",
                        model_name: Optional[str] = None, at=None,
                        max_confidence: float = MAX_CONFIDENCE) -> SensitivityResult:
    """Per-layer Hessian traces (with SE) of a trained network and the Ω table for ``bits``.

    Args:
        model: a float model (measured as it is; a quantized deep copy supplies Q_b) or a hasb quantized model,
            measured where ``at`` says (see :func:`measured_network`; default its highest candidate bit, never the
            untrained fp path); its learned w_scale defines Q_b.
        batches: list of (x [B, C, H, W], y [B]); the Hessian is of their sample-weighted mean loss.
        bits: candidate bits for Ω (default: the model's candidate bits, else 8,6,4,2).
        rtol, max_hvp, estimator, floor, block, sketch, seed: see analysis.trace.
        backend: HVP backend ("auto", "double_backward", "func").
        include_fixed: also estimate traces of fixed (first/last) layers (reported with searchable=False).
        top_k: top eigenvalues of the whole weight Hessian (Lanczos) to add; density: add an SLQ density.
        activations: add activation-Hessian traces (w.r.t. each layer's input) as ``result.activation``.
        max_confidence: DegenerateSensitivityError above this mean max softmax probability (see MAX_CONFIDENCE).
    Raises DegenerateSensitivityError for a saturated softmax, a non-finite loss, all-zero traces or any
    non-finite trace or standard error.
    """
    from hasb.quantize import quantized_layers

    batches = _check_settings(estimator, backend, rtol, max_hvp, batches)
    qmodel, bits = _q_reference(model, bits, batches[0][0])
    spec = qmodel.hasb_spec
    names = [n for n in spec.order if include_fixed or n not in spec.fixed]
    net, where, measured_at = measured_network(model, at)
    s = dict(max_hvp=max_hvp, backend=backend, block=block, estimator=estimator, rtol=rtol, seed=seed, floor=floor,
             sketch=sketch, top_k=top_k, density=density, activations=activations)
    with where:
        outputs = check_outputs(net, batches, loss_fn, max_confidence)
        res, eig, dens, act, op = _measure(net, batches, names, s, loss_fn, progress)
    frame, omega = _table(res, spec, quantized_layers(qmodel), bits)
    check_traces(frame, max_hvp)
    meta = {"estimator": res.estimator, "total_hvp": int(res.total_hvp), "backend": op.backend,
            "calibration": op.calibration, "settings": res.settings, "quantized_input": qmodel is model,
            "measured_at": measured_at, "outputs": outputs,
            "n_samples": int(op.n_total), "n_batches": len(batches), "negative_policy": "omega uses max(t, 0)",
            "torch": torch.__version__}
    name = model_name or (getattr(model, "hasb_build", None) or {}).get("name", type(model).__name__)
    return SensitivityResult(frame=frame, bits=bits, omega=omega, negative_traces=list(frame.layer[frame.negative]),
                             model_name=name, fingerprint=fingerprint, eigenvalues=eig, density=dens,
                             activation=act, meta=meta, measured_at=measured_at)


# -- CLI --------------------------------------------------------------------------------------------------------
def _parse_bits(text: str) -> list[int]:
    try:
        bits = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SensitivityError(f"--bits must be comma-separated integers like 8,6,4,2, got {text!r}") from None
    if not bits or any(not 1 <= b <= 8 for b in bits):
        raise SensitivityError(f"--bits must be integers in 1..8, got {text!r}")
    return bits


def parse_at(text: str):
    """``--at``: "fp" (the float twin), a uniform bit ("8") or a BitConfig JSON file → "fp", int or BitConfig."""
    from hasb.config import BitConfig

    t = text.strip().lower()
    if t in ("fp", "float"):
        return "fp"
    if t.isdigit():
        return int(t)
    if not Path(text).is_file():
        raise SensitivityError(f"--at {text!r} is neither 'fp', a bit, nor a BitConfig JSON file")
    return BitConfig.load(text)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_digest(model: nn.Module) -> str:
    """sha256 over every state-dict tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint(model: nn.Module, checkpoint: Optional[Path], data: dict, settings: dict) -> str:
    """Cache key: model build + weights + checkpoint bytes + data selection + settings."""
    blob = json.dumps({"build": getattr(model, "hasb_build", None), "state": state_digest(model),
                       "checkpoint": _file_digest(checkpoint) if checkpoint else None,
                       "data": data, "settings": settings, "version": VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_model(name: str, checkpoint: Optional[Path], num_classes: int, in_channels: int, image_size: int,
               seed: int) -> nn.Module:
    """A zoo model: from a hasb export, from a float state_dict, or freshly initialised with ``seed``."""
    from hasb.export import FORMAT, CheckpointError, load_quantized, read_checkpoint
    from hasb.models import build_model

    if checkpoint is not None:
        obj = read_checkpoint(checkpoint)
        if obj.get("format") == FORMAT:
            model, _ = load_quantized(checkpoint)
            built = (getattr(model, "hasb_build", None) or {}).get("name")
            if built != name:
                raise SensitivityError(f"--checkpoint {checkpoint} holds a {built!r} model, not --model {name!r}")
            return model
        state = obj
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                state = obj[key]
        if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{checkpoint} is neither a hasb export nor a float state_dict (a dict of tensors)")
        model = build_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).splitlines()[1:2] or [str(e)[:200]]
            raise CheckpointError(f"{checkpoint} does not fit --model {name}: {first[0].strip()[:200]}") from None
        return model
    torch.manual_seed(seed)
    return build_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def plot_traces_local(frame: pd.DataFrame, path: Union[str, Path], title: str = "") -> Path:
    """Bar chart of per-layer Tr(H_ll)/n_l with ±2·SE error bars on a log axis (negative traces hatched)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hasb import atomic_write_bytes

    t = frame.trace_per_param.to_numpy(float)
    se = (frame.stderr / frame.n_params).to_numpy(float)
    mag = np.abs(t)
    pos = mag[mag > 0]
    floor = pos.min() * 0.1 if pos.size else 1e-12
    y = np.maximum(mag, floor)
    lo = np.minimum(2 * se, y - floor * 0.5)
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(frame) + 2), 4.2))
    colors = ["tab:blue" if s else "tab:gray" for s in frame.searchable]
    bars = ax.bar(range(len(frame)), y, yerr=[lo, 2 * se], color=colors, capsize=2, error_kw={"lw": 0.8})
    for b, neg in zip(bars, frame.trace < 0):
        if neg:
            b.set_hatch("//")
            b.set_facecolor("tab:red")
    ax.set_yscale("log")
    ax.set_xticks(range(len(frame)))
    ax.set_xticklabels(frame.layer, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("Tr(H_l) / n_l  (±2 SE)")
    ax.set_title(title or "Per-layer Hessian trace per parameter (gray: fixed, red: negative, |t| shown)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _plot(frame: pd.DataFrame, path: Path, title: str) -> None:
    try:
        from reports.plots import plot_traces, save_figure   # the reports package's chart (one home per plot)
    except ImportError:
        plot_traces_local(frame, path, title)
        return
    import matplotlib.pyplot as plt
    fig = plot_traces(frame, value="trace_per_param", title=title)
    save_figure(fig, path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m analysis.sensitivity",
        description="Per-layer Hessian traces with standard errors and the bit-sensitivity table "
                    "Ω_l(b) = Tr(H_l)/n_l · ||Q_b(W_l) - W_l||². Writes sensitivity.json/.csv/.png to --out; "
                    "reuses them when the model, checkpoint, data and settings are unchanged.")
    p.add_argument("--model", required=True, help="zoo model name (resnet20, resnet18, resnet50, mobilenet_v2, "
                   "small_cnn, tiny_mlp, vit_tiny) or package.module:callable")
    p.add_argument("--data", default="fashion-mnist", help="dataset: fashion-mnist (default) or mnist")
    p.add_argument("--data-dir", default=None, help="folder with the IDX .gz files (default: the Debian path or "
                   "$HASB_DATA_DIR)")
    p.add_argument("--split", default="calib", choices=("calib", "val", "train", "test"),
                   help="images to use: calib (default; a fixed train subset, the paper's ~1000 training images), "
                        "val, train or test")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="hasb export (hasb.export.save_quantized) or a float state_dict; default: random init "
                        "with --seed (traces of an untrained model say little)")
    p.add_argument("--at", default=None, help="which network of a hasb export to measure: fp (its float twin: float "
                   "weights, BN entries of the top bit), a uniform bit (e.g. 8) or a BitConfig JSON file (default: "
                   "the highest candidate bit). Never the export's fp path, whose BN entries were never trained")
    p.add_argument("--bits", default=None, help="candidate bits for Ω, e.g. 8,6,4,2 (default: the checkpoint's "
                   "candidates, else 8,6,4,2)")
    p.add_argument("--batches", type=int, default=4, help="number of batches (default 4)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256: 1024 images)")
    p.add_argument("--rtol", type=float, default=0.05, help="stop when every layer's standard error ≤ rtol·|trace| "
                   "(layers below --floor of the largest trace use floor·largest instead; default 0.05)")
    p.add_argument("--floor", type=float, default=0.01, help="relative floor of the stopping rule (default 0.01)")
    p.add_argument("--max-hvp", type=int, default=2000, help="budget of Hessian-vector products (default 2000)")
    p.add_argument("--estimator", default=DEFAULT_ESTIMATOR, choices=ESTIMATORS,
                   help="layer: layer-restricted Hutchinson (default, fewest HVPs on ResNet-20, see benchmarks/RESULTS.md); "
                        "hutchpp: per-layer Hutch++ deflation + residual Hutchinson; "
                        "full: full-model probes (PyHessian-style, cross-layer noise)")
    p.add_argument("--sketch", type=int, default=16, help="hutchpp sketch columns per layer (default 16)")
    p.add_argument("--block", type=int, default=8, help="probes per layer per round / vmap block (default 8)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="HVP backend: auto (time both on the first batch), double_backward, func (vmap(jvp(grad)))")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")
    p.add_argument("--top-k", type=int, default=0, help="also compute the top-k Hessian eigenvalues (Lanczos)")
    p.add_argument("--density", action="store_true", help="also compute the eigenvalue density (SLQ)")
    p.add_argument("--activations", action="store_true", help="also compute activation-Hessian traces "
                   "(w.r.t. each layer's input)")
    p.add_argument("--exclude-fixed", action="store_true", help="skip traces of fixed (first/last) layers")
    p.add_argument("--seed", type=int, default=0, help="seed of probes (and of the init without --checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="output folder (e.g. runs/demo)")
    p.add_argument("--force", action="store_true", help="recompute even if a matching result is cached in --out")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from hasb.data import load_dataset

    bits = _parse_bits(args.bits) if args.bits else None
    at = parse_at(args.at) if args.at else None
    for k in ("batches", "batch_size", "max_hvp", "sketch", "block"):
        if getattr(args, k) < 1:
            raise SensitivityError(f"--{k.replace('_', '-')} must be ≥ 1, got {getattr(args, k)}")
    if not args.rtol >= 0 or not 0 <= args.floor < 1:
        raise SensitivityError(f"--rtol must be ≥ 0 and --floor in [0, 1) (got {args.rtol}, {args.floor})")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise SensitivityError(f"--checkpoint {args.checkpoint} does not exist")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SensitivityError(f"bad --device {args.device!r}; accepted e.g. cpu, cuda, cuda:1") from None
    n_img = args.batches * args.batch_size
    splits = load_dataset(args.data, args.data_dir, calib_size=max(1024, n_img) if args.split == "calib" else 1024)
    x, y = getattr(splits, args.split)
    if len(x) < n_img:
        raise SensitivityError(f"--batches × --batch-size = {n_img} exceeds the {len(x)} images of split {args.split}")
    model = load_model(args.model, args.checkpoint, splits.num_classes, splits.in_channels, splits.image_size,
                       args.seed).to(device)
    if at not in (None, "fp") and getattr(model, "hasb_spec", None) is None:
        raise SensitivityError(f"--at {args.at} needs a hasb export as --checkpoint; a float model is measured as it is")
    settings = {k: getattr(args, k) for k in ("at", "bits", "rtol", "floor", "max_hvp", "estimator", "sketch", "block",
                                              "seed", "top_k", "density", "activations", "exclude_fixed")}
    data_sel = {"data": args.data, "split": args.split, "batches": args.batches, "batch_size": args.batch_size}
    fp = fingerprint(model, args.checkpoint, data_sel, settings)
    out = args.out
    js = out / "sensitivity.json"
    if js.is_file() and not args.force:
        try:
            old = load_sensitivity(js)
            if old["fingerprint"] == fp and (out / "sensitivity.csv").is_file() and (out / "sensitivity.png").is_file():
                print(f"cached: {js} (fingerprint {fp}); --force recomputes")
                return 0
        except SensitivityError:
            pass
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size]) for i in range(0, n_img, args.batch_size)]
    res = compute_sensitivity(model, batches, bits=bits, rtol=args.rtol, max_hvp=args.max_hvp,
                              estimator=args.estimator, backend=args.backend, seed=args.seed,
                              include_fixed=not args.exclude_fixed, floor=args.floor, block=args.block,
                              sketch=args.sketch, top_k=args.top_k, density=args.density,
                              activations=args.activations, progress=not args.no_progress, fingerprint=fp,
                              model_name=args.model, at=at)
    res.meta.update({"data": data_sel, "checkpoint": str(args.checkpoint) if args.checkpoint else None,
                     "device": str(device)})
    if _is_rank0():
        # all outputs are rendered into a temp folder first, then renamed: no partial set on failure
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".sensitivity.") as tmp:
            t = Path(tmp)
            res.to_csv(t / "sensitivity.csv")
            _plot(res.frame, t / "sensitivity.png", f"{args.model}: Tr(H_l)/n_l ± 2 SE ({res.meta['estimator']})")
            res.to_json(t / "sensitivity.json")
            for name in ("sensitivity.csv", "sensitivity.png", "sensitivity.json"):   # json last: it marks completion
                os.replace(t / name, out / name)
        f = res.frame
        print(f"wrote {js}: {len(f)} layers, {res.meta['total_hvp']} HVPs ({res.meta['backend']}), "
              f"negative traces: {res.negative_traces or 'none'}")
        print(f[["layer", "n_params", "trace_per_param", "stderr", "n_hvp", "rank"]].to_string(index=False))
    return 0


def _is_rank0() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _init_distributed() -> bool:
    """Join a torchrun job (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return True
    return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    from hasb.config import ConfigError
    from hasb.data import DataError
    from hasb.export import CheckpointError
    from hasb.models import UnknownModelError

    args = build_parser().parse_args(argv)
    started = _init_distributed()
    try:
        return run(args)
    except (SensitivityError, ConfigError, DataError, CheckpointError, UnknownModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if started:
            import torch.distributed as dist
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
