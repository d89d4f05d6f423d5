"""Fashion-MNIST / MNIST layout: four IDX files (optionally gzip'd), read offline and checked.

Debian's ``dataset-fashion-mnist`` puts the four IDX .gz files in /usr/share/datasets/fashion-mnist.
``--data-dir`` or ``HASB_DATA_DIR`` point elsewhere — to the real dataset or to the user's own data in the same
layout.  Nothing is ever downloaded.

What is recorded comes from the files, never from the dataset's name: the class count (largest training label
+ 1), the image shape, and the normalisation — mean and std of every pixel of the training-images file.  For the
real datasets these equal the published constants (Fashion-MNIST 0.2860/0.3530, MNIST 0.1307/0.3081); for other
files in the same layout they are those files' own.  They are taken over the whole training file, not the
seeded train part, so every stage (training, sensitivity, search: different seeds or val sizes) normalises the
same files identically.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from .core import DataError, DataSource, Splits, make_splits

DATASETS = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist", "sudo apt-get install dataset-fashion-mnist"),
    "mnist": ("/usr/share/datasets/mnist", "place the MNIST IDX .gz files in a folder and pass --data-dir"),
}
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# the published constants; only documentation and a test check now — loading computes them from the files
MEAN, STD = {"fashion-mnist": 0.2860, "mnist": 0.1307}, {"fashion-mnist": 0.3530, "mnist": 0.3081}


def _read_raw(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(
            f"{path}: cannot read it as a {'gzip' if path.suffix == '.gz' else 'raw'} IDX file "
            f"({e}); it is truncated or corrupt"
        ) from None


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (gzip'd if it ends in .gz) as a uint8 array of the header's dims."""
    raw = _read_raw(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(
            f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex() or 'missing'}, "
            f"accepted 000008 followed by 1..4 dimensions)"
        )
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{path}: IDX header cut short ({len(raw)} bytes, need {head})")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    want = int(np.prod(dims))
    if len(raw) - head != want:
        raise DataError(
            f"{path}: IDX payload has {len(raw) - head} bytes, the header's dims {dims} need "
            f"{want}; the file is truncated or corrupt"
        )
    return np.frombuffer(raw, np.uint8, offset=head).reshape(dims)


