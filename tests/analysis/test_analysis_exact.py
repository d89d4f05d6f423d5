"""analysis.exact: per-sample layer traces against exact Hessian / Gauss–Newton blocks (float64, tiny nets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hasb
from analysis.exact import ExactTraceError, exact_layer_traces, exactness_check, layer_exactness
from analysis.hvp import HessianOperator
from analysis.trace import estimate_traces
from tests.support.exact_nets import (
    DT,
    GeluNet,
    ResBlockNet,
    TinySeq,
    batches_for,
    depthwise_net,
    gauss_newton_traces,
    hessian_block_traces,
    mlp,
    quantized_net,
    randomize_bn,
)


def check_equal_to_hessian(model, batches, params=None):
    r = exact_layer_traces(model, batches, params, chunk=16)
    ref = hessian_block_traces(model, batches, r.names)
    assert r.hessian_exact.all() and r.exact.all() and r.estimator == "exact", r.reasons
    assert np.all(r.stderr == 0) and np.all(np.abs(ref) > 1e-8)
    np.testing.assert_allclose(r.trace, ref, rtol=1e-6, atol=0)
    return r


def test_relu_mlp_equals_hessian():
    r = check_equal_to_hessian(mlp(), batches_for((6,), 5))
    assert r.n_samples == 12 and r.columns == 5 and r.n_vjp == 60 and r.grad_equiv == 5


def test_depthwise_conv_net_equals_hessian():
    check_equal_to_hessian(depthwise_net(), batches_for((2, 4, 4), 5))


def test_residual_batchnorm_maxpool_equals_hessian():
    torch.manual_seed(2)
    model = randomize_bn(ResBlockNet().to(DT)).train()  # exact_layer_traces switches to eval and back
    batches = batches_for((3, 4, 4), 5)
    r = exact_layer_traces(model, batches, chunk=16)
    assert model.training
    model.eval()
    np.testing.assert_allclose(r.trace, hessian_block_traces(model, batches, r.names), rtol=1e-6, atol=0)
    assert r.hessian_exact.all()


def test_sequence_logits_equal_hessian_of_position_mean():
    torch.manual_seed(3)
    r = check_equal_to_hessian(
        TinySeq().to(DT), batches_for((4, 3), 6, seq_len=4), ["inp.weight", "mix.weight", "out.weight"]
    )
    assert r.columns == 4 * 6  # every (position, class) column


def test_quantized_net_equals_hessian_at_fixed_config():
    # the quantizer is plain torch ops in float64 (composite path), so the float64 tolerance applies
    q = quantized_net()
    batches = batches_for((1, 6, 6), 5)
    hasb.set_config(q, 2)
    with torch.no_grad():
        q(batches[0][0])  # activation scales from batch 0 before the reference is taken
    ok, reasons = exactness_check(q, batches[0][0][:1])
    assert ok, reasons
    r = check_equal_to_hessian(q, batches)
    hasb.set_fp(q)
    fp = exact_layer_traces(q, batches)
    assert np.all(np.abs(fp.trace - r.trace) > 1e-3 * np.abs(fp.trace))  # 2-bit quantization is active


def test_gelu_net_gives_gauss_newton_and_says_so():
    torch.manual_seed(5)
    model = GeluNet().to(DT)
    batches = batches_for((6,), 5)
    r = exact_layer_traces(model, batches)
    gn = gauss_newton_traces(model, batches, r.names)
    H = hessian_block_traces(model, batches, r.names)
    np.testing.assert_allclose(r.trace, gn, rtol=1e-6, atol=0)
    assert r.estimator == "gauss-newton" and list(r.hessian_exact) == [False, True, True]
    assert not r.exact[0] and r.exact[1:].all()
    # only fc1 lies before the GELU: its Hessian trace differs from G by > 1% (the curvature of GELU), the others equal
    gap = (H - gn) / np.abs(gn)
    assert abs(gap[0]) > 1e-2, gap
    np.testing.assert_allclose(H[1:], gn[1:], rtol=1e-6)
    ok, reasons = exactness_check(model, batches[0][0][:1])
    assert not ok and len(reasons) == 1 and "fc1.weight" in reasons[0] and "GELU" in reasons[0]


def sampled_runs(model, batches, classes, seeds):
    runs = [exact_layer_traces(model, batches, classes=classes, seed=s) for s in seeds]
    assert all(r.sampled and r.columns == classes and not r.exact.any() for r in runs)
    return np.array([r.trace for r in runs]), np.array([r.stderr for r in runs])


@pytest.mark.parametrize("which", ["mlp", "sequence"])
def test_column_sampling_is_unbiased_and_its_se_matches_the_spread(which):
    if which == "mlp":
        model, batches, classes = mlp(), batches_for((6,), 5, sizes=(16,)), 2
    else:
        torch.manual_seed(3)
        model, batches, classes = TinySeq().to(DT), batches_for((4, 3), 6, sizes=(16,), seq_len=4), 3
    exact = exact_layer_traces(model, batches).trace
    S = 60
    t, se = sampled_runs(model, batches, classes, range(S))
    # mean of S independent estimates: its SE is sqrt(Σ SE_s²)/S
    assert np.all(np.abs(t.mean(0) - exact) <= 4 * np.sqrt((se**2).sum(0)) / S)
    # reported SE vs the spread over seeds: the sample std of S=60 draws has ≈ 1/sqrt(2·59) ≈ 9% relative
    # error (normal case), so a ratio outside [1/1.6, 1.6] would be a > 4-sigma event for a correct SE
    ratio = t.std(0, ddof=1) / np.sqrt((se**2).mean(0))
    assert np.all((ratio > 1 / 1.6) & (ratio < 1.6)), ratio


def test_agrees_with_hutchinson_within_its_standard_errors():
    model, batches = mlp(), batches_for((6,), 5)
    r = exact_layer_traces(model, batches)
    op = HessianOperator(model, batches, r.names, backend="double_backward")
    h = estimate_traces(op, "layer", rtol=0.05, max_hvp=600, seed=0, exact_switch=False)
    assert h.names == r.names and np.all(h.stderr > 0)
    assert np.all(np.abs(h.trace - r.trace) <= 4 * h.stderr), (h.trace, h.stderr, r.trace)


def test_exactness_check_flags_reuse_training_mode_and_nonlinear_ops():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.fc(F.relu(self.fc(x))))

    x = torch.randn(1, 4)
    ok, reasons = exactness_check(Twice(), x)
    assert not ok and all(r.startswith("fc.weight") for r in reasons)
    assert any("called 2 times" in r for r in reasons) and any("used twice" in r for r in reasons)

    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    ok, reasons = exactness_check(bn.train(), torch.randn(2, 1, 4, 4))
    assert not ok and any("batch_norm" in r and "training mode" in r for r in reasons)
    assert exactness_check(bn.eval(), torch.randn(1, 1, 4, 4)) == (True, [])

    tied = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    per = layer_exactness(tied, torch.randn(1, 3), ["0.weight"])
    assert any("several names" in r for r in per["0.weight"])

    soft = nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 3))
    assert any("softmax" in r for r in exactness_check(soft, x)[1])
    att, xs = _SelfAttention(), torch.randn(1, 3, 4)
    per = layer_exactness(att, xs, ["q.weight", "v.weight", "out.weight"])
    assert any("softmax" in r for r in per["q.weight"]) and any("used twice" in r for r in per["q.weight"])
    assert per["v.weight"] == [] and per["out.weight"] == []  # linear after the softmax: exact blocks
    # torch's fused attention is one opaque op: every weight inside it is reported (conservative)
    mha = nn.MultiheadAttention(4, 1, batch_first=True)
    ok, reasons = exactness_check(_TorchAttention(mha), xs, ["mha.in_proj_weight", "head.weight"])
    assert not ok and all(r.startswith("mha.in_proj_weight: multi_head_attention_forward") for r in reasons)


class _SelfAttention(nn.Module):
    """Single-head softmax attention written out: softmax(q kᵀ) v, then an output projection."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.q(x).transpose(1, 2) + self.k(x).sum(-1, keepdim=True), -1)
        return self.out(a @ self.v(x))


