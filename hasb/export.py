"""Export / load: INT-h weights + scales + per-bit activation scales + BN state (+ the active BitConfig).

The file is a plain dict of tensors, strings and numbers, written atomically
with ``torch.save`` and read back with ``torch.load(..., weights_only=True)``.
Float master weights are *not* stored: a loaded model's weights are
``W_h · s_h``, which re-quantize to exactly the stored integers, so every
config's outputs are reproduced bit for bit.

``export_deployment`` writes a single-config view: the integers each layer runs
at (W_l, derived from W_h by integer round-shift) with their effective scales.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import quantizer as Q
from .config import BitConfig, atomic_write_bytes, bit_str
from .errors import HasbError
from .models import build_model, build_record
from .modules import SwitchBatchNorm
from .quantize import (
    QuantSpec,
    get_config,
    get_spec,
    link_batchnorms,
    quantize_like,
    quantized_layers,
    set_config,
    use_config,
)

FORMAT = "hasb-int"
DEPLOY_FORMAT = "hasb-deploy"
VERSION = 1


class CheckpointError(HasbError):
    """A file that is not a readable hasb checkpoint."""


def _save(obj: dict, path: str | Path) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | Path) -> dict:
    """``torch.load(weights_only=True)`` with one clear error for a missing, empty or corrupt file."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p} is an empty file (a write that never finished?)")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated / foreign files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "Weights only load failed" in first:
            first = "it holds objects other than tensors and plain containers (refused: weights_only=True)"
        raise CheckpointError(f"cannot read checkpoint {p}: {type(e).__name__}: {first[:200]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p} is not a hasb checkpoint (top level is {type(obj).__name__})")
    return obj


EXPORT_KEYS = ("spec", "build", "config", "layers", "rest")  # what every export holds (extra, bn_modes optional)