def _idx_dims(path: Path) -> list[int]:
    """The header dims of an IDX file, checked against the file's length without reading the payload: for .gz the
    gzip trailer's ISIZE (uncompressed length mod 2**32), else the file size. Catches a cut, foreign or re-cut file
    in milliseconds; corruption of equal length is caught by the full read (gzip CRC)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 and head[:3] == b"\x00\x00\x08" and 1 <= head[3] <= 4 else 0
            rest = f.read(4 * ndim)
        if ndim == 0 or len(rest) < 4 * ndim:
            raise DataError(f"{path}: not an unsigned-byte IDX file (magic {head.hex() or 'missing'})")
        dims = [int.from_bytes(rest[4 * i : 4 * i + 4], "big") for i in range(ndim)]
        want = 4 + 4 * ndim + int(np.prod(dims))
        with open(path, "rb") as f:
            if path.suffix == ".gz":
                f.seek(-4, os.SEEK_END)
                size, want = int.from_bytes(f.read(4), "little"), want % 2**32
            else:
                size = os.fstat(f.fileno()).st_size
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read it as an IDX file ({e}); it is truncated or corrupt") from None
    if size != want:
        raise DataError(
            f"{path}: the IDX header's dims {dims} need {want} bytes, "
            f"{'its gzip trailer records' if path.suffix == '.gz' else 'the file holds'} {size}; "
            "it is truncated or corrupt"
        )
    return dims


def check_idx_dir(name: str = "fashion-mnist", data_dir: str | None = None) -> Path:
    """The dataset folder, its four IDX files checked cheaply (present, lengths match their headers, as many labels
    as images) so a run fails with one DataError before it writes anything; the full read checks the rest."""
    d = find_data_dir(name, data_dir)
    for split in FILES:
        pi, pl = (_file(d, s) for s in FILES[split])
        xi, yl = _idx_dims(pi), _idx_dims(pl)
        if len(xi) != 3 or len(yl) != 1 or xi[0] != yl[0]:
            raise DataError(f"{pl}: labels {yl} do not match the images {xi} of {pi.name} (need [N] and [N, H, W])")
    return d


def find_data_dir(name: str = "fashion-mnist", data_dir: str | None = None) -> Path:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    default, how = DATASETS[name]
    d = Path(data_dir or os.environ.get("HASB_DATA_DIR") or default)
    img = FILES["train"][0]
    if not any((d / (img + ext)).exists() for ext in (".gz", "")):
        raise DataError(
            f"{name} not found in {d} (expected {img}.gz); install it with: {how}, "
            f"or pass --data-dir / set HASB_DATA_DIR"
        )
    return d


def _file(d: Path, stem: str) -> Path:
    p = d / (stem + ".gz")
    if p.exists():
        return p
    if (d / stem).exists():
        return d / stem
    raise DataError(
        f"{d}: missing {stem}.gz (the IDX layout needs {', '.join(s + '.gz' for f in FILES.values() for s in f)})"
    )


def load_split(d: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Images [N, H, W] uint8 and labels [N] uint8 of one split, checked against each other."""
    pi, pl = (_file(d, s) for s in FILES[split])
    x, y = read_idx(pi), read_idx(pl)
    if x.ndim != 3:
        raise DataError(f"{pi}: images must be a 3-D IDX array [N, H, W], got dims {list(x.shape)}")
    if y.ndim != 1:
        raise DataError(f"{pl}: labels must be a 1-D IDX array [N], got dims {list(y.shape)}")
    if len(y) != len(x):
        raise DataError(f"{pl}: {len(y)} labels for the {len(x)} images of {pi.name}; they must match one to one")
    return x, y, [pi, pl]


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class IdxSource(DataSource):
    """``fashion-mnist`` / ``mnist``: the IDX layout in ``data_dir`` (checked, shapes and classes from the files)."""

    task = "classification"

    def __init__(self, name: str = "fashion-mnist", data_dir: str | None = None):
        self.name, self.dir = name, find_data_dir(name, data_dir)
        self.xtr, self.ytr, ftr = load_split(self.dir, "train")
        self.xte, self.yte, fte = load_split(self.dir, "test")
        if self.xte.shape[1:] != self.xtr.shape[1:]:
            raise DataError(
                f"{fte[0]}: test images are {list(self.xte.shape[1:])}, training images "
                f"{list(self.xtr.shape[1:])}; they must match"
            )
        self.num_classes = int(self.ytr.max()) + 1
        if self.num_classes < 2:
            raise DataError(f"{ftr[1]}: the training labels hold a single class; need at least 2")
        if int(self.yte.max()) >= self.num_classes:
            raise DataError(
                f"{fte[1]}: test label {int(self.yte.max())} out of range; accepted 0.."
                f"{self.num_classes - 1} (the classes of the training labels)"
            )
        # exact pixel mean/std from the 256-bin histogram: no float copy of the whole file
        hist = np.bincount(self.xtr.reshape(-1), minlength=256).astype(np.float64)
        v = np.arange(256) / 255.0
        self.mean = float(hist @ v / hist.sum())
        self.std = float(np.sqrt(hist @ (v - self.mean) ** 2 / hist.sum()))
        if not self.std > 0:
            raise DataError(f"{ftr[0]}: every training pixel has the same value; nothing to learn")
        self.files = {p.name: _sha256(p) for p in ftr + fte}

    def describe(self) -> dict:
        return {
            **super().describe(),
            "data_dir": str(self.dir),
            "num_classes": self.num_classes,
            "input_shape": [1, *self.xtr.shape[1:]],
            "normalisation": {"mean": self.mean, "std": self.std},
            "files_sha256": self.files,
        }

    def splits(
        self,
        seed: int = 0,
        *,
        val_size: int = 5000,
        calib_size: int = 1024,
        train_limit: int | None = None,
        val_limit: int | None = None,
    ) -> Splits:
        """val held out of the training file by ``seed``, calib a train subset, test = the t10k files."""
        n = len(self.xtr)
        if not 0 < val_size < n:
            raise DataError(
                f"{self.dir}: val_size {val_size} must be between 1 and {n - 1} (the training file holds {n} images)"
            )
        perm = np.random.default_rng(seed).permutation(n)
        val_idx, tr_idx = perm[:val_size], perm[val_size:]
        calib_idx = tr_idx[:calib_size]
        if train_limit is not None:
            tr_idx = tr_idx[:train_limit]
        if val_limit is not None:
            val_idx = val_idx[:val_limit]

        def norm(x, y, idx=None):
            if idx is not None:
                x, y = x[idx], y[idx]
            return ((x.astype(np.float32) / 255.0 - self.mean) / self.std)[:, None], y

        info = {k: v for k, v in self.describe().items() if k not in ("data", "task", "metric")}
        return make_splits(
            self.name,
            "classification",
            self.num_classes,
            train=norm(self.xtr, self.ytr, tr_idx),
            val=norm(self.xtr, self.ytr, val_idx),
            calib=norm(self.xtr, self.ytr, calib_idx),
            test=norm(self.xte, self.yte),
            info={**info, "seed": seed},
        )