class _TorchAttention(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha, self.head = mha, nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0])


def test_bad_inputs_are_one_line_errors():
    model, batches = mlp(), batches_for((6,), 5)
    with pytest.raises(ExactTraceError, match="classes"):
        exact_layer_traces(model, batches, classes=1)
    with pytest.raises(ExactTraceError, match="chunk"):
        exact_layer_traces(model, batches, chunk=0)
    with pytest.raises(ExactTraceError, match="no batches"):
        exact_layer_traces(model, [])
    conv = nn.Conv2d(1, 2, 3).to(DT)
    with pytest.raises(ExactTraceError, match="logits"):
        exact_layer_traces(conv, [(torch.randn(2, 1, 4, 4, dtype=DT), torch.zeros(2, dtype=torch.long))])
    many = exact_layer_traces(model, batches, classes=50)  # ≥ all columns: computed exactly
    assert not many.sampled and np.all(many.stderr == 0)
    np.testing.assert_allclose(many.trace, exact_layer_traces(model, batches).trace, rtol=1e-12)


def test_chunking_does_not_change_the_result():
    model, batches = depthwise_net(), batches_for((2, 4, 4), 5)
    ref = exact_layer_traces(model, batches, chunk=64)  # many samples per vmap call
    for chunk in (1, 3):  # one column per call; columns split
        np.testing.assert_allclose(exact_layer_traces(model, batches, chunk=chunk).trace, ref.trace, rtol=1e-12)
    a = exact_layer_traces(model, batches, classes=3, seed=7, chunk=2)
    b = exact_layer_traces(model, batches, classes=3, seed=7, chunk=64)
    np.testing.assert_allclose(a.trace, b.trace, rtol=1e-12)  # same columns drawn whatever the chunking
