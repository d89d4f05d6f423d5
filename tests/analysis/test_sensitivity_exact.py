"""`--estimator exact` in the sensitivity pipeline: the per-sample estimator's numbers, no SE, clear limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.exact import exact_layer_traces
from analysis.sensitivity import SensitivityConfig, SensitivityError, compute_sensitivity
from hasb.models import build_model


def _batches():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))]


def test_exact_estimator_matches_the_direct_call_with_zero_se():
    torch.manual_seed(0)
    model = build_model("small_cnn").eval()
    batches = _batches()
    res = compute_sensitivity(model, batches, SensitivityConfig(estimator="exact", bits=[8, 4, 2]))
    params = {f"{n}.weight": model.get_submodule(n).weight for n in res.frame.layer}
    direct = exact_layer_traces(model, batches, params)
    assert np.allclose(res.frame.trace.to_numpy(), direct.trace, rtol=1e-6)
    assert (res.frame.stderr == 0).all() and res.meta["total_hvp"] == 0
    assert res.meta["backend"] == "per-sample-vjp" and res.meta["n_samples"] == 16


def test_exact_estimator_refuses_what_needs_an_hvp_operator():
    with pytest.raises(SensitivityError, match="traces only"):
        SensitivityConfig(estimator="exact", top_k=3).validate()
