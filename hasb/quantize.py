"""``quantize_model``: swap every Conv2d/Linear for its Double Rounding twin; switch configs at run time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import cast

import torch
import torch.nn as nn

from .cli import parse_bits
from .config import Bit, BitConfig, BitLike, ConfigError, bit_str, parse_bit
from .models import build_model, build_record
from .modules import FP, QConv2d, QLinear, SwitchBatchNorm, attach_weight_pass, bit_key, share_input_quantizer
from .quantizer import ROUNDINGS

DEFAULT_BITS = (8, 6, 4, 2)


@dataclass
class QuantSpec:
    """How a model was quantized; stored on the model as ``model.hasb_spec`` and in exports."""

    bits: tuple[int, ...] = DEFAULT_BITS
    fixed: tuple[str, ...] = ()  # module paths of fixed layers
    fixed_bit: int | None = None  # None = fp
    rounding: str = "half_up"
    order: tuple[str, ...] = ()  # quantized layers in execution order
    bn_producers: dict = field(default_factory=dict)  # bn path -> [producer, predecessor]
    # Weight-only mode: every searchable layer's activations run at ``act_bit`` (None = fp) whatever its weight bit;
    # off (the default, and the paper's W=A setting for vision), activations follow the weight bit.
    weight_only: bool = False
    act_bit: int | None = None
    # layers fed one input tensor that quantize it as one quantizer (modules.share_input_quantizer), each group in
    # call order; () for exports written before shared inputs: their layers keep one quantizer each
    shared_inputs: tuple[tuple[str, ...], ...] = ()

    def pair(self, w_bit: Bit) -> tuple[Bit, Bit]:
        """(weight bits, activation bits) of a searchable layer whose weights run at ``w_bit``."""
        return (w_bit, self.act_bit) if self.weight_only else (w_bit, w_bit)

    def tie(self, config: BitConfig) -> BitConfig:
        """``config`` with every searchable layer's activation bits set as this spec's mode prescribes."""
        if not self.weight_only:
            return config
        return BitConfig({n: (wa if n in self.fixed else self.pair(wa[0])) for n, wa in config.layers.items()})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bits"] = list(self.bits)
        d["fixed"], d["order"] = list(self.fixed), list(self.order)
        d["shared_inputs"] = [list(g) for g in self.shared_inputs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        return cls(
            bits=tuple(d["bits"]),
            fixed=tuple(d["fixed"]),
            fixed_bit=d["fixed_bit"],
            rounding=d["rounding"],
            order=tuple(d["order"]),
            bn_producers=dict(d["bn_producers"]),
            weight_only=bool(d.get("weight_only", False)),  # exports written before weight-only mode: off
            act_bit=d.get("act_bit"),
            shared_inputs=tuple(tuple(g) for g in d.get("shared_inputs", ())),
        )


def _set_attr(obj: nn.Module, name: str, value: object) -> None:
    """Set a plain (non-Tensor, non-Module) attribute; torch types ``Module.__setattr__`` as Tensor | Module only."""
    setattr(obj, name, value)


def _quant_layer(model: nn.Module, name: str) -> QConv2d | QLinear:
    """The layer at dotted path ``name``, read through each module's ``_modules``; ``get_submodule`` words the
    error of a path that is not there.  Why: a multi-precision step calls ``set_config`` between passes, where a
    compiled step's GPU waits for the host, and ``get_submodule``'s checks with ``nn.Module.__setattr__``'s made
    most of its time (byte LM, 37 layers, CPU: 489 → 90 µs per call with :meth:`QuantMixin.put_bits`;
    benchmarks/switch_cost.py, benchmarks/RESULTS.md, session 20)."""
    m = model
    try:
        for part in name.split("."):
            m = m._modules[part]  # type: ignore[assignment]
    except (KeyError, AttributeError):  # a missing part, or a None entry on the way
        m = model.get_submodule(name)
    return cast("QConv2d | QLinear", m)


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


# autograd nodes of pointwise activations, looked through when asking what made a layer's input
_ACTIVATIONS = frozenset(
    f"{n}Backward0"
    for n in ("Relu", "Hardtanh", "Gelu", "Silu", "Hardswish", "LeakyRelu", "Elu", "Sigmoid", "Tanh", "ClampMin")
) | {"ClampBackward1"}
# batch norm's autograd nodes: where a layer's input comes from one, inductor fuses the activation quantizer's
# backward badly (the step gradient's sum over every element meets BN's per-channel sums), and hasb's kernel op
# pays.  Not LayerNorm: its backward reduces per token, and inductor's own fusion is cheaper there (the byte LM,
# one pass 1.282x against 1.324x with the op after LN; benchmarks/RESULTS.md, session 17).  GroupNorm (per sample
# and group, like LayerNorm) is not in the list either: no zoo model has it, so it is not measured.
_BATCH_NORMS = ("NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm")


def _after_batch_norm(x) -> bool | None:
    """Whether ``x`` (a layer's input, with autograd history) is a batch norm's output, directly or through
    pointwise activations (BN-ReLU6 in MobileNetV2, BN-ReLU in ResNet's blocks); None where it has no history
    (the network's input, frozen weights)."""
    fn = x.grad_fn if isinstance(x, torch.Tensor) else None
    if fn is None:
        return None
    while type(fn).__name__ in _ACTIVATIONS and fn.next_functions and fn.next_functions[0][0] is not None:
        fn = fn.next_functions[0][0]
    return type(fn).__name__.startswith(_BATCH_NORMS)


def _trace_order(
    model: nn.Module, example_input, types
) -> tuple[list[tuple[str, nn.Module]], dict[str, bool | None], list[list[str]]]:
    """One forward of ``example_input`` (eval mode: no BatchNorm statistic moves; with autograd, to see what made
    each input): the modules of ``types`` in call order, {path: :func:`_after_batch_norm` of its first input}
    of the Conv2d/Linear layers among them, and those layers grouped by their first input (:func:`_input_groups`)."""
    calls: list[tuple[str, nn.Module]] = []
    after_bn: dict[str, bool | None] = {}
    inputs_of: dict[str, tuple] = {}

    def hook(name: str):
        def note(module, inputs) -> None:  # returns None: the inputs go on unchanged
            calls.append((name, module))
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                after_bn.setdefault(name, _after_batch_norm(inputs[0]) if inputs else None)
                if inputs and isinstance(inputs[0], torch.Tensor):  # held: no later input can reuse its id
                    inputs_of.setdefault(name, (inputs[0], inputs[0]._version))

        return note

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, types)]
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return calls, after_bn, _input_groups(inputs_of)


def _input_groups(inputs_of: dict[str, tuple]) -> list[list[str]]:
    """Layer paths grouped by their input, in call order: one group per tensor object that two or more layers
    took, unchanged in between (same ``_version``: an in-place op between two calls makes another input).
    ``inputs_of``: path → (input tensor, its version at the call), the tensors still held."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, (x, version) in inputs_of.items():
        groups.setdefault((id(x), version), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _example(model: nn.Module, example_input):
    if example_input is not None:
        return example_input
    make = getattr(model, "example_input", None)
    if callable(make):  # models whose inputs are not float tensors (byte LMs take ids)
        return make(2)
    shape = getattr(model, "example_input_shape", None)
    if shape is None:
        raise ValueError(
            "quantize_model needs example_input (one batch, e.g. torch.randn(2, 3, 32, 32)) to find "
            "the execution order of layers and which layer each BatchNorm normalises"
        )
    p = next(model.parameters())
    return torch.randn(2, *shape, device=p.device, dtype=p.dtype)


def _layer_order(calls: list[tuple[str, nn.Module]]) -> list[str]:
    """Paths of the Conv2d/Linear layers in first-call order (a shared module called twice counts once)."""
    layer_order = [n for n, m in calls if isinstance(m, (nn.Conv2d, nn.Linear))]
    layer_order = list(dict.fromkeys(layer_order))
    if not layer_order:
        raise ValueError("model has no Conv2d or Linear layer reached by the example input: nothing to quantize")
    return layer_order


def _swap_layers(
    model: nn.Module,
    layer_order: list[str],
    fixed_set: set[str],
    bit_list: tuple[int, ...],
    rounding: str,
    act_signed: bool | None,
    fbit: Bit,
    after_bn: dict[str, bool | None],
) -> None:
    """Replace each Conv2d/Linear of ``layer_order`` in place by its QConv2d/QLinear twin (same training mode).
    ``after_bn`` (:func:`_trace_order`): in compiled graphs only a layer whose input may come from a batch norm
    takes the activation backward as hasb's kernel op (``act_backward_op``; a group of convolutions sharing an
    input takes it too, :func:`hasb.modules.share_input_quantizer`)."""
    for name in layer_order:
        m = model.get_submodule(name)
        is_fixed = name in fixed_set
        if isinstance(m, nn.Conv2d):
            q = QConv2d.from_float(m, bit_list, rounding, act_signed, fixed_bit=fbit, fixed=is_fixed)
        else:
            q = QLinear.from_float(cast(nn.Linear, m), bit_list, rounding, act_signed, fixed_bit=fbit, fixed=is_fixed)
        q.act_backward_op = after_bn.get(name) is not False
        _set_submodule(model, name, q.train(m.training))


def _swap_batchnorms(
    model: nn.Module, calls: list[tuple[str, nn.Module]], bit_list: tuple[int, ...], fbit: Bit
) -> dict[str, list[str]]:
    """Replace each BatchNorm by a SwitchBatchNorm (one BN per bit, + fp and the fixed bit); return bn -> producers.

    Each BatchNorm is fed by the quantized layer executed just before it.
    """
    producers = _bn_producers(calls)
    keys = [str(b) for b in bit_list] + [FP]
    if fbit is not None and str(fbit) not in keys:
        keys.append(str(fbit))
    for n in producers:
        old = cast(nn.modules.batchnorm._BatchNorm, model.get_submodule(n))
        sbn = SwitchBatchNorm(old, keys).train(old.training)
        _set_submodule(model, n, sbn)
    return producers


def quantize_model(
    model: nn.Module,
    bits: Sequence[int] = DEFAULT_BITS,
    example_input: torch.Tensor | None = None,
    *,
    fixed: str | Sequence[str] = "first_last",
    fixed_bits: BitLike = "fp",
    rounding: str = "half_up",
    act_signed: bool | None = None,
    weight_only: bool = False,
    act_bits: BitLike = "fp",
    share_inputs: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place (and return it).

    Every ``nn.Conv2d`` (grouped, depthwise) and ``nn.Linear`` becomes a :class:`QConv2d`/:class:`QLinear` at
    the same module path; every BatchNorm a :class:`SwitchBatchNorm` with one private BN per bit (plus ``fp``).

    Args:
        bits: candidate bit-widths, e.g. (8, 6, 4, 2), (4, 3, 2), (8, 4).  The
            highest is the stored integer precision h.
        example_input: one input batch; traced once to find execution order (first and last layer) and which
            layer feeds each BatchNorm.  Zoo models carry ``example_input_shape`` and may omit it.
        fixed: ``"first_last"`` (default, as the paper), ``"none"``, or explicit module paths.
        fixed_bits: precision of fixed layers: ``"fp"`` (default) or an int (e.g. 8).
        rounding: how lower bits derive from the stored INT-h code: ``"half_up"`` (default) or ``"half_even"``
            (Double Rounding), or ``"msb"`` (MSB slicing: W_l = W_h >> (h-l), the top bits; scale s_h·2^(h-l)).
        act_signed: force signed/unsigned activation ranges; ``None`` decides per
            layer from data (signed when its first input has negatives).
        weight_only: only the weights switch bits; activations of searchable layers run at ``act_bits``
            (``"fp"``, the default, or one of ``bits``) in every config.  How language models are deployed.
        share_inputs: layers fed one tensor (q, k, v) quantize it as one (:func:`hasb.modules.share_input_quantizer`).
    """
    if getattr(model, "hasb_spec", None) is not None:
        raise ValueError("model is already quantized (it has hasb_spec)")
    bit_list, fbit = _check_quantize_args(bits, rounding, fixed_bits)
    abit = _check_act_bits(act_bits, bit_list) if weight_only else None
    ex = _example(model, example_input)
    if getattr(model, "example_input_shape", None) is None and isinstance(ex, torch.Tensor):
        _set_attr(model, "example_input_shape", tuple(ex.shape[1:]))  # so later tracing (cost model) needs no input
    calls, after_bn, inputs = _trace_order(model, ex, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm))
    layer_order = _layer_order(calls)
    fixed_set = _fixed_layers(fixed, layer_order)
    _swap_layers(model, layer_order, fixed_set, bit_list, rounding, act_signed, fbit, after_bn)
    producers = _swap_batchnorms(model, calls, bit_list, fbit)
    spec = QuantSpec(
        bits=bit_list,
        fixed=tuple(n for n in layer_order if n in fixed_set),
        fixed_bit=fbit,
        rounding=rounding,
        order=tuple(layer_order),
        bn_producers=producers,
        weight_only=weight_only,
        act_bit=abit,
        shared_inputs=_share_inputs(model, inputs, fixed_set) if share_inputs else (),
    )
    _set_attr(model, "hasb_spec", spec)
    link_batchnorms(model)
    attach_weight_pass(model)
    return model


