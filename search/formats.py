"""A chosen bit config in the formats other tools read: HAWQ's ``bit_config`` and NNCF's manual precision config.

**HAWQ** (``Zhen-Dong/HAWQ``, ``bit_config.py`` read by ``quant_train.py``): one dict per configuration mapping
the names of HAWQ's own quantizer modules (``model.named_modules()`` of its q-model) to one int; a module that
has ``activation_bit`` takes it as activation bits, any other as weight bits, so weights and activations are
separate entries.  Names in HAWQ's ``q_resnet`` (``Q_ResNet18``/``Q_ResNet50``, ``Q_ResBlockBn``/``Q_ResUnitBn``):

==================================  ======================================  =====================================
hasb layer                          weight entry                            entry of the layer's input activation
==================================  ======================================  =====================================
``conv1`` (stem)                    ``quant_init_block_convbn`` (``quant_    ``quant_input``
                                    init_convbn`` for bottleneck nets)
``layer{s}.{u}.conv1``              ``stage{s}.unit{u+1}.quant_convbn1``    ``stage{s}.unit{u+1}.quant_act``
``layer{s}.{u}.conv{k}``, k ≥ 2     ``stage{s}.unit{u+1}.quant_convbn{k}``  ``stage{s}.unit{u+1}.quant_act{k-1}``
``layer{s}.{u}.shortcut`` or        ``stage{s}.unit{u+1}.quant_identity_    ``stage{s}.unit{u+1}.quant_act`` (one
``layer{s}.{u}.downsample.0``       convbn``                                quantizer feeds both: bits must agree)
``fc``                              ``quant_output``                        ``quant_act_output``
==================================  ======================================  =====================================

plus HAWQ's 16-bit requantizers of residual sums (``quant_act_int32`` and ``stage{s}.unit{u}.quant_act_int32``),
written as 16 as in every HAWQ config.  This is exactly HAWQ's naming for hasb's ``resnet18`` (torchvision-style
BasicBlock net ↔ ``Q_ResNet18``); for ``resnet20`` (pre-activation, 3 stages × 3 units) the same rule gives the
names a ``Q_ResNet``-style q-model of that structure would have, but HAWQ ships no such q-model and folds BN into
the *following* conv, which a pre-activation block does not have.  Any other module tree (e.g. ``small_cnn``)
gets hasb's own convention, not a HAWQ model: weight ``<parent>.quant_<leaf>``, activation
``<parent>.quant_act_<leaf>`` (HAWQ's ``quant_`` prefix on the layer's own path).  Full-precision layers get
no entry (HAWQ then leaves that module at its default bits: quantize it or leave it out of the q-model).

**NNCF** (legacy PyTorch config): ``compression.initializer.precision`` with ``"type": "manual"`` and
``bitwidth_per_scope`` = ``[[bits, scope], ...]``; NNCF assigns ``bits`` to the quantizer whose id string equals
``scope`` (or matches it when it starts with ``{re}``) and fails on a scope it cannot find.  A weight quantizer's
id is ``<Model class>/<Class>[<attr>]/.../NNCF<Conv2d|Linear>[<attr>]/<op>_<k>|WEIGHT``: the model's class name,
then each submodule on the path as its class name with its attribute name in brackets (NNCF wraps ``nn.Conv2d``
and ``nn.Linear`` as ``NNCFConv2d``/``NNCFLinear``), then the traced function (``conv2d``/``linear``) with its
call counter inside that module (``_0`` for the first call), e.g.
``PreActResNet/Sequential[layer2]/PreActBlock[0]/NNCFConv2d[shortcut]/conv2d_0|WEIGHT``.  Only weights are
written: NNCF places activation quantizers at op outputs chosen by its own quantizer propagation and HW config
(``…/ReLU[relu]/relu__0|OUTPUT``, ``/nncf_model_input_0|OUTPUT``), which cannot be derived from hasb's per-layer
input bits without NNCF itself; NNCF keeps its default activation bits (8) for them.  Full-precision (fixed)
layers go to ``ignored_scopes`` as their module scope (``PreActResNet/NNCFConv2d[conv1]``).
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
import torch.nn as nn

from hasb.config import BitConfig
from hasb.errors import HasbError
from hasb.quantize import get_spec, quantized_layers

HAWQ_ACCUMULATOR_BITS = 16  # HAWQ's quant_act_int32 requantizers: 16 in every config of bit_config.py
NNCF_OPS = {nn.Conv2d: ("NNCFConv2d", "conv2d"), nn.Linear: ("NNCFLinear", "linear")}


class FormatError(HasbError):
    """The model or config cannot be written in the requested tool's format."""


def layer_bits(model: nn.Module, config: BitConfig) -> dict[str, tuple[int | None, int | None]]:
    """(w_bits, a_bits) of every quantized layer in execution order: searchable from ``config``, fixed from the
    model's spec (None = full precision)."""
    spec = get_spec(model)
    out = {}
    for name in quantized_layers(model):
        if name in spec.fixed:
            out[name] = (spec.fixed_bit, spec.fixed_bit)
        elif name in config.layers:
            w, a = config.layers[name]
            out[name] = (None if w in (None, "fp") else int(w), None if a in (None, "fp") else int(a))
        else:
            raise FormatError(f"config has no bits for searchable layer {name!r}")
    return out


# ----------------------------------------------------------------------------------------------------------
# HAWQ
_RESNET = re.compile(r"layer(\d+)\.(\d+)\.(conv(\d+)|shortcut|downsample\.0)")


