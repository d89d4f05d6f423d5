"""The task's metric (and loss) of any bit config of a trained supernet on the validation split.

The metric follows the data's task (``hasb.data.evaluate_metric``, the one home of the formulas): accuracy with
its binomial standard error for classification, bits per byte (lower is better) with the standard error of the
mean over token windows for language models.  :class:`Metric` names and orients it for everything downstream.

Per config: switch bits (no weights copied), optionally re-calibrate the BN entries
that config uses on calibration batches (``bn="recal"``, default: the supernet's
stored statistics were accumulated over *other* configs), run the full
validation split in batches, restore the BN statistics so the supernet is left as
it was.  ``bn="stored"`` uses the stored entries instead (Transitional BN pair keys
when the model has them, else per-bit entries), as the paper does.  A model without
BatchNorm (the byte LMs: LayerNorm normalises each token by its own statistics, so
there is nothing per config to re-estimate) is scored as it is: re-calibration is a
no-op and :meth:`Evaluator.bn_info` says so.

Results are cached by config digest, in memory and optionally in a JSON file (one
section per *context*: checkpoint hash, data, BN mode, split sizes), so a re-run
of the search costs nothing and a changed checkpoint never reuses stale numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from hasb.config import BitConfig, atomic_write_text
from hasb.data import TASKS, evaluate_metric, metric_name
from hasb.errors import HasbError
from hasb.quantize import batchnorms, use_config
from hasb.supernet import recalibrate_bn

BN_MODES = ("recal", "stored")
CACHE_VERSION = 2  # 2: task-aware results (metric, value, se)

Data = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Metric:
    """How a task's score is named, oriented and shown (the value itself comes from hasb.data.evaluate_metric).

    ``name`` is the column/key everywhere (``accuracy``, ``bits_per_byte``; its SE column is ``<name>_se``).
    """

    name: str
    higher_is_better: bool
    label: str  # in words, for axes and text
    percent: bool  # shown ×100 with "%"
    unit: str  # what n counts
    se_text: str  # how the standard error was measured

    @property
    def se_col(self) -> str:
        return f"{self.name}_se"

    def oriented(self, values) -> np.ndarray:
        """Values turned so that larger is better (for Pareto masks and "best" picks): [N] float."""
        v = np.asarray(values, dtype=float)
        return v if self.higher_is_better else -v

    def fmt(self, value: float, se: float) -> str:
        """``76.50 ± 0.95 %`` or ``2.412 ± 0.013 bits/byte``."""
        if self.percent:
            return f"{100 * value:.2f} ± {100 * se:.2f} %"
        return f"{value:.4f} ± {se:.4f} bits/byte"

    def short(self, value: float) -> str:
        return f"{100 * value:.2f}%" if self.percent else f"{value:.4f} bits/byte"


METRICS = {
    "accuracy": Metric(
        "accuracy", True, "accuracy", True, "images", "binomial standard error sqrt(p(1-p)/n) over n images"
    ),
    "bits_per_byte": Metric(
        "bits_per_byte",
        False,
        "bits per byte",
        False,
        "windows",
        "standard error of the mean over n windows (s.d. of per-window bits per byte / sqrt(n))",
    ),
}


def metric_for(task: str) -> Metric:
    """The :class:`Metric` of a data task (``classification``: accuracy ↑; ``lm``: bits per byte ↓)."""
    if task not in TASKS:
        raise HasbError(f"unknown task {task!r}; accepted: {', '.join(TASKS)}")
    return METRICS[metric_name(task)]


@dataclass
class EvalResult:
    """One config's score: ``value`` of ``metric`` (accuracy in [0, 1] or bits per byte), its standard error,
    the mean cross-entropy ``loss`` (nats per example / per byte), ``n`` scored examples or windows, seconds
    spent (0 if cached)."""

    value: float
    se: float
    loss: float
    n: int
    metric: str = "accuracy"
    seconds: float = 0.0
    cached: bool = False

    @property
    def accuracy(self) -> float:
        if self.metric != "accuracy":
            raise AttributeError(f"this score is {self.metric}, not accuracy")
        return self.value

    @property
    def correct(self) -> int:
        """Number of correctly classified samples (accuracy · n, exact: accuracy was correct / n)."""
        return round(self.accuracy * self.n)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return d


def binomial_se(p: float, n: int) -> float:
    """Standard error sqrt(p(1−p)/n) of an accuracy p measured on n independent samples (nan for n = 0)."""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else float("nan")


def score(
    model: nn.Module,
    data: Data,
    task: str = "classification",
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> EvalResult:
    """The task's metric of ``model`` in eval mode on ``data`` (``hasb.data.evaluate_metric``), as an EvalResult.

    Pure scoring, no config switching: also used on a plain deployed module (hasb.export.load_deployment).
    The model's train/eval mode is restored.
    """
    was = model.training
    try:
        d = evaluate_metric(model, data, task, batch_size=batch_size, device=torch.device(device))
    finally:
        model.train(was)
    return EvalResult(float(d["value"]), float(d["se"]), float(d["loss_nats"]), int(d["n"]), d["metric"])


class Evaluator:
    """Evaluate configs of one supernet on one validation split.

    Args:
        model: quantized supernet (``hasb.quantize_model`` / ``hasb.train.load_supernet``).
        data: ``(val, calib)`` pairs of (x, y) tensors as the task's splits hold them (``hasb.data.Splits``) or a
            zero-argument callable returning them (called on the first cache miss only, so fully cached runs never
            load data).
        task: the data's task (``classification`` or ``lm``): decides the metric (:func:`metric_for`).
        bn: ``"recal"`` (default) or ``"stored"``.
        batch_size: evaluation batch size; calibration uses the same.
        calib_batches: at most this many calibration batches (default: all of ``calib``).
        calib_batch_size: calibration batch size; a trailing partial batch is dropped (the cumulative BN
            average weights every batch equally, so a tiny last batch would skew it).
        cache_path: JSON cache file (e.g. ``runs/demo/evals.json``); None = memory only.
        context: what the numbers depend on besides the config (checkpoint hash, data name ...); part of the key.
        device: torch device for evaluation.
    """

    def __init__(
        self,
        model: nn.Module,
        data: tuple[Data, Data] | Callable[[], tuple[Data, Data]],
        *,
        bn: str = "recal",
        task: str = "classification",
        batch_size: int = 1000,
        calib_batches: int | None = None,
        calib_batch_size: int = 256,
        cache_path: str | Path | None = None,
        context: dict | None = None,
        device: str | torch.device = "cpu",
    ):
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; accepted: {', '.join(BN_MODES)}")
        self.model = model
        self._data = data
        self.bn = bn
        self.task, self.metric = task, metric_for(task)
        self.has_bn = bool(batchnorms(model))
        self.batch_size = int(batch_size)
        self.calib_batches = calib_batches
        self.calib_batch_size = int(calib_batch_size)
        self.device = torch.device(device)
        self.cache_path = Path(cache_path) if cache_path else None
        ctx = dict(context or {})
        ctx.update(bn=bn, task=task, calib_batch_size=self.calib_batch_size, calib_batches=calib_batches)
        self.context = ctx
        self.context_key = hashlib.sha1(json.dumps(ctx, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self._mem: dict[str, EvalResult] = {}
        self._file: dict = {"version": CACHE_VERSION, "contexts": {}}
        self._load_cache()
        self.n_evaluated = 0

    # -- cache -------------------------------------------------------------------
    def _load_cache(self) -> None:
        if self.cache_path is None or not self.cache_path.is_file():
            return
        try:
            d = json.loads(self.cache_path.read_text())
            if d.get("version") != CACHE_VERSION or not isinstance(d.get("contexts"), dict):
                return
        except (json.JSONDecodeError, OSError, AttributeError):
            return  # a broken cache is only a cache: recompute
        self._file = d
        for dig, r in d["contexts"].get(self.context_key, {}).get("results", {}).items():
            try:
                self._mem[dig] = EvalResult(**{**r, "cached": True})
            except TypeError:
                continue  # an entry of another layout: recompute it

    def _save_cache(self) -> None:
        if self.cache_path is None:
            return
        sec = self._file["contexts"].setdefault(self.context_key, {"context": self.context, "results": {}})
        sec["results"] = {k: v.to_dict() for k, v in self._mem.items()}
        atomic_write_text(self.cache_path, json.dumps(self._file, default=str))

    def calibration_images(self) -> int:
        """Examples the BN re-calibration of each config runs on (0 with ``bn="stored"`` or without BatchNorm):
        whole batches only."""
        if self.bn != "recal" or not self.has_bn:
            return 0
        n, bs = len(self._splits()[1][0]), self.calib_batch_size
        used = n - n % bs if n >= bs else n
        return used if self.calib_batches is None else min(used, self.calib_batches * bs)

    def bn_info(self) -> dict:
        """How BatchNorm was handled: ``{"mode": "recal"|"stored"|"none", "calibration_images": int[, "note"]}``."""
        if not self.has_bn:
            return {
                "mode": "none",
                "calibration_images": 0,
                "note": "the model has no BatchNorm (LayerNorm normalises each token by its own statistics): "
                "nothing to re-calibrate, every config scored as it is",
            }
        return {"mode": self.bn, "calibration_images": self.calibration_images()}

    def save(self) -> None:
        """Write the cache file now (evaluate(save=False) defers it)."""
        self._save_cache()

    def cached(self, config: BitConfig) -> EvalResult | None:
        return self._mem.get(config.digest())

    # -- evaluation --------------------------------------------------------------
    def _splits(self) -> tuple[Data, Data]:
        if callable(self._data):
            self._data = self._data()
        return self._data

    def _batches(self, data: Data, limit: int | None = None, size: int | None = None, drop_last=False):
        x, y = data
        bs = size or self.batch_size
        stop = len(x) - len(x) % bs if (drop_last and len(x) >= bs) else len(x)
        for i, s in enumerate(range(0, stop, bs)):
            if limit is not None and i >= limit:
                break
            yield x[s : s + bs].to(self.device), y[s : s + bs].to(self.device)

    @contextlib.contextmanager
    def calibrated(self, config: BitConfig | dict) -> Iterator[nn.Module]:
        """The supernet switched to ``config`` with the BN entries it uses as scored (re-calibrated on the
        calibration split when ``bn="recal"``); the stored statistics and the config are restored on exit.

        Exporting inside this block writes exactly the network whose accuracy :meth:`evaluate` reports.
        """
        cfg = config if isinstance(config, BitConfig) else BitConfig(dict(config))
        model = self.model
        was = model.training
        snapshot = None
        try:
            with use_config(model, cfg):
                if self.bn == "recal" and self.has_bn:
                    # keep the supernet's stored statistics: recal touches only the entries this config uses
                    snapshot = [
                        (bn.active, {k: v.clone() for k, v in bn.active.state_dict().items()})
                        for bn in batchnorms(model).values()
                    ]
                    recalibrate_bn(
                        model,
                        cfg,
                        self._batches(self._splits()[1], self.calib_batches, self.calib_batch_size, drop_last=True),
                    )
                model.eval()
                yield model
        finally:
            if snapshot is not None:
                with torch.no_grad():
                    for m, st in snapshot:
                        m.load_state_dict(st)
            model.train(was)

    def evaluate(self, config: BitConfig | dict, save: bool = True) -> EvalResult:
        """The metric and loss of ``config`` on the validation split (cached by ``config.digest()``)."""
        cfg = config if isinstance(config, BitConfig) else BitConfig(dict(config))
        dig = cfg.digest()
        hit = self._mem.get(dig)
        if hit is not None:
            return dataclasses.replace(hit, cached=True)
        res = self.score(cfg, self._splits()[0])
        self._mem[dig] = res
        self.n_evaluated += 1
        if save:
            self._save_cache()
        return res

    def score(self, config: BitConfig | dict, data: Data) -> EvalResult:
        """The metric and loss of ``config`` on any split ``data`` (not cached; e.g. the held-out test split)."""
        t0 = time.perf_counter()
        if len(data[0]) == 0:
            raise HasbError("cannot score a config on an empty split")
        with self.calibrated(config) as model:
            r = score(model, data, self.task, self.batch_size, self.device)
        r.seconds = time.perf_counter() - t0
        return r

    def evaluate_many(
        self, configs: Sequence[BitConfig], progress: bool = False, desc: str = "evaluate"
    ) -> list[EvalResult]:
        """Evaluate several configs (cache hits are free); the cache file is written once at the end."""
        out = []
        todo = [c for c in configs if self.cached(c) is None]
        bar = None
        if progress and todo:
            bar = tqdm(total=len(todo), desc=desc, unit="config", leave=False)
        try:
            for c in configs:
                hit = self.cached(c) is not None
                out.append(self.evaluate(c, save=False))
                if bar is not None and not hit:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if todo:
                self._save_cache()
        return out


def file_digest(path: str | Path, n: int = 16) -> str:
    """sha256 prefix of a file (checkpoint provenance and cache context)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


__all__ = [
    "Evaluator",
    "EvalResult",
    "Metric",
    "METRICS",
    "metric_for",
    "BN_MODES",
    "binomial_se",
    "score",
    "file_digest",
]
