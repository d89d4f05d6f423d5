"""search.pareto end to end on a tiny fake run (untrained quantized small_cnn + contract sensitivity), exports,
the Pareto front on known point sets, and bad input (one line, exit 2, nothing written)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import hasb
from hasb.config import BitConfig
from search import export as sx
from search.pareto import hypervolume, main, pareto_mask
from tests.support.fakes import make_fake_run

REPO = Path(__file__).resolve().parents[2]
FAST = ["--trials", "5", "--val-limit", "200", "--test-limit", "300", "--calib-size", "256", "--sweep", "8", "--quiet"]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    ck, sens = make_fake_run(d)
    return ck, sens


# ---------------------------------------------------------------------------------------------- front
def test_pareto_mask_known_sets():
    b = [1, 2, 3, 4, 2, 5, 3]
    a = [0.5, 0.6, 0.6, 0.9, 0.4, 0.9, 0.7]
    # (3,.6) is dominated by (2,.6); (2,.4) by (2,.6); (5,.9) by (4,.9)
    assert pareto_mask(b, a).tolist() == [True, True, False, True, False, False, True]
    assert pareto_mask([1, 1], [0.5, 0.5]).tolist() == [True, True]  # duplicates both stay
    assert pareto_mask([], []).tolist() == []


def test_hypervolume_known_and_monte_carlo():
    # two points (1, .5) and (2, .8) with reference (3, 0): 1·.5 + 1·.8 = 1.3
    assert hypervolume([2, 1], [0.8, 0.5], 3, 0) == pytest.approx(1.3)
    assert hypervolume([4], [0.9], 3, 0) == 0.0  # beyond the reference cost
    assert hypervolume([1, 2], [0.9, 0.5], 3, 0) == pytest.approx(1.8)  # dominated point adds nothing
    rng = np.random.default_rng(0)
    c, a = rng.uniform(0, 1, 20), rng.uniform(0, 1, 20)
    u = rng.uniform(0, 1, (200_000, 2))  # area by sampling the unit box
    dom = ((c[None, :] <= u[:, :1]) & (a[None, :] >= u[:, 1:])).any(1)
    # binomial standard error of the fraction ≤ 0.5/sqrt(2e5) ≈ 0.0011: 5 SE
    assert hypervolume(c, a, 1.0, 0.0) == pytest.approx(dom.mean(), abs=0.0056)


def test_pareto_mask_matches_definition_on_random_sets():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(1, 40))
        b = rng.integers(0, 8, n).astype(float)  # many ties on purpose
        a = rng.integers(0, 8, n) / 8
        m = pareto_mask(b, a)
        for i in range(n):
            dominated = any(b[j] <= b[i] and a[j] >= a[i] and (b[j] < b[i] or a[j] > a[i]) for j in range(n))
            assert m[i] == (not dominated)


# ---------------------------------------------------------------------------------------------- end to end
def test_cli_end_to_end_and_warm_rerun(fake_run, tmp_path, capsys):
    ck, sens = fake_run
    out = tmp_path / "out"
    args = ["--budget", "5", "--size", "20kB", "--checkpoint", str(ck), "--out", str(out), "--json"] + FAST
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    folder = out / "budget-5_size-20kB"  # per-budget outputs in their own folder, shared ones at the top
    for f in ("pareto.csv", "candidates.csv"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    for f in ("pareto.png", "pareto.svg", "config.json", "deploy.pt", "table.csv"):
        assert (folder / f).is_file() and (folder / f).stat().st_size > 0, f
        assert not (out / f).exists()
    assert summary["paths"]["config"] == str(folder / "config.json")

    model, _ = hasb.export.load_quantized(ck)
    cost = hasb.CostModel.from_model(model)
    cfg, doc = sx.load(folder / "config.json")
    assert BitConfig.load(folder / "config.json") == cfg
    # the chosen config respects every budget, recomputed from the cost model
    assert cost.avg_bit_equivalent(cfg) <= 5 + 1e-9 and cost.size_bytes(cfg) <= 20e3
    assert doc["metrics"]["bitops"] == pytest.approx(cost.bitops(cfg))
    assert summary["chosen"]["bitops"] == pytest.approx(cost.bitops(cfg))
    assert doc["provenance"]["checkpoint_sha256"] and doc["provenance"]["sensitivity_fingerprint"]

    pareto = pd.read_csv(out / "pareto.csv")
    for c in (
        "config_id",
        "bitops",
        "gbitops",
        "avg_bit_equivalent",
        "size_bytes",
        "accuracy",
        "loss",
        "source",
        "on_front",
        "config",
    ):
        assert c in pareto.columns
    assert set(pareto.source) <= {"ilp", "optuna", "uniform"} and {"ilp", "uniform"} <= set(pareto.source)
    assert pareto.on_front.tolist() == pareto_mask(pareto.bitops, pareto.accuracy).tolist()
    assert pareto.config_id.is_unique
    table = pd.read_csv(folder / "table.csv")
    assert set(table.digest) == set(pareto.digest) and table.chosen.sum() == 1
    assert summary["chosen"]["accuracy"] == pytest.approx(table[table.fits].accuracy.max())
    assert table[table.chosen].fits.all()
    # every accuracy carries its binomial standard error on the validation split
    n_val = doc["scores"]["validation"]["n"]
    assert n_val == 200
    assert np.allclose(pareto.accuracy_se, np.sqrt(pareto.accuracy * (1 - pareto.accuracy) / n_val))
    assert sorted(pareto[pareto.source == "uniform"].label) == ["w2a2", "w4a4", "w6a6", "w8a8"]
    cand = pd.read_csv(out / "candidates.csv")
    assert len(cand) >= len(pareto) and set(cand.digest) == set(pareto.digest)
    # Optuna's proposals over a budget are repaired before evaluation (the default --optuna-infeasible repair)
    opt = cand[cand.source == "optuna"]
    assert len(opt) and (opt.avg_bit_equivalent <= 5 + 1e-9).all() and (opt.size_bytes <= 20e3).all()

    # the integer checkpoint holds the chosen bits
    dep = torch.load(folder / "deploy.pt", weights_only=True)
    for name, (w, _a) in cfg.layers.items():
        assert dep["layers"][name]["w_bits"] == w
        assert dep["layers"][name]["w_int"].abs().max() <= 2 ** (w - 1)

    # warm re-run: everything from caches
    assert main(args) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["n_evaluated_now"] == 0
    assert again["chosen"] == summary["chosen"]


def test_budget_above_largest_config_does_not_bind(fake_run, tmp_path, capsys):
    ck, _ = fake_run
    out = tmp_path / "o"
    assert (
        main(["--budget", "100GBOPs", "--checkpoint", str(ck), "--out", str(out), "--no-optuna", "--json"] + FAST) == 0
    )
    s = json.loads(capsys.readouterr().out)
    assert s["budget_binds"] is False and "does not bind" in s["note"]
    pareto = pd.read_csv(out / "pareto.csv")
    assert s["chosen"]["accuracy"] == pytest.approx(pareto.accuracy.max())


# ---------------------------------------------------------------------------------------------- exports
def test_export_validates_and_rejects_tampering(fake_run, tmp_path):
    ck, _ = fake_run
    model, _ = hasb.export.load_quantized(ck)
    spec = model.hasb_spec
    cfg = BitConfig({n: (4, 4) for n in hasb.searchable_layers(model)})
    cost = hasb.CostModel.from_model(model)
    s = cost.summary(cfg)
    doc = sx.make_document(
        model_name="small_cnn",
        build=model.hasb_build,
        bits=spec.bits,
        config=cfg,
        fixed={n: "fp" for n in spec.fixed},
        metrics={**s, "accuracy": 0.5, "loss": 1.0},
        budgets=[cost.parse_budget("4")],
        budget_binds=True,
        source="ilp",
        provenance={
            "sensitivity_fingerprint": "x",
            "checkpoint_sha256": "y",
            "hasb_version": hasb.__version__,
            "command": "test",
        },
    )
    p = sx.write(doc, tmp_path / "c.json")
    cfg2, doc2 = sx.load(p)
    assert cfg2 == cfg and doc2["hawq_bit_config"] is None and doc2["schema_version"] == sx.SCHEMA_VERSION
    bad_cases = [
        ("schema_version", 99),
        ("schema", "other"),
        ("source", "magic"),
        ("budget", []),
        ("metrics", {**doc["metrics"], "accuracy": 1.5}),
        ("hawq_bit_config", {"quant_x": "4"}),
        ("hawq_bit_config", [4]),
        ("config", {"layers": {**doc["config"]["layers"], "conv2": {"w_bits": 3, "a_bits": 3}}}),
    ]
    for key, val in bad_cases:
        with pytest.raises(sx.ExportError):
            sx.validate({**doc, key: val})
    d = dict(doc)
    d.pop("provenance")
    with pytest.raises(sx.ExportError, match="provenance"):
        sx.validate(d)


# ---------------------------------------------------------------------------------------------- bad input
def _bad_sensitivity(sens_path, tmp_path, mutate, name):
    d = json.loads(Path(sens_path).read_text())
    mutate(d)
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps(d))
    return str(p)


@pytest.mark.parametrize(
    "case",
    [
        "below",
        "negative",
        "nan",
        "text",
        "unknown_model",
        "other_model",
        "sens_model",
        "sens_layers",
        "no_budget",
        "size_too_small",
        "missing_ckpt",
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(case, fake_run, tmp_path, capsys):
    ck, sens = fake_run
    out = tmp_path / "never"
    base = ["--checkpoint", str(ck), "--out", str(out)] + FAST
    args = {
        "below": ["--budget", "1.5"] + base,
        "negative": ["--budget", "-3"] + base,
        "nan": ["--budget", "nan"] + base,
        "text": ["--budget", "lots"] + base,
        "unknown_model": ["--budget", "4", "--model", "nosuchnet"] + base,
        "other_model": ["--budget", "4", "--model", "resnet20"] + base,
        "sens_model": [
            "--budget",
            "4",
            "--sensitivity",
            _bad_sensitivity(sens, tmp_path, lambda d: d.update(model="resnet20"), "a"),
        ]
        + base,
        "sens_layers": [
            "--budget",
            "4",
            "--sensitivity",
            _bad_sensitivity(sens, tmp_path, lambda d: d["omega"].pop("conv3"), "b"),
        ]
        + base,
        "no_budget": base,
        "size_too_small": ["--size", "1kB"] + base,
        "missing_ckpt": ["--budget", "4", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(out)],
    }[case]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    expect = {
        "below": "feasible",
        "negative": "positive",
        "nan": "finite",
        "text": "not a number",
        "unknown_model": "unknown model",
        "other_model": "small_cnn",
        "sens_model": "resnet20",
        "sens_layers": "conv3",
        "no_budget": "no budget",
        "size_too_small": "feasible",
        "missing_ckpt": "not found",
    }[case]
    assert expect in err
    assert not out.exists()


def test_cli_subprocess_bad_budget_exit_code(fake_run, tmp_path):
    ck, _ = fake_run
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "search.pareto",
            "--budget",
            "0.5",
            "--checkpoint",
            str(ck),
            "--out",
            str(tmp_path / "x"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "feasible average bits range is 2–8" in r.stderr
    assert not (tmp_path / "x").exists()


def test_budgets_keep_their_own_outputs_and_picks_are_monotone(fake_run, tmp_path, capsys):
    """A second budget in the same --out writes its own folder (the first stays byte-identical) and considers the
    first budget's pick, which fits the looser budget: the looser pick is at least as accurate on validation."""
    ck, _ = fake_run
    out = tmp_path / "o"
    base = ["--checkpoint", str(ck), "--out", str(out), "--no-optuna", "--json"] + FAST
    assert main(["--budget", "4"] + base) == 0
    first = json.loads(capsys.readouterr().out)
    before = {f: (out / "budget-4" / f).read_bytes() for f in ("config.json", "deploy.pt", "table.csv")}
    assert main(["--budget", "6"] + base) == 0
    second = json.loads(capsys.readouterr().out)
    assert {f: (out / "budget-4" / f).read_bytes() for f in before} == before
    assert (out / "budget-6" / "config.json").is_file() and second["folder"] == str(out / "budget-6")
    table = pd.read_csv(out / "budget-6" / "table.csv")
    earlier = table[table.pick_at == "budget-4"]
    assert len(earlier) == 1 and bool(earlier.fits.iloc[0])
    assert earlier.digest.iloc[0] == pd.read_csv(out / "budget-4" / "table.csv").query("chosen").digest.iloc[0]
    assert second["chosen"]["accuracy"] >= first["chosen"]["accuracy"]
    assert second["monotone"] and "budget-4" in second["monotone"]