def hawq_names(names: list[str]) -> dict[str, tuple[str, str]]:
    """hasb layer path -> (HAWQ weight quantizer name, HAWQ input-activation quantizer name); see module doc."""
    resnet = all(n in ("conv1", "fc") or _RESNET.fullmatch(n) for n in names) and "conv1" in names
    bottleneck = any(n.endswith(".conv3") for n in names)
    out = {}
    for n in names:
        m = _RESNET.fullmatch(n) if resnet else None
        if resnet and n == "conv1":
            out[n] = ("quant_init_convbn" if bottleneck else "quant_init_block_convbn", "quant_input")
        elif resnet and n == "fc":
            out[n] = ("quant_output", "quant_act_output")
        elif m:
            unit = f"stage{m.group(1)}.unit{int(m.group(2)) + 1}"
            k = m.group(4)
            if k is None:
                out[n] = (f"{unit}.quant_identity_convbn", f"{unit}.quant_act")
            else:
                out[n] = (f"{unit}.quant_convbn{k}", f"{unit}.quant_act" + ("" if k == "1" else str(int(k) - 1)))
        else:
            parent, _, leaf = n.rpartition(".")
            pre = f"{parent}." if parent else ""
            out[n] = (f"{pre}quant_{leaf}", f"{pre}quant_act_{leaf}")
    return out


def hawq_bit_config(model: nn.Module, config: BitConfig) -> dict[str, int]:
    """HAWQ's per-quantizer ``{name: bits}`` of ``model`` at ``config`` (weights and activations separate).

    Raises FormatError when two hasb layers that share one HAWQ quantizer (a block's conv1 and its shortcut read
    the same quantized input) have different activation bits.
    """
    bits = layer_bits(model, config)
    names = hawq_names(list(bits))
    out: dict[str, int] = {}
    for layer, (w, a) in bits.items():
        wname, aname = names[layer]
        if w is not None:
            out[wname] = w
        if a is not None:
            if out.get(aname, a) != a:
                raise FormatError(
                    f"HAWQ quantizes one input for {aname!r}: {layer!r} has activation bits {a}, "
                    f"another layer reading it has {out[aname]}"
                )
            out[aname] = a
    units = sorted({w.rsplit(".", 1)[0] for w, _ in names.values() if w.startswith("stage")})
    if units:  # the residual requantizers of HAWQ's q_resnet
        out["quant_act_int32"] = HAWQ_ACCUMULATOR_BITS
        out.update({f"{u}.quant_act_int32": HAWQ_ACCUMULATOR_BITS for u in units})
    return out


# ----------------------------------------------------------------------------------------------------------
# NNCF
def nncf_module_scope(model: nn.Module, path: str) -> str:
    """NNCF's scope of a submodule: ``<Model class>/<Class>[attr]/...``, quantized layers as NNCF's wrappers."""
    parts, mod = [type(model).__name__], model
    for attr in path.split("."):
        mod = getattr(mod, attr)
        cls = next((w for t, (w, _) in NNCF_OPS.items() if isinstance(mod, t)), type(mod).__name__)
        parts.append(f"{cls}[{attr}]")
    return "/".join(parts)


def call_order(model: nn.Module, names: list[str], example_input: torch.Tensor) -> list[str]:
    """The layers among ``names`` in the order of their first call in one forward pass (forward pre-hooks).

    Runs on a deep copy in eval mode: a forward may initialise activation scales lazily, which must not touch
    the user's model.
    """
    twin = copy.deepcopy(model).eval()
    seen: list[str] = []
    for n in names:
        twin.get_submodule(n).register_forward_pre_hook(lambda _m, _i, n=n: seen.append(n) if n not in seen else None)
    with torch.no_grad():
        try:
            twin(example_input)
        except RuntimeError as e:  # shape mismatch: the user's input_shape does not fit the model
            raise FormatError(
                f"the model does not run on an input of shape {tuple(example_input.shape)}: {str(e).splitlines()[0]}"
            ) from None
    missing = [n for n in names if n not in seen]
    if missing:
        raise FormatError(f"layer {missing[0]!r} is not called in the forward pass: NNCF would not quantize it")
    return seen


def nncf_weight_scope(model: nn.Module, path: str) -> str:
    """NNCF's id of the weight quantizer of one Conv2d/Linear layer (first call: counter 0)."""
    mod = model.get_submodule(path)
    op = next((op for t, (_, op) in NNCF_OPS.items() if isinstance(mod, t)), None)
    if op is None:
        raise FormatError(f"{path!r} is a {type(mod).__name__}; NNCF weight scopes are written for Conv2d/Linear")
    return f"{nncf_module_scope(model, path)}/{op}_0|WEIGHT"


def nncf_config(model: nn.Module, config: BitConfig, input_shape: tuple[int, ...] | list[int]) -> dict[str, Any]:
    """NNCF's legacy PyTorch config quantizing ``model``'s weights at ``config`` (see module doc).

    ``input_shape`` is one sample's shape (C, H, W); NNCF's ``sample_size`` gets a batch of 1.
    """
    bits = layer_bits(model, config)
    shape = [int(s) for s in input_shape]
    order = call_order(model, list(bits), torch.zeros(1, *shape))
    per_scope = [[bits[n][0], nncf_weight_scope(model, n)] for n in order if bits[n][0] is not None]
    ignored = [nncf_module_scope(model, n) for n in order if bits[n][0] is None]
    comp: dict[str, Any] = {
        "algorithm": "quantization",
        "initializer": {"precision": {"type": "manual", "bitwidth_per_scope": per_scope}},
    }
    if ignored:
        comp["ignored_scopes"] = ignored
    return {"input_info": {"sample_size": [1, *shape]}, "compression": comp}


__all__ = [
    "FormatError",
    "layer_bits",
    "hawq_names",
    "hawq_bit_config",
    "nncf_module_scope",
    "call_order",
    "nncf_weight_scope",
    "nncf_config",
    "HAWQ_ACCUMULATOR_BITS",
]
