"""ONNX export of a bit config (search.onnx_export): onnxruntime reproduces hasb's fake-quant outputs, the file
holds each layer's integer weights as int8 initializers, and Q/DQ nodes sit around every quantized layer."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import hasb
from hasb.models import build_model
from hasb.quantize import batchnorms, quantized_layers, searchable_layers, use_config
from hasb.quantizer import int_range
from search.onnx_export import OnnxExportError, export_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
numpy_helper = onnx.numpy_helper

MIXED = {"conv2": (8, 4), "conv3": (2, 2), "conv4": (4, 6), "fc1": (6, 2)}  # w/a differ; 2 bits on both
CASES = [("small_cnn", 4), ("small_cnn", MIXED), ("tiny_mlp", 2)]  # tiny_mlp: tanh → signed 2-bit input


def _distinct_batchnorms(model) -> None:
    """Give every per-bit BN entry its own statistics and affine terms, so exporting the wrong entry shows."""
    for sbn in batchnorms(model).values():
        for bn in sbn.bns.values():
            c = bn.num_features
            bn.running_mean.copy_(0.1 * torch.randn(c))
            bn.running_var.copy_(0.5 + 1.5 * torch.rand(c))
            with torch.no_grad():
                bn.weight.copy_(1 + 0.2 * torch.randn(c))
                bn.bias.copy_(0.1 * torch.randn(c))


@pytest.fixture(scope="module")
def models():
    """Quantized (8,6,4,2) zoo models, activation scales initialised on a batch, eval mode; 256 test inputs."""
    torch.manual_seed(0)
    out = {}
    for name in ("small_cnn", "tiny_mlp"):
        m = hasb.quantize_model(build_model(name), bits=(8, 6, 4, 2))
        _distinct_batchnorms(m)
        hasb.init_quantizers(m, torch.randn(64, 1, 28, 28))
        out[name] = m.eval()
    return out, torch.randn(256, 1, 28, 28)


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("name,config", CASES)
def test_onnxruntime_reproduces_fake_quant(models, tmp_path, name, config):
    # Same integer weights; activations rounded half to even on both sides.  What differs is float32 only:
    # conv/GEMM sums in another order (~1e-7 relative: every row within 1e-5 of the largest logit), and torch's
    # fake-quant kernels compute x·(1/s) where onnxruntime computes x/s, so an activation within an ulp of a .5
    # tie can round the other way (one step; 1e-3..1e-2 of the largest logit in its row).  Measured on 4 seeds ×
    # 4,096 inputs: ≤ 5 such rows at 8-bit activations, ≤ 1 at 4 bits, 0 at 2 bits — a rate that depends on the
    # CPU's summation order, so the bound is on the fraction of rows (≥ 99% within 1e-5), not on the worst row.
    # A missing Clip, a wrong scale or BN entry moves nearly every row by ≥ 1e-2.
    nets, x = models
    model = nets[name]
    path = export_onnx(model, config, tmp_path / "m.onnx", x[:1])
    with torch.no_grad(), use_config(model, config):
        ref = model(x).numpy()
    out = _run(path, x)  # batch 256 through a file exported with batch 1: the batch axis is dynamic
    assert out.shape == ref.shape == (256, 10)
    row_err = np.abs(out - ref).max(1)
    assert (row_err <= 1e-5 * np.abs(ref).max()).mean() >= 0.99
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99


def _graph_index(graph):
    """(tensor name → producing node, tensor name → constant value), following the exporter's Identity aliases."""
    producer = {o: n for n in graph.node for o in n.output}
    consts = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for n in graph.node:  # initializers the exporter de-duplicated are read through Identity
        if n.op_type == "Identity" and n.input[0] in consts:
            consts[n.output[0]] = consts[n.input[0]]
    return producer, consts


def _compute_node(graph, weight_int_name: str):
    """The Conv/Gemm whose weight input is DequantizeLinear(<weight_int_name>)."""
    producer, _ = _graph_index(graph)
    for n in graph.node:
        if n.op_type in ("Conv", "Gemm"):
            dq = producer.get(n.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] == weight_int_name:
                return n
    raise AssertionError(f"no Conv/Gemm consumes DequantizeLinear({weight_int_name})")


