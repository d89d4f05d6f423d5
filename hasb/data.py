"""Real data, offline: Fashion-MNIST (and MNIST) from IDX files, as in-memory tensors.

Debian's ``dataset-fashion-mnist`` puts the four IDX .gz files in
/usr/share/datasets/fashion-mnist.  ``--data-dir`` or ``HASB_DATA_DIR`` point
elsewhere.  Nothing is ever downloaded.
"""
from __future__ import annotations

from .errors import HasbError
import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

DATASETS = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist", "sudo apt-get install dataset-fashion-mnist"),
    "mnist": ("/usr/share/datasets/mnist", "place the MNIST IDX .gz files in a folder and pass --data-dir"),
}
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
MEAN, STD = {"fashion-mnist": 0.2860, "mnist": 0.1307}, {"fashion-mnist": 0.3530, "mnist": 0.3081}


class DataError(HasbError):
    pass


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_data_dir(name: str = "fashion-mnist", data_dir: Optional[str] = None) -> Path:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}")
    default, how = DATASETS[name]
    d = Path(data_dir or os.environ.get("HASB_DATA_DIR") or default)
    img = FILES["train"][0]
    if not any((d / (img + ext)).exists() for ext in (".gz", "")):
        raise DataError(f"{name} not found in {d} (expected {img}.gz); install it with: {how}, "
                        f"or pass --data-dir / set HASB_DATA_DIR")
    return d


def _load_split(d: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for stem in FILES[split]:
        p = d / (stem + ".gz")
        out.append(_read_idx(p if p.exists() else d / stem))
    return out[0], out[1]


@dataclass
class Splits:
    """Normalised float images [N, 1, 28, 28] and int64 labels [N] per split."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    calib: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    name: str
    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28


def load_dataset(name: str = "fashion-mnist", data_dir: Optional[str] = None, *, val_size: int = 5000,
                 calib_size: int = 1024, seed: int = 0, train_limit: Optional[int] = None,
                 val_limit: Optional[int] = None) -> Splits:
    """Deterministic splits from ``seed``: val (held out of train), calib (a train subset), test (t10k).

    ``train_limit``/``val_limit`` truncate (for fast tests and demos).
    """
    d = find_data_dir(name, data_dir)
    xtr, ytr = _load_split(d, "train")
    xte, yte = _load_split(d, "test")
    g = np.random.default_rng(seed)
    perm = g.permutation(len(xtr))
    val_idx, tr_idx = perm[:val_size], perm[val_size:]
    calib_idx = tr_idx[:calib_size]
    if train_limit is not None:
        tr_idx = tr_idx[:train_limit]
    if val_limit is not None:
        val_idx = val_idx[:val_limit]

    def tens(x, y, idx=None):
        if idx is not None:
            x, y = x[idx], y[idx]
        xt = (torch.from_numpy(np.array(x, copy=True)).float().div_(255.0) - MEAN[name]) / STD[name]
        return xt.unsqueeze(1), torch.from_numpy(np.asarray(y, dtype=np.int64))

    return Splits(train=tens(xtr, ytr, tr_idx), val=tens(xtr, ytr, val_idx), calib=tens(xtr, ytr, calib_idx),
                  test=tens(xte, yte), name=name)


def batches(data: tuple[torch.Tensor, torch.Tensor], batch_size: int, *, shuffle: bool = False,
            generator: Optional[torch.Generator] = None, augment: bool = False, drop_last: bool = False,
            device=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches from in-memory tensors; ``augment``: random 2-px shift + horizontal flip."""
    x, y = data
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        xb, yb = x[idx], y[idx]
        if augment:
            xb = _augment(xb, generator)
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb


def _augment(x: torch.Tensor, g: Optional[torch.Generator]) -> torch.Tensor:
    pad = 2
    n, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    x = xp[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
