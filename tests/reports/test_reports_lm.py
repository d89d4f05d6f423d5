"""The report of a language-model search speaks bits per byte: axis label, front table, chosen scores, cost model."""

import json

import pytest

from hasb.config import BitConfig
from hasb.plots import plot_pareto
from reports.artifacts import Run, chosen_scores, pareto_view
from search.pareto import main
from tests.support.fakes import make_fake_lm_run, write_text_corpus


@pytest.fixture(scope="module")
def lm_search(tmp_path_factory):
    d = tmp_path_factory.mktemp("lmrep")
    ck, _ = make_fake_lm_run(d / "run", write_text_corpus(d / "corpus"), bits=(8, 4, 2), context=32)
    argv = ["--budget", "3ebits", "--checkpoint", str(ck), "--out", str(d / "s"), "--no-optuna"]
    assert main([*argv, "--sweep", "2", "--k-best", "1", "--val-limit", "24", "--test-limit", "16", "--quiet"]) == 0
    return d / "s"


def test_report_pareto_section_in_bits_per_byte(lm_search):
    run = Run.open(lm_search)
    view = pareto_view(run)
    assert view["metric"].name == "bits_per_byte" and not view["notes"]
    fig = plot_pareto(**view["plot"])
    assert fig.axes[0].get_ylabel() == "bits per byte (validation, 24 windows × 32 bytes), ± 1 SE; lower is better"
    assert {"bits_per_byte", "bits_per_byte_se", "effective_bits"} <= set(view["front_table"].columns)
    assert "accuracy" not in view["front_table"].columns
    sc = chosen_scores(view["chosen"])
    assert list(sc.columns) == ["score", "split", "n", "bits_per_byte", "se"]
    held = sc[sc.split.isin(["validation", "test"])].set_index("split")
    assert held.loc["validation", "n"] == 24 and held.loc["test", "n"] == 16 and held.se.notna().all()
    assert held.loc["validation", "bits_per_byte"] == view["chosen"]["scores"]["validation"]["bits_per_byte"]


def test_report_cost_model_is_the_searched_models(lm_search):
    """The report rebuilds the LM from config.json (context 32, weight-only): its BitOPs are the search's."""
    run = Run.open(lm_search)
    doc = json.loads(next(lm_search.glob("budget-*/config.json")).read_text())
    cost = run.cost_model()
    cfg = BitConfig.from_dict(doc["config"])
    assert cost.bitops(cfg) == pytest.approx(doc["metrics"]["bitops"], rel=1e-12)
    assert cost.effective_bits(cfg) == pytest.approx(doc["metrics"]["effective_bits"], rel=1e-12)
