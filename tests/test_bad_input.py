"""The bad-input battery as tests, one parametrized test per class of bad input, across the CLIs that take it.

Every case: exit code 2, exactly one stderr line ``error: ...`` naming the problem, no traceback, no file created
anywhere under the test folder and no earlier file changed (each case runs on a fresh folder that already holds
a finished run, hashed before and after). Classes with their own CLI-specific tests elsewhere (numbers out of
range: tests/hasb/test_train_cli.py, storages and units: tests/search/test_search_bad_input.py, notebooks:
tests/reports/test_reports_build.py) are not repeated here.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.support.fakes import make_fake_run

IDX = {
    "train-images-idx3-ubyte.gz": (80, 28, 28),
    "train-labels-idx1-ubyte.gz": (80,),
    "t10k-images-idx3-ubyte.gz": (40, 28, 28),
    "t10k-labels-idx1-ubyte.gz": (40,),
}


def _idx(shape: tuple[int, ...], rng) -> bytes:
    data = rng.integers(0, 10 if len(shape) == 1 else 256, size=shape, dtype=np.uint8)
    head = bytes([0, 0, 8, len(shape)]) + b"".join(int(d).to_bytes(4, "big") for d in shape)
    return head + data.tobytes()


def _corrupt(d: Path, kind: str) -> None:
    """A tiny IDX dataset in ``d`` (valid), then one file damaged the way a download or a disk damages it."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True)
    raw = {name: _idx(shape, rng) for name, shape in IDX.items()}
    if kind == "labels_short":
        raw["train-labels-idx1-ubyte.gz"] = _idx((60,), rng)
    for name, b in raw.items():
        (d / name).write_bytes(gzip.compress(b))
    img = d / "train-images-idx3-ubyte.gz"
    if kind == "gzip_cut":
        img.write_bytes(img.read_bytes()[: img.stat().st_size // 2])
    elif kind == "random_bytes":
        img.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    elif kind == "payload_cut":
        img.write_bytes(gzip.compress(raw[img.name][: len(raw[img.name]) // 2]))
    elif kind == "missing_file":
        (d / "t10k-labels-idx1-ubyte.gz").unlink()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Read-only inputs: a finished run (export + sensitivity), bad checkpoints, damaged datasets, a user model."""
    root = tmp_path_factory.mktemp("bad-input-fixtures")
    ck, sens = make_fake_run(root / "run")
    (root / "empty.pt").write_bytes(b"")
    obj = torch.load(ck, weights_only=True)
    torch.save({k: v for k, v in obj.items() if k != "spec"}, root / "nospec.pt")
    torch.save({**obj, "config": "{not json"}, root / "badjson.pt")
    for kind in ("gzip_cut", "random_bytes", "payload_cut", "labels_short", "missing_file"):
        _corrupt(root / f"data_{kind}", kind)
    (root / "bad_user_models.py").write_text(
        "def raises(**kw):\n    raise RuntimeError('boom inside the user model')\n\n"
        "def no_keywords():\n    raise AssertionError('never called without keywords')\n"
    )
    (root / "afile").write_text("a file, not a folder")
    return root


def _tree(root: Path) -> dict[str, str]:
    out = {}
    for d, ds, fs in os.walk(root):
        for name in ds:
            out[os.path.relpath(os.path.join(d, name), root)] = "dir"
        for name in fs:
            p = os.path.join(d, name)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def _cli(name: str):
    if name == "train":
        from hasb.train import main
    elif name == "sensitivity":
        from analysis.sensitivity import main
    elif name == "search":
        from search.pareto import main
    elif name == "recipes":
        from hasb.recipes import main
    else:
        from reports.build import main
    return main


def _argv(cli: str, fx: Path, work: Path, extra: list[str]) -> list[str]:
    """A command that is valid but for ``extra`` (which comes last, so its options win)."""
    out = str(work / "out")
    base = {
        "train": ["--model", "tiny_mlp", "--train-limit", "64", "--val-limit", "16", "--quiet", "--out", out],
        "sensitivity": ["--model", "small_cnn", "--batches", "1", "--batch-size", "8", "--quiet", "--out", out],
        "search": ["--checkpoint", str(fx / "run" / "model.pt"), "--no-optuna", "--budget", "4", "--quiet"]
        + ["--out", out],
        "recipes": ["demo", "--out", out],
        "reports": ["--run", str(fx / "run"), "--out", out, "--quiet"],
    }[cli]
    return base + extra


def _check_rejected(cli, argv, fx: Path, work: Path, capsys, needle: str) -> str:
    before, fx_before = _tree(work), _tree(fx)
    try:
        rc = _cli(cli)(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (cli, argv, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert "Traceback" not in err + out
    assert needle in lines[0], lines[0]
    assert _tree(work) == before and _tree(fx) == fx_before  # nothing created, nothing changed
    return lines[0]


@pytest.fixture
def work(tmp_path):
    """The folder a case runs in, holding an earlier finished output (it must stay unchanged)."""
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "metrics.csv").write_text("epoch,loss\n0,1.0\n")
    return tmp_path


@pytest.mark.parametrize(
    "cli,option",
    [("train", "--init"), ("train", "--resume"), ("sensitivity", "--checkpoint"), ("search", "--checkpoint")]
    + [("recipes", "stage")],
)
def test_empty_checkpoint(fixtures, work, capsys, cli, option):
    """An empty checkpoint file (a write that never finished): IndexError in torch before; now one line."""
    extra = [option, str(fixtures / "empty.pt")]
    if option == "--resume":  # the run folder holds the empty checkpoint
        (work / "out").mkdir()
        (work / "out" / "checkpoint.pt").write_bytes(b"")
        extra = ["--resume"]
    if option == "stage":  # a recipe stage whose model.pt is empty
        (work / "out" / "multi").mkdir(parents=True)
        (work / "out" / "multi" / "model.pt").write_bytes(b"")
        extra = []
    _check_rejected(cli, _argv(cli, fixtures, work, extra), fixtures, work, capsys, "empty file")


@pytest.mark.parametrize("cli", ["sensitivity", "search"])
@pytest.mark.parametrize("file,needle", [("nospec.pt", "missing ['spec']"), ("badjson.pt", "JSON")])
def test_malformed_export(fixtures, work, capsys, cli, file, needle):
    """A hasb export with a field missing or not JSON (KeyError / JSONDecodeError before): the field is named."""
    argv = _argv(cli, fixtures, work, ["--checkpoint", str(fixtures / file)])
    _check_rejected(cli, argv, fixtures, work, capsys, needle)


@pytest.mark.parametrize("cli", ["train", "sensitivity", "search", "recipes"])
@pytest.mark.parametrize("kind", ["gzip_cut", "random_bytes", "payload_cut", "labels_short", "missing_file"])
def test_corrupt_data_files(fixtures, work, capsys, monkeypatch, cli, kind):
    """A damaged dataset file is named in one line before anything is written (search: before --out exists)."""
    d = fixtures / f"data_{kind}"
    extra = ["--data-dir", str(d)]
    if cli == "recipes":  # the recipes read the data folder from the environment
        monkeypatch.setenv("HASB_DATA_DIR", str(d))
        extra = []
    broken = "t10k-labels" if kind == "missing_file" else "labels" if kind == "labels_short" else "train-images"
    _check_rejected(cli, _argv(cli, fixtures, work, extra), fixtures, work, capsys, broken)


@pytest.mark.parametrize("cli", ["train", "sensitivity", "search", "recipes", "reports"])
@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_out_not_a_writable_folder(fixtures, work, capsys, cli, where):
    """--out that is a file, or lies under one: found before any work (was: at write time, after the HVPs)."""
    out = work / "afile"
    out.write_text("mine")
    target = out if where == "a_file" else out / "sub"
    argv = _argv(cli, fixtures, work, ["--out", str(target)])
    _check_rejected(cli, argv, fixtures, work, capsys, str(out))


@pytest.mark.parametrize("cli", ["train", "sensitivity"])
@pytest.mark.parametrize("fn,needle", [("raises", "boom inside the user model"), ("no_keywords", "unexpected keyword")])
def test_user_model_that_fails(fixtures, work, capsys, monkeypatch, cli, fn, needle):
    """A user model callable that raises or has the wrong signature: its error in one line, plus the hint."""
    monkeypatch.syspath_prepend(str(fixtures))
    argv = _argv(cli, fixtures, work, ["--model", f"bad_user_models:{fn}"])
    line = _check_rejected(cli, argv, fixtures, work, capsys, needle)
    assert "call it directly" in line  # the hint to see the user model's own traceback


@pytest.mark.parametrize(
    "argv,needle", [(["--bits", "8,8"], "twice"), (["--bits", "4,2"], "do not apply to the demo recipe")]
)
def test_recipes_bits(fixtures, work, capsys, argv, needle):
    """hasb.recipes parses --bits inside the exit-code policy: one error line, not argparse's usage + error."""
    _check_rejected("recipes", _argv("recipes", fixtures, work, argv), fixtures, work, capsys, needle)