@pytest.mark.parametrize("name,config", CASES)
def test_int8_weights_and_qdq_nodes(models, tmp_path, name, config):
    nets, x = models
    model = nets[name]
    graph = onnx.load(str(export_onnx(model, config, tmp_path / "m.onnx", x[:1]))).graph
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))
    producer, consts = _graph_index(graph)
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    n_quant_inputs = 0
    with use_config(model, config):
        for lname, layer in quantized_layers(model).items():
            if layer.w_bit is None:  # fp (fixed first/last) layer: a float weight, no Q/DQ on its input
                assert f"{lname}.w_int" not in int8
                continue
            node = _compute_node(graph, f"{lname}.w_int")
            assert f"{lname}.w_int" in int8
            np.testing.assert_array_equal(consts[f"{lname}.w_int"], layer.int_weight(layer.w_bit).numpy())
            w_dq = producer[node.input[1]]
            assert [a.i for a in w_dq.attribute if a.name == "axis"] == [0]
            s_eff = (layer.w_scale.detach() * 2 ** (layer.high_bit - layer.w_bit)).numpy()
            np.testing.assert_array_equal(consts[w_dq.input[1]], s_eff)
            # input: DequantizeLinear ← [Clip(qmin, qmax)] ← QuantizeLinear, with this bit's activation step
            a_dq = producer[node.input[0]]
            assert a_dq.op_type == "DequantizeLinear"
            q = producer[a_dq.input[0]]
            qmin, qmax = int_range(layer.a_bit, bool(layer.act_signed))
            if layer.a_bit < 8:
                assert q.op_type == "Clip"
                assert (int(consts[q.input[1]]), int(consts[q.input[2]])) == (qmin, qmax)
                q = producer[q.input[0]]
            assert q.op_type == "QuantizeLinear"
            assert consts[q.input[2]].dtype == (np.int8 if qmin < 0 else np.uint8)
            assert float(consts[q.input[1]]) == float(layer.act_scales[str(layer.a_bit)].detach())
            n_quant_inputs += 1
    assert n_quant_inputs == len(searchable_layers(model)) > 0
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == n_quant_inputs


def test_missing_onnx_is_one_clear_error(models, tmp_path, monkeypatch):
    nets, x = models
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError, as when not installed
    with pytest.raises(OnnxExportError, match=r"pip install 'hasb\[onnx\]'"):
        export_onnx(nets["small_cnn"], 4, tmp_path / "m.onnx", x[:1])
    assert not (tmp_path / "m.onnx").exists()


def test_a_shared_input_is_one_qdq_chain_per_bit(tmp_path):
    """resnet20_narrow: each downsampling block's conv1 and 1x1 shortcut share their input quantizer.  At one
    activation bit they read one QuantizeLinear → Clip → DequantizeLinear; at different bits, one chain each.
    onnxruntime reproduces the fake-quant outputs either way (tolerance as in the test above)."""
    torch.manual_seed(0)
    model = hasb.quantize_model(build_model("resnet20_narrow"), bits=(8, 6, 4, 2))
    groups = model.hasb_spec.shared_inputs
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)
    _distinct_batchnorms(model)
    hasb.init_quantizers(model, torch.randn(64, 1, 28, 28))
    model.eval()
    x = torch.randn(128, 1, 28, 28)
    n_layers = len(searchable_layers(model))
    split = {**_uniform(model, 4), groups[0][0]: (4, 2)}  # group 0's two layers at two activation bits
    for config, chains in ((4, n_layers - 2), (split, n_layers - 1)):
        path = export_onnx(model, config, tmp_path / "m.onnx", x[:1])
        graph = onnx.load(str(path)).graph
        producer, _ = _graph_index(graph)
        with torch.no_grad(), use_config(model, config):
            ref = model(x).numpy()
        assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == chains
        for g in groups:
            ins = [producer[_compute_node(graph, f"{n}.w_int").input[0]].output[0] for n in g]
            with use_config(model, config):
                same_bit = len({model.get_submodule(n).a_bit for n in g}) == 1
            assert (ins[0] == ins[1]) == same_bit  # one DequantizeLinear output feeds both convolutions
        out = _run(path, x)
        row_err = np.abs(out - ref).max(1)
        assert (row_err <= 1e-5 * np.abs(ref).max()).mean() >= 0.99
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.99


def _uniform(model, bit: int) -> dict:
    return {name: (bit, bit) for name in searchable_layers(model)}
