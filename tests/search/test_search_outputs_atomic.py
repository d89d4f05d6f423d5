"""Output sets are atomic: a crash (an exception or a kill) at any rename leaves each set old or new, never a mix
(hasb.outset, used by search.pareto for each budget folder and the shared tables, and by analysis.sensitivity)."""

import json
import os
from pathlib import Path

import pytest

from hasb import outset
from search.pareto import main
from search.pipeline import SET_MANIFEST, recover_outputs
from tests.support.fakes import make_fake_run

FAST = ["--no-optuna", "--val-limit", "50", "--test-limit", "50", "--calib-size", "64", "--quiet"]
M = "set.json"


def _write(folder: Path, files: dict[str, str]) -> None:
    with outset.staged_set(folder, M) as st:
        for name, text in files.items():
            (st.path / name).write_text(text)


def _contents(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def _crash_at(monkeypatch, when):
    """Make a rename out of a stage folder (into a set's folder) raise KeyboardInterrupt when ``when(names)`` holds
    (names: the destinations renamed so far, this one last), or the n-th such rename for an int; returns the log."""
    real, calls = os.replace, []
    if isinstance(when, int):
        n, when = when, lambda names: len(names) == n

    def faulty(src, dst):
        if Path(src).parent.name.startswith(outset.STAGE_PREFIX) and Path(dst).parent != Path(src).parent:
            calls.append(Path(dst).name)
            if when(calls):
                raise KeyboardInterrupt("injected crash between two renames of an output set")
        return real(src, dst)

    monkeypatch.setattr(outset.os, "replace", faulty)
    return calls


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4])
def test_a_crash_at_any_rename_leaves_the_old_or_the_new_set(tmp_path, monkeypatch, crash_at):
    """Old set {a, b, c}; new set {a, b, d} (c dropped). Renames: a, b, d, then the manifest (4th)."""
    old, new = {"a": "old a", "b": "old b", "c": "old c"}, {"a": "new a", "b": "new b", "d": "new d"}
    _write(tmp_path, old)
    assert outset.verify(tmp_path, M) is not None and _contents(tmp_path) == {**old, M: (tmp_path / M).read_text()}
    calls = _crash_at(monkeypatch, crash_at)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, new)
    monkeypatch.undo()
    assert len(calls) == crash_at
    assert outset.verify(tmp_path, M) is None  # mid-rename: the manifest is gone, no reader trusts the mix
    done = outset.recover(tmp_path)  # the next run that owns the folder
    assert done == [next(d for d in done if d.startswith("rolled forward"))]  # the committed stage, nothing else
    got = _contents(tmp_path)
    assert got.pop(M) and got == new  # exactly the new set: the old set's extra file removed too
    assert outset.verify(tmp_path, M) is not None
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_a_failure_before_the_commit_point_keeps_the_old_set(tmp_path):
    _write(tmp_path, {"a": "old"})
    with pytest.raises(RuntimeError), outset.staged_set(tmp_path, M) as st:
        (st.path / "a").write_text("half of a new set")
        raise RuntimeError("the renderer died")
    assert _contents(tmp_path)["a"] == "old" and outset.verify(tmp_path, M) is not None
    assert not any(p.name.startswith(outset.STAGE_PREFIX) for p in tmp_path.iterdir())


def test_recover_removes_uncommitted_stages_and_stale_temp_files(tmp_path):
    _write(tmp_path, {"a": "old"})
    (tmp_path / ".stage.killed").mkdir()  # a run killed while rendering: never committed
    (tmp_path / ".stage.killed" / "a").write_text("partial")
    stale = [tmp_path / ".deploy.pt.x1.tmp", tmp_path / ".checkpoint.pt.y2.tmp"]
    for p in stale:
        p.write_bytes(b"half a write")
    keep = tmp_path / ".hasb.lock"
    keep.write_text("pid 1")
    assert sorted(outset.recover(tmp_path)) == sorted(
        ["removed .stage.killed", "removed .deploy.pt.x1.tmp", "removed .checkpoint.pt.y2.tmp"]
    )
    assert _contents(tmp_path)["a"] == "old" and keep.exists() and not any(p.exists() for p in stale)
    (tmp_path / "a").write_text("edited by hand")
    assert outset.verify(tmp_path, M) is None  # a changed file is not the set the manifest vouches for


def _sets(out: Path, folder: Path) -> dict:
    """Each set's manifest, checked against its files (None: not a complete set)."""
    return {"top": outset.verify(out, SET_MANIFEST), "budget": outset.verify(folder, SET_MANIFEST)}


CRASH_POINTS = {
    "budget-set-middle": lambda names: len(names) == 2,
    "budget-set-manifest": lambda names: names[-1] == SET_MANIFEST,  # its last rename
    "shared-tables-first": lambda names: names.count(SET_MANIFEST) == 1 and names[-1] != SET_MANIFEST,
}


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_search_killed_between_output_writes_leaves_no_mixed_set(tmp_path, monkeypatch, capsys, point):
    """A second search (another sweep: other candidates, tables and config) crashes at a rename: in the middle of
    the budget folder's set, at its manifest (its last rename), or at the shared tables' first rename. Readers
    trust no mix; the next run's recovery leaves each set entirely old or new (the budget set was committed
    before any of these renames, so it is rolled forward)."""
    ck, _ = make_fake_run(tmp_path / "run")
    out, folder = tmp_path / "out", tmp_path / "out" / "budget-4"
    base = ["--checkpoint", str(ck), *FAST, "--budget", "4", "--out", str(out)]
    assert main([*base, "--sweep", "4"]) == 0
    old = _sets(out, folder)
    assert old["top"] and old["budget"] and old["top"]["budget_folder"] == "budget-4"
    assert {"config.json", "deploy.pt", "table.csv", "pareto.png"} <= set(old["budget"]["sha256"])
    calls = _crash_at(monkeypatch, CRASH_POINTS[point])
    assert main([*base, "--sweep", "3"]) == 130  # interrupted
    monkeypatch.undo()
    capsys.readouterr()
    mid = _sets(out, folder)
    if point.startswith("budget"):  # the budget set was being renamed: nothing vouches for it; shared tables old
        assert mid["budget"] is None and mid["top"] == old["top"]
    else:  # the budget set was complete (new); the shared tables' set is the one being renamed
        assert mid["budget"] is not None and mid["budget"] != old["budget"] and mid["top"] is None
    assert calls.count(SET_MANIFEST) == (0 if point.startswith("budget") and calls[-1] != SET_MANIFEST else 1)
    recover_outputs(out)  # what the next search on this --out does first, under the lock
    after = _sets(out, folder)
    assert after["top"] is not None and after["budget"] is not None  # every file matches its set's manifest
    assert after["budget"] != old["budget"]  # committed before the crash: rolled forward to the new set
    assert (after["top"] != old["top"]) == (point == "shared-tables-first")
    doc = json.loads((folder / "config.json").read_text())
    assert "--sweep 3" in doc["provenance"]["command"]  # the new set's config beside the new set's files
    assert not [p for p in [*out.iterdir(), *folder.iterdir()] if p.name.startswith(outset.STAGE_PREFIX)]
    assert main([*base, "--sweep", "3"]) == 0  # and the folder is usable as before
