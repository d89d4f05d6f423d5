"""End-to-end: build the HTML report from the artifacts of a tiny run, check sections and figure PNGs.

Fixture provenance (which path makes each artifact) — switch each to the real command once it exists:
* training (multi/, supernet/): the REAL command ``python -m hasb.train`` (tiny: small_cnn, 64 images,
  2 epochs) when Fashion-MNIST is installed; otherwise contract-format metrics files.
* sensitivity.json/.csv: WRITTEN PER THE CONTRACT here, because ``analysis.sensitivity`` has no CLI yet
  (``_HAVE["sensitivity"]``).  Ω uses the model's real Double Rounding quantizer (‖Q_b(W)−W‖²);
  the traces are synthetic (log-normal, one negative to exercise that path).
* pareto.csv, candidates.csv, config.json: WRITTEN PER THE CONTRACT here, because ``search.pareto`` has
  no CLI yet (``_HAVE["pareto"]``).  BitOPs/avg bits come from hasb.CostModel; accuracies are synthetic.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import hasb
from hasb.models import build_model

pytest.importorskip("nbclient")
pytest.importorskip("nbconvert")
pytest.importorskip("ipykernel")

from reports import build as rbuild  # noqa: E402
from reports.artifacts import MissingArtifact, Run  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _load_tool(name: str):
    """tools/<name>.py (developer tools are not an installed package): loaded from the checkout by path."""
    spec = importlib.util.spec_from_file_location(f"_tools_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_notebook = _load_tool("make_notebook")
FIGURES, SECTIONS = make_notebook.FIGURES, make_notebook.SECTIONS
MODEL = "small_cnn"
BITS = (8, 6, 4, 2)


def _module_has_main(mod: str) -> bool:
    try:
        spec = importlib.util.find_spec(mod)
    except ModuleNotFoundError:
        return False
    return spec is not None and spec.origin is not None and "def main(" in Path(spec.origin).read_text()


_HAVE = {
    "sensitivity": _module_has_main("analysis.sensitivity"),
    "train": _module_has_main("hasb.train"),
    "pareto": _module_has_main("search.pareto"),
}


def _have_fmnist() -> bool:
    try:
        from hasb.data import find_data_dir

        find_data_dir("fashion-mnist")
        return True
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------- contract writers
def write_sensitivity(run: Path, model: str = MODEL, seed: int = 0) -> dict:
    """sensitivity.json + .csv exactly per the artifact contract (see module docstring for provenance)."""
    rng = np.random.default_rng(seed)
    net = hasb.quantize_model(build_model(model), bits=BITS)
    cost = hasb.CostModel.from_model(net)
    qlayers = hasb.quantized_layers(net)
    rows, omega = [], {}
    for i, l in enumerate(cost.layers):
        tr = float(np.exp(rng.normal(0.0, 1.5)))
        if i == len(cost.layers) - 2:  # one negative trace: indefinite block, reported explicitly
            tr = -0.3 * tr
        n = l.weight_params
        rows.append(
            {
                "layer": l.name,
                "n_params": n,
                "trace": tr,
                "trace_per_param": tr / n,
                "stderr": abs(tr) * float(rng.uniform(0.05, 0.2)),
                "n_hvp": 64,
                "searchable": l.searchable,
            }
        )
        if l.searchable:
            m = qlayers[l.name]
            with torch.no_grad():
                omega[l.name] = {str(b): tr / n * float(((m.quant_weight(b) - m.weight) ** 2).sum()) for b in BITS}
    grid = np.linspace(-2.0, 60.0, 400)
    dens = np.exp(-0.5 * (grid / 0.6) ** 2) + 1e-3 * np.exp(-0.5 * ((grid - 45.0) / 2.0) ** 2)
    dens /= np.trapezoid(dens, grid)
    sens = {
        "version": 1,
        "model": model,
        "fingerprint": "fixture-" + str(seed),
        "bits": list(BITS),
        "layers": rows,
        "omega": omega,
        "negative_traces": [r["layer"] for r in rows if r["trace"] < 0],
        "eigenvalues": [52.0, 47.5, 44.1, 30.2, 12.0],
        "density": {"grid": grid.tolist(), "density": dens.tolist()},
        "meta": {"fixture": "tests/reports/test_reports_build.py (contract-format, analysis CLI not yet available)"},
    }
    hasb.atomic_write_text(run / "sensitivity.json", json.dumps(sens))
    hasb.atomic_write_text(run / "sensitivity.csv", pd.DataFrame(rows).to_csv(index=False))
    return sens


def write_metrics(d: Path, stage: str, epochs: int = 3, seed: int = 0) -> None:
    """metrics.csv/.json + train_config.json in hasb.train's format (used when the data is not installed)."""
    rng = np.random.default_rng(seed)
    hist = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "step": 10 * e, "loss": 2.3 / e + 0.05 * rng.random()}
        for b in BITS:
            row[f"acc_w{b}a{b}"] = min(0.95, 0.5 + 0.1 * e - 0.02 * (8 - b))
        row.update(lr_weights=1e-3 / e, lr_scales_w8a8=1e-3 / e, lr_scales_w2a2=1e-6 / e)
        hist.append(row)
    hasb.atomic_write_text(d / "metrics.json", json.dumps(hist))
    hasb.atomic_write_text(d / "metrics.csv", pd.DataFrame(hist).to_csv(index=False))
    hasb.atomic_write_text(d / "train_config.json", json.dumps({"stage": stage, "model": MODEL}))


