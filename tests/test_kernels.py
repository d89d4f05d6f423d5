"""The fused weight-quantizer kernels (hasb.kernels) against the composite reference (hasb.quantizer)."""
import pytest
import torch

from hasb import kernels as K
from hasb import quantizer as Q

cuda = pytest.mark.skipif(not K.available(), reason="needs CUDA and Triton")

# conv and linear weight shapes, odd sizes, K below / equal to / above the kernels' block sizes
SHAPES = [(64, 3, 7, 7), (37, 5, 3, 3), (128, 64, 3, 3), (10, 512), (1000, 513), (3, 4607), (5, 1)]
BITS = [(8, 8), (8, 6), (8, 4), (8, 2), (6, 3), (4, 2)]   # (bit, high_bit)
U = 2.0 ** -24   # float32 unit round-off


def _case(shape, high_bit, device, seed=0):
    """A weight with heavy tails and a scale 0.7x the init, so both clip ranges are hit."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * (1 + 3 * torch.rand(shape, generator=gen) ** 4)
    scale = 0.7 * Q.init_weight_scale(w, high_bit)
    grad = torch.randn(shape, generator=gen)
    return (w.to(device).requires_grad_(), scale.to(device).requires_grad_(), grad.to(device))


def _composite(w, scale, bit, high_bit, rounding, grad):
    """Output and (∂W, ∂s) of the pure composite path (detach tricks, no autograd.Function)."""
    w = w.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    with Q.composite_ops():
        out = Q.quantize_weight(w, scale, bit, high_bit, rounding)
    out.backward(grad)
    return out.detach(), w.grad, scale.grad


def _scale_grad_bound(w, scale, bit, high_bit, grad):
    """Worst-case float32 error of the per-channel scale gradient, for any summation order, per channel.

    Each of the K products carries a few round-offs relative to |grad|·(|q| + |W_l| + 1) (the composite forms
    W_l - q by cancellation), and a K-term sum of any order adds at most K·u·Σ|terms| (Higham's γ_K).  Both paths
    carry such errors, hence the factor 2.
    """
    delta = high_bit - bit
    g = 1.0 / (w[0].numel() * Q.int_range(bit)[1]) ** 0.5
    w2, g2 = w.detach().reshape(w.shape[0], -1).double(), grad.reshape(w.shape[0], -1).double()
    q = w2 / (scale.detach().double()[:, None] * 2**delta)
    mag = (g2.abs() * (q.abs() + 2 ** (bit - 1) + 1)).sum(1)
    return 2 * (w2.shape[1] + 8) * U * mag * g * 2**delta


@cuda
@pytest.mark.parametrize("rounding", Q.ROUNDINGS)
@pytest.mark.parametrize("bit,high_bit", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_weight_equals_composite(shape, bit, high_bit, rounding):
    w, scale, grad = _case(shape, high_bit, "cuda")
    ref_out, ref_gw, ref_gs = _composite(w, scale, bit, high_bit, rounding, grad)
    assert K.fused_applies(w, scale)
    out = K.quantize_weight(w, scale, bit, high_bit, rounding)
    assert out.grad_fn is not None and type(out.grad_fn).__name__.startswith("FusedDoubleRoundLSQ")
    out.backward(grad)
    # values are integers times s_h·2^Δ: bit-exact
    assert torch.equal(out, ref_out)
    # ∂W: the composite forms grad·s_eff/s_eff (two roundings), the kernel passes grad through: ≤ 2 ulp
    assert torch.allclose(w.grad, ref_gw, rtol=2 * 2 * U, atol=0)
    assert torch.equal(w.grad == 0, ref_gw == 0)   # the same STE mask
    err = (scale.grad - ref_gs).abs().double()
    bound = _scale_grad_bound(w, scale, bit, high_bit, grad)
    assert bool((err <= bound).all()), f"max err/bound {(err / bound).max():.3g}"


@cuda
@pytest.mark.parametrize("rounding", Q.ROUNDINGS)
def test_fused_matches_eager_function_exactly(rounding):
    """The existing eager autograd.Function (_DoubleRoundLSQ) uses the same formulas: ∂W is bit-identical."""
    w, scale, grad = _case((96, 32, 3, 3), 8, "cuda", seed=1)
    out_ref = Q.quantize_weight(w, scale, 4, 8, rounding)
    gw_ref, gs_ref = torch.autograd.grad(out_ref, (w, scale), grad)
    out = K.quantize_weight(w, scale, 4, 8, rounding)
    gw, gs = torch.autograd.grad(out, (w, scale), grad)
    assert torch.equal(out, out_ref) and torch.equal(gw, gw_ref)
    assert bool(((gs - gs_ref).abs() <= _scale_grad_bound(w, scale, 4, 8, grad)).all())


@cuda
def test_double_backward_falls_back_to_composite():
    """create_graph=True: the gradient is the composite's graph, so second derivatives equal the composite's."""
    w, scale, grad = _case((16, 8, 3, 3), 8, "cuda", seed=2)

    def second(fn):
        out = fn(w, scale, 4, 8, "half_up")
        gw, gs = torch.autograd.grad(out, (w, scale), grad, create_graph=True)
        return torch.autograd.grad((gs**2).sum() + (gw * w).sum(), (w, scale))

    with Q.composite_ops():
        ref = second(Q.quantize_weight)
    got = second(K.quantize_weight)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@cuda
def test_composite_contexts_take_the_reference():
    w, scale, _ = _case((8, 4), 8, "cuda")
    with Q.composite_ops():
        assert not K.fused_applies(w, scale)
    assert not K.fused_applies(w.double(), scale.double())


def test_cpu_takes_the_composite(monkeypatch):
    """Off-GPU the kernels are never launched and the result (value and gradients) is the reference's."""
    def boom(*args, **kwargs):
        raise AssertionError("kernel launched off-GPU")

    monkeypatch.setattr(K, "_launch_forward", boom)
    monkeypatch.setattr(K, "_launch_backward", boom)
    for rounding in Q.ROUNDINGS:
        w, scale, grad = _case((12, 5, 3, 3), 6, "cpu")
        assert not K.fused_applies(w, scale)
        out = K.quantize_weight(w, scale, 3, 6, rounding)
        out.backward(grad)
        ref_out, ref_gw, ref_gs = _composite(w, scale, 3, 6, rounding, grad)
        assert torch.equal(out, ref_out)
        assert torch.allclose(w.grad, ref_gw, rtol=4 * U, atol=0)
        assert bool(((scale.grad - ref_gs).abs() <= _scale_grad_bound(w, scale, 3, 6, grad)).all())


def test_bad_arguments_rejected():
    w, scale, _ = _case((4, 3), 8, "cpu")
    with pytest.raises(ValueError, match="rounding"):
        K.quantize_weight(w, scale, 4, 8, "stochastic")
    with pytest.raises(ValueError, match="exceeds"):
        K.quantize_weight(w, scale, 8, 4)
