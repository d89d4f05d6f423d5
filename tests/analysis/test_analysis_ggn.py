"""The ggn_block HVP backend: layer-restricted Gauss–Newton products equal the Hessian block products
(double backward) to round-off on piecewise-linear nets (float64), and ``auto`` uses it only there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hasb
from analysis.hvp import HessianOperator, HVPError, rademacher
from analysis.trace import estimate_traces
from tests.support.exact_nets import (
    DT,
    GeluNet,
    ResBlockNet,
    TinySeq,
    batches_for,
    depthwise_net,
    mlp,
    quantized_net,
    randomize_bn,
    seq_loss,
)

RTOL = 1e-10  # float64 round-off of a few hundred multiply-adds per entry, with a wide margin


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _probes(op: HessianOperator, k: int = 3, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(k, *s, generator=g, dtype=DT) for l, s in enumerate(op.shapes)}


def resnet_block_net():
    torch.manual_seed(2)
    return randomize_bn(ResBlockNet().to(DT)).eval()


def quantized_at_2bit():
    q = quantized_net()
    hasb.set_config(q, 2)
    return q


NETS = {
    "relu_mlp": (mlp, (6,)),
    "depthwise": (depthwise_net, (2, 4, 4)),
    "residual_bn_eval": (resnet_block_net, (3, 4, 4)),
    "quantized_2bit": (quantized_at_2bit, (1, 6, 6)),
}


@pytest.mark.parametrize("name", list(NETS))
def test_ggn_block_equals_hessian_block_products(name):
    build, shape = NETS[name]
    model = build()
    batches = batches_for(shape, 5)  # two batches of unequal size: the sample weighting is exercised
    ref = HessianOperator(model, batches, backend="double_backward")
    ggn = HessianOperator(model, batches, backend="ggn_block", max_block=2)  # 3 probes: two chunks
    auto = HessianOperator(model, batches, backend="auto")
    assert ggn.block_backend == auto.block_backend == "ggn_block" and ref.block_backend is None
    assert all(not r for r in auto.exactness.values())
    V = _probes(ref)
    want, got, got_auto = ref.block_hvp(V), ggn.block_hvp(V), auto.block_hvp(V)
    for l in V:
        assert want[l].norm() > 0
        assert _rel(got[l], want[l]) < RTOL, (l, _rel(got[l], want[l]))
        assert _rel(got_auto[l], want[l]) < RTOL
    assert ggn.backends_used() == "ggn_block" and ggn.n_hvp == 3 * len(V)
    assert auto._backend is None  # block products only: the full-probe backends were never timed


def test_sequence_logits_use_the_generic_loss_hessian():
    """[B, T, V] logits with a position-mean loss: ∇²_z L by torch.func (no closed form), still exact."""
    torch.manual_seed(3)
    model, batches = TinySeq().to(DT), batches_for((4, 3), 6, seq_len=4)
    params = ["inp.weight", "mix.weight", "out.weight"]
    ref = HessianOperator(model, batches, params, loss_fn=seq_loss, backend="double_backward")
    ggn = HessianOperator(model, batches, params, loss_fn=seq_loss, backend="ggn_block")
    V = _probes(ref)
    want, got = ref.block_hvp(V), ggn.block_hvp(V)
    assert all(_rel(got[l], want[l]) < RTOL for l in V)


def test_gelu_net_is_not_ggn_automatically():
    torch.manual_seed(5)
    model, batches = GeluNet().to(DT), batches_for((6,), 5)
    auto = HessianOperator(model, batches, backend="auto")
    assert auto.block_backend is None and auto.exactness["fc1.weight"]
    assert "not piecewise linear" in auto.calibration["block_backend"]
    ref = HessianOperator(model, batches, backend="double_backward")
    V = _probes(ref)
    want, got = ref.block_hvp(V), auto.block_hvp(V)
    assert all(_rel(got[l], want[l]) < 1e-8 for l in V)
    assert auto.backends_used() in ("double_backward", "func")
    with pytest.raises(HVPError, match="ggn_block.*gelu"):
        HessianOperator(model, batches, backend="ggn_block")
    # the GN block of fc1 really differs from its Hessian block here (so the check above matters)
    nets = HessianOperator(model, batches, backend="double_backward")
    nets.block_backend = "ggn_block"  # forced past the check, for this comparison only
    gn = nets.block_hvp({0: V[0]})[0]
    assert _rel(gn, want[0]) > 1e-3


def test_full_probes_and_traces_under_auto_on_a_piecewise_linear_net():
    """auto: full probes by a timed full backend (lazily), block probes by ggn_block; the layer-restricted
    Hutchinson run with the same seed gives the double-backward run's traces to round-off."""
    model, batches = depthwise_net(), batches_for((2, 4, 4), 5)
    auto = HessianOperator(model, batches, backend="auto")
    ref = HessianOperator(model, batches, backend="double_backward")
    g = torch.Generator().manual_seed(1)
    V = [rademacher((2, *s), g, DT) for s in ref.shapes]
    assert all(_rel(a, b) < 1e-8 for a, b in zip(auto.hvp(V), ref.hvp(V), strict=True))
    assert auto.backend in ("double_backward", "func") and auto.calibration["choice"] == auto.backend
    r_auto = estimate_traces(auto, "layer", rtol=0.2, max_hvp=60, seed=0)
    r_ref = estimate_traces(ref, "layer", rtol=0.2, max_hvp=60, seed=0)
    np.testing.assert_allclose(r_auto.trace, r_ref.trace, rtol=1e-9)
    assert auto.backends_used() == f"{auto.backend}+ggn_block"