def quantize_like(model: nn.Module, spec: QuantSpec | dict) -> nn.Module:
    """Quantize a float ``model`` as ``spec`` (a :class:`QuantSpec` or its dict) describes: how exports and
    checkpoints are rebuilt."""
    s = spec if isinstance(spec, QuantSpec) else QuantSpec.from_dict(spec)
    model = quantize_model(
        model,
        s.bits,
        fixed=list(s.fixed) or "none",
        fixed_bits=bit_str(s.fixed_bit),
        rounding=s.rounding,
        weight_only=s.weight_only,
        act_bits=bit_str(s.act_bit),
        share_inputs=bool(s.shared_inputs),
    )
    if get_spec(model).shared_inputs != s.shared_inputs:  # a model whose forward differs from the spec's
        raise ConfigError(
            f"the spec's layers sharing an input {[list(g) for g in s.shared_inputs]} are not this model's "
            f"{[list(g) for g in get_spec(model).shared_inputs]}: rebuild the model the spec was written for"
        )
    return model


def _share_inputs(model: nn.Module, inputs: list[list[str]], fixed: set[str]) -> tuple[tuple[str, ...], ...]:
    """Make each group of searchable layers fed one input (:func:`_input_groups`) share its quantizer; returns the
    groups (two or more layers each, call order), as ``QuantSpec.shared_inputs`` records them."""
    groups = []
    for names in inputs:
        searchable = [n for n in names if n not in fixed]
        if len(searchable) > 1:
            share_input_quantizer([_quant_layer(model, n) for n in searchable])
            groups.append(tuple(searchable))
    if groups:
        model.register_load_state_dict_pre_hook(_check_shared_steps)
    return tuple(groups)


