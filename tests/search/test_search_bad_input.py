"""Bad input to python -m search.pareto is rejected before any work: exit 2, one stderr line, no traceback, and no
file or folder created anywhere (the storage, the data dir and --out are checked before anything is written)."""

import os

import pytest

from search.pareto import main
from tests.support.fakes import make_fake_run

FAST = ["--no-optuna", "--val-limit", "50", "--test-limit", "50", "--calib-size", "64", "--sweep", "4", "--quiet"]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("run"))


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, ds, fs in os.walk(root) for f in fs + ds)


def _case(case, tmp_path):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    out = str(tmp_path / "out")
    return {
        "journal_on_dir": (
            ["--budget", "4", "--storage", f"journal:{tmp_path / 'adir'}", "--out", out],
            "is a directory",
        ),
        "journal_uncreatable": (
            ["--budget", "4", "--storage", f"journal:{tmp_path / 'afile' / 'sub' / 's.log'}", "--out", out],
            "cannot create",
        ),
        "sqlite_uncreatable": (
            ["--budget", "4", "--storage", f"sqlite:///{tmp_path / 'afile' / 'x.db'}", "--out", out],
            "cannot create",
        ),
        "storage_garbage": (["--budget", "4", "--storage", "nonsense", "--out", out], "journal:FILE"),
        "data_dir_missing": (["--budget", "4", "--data-dir", str(tmp_path / "nodata"), "--out", out], "nodata"),
        "out_is_file": (["--budget", "4", "--out", str(tmp_path / "afile")], "not a directory"),
        "out_uncreatable": (["--budget", "4", "--out", str(tmp_path / "afile" / "sub")], "cannot be created"),
        "size_bitops_unit": (["--size", "15000GBOPs", "--out", out], "unknown unit 'GBOPs'"),
        "size_unknown_unit": (["--size", "12xyz", "--out", out], "unknown unit 'xyz'"),
        "bits_not_candidates": (["--budget", "4", "--bits", "8,5", "--out", out], "not all candidates"),
        "device_unknown": (["--budget", "4", "--device", "tpu", "--out", out], "tpu"),
        "negative_test_limit": (["--budget", "4", "--test-limit", "-1", "--out", out], "positive"),
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "journal_on_dir",
        "journal_uncreatable",
        "sqlite_uncreatable",
        "storage_garbage",
        "data_dir_missing",
        "out_is_file",
        "out_uncreatable",
        "size_bitops_unit",
        "size_unknown_unit",
        "bits_not_candidates",
        "device_unknown",
        "negative_test_limit",
    ],
)
def test_rejected_before_any_work(case, fake_run, tmp_path, capsys):
    ck, _ = fake_run
    args, expect = _case(case, tmp_path)
    before = _tree(tmp_path)
    assert main(["--checkpoint", str(ck)] + FAST + args) == 2  # the case last: its option wins
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert expect in err
    if case.startswith("size"):
        assert "accepted: B, kB, MB" in err  # the error names the accepted units
    assert _tree(tmp_path) == before  # nothing created, nothing changed


def test_a_second_search_on_the_same_out_fails_clearly_and_changes_nothing(tmp_path, capsys):
    """Two writers on one --out: the second gets one clear line (exit 2) instead of mixing outputs."""
    from hasb.cli import out_lock
    from search.pareto import main

    ck, _ = make_fake_run(tmp_path / "run")
    out = tmp_path / "out"
    with out_lock(out):  # the first run, still writing
        before = sorted(p.name for p in out.iterdir())
        code = main(["--budget", "4", "--checkpoint", str(ck), "--out", str(out), "--no-optuna", "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "in use by another hasb run" in err[0], err
        assert sorted(p.name for p in out.iterdir()) == before
    # the lock is released with its holder: the same command now runs
    assert main(["--budget", "4", "--checkpoint", str(ck), "--out", str(out), "--no-optuna", "--quiet"]) == 0
