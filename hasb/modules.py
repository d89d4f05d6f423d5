"""Quantized twins of Conv2d / Linear and bit-switchable BatchNorm.

A quantized layer keeps its float master weight (parameter names unchanged, so
torchvision state dicts still load), one per-channel weight scale ``w_scale``
shared by all bits (Double Rounding), and one activation scale per candidate bit
(``act_scales[str(b)]``).  Its active bits (``w_bit``, ``a_bit``) are Python
attributes switched at run time: no weights are copied.  ``None`` means full
precision (``fp``).

Bits as data (:func:`hasb.quantize.bits_as_data`): every layer also mirrors its active bits in 0-dim tensor
buffers, updated in place whenever the bits change, and its forward reads only those (through
:func:`hasb.quantizer.quantize_weight_c` / :func:`~hasb.quantizer.quantize_activation_c`, the ``*_t`` functions
with the active bit's constants precomputed into small buffers at every switch); SwitchBatchNorm picks its
entry by a tensor index.  ``torch.compile`` then traces one graph for every bit config (only a switch to or from
``fp`` changes a Python value the graph depends on).  Values and gradients are those of the int path; the unused
per-bit parameters (activation scales of other bits, BN entries of other keys) keep ``grad = None`` as there, by
a pair of gradient hooks, so that Adam and weight decay leave them alone as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels as K
from . import quantizer as Q
from .errors import HasbError

FP = "fp"
# data mode's stacked BN statistics (SwitchBatchNorm._stack_stats): entry buffer name → stack buffer name
_STAT_NAMES = ("running_mean", "running_var", "num_batches_tracked")
_STAT_STACKS = ("_rm", "_rv", "_nbt")


def bit_key(bit: int | None) -> str:
    return FP if bit is None else str(int(bit))


if TYPE_CHECKING:
    # The mixin is only ever combined with an nn.Module (Conv2d / Linear); let the type checker see its methods.
    _MixinBase = nn.Module
else:
    _MixinBase = object

_Size2 = tuple[int, int]

# bit codes 0 (fp) .. 8: the side of the lookup tables (SwitchBatchNorm's entry, a layer's per-bit constants)
_CODES = 9
_DATA_BUFFERS = ("_w_bit_t", "_a_bit_t", "_a_idx_t", "_w_tab", "_w_c", "_a_tab", "_a_c")


def _bit_code(bit: int | None) -> int:
    """The value a bit tensor holds: the bit, or 0 for full precision (never a bit: bits are 1..8)."""
    return 0 if bit is None else int(bit)


def _only_selected_grads(p: nn.Parameter, selected: Callable[[], bool]) -> list[Any]:
    """Hooks that leave ``p.grad`` None after a backward in which ``p`` was not selected and had no gradient yet.

    In data mode the per-bit parameters are all inputs of the graph (a stack indexed by a tensor), so autograd gives
    the unselected ones zero gradients where the int path gives none; an optimizer would then move them (Adam's
    momentum, weight decay).  The pre-hook notes whether ``p.grad`` was None before this backward's accumulation;
    the post-accumulate hook restores None if so and ``p`` is not selected by the bits now active (so gradients
    accumulated over several passes keep the real contributions).
    """
    fresh = [False]

    def pre(g: torch.Tensor) -> torch.Tensor:
        fresh[0] = p.grad is None
        return g

    def post(param: torch.Tensor) -> None:
        if fresh[0] and not selected():
            param.grad = None

    return [p.register_hook(pre), p.register_post_accumulate_grad_hook(post)]


class QuantMixin(_MixinBase):
    """Shared state and logic of QConv2d and QLinear."""

    # provided by the nn.Conv2d / nn.Linear half of the concrete class
    weight: torch.Tensor
    # set up by _init_quant
    w_scale: nn.Parameter
    act_scales: nn.ParameterDict
    act_signed: torch.Tensor  # buffer
    act_init: torch.Tensor  # buffer
    _ready: dict[int, bool]
    candidate_bits: tuple[int, ...]
    high_bit: int
    rounding: Q.Rounding
    fixed: bool
    # bits as data (off by default; hasb.quantize.bits_as_data switches it)
    bits_data: bool = False
    _w_bit: int | None = None
    _a_bit: int | None = None
    _w_bit_t: torch.Tensor  # data-mode buffers: weight bit, activation bit (0 = fp), index into candidate_bits
    _a_bit_t: torch.Tensor
    _a_idx_t: torch.Tensor
    _w_c: torch.Tensor  # [4] (Qn, Qp, 2^Δ, g) of the active weight bit, copied from the row of _w_tab at a switch
    _a_c: torch.Tensor  # [2] (Qn, Qp) of the active activation bit, copied from the row of _a_tab at a switch
    _w_tab: torch.Tensor  # [9, 4] per bit code (row 0, fp: unused)
    _a_tab: torch.Tensor  # [9, 2] per bit code, for the layer's activation sign
    _w_pass: tuple[int, torch.Tensor | None] | None = None  # (bit, Ŵ) during a forward: see prequantize_weights
    _pass_layers: list | None = None  # the model's quantized layers (set by quantize_model): see quantize_pass
    _group: list | None = None  # the layers fed the same input tensor, in call order (share_input_quantizer)
    _a_shared: tuple | None = None  # on a group's first layer in a forward: (x, bit, x̂, x's version); quant_input
    # compiled graphs on CUDA: whether this layer's activation backward is hasb's kernel op (hasb.kernels
    # .quantize_activation); quantize_model sets it False where the input does not come from a batch norm
    # (there inductor's own fusion of the backward is cheaper; benchmarks/RESULTS.md, sessions 16-17)
    act_backward_op: bool = True

    def _init_quant(
        self,
        bits: Iterable[int],
        rounding: Q.Rounding,
        act_signed: bool | None,
        fixed_bit: int | None = None,
        fixed: bool = False,
    ) -> None:
        bits = tuple(sorted({int(b) for b in bits}, reverse=True))
        if fixed and fixed_bit is not None:
            bits = tuple(sorted(set(bits) | {int(fixed_bit)}, reverse=True))
        self.candidate_bits = bits
        self.high_bit = bits[0]
        self.rounding = rounding
        self.fixed = fixed
        self.w_scale = nn.Parameter(Q.init_weight_scale(self.weight, self.high_bit))
        dev = self.weight.device
        self.act_scales = nn.ParameterDict({str(b): nn.Parameter(torch.ones((), device=dev)) for b in bits})
        # -1 undecided (decided from data at first init), 0 unsigned, 1 signed
        self.register_buffer("act_signed", torch.tensor(-1 if act_signed is None else int(act_signed), device=dev))
        self.register_buffer("act_init", torch.zeros(len(bits), dtype=torch.bool, device=dev))
        self.w_bit = fixed_bit if fixed else bits[0]
        self.a_bit = fixed_bit if fixed else bits[0]
        self._ready = {}  # bit -> signed, once that bit's scale is initialised

    def _adopt(self, m: nn.Conv2d | nn.Linear, bits, rounding, act_signed, fixed_bit, fixed):
        """Take the float layer's weight and bias, then set up the quantizer state."""
        with torch.no_grad():
            self.weight.copy_(m.weight)
            if m.bias is not None:
                # built with bias iff m has one; the mixin only sees Module.__getattr__'s Tensor | Module
                cast(torch.Tensor, self.bias).copy_(m.bias)
        self._init_quant(bits, rounding, act_signed, fixed_bit, fixed)
        return self

    # -- bit switching -------------------------------------------------------
    @property
    def w_bit(self) -> int | None:
        """Active weight bit (None = fp)."""
        return self._w_bit

    @w_bit.setter
    def w_bit(self, bit: int | None) -> None:
        object.__setattr__(self, "_w_bit", bit)  # a plain attribute: nn.Module.__setattr__'s checks cost ~3 µs
        if self.bits_data:
            self._sync_w()

    @property
    def a_bit(self) -> int | None:
        """Active activation bit (None = fp)."""
        return self._a_bit

    @a_bit.setter
    def a_bit(self, bit: int | None) -> None:
        object.__setattr__(self, "_a_bit", bit)
        if self.bits_data:
            self._sync_a()

    def set_bits(self, w_bit: int | None, a_bit: int | None) -> None:
        for b in (w_bit, a_bit):
            if b is not None and b not in self.candidate_bits:
                raise ValueError(
                    f"bit {b} is not a candidate of this layer; accepted: "
                    f"{', '.join(map(str, self.candidate_bits))} or 'fp'"
                )
        self.put_bits(w_bit, a_bit)

    def put_bits(self, w_bit: int | None, a_bit: int | None) -> None:
        """Both active bits, unchecked (:meth:`set_bits` checks them): the properties' setters called directly,
        where ``self.w_bit = …`` would first run nn.Module.__setattr__ (a multi-precision step switches every
        layer between its passes, while a compiled step's GPU waits; benchmarks/switch_cost.py)."""
        QuantMixin.w_bit.fset(self, w_bit)  # type: ignore[attr-defined]
        QuantMixin.a_bit.fset(self, a_bit)  # type: ignore[attr-defined]

    # -- bits as data ------------------------------------------------------------
    def set_bits_as_data(self, on: bool, required: Iterable[int] = ()) -> None:
        """Switch data mode (see the module docstring); ``required``: the activation bits this layer may run at,
        whose scales must be initialised (checked now, and again after a state dict is loaded)."""
        for h in getattr(self, "_data_hooks", []):
            h.remove()
        self._data_hooks: list[Any] = []
        if not on:
            for n in _DATA_BUFFERS:
                self._buffers.pop(n, None)
                self._non_persistent_buffers_set.discard(n)
            self.bits_data = False
            return
        dev = self.weight.device
        self.register_buffer("_w_bit_t", torch.zeros((), device=dev), persistent=False)
        self.register_buffer("_a_bit_t", torch.zeros((), device=dev), persistent=False)
        self.register_buffer("_a_idx_t", torch.zeros((), dtype=torch.long, device=dev), persistent=False)
        per_ch = self.weight[0].numel()
        w_tab = [(1.0, 1.0, 1.0, 1.0)] + [Q.weight_consts(b, self.high_bit, per_ch) for b in range(1, _CODES)]
        self.register_buffer("_w_tab", torch.tensor(w_tab, device=dev), persistent=False)
        self.register_buffer("_w_c", self._w_tab[0].clone(), persistent=False)
        self.register_buffer("_a_tab", torch.zeros(_CODES, 2, device=dev), persistent=False)
        self.register_buffer("_a_c", torch.zeros(2, device=dev), persistent=False)
        self._data_required = tuple(sorted({int(b) for b in required}))
        self._data_ready = False
        self._check_data_ready()
        self.bits_data = True
        self._sync_w()
        self._sync_a()
        self._attach_grad_hooks()

    def _attach_grad_hooks(self) -> None:
        self._data_hooks = []
        if self._group is not None and self._group[0] is not self:  # shared steps: the group's first layer hooks
            return
        for b in self.candidate_bits:
            self._data_hooks += _only_selected_grads(self.act_scales[str(b)], self._a_is(b))

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy / pickle: Parameters are copied without their hooks; put them back on the copies
        super().__setstate__(state)
        if self.bits_data:
            self._attach_grad_hooks()

    def _a_is(self, b: int) -> Callable[[], bool]:
        """Whether the step of bit ``b`` is in use: by this layer, or by any layer that shares its steps."""
        group = self._group or [self]
        return lambda: any(m._a_bit == b for m in group)

    def missing_act_bits(self, required: Iterable[int]) -> list[int]:
        """The bits of ``required`` whose activation scale is not initialised yet (one device sync)."""
        done = self.act_init.tolist()
        return [b for b in sorted(set(required)) if not done[self.candidate_bits.index(b)]]

    @torch.compiler.disable
    def _check_data_ready(self) -> None:
        missing = self.missing_act_bits(self._data_required)
        if missing:
            raise HasbError(
                f"bits as data needs the activation scales of bits {missing} initialised: run "
                "hasb.init_quantizers(model, batch) (one calibration forward per candidate bit) first"
            )
        self._data_signed = int(self.act_signed) > 0
        self._data_ready = True
        if "_a_tab" in self._buffers:  # the (Qn, Qp) rows depend on the sign just read
            rows = [(0.0, 0.0)] + [tuple(map(float, Q.int_range(b, self._data_signed))) for b in range(1, _CODES)]
            self._a_tab.copy_(torch.tensor(rows))
            if self.bits_data:
                self._sync_a()

    def _sync_w(self) -> None:
        with torch.no_grad():
            self._w_bit_t.fill_(_bit_code(self._w_bit))
            self._w_c.copy_(self._w_tab[_bit_code(self._w_bit)])
        self._w_fp = self._w_bit is None

    def _sync_a(self) -> None:
        b = self._a_bit
        if b is not None and b not in self._data_required:
            raise HasbError(
                f"activation bit {b} of this layer was not initialised for bits as data (initialised: "
                f"{list(self._data_required)}); switch data mode off first or run hasb.init_quantizers"
            )
        with torch.no_grad():
            self._a_bit_t.fill_(_bit_code(b))
            self._a_idx_t.fill_(0 if b is None else self.candidate_bits.index(b))
            self._a_c.copy_(self._a_tab[_bit_code(b)])
        self._a_fp = b is None

    # -- quantization ----------------------------------------------------------
    def quant_weight(self, bit: int | None = None) -> torch.Tensor:
        if bit is None and self.bits_data:
            if self._w_fp:
                return self.weight
            return Q.quantize_weight_c(self.weight, self.w_scale, self._w_c, self.high_bit, self.rounding)
        bit = self.w_bit if bit is None else bit
        if bit is None:
            return self.weight
        if self._w_pass is None and self._pass_layers and K.traced_batch_applies() and self._batch_weights():
            quantize_pass(self._pass_layers)  # compiled: the first layer of a forward quantizes all of them
        if self._w_pass is not None and self._w_pass[0] == bit:  # this forward's, from quantize_pass
            w_hat = self._w_pass[1]  # in autocast's dtype if the pass ran under autocast: only there it serves
            if w_hat is not None and (w_hat.dtype == torch.float32 or torch.is_autocast_enabled("cuda")):
                if torch.compiler.is_compiling():  # taken: a Ŵ left in the attribute would leave the graph
                    _set_pass(self, _TAKEN)
                return w_hat
        # the fused Triton kernels where they apply (CUDA eager), else the composite reference
        return K.quantize_weight(self.weight, self.w_scale, bit, self.high_bit, self.rounding)

    def _batch_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(weight, w_scale) if :func:`quantize_pass` may quantize this layer's weight with the others of the pass,
        else None (each read once: a parameter's attribute lookup costs every eager step, once per layer)."""
        if self.bits_data or self._w_bit is None or self.rounding not in K.KERNEL_ROUNDINGS:
            return None
        w, s = self.weight, self.w_scale
        return (w, s) if K.weights_fit(w, s) else None

    def int_weight(self, bit: int | None = None) -> torch.Tensor:
        """Integer weights (int8 tensor) at ``bit`` (default the stored high bit)."""
        with torch.no_grad():
            w_h = Q.stored_int(self.weight, self.w_scale, self.high_bit)
            if bit is not None and bit != self.high_bit:
                w_h = Q.derive_int(w_h, bit, self.high_bit, self.rounding)
            return w_h.to(torch.int8 if self.high_bit <= 8 else torch.int32)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits_data:
            return self._quant_input_data(x)
        b = self.a_bit
        if self._group is not None:  # also at fp: the group's last layer clears the slot whatever its bit
            return self._quant_shared_input(x, b)
        return x if b is None else self._quantize_input(x, b)

    def _quantize_input(self, x: torch.Tensor, b: int) -> torch.Tensor:
        scale = self.act_scales[str(b)]
        if b not in self._ready:  # python-side cache: no device sync once initialised
            self._lazy_init(x, b)
        return K.quantize_activation(x, scale, b, self._ready[b], self.act_backward_op)

    def _quant_shared_input(self, x: torch.Tensor, b: int | None) -> torch.Tensor:
        """x̂ of a layer whose input feeds other layers too (:func:`share_input_quantizer`): the first of them to
        run at bit ``b`` quantizes ``x`` and leaves (x, b, x̂) on the group's first layer; the others at ``b`` take
        that x̂, so autograd sums their gradients into one quantizer backward.  The group's last layer clears the
        slot: a compiled forward then ends with nothing held (a tensor left in an attribute would be an output of
        the graph; see ``_TAKEN``), and an eager one drops it in :func:`release_weights` at the latest."""
        group = cast(list, self._group)
        owner = group[0]
        slot = owner._a_shared
        # eager also checks x's version: an in-place op on x between two layers makes a new x̂ (traced, dynamo
        # sees the op and quantize_model's trace grouped no layers around one: see _input_groups)
        version = 0 if torch.compiler.is_compiling() else x._version
        if b is None:
            out = x
        elif slot is not None and slot[0] is x and slot[1] == b and slot[3] == version:
            out = slot[2]
        else:
            out = self._quantize_input(x, b)
            object.__setattr__(owner, "_a_shared", (x, b, out, version))
        if self is group[-1]:
            object.__setattr__(owner, "_a_shared", None)
        return out

    def _quant_input_data(self, x: torch.Tensor) -> torch.Tensor:
        if self._a_fp:
            return x
        if not self._data_ready:  # a state dict was loaded: re-check (and re-read the sign) once
            self._check_data_ready()
        scales = torch.stack([self.act_scales[str(b)] for b in self.candidate_bits])
        return Q.quantize_activation_c(x, scales, self._a_idx_t, self._a_c)

    @torch.compiler.disable
    def _lazy_init(self, x: torch.Tensor, b: int) -> None:
        with torch.no_grad():
            if int(self.act_signed) < 0:
                self.act_signed.fill_(int(bool((x.detach() < 0).any())))
            i = self.candidate_bits.index(b)
            if not bool(self.act_init[i]):
                self.act_scales[str(b)].copy_(Q.init_activation_scale(x, b, bool(self.act_signed)))
                self.act_init[i] = True
            for m in self._group or ():  # shared steps: the others see this sign and this initialised step
                m.act_signed.copy_(self.act_signed)
                m.act_init[i] = True
        for m in self._group or (self,):
            m._ready[b] = bool(self.act_signed)

    def _load_from_state_dict(self, *args, **kwargs):
        self._data_ready = False
        super()._load_from_state_dict(*args, **kwargs)
        self.ready_from_buffers()

    def ready_from_buffers(self) -> None:
        """``_ready`` (and in data mode ``_data_ready``) as the buffers say now: the bits whose step ``act_init``
        marks initialised, with the sign in ``act_signed`` (read on the host, once per load).

        Why not leave them for :meth:`_lazy_init` and :meth:`_check_data_ready` to refill: those calls are where a
        compiled forward stops (``torch.compiler.disable``), so the first compiled call after a load broke its
        graph at every layer (ResNet-18 on the CPU: 28 graphs instead of 1, 25 in data mode; on the H200 with CUDA
        graphs the step stayed at 2.3x the float step, benchmarks/RESULTS.md, session 24)."""
        self._ready = {}
        if self.act_signed.is_meta:
            return
        signed = int(self.act_signed)  # -1: not known yet, read from the first input
        if signed >= 0:
            done = self.act_init.tolist()
            self._ready = {b: bool(signed) for b, d in zip(self.candidate_bits, done, strict=True) if d}
        # data mode: its check now; with a step missing, the first forward raises what to do, as before
        if self.bits_data and not self.missing_act_bits(self._data_required):
            self._check_data_ready()

    def bit_str(self) -> str:
        return f"w{bit_key(self.w_bit)}a{bit_key(self.a_bit)}"


class QConv2d(QuantMixin, nn.Conv2d):
    """Conv2d whose weight and input are Double-Rounding / LSQ quantized at the active bits."""

    @classmethod
    def from_float(cls, m: nn.Conv2d, bits, rounding="half_up", act_signed=None, fixed_bit=None, fixed=False):
        q = cls(
            m.in_channels,
            m.out_channels,
            # torch stores these as tuple[int, ...]; a Conv2d's are always pairs (or a padding string)
            cast(_Size2, m.kernel_size),
            cast(_Size2, m.stride),
            cast("str | _Size2", m.padding),
            cast(_Size2, m.dilation),
            m.groups,
            m.bias is not None,
            m.padding_mode,
            device=m.weight.device,
            dtype=m.weight.dtype,
        )
        return q._adopt(m, bits, rounding, act_signed, fixed_bit, fixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.bit_str()}, candidates={self.candidate_bits}"


class QLinear(QuantMixin, nn.Linear):
    """Linear whose weight and input are Double-Rounding / LSQ quantized at the active bits."""

    @classmethod
    def from_float(cls, m: nn.Linear, bits, rounding="half_up", act_signed=None, fixed_bit=None, fixed=False):
        q = cls(m.in_features, m.out_features, m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
        return q._adopt(m, bits, rounding, act_signed, fixed_bit, fixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.bit_str()}, candidates={self.candidate_bits}"


QUANT_TYPES = (QConv2d, QLinear)

# A compiled forward's layer marks its Ŵ taken (a constant, not None: the pass is not made again if the layer is
# called twice).  Why: dynamo makes a traced attribute write as the value at the frame's end; a Ŵ still held
# there is an output of the graph, and when a module is compiled the model's release hook is a frame of its own,
# so every layer's Ŵ left the graph and was rebuilt as a view at each call (lm_small on the H200: the W4A4 step
# 1.51x the float step against 1.30x with each layer's weight left to inductor; benchmarks/RESULTS.md, session 19).
_TAKEN: tuple[int, None] = (0, None)


# -- a pass's weights in one launch (CUDA eager) -----------------------------------------------------------------
def attach_weight_pass(model: nn.Module) -> None:
    """Let ``model``'s forward quantize all its layers' weights at once: the hooks of the eager pass
    (:func:`prequantize_weights`, :func:`release_weights`), and in every quantized layer the list of the model's
    quantized layers (what a compiled forward's first layer quantizes, :func:`quantize_pass`) and an empty slot
    for its Ŵ in its own ``__dict__`` (else the first compiled pass adds it and dynamo recompiles on the second).
    Plain attributes, not submodules: the state dict and ``modules()`` do not change."""
    layers = model.__dict__["_hasb_qlayers"] = [m for m in model.modules() if isinstance(m, QuantMixin)]
    for m in layers:
        m.__dict__["_pass_layers"] = layers
        m.__dict__["_w_pass"] = None
    model.register_forward_pre_hook(prequantize_weights)
    model.register_forward_hook(release_weights, always_call=True)


def prequantize_weights(model: nn.Module, args: Any) -> None:
    """Forward pre-hook of a quantized model (registered by :func:`hasb.quantize_model`).

    Where the weight kernels apply (CUDA eager), every layer's weight is quantized at its active bit in one
    forward launch and one backward launch (per rounding and device) instead of one autograd Function per layer;
    Ŵ and ∂W are the per-layer kernels' bit for bit, ∂s_h up to its summation order.  Why: an eager quantized
    step is bound by the host, and each per-layer Function costs about 0.25 ms of Python, autograd and launch on
    the H200's host, more than its kernels (benchmarks/RESULTS.md, session 11).  Each layer takes its Ŵ in
    ``quant_weight``; :func:`release_weights` drops them after the forward, so every forward builds its own graph.
    Under autocast Ŵ is made in autocast's dtype, the values autocast's cast would give, so no layer casts its
    weight (a launch and an autograd node each way); a layer running with autocast off quantizes its own.
    (Traced by torch.compile, the first layer's ``quant_weight`` does this instead: see :func:`quantize_pass`.)
    """
    layers = _layers_of(model)
    release_weights(model, args, None)  # Ŵ left by a layer compiled and called on its own (no release after it)
    if torch.compiler.is_compiling() or not K.batch_applies():
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # a captured graph would bake
        return  # the pinned copy of the layer constants: the per-layer launches take their numbers
    quantize_pass(layers)


def quantize_pass(layers: list[QuantMixin]) -> None:
    """Ŵ of every batchable layer of ``layers`` at its active bit, as one op each way per rounding and device; each
    layer finds its Ŵ in ``_w_pass`` (:func:`release_weights` empties it after the forward).

    Eager (from :func:`prequantize_weights`): :func:`hasb.kernels.quantize_weights`.  Traced by torch.compile
    (from the first quantized layer's ``quant_weight``, inside the forward's frame: a pre-hook is a frame of its
    own when a module is compiled, and Ŵ passed between two graphs cost the byte LM 7% of a step on the H200,
    benchmarks/RESULTS.md, session 18): :func:`hasb.kernels.quantize_weights_traced`."""
    traced = torch.compiler.is_compiling()
    groups: dict[tuple, tuple[list, list, list]] = {}  # (rounding, device) → (layers, weights, steps)
    for m in layers:
        if (pair := m._batch_weights()) is not None:
            w, s = pair
            ms, ws, scales = groups.setdefault((m.rounding, w.get_device()), ([], [], []))
            ms.append(m)
            ws.append(w)
            scales.append(s)
    quantize = K.quantize_weights_traced if traced else K.quantize_weights
    # under autocast Ŵ comes out in autocast's dtype: what each layer's conv / linear would cast it to
    low = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    for (rounding, _), (ms, ws, scales) in groups.items():
        bits = [cast(int, m._w_bit) for m in ms]
        outs = quantize(ws, scales, bits, [m.high_bit for m in ms], rounding, low)
        for m, bit, w in zip(ms, bits, outs, strict=True):
            _set_pass(m, (bit, w))


def release_weights(model: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (always called, also after an exception): the layers drop this forward's Ŵ and shared x̂."""
    for m in _layers_of(model):
        if m._w_pass is not None:
            _set_pass(m, None)
        if m._a_shared is not None:
            object.__setattr__(m, "_a_shared", None)


def share_input_quantizer(layers: list[QuantMixin]) -> None:
    """Let ``layers`` (non-fixed, same candidate bits, fed one input tensor; call order) quantize that input as
    one quantizer: one step per bit, the first layer's (the others' ``act_scales`` become the same ParameterDict,
    so the state dict keeps every key and each holds the shared value), and within a forward one x̂ per bit,
    made by the first of them to run at that bit (``QuantMixin._quant_shared_input``).

    Why: an integer deployment quantizes a tensor once for all its consumers (NNCF places one quantizer on a
    branching activation; a fused QKV GEMM needs one input step), and a training pass then quantizes it once:
    with the byte LM's q, k and v sharing, its compiled 4-pass step took 0.945x as long, 4.41x the float step
    against 4.67x (H200, benchmarks/RESULTS.md, session 23).  Layers at different bits keep their own x̂, each with
    the shared step of its bit; weights and bits are untouched, so the search space and BitOPs are too.

    A group of convolutions takes its compiled activation backward as hasb's kernel op (``act_backward_op``),
    whatever feeds it: there inductor joined the shared step's sum with the producer's batch-norm backward in one
    slow reduction (ResNet-18@224 b256 W4A4 on the H200, blocks' conv1 and 1x1 shortcut after the add-ReLU: 1.110x
    the float step with the op, 1.130x without, 1.104x with one quantizer per layer).  A group of linears (the
    LM's q, k, v after a LayerNorm) keeps inductor's fusion: 1.196x against 1.208x with the op
    (benchmarks/RESULTS.md, session 24).
    """
    owner = layers[0]
    convs = all(isinstance(m, QConv2d) for m in layers)
    for m in layers:
        if m.candidate_bits != owner.candidate_bits or m.fixed:
            raise ValueError("layers sharing an input quantizer must be searchable and have the same candidate bits")
        m.__dict__["_group"] = layers
        m.__dict__["_a_shared"] = None
        if m is not owner:
            m.act_scales = owner.act_scales
        if convs:
            m.act_backward_op = True


def _set_pass(m: QuantMixin, value: tuple[int, torch.Tensor | None] | None) -> None:
    """``m._w_pass = value`` through ``object.__setattr__``: a write dynamo records (it does not trace writes into
    ``__dict__``) without the checks of ``nn.Module.__setattr__``, ~10 µs a layer on the H200's host in eager
    steps, and when traced each of its checks is a guard of the compiled frame (lm_small's forward 3,686 → 3,148
    guard lines; dynamo's cache lookups 12–14% shorter, benchmarks/guard_cost.py, session 19)."""
    object.__setattr__(m, "_w_pass", value)


def _layers_of(model: nn.Module) -> list[QuantMixin]:
    """The model's quantized layers, as :func:`attach_weight_pass` listed them (they never change after
    quantize_model; walking the modules costs ~0.2 ms of an eager step)."""
    layers = model.__dict__.get("_hasb_qlayers")
    return [m for m in model.modules() if isinstance(m, QuantMixin)] if layers is None else layers


class SwitchBatchNorm(nn.Module):
    """BatchNorm with private statistics and affine parameters per key.

    Multi-precision training keys by the bit of the layer whose output is being
    normalised (``producer``); Transitional BN (the supernet) keys by the pair
    (bit of the producer's predecessor, bit of the producer), e.g. ``"4-8"``.
    The producer layers are found by tracing one forward pass in
    :func:`hasb.quantize_model`; ``key`` is recomputed from their live bits at
    every forward, so switching a config never touches BN.

    With bits as data the entry is an index computed from the producers' bit tensors (a lookup table), the
    selected entry's affine parameters and running statistics are picked from stacks by that index, and in
    training the running statistics (and ``num_batches_tracked``) of that entry alone are updated, through a 0/1
    mask over the entries; momentum ``None`` (cumulative average) is supported.  The statistics are stored stacked
    in data mode, the entries' buffers being rows of the stacks (:meth:`_stack_stats`).  Entries in different train/eval
    states or with different momenta (BN re-calibration) take the Python path.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, keys: Iterable[str]):
        super().__init__()
        self.num_features = bn.num_features
        self.bns = nn.ModuleDict()
        for k in keys:
            b = type(bn)(
                bn.num_features,
                bn.eps,
                bn.momentum,
                bn.affine,
                bn.track_running_stats,
                device=bn.weight.device if bn.affine else None,
            )
            b.load_state_dict(bn.state_dict())
            self.bns[k] = b
        self.register_load_state_dict_post_hook(_restack_after_load)
        self.mode = "bit"  # "bit" (per-bit, multi-precision) or "pair" (Transitional BN)
        self.override: str | None = None
        # producer / predecessor layers: plain references (not submodules), set by quantize_model
        self._producer: list = []
        self._prev: list = []

    bits_data: bool = False
    _lut: torch.Tensor  # data mode: [9 * 9] int64, (predecessor bit code, producer bit code) → entry index
    _rm: torch.Tensor  # data mode: the entries' running means [K, C], variances [K, C] and counts [K] stacked
    _rv: torch.Tensor
    _nbt: torch.Tensor

    def _key_for(self, prev: str, cur: str) -> str:
        """The entry used when the predecessor runs at ``prev`` and the producer at ``cur`` (bit keys or 'fp')."""
        if self.override is not None:
            return self.override
        if self.mode == "pair":
            k = f"{prev}-{cur}"
            if k in self.bns:
                return k
        return cur if cur in self.bns else next(iter(self.bns))

    @property
    def key(self) -> str:
        cur = bit_key(self._producer[0].w_bit) if self._producer else FP
        prev = bit_key(self._prev[0].w_bit) if self._prev else FP
        return self._key_for(prev, cur)

    @property
    def active(self) -> nn.Module:
        return self.bns[self.key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits_data:
            return self._forward_data(x)
        return self.bns[self.key](x)

    # -- bits as data ------------------------------------------------------------------------------------------
    def _signature(self) -> tuple:
        return (self.mode, self.override, tuple(self.bns.keys()))

    def set_bits_as_data(self, on: bool) -> None:
        """Switch data mode: the entry is picked by index from a lookup table of the producers' bit tensors."""
        for h in getattr(self, "_data_hooks", []):
            h.remove()
        self._data_hooks: list[Any] = []
        was = self.bits_data
        self.bits_data = False
        for n in ("_lut", *_STAT_STACKS):
            self._buffers.pop(n, None)
            self._non_persistent_buffers_set.discard(n)
        if was and not on:  # entries own their statistics again (no longer rows of a dropped stack)
            for m in self.bns.values():
                for n in _STAT_NAMES:
                    if getattr(m, n, None) is not None:
                        setattr(m, n, getattr(m, n).clone())
        if on:
            self._refresh_data()
            self.bits_data = True

    @torch.compiler.disable
    def _refresh_data(self) -> None:
        """(Re)build the lookup table [9 x 9] (predecessor bit code, producer bit code) → entry index, and the
        gradient hooks of every entry (entries added later, e.g. by Transitional BN, get theirs here)."""
        keys = list(self.bns.keys())
        codes = [FP] + [str(b) for b in range(1, _CODES)]
        lut = [[keys.index(self._key_for(p, c)) for c in codes] for p in codes]
        first = next(iter(self.bns.values()))
        ref = next(iter(first.buffers()), next(iter(first.parameters()), None))
        dev = ref.device if ref is not None else None
        self.register_buffer("_lut", torch.tensor(lut, dtype=torch.long, device=dev).reshape(-1), persistent=False)
        self._stack_stats()
        for h in self._data_hooks:
            h.remove()
        self._data_hooks = []
        for k, m in self.bns.items():
            for p in m.parameters(recurse=False):  # weight and bias (none without affine)
                self._data_hooks += _only_selected_grads(p, self._key_is(k))
        self._data_sig = self._signature()

    def _stack_stats(self) -> None:
        """Data mode's storage of the running statistics: each of ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` stacked over the entries ([K, C], [K, C], [K]; non-persistent buffers), and every
        entry's buffer made a row (a view) of its stack.  Why: the compiled train step then reads and updates
        three tensors per layer instead of 3·K (fewer graph inputs and kernels to compile), while everything that
        works on an entry (its forward in BN re-calibration, ``reset_running_stats``, the state dict and
        ``load_state_dict``, which copy in place) still reads and writes the same memory."""
        entries = list(self.bns.values())
        if not all(getattr(m, "track_running_stats", False) for m in entries):
            return
        for n, stack in zip(_STAT_NAMES, _STAT_STACKS, strict=True):
            rows = torch.stack([getattr(m, n) for m in entries])
            self.register_buffer(stack, rows, persistent=False)
            for k, m in enumerate(entries):
                setattr(m, n, rows[k])

    def _stats_linked(self) -> bool:
        """Whether every entry's statistics are still rows of data mode's stacks (``_stack_stats``)."""
        return all(
            getattr(m, n)._base is self._buffers.get(stack)
            for n, stack in zip(_STAT_NAMES, _STAT_STACKS, strict=True)
            for m in self.bns.values()
        )

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .half(): entries and stacks are converted one by one
        out = super()._apply(fn, recurse)
        if self.bits_data:
            self._refresh_data()  # re-stack from the entries' converted statistics
        return out

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        if self.bits_data:  # copy.deepcopy / pickle: Parameters are copied without their hooks
            self._data_hooks = []
            self._refresh_data()

    def _key_is(self, k: str) -> Callable[[], bool]:
        return lambda: self.key == k

    def _index(self) -> torch.Tensor:
        """The active entry's index, shape [1] int64, from the producers' bit tensors (no Python bit read)."""
        cur = self._producer[0]._w_bit_t if self._producer else None
        prev = self._prev[0]._w_bit_t if self._prev else None
        zero = self._lut.new_zeros(())
        code = (zero if prev is None else prev.long()) * _CODES + (zero if cur is None else cur.long())
        return self._lut.index_select(0, code.reshape(1))

    def _forward_data(self, x: torch.Tensor) -> torch.Tensor:
        if self._data_sig != self._signature():  # keys, mode or override changed since data mode was switched on
            self._refresh_data()
        entries = cast("list[nn.modules.batchnorm._BatchNorm]", list(self.bns.values()))
        if len({m.training for m in entries}) > 1 or len({m.momentum for m in entries}) > 1:
            return self.bns[self.key](x)  # entries in different states (BN re-calibration): the Python path
        e = entries[0]
        e._check_input_dim(x)
        idx = self._index()
        w = _pick([cast(torch.Tensor, m.weight) for m in entries], idx) if e.affine else None
        b = _pick([cast(torch.Tensor, m.bias) for m in entries], idx) if e.affine else None
        if not e.track_running_stats:
            return F.batch_norm(x, None, None, w, b, True, 0.0, e.eps)
        if not e.training:
            rm, rv = _row(self._rm, idx), _row(self._rv, idx)
            return F.batch_norm(x, rm, rv, w, b, False, 0.0, e.eps)
        return _train_and_update(x, e, idx, w, b, (self._rm, self._rv, self._nbt))

    def extra_repr(self) -> str:
        return f"{self.num_features}, mode={self.mode}, keys={list(self.bns.keys())}"


def _row(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``t[idx]`` for a [1] int64 index tensor: an index_select (no device sync, one graph)."""
    return t.index_select(0, idx).squeeze(0)


def _restack_after_load(bn: SwitchBatchNorm, incompatible_keys) -> None:
    """``load_state_dict`` post-hook (after the entries are loaded): ``assign=True`` replaces the entries'
    statistics with the loaded tensors, which are no rows of data mode's stacks; re-stack them.  Loading in place
    (the default) keeps the rows, and this checks and returns."""
    if bn.bits_data and "_rm" in bn._buffers and not bn._stats_linked():
        bn._refresh_data()


def _pick(ts: list[torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """``ts[idx]`` for a [1] int64 index tensor: a stack and :func:`_row`."""
    return _row(torch.stack(ts), idx)


def _train_and_update(
    x: torch.Tensor,
    e: nn.modules.batchnorm._BatchNorm,
    idx: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    stacks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Train-mode BN with batch statistics; running statistics of entry ``idx`` only updated, as BatchNorm does.

    ``stacks``: the running means, variances ([K, C] each) and counts ([K]) of every entry, updated in place
    (:meth:`SwitchBatchNorm._stack_stats`; the entries' buffers are their rows).  ``e``: any entry (eps,
    momentum).  F.batch_norm updates copies of the picked entry's rows with the entry's momentum (the native
    update, bit for bit); momentum None (cumulative average, 1/num_batches_tracked) runs it with momentum 1 (the
    batch statistics) and mixes by the selected entry's count as a tensor.  Each stack is written once, through
    a 0/1 mask over the entries (one in-place op per stack: no foreach ops, whose CUDA combo kernel raced on the
    index in torch 2.11, benchmarks/RESULTS.md, session 8).
    """
    rms, rvs, nbts = stacks
    rm, rv = _row(rms, idx), _row(rvs, idx)
    mask = torch.arange(rms.shape[0], device=idx.device) == idx  # [K] bool
    out = F.batch_norm(x, rm, rv, w, b, True, 1.0 if e.momentum is None else e.momentum, e.eps)
    with torch.no_grad():
        nbts.add_(mask.to(nbts.dtype))
        if e.momentum is None:
            f = 1.0 / _row(nbts, idx).double()
            rm = ((1.0 - f) * _row(rms, idx).double() + f * rm.double()).to(rm.dtype)
            rv = ((1.0 - f) * _row(rvs, idx).double() + f * rv.double()).to(rv.dtype)
        rows = mask.unsqueeze(1)  # [K, 1]
        rms.copy_(torch.where(rows, rm, rms))
        rvs.copy_(torch.where(rows, rv, rvs))
    return out
