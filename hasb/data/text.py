"""Byte-level text: ``text:PATH_OR_GLOB`` and ``python-stdlib`` (the running interpreter's own .py sources).

Each file goes, whole, to one split by a stable hash of its path relative to the corpus root (SHA-256, so the
same on every machine): a file never appears in two splits, and adding files never moves another one.  The
seed does not change which bytes are held out (val/test stay comparable across runs); it picks the train
windows' byte offset, their order under ``train_limit``, and the calibration windows.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
import sysconfig
from pathlib import Path

import numpy as np

from .core import DataError, DataSource, Splits, make_splits
from .sources import stable_unit

VOCAB = 256
SPLIT_NAMES = ("train", "val", "test")


def _expand(pattern: str) -> tuple[list[Path], Path]:
    """Files named by a folder (all files under it), a glob (``**`` recursive) or one file; and their root."""
    p = Path(pattern)
    if p.is_dir():
        files = [f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts)]
        root = p
    else:
        files = [Path(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
        root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else p.parent
    if not files:
        raise DataError(
            f"text:{pattern}: no files found; accepted: a folder, a glob such as 'docs/**/*.txt', or a file"
        )
    return sorted(files), root


class TextSource(DataSource):
    """Byte windows of ``context`` bytes (targets: the next byte) from a corpus of files.

    Args:
        files, root: the corpus; each file's split comes from the hash of its path relative to ``root``.
        context: window length T in bytes.
        limit: at most this many bytes per split (files in hash order; the last one cut) — for fast tests.
        val_frac, test_frac: the share of files (by hash) held out for val and test.
    """

    task = "lm"

    def __init__(
        self,
        name: str,
        files: list[Path],
        root: Path,
        *,
        context: int = 128,
        limit: int | None = None,
        val_frac: float = 0.1,
        test_frac: float = 0.1,
        info: dict | None = None,
    ):
        if context < 1:
            raise DataError(f"{name}: context must be a positive number of bytes, got {context}")
        self.name, self.context, self.info = name, int(context), dict(info or {})
        keyed = sorted((stable_unit(f.relative_to(root).as_posix()), f) for f in files)
        assign: dict[str, list[Path]] = {k: [] for k in SPLIT_NAMES}
        for u, f in keyed:
            assign["test" if u < test_frac else "val" if u < test_frac + val_frac else "train"].append(f)
        self.assignment = {k: [f.relative_to(root).as_posix() for f in v] for k, v in assign.items()}
        self.streams, self.n_files = {}, {}
        for k in SPLIT_NAMES:
            self.streams[k], self.n_files[k] = self._read(assign[k], limit)
            if len(self.streams[k]) < self.context + 1:
                raise DataError(
                    f"{name}: the {k} split holds {len(self.streams[k])} bytes from "
                    f"{self.n_files[k]} file(s), less than one window of {self.context + 1}; the "
                    f"corpus ({len(files)} files) is empty or too small — files are split whole by "
                    f"a hash of their path, so give more (or larger) files or a smaller context"
                )
        self.info.update(
            {
                "root": str(root),
                "context": self.context,
                "limit_bytes_per_split": limit,
                "files": dict(self.n_files),
                "bytes": {k: len(v) for k, v in self.streams.items()},
                "split": f"whole files by sha256 of the relative path: test {test_frac}, val {val_frac}",
            }
        )

    @staticmethod
    def _read(files: list[Path], limit: int | None) -> tuple[np.ndarray, int]:
        chunks, total, used = [], 0, 0
        for f in files:
            if limit is not None and total >= limit:
                break
            try:
                b = f.read_bytes()
            except OSError as e:
                raise DataError(f"text: cannot read {f} ({e})") from None
            if limit is not None:
                b = b[: limit - total]
            chunks.append(b)
            total += len(b)
            used += 1
        return np.frombuffer(b"".join(chunks), dtype=np.uint8), used

    def _windows(self, stream: np.ndarray, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Inputs [N, T] and next-byte targets [N, T]: windows at stride T from ``offset``."""
        T = self.context
        n = (len(stream) - offset - 1) // T
        view = np.lib.stride_tricks.sliding_window_view
        return view(stream[offset:], T)[::T][:n], view(stream[offset + 1 :], T)[::T][:n]

    def describe(self) -> dict:
        return {**super().describe(), "vocab": VOCAB, **self.info}

    def splits(
        self,
        seed: int = 0,
        *,
        val_size: int = 5000,
        calib_size: int = 1024,
        train_limit: int | None = None,
        val_limit: int | None = None,
    ) -> Splits:
        """``val_size`` is unused (val is the hashed val files); ``*_limit`` count windows."""
        g = np.random.default_rng(seed)
        off = int(g.integers(self.context)) if len(self.streams["train"]) > 2 * self.context + 1 else 0
        xtr, ytr = self._windows(self.streams["train"], off)
        perm = g.permutation(len(xtr))
        calib = perm[:calib_size]
        tr = perm[:train_limit] if train_limit is not None else perm
        xv, yv = self._windows(self.streams["val"])
        if val_limit is not None:
            xv, yv = xv[:val_limit], yv[:val_limit]
        info = {
            **{k: v for k, v in self.describe().items() if k not in ("data", "task", "metric")},
            "seed": seed,
            "train_offset": off,
        }
        return make_splits(
            self.name,
            "lm",
            VOCAB,
            train=(xtr[tr], ytr[tr]),
            val=(xv, yv),
            calib=(xtr[calib], ytr[calib]),
            test=self._windows(self.streams["test"]),
            info=info,
        )


def text_source(
    pattern: str, context: int = 128, limit: int | None = None, val_frac: float = 0.1, test_frac: float = 0.1
) -> TextSource:
    """``text:PATH_OR_GLOB`` (see :class:`TextSource` for the options)."""
    files, root = _expand(pattern)
    return TextSource(
        f"text:{pattern}", files, root, context=context, limit=limit, val_frac=val_frac, test_frac=test_frac
    )


def stdlib_files() -> tuple[list[Path], Path]:
    """The running interpreter's standard-library ``.py`` files (installed packages and caches excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        files.extend(Path(d) / n for n in sorted(names) if n.endswith(".py"))
    if not files:
        raise DataError(
            f"python-stdlib: no .py files under {root} (sysconfig's stdlib path); this Python "
            f"ships without sources — use text:PATH_OR_GLOB"
        )
    return files, root


def stdlib_source(
    context: int = 128, limit: int | None = None, val_frac: float = 0.1, test_frac: float = 0.1
) -> TextSource:
    """``python-stdlib``: about 30 MB of real text on every machine; the Python version is recorded."""
    files, root = stdlib_files()
    info = {"python": platform.python_version(), "implementation": sys.implementation.name}
    return TextSource(
        "python-stdlib", files, root, info=info, context=context, limit=limit, val_frac=val_frac, test_frac=test_frac
    )
