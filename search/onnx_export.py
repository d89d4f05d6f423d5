"""ONNX export of one bit config: QuantizeLinear → (Clip) → DequantizeLinear on each quantized layer's input,
the layer's integer weights as an int8 initializer followed by a per-channel DequantizeLinear.

The exported network is the deployment artifact (``hasb.export.export_deployment`` / ``load_deployment``): the
same integers W_l (Double Rounding, derived from W_h), the same effective per-channel weight step
s_h·2^(h−l), the same per-tensor activation step of the layer's input bit, and the BatchNorm entries the config
uses *as they are when exported* (export inside ``search.evaluate.Evaluator.calibrated`` to ship the
re-calibrated statistics that were scored, as for deploy.pt).

Graph per quantized layer (conv → ``Conv``, linear → ``Gemm``)::

    x ─ QuantizeLinear(s_a, zp=0: uint8 | int8) ─ [Clip(qmin, qmax)] ─ DequantizeLinear(s_a, 0) ─┐
    W_l (int8 initializer) ─ DequantizeLinear(s_w [C_out], zp 0, axis=0) ──────────────────────── Conv / Gemm

Activation ranges below 8 bits: ONNX's QuantizeLinear saturates to the full uint8/int8 range, so an explicit
``Clip`` to [0, 2^b−1] (unsigned) or [−2^(b−1), 2^(b−1)−1] (signed) on the *integer* tensor sits between Q and
DQ; clamp(clamp(r, 0, 255), 0, 15) = clamp(r, 0, 15), so the pair equals hasb's clamp.  At 8 bits the
saturation is the range and no Clip is written.  Layers whose weights (or input) are fp keep a float
initializer (or a plain input).  Layers that read one tensor with one step and range (a shared input quantizer,
``QuantSpec.shared_inputs``, at one bit) read one Q/[Clip]/DQ chain.

Rounding: ONNX QuantizeLinear rounds half to even; so do hasb's activation quantizers (the fused LSQ kernel and
``torch.fake_quantize_per_tensor_affine`` use ``nearbyint``, the composite path ``torch.round``).  Weights are
exported as integers, so their rounding (half-up Double Rounding by default) is exact in the file.  What may
differ from hasb is float32 arithmetic only: x·(1/s) (torch's fused kernel) against x/s (onnxruntime) can land
on opposite sides of a .5 tie for an activation within 1 ulp of it, and sums run in another order.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` (the dynamo exporter needs
onnxscript, not a dependency); the Q/DQ nodes come from ``torch.autograd.Function.symbolic``.  Opset 13
(per-axis DequantizeLinear, Clip on int8/uint8).  Writing needs the ``onnx`` package (the exporter serialises
with it; ``pip install 'hasb[onnx]'``), checking the file needs onnxruntime too.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from hasb.config import atomic_write_bytes
from hasb.errors import HasbError
from hasb.export import DeployedConv2d, DeployedLinear, export_deployment, load_deployment, read_checkpoint

OPSET = 13


class OnnxExportError(HasbError):
    """The ONNX export cannot run here (its optional dependency is missing)."""


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401  (optional dependency: torch's exporter serialises the graph with it)
    except ImportError:
        raise OnnxExportError(
            "ONNX export needs the onnx package, which is not installed; accepted fix: pip install 'hasb[onnx]'"
        ) from None


class _FakeQuantInput(torch.autograd.Function):
    """Per-tensor fake quantization of an activation; exported as QuantizeLinear → [Clip] → DequantizeLinear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, qmin: int, qmax: int) -> torch.Tensor:
        # the op load_deployment runs (round half to even, zero point 0)
        return torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale: float, qmin: int, qmax: int):
        dtype = torch.int8 if qmin < 0 else torch.uint8
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        zp = g.op("Constant", value_t=torch.tensor(0, dtype=dtype))
        q = g.op("QuantizeLinear", x, s, zp)
        full = torch.iinfo(dtype)
        if (qmin, qmax) != (full.min, full.max):  # the b-bit range inside the 8-bit one
            lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, s, zp)


