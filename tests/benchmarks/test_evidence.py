"""benchmarks/evidence.py: the smoke run prints a table with confidence intervals and resumes without redoing cells;
its statistics, planning, random configs within a budget and --time-limit."""

import json
import math
import re

import numpy as np
import pytest
import scipy.stats

import hasb
from benchmarks import evidence as E
from hasb.errors import HasbError
from hasb.models import build_model
from search import ilp
from tests.conftest import have_fmnist

CI = r"[+-]?\d+\.\d+ ± \d+\.\d+"


def _paired_ci(out, cell, ref, col, seeds):
    """Independent check of a printed paired difference: the t interval from the cell files."""
    d = [
        json.loads((out / "cells" / f"{cell}-s{s}.json").read_text())["values"][col]
        - json.loads((out / "cells" / f"{ref}-s{s}.json").read_text())["values"][col]
        for s in seeds
    ]
    n = len(d)
    return float(np.mean(d)), scipy.stats.t.ppf(0.975, n - 1) * float(np.std(d, ddof=1)) / math.sqrt(n)


@pytest.mark.skipif(not have_fmnist(), reason="needs Fashion-MNIST (see README setup)")
def test_smoke_two_arms_table_has_cis_and_resume_skips_finished_cells(tmp_path, capsys):
    out = tmp_path / "ev"
    argv = ["--smoke", "--arms", "b,f", "--seeds", "0,1", "--device", "cpu", "--jobs", "1", "--out", str(out)]
    assert E.main(argv) == 0
    first = capsys.readouterr().out
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    want = {f"{c}-s{s}.json" for c in ("multi", "msb", "sens", "super_hasb", "proxy") for s in (0, 1)}
    assert set(cells) == want
    assert "10/10 cells finished (10 in this call" in first and "complete" in first
    # every arm row and every paired difference carries a 95% interval
    rows = [l for l in first.splitlines() if l.startswith("| ") and not l.startswith("| |")]
    assert rows and all(re.search(CI, l) for l in rows), rows
    diff = next(l for l in rows if l.startswith("| MSB slicing − Double Rounding (paired)"))
    m, h = _paired_ci(out, "msb", "multi", "w2a2", (0, 1))  # the smoke's bits are {4, 2}
    assert f"{m:+.2f} ± {h:.2f}" in diff.split("|")[-2]
    assert re.search(r"\| Spearman ρ \| -?\d\.\d+ ± \d+\.\d+", first)
    # a rerun skips every finished cell (the files are not rewritten) and prints the same table
    assert E.main(argv) == 0
    second = capsys.readouterr().out
    assert "10/10 cells finished (0 in this call" in second
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == cells
    assert [l for l in second.splitlines() if l.startswith("|")] == [l for l in first.splitlines() if l.startswith("|")]
    # one cell lost: only it runs again
    (out / "cells" / "proxy-s1.json").unlink()
    assert E.main(argv) == 0
    assert "10/10 cells finished (1 in this call" in capsys.readouterr().out


@pytest.mark.skipif(not have_fmnist(), reason="needs Fashion-MNIST (see README setup)")
def test_smoke_arm_g_compiled_pipeline_against_eager(tmp_path, capsys, monkeypatch):
    """Arm g trains the same seed eager and with ``compile=True`` (here through dynamo's eager backend: the
    compiled graphs' ops without code generation, seconds on the CPU), the compiled supernet from the compiled
    multi-precision model, and prints both blocks with paired differences and their intervals."""
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counter))
    out = tmp_path / "ev"
    argv = ["--smoke", "--arms", "g", "--seeds", "0,1", "--device", "cpu", "--jobs", "1", "--out", str(out)]
    assert E.main(argv) == 0
    text = capsys.readouterr().out
    assert counter.frame_count > 0
    for cell in ("multi", "super_uniform"):
        for s in (0, 1):
            eager, comp = (
                json.loads((out / "runs" / f"{c}-s{s}" / "train_config.json").read_text())
                for c in (cell, cell + E.COMPILED)
            )
            assert (eager["compile"], comp["compile"]) == (False, True)
            assert (eager["seed"], {k: v for k, v in comp.items() if k not in ("compile", "out", "init")}) == (
                s,
                {k: v for k, v in eager.items() if k not in ("compile", "out", "init")},
            )
            if cell == "super_uniform":
                assert comp["init"].endswith(f"multi{E.COMPILED}-s{s}/model.pt")
    for col, cell in (("w2a2", "multi"), ("mixed", "super_uniform")):
        m, h = _paired_ci(out, cell + E.COMPILED, cell, col, (0, 1))
        block = text[text.index("g. `--compile` vs eager, " + ("multi" if cell == "multi" else "uniform")) :]
        diff = next(l for l in block.splitlines() if l.startswith("| compiled − eager (paired)"))
        assert f"{m:+.2f} ± {h:.2f}" in diff


def test_time_limit_starts_nothing_that_cannot_finish_and_reports_incomplete(tmp_path, capsys, monkeypatch):
    # a prior estimate of an hour per training cell against a 60-second limit: nothing may start
    monkeypatch.setitem(
        E.WORKLOADS, "resnet20-narrow", E.Workload("resnet20-narrow", "resnet20_narrow", est={"multi": 3600})
    )
    out = tmp_path / "ev"
    rc = E.main(
        [
            "--workload",
            "resnet20-narrow",
            "--arms",
            "c",
            "--seeds",
            "0",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--time-limit",
            "60",
        ]
    )
    text = capsys.readouterr()
    assert rc == 3 and "0/2 cells finished" in text.out and "incomplete" in text.out
    assert not (out / "cells").exists() or not list((out / "cells").glob("*.json"))
    assert "would pass --time-limit" in text.err


