"""Distributed HVPs (gloo, 2 CPU processes) equal the single-process result."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from tests.support.analysis_fixtures import distributed_reference, distributed_worker


def test_distributed_equals_single_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    d = torch.load(out, weights_only=True)
    s = distributed_reference()
    assert d["n_total"] == s["n_total"] == 80
    for a, b in zip(d["hv"] + d["block"], s["hv"] + s["block"], strict=False):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)  # only the summation order differs
    assert torch.allclose(d["trace"], s["trace"], rtol=1e-8)
    assert torch.allclose(d["stderr"], s["stderr"], rtol=1e-6)
