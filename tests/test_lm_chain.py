"""The whole chain on a tiny byte-level language model (issue 13), through the library and CLIs users run: the
lm-cpu recipe shrunk (float → weight-only multi-precision → sensitivity → HASB supernet) → search.pareto with an
effective-bits budget → reports.build; bits per byte on the chart, in config.json and in the report."""

from __future__ import annotations

import json

import hasb
from search.recipes import lm_recipe, load_supernet


def test_lm_chain_train_sensitivity_supernet_search_report(tmp_path, capsys):
    from reports import build as rbuild
    from search.pareto import main as search_main

    run = tmp_path / "run"
    r = lm_recipe("lm-cpu", run, progress=False, train_limit=64, val_limit=16, epochs=1, bits=[8, 4, 2])
    sens = json.loads((run / "sensitivity.json").read_text())
    traces = [layer["trace"] for layer in sens["layers"] if layer["searchable"]]
    assert traces and all(t == t and t != 0 for t in traces)  # finite, non-zero: a measured network
    assert sens["meta"]["task"] == "lm" and sens["meta"]["estimator_choice"]["used"] != "exact"
    assert r["sampler"] == "hasb" and hasb.get_spec(load_supernet(r["supernet"])).weight_only

    argv = ["--budget", "4ebits", "--checkpoint", str(r["supernet"]), "--sensitivity", str(run / "sensitivity.json")]
    argv += ["--out", str(run), "--no-optuna", "--sweep", "2", "--k-best", "1", "--val-limit", "24"]
    assert search_main([*argv, "--test-limit", "16", "--quiet", "--threads", "1"]) == 0
    (doc_path,) = run.glob("budget-*/config.json")
    doc = json.loads(doc_path.read_text())
    assert doc["metric"]["name"] == "bits_per_byte" and doc["weight_only"]["a_bits"] == "fp"
    val = doc["scores"]["validation"]
    assert val["n"] == 24 and val["bits_per_byte"] > 0 and val["se"] > 0
    assert "bits per byte" in (doc_path.parent / "pareto.svg").read_text()

    capsys.readouterr()
    assert rbuild.main(["--run", str(run), "--quiet"]) == 0
    assert "bits per byte" in (run / "report.html").read_text()
    figures = {p.stem for p in (run / "report_figures").glob("*.png")}
    assert {"training_multi", "training_supernet", "pareto"} <= figures, figures
