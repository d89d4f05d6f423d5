"""The user's own classification data: ``npz:PATH``, ``imagefolder:DIR``, ``pkg.module:callable``."""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .core import DataError, DataSource, Splits, TensorSource

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def stable_unit(key: str) -> float:
    """A number in [0, 1) from the SHA-256 of ``key``: the same on every machine and Python run."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def check_opts(fn, opts: dict, spec: str, first=None) -> None:
    """Options a source (or the user's callable) does not take are a DataError, before anything is called.

    ``first``: the path argument the source takes before its options (not itself an option).
    """
    sig = inspect.signature(fn)
    try:
        sig.bind_partial(*([] if first is None else [first]), **opts)
    except TypeError as e:
        names = list(sig.parameters)[0 if first is None else 1 :]
        raise DataError(f"--data {spec}: bad option ({e}); accepted: {', '.join(names) or 'none'}") from None


def npz_source(path: str) -> TensorSource:
    """``npz:PATH``: arrays x, y (optional x_val, y_val, x_test, y_test), any input shape, used as given."""
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"npz:{path}: no such file; accepted: a .npz with arrays x, y (optional x_val, y_val, x_test, y_test)"
        )
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DataError(f"npz:{path}: not a readable .npz of numeric arrays ({e})") from None
    return TensorSource(f"npz:{path}", arrays, {"path": str(p.resolve()), "normalisation": "as given"})


def _class_files(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DataError(
            f"imagefolder:{root}: no such folder; accepted: a folder with one sub-folder of images per class"
        )
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"imagefolder:{root}: found {len(classes)} class sub-folder(s); need at least 2 "
            f"(one sub-folder of images per class)"
        )
    out = {}
    for d in classes:
        files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise DataError(
                f"imagefolder:{root}: class folder {d.name!r} holds no images; accepted extensions: "
                f"{', '.join(IMAGE_EXTS)}"
            )
        out[d.name] = files
    return out


def _decode(f: Path, size: int, mode: str) -> np.ndarray:
    from PIL import (  # Pillow: optional until an image folder is used
        Image,
        UnidentifiedImageError,
    )

    try:
        with Image.open(f) as im:
            im = im.convert(mode).resize((size, size), Image.BILINEAR)
            a = np.asarray(im, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"imagefolder: cannot decode image {f} ({e}); accepted: images Pillow can read") from None
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _assign(files: list[Path], root: Path, val_frac: float, test_frac: float) -> dict[str, list[Path]]:
    """Per class: files ordered by a stable hash of their relative path; the first go to test, then val."""
    order = sorted(files, key=lambda f: stable_unit(f.relative_to(root).as_posix()))
    n = len(order)
    n_test = max(1, round(test_frac * n)) if n >= 3 else 0
    n_val = max(1, round(val_frac * n)) if n >= 3 else 0
    return {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}


def _channel_stats(x: np.ndarray, given: Sequence[float] | None, what: str, c: int) -> np.ndarray:
    if given is None:
        return x.mean(axis=(0, 2, 3)) if what == "mean" else x.std(axis=(0, 2, 3))
    v = np.asarray([given] if np.isscalar(given) else given, dtype=np.float32)
    if v.size not in (1, c) or (what == "std" and (v <= 0).any()):
        raise DataError(
            f"imagefolder: {what} must be one number or {c} per-channel numbers"
            f"{' > 0' if what == 'std' else ''}, got {given}"
        )
    return np.broadcast_to(v, (c,))


def _all_gray(per_class: dict[str, list[Path]]) -> bool:
    """Whether every image is single-channel (Pillow modes 1, L, I, I;16, F); DataError on an unreadable file."""
    from PIL import Image

    gray = True
    for files in per_class.values():
        for f in files:
            try:
                with Image.open(f) as im:
                    gray &= im.mode in ("1", "L", "I", "I;16", "F")
            except OSError as e:
                raise DataError(f"imagefolder: cannot read image {f} ({e}); accepted: images Pillow can read") from None
    return gray


def _split_arrays(
    per_class: dict[str, list[Path]], root: Path, size: int, mode: str, val_frac: float, test_frac: float, path: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split name -> (images (N, C, size, size) float, labels (N,) int64); labels number the classes in order."""
    parts: dict[str, tuple[list, list]] = {k: ([], []) for k in ("train", "val", "test")}
    for label, files in enumerate(per_class.values()):
        for split, fs in _assign(files, root, val_frac, test_frac).items():
            parts[split][0].extend(_decode(f, size, mode) for f in fs)
            parts[split][1].extend([label] * len(fs))
    if not parts["val"][0] or not parts["test"][0]:
        raise DataError(
            f"imagefolder:{path}: too few images to hold out val and test; need at least 3 images in some class"
        )
    return {k: (np.stack(v[0]), np.asarray(v[1], dtype=np.int64)) for k, v in parts.items()}


def imagefolder_source(
    path: str, size: int = 32, mean=None, std=None, val_frac: float = 0.1, test_frac: float = 0.1
) -> TensorSource:
    """``imagefolder:DIR``: one sub-folder per class, decoded with Pillow, resized to ``size``×``size``.

    Split per class by a stable hash of each file's path (no seed: the test images never move); grayscale when
    every image is, RGB otherwise.  Normalised per channel with ``mean``/``std`` when given, else with those of
    the training split.
    """
    root = Path(path)
    per_class = _class_files(root)
    mode = "L" if _all_gray(per_class) else "RGB"
    arr = _split_arrays(per_class, root, size, mode, val_frac, test_frac, path)
    c = arr["train"][0].shape[1]
    m, s = _channel_stats(arr["train"][0], mean, "mean", c), _channel_stats(arr["train"][0], std, "std", c)
    if (s <= 0).any():
        raise DataError(f"imagefolder:{path}: a channel is constant over the training images; pass std=")
    norm = {
        k: ((x - m[None, :, None, None]) / s[None, :, None, None]).astype(np.float32, copy=False)
        for k, (x, _) in arr.items()
    }
    info = {
        "path": str(root.resolve()),
        "classes": list(per_class),
        "size": size,
        "mode": mode,
        "normalisation": {
            "mean": m.tolist(),
            "std": s.tolist(),
            "from": "given" if mean is not None or std is not None else "train split",
        },
        "split": f"per class by sha256 of the relative path: test {test_frac}, val {val_frac}",
    }
    splits = {"x": norm["train"], "y": arr["train"][1], "x_val": norm["val"], "y_val": arr["val"][1]}
    splits.update(x_test=norm["test"], y_test=arr["test"][1])
    return TensorSource(f"imagefolder:{path}", splits, info)


def _stack(ds, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A map-style torch Dataset of (x, y) pairs → arrays."""
    try:
        items = [ds[i] for i in range(len(ds))]
        x = torch.stack([torch.as_tensor(it[0]) for it in items]).numpy()
        y = np.asarray([int(it[1]) for it in items], dtype=np.int64)
    except (TypeError, IndexError, RuntimeError, ValueError) as e:
        raise DataError(
            f"{what}: expected a map-style torch Dataset of (x, y) pairs with equal x shapes ({e})"
        ) from None
    return x, y


def callable_source(spec: str, **opts) -> DataSource:
    """``pkg.module:callable``, called as ``callable(**opts)``; the module must be importable (PYTHONPATH).

    It returns a :class:`DataSource`, ready :class:`Splits`, or torch Datasets of ``(x, y)`` pairs: a dict with ``train`` (and
    optionally ``val``, ``test``) or a tuple ``(train, val, test)``.  Only imported because the user named it.
    """
    mod_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise DataError(
            f"cannot import data callable {spec!r} ({e}); the module must be importable (on "
            f"PYTHONPATH) and the callable return a DataSource or torch Datasets"
        ) from None
    check_opts(fn, opts, spec)
    got = fn(**opts)
    if isinstance(got, DataSource):
        return got
    if isinstance(got, Splits):
        return FixedSplits(got)
    if isinstance(got, (tuple, list)) and len(got) in (2, 3):
        got = dict(zip(("train", "val", "test"), got, strict=False))
    if not isinstance(got, dict) or "train" not in got:
        raise DataError(
            f"data callable {spec!r} returned {type(got).__name__}; accepted: a DataSource, a dict "
            f"with 'train' (optional 'val', 'test') torch Datasets, or a tuple (train, val, test)"
        )
    arrays = {}
    for key, suffix in (("train", ""), ("val", "_val"), ("test", "_test")):
        if got.get(key) is not None:
            arrays["x" + suffix], arrays["y" + suffix] = _stack(got[key], f"{spec} {key}")
    return TensorSource(spec, arrays, {"callable": spec})


class FixedSplits(DataSource):
    """A source around ready-made :class:`Splits` (returned by user code); the seed cannot change them."""

    def __init__(self, s: Splits):
        self.s, self.name, self.task = s, s.name, s.task

    def splits(self, seed: int = 0, **_) -> Splits:
        return self.s