def _check_shared_steps(model: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """``load_state_dict`` pre-hook of a model with shared inputs: each group's layers must come with one step per
    bit.  A state dict saved with one quantizer per layer has a step each, and loading it would silently keep the
    last layer's for all of them (their keys name one tensor here)."""
    spec = get_spec(model)
    for group in spec.shared_inputs:
        for b in spec.bits:
            steps = [s for n in group if (s := state_dict.get(f"{prefix}{n}.act_scales.{b}")) is not None]
            if any(not torch.equal(s, steps[0]) for s in steps[1:]):
                raise ConfigError(
                    f"the state dict has different {b}-bit activation steps for {', '.join(group)}, which share "
                    "one input quantizer in this model: it was saved with one quantizer per layer; quantize the "
                    "model with share_inputs=False (or hasb.quantize_like with the spec it was saved with) to load it"
                )


def _check_quantize_args(bits: Sequence[int], rounding: str, fixed_bits: BitLike) -> tuple[tuple[int, ...], Bit]:
    """(candidate bits highest first, parsed by :func:`hasb.cli.parse_bits`; the fixed layers' bit or None)."""
    try:
        bit_list = tuple(parse_bits(list(bits) if not isinstance(bits, str) else bits, "bits"))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"candidate bits must be integers in 1..8, each once; got {bits!r} ({e})") from None
    if rounding not in ROUNDINGS:
        raise ConfigError(f"unknown rounding {rounding!r}; accepted: {', '.join(ROUNDINGS)}")
    fbit = parse_bit(fixed_bits)
    if fbit is not None and fbit > 8:
        raise ConfigError(f"fixed_bits must be 'fp' or 1..8, got {fixed_bits!r}")
    return bit_list, fbit


