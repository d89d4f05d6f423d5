"""What every stage needs from a dataset: splits, batches, the loss, the metric and its direction.

A data source (:class:`DataSource`) turns a seed into :class:`Splits`: in-memory tensors for train, val,
calibration (a subset of train) and test, plus the task, the class count or vocabulary, the input shape and a
provenance dict.  Two tasks exist:

- ``"classification"``: ``x`` float ``[N, *input_shape]``, ``y`` int64 class ids ``[N]``; loss = cross-entropy
  in nats; metric = accuracy (fraction correct, higher is better).
- ``"lm"``: ``x`` and ``y`` uint8 byte windows ``[N, T]`` (``y`` is ``x`` shifted by one byte); loss = next-byte
  cross-entropy in nats per byte; metric = bits per byte (loss / ln 2, lower is better).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import HasbError
from ..models.lm import bits_per_byte, next_byte_loss

TASKS = ("classification", "lm")


class DataError(HasbError):
    pass


@dataclass
class Splits:
    """Tensors per split (see the module docstring for shapes per task) and what the data is.

    ``image_size`` is the side of square image inputs (``input_shape == (C, S, S)``), the context length T for
    ``"lm"``, and ``None`` for other shapes; ``input_shape`` is always the exact per-example shape.
    ``num_classes`` is the vocabulary size (256) for ``"lm"``.
    """

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    calib: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    name: str
    num_classes: int = 10
    in_channels: int = 1
    image_size: int | None = 28
    input_shape: tuple[int, ...] = (1, 28, 28)
    task: str = "classification"
    info: dict = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return metric_name(self.task)

    @property
    def higher_is_better(self) -> bool:
        return self.task == "classification"

    def describe(self) -> dict:
        """Provenance: source, task, shapes, sizes per split, normalisation and anything the source recorded."""
        sizes = {k: int(len(getattr(self, k)[0])) for k in ("train", "val", "calib", "test")}
        return {
            "data": self.name,
            "task": self.task,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_shape),
            "sizes": sizes,
            **self.info,
        }


def metric_name(task: str) -> str:
    return {"classification": "accuracy", "lm": "bits_per_byte"}[task]


def loss_fn(task: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in nats: per example (classification, ``out`` [N, K]) or per byte (lm, ``out`` [N, T, 256])."""
    if task == "lm":
        return next_byte_loss(out, y, reduction)
    return F.cross_entropy(out.float(), y.long(), reduction=reduction)


@torch.no_grad()
def evaluate_metric(
    model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor], task: str, *, batch_size: int = 256, device=None
) -> dict:
    """The task's metric of ``model`` on ``data`` with its standard error; the model is put in eval mode.

    Returns ``{"metric", "value", "se", "loss_nats", "n"}``.  Accuracy: SE = sqrt(p(1-p)/n) over n examples.
    Bits per byte: mean over bytes; SE from the spread of the per-window means over the n windows (windows are
    treated as independent, which neighbouring windows of one file only approximately are).
    """
    device = device or next(model.parameters()).device
    model.eval()
    per: list[torch.Tensor] = []
    for x, y in batches(data, batch_size, device=device):
        out = model(x)
        if task == "lm":
            per.append(loss_fn(task, out, y, "none").view(len(y), -1).mean(1).cpu())
        else:
            per.append(torch.stack([(out.argmax(1) == y).double(), loss_fn(task, out, y, "none").double()], 1).cpu())
    if not per:
        raise DataError("cannot evaluate on an empty split")
    v = torch.cat(per).double()
    n = len(v)
    if task == "lm":
        bits = bits_per_byte(v)
        return {
            "metric": "bits_per_byte",
            "value": float(bits.mean()),
            "n": n,
            "loss_nats": float(v.mean()),
            "se": float(bits.std() / math.sqrt(n)) if n > 1 else float("nan"),
        }
    p = float(v[:, 0].mean())
    return {
        "metric": "accuracy",
        "value": p,
        "se": math.sqrt(p * (1 - p) / n),
        "n": n,
        "loss_nats": float(v[:, 1].mean()),
    }


class DataSource(ABC):
    """A dataset: ``splits(seed)`` gives deterministic :class:`Splits`; ``describe()`` its provenance.

    Subclasses set ``name`` and ``task`` and implement :meth:`splits`.  ``loss``/``evaluate`` follow the task.
    """

    name: str = ""
    task: str = "classification"

    @abstractmethod
    def splits(
        self,
        seed: int = 0,
        *,
        val_size: int = 5000,
        calib_size: int = 1024,
        train_limit: int | None = None,
        val_limit: int | None = None,
    ) -> Splits:
        """Deterministic splits from ``seed``; ``train_limit``/``val_limit`` truncate (fast tests, demos)."""

    def describe(self) -> dict:
        return {"data": self.name, "task": self.task, "metric": metric_name(self.task)}

    @property
    def higher_is_better(self) -> bool:
        return self.task == "classification"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(self.task, out, y)

    def evaluate(self, model, data, **kw) -> dict:
        return evaluate_metric(model, data, self.task, **kw)


