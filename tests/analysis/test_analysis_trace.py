"""HVP engine, trace estimators and spectrum against exact Hessians of a ~1k-weight network (float64).

Statistical tolerances: estimates must lie within 4 reported standard errors of the exact value
(a false alarm rate of ~6e-5 per comparison for a normal mean); reported SEs must match the spread
over independent seeds to within a factor the sampling error of a 12-sample standard deviation
explains (10 seeds: relative SD of the SD ≈ 1/sqrt(2·9) ≈ 0.24, so [0.4, 1.9] is beyond ±2.5 of it).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hasb
from analysis.hvp import HessianOperator, HVPError, rademacher
from analysis.spectrum import operator_matvec, slq_density, top_eigenvalues
from analysis.trace import estimate_traces
from tests.support.analysis_fixtures import (
    exact_block_hessians,
    exact_full_hessian,
    tiny_problem,
)


@pytest.fixture(scope="module")
def problem():
    model, batches = tiny_problem()
    op = HessianOperator(model, batches, backend="double_backward")
    blocks = exact_block_hessians(op)
    return model, batches, op, blocks, np.array([float(B.trace()) for B in blocks])


def _rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def test_exact_blocks_match_autograd_hessian(problem):
    model, batches, op, blocks, _ = problem
    from torch.func import functional_call

    w0 = model.conv1.weight.detach().clone()
    n = sum(len(y) for _, y in batches)

    def loss(w):
        return (
            sum(
                torch.nn.functional.cross_entropy(functional_call(model, {"conv1.weight": w}, (x,)), y) * len(y)
                for x, y in batches
            )
            / n
        )

    H = torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), w0.numel())
    assert torch.allclose(H, blocks[0], rtol=1e-10, atol=1e-13)
    assert _rel(blocks[2], blocks[2].T) < 1e-12  # symmetric (a check of the HVP itself)


def test_backends_agree(problem):
    model, batches, op, _, _ = problem
    fop = HessianOperator(model, batches, backend="func", max_block=3)
    g = torch.Generator().manual_seed(1)
    V = [rademacher((5, *s), g, torch.float64) for s in op.shapes]
    for a, b in zip(fop.hvp(V), op.hvp(V), strict=False):
        assert _rel(a, b) < 1e-5
    Vb = {0: V[0][:2], 2: V[2]}
    fb, db = fop.block_hvp(Vb), op.block_hvp(Vb)
    for l in Vb:
        assert _rel(fb[l], db[l]) < 1e-5


def test_batches_weighted_by_size(problem):
    model, batches, op, _, _ = problem
    cat = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    one = HessianOperator(model, cat, backend="double_backward")
    g = torch.Generator().manual_seed(2)
    V = [rademacher((2, *s), g, torch.float64) for s in op.shapes]
    for a, b in zip(op.hvp(V), one.hvp(V), strict=False):
        assert _rel(a, b) < 1e-12


def test_auto_backend_and_bad_input(problem):
    model, batches, _, _, _ = problem
    op = HessianOperator(model, batches[:1], backend="auto")
    assert op.backend in ("double_backward", "func") and op.calibration["choice"] == op.backend
    with pytest.raises(HVPError, match="accepted"):
        HessianOperator(model, batches, backend="fast")
    with pytest.raises(HVPError, match="unknown parameter"):
        HessianOperator(model, batches, params=["nope.weight"])


@pytest.mark.parametrize(
    "estimator,kw",
    [
        ("layer", dict(max_hvp=4 * 16, block=8, exact_switch=False)),
        ("hutchpp", dict(max_hvp=4 * (2 * 4 + 16), sketch=4, block=8, exact_switch=False)),
        ("full", dict(max_hvp=32, block=8)),
    ],
)
def test_estimator_unbiased_and_se_calibrated(problem, estimator, kw):
    """Fixed budget (rtol=0), 10 seeds: pooled mean within 4 SE of exact; SE matches the seed spread."""
    _, _, op, _, exact = problem
    runs = [estimate_traces(op, estimator, rtol=0.0, seed=s, **kw) for s in range(10)]
    tr = np.array([r.trace for r in runs])
    se = np.array([r.stderr for r in runs])
    pooled_se = np.sqrt((se**2).mean(0) / len(runs))
    assert np.all(np.abs(tr.mean(0) - exact) <= 4 * pooled_se), (tr.mean(0), exact, pooled_se)
    ratio = tr.std(0, ddof=1) / np.sqrt((se**2).mean(0))
    assert np.all((ratio > 0.4) & (ratio < 1.9)), ratio


@pytest.mark.parametrize("estimator", ["layer", "hutchpp", "full"])
def test_adaptive_stop_within_4se(problem, estimator):
    _, _, op, _, exact = problem
    r = estimate_traces(op, estimator, rtol=0.15, max_hvp=400, seed=3)
    assert r.converged.all() or r.total_hvp >= 400
    assert np.all(np.abs(r.trace - exact) <= 4 * r.stderr + 1e-9 * np.abs(exact)), (r.trace, exact, r.stderr)
    df = r.to_frame()
    assert list(df.columns[:6]) == ["layer", "n_params", "trace", "trace_per_param", "stderr", "n_hvp"]
    assert np.allclose(df.trace_per_param, df.trace / df.n_params)


def test_exact_paths(problem):
    """Layers computed exactly (sketch covers the block, or the exact switch) carry SE 0 and the exact trace."""
    _, _, op, _, exact = problem
    r = estimate_traces(op, "hutchpp", sketch=40, rtol=0.5, max_hvp=1000, seed=0)
    assert r.exact[0] and r.exact[3] and r.stderr[0] == 0  # conv1 (36 weights) and fc (40) ≤ sketch
    assert np.allclose(r.trace[[0, 3]], exact[[0, 3]], rtol=1e-10)
    r2 = estimate_traces(op, "layer", rtol=0.005, max_hvp=1000, seed=0)
    ex = np.flatnonzero(r2.exact)
    assert ex.size and np.allclose(r2.trace[ex], exact[ex], rtol=1e-10)


@pytest.fixture(scope="module")
def sub_op(problem):
    """Operator over conv3 + fc (328 weights): small enough for a dense Hessian."""
    model, batches, _, _, _ = problem
    op = HessianOperator(model, batches, params=["conv3.weight", "fc.weight"], backend="double_backward")
    return op, exact_full_hessian(op)


def test_lanczos_top_eigenvalues(problem, sub_op):
    _, _, _, blocks, _ = problem
    op, H = sub_op
    ev = torch.linalg.eigvalsh(H).numpy()
    mv, n = operator_matvec(op)
    top = top_eigenvalues(mv, n, k=3, max_iter=120, tol=1e-8)
    assert np.allclose(top, ev[::-1][:3], rtol=1e-6, atol=1e-10)
    mvb, nb = operator_matvec(problem[2], block=1)
    assert np.isclose(
        top_eigenvalues(mvb, nb, k=1, max_iter=120)[0], torch.linalg.eigvalsh(blocks[1])[-1].item(), rtol=1e-6
    )
    lm = top_eigenvalues(mv, n, k=1, which="LM", max_iter=120)
    assert np.isclose(abs(lm[0]), np.abs(ev).max(), rtol=1e-6)


def test_slq_density(sub_op):
    op, H = sub_op
    mv, n = operator_matvec(op)
    d = slq_density(mv, n, n_probes=16, m=30, seed=0)
    grid, dens = d["grid"], d["density"]
    assert abs(np.trapezoid(dens, grid) - 1) < 1e-3
    nodes, w = d["nodes"], d["weights"]
    ok = ~np.isnan(nodes)
    assert np.allclose(w.sum(1), 1, atol=1e-10)
    # per probe, Σ τ θ = vᵀHv/‖v‖²: a Hutchinson sample of Tr(H)/n
    per_probe = np.where(ok, nodes * w, 0).sum(1)
    total = float(torch.trace(H))
    assert abs(np.trapezoid(grid * dens, grid) - per_probe.mean()) < 1e-3 * np.abs(per_probe).max() + d["sigma"] * 1e-3
    assert abs(per_probe.mean() - total / n) <= 4 * per_probe.std(ddof=1) / np.sqrt(len(per_probe))


def test_quantized_model_is_straight_through():
    """W4 (fp activations) hasb model: both backends agree, and the Hessian equals the float network's at Ŵ
    on the weights inside the clip range (∂Ŵ/∂W = 1 there, 0 outside)."""
    model, batches = tiny_problem(seed=1)
    q = hasb.quantize_model(tiny_problem(seed=1)[0], bits=(8, 4), example_input=batches[0][0][:2])
    q = q.double()
    cfg = {n: (4, None) for n in hasb.searchable_layers(q)}
    hasb.set_config(q, cfg)
    ops = {b: HessianOperator(q, batches, backend=b) for b in ("double_backward", "func")}
    op = ops["double_backward"]
    g = torch.Generator().manual_seed(0)
    V = [rademacher((3, *s), g, torch.float64) for s in op.shapes]
    hq = {b: o.hvp(V) for b, o in ops.items()}
    for a, b in zip(hq["func"], hq["double_backward"], strict=False):
        assert _rel(a, b) < 1e-5
    # the float twin with weights replaced by Ŵ
    layers = hasb.quantized_layers(q)
    with torch.no_grad():
        for n, m in layers.items():
            model.get_submodule(n).weight.copy_(m.quant_weight())
    masks = []
    for m in layers.values():
        if m.w_bit is None:
            masks.append(torch.ones_like(m.weight, dtype=torch.bool))
        else:
            qn, qp = hasb.quantizer.int_range(m.w_bit)
            s = (m.w_scale * 2 ** (m.high_bit - m.w_bit)).reshape(-1, *([1] * (m.weight.dim() - 1)))
            r = m.weight / s
            masks.append((r > qn) & (r < qp))
    fop = HessianOperator(model, batches, backend="double_backward")
    Vm = [v * mk for v, mk in zip(V, masks, strict=False)]
    hf = fop.hvp(Vm)
    hqm = op.hvp(Vm)
    for a, b, mk in zip(hqm, hf, masks, strict=False):
        assert _rel(a * mk, b * mk) < 1e-6  # w_scale is float32: Ŵ carries float32 round-off
    orig = HessianOperator(tiny_problem(seed=1)[0], batches, backend="double_backward")
    assert (
        sum(_rel(a, b) for a, b in zip(hq["double_backward"], orig.hvp(V), strict=False)) > 1e-3
    )  # quantization matters
