"""Quantized twins of Conv2d / Linear and bit-switchable BatchNorm.

A quantized layer keeps its float master weight (parameter names unchanged, so
torchvision state dicts still load), one per-channel weight scale ``w_scale``
shared by all bits (Double Rounding), and one activation scale per candidate bit
(``act_scales[str(b)]``).  Its active bits (``w_bit``, ``a_bit``) are plain
attributes switched at run time: no weights are copied.  ``None`` means full
precision (``fp``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels as K
from . import quantizer as Q

FP = "fp"


def bit_key(bit: int | None) -> str:
    return FP if bit is None else str(int(bit))


if TYPE_CHECKING:
    # The mixin is only ever combined with an nn.Module (Conv2d / Linear); let the type checker see its methods.
    _MixinBase = nn.Module
else:
    _MixinBase = object

_Size2 = tuple[int, int]


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
    w_bit: int | None
    a_bit: int | None
    fixed: bool

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
    def set_bits(self, w_bit: int | None, a_bit: int | None) -> None:
        for b in (w_bit, a_bit):
            if b is not None and b not in self.candidate_bits:
                raise ValueError(
                    f"bit {b} is not a candidate of this layer; accepted: "
                    f"{', '.join(map(str, self.candidate_bits))} or 'fp'"
                )
        self.w_bit, self.a_bit = w_bit, a_bit

    # -- quantization ----------------------------------------------------------
    def quant_weight(self, bit: int | None = None) -> torch.Tensor:
        bit = self.w_bit if bit is None else bit
        if bit is None:
            return self.weight
        # the fused Triton kernels where they apply (CUDA eager), else the composite reference
        return K.quantize_weight(self.weight, self.w_scale, bit, self.high_bit, self.rounding)

    def int_weight(self, bit: int | None = None) -> torch.Tensor:
        """Integer weights (int8 tensor) at ``bit`` (default the stored high bit)."""
        with torch.no_grad():
            w_h = Q.stored_int(self.weight, self.w_scale, self.high_bit)
            if bit is not None and bit != self.high_bit:
                w_h = Q.derive_int(w_h, bit, self.high_bit, self.rounding)
            return w_h.to(torch.int8 if self.high_bit <= 8 else torch.int32)

    def quant_input(self, x: torch.Tensor) -> torch.Tensor:
        b = self.a_bit
        if b is None:
            return x
        scale = self.act_scales[str(b)]
        if b not in self._ready:  # python-side cache: no device sync once initialised
            self._lazy_init(x, b)
        return K.quantize_activation(x, scale, b, self._ready[b])

    @torch.compiler.disable
    def _lazy_init(self, x: torch.Tensor, b: int) -> None:
        with torch.no_grad():
            if int(self.act_signed) < 0:
                self.act_signed.fill_(int(bool((x.detach() < 0).any())))
            i = self.candidate_bits.index(b)
            if not bool(self.act_init[i]):
                self.act_scales[str(b)].copy_(Q.init_activation_scale(x, b, bool(self.act_signed)))
                self.act_init[i] = True
        self._ready[b] = bool(self.act_signed)

    def _load_from_state_dict(self, *args, **kwargs):
        self._ready = {}
        super()._load_from_state_dict(*args, **kwargs)

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


class SwitchBatchNorm(nn.Module):
    """BatchNorm with private statistics and affine parameters per key.

    Multi-precision training keys by the bit of the layer whose output is being
    normalised (``producer``); Transitional BN (the supernet) keys by the pair
    (bit of the producer's predecessor, bit of the producer), e.g. ``"4-8"``.
    The producer layers are found by tracing one forward pass in
    :func:`hasb.quantize_model`; ``key`` is recomputed from their live bits at
    every forward, so switching a config never touches BN.
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
        self.mode = "bit"  # "bit" (per-bit, multi-precision) or "pair" (Transitional BN)
        self.override: str | None = None
        # producer / predecessor layers: plain references (not submodules), set by quantize_model
        self._producer: list = []
        self._prev: list = []

    @property
    def key(self) -> str:
        if self.override is not None:
            return self.override
        cur = bit_key(self._producer[0].w_bit) if self._producer else FP
        if self.mode == "pair":
            prev = bit_key(self._prev[0].w_bit) if self._prev else FP
            k = f"{prev}-{cur}"
            if k in self.bns:
                return k
        return cur if cur in self.bns else next(iter(self.bns))

    @property
    def active(self) -> nn.Module:
        return self.bns[self.key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[self.key](x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, mode={self.mode}, keys={list(self.bns.keys())}"
