"""search.evaluate.Evaluator: correct accuracy/loss, BN statistics restored after re-calibration, caching."""

import json

import pytest
import torch
import torch.nn.functional as F

import hasb
from hasb.models import build_model
from search.evaluate import CACHE_VERSION, Evaluator


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    m = hasb.quantize_model(build_model("small_cnn"))
    x = torch.randn(96, 1, 28, 28)
    y = torch.randint(0, 10, (96,))
    hasb.init_quantizers(m, x[:32])
    calib = (torch.randn(64, 1, 28, 28) * 2 + 1, torch.zeros(64, dtype=torch.long))
    return m, (x, y), calib


def bn_state(m):
    return {k: v.clone() for k, v in m.state_dict().items() if ".bns." in k}


def test_matches_direct_computation_and_restores_bn(setup):
    m, val, calib = setup
    cfg = hasb.BitConfig({n: (4, 4) for n in hasb.searchable_layers(m)})
    before = bn_state(m)
    ev = Evaluator(m, (val, calib), bn="recal", batch_size=40, calib_batch_size=32)
    r = ev.evaluate(cfg)
    after = bn_state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)  # supernet left untouched
    # reference: recalibrate a copy by hand, then evaluate in one batch
    import copy

    ref = copy.deepcopy(m)
    hasb.set_config(ref, cfg)
    from hasb.supernet import recalibrate_bn

    recalibrate_bn(ref, cfg, [calib[0][:32], calib[0][32:]])
    ref.eval()
    with torch.no_grad():
        out = ref(val[0])
    assert r.accuracy == pytest.approx(float((out.argmax(1) == val[1]).float().mean()))
    assert r.loss == pytest.approx(float(F.cross_entropy(out, val[1])), rel=1e-5)
    # the comparison is meaningful: stored statistics give other logits (calibration data shifted on purpose)
    plain = copy.deepcopy(m)
    hasb.set_config(plain, cfg)
    plain.eval()
    with torch.no_grad():
        assert not torch.allclose(plain(val[0]), out, atol=1e-4)


def test_cache_memory_disk_and_context(setup, tmp_path):
    m, val, calib = setup
    cfg = hasb.BitConfig({n: (2, 2) for n in hasb.searchable_layers(m)})
    calls = []
    data = lambda: calls.append(1) or (val, calib)
    path = tmp_path / "evals.json"
    ev = Evaluator(m, data, cache_path=path, context={"checkpoint": "abc"})
    r = ev.evaluate(cfg)
    assert not r.cached and ev.evaluate(cfg).cached and len(calls) == 1
    assert json.loads(path.read_text())["version"] == CACHE_VERSION
    ev2 = Evaluator(m, data, cache_path=path, context={"checkpoint": "abc"})
    r2 = ev2.evaluate(cfg)
    assert r2.cached and r2.accuracy == r.accuracy and len(calls) == 1  # no data loaded when cached
    ev3 = Evaluator(m, data, cache_path=path, context={"checkpoint": "other"})
    assert not ev3.evaluate(cfg).cached and len(calls) == 2  # another checkpoint: recomputed
    path.write_text("{broken")
    assert not Evaluator(m, (val, calib), cache_path=path).evaluate(cfg).cached