def test_other_settings_in_the_same_out_are_refused(tmp_path):
    E._claim_out(tmp_path, {"epochs": 2, "bits": (8, 4)})
    E._claim_out(tmp_path, {"epochs": 2, "bits": (8, 4)})  # the same settings (tuples stored as lists): fine
    with pytest.raises(HasbError, match="other settings"):
        E._claim_out(tmp_path, {"epochs": 3, "bits": (8, 4)})


def test_mean_ci_is_the_t_interval():
    m, h, n = E.mean_ci([1.0, 2.0, 3.0])
    # sd = 1, t(0.975, 2 df) = 4.302653
    assert (m, n) == (2.0, 3) and h == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(E.mean_ci([5.0])[1]) and E.fmt_ci([5.0]) == "5.00 (n=1)"
    assert E.fmt_ci([1.0, 1.2, 0.9], signed=True).endswith("*")  # interval excludes 0
    assert not E.fmt_ci([1.0, -1.2, 0.1], signed=True).endswith("*")


def test_plan_adds_dependencies_first():
    wl = E.WORKLOADS["mbv2-fmnist"]
    assert E.plan(["f"], wl) == ["multi", "sens", "super_hasb", "proxy"]
    assert E.plan(["g"], wl) == ["multi", "super_uniform", "multi_compiled", "super_uniform_compiled"]
    assert E.needs("super_uniform_compiled") == ["multi_compiled"] and E.kind("multi_compiled") == "multi"
    assert E.plan(["a", "d"], wl) == [
        "multi",
        *[f"lsq{b}" for b in wl.bits],
        "sens",
        "super_hasb",
        "super_uniform",
        "super_tempered",
    ]


def test_random_configs_within_budget_are_distinct_and_fit():
    model = hasb.quantize_model(build_model("small_cnn"))
    cost = hasb.CostModel.from_model(model)
    space = ilp.build_space(cost, objective=np.zeros((len(cost.names), 4)), groups=ilp.tied_groups(model))
    limit = ilp.constraint_from_budget(cost.parse_budget("3.5")).limit
    ucs = E.random_within(space, limit, 20, np.random.default_rng(0))
    assert len(ucs) == 20 and len({tuple(u) for u in ucs}) == 20
    assert all(space.evaluate(u)["bitops"] <= limit for u in ucs)
    # near the budget, not all at the bottom: the repair lowers one unit at a time
    assert max(space.evaluate(u)["avg_bit_equivalent"] for u in ucs) > 3.0


def test_random_unit_choices_keep_tied_layers_together_and_spread_the_bits():
    model = hasb.quantize_model(build_model("resnet20_narrow"))
    cost = hasb.CostModel.from_model(model)
    groups = ilp.tied_groups(model)
    space = ilp.build_space(cost, objective=np.zeros((len(cost.names), 4)), groups=groups)
    assert space.n_units < len(space.layers)  # shortcuts tied: a layer-wise random config would leave the space
    ucs = E.random_unit_choices(space, 40, np.random.default_rng(0))
    for uc in ucs:
        assert np.array_equal(space.unit_choice_of(space.config(uc)), uc)
    avg = [space.evaluate(uc)["avg_bit_equivalent"] for uc in ucs]
    assert max(avg) - min(avg) > 2.0  # per-config preferences spread the average bit (BitOPs-weighted)


def test_a_failed_cell_blocks_its_dependents_and_fails_the_run(tmp_path, capsys, monkeypatch):
    def boom(ctx, cell, seed):
        raise RuntimeError(f"{cell} broke")

    monkeypatch.setitem(E.CELL_FUNCS, "multi", boom)  # the kind of multi, msb and alrs_off
    out = tmp_path / "ev"
    rc = E.main(["--smoke", "--arms", "f", "--seeds", "0", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr()
    assert rc == 1 and "FAILED multi seed 0" in text.err and "multi broke" in text.err
    # sens, super_hasb and proxy need multi: never started
    assert "start sens" not in text.err and "0/4 cells finished" in text.out


def test_lm_workload_smoke_scores_bits_per_byte_lower_is_better(tmp_path, capsys):
    """The language-model workload (weight-only, bits per byte) runs arms a and e end to end on the CPU: per-bit
    columns are the weight-only passes, the unit says lower is better, and every score is a bits-per-byte value
    (not an accuracy in points)."""
    out = tmp_path / "ev"
    argv = ["--workload", "lm", "--smoke", "--arms", "a,e", "--seeds", "0", "--device", "cpu", "--jobs", "1"]
    assert E.main([*argv, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Unit: bits per byte (lower is better)" in table and "| w4afp | w2afp |" in table
    lsq = json.loads((out / "cells" / "lsq4-s0.json").read_text())["values"]
    assert set(lsq) == {"w4afp"} and 1.0 < lsq["w4afp"] < 8.5  # bits per byte of a barely trained byte LM
    search = json.loads((out / "cells" / "search-s0.json").read_text())["values"]
    assert all(1.0 < search[f"{k}@2.5"] < 8.5 for k in ("ilp", "random", "uniform", "optuna"))
    # Optuna's proposals over the budget are repaired before evaluation: every evaluated trial is within it
    assert search["optuna_within@2.5"] == 100.0 and 0.0 <= search["optuna_proposed_within@2.5"] <= 100.0
    assert "| best Optuna (repair) |" in table