def test_budget_folder_names():
    from hasb.cost import Budget
    from search.outputs import budget_dir_name

    assert budget_dir_name([Budget("avg_bits", 3.5, 1.0, "3.5")]) == "budget-3.5"
    assert budget_dir_name([Budget("bitops", 25e9, 25e9, "25GBOPs")]) == "budget-25GBOPs"
    assert (
        budget_dir_name([Budget("avg_bits", 5, 1.0, "5"), Budget("size", 0.02, 20e3, "20kB")]) == "budget-5_size-20kB"
    )
    assert budget_dir_name([Budget("plain_avg", 3, 3, "3")]) == "budget-avg-bits-3"


def test_pareto_plot_draws_standard_errors():
    from matplotlib.container import ErrorbarContainer

    from hasb.plots import plot_pareto

    df = pd.DataFrame(
        {
            "gbitops": [1.0, 2.0, 3.0],
            "accuracy": [0.5, 0.6, 0.7],
            "accuracy_se": [0.02, 0.01, 0.03],
            "source": ["ilp", "ilp", "optuna"],
            "on_front": [True, True, True],
        }
    )
    fig = plot_pareto(
        df,
        chosen={"gbitops": 2.0, "accuracy": 0.6, "accuracy_se": 0.01, "test_accuracy": 0.58, "test_se": 0.012},
        accuracy_label="accuracy [%] on validation (n=2000), ± 1 SE",
    )
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # every point, the chosen one, its test score
    seg = bars[0].lines[2][0].get_segments()
    assert [round(float(s[1][1] - s[0][1]), 6) for s in seg] == [4.0, 2.0, 6.0]  # ±1 SE in percent points
    assert ax.get_ylabel().startswith("accuracy [%] on validation")


def test_recipes_alias_forwards_to_search_recipes():
    """``python -m hasb.recipes`` (the documented command) is the search.recipes CLI; bad input: one line, exit 2."""
    import hasb.recipes
    import search.recipes

    assert hasb.recipes.main is search.recipes.main and hasb.recipes.demo_recipe is search.recipes.demo_recipe
    r = subprocess.run(
        [sys.executable, "-m", "hasb.recipes", "demo", "--bits", "4,3,2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stderr.strip() == "error: --bits and --compile do not apply to the demo recipe"