def _check_act_bits(act_bits: BitLike, bits: tuple[int, ...]) -> Bit:
    abit = parse_bit(act_bits)
    if abit is not None and abit not in bits:
        raise ConfigError(f"act_bits must be 'fp' or one of the candidate bits {list(bits)}, got {act_bits!r}")
    return abit


def _fixed_layers(fixed: str | Sequence[str] | None, layer_order: list[str]) -> set[str]:
    """The layers kept at the fixed precision: first and last, none, or the named ones (checked)."""
    if fixed == "first_last":
        return {layer_order[0], layer_order[-1]}
    if fixed in ("none", None, ()):
        return set()
    fixed_set = set([fixed] if isinstance(fixed, str) else fixed)
    unknown = fixed_set - set(layer_order)
    if unknown:
        raise ConfigError(f"fixed layer(s) {sorted(unknown)} are not Conv2d/Linear layers of the model")
    return fixed_set


def _bn_producers(calls: list[tuple[str, nn.Module]]) -> dict[str, list[str]]:
    """BatchNorm path → the (up to two) Conv2d/Linear layers executed last before its first call, latest first."""
    producers: dict[str, list[str]] = {}
    last: list[str] = []
    for n, m in calls:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            last = ([n] + last)[:2]
        elif n not in producers:
            producers[n] = list(last)
    return producers