def write_pareto(run: Path, model: str = MODEL, n: int = 60, seed: int = 0, budget: str = "4.5") -> None:
    """pareto.csv, candidates.csv, config.json per the contract (BitOPs from hasb.CostModel; synthetic accuracy)."""
    rng = np.random.default_rng(seed)
    cost = hasb.CostModel.from_model(hasb.quantize_model(build_model(model), bits=BITS))
    rows = []

    def add(cfg, source):
        avg = cost.avg_bit_equivalent(cfg)
        acc = 0.90 - 0.6 * np.exp(-1.1 * avg) + (rng.normal(0, 0.004) if source != "uniform" else 0.0)
        rows.append(
            {
                "config_id": cfg.digest(),
                "bitops": cost.bitops(cfg),
                "gbitops": cost.bitops(cfg) / 1e9,
                "avg_bit_equivalent": avg,
                "size_bytes": cost.size_bytes(cfg),
                "accuracy": acc,
                "loss": 1.0 - acc,
                "source": source,
                "config": cfg.short(),
            }
        )

    for b in BITS:
        add(hasb.BitConfig.uniform(cost.names, b), "uniform")
    for i in range(n):
        # mixes over a random subset of the bits, so the points span the whole BitOPs range
        pool = rng.choice(BITS, size=int(rng.integers(1, len(BITS) + 1)), replace=False)
        add(hasb.BitConfig({nm: int(rng.choice(pool)) for nm in cost.names}), "ilp" if i % 3 == 0 else "optuna")
    df = pd.DataFrame(rows).drop_duplicates("config_id")
    # non-dominated in (BitOPs ↓, accuracy ↑)
    df = df.sort_values(["bitops", "accuracy"], ascending=[True, False])
    best, front = -1.0, []
    for acc in df["accuracy"]:
        front.append(acc > best)
        best = max(best, acc)
    df["on_front"] = front
    hasb.atomic_write_text(run / "candidates.csv", df.to_csv(index=False))
    hasb.atomic_write_text(run / "pareto.csv", df.to_csv(index=False))
    limit = cost.parse_budget(budget).limit
    pick = df[df["bitops"] <= limit].sort_values("accuracy").iloc[-1]
    cfg = next(
        hasb.BitConfig({nm: int(b) for nm, b in zip(cost.names, s.split("-"), strict=True)}) for s in [pick["config"]]
    )
    hasb.atomic_write_text(
        run / "config.json",
        json.dumps(
            {
                "version": 1,
                "model": model,
                "config": cfg.to_dict(),
                "bitops": float(pick["bitops"]),
                "gbitops": float(pick["gbitops"]),
                "avg_bit_equivalent": float(pick["avg_bit_equivalent"]),
                "accuracy": float(pick["accuracy"]),
                "budget": budget,
            }
        ),
    )


