"""Accuracy and loss of any bit config of a trained supernet on the validation split.

Per config: switch bits (no weights copied), optionally re-calibrate the BN entries
that config uses on calibration batches (``bn="recal"``, default: the supernet's
stored statistics were accumulated over *other* configs), run the full
validation split in batches, restore the BN statistics so the supernet is left as
it was.  ``bn="stored"`` uses the stored entries instead (Transitional BN pair keys
when the model has them, else per-bit entries), as the paper does.

Results are cached by config digest, in memory and optionally in a JSON file (one
section per *context*: checkpoint hash, data, BN mode, split sizes), so a re-run
of the search costs nothing and a changed checkpoint never reuses stale numbers.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from hasb.config import BitConfig, atomic_write_text
from hasb.quantize import batchnorms, use_config

BN_MODES = ("recal", "stored")
CACHE_VERSION = 1

Data = tuple[torch.Tensor, torch.Tensor]


@dataclass
class EvalResult:
    """accuracy in [0, 1], mean cross-entropy loss (nats), n validation samples, seconds spent (0 if cached)."""

    accuracy: float
    loss: float
    n: int
    seconds: float = 0.0
    cached: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("cached")
        return d


def _recalibrate(model: nn.Module, config: BitConfig, batches: Iterable) -> None:
    """hasb.supernet.recalibrate_bn when available; a local equivalent otherwise."""
    try:
        from hasb.supernet import recalibrate_bn
    except ImportError:   # pragma: no cover - the foundation ships it; kept for older trees
        recalibrate_bn = None
    if recalibrate_bn is not None:
        recalibrate_bn(model, config, batches)
        return
    with use_config(model, config), torch.no_grad():   # pragma: no cover
        entries = {id(bn.active): bn.active for bn in batchnorms(model).values()}.values()
        model.eval()
        saved = [(m, m.momentum) for m in entries]
        for m in entries:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x, _ in batches:
            model(x)
        for m, mom in saved:
            m.momentum = mom
            m.eval()


class Evaluator:
    """Evaluate configs of one supernet on one validation split.

    Args:
        model: quantized supernet (``hasb.quantize_model`` / ``hasb.train.load_supernet``).
        data: ``(val, calib)`` pairs of (x [N, C, H, W], y [N]) or a zero-argument callable returning them
            (called on the first cache miss only, so fully cached runs never load data).
        bn: ``"recal"`` (default) or ``"stored"``.
        batch_size: evaluation batch size; calibration uses the same.
        calib_batches: at most this many calibration batches (default: all of ``calib``).
        calib_batch_size: calibration batch size; a trailing partial batch is dropped (the cumulative BN
            average weights every batch equally, so a tiny last batch would skew it).
        cache_path: JSON cache file (e.g. ``runs/demo/evals.json``); None = memory only.
        context: what the numbers depend on besides the config (checkpoint hash, data name ...); part of the key.
        device: torch device for evaluation.
    """

    def __init__(self, model: nn.Module, data: Union[tuple[Data, Data], Callable[[], tuple[Data, Data]]], *,
                 bn: str = "recal", batch_size: int = 1000, calib_batches: Optional[int] = None,
                 calib_batch_size: int = 256,
                 cache_path: Optional[Union[str, Path]] = None, context: Optional[dict] = None,
                 device: Union[str, torch.device] = "cpu"):
        if bn not in BN_MODES:
            raise ValueError(f"unknown bn mode {bn!r}; accepted: {', '.join(BN_MODES)}")
        self.model = model
        self._data = data
        self.bn = bn
        self.batch_size = int(batch_size)
        self.calib_batches = calib_batches
        self.calib_batch_size = int(calib_batch_size)
        self.device = torch.device(device)
        self.cache_path = Path(cache_path) if cache_path else None
        ctx = dict(context or {})
        ctx.update(bn=bn, calib_batch_size=self.calib_batch_size, calib_batches=calib_batches)
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
            return     # a broken cache is only a cache: recompute
        self._file = d
        for dig, r in d["contexts"].get(self.context_key, {}).get("results", {}).items():
            self._mem[dig] = EvalResult(float(r["accuracy"]), float(r["loss"]), int(r["n"]),
                                        float(r.get("seconds", 0.0)), cached=True)

    def _save_cache(self) -> None:
        if self.cache_path is None:
            return
        sec = self._file["contexts"].setdefault(self.context_key, {"context": self.context, "results": {}})
        sec["results"] = {k: v.to_dict() for k, v in self._mem.items()}
        atomic_write_text(self.cache_path, json.dumps(self._file, default=str))

    def cached(self, config: BitConfig) -> Optional[EvalResult]:
        return self._mem.get(config.digest())

    # -- evaluation --------------------------------------------------------------
    def _splits(self) -> tuple[Data, Data]:
        if callable(self._data):
            self._data = self._data()
        return self._data

    def _batches(self, data: Data, limit: Optional[int] = None, size: Optional[int] = None, drop_last=False):
        x, y = data
        bs = size or self.batch_size
        stop = len(x) - len(x) % bs if (drop_last and len(x) >= bs) else len(x)
        for i, s in enumerate(range(0, stop, bs)):
            if limit is not None and i >= limit:
                break
            yield x[s:s + bs].to(self.device), y[s:s + bs].to(self.device)

    def evaluate(self, config: Union[BitConfig, dict], save: bool = True) -> EvalResult:
        """Accuracy and loss of ``config`` (cached by ``config.digest()``)."""
        cfg = config if isinstance(config, BitConfig) else BitConfig(dict(config))
        dig = cfg.digest()
        hit = self._mem.get(dig)
        if hit is not None:
            return EvalResult(hit.accuracy, hit.loss, hit.n, hit.seconds, cached=True)
        val, calib = self._splits()
        t0 = time.perf_counter()
        model = self.model
        was = model.training
        snapshot = None
        try:
            with use_config(model, cfg):
                if self.bn == "recal":
                    # keep the supernet's stored statistics: recal touches only the entries this config uses
                    snapshot = [(bn.active, {k: v.clone() for k, v in bn.active.state_dict().items()})
                                for bn in batchnorms(model).values()]
                    _recalibrate(model, cfg, self._batches(calib, self.calib_batches, self.calib_batch_size,
                                                            drop_last=True))
                model.eval()
                correct, loss_sum, n = 0, 0.0, 0
                with torch.inference_mode():
                    for x, y in self._batches(val):
                        out = model(x)
                        loss_sum += float(F.cross_entropy(out.float(), y, reduction="sum"))
                        correct += int((out.argmax(1) == y).sum())
                        n += len(y)
        finally:
            if snapshot is not None:
                with torch.no_grad():
                    for m, st in snapshot:
                        m.load_state_dict(st)
            model.train(was)
        if n == 0:
            raise ValueError("validation split is empty")
        res = EvalResult(correct / n, loss_sum / n, n, time.perf_counter() - t0)
        self._mem[dig] = res
        self.n_evaluated += 1
        if save:
            self._save_cache()
        return res

    def evaluate_many(self, configs: Sequence[BitConfig], progress: bool = False, desc: str = "evaluate"
                      ) -> list[EvalResult]:
        """Evaluate several configs (cache hits are free); the cache file is written once at the end."""
        out = []
        todo = [c for c in configs if self.cached(c) is None]
        bar = None
        if progress and todo:
            from tqdm import tqdm
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


def file_digest(path: Union[str, Path], n: int = 16) -> str:
    """sha256 prefix of a file (checkpoint provenance and cache context)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


__all__ = ["Evaluator", "EvalResult", "BN_MODES", "file_digest"]