class _DequantWeight(torch.autograd.Function):
    """W_l · s per output channel; exported as DequantizeLinear(W_l int8, s [C_out], 0, axis=0)."""

    @staticmethod
    def forward(ctx, w_int: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        # the same float32 product as the quantizer's forward and load_deployment (W_l · s_eff)
        return w_int.to(torch.float32) * scale.reshape((-1,) + (1,) * (w_int.dim() - 1))

    @staticmethod
    def symbolic(g, w_int, scale, zero_point):
        return g.op("DequantizeLinear", w_int, scale, zero_point, axis_i=0)


class QDQLayer(nn.Module):
    """A deployed conv/linear whose input and integer weights are explicit quantize/dequantize ops.

    Buffers (the ONNX initializers ``<layer>.w_int``, ``.w_scale``, ``.w_zero_point``): W_l int8 [C_out, ...],
    its step float32 [C_out], zeros int8 [C_out].  Input [N, C, H, W] (conv) or [N, F] (linear), as the layer's.
    ``seen``: the quantized inputs of this forward, shared by the model's layers (see :meth:`quantized_input`).
    """

    def __init__(self, layer: DeployedConv2d | DeployedLinear, entry: dict, seen: dict | None = None):
        super().__init__()
        self.layer = layer
        self.seen = {} if seen is None else seen
        self.has_int = "w_int" in entry
        # a Python float fixed at build time: a constant of the graph, not a traced tensor
        self.a_scale = None if layer.a_bits is None else float(layer.a_scale)
        if self.has_int:
            self.register_buffer("w_int", entry["w_int"].to(torch.int8).clone())
            self.register_buffer("w_scale", entry["w_scale"].reshape(-1).to(torch.float32).clone())
            self.register_buffer("w_zero_point", torch.zeros(self.w_int.shape[0], dtype=torch.int8))

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """x's Q/DQ at this layer's step and range, made once per forward for every layer that reads the same
        tensor (unchanged: same version) with the same step and range: layers that share an input quantizer
        (``QuantSpec.shared_inputs``, e.g. a block's conv1 and 1x1 shortcut, or q, k and v) then read one
        QuantizeLinear → [Clip] → DequantizeLinear in the file, as a runtime quantizes that tensor once."""
        key = (id(x), x._version, self.a_scale, *self.layer.a_range)
        hit = self.seen.get(key)
        if hit is not None:
            return hit[1]
        out = _FakeQuantInput.apply(x, self.a_scale, *self.layer.a_range)
        self.seen[key] = (x, out)  # x held: no other tensor can take its id while the entry lives
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.layer
        if self.a_scale is not None:
            x = self.quantized_input(x)
        w = _DequantWeight.apply(self.w_int, self.w_scale, self.w_zero_point) if self.has_int else m.weight
        if isinstance(m, DeployedConv2d):
            return m._conv_forward(x, w, m.bias)
        return F.linear(x, w, m.bias)


def qdq_module(deploy_path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """``load_deployment(deploy_path, model)`` with every quantized layer wrapped as a :class:`QDQLayer`.

    Computes the same outputs as the deployed module (eval mode); only the graph torch.onnx sees differs.
    """
    net = load_deployment(deploy_path, model)
    layers = read_checkpoint(deploy_path)["layers"]
    seen: dict = {}  # one forward's quantized inputs, emptied before and after every forward
    for name, entry in layers.items():
        parent, _, leaf = name.rpartition(".")
        owner = net.get_submodule(parent) if parent else net
        setattr(owner, leaf, QDQLayer(net.get_submodule(name), entry, seen))
    net.register_forward_pre_hook(lambda *_: seen.clear())
    net.register_forward_hook(lambda *_: seen.clear(), always_call=True)
    return net.eval()


def deployment_to_onnx(
    deploy_path: str | Path, path: str | Path, example_input: torch.Tensor, model: nn.Module | None = None
) -> Path:
    """Write the ONNX file of a deployment checkpoint (deploy.pt); returns ``path``.

    Args:
        deploy_path: written by ``hasb.export.export_deployment`` (what ``python -m search`` ships).
        path: the .onnx file to write (atomically).
        example_input: one batch, e.g. [1, C, H, W] float32; its batch dimension is exported as dynamic.
        model: a float model of the same architecture when the file records no build (see load_deployment).
    """
    _require_onnx()
    net = qdq_module(deploy_path, model)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            # the legacy exporter is the one that runs without onnxscript; the tests catch its removal
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based", DeprecationWarning)
            warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
            _export(net, example_input, out)
        return atomic_write_bytes(path, out.read_bytes())


def _export(net: nn.Module, example_input: torch.Tensor, out: Path) -> None:
    """torch.onnx.export of ``net`` (eval) to ``out``: one input [N, ...] named "input", N dynamic."""
    torch.onnx.export(
        net,
        (example_input.detach().cpu().float(),),
        str(out),
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )


def export_onnx(
    model: nn.Module, config, path: str | Path, example_input: torch.Tensor, float_model: nn.Module | None = None
) -> Path:
    """ONNX file of the quantized ``model`` at ``config`` (a BitConfig, {layer: bits} dict or one bit).

    Goes through the deployment checkpoint (``export_deployment`` then :func:`deployment_to_onnx`), so the file
    holds exactly deploy.pt's integers, scales and BatchNorm statistics.  ``float_model``: a float model of the
    same architecture, needed only when ``model`` was not built by ``hasb.models.build_model``.
    Returns ``path``.
    """
    _require_onnx()
    with tempfile.TemporaryDirectory() as tmp:
        deploy = export_deployment(model, config, Path(tmp) / "deploy.pt")
        return deployment_to_onnx(deploy, path, example_input, float_model)
