"""Output sets: files that belong together are replaced together, so a crash leaves the old set or the new one.

A set lives in a folder (e.g. ``--out`` or ``--out/budget-3.5/``) with a manifest naming each of its files and
its sha256. Writing a set (:func:`staged_set`):

1. every file is written into a stage folder inside the target folder (same file system, so renames are atomic);
2. the manifest is written into the stage, then a ``.commit`` marker: **the commit point**;
3. the old manifest is removed, each file is renamed in, files of the old set that the new one lacks are removed,
   and the manifest is renamed in **last**; the stage folder is removed.

Readers trust a set only when :func:`verify` finds the manifest and every file's sha256 matching it, so a set
caught half-way through step 3 is never read as complete. A run that owns the folder (under its lock) calls
:func:`recover` on start: a committed stage that a kill interrupted in step 3 is rolled forward (the new set), an
uncommitted one is deleted (the old set stays), and temp files of interrupted atomic writes are removed. A failure
inside the writing process behaves like a kill at the same point: before the commit point the stage is deleted,
after it the stage is left for :func:`recover`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import atomic_write_text

__all__ = ["Stage", "staged_set", "verify", "recover", "file_digest", "STAGE_PREFIX", "COMMIT"]

STAGE_PREFIX = ".stage."  # default prefix of stage folders inside a set's folder
COMMIT = ".commit"  # in a stage folder: names the manifest; written after every file of the set (the commit point)
TMP_GLOB = ".*.tmp"  # what hasb.config.atomic_write_* leaves when killed mid-write (``.<name>.<random>.tmp``)


def file_digest(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Stage:
    """A stage folder being filled: write the set's files into ``path``; ``meta`` goes into the manifest."""

    path: Path
    folder: Path
    manifest: str
    meta: dict[str, Any] = field(default_factory=dict)


def _read_json(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("sha256"), dict) else None


@contextlib.contextmanager
def staged_set(folder: str | Path, manifest: str, prefix: str = STAGE_PREFIX) -> Iterator[Stage]:
    """Yield a :class:`Stage` in ``folder``; on a normal exit commit its files as the folder's set ``manifest``.

    Every regular file the caller wrote into ``stage.path`` (names not starting with a dot) is part of the set.
    A failure before the commit point deletes the stage (the old set stays); after it, the committed stage is
    left for :func:`recover`, exactly as a kill at that point would leave it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    st = Stage(Path(tempfile.mkdtemp(dir=folder, prefix=prefix)), folder, manifest)
    try:
        yield st
        _commit(st)
    except BaseException:
        if not (st.path / COMMIT).is_file():
            shutil.rmtree(st.path, ignore_errors=True)
        raise
    shutil.rmtree(st.path, ignore_errors=True)


def _commit(st: Stage) -> None:
    """Steps 2 and 3: manifest and commit marker into the stage, then the set into the folder."""
    names = sorted(p.name for p in st.path.iterdir() if p.is_file() and not p.name.startswith("."))
    old = _read_json(st.folder / st.manifest)
    doc = {
        **st.meta,
        "sha256": {n: file_digest(st.path / n) for n in names},
        # files of the old set that the new one lacks: removed when the set is applied (even after a kill)
        "replaces": sorted(set(old["sha256"]) - set(names)) if old else [],
    }
    atomic_write_text(st.path / st.manifest, json.dumps(doc, indent=2))
    atomic_write_text(st.path / COMMIT, st.manifest)
    _apply(st.path, st.folder)


def _apply(stage: Path, folder: Path) -> None:
    """Move a committed stage's set into ``folder``, manifest last (idempotent: a re-run after a kill finishes it)."""
    manifest = (stage / COMMIT).read_text().strip()
    doc = _read_json(stage / manifest)
    if doc is None:  # cannot happen for a stage committed by _commit; treat as uncommitted
        return
    (folder / manifest).unlink(missing_ok=True)
    for name in doc["sha256"]:
        if (stage / name).exists():
            os.replace(stage / name, folder / name)
    for name in doc.get("replaces", []):
        if name not in doc["sha256"] and "/" not in name and not name.startswith("."):
            (folder / name).unlink(missing_ok=True)
    os.replace(stage / manifest, folder / manifest)


def verify(folder: str | Path, manifest: str) -> dict | None:
    """The manifest (a dict) when ``folder``'s set is complete: every file it names present with its sha256; else
    None (no manifest, a file missing or changed: a set that a crash interrupted, or edited by hand)."""
    folder = Path(folder)
    doc = _read_json(folder / manifest)
    if doc is None:
        return None
    for name, digest in doc["sha256"].items():
        p = folder / name
        if not p.is_file() or file_digest(p) != digest:
            return None
    return doc


def recover(folder: str | Path, prefix: str = STAGE_PREFIX, temp_glob: str | None = TMP_GLOB) -> list[str]:
    """For the run that owns ``folder`` (under its lock), on start: roll committed stages forward, delete the
    others, and remove temp files of interrupted atomic writes (``temp_glob``; None keeps them: a folder that
    other writers share). Returns what was done, one entry per item."""
    folder = Path(folder)
    done: list[str] = []
    if not folder.is_dir():
        return done
    for st in sorted(folder.glob(prefix + "*")):
        if not st.is_dir():
            continue
        if (st / COMMIT).is_file():
            _apply(st, folder)
            done.append(f"rolled forward {st.name}")
        else:
            done.append(f"removed {st.name}")
        shutil.rmtree(st, ignore_errors=True)
    for tmp in folder.glob(temp_glob) if temp_glob else ():
        if tmp.is_file():
            tmp.unlink()
            done.append(f"removed {tmp.name}")
    return done