def _train(args: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "hasb.train", *args, "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]


def make_run(root: Path, real_training: bool, train_sub: str = "train") -> Path:
    """A run folder; training runs in RUN/<train_sub>/{multi,supernet} ("train": the demo's layout)."""
    run = root / "run"
    run.mkdir(parents=True)
    write_sensitivity(run)
    tdir = run / train_sub
    if real_training:
        tiny = ["--train-limit", "64", "--val-limit", "64", "--batch-size", "64", "--epochs", "2"]
        _train(["--stage", "multi", "--model", MODEL, "--out", str(tdir / "multi"), *tiny])
        _train(
            [
                "--stage",
                "supernet",
                "--init",
                str(tdir / "multi" / "model.pt"),
                "--sensitivity",
                str(run / "sensitivity.json"),
                "--out",
                str(tdir / "supernet"),
                *tiny,
            ]
        )
    else:
        for st in ("multi", "supernet"):
            write_metrics(tdir / st, st)
    write_pareto(run)
    return run


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The report of a full run, built with the default --out (the run folder), as the README shows it."""
    root = tmp_path_factory.mktemp("report")
    t0 = time.time()
    run = make_run(root, real_training=_HAVE["train"] and _have_fmnist())
    t1 = time.time()
    manifest = rbuild.build(run)
    print(f"fixture {t1 - t0:.1f}s, build {time.time() - t1:.1f}s")
    return run, run / "report.html", manifest


def _png_size_and_var(path: Path) -> tuple[tuple[int, int], float]:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    return (img.shape[1], img.shape[0]), float(img[..., :3].var())


def test_html_has_every_section(built):
    run, out, manifest = built
    html = out.read_text()
    for heading in SECTIONS.values():
        assert heading in html, heading
    assert "Section skipped" not in html and "Section failed" not in html
    assert html.count("data:image/png;base64") >= sum(len(v) for v in FIGURES.values())
    statuses = {k: v["status"] for k, v in manifest["sections"].items()}
    assert set(statuses.values()) == {"ok"}, statuses
    assert Path(manifest["python"]).resolve() == Path(sys.executable).resolve()


def test_figures_saved_with_expected_size_and_not_blank(built):
    from reports.plots import DPI, figure_size

    run, out, manifest = built
    fig_dir = out.with_name("report_figures")
    assert json.loads((fig_dir / "manifest.json").read_text())["sections"] == manifest["sections"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".report-")]  # no staging left
    n_layers = len(json.loads((run / "sensitivity.json").read_text())["layers"])
    n_search = n_layers - 2  # first/last fixed
    expected = {
        "traces": figure_size("traces", n_layers),
        "omega": figure_size("omega", n_search),
        "spectral_density": figure_size("spectral"),
        "bit_probabilities": figure_size("probabilities", n_search),
        "training_multi": figure_size("training"),
        "training_supernet": figure_size("training"),
        "pareto": figure_size("pareto"),
        "bit_allocation": figure_size("allocation", n_search),
    }
    assert sorted(expected) == sorted(f for v in FIGURES.values() for f in v)
    for name, (w, h) in expected.items():
        p = fig_dir / f"{name}.png"
        assert p.is_file(), p
        size, var = _png_size_and_var(p)
        assert size == (round(w * DPI), round(h * DPI)), (name, size)
        assert var > 1e-3, f"{name} looks blank (pixel variance {var:.2e})"


def test_partial_run_renders_what_it_can(tmp_path, capsys):
    """Only the search ran; also the deprecated --out FILE.html form (figures in FILE_figures/, a warning)."""
    run = tmp_path / "partial"
    run.mkdir()
    write_pareto(run)
    out = tmp_path / "partial.html"
    rc = rbuild.main(["--run", str(run), "--out", str(out), "--quiet"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "deprecated" in err and "partial.html" in err
    manifest = json.loads((tmp_path / "partial_figures" / "manifest.json").read_text())
    st = {k: v["status"] for k, v in manifest["sections"].items()}
    assert st["pareto"] == "ok" and st["bit_allocation"] == "ok"
    for k in ("traces", "omega", "spectral_density", "training_multi", "training_supernet"):
        assert st[k] == "missing", (k, st[k])
    html = out.read_text()
    assert "python -m analysis.sensitivity" in html and "python -m hasb.train --stage supernet" in html
    assert (tmp_path / "partial_figures" / "pareto.png").is_file()
    assert not (tmp_path / "partial_figures" / "traces.png").exists()
    assert not (tmp_path / "report.html").exists()


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _bad_input(tmp_path: Path, case: str) -> list[str]:
    """argv for one class of bad input (issue 12); everything it names lives in tmp_path."""
    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run / "multi", "multi", epochs=1)
    (run / "budget-3.5").mkdir()
    hasb.atomic_write_text(run / "budget-3.5" / "config.json", "{}")
    nb = json.loads(rbuild.NOTEBOOK.read_text())
    files = {
        "nb.txt": "this is not json",
        "v3.ipynb": json.dumps({**nb, "nbformat": 3}),
        "invalid.ipynb": json.dumps({**nb, "cells": "not a list"}),
        "badcell.ipynb": json.dumps({**nb, "cells": [{"cell_type": "code", "metadata": {}}]}),
        "noparams.ipynb": json.dumps(
            {**nb, "cells": [c for c in nb["cells"] if "parameters" not in c["metadata"].get("tags", [])]}
        ),
        "afile": "x",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    argv = {
        "run missing": ["--run", str(tmp_path / "nope")],
        "notebook missing": ["--notebook", str(tmp_path / "none.ipynb")],
        "notebook not json": ["--notebook", str(tmp_path / "nb.txt")],
        "notebook v3": ["--notebook", str(tmp_path / "v3.ipynb")],
        "notebook invalid": ["--notebook", str(tmp_path / "invalid.ipynb")],
        "notebook cell invalid": ["--notebook", str(tmp_path / "badcell.ipynb")],
        "notebook without parameters": ["--notebook", str(tmp_path / "noparams.ipynb")],
        "out is a file": ["--out", str(tmp_path / "afile")],
        "out under a file": ["--out", str(tmp_path / "afile" / "sub")],
        "out not writable": ["--out", "/proc/hasb-report-test"],  # unwritable for root too
        "unknown budget": ["--budget", "7"],
        "threads 0": ["--threads", "0"],
        "timeout 0": ["--timeout", "0"],  # nbclient would read 0 as "no limit"
    }[case]
    return (["--run", str(run)] if "--run" not in argv else []) + argv


BAD = [
    "run missing",
    "notebook missing",
    "notebook not json",
    "notebook v3",
    "notebook invalid",
    "notebook cell invalid",
    "notebook without parameters",
    "out is a file",
    "out under a file",
    "out not writable",
    "unknown budget",
    "threads 0",
    "timeout 0",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, case):
    argv = _bad_input(tmp_path, case)
    before = _snapshot(tmp_path)
    with warnings.catch_warnings(record=True) as warned:  # a warning would be a second stderr line
        warnings.simplefilter("always")
        rc = rbuild.main(argv)
    out, err = capsys.readouterr()
    assert not warned, [str(w.message) for w in warned]
    assert rc == 2, (case, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err + out
    assert _snapshot(tmp_path) == before
    assert not Path("/proc/hasb-report-test").exists()


def test_interrupted_swap_never_mixes_sets(tmp_path, monkeypatch):
    """A fault at every point of the swap leaves report.html absent or beside its own figures, never a mix."""
    real_replace = rbuild.os.replace
    outs, _ = rbuild.resolve_outputs(tmp_path / "out", tmp_path)
    for fail_at in range(7):
        for d, tag in ((outs.folder, "old"), (tmp_path / "staged", "new")):
            if d.exists():
                import shutil

                shutil.rmtree(d)
            (d / "report_figures").mkdir(parents=True)
            (d / "report_figures" / "pareto.png").write_text(tag)
            (d / "report.html").write_text(tag)
            (d / "report.ipynb").write_text(tag)
        calls = []

        def faulty(a, b, calls=calls, fail_at=fail_at):
            calls.append(a)
            if len(calls) > fail_at:
                raise OSError("injected")
            return real_replace(a, b)

        monkeypatch.setattr(rbuild.os, "replace", faulty)
        try:
            rbuild.swap_in(tmp_path / "staged", outs)
            done = True
        except OSError:
            done = False
        monkeypatch.setattr(rbuild.os, "replace", real_replace)
        if outs.html.exists():
            assert outs.html.read_text() == (outs.figures / "pareto.png").read_text(), fail_at
        assert done == (fail_at >= 6) and (not done or outs.html.read_text() == "new")
        assert [p.name for p in outs.folder.iterdir() if p.name.startswith(".report-")] == []


def test_failed_build_keeps_old_set_and_cleans_stale_staging(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_metrics(run / "multi", "multi", epochs=1)
    (run / "report_figures").mkdir()
    (run / "report.html").write_text("old")
    (run / "report_figures" / "pareto.png").write_text("old")
    dead = run / ".report-staging-999999999-abc"  # a pid no process has: a build that died
    dead.mkdir()

    def boom(*a, **k):
        raise rbuild.BuildError("notebook setup failed: injected")

    monkeypatch.setattr(rbuild, "execute", boom)
    with pytest.raises(rbuild.BuildError):
        rbuild.build(run)
    assert (run / "report.html").read_text() == "old" and (run / "report_figures" / "pareto.png").read_text() == "old"
    assert [p.name for p in run.iterdir() if p.name.startswith(".report-")] == []


def test_search_outputs_in_budget_folders(tmp_path):
    """search.pareto's per-budget folders RUN/budget-<B>/: the newest by default, --budget picks one; the
    chosen config's scores keep their split, size and standard error."""
    import os

    run = tmp_path / "run"
    for i, b in enumerate(("3.5", "5")):
        d = run / f"budget-{b}"
        d.mkdir(parents=True)
        doc = {"metrics": {"accuracy": 0.7 + i / 10}, "test": {"accuracy": 0.69 + i / 10, "se": 0.01, "n": 2000}}
        (d / "config.json").write_text(json.dumps(doc))
        os.utime(d / "config.json", (1000 + i, 1000 + i))
    assert Run.open(run).search_dir() == run / "budget-5"
    r = Run.open(run, budget="3.5")
    assert r.search_dir() == run / "budget-3.5" and r.chosen()["metrics"]["accuracy"] == 0.7
    with pytest.raises(rbuild.HasbError, match="3.5, 5"):
        Run.open(run, budget="4")
    from reports.artifacts import chosen_scores

    sc = chosen_scores(r.chosen()).set_index("split")
    assert sc.loc["test", "se"] == 0.01 and sc.loc["test", "n"] == 2000 and sc.loc["test", "accuracy"] == 0.69
    assert sc.loc[None if None in sc.index else sc.index[0], "accuracy"] == 0.7
    with pytest.raises(MissingArtifact, match="pareto.csv"):
        r.pareto()


@pytest.mark.parametrize("layout", ["", "train"])
def test_training_runs_found_in_run_and_run_train(tmp_path, layout):
    """hasb.train --out RUN/<stage> and the demo's RUN/train/<stage> are both found (issue 10, finding 8)."""
    run = tmp_path / "run"
    for st in ("multi", "supernet"):
        write_metrics(run / layout / st, st, epochs=2)
    r = Run.open(run)
    for st in ("multi", "supernet"):
        assert r.train_dir(st) == run / layout / st
        assert list(r.metrics(st)["epoch"]) == [1, 2]
    inv = r.inventory().set_index("artifact")
    assert inv.loc[str(Path(layout) / "multi" / "metrics.csv"), "present"]


def test_training_missing_names_both_places(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(MissingArtifact) as e:
        Run.open(tmp_path / "run").train_dir("multi")
    assert str(tmp_path / "run" / "multi" / "metrics.csv") in str(e.value)
    assert str(tmp_path / "run" / "train" / "multi" / "metrics.csv") in str(e.value)


def test_committed_notebook_is_the_generators_output():
    """reports/sensitivity.ipynb is exactly what tools/make_notebook.py writes (edit the tool, not the file)."""
    assert rbuild.NOTEBOOK.read_text() == make_notebook.render()


def test_inject_parameters_after_tagged_cell():
    import nbformat

    nb = nbformat.read(str(rbuild.NOTEBOOK), as_version=4)
    nbformat.validate(nb)
    nb2 = rbuild.inject_parameters(nb, {"run_dir": "x'; import os", "fig_dir": None})
    i = next(i for i, c in enumerate(nb2.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nb2.cells[i + 1]
    assert "injected-parameters" in injected.metadata["tags"]
    ns: dict = {}
    exec(injected.source, ns)  # the injected text is only literals: the quote stays inside the string
    assert ns["run_dir"] == "x'; import os" and ns["fig_dir"] is None
    assert len(nb2.cells) == len(nb.cells) + 1
    with pytest.raises(rbuild.BuildError):
        rbuild.inject_parameters(nb, {"run_dir": object()})


def test_shared_tables_at_the_top_do_not_hide_the_budget_folders_pick(tmp_path):
    """search.pareto writes pareto.csv at the top after budget-<B>/config.json: the pick is still found."""
    import os

    from reports.artifacts import find_search_dir

    sub = tmp_path / "budget-3.5"
    sub.mkdir()
    (sub / "config.json").write_text("{}")
    (tmp_path / "pareto.csv").write_text("x\n")
    os.utime(sub / "config.json", (1, 1))  # older than the shared table
    assert find_search_dir(tmp_path) == sub