def link_batchnorms(model: nn.Module) -> None:
    """(Re)attach each SwitchBatchNorm to the layers whose bits select its entry."""
    spec = get_spec(model)
    for n, prod in spec.bn_producers.items():
        bn = cast(SwitchBatchNorm, model.get_submodule(n))
        bn._producer = [model.get_submodule(prod[0])] if len(prod) > 0 else []
        bn._prev = [model.get_submodule(prod[1])] if len(prod) > 1 else []


def get_spec(model: nn.Module) -> QuantSpec:
    spec = getattr(model, "hasb_spec", None)
    if spec is None:
        raise ValueError("model is not quantized: call hasb.quantize_model(model, bits=...) first")
    return spec


def quantized_layers(model: nn.Module) -> dict[str, QConv2d | QLinear]:
    """All quantized layers (fixed included), in execution order."""
    spec = get_spec(model)
    return {n: _quant_layer(model, n) for n in spec.order}


def searchable_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose bits a config may choose, in execution order."""
    spec = get_spec(model)
    return [n for n in spec.order if n not in spec.fixed]


def batchnorms(model: nn.Module) -> dict[str, SwitchBatchNorm]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SwitchBatchNorm)}


def get_config(model: nn.Module) -> BitConfig:
    """The active config of the searchable layers."""
    layers = quantized_layers(model)
    return BitConfig({n: (layers[n].w_bit, layers[n].a_bit) for n in searchable_layers(model)})


def set_config(model: nn.Module, config: BitConfig | dict | BitLike) -> None:
    """Switch the model to ``config`` (a BitConfig, a {layer: bits} dict, or one uniform bit). No weights are copied."""
    if type(config) is int and _set_uniform(model, config):
        return
    if not isinstance(config, (BitConfig, dict)):
        config = uniform_config(model, config)
    elif isinstance(config, dict):
        config = BitConfig(config)
    spec = get_spec(model)
    config = spec.tie(config)
    layers = quantized_layers(model)
    allowed = {n: spec.bits for n in searchable_layers(model)}
    config.validate(allowed, fixed={n: spec.fixed_bit for n in spec.fixed}, complete=True)
    for n, (w, a) in config.layers.items():
        if n not in spec.fixed:
            layers[n].set_bits(w, a)


def _set_uniform(model: nn.Module, bit: int) -> bool:
    """Every searchable layer at candidate ``bit`` (activations as the spec prescribes), without building and
    checking a BitConfig: what a multi-precision step does between its passes (byte LM, CPU: 80 → 30 µs per
    switch; benchmarks/switch_cost.py).  False, with nothing set, for a bit that is not a candidate: the general
    path then words the error."""
    spec = get_spec(model)
    w, a = spec.pair(bit)
    if w not in spec.bits or (a is not None and a not in spec.bits):  # a spec read from a file: act_bit too
        return False
    for n in spec.order:
        if n not in spec.fixed:
            _quant_layer(model, n).put_bits(w, a)
    return True


def set_fp(model: nn.Module) -> None:
    """Every layer, fixed ones included, at full precision: the float model (BN 'fp' entries)."""
    for m in quantized_layers(model).values():
        m.put_bits(None, None)


def restore_fixed(model: nn.Module) -> None:
    spec = get_spec(model)
    for n in spec.fixed:
        m = _quant_layer(model, n)
        m.put_bits(spec.fixed_bit, spec.fixed_bit)


@contextlib.contextmanager
def use_config(model: nn.Module, config) -> Iterator[nn.Module]:
    """Temporarily switch to ``config``; restores the previous bits on exit."""
    layers = quantized_layers(model)
    saved = {n: (m.w_bit, m.a_bit) for n, m in layers.items()}
    try:
        set_config(model, config)
        yield model
    finally:
        for n, (w, a) in saved.items():
            layers[n].put_bits(w, a)


def uniform_config(model: nn.Module, bit: BitLike) -> BitConfig:
    """Every searchable layer at weight bit ``bit`` (activations as the spec's mode prescribes)."""
    return get_spec(model).tie(BitConfig.uniform(searchable_layers(model), bit))


def candidate_bits(model: nn.Module) -> tuple[int, ...]:
    return get_spec(model).bits


def init_quantizers(model: nn.Module, batch: torch.Tensor) -> None:
    """Data-driven initialisation of every activation scale: one forward per candidate bit (no grad).

    BatchNorm normalises with the batch's statistics, as in training, and its running statistics are left as they
    were; everything else is in eval mode.  Eval-mode BN would apply the float model's running statistics to the
    quantized weights, which they do not fit (half-up ties shift channel means, most at Δ = 1): activations drift
    layer by layer and the low-bit scales come out far too large — on a {4,3,2} ResNet-20 ×4 per layer, 10⁹ at the
    last block, so every activation quantized to 0 and, at ALRS's small low-bit learning rates, stayed there.
    """
    if uses_bits_as_data(model):  # calibrate through the int path (its lazy init), then back to data mode
        bits_as_data(model, False)
        try:
            init_quantizers(model, batch)
        finally:
            bits_as_data(model, True)
        return
    was = model.training
    saved = get_config(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    kept = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in bns]
    model.eval()
    for m in bns:
        m.train()
    try:
        with torch.no_grad():
            for b in candidate_bits(model):
                set_config(model, b)
                model(batch)
    finally:
        for m, st in kept:  # running statistics and batch counters as they were
            m.load_state_dict(st)
        set_config(model, saved)
        model.train(was)


def _act_bits_needed(spec: QuantSpec, name: str) -> set[int]:
    """The activation bits layer ``name`` can run at under any config of ``spec`` (fp excluded)."""
    if name in spec.fixed:
        bits = {spec.fixed_bit}
    else:
        bits = {spec.pair(b)[1] for b in spec.bits}
    return {b for b in bits if b is not None}


def bits_as_data(model: nn.Module, on: bool = True) -> nn.Module:
    """Switch "bits as data" on (or off) for every quantized layer and SwitchBatchNorm of ``model``; returns it.

    On, each layer mirrors its active bits in 0-dim tensor buffers (non-persistent: the state dict is unchanged)
    that :func:`set_config`, :func:`set_fp`, :func:`use_config` and ``layer.w_bit = b`` update in place, its
    forward reads only those (:func:`hasb.quantizer.quantize_weight_t` / ``quantize_activation_t``), and every
    SwitchBatchNorm picks its entry by a tensor index.  ``torch.compile(model)`` then compiles ONE graph for all bit
    configs (uniform or mixed); only switching a layer to or from ``fp`` recompiles (a Python branch).  Outputs and
    gradients equal the int path's (the composite reference: no fused Triton kernels in this mode), with one
    exception: layers sharing an input (``QuantSpec.shared_inputs``) quantize it once per layer here, since no
    Python bit is read, where the int path quantizes it once per bit; the input's gradient then sums their parts
    in another order (float round-off).

    Every activation scale a config can use must be initialised first (raises :class:`ConfigError` saying so):
    call :func:`init_quantizers` (one calibration forward per candidate bit) before switching it on.
    """
    spec = get_spec(model)
    layers = quantized_layers(model)
    if not on:
        for bn in batchnorms(model).values():
            bn.set_bits_as_data(False)
        for m in layers.values():
            m.set_bits_as_data(False)
        return model
    need = {n: _act_bits_needed(spec, n) for n in layers}
    missing = {n: miss for n, m in layers.items() if (miss := m.missing_act_bits(need[n]))}
    if missing:
        first = next(iter(missing))
        raise ConfigError(
            f"bits_as_data needs every activation scale initialised ({len(missing)} layer(s) miss some, e.g. "
            f"{first} bits {missing[first]}): run hasb.init_quantizers(model, batch) on one batch first"
        )
    for n, m in layers.items():
        m.set_bits_as_data(True, need[n])
    for bn in batchnorms(model).values():
        bn.set_bits_as_data(True)
    return model


def uses_bits_as_data(model: nn.Module) -> bool:
    """Whether :func:`bits_as_data` is on for ``model``."""
    return any(m.bits_data for m in quantized_layers(model).values())


__all__ = [
    "QuantSpec",
    "bits_as_data",
    "uses_bits_as_data",
    "quantize_model",
    "get_spec",
    "quantized_layers",
    "searchable_layers",
    "batchnorms",
    "get_config",
    "set_config",
    "set_fp",
    "restore_fixed",
    "use_config",
    "uniform_config",
    "quantize_like",
    "candidate_bits",
    "init_quantizers",
    "link_batchnorms",
    "bit_key",
    "Bit",
]


def float_twin(qmodel: nn.Module, bit: int | None = None) -> nn.Module:
    """The float zoo model of a quantized ``qmodel``: its float weights and, per BN, the entry ``bit`` uses.

    The untrained fp path of a quantized model (``set_fp``) has BatchNorm entries that training never updated, so
    it is not a network anyone trained; its twin is. ``bit`` defaults to the highest candidate bit (the entry
    closest to float). Needs the model's build record (models built by ``hasb.models.build_model``).
    """
    build = build_record(qmodel)
    if not build:
        raise ConfigError("float_twin needs a model built by hasb.models.build_model (it has no build record)")
    twin = build_model(**build)
    bit = get_spec(qmodel).bits[0] if bit is None else bit
    with use_config(qmodel, bit):
        bns = batchnorms(qmodel)
        qstate = qmodel.state_dict()
        state = {}
        for k in twin.state_dict():
            owner, leaf = k.rsplit(".", 1)
            state[k] = bns[owner].active.state_dict()[leaf] if owner in bns else qstate[k]
    twin.load_state_dict(state)
    p0 = next(qmodel.parameters())
    return twin.eval().to(device=p0.device, dtype=torch.float32)