class TensorSource(DataSource):
    """A classification source from whole arrays: train (+ optional val/test) already separated or not.

    Missing val is drawn from train by the seed (``val_size`` examples, at most half of what is left); missing
    test likewise (same size, after val); the sizes drawn are in ``Splits.describe()["sizes"]``.  ``x`` arrays are used as given (cast to float32): normalisation is the caller's (npz) or the source's
    (image folder) job.
    """

    def __init__(self, name: str, arrays: dict, info: dict | None = None):
        self.name, self.info = name, dict(info or {})
        self.arrays = check_arrays(name, arrays)
        self.num_classes = int(self.arrays["y"].max()) + 1

    def splits(
        self,
        seed: int = 0,
        *,
        val_size: int = 5000,
        calib_size: int = 1024,
        train_limit: int | None = None,
        val_limit: int | None = None,
    ) -> Splits:
        a = self.arrays
        x, y = a["x"], a["y"]
        g = np.random.default_rng(seed)
        perm = g.permutation(len(x))
        parts: dict = {}
        for key in ("val", "test"):
            if a.get("x_" + key) is not None:
                parts[key] = (a["x_" + key], a["y_" + key])
            else:
                take = min(val_size, (len(perm) - 1) // 2)
                if take < 1:
                    raise DataError(
                        f"{self.name}: {len(x)} examples are too few to hold out a {key} split; "
                        f"give x_{key}/y_{key} or more data"
                    )
                idx, perm = perm[:take], perm[take:]
                parts[key] = (x[idx], y[idx])
        tr_idx = perm[:train_limit] if train_limit is not None else perm
        vx, vy = parts["val"]
        if val_limit is not None:
            vx, vy = vx[:val_limit], vy[:val_limit]
        calib_idx = perm[:calib_size]
        return make_splits(
            self.name,
            "classification",
            self.num_classes,
            train=(x[tr_idx], y[tr_idx]),
            val=(vx, vy),
            calib=(x[calib_idx], y[calib_idx]),
            test=parts["test"],
            info={**self.info, "seed": seed},
        )

    def describe(self) -> dict:
        return {**super().describe(), "num_classes": self.num_classes, **self.info}


def check_arrays(name: str, a: dict) -> dict:
    """Validate classification arrays: x/y present, equal lengths, integer labels, same per-example shapes."""
    if "x" not in a or "y" not in a:
        raise DataError(f"{name}: needs arrays 'x' and 'y' (optional x_val, y_val, x_test, y_test); got {sorted(a)}")
    out = {}
    for key in ("", "_val", "_test"):
        x, y = a.get("x" + key), a.get("y" + key)
        if (x is None) != (y is None):
            raise DataError(f"{name}: x{key} and y{key} must be given together")
        if x is None:
            continue
        x, y = np.asarray(x), np.asarray(y)
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"{name}: y{key} must be a 1-D label array as long as x{key} "
                f"(got y{key} shape {y.shape}, x{key} shape {x.shape})"
            )
        if len(x) == 0:
            raise DataError(f"{name}: x{key} is empty")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{name}: labels y{key} must be integers 0..K-1, got dtype {y.dtype}")
        if not np.issubdtype(x.dtype, np.number):
            raise DataError(f"{name}: x{key} must be numeric, got dtype {x.dtype}")
        if key and x.shape[1:] != out["x"].shape[1:]:
            raise DataError(
                f"{name}: x{key} examples have shape {x.shape[1:]}, x has {out['x'].shape[1:]}; "
                f"all splits must share one input shape"
            )
        out["x" + key], out["y" + key] = x, y
    k = int(out["y"].max()) + 1
    for key in ("", "_val", "_test"):
        y = out.get("y" + key)
        if y is not None and (y.min() < 0 or y.max() >= k):
            raise DataError(
                f"{name}: labels y{key} out of range: {int(y.min())}..{int(y.max())}; accepted "
                f"0..{k - 1} (the classes of the training labels y)"
            )
    if k < 2:
        raise DataError(f"{name}: the training labels hold a single class; need at least 2")
    return out


def make_splits(name: str, task: str, num_classes: int, *, train, val, calib, test, info: dict) -> Splits:
    """Arrays → :class:`Splits`: float32/int64 for classification, uint8 windows for lm; shapes recorded."""

    def tens(pair):
        x, y = pair
        if task == "lm":
            return torch.from_numpy(np.array(x, copy=True)), torch.from_numpy(np.array(y, copy=True))
        return (
            torch.as_tensor(np.array(x, dtype=np.float32, copy=True)),
            torch.as_tensor(np.asarray(y, dtype=np.int64).copy()),
        )

    tr = tens(train)
    shape = tuple(int(s) for s in tr[0].shape[1:])
    if task == "lm":
        image_size, in_channels = shape[0], 1
    else:
        square = len(shape) == 3 and shape[1] == shape[2]
        image_size, in_channels = (shape[1] if square else None), (shape[0] if len(shape) == 3 else 1)
    return Splits(
        train=tr,
        val=tens(val),
        calib=tens(calib),
        test=tens(test),
        name=name,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        input_shape=shape,
        task=task,
        info=info,
    )


def batches(
    data: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    augment: bool = False,
    drop_last: bool = False,
    device=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches from in-memory tensors; ``augment``: random 2-px shift + horizontal flip."""
    x, y = data
    n = len(x)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        xb, yb = x[idx], y[idx]
        if augment:
            xb = _augment(xb, generator)
        if device is not None:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        yield xb, yb


def _augment(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    pad = 2
    n, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=float(x.min()))
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
    x = xp[:, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