def check_export(obj: dict, path: str | Path) -> dict:
    """The parsed JSON fields (spec, build, config, extra) of an export dict, its structure checked first:
    CheckpointError naming the first missing or malformed field (a truncated or hand-edited file)."""
    missing = [k for k in EXPORT_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is a malformed hasb export: missing {missing}; re-export it")
    if not isinstance(obj["layers"], dict) or not isinstance(obj["rest"], dict):
        raise CheckpointError(f"{path} is a malformed hasb export: 'layers' and 'rest' must be dicts of tensors")
    parsed = {}
    for k in ("spec", "build", "config", "extra"):
        try:
            parsed[k] = json.loads(obj.get(k, "{}"))
        except (TypeError, ValueError):
            raise CheckpointError(f"{path} is a malformed hasb export: its {k!r} field is not JSON") from None
    for k in ("spec", "build", "extra"):
        if not isinstance(parsed[k], dict):
            raise CheckpointError(f"{path} is a malformed hasb export: its {k!r} field is not a JSON object")
    try:
        parsed["spec"] = QuantSpec.from_dict(parsed["spec"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is a malformed hasb export: bad 'spec' ({type(e).__name__}: {e})") from None
    return parsed


def quantized_state(model: nn.Module) -> dict:
    """The export dict (see module docstring) of a quantized model."""
    spec = get_spec(model)
    layers = quantized_layers(model)
    qparams = set()
    out_layers = {}
    for name, m in layers.items():
        entry: dict[str, Any] = {
            "act_scales": {k: v.detach().cpu().clone() for k, v in m.act_scales.items()},
            "act_signed": m.act_signed.detach().cpu().clone(),
            "act_init": m.act_init.detach().cpu().clone(),
            "bias": None if m.bias is None else m.bias.detach().cpu().clone(),
        }
        if m.fixed and spec.fixed_bit is None:
            entry["weight"] = m.weight.detach().cpu().clone()  # fp layer: kept as float
        else:
            entry["w_int"] = m.int_weight().cpu()
        entry["w_scale"] = m.w_scale.detach().cpu().clone()
        out_layers[name] = entry
        for p in ("weight", "bias", "w_scale"):
            qparams.add(f"{name}.{p}")
        for k in m.act_scales:
            qparams.add(f"{name}.act_scales.{k}")
        qparams.update({f"{name}.act_signed", f"{name}.act_init"})
    rest = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k not in qparams}
    bn_modes = {n: m.mode for n, m in model.named_modules() if isinstance(m, SwitchBatchNorm)}
    return {
        "format": FORMAT,
        "version": VERSION,
        "spec": json.dumps(spec.to_dict()),
        "build": json.dumps(build_record(model)),
        "config": get_config(model).to_json(indent=None),
        "bn_modes": json.dumps(bn_modes),
        "layers": out_layers,
        "rest": rest,
    }


def save_quantized(model: nn.Module, path: str | Path, extra: dict | None = None) -> Path:
    """Write the INT-h export of ``model`` to ``path`` atomically.  ``extra`` must be JSON-serialisable."""
    obj = quantized_state(model)
    obj["extra"] = json.dumps(extra or {})
    return _save(obj, path)


def _ensure_bn_keys(model: nn.Module, rest: dict, bn_modes: dict) -> None:
    """Create BN entries present in the file but not in a fresh model (e.g. Transitional BN pairs)."""
    for name, bn in model.named_modules():
        if not isinstance(bn, SwitchBatchNorm):
            continue
        prefix = f"{name}.bns."
        keys = {k[len(prefix) :].split(".")[0] for k in rest if k.startswith(prefix)}
        template = next(iter(bn.bns.values()))
        for k in sorted(keys - set(bn.bns.keys())):
            new = type(template)(
                template.num_features, template.eps, template.momentum, template.affine, template.track_running_stats
            )
            bn.bns[k] = new.to(next(template.parameters(), torch.empty(0)).device).train(template.training)
        bn.mode = bn_modes.get(name, bn.mode)


def load_quantized_state(model: nn.Module, obj: dict) -> None:
    """Load an export dict into an already-quantized model of the same architecture."""
    spec = get_spec(model)
    saved_spec = QuantSpec.from_dict(json.loads(obj["spec"]))
    if list(saved_spec.order) != list(spec.order) or tuple(saved_spec.bits) != tuple(spec.bits):
        raise CheckpointError(
            "checkpoint is for another model or bit set: layers/bits differ "
            f"(file: {len(saved_spec.order)} layers, bits {list(saved_spec.bits)}; "
            f"model: {len(spec.order)} layers, bits {list(spec.bits)})"
        )
    layers = quantized_layers(model)
    with torch.no_grad():
        for name, e in obj["layers"].items():
            m = layers[name]
            m.w_scale.copy_(e["w_scale"])
            if "w_int" in e:
                m.weight.copy_(e["w_int"].to(m.weight.dtype) * Q._per_channel(e["w_scale"], m.weight).to(m.weight))
            else:
                m.weight.copy_(e["weight"])
            if e["bias"] is not None:
                m.bias.copy_(e["bias"])
            for k, v in e["act_scales"].items():
                m.act_scales[k].copy_(v)
            m.act_signed.copy_(e["act_signed"])
            m.act_init.copy_(e["act_init"])
            m.ready_from_buffers()
    rest = obj["rest"]
    _ensure_bn_keys(model, rest, json.loads(obj.get("bn_modes", "{}")))
    missing, unexpected = model.load_state_dict(rest, strict=False)
    qnames = set(layers)
    missing = [
        k for k in missing if k.rsplit(".", 1)[0] not in qnames and not any(k.startswith(n + ".") for n in qnames)
    ]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    link_batchnorms(model)


def build_recorded(build: dict, path: str | Path, trusted_model: str | None = None) -> nn.Module:
    """The architecture a file records. A file never chooses code to import: a ``package.module:callable``
    model is built only when the user named the same model (``trusted_model``, the CLIs' ``--model``)."""
    if not isinstance(build, dict) or not build.get("name"):
        raise CheckpointError(f"{path} does not record how to build its model; pass model=")
    name = str(build["name"])
    if ":" in name and name != trusted_model:
        raise CheckpointError(
            f"{path} was built by user code {name!r}; hasb imports code only when you name it: "
            f"pass --model {name} (trusted_model= in Python)"
        )
    try:
        return build_model(**build)
    except TypeError as e:
        raise CheckpointError(f"{path} records a model build hasb cannot use ({e})") from None


def load_quantized(
    path: str | Path, model: nn.Module | None = None, *, trusted_model: str | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild (zoo models; ``pkg.mod:callable`` only when ``trusted_model`` names it) or fill ``model`` from an
    export; returns (model, extra). The model is left in eval mode at the config it was saved with.
    """
    obj = read_checkpoint(path)
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a hasb export (format={obj.get('format')!r}, expected {FORMAT!r})")
    parsed = check_export(obj, path)
    if model is None:
        model = build_recorded(parsed["build"], path, trusted_model)
    if getattr(model, "hasb_spec", None) is None:
        quantize_like(model, parsed["spec"])
    try:
        load_quantized_state(model, obj)
    except (KeyError, TypeError, AttributeError, RuntimeError) as e:  # an entry missing or of the wrong shape
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise CheckpointError(f"{path} does not fit its recorded model: {type(e).__name__} {msg}") from None
    set_config(model, BitConfig.from_json(obj["config"]))
    model.eval()
    return model, parsed["extra"]


def _deployment_layers(model: nn.Module) -> dict[str, dict]:
    """Per quantized layer at its current bits: integers, effective scales, activation step (see export_deployment)."""
    out = {}
    for name, m in quantized_layers(model).items():
        e: dict[str, Any] = {
            "w_bits": bit_str(m.w_bit),
            "a_bits": bit_str(m.a_bit),
            "bias": None if m.bias is None else m.bias.detach().cpu().clone(),
        }
        if m.w_bit is None:
            e["weight"] = m.weight.detach().cpu().clone()
        else:
            e["w_int"] = m.int_weight(m.w_bit).cpu()
            e["w_scale"] = (m.w_scale.detach() * 2 ** (m.high_bit - m.w_bit)).cpu().clone()
        if m.a_bit is not None:
            e["a_scale"] = m.act_scales[str(m.a_bit)].detach().cpu().clone()
            e["a_signed"] = bool(m.act_signed)
        out[name] = e
    return out


def export_deployment(model: nn.Module, config, path: str | Path, extra: dict | None = None) -> Path:
    """Single-config deployment view: per layer the integers it runs at and their effective scales.

    Per layer: ``w_int`` (int8, W_l), ``w_scale`` (per-channel s_h·2^(h−l), float32), ``w_bits``,
    ``a_bits``, ``a_scale`` (per-tensor step of the input), ``a_signed``, ``bias``; plus the BN
    entries this config uses *as they are now* (call it inside ``search.evaluate.Evaluator.calibrated`` to
    export the re-calibrated statistics that were scored) and every other tensor of the model (``rest``).
    fp layers carry their float ``weight``.  :func:`load_deployment` rebuilds a plain module from it.
    """
    with use_config(model, config):
        cfg = get_config(model)
        switch = {n: bn for n, bn in model.named_modules() if isinstance(bn, SwitchBatchNorm)}
        bns = {n: {k: v.detach().cpu().clone() for k, v in bn.active.state_dict().items()} for n, bn in switch.items()}
        owners = [n + "." for n in (*quantized_layers(model), *switch)]
        rest = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith(tuple(owners))}
        obj = {
            "format": DEPLOY_FORMAT,
            "version": VERSION,
            "config": cfg.to_json(indent=None),
            "build": json.dumps(build_record(model)),
            "layers": _deployment_layers(model),
            "batchnorm": bns,
            "rest": rest,
            "extra": json.dumps(extra or {}),
        }
    return _save(obj, path)


class _InputFakeQuant:
    """Mixin of the deployed layers: per-tensor fake quantization of the input with plain torch ops.

    ``torch.fake_quantize_per_tensor_affine`` is the forward of the fused LSQ kernel hasb evaluates with, so a
    deployed layer's outputs equal the quantized supernet's at the exported config.
    """

    def _setup_input(self, a_bits: int | None, a_scale: torch.Tensor | None, a_signed: bool) -> None:
        self.a_bits = a_bits
        if a_bits is not None:
            self.register_buffer("a_scale", a_scale.reshape(()).float().clone())
            self.a_range = (-(2 ** (a_bits - 1)), 2 ** (a_bits - 1) - 1) if a_signed else (0, 2**a_bits - 1)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_bits is None:
            return x
        return torch.fake_quantize_per_tensor_affine(x, float(self.a_scale), 0, *self.a_range)


class DeployedConv2d(_InputFakeQuant, nn.Conv2d):
    """A plain ``nn.Conv2d`` whose weight is the dequantized integers W_l·s and whose input is fake-quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quant_input(x), self.weight, self.bias)


class DeployedLinear(_InputFakeQuant, nn.Linear):
    """A plain ``nn.Linear`` whose weight is the dequantized integers W_l·s and whose input is fake-quantized."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.quant_input(x), self.weight, self.bias)


def _deployed_layer(float_layer: nn.Module, e: dict) -> nn.Module:
    """The deployed twin of one float conv/linear from its export entry ``e``."""
    if isinstance(float_layer, nn.Conv2d):
        c = float_layer
        new: nn.Module = DeployedConv2d(
            c.in_channels,
            c.out_channels,
            c.kernel_size,
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
            c.bias is not None,
            c.padding_mode,
        )
    elif isinstance(float_layer, nn.Linear):
        new = DeployedLinear(float_layer.in_features, float_layer.out_features, float_layer.bias is not None)
    else:
        raise CheckpointError(f"deployment layer of type {type(float_layer).__name__} is not a conv or linear")
    with torch.no_grad():
        if "w_int" in e:
            # the same product as the quantizer's forward (W_l · s_eff), hence the same float weights
            s = e["w_scale"].reshape((-1,) + (1,) * (e["w_int"].dim() - 1))
            new.weight.copy_(e["w_int"].to(torch.float32) * s)
        else:
            new.weight.copy_(e["weight"])
        if e["bias"] is not None:
            new.bias.copy_(e["bias"])
    a_bits = None if e["a_bits"] == "fp" else int(e["a_bits"])
    new._setup_input(a_bits, e.get("a_scale"), bool(e.get("a_signed", False)))
    return new


def load_deployment(path: str | Path, model: nn.Module | None = None, *, trusted_model: str | None = None) -> nn.Module:
    """A plain torch module (eval mode) computing what ``export_deployment`` exported: no bit switching.

    The architecture is rebuilt from the file's ``build`` (a zoo model; ``model=`` gives a float model of the
    same architecture instead); every quantized conv/linear becomes a :class:`DeployedConv2d` /
    :class:`DeployedLinear` (dequantized integer weights, fake-quantized input), every BN a plain BatchNorm
    holding the exported (re-calibrated) statistics.  Input: the same tensors as the supernet, [N, C, H, W].
    """
    obj = read_checkpoint(path)
    if obj.get("format") != DEPLOY_FORMAT:
        raise CheckpointError(
            f"{path} is not a hasb deployment (format={obj.get('format')!r}, expected {DEPLOY_FORMAT!r})"
        )
    for key in ("layers", "batchnorm", "rest", "build"):
        if key not in obj:
            raise CheckpointError(f"{path} misses {key!r} (written by an older hasb; re-run the search to export)")
    if model is None:
        model = build_recorded(json.loads(obj["build"]), path, trusted_model)
    for name, e in obj["layers"].items():
        _set_module(model, name, _deployed_layer(model.get_submodule(name), e))
    for name, st in obj["batchnorm"].items():
        model.get_submodule(name).load_state_dict(st)
    missing, unexpected = model.load_state_dict(obj["rest"], strict=False)
    done = tuple(n + "." for n in (*obj["layers"], *obj["batchnorm"]))
    missing = [k for k in missing if not k.startswith(done)]
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def derive_from_export(w_int_h: torch.Tensor, bit: int, high_bit: int, rounding: str = "half_up") -> torch.Tensor:
    """Lower-bit integers from exported INT-h integers with integer ops only (add, arithmetic shift, clamp).

    ``rounding`` is the model's (``spec.rounding``): ``msb`` is the bare shift ``W_h >> (h-l)``.
    """
    return Q.derive_int(w_int_h.to(torch.int32), bit, high_bit, rounding).to(torch.int8)
