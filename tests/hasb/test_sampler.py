"""HASB / uniform / tempered samplers: empirical frequencies match the formulas (chi-square), schedule, state."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hasb.sampler import (
    HASBSampler,
    SensitivityError,
    TemperedSampler,
    UniformSampler,
    build_sampler,
    default_warmup,
    sigma_schedule,
    traces_for_model,
)

BITS = [8, 6, 4, 2]
LAYERS = ["a", "b", "c", "d", "e"]
TRACES = {"a": 0.9, "b": 0.05, "c": 0.3, "d": -0.01, "e": 0.31}  # mean 0.31: a and e sensitive (e: t = mean)
N = 4000  # draws: expected counts ≥ 0.1·N = 400 per cell; a 0.25-vs-0.4 deviation gives χ² in the hundreds


def counts(sampler, base, epoch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = {l: {b: 0 for b in BITS} for l in sampler.layers}
    for _ in range(n):
        cfg = sampler.sample(base, epoch, g)
        assert list(cfg.layers) == sampler.layers
        for l, (w, a) in cfg.layers.items():
            assert w == a  # weight bit = activation bit
            c[l][w] += 1
    return c


def test_hasb_probabilities_alg1():
    s = HASBSampler(LAYERS, BITS, TRACES)
    p = s.probabilities()
    assert sorted(s.sensitive()) == ["a", "e"]
    for l in ("a", "e"):
        assert p[l] == pytest.approx({8: 0.4, 6: 0.3, 4: 0.2, 2: 0.1})
    for l in ("b", "c", "d"):
        assert p[l] == pytest.approx({b: 0.25 for b in BITS})


@pytest.mark.parametrize("sigma_e", [1.0, 0.3])
def test_hasb_empirical_frequencies(sigma_e):
    # σ_e = σ·(e+1)/E: σ = sigma_e, E = 1, e = 0
    s = HASBSampler(LAYERS, BITS, TRACES, sigma=sigma_e, epochs=1)
    base = 4
    c = counts(s, base, 0, N)
    for l in LAYERS:
        p = np.array([s.probabilities()[l][b] for b in BITS])
        expect = sigma_e * p + (1 - sigma_e) * np.array([b == base for b in BITS], float)
        obs = np.array([c[l][b] for b in BITS])
        assert chisquare(obs, N * expect).pvalue > 1e-3, (l, obs, N * expect)
    # the test has power: the sensitive layer is clearly not uniform-switching
    wrong = sigma_e * np.full(4, 0.25) + (1 - sigma_e) * np.array([b == base for b in BITS], float)
    assert chisquare(np.array([c["a"][b] for b in BITS]), N * wrong).pvalue < 1e-6


def test_uniform_and_tempered_frequencies():
    u = UniformSampler(LAYERS, BITS, sigma=1.0, epochs=1)
    c = counts(u, 8, 0, N, seed=1)
    for l in LAYERS:
        assert chisquare([c[l][b] for b in BITS], [N / 4] * 4).pvalue > 1e-3
    omega = {l: {"8": 1e-5 * i, "6": 1e-4 * i, "4": 1e-3 * i, "2": 2e-2 * i} for i, l in enumerate(LAYERS)}
    tau = 0.7
    t = TemperedSampler(LAYERS, BITS, omega, tau=tau, sigma=1.0, epochs=1)
    ref = np.mean([omega[l]["2"] for l in LAYERS])  # documented normalisation: mean lowest-bit Ω
    c = counts(t, 8, 0, N, seed=2)
    for l in LAYERS:
        w = np.exp(-np.array([omega[l][str(b)] for b in BITS]) / ref / tau)
        p = w / w.sum()
        assert [t.probabilities()[l][b] for b in BITS] == pytest.approx(p.tolist(), rel=1e-9)
        assert chisquare([c[l][b] for b in BITS], N * p).pvalue > 1e-3
    # the most perturbed layer really avoids 2 bits
    assert t.probabilities()["e"][2] < 0.1


def test_sigma_schedule_and_warmup():
    assert default_warmup(90) == 10 and default_warmup(9) == 1 and default_warmup(4) == 0
    assert sigma_schedule(9, 90, 0.5, 10) == 0.0
    assert sigma_schedule(10, 90, 0.5, 10) == pytest.approx(0.5 * 11 / 90)
    assert sigma_schedule(89, 90, 0.5, 10) == pytest.approx(0.5)
    s = HASBSampler(LAYERS, BITS, TRACES, sigma=0.5, epochs=4, warmup_epochs=2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # warm-up: never switches
        assert set(s.sample(6, 1, g).w_bits()) == {6}


def test_state_dict_roundtrip_and_determinism():
    s = HASBSampler(LAYERS, BITS, TRACES, sigma=0.5, epochs=3, warmup_epochs=1)
    s2 = HASBSampler(LAYERS, BITS, {l: 0.0 for l in LAYERS}, sigma=0.1, epochs=9)
    s2.load_state_dict(s.state_dict())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for e in range(3):
        assert s.sample(2, e, g1) == s2.sample(2, e, g2)


def test_sensitivity_validation():
    sens = {
        "model": "resnet20",
        "layers": [{"layer": l, "trace_per_param": TRACES[l], "searchable": True} for l in LAYERS],
    }
    assert traces_for_model(sens, "resnet20", LAYERS) == TRACES
    with pytest.raises(SensitivityError, match="for model 'resnet20'"):
        traces_for_model(sens, "small_cnn", LAYERS)
    with pytest.raises(SensitivityError, match="missing"):
        traces_for_model(sens, "resnet20", LAYERS + ["f"])
    with pytest.raises(SensitivityError, match="needs a sensitivity file"):
        build_sampler("hasb", LAYERS, BITS)
