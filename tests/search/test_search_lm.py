"""The search on a byte-level language model: bits per byte (lower is better) with its standard error everywhere,
budgets in effective bits and BitOPs, weight-only supernets, deploy.pt reproducing the recorded score."""

import json
import re

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from hasb.config import BitConfig
from hasb.cost import CostModel
from hasb.data import evaluate_metric, open_source
from hasb.export import DeployedLinear, load_deployment, load_quantized
from hasb.modules import QUANT_TYPES
from hasb.quantize import get_spec, quantized_layers, uniform_config
from search.evaluate import Evaluator, metric_for, score
from search.front import pareto_mask
from search.pareto import main
from tests.support.fakes import make_fake_lm_run, write_text_corpus

CONTEXT = 32
VAL, TEST = 48, 32
FAST = ["--sweep", "3", "--k-best", "1", "--val-limit", str(VAL), "--test-limit", str(TEST), "--quiet"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A weight-only (activations fp) lm_tiny supernet on a small text corpus, with a contract sensitivity."""
    d = tmp_path_factory.mktemp("lm")
    corpus = write_text_corpus(d / "corpus")
    ck, _ = make_fake_lm_run(d / "run", corpus, bits=(8, 4, 2), context=CONTEXT, float_steps=10)
    return ck, corpus


def _val_windows(corpus):
    """The validation windows the search scores on: the text source at the model's context, first VAL windows."""
    val = open_source(f"text:{corpus}", context=CONTEXT).splits(0).val
    return val[0][:VAL], val[1][:VAL]


def _bitops_budget(ck) -> str:
    """A BitOPs budget a third of the way between the smallest and the largest config."""
    cost = CostModel.from_model(load_quantized(ck)[0])
    lo, hi = cost.feasible_range("bitops")
    return f"{(lo + (hi - lo) / 3) / 1e9:.6g}GBOPs"


@pytest.mark.parametrize("budget", ["3.5ebits", "bitops"])
def test_lm_search_cli_scores_bits_per_byte_and_deploys_exactly(lm_run, tmp_path, budget, capsys):
    ck, corpus = lm_run
    text = _bitops_budget(ck) if budget == "bitops" else budget
    out = tmp_path / "s"
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep the SVG's text searchable
        rc = main(["--budget", text, "--checkpoint", str(ck), "--out", str(out), "--trials", "3", *FAST])
    assert rc == 0
    folder = next(out.glob("budget-*"))
    doc = json.loads((folder / "config.json").read_text())
    assert doc["metric"] == {"name": "bits_per_byte", "higher_is_better": False, "label": "bits per byte"}
    val, test = doc["scores"]["validation"], doc["scores"]["test"]
    assert (val["metric"], val["split"], val["n"], val["window_bytes"]) == ("bits_per_byte", "validation", VAL, 32)
    assert (test["metric"], test["split"], test["n"], test["window_bytes"]) == ("bits_per_byte", "test", TEST, 32)
    assert 0 < val["se"] < 1 and 0 < test["se"] < 1 and "accuracy" not in val
    assert doc["scores"]["bn"]["mode"] == "none" and "no BatchNorm" in doc["scores"]["bn"]["note"]

    # the pick meets the budget, by the cost model's own numbers
    model, _ = load_quantized(ck)
    cost = CostModel.from_model(model)
    chosen = BitConfig.from_dict(doc["config"])
    b = cost.parse_budget(text)
    assert cost.within(chosen, b)
    if b.kind == "eff_bits":
        assert cost.effective_bits(chosen) <= 3.5 and doc["metrics"]["effective_bits"] == cost.effective_bits(chosen)
    else:
        assert cost.bitops(chosen) <= b.limit

    # the pick is the lowest bits per byte among the configs in budget; the front is taken downwards
    table = pd.read_csv(folder / "table.csv")
    assert {"bits_per_byte", "bits_per_byte_se", "effective_bits"} <= set(table.columns)
    assert "accuracy" not in table.columns
    assert table[table.chosen].bits_per_byte.iloc[0] == table[table.fits].bits_per_byte.min()
    pareto = pd.read_csv(out / "pareto.csv")
    assert pareto.on_front.tolist() == pareto_mask(pareto.bitops, -pareto.bits_per_byte).tolist()

    # deploy.pt reproduces the recorded validation score exactly, on the same windows
    deployed = load_deployment(folder / "deploy.pt")
    assert not {type(m) for m in deployed.modules()} & set(QUANT_TYPES)
    r = score(deployed, _val_windows(corpus), "lm")
    assert (r.n, r.value, r.se) == (VAL, val["bits_per_byte"], val["se"])

    # axis and printed text name the metric, its split and size
    svg = (folder / "pareto.svg").read_text()
    assert f"bits per byte (validation, {VAL} windows × 32 bytes)" in svg
    printed = capsys.readouterr().out
    assert "bits/byte (validation, n=48 windows × 32 B)" in printed


def test_weight_only_search_never_quantizes_activations(lm_run, tmp_path, monkeypatch):
    ck, _ = lm_run
    seen = set()
    for cls in QUANT_TYPES:  # every forward of a quantized layer during the search records its activation bits
        orig = cls.forward

        def spy(self, x, orig=orig):
            seen.add(self.a_bit)
            return orig(self, x)

        monkeypatch.setattr(cls, "forward", spy)
    out = tmp_path / "s"
    assert main(["--budget", "3ebits", "--checkpoint", str(ck), "--out", str(out), "--trials", "2", *FAST]) == 0
    assert seen == {None}  # fixed layers are fp too: no layer ever saw quantized activations
    for s in pd.read_csv(out / "candidates.csv").config:
        assert s.split("|a")[1].split("-") == ["fp"] * len(s.split("|a")[1].split("-"))
    deployed = load_deployment(out / "budget-3ebits" / "deploy.pt")
    layers = [m for m in deployed.modules() if isinstance(m, DeployedLinear)]
    assert layers and all(m.a_bits is None for m in layers)
    # a higher budget never picks worse: lower (or equal) validation bits per byte than the tighter budget's pick
    assert main(["--budget", "6ebits", "--checkpoint", str(ck), "--out", str(out), "--no-optuna", *FAST]) == 0
    tight, loose = (json.loads((out / f"budget-{b}" / "config.json").read_text()) for b in ("3ebits", "6ebits"))
    assert loose["metrics"]["bits_per_byte"] <= tight["metrics"]["bits_per_byte"]
    assert loose["metrics"]["effective_bits"] <= 6 and tight["metrics"]["effective_bits"] <= 3


def test_lm_evaluator_scores_like_evaluate_metric_and_skips_bn(lm_run):
    ck, corpus = lm_run
    model, _ = load_quantized(ck)
    val = _val_windows(corpus)
    calib = (val[0][:8], val[1][:8])
    ev = Evaluator(model, (val, calib), task="lm", batch_size=16)
    cfg = uniform_config(model, 4)
    r = ev.evaluate(cfg)
    with ev.calibrated(cfg) as m:
        direct = evaluate_metric(m, val, "lm", batch_size=16)
    assert (r.metric, r.value, r.se, r.n) == ("bits_per_byte", direct["value"], direct["se"], VAL)
    assert ev.metric is metric_for("lm") and not ev.metric.higher_is_better
    assert ev.calibration_images() == 0 and ev.bn_info()["mode"] == "none"
    with pytest.raises(AttributeError, match="bits_per_byte"):
        _ = r.accuracy


def test_weight_only_ilp_costs_are_those_of_the_tied_configs(lm_run):
    from search import ilp
    from tests.support.fakes import fake_sensitivity

    model, _ = load_quantized(lm_run[0])
    spec, cost = get_spec(model), CostModel.from_model(model)
    space = ilp.build_space(cost, sensitivity=fake_sensitivity(model))
    assert space.choices == [spec.pair(b) for b in spec.bits] == [(8, None), (4, None), (2, None)]
    rows = ilp.sweep(space, ilp.budget_grid(space, 6))
    ucs = [np.asarray(u) for u in rows.unit_choice] + [uc for _, uc in ilp.uniform_choices(space)]
    for uc in ucs:
        cfg = space.config(uc)
        assert spec.tie(cfg) == cfg  # what the model will run
        assert space.evaluate(uc)["bitops"] == pytest.approx(cost.bitops(spec.tie(cfg)), rel=1e-12)
    uni = {space.config(uc).digest() for _, uc in ilp.uniform_choices(space)}
    assert uni == {uniform_config(model, b).digest() for b in spec.bits}
    with pytest.raises(ilp.SearchError, match="weight-only"):
        ilp.build_space(cost, sensitivity=fake_sensitivity(model), tied_wa=False)


def test_weight_only_fixed_activation_bit_in_bitops_and_avg_bits(tmp_path):
    """Activations at a fixed 8 bits: BitOPs = MACs · w · 8 and the average-bit equivalent inverts it."""
    import hasb
    from hasb.models import build_model

    torch.manual_seed(0)
    m = hasb.quantize_model(build_model("lm_tiny", context=16), bits=(8, 4, 2), weight_only=True, act_bits=8)
    cost = CostModel.from_model(m)
    cfg = uniform_config(m, 4)
    assert set(cfg.a_bits()) == {8}
    searchable = sum(l.macs for l in cost.searchable)
    assert cost.bitops(cfg) == pytest.approx(cost.fixed_bitops() + searchable * 4 * 8, rel=1e-12)
    assert cost.avg_bit_equivalent(cfg) == pytest.approx(4.0, rel=1e-12)
    assert cost.uniform_bitops(3.0) == pytest.approx(cost.fixed_bitops() + searchable * 3 * 8, rel=1e-12)
    assert all(layer.a_bit == 8 for n, layer in quantized_layers(m).items() if n not in get_spec(m).fixed)


@pytest.mark.parametrize(
    ("budget", "message"),
    [("1ebits", "feasible effective bits range is 2–8"), ("3.5bpw", "accepted: .*3.5ebits")],
)
def test_bad_effective_bits_budget_one_line_exit_2_nothing_written(lm_run, tmp_path, capsys, budget, message):
    out = tmp_path / "s"
    assert main(["--budget", budget, "--checkpoint", str(lm_run[0]), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err)
    assert not out.exists()


def test_data_setup_task_and_context(lm_run):
    from hasb.data import spec_task
    from search.inputs import data_setup, recorded_data_opts

    model, _ = load_quantized(lm_run[0])
    corpus = lm_run[1]
    assert [spec_task(s) for s in ("python-stdlib", f"text:{corpus}", "mnist", "npz:x.npz", "pkg.mod:fn")] == [
        "lm",
        "lm",
        "classification",
        "classification",
        None,
    ]
    assert data_setup(f"text:{corpus}", None, {}, model)[:2] == ("lm", {"context": CONTEXT})  # the model's context
    assert data_setup(f"text:{corpus}", None, {"context": 16}, model)[:2] == ("lm", {"context": 16})
    assert data_setup("fashion-mnist", None, {}, model)[:2] == ("classification", {})
    assert recorded_data_opts({"data_opt": "context=16,limit=none"}) == {"context": 16, "limit": None}
    assert recorded_data_opts({"data_opts": {"context": 8}}) == {"context": 8} and recorded_data_opts({}) == {}
