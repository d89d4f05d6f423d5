"""Training metrics: per-epoch rows (losses, the validation metric per precision with its split, size and standard
error, learning rates) written to ``metrics.csv``/``metrics.json``, and the one-line epoch summary.

Columns per precision label ``L`` (``w8a8``; ``w8afp`` in weight-only mode; ``fp`` for the float stage):
``loss_L`` (mean training loss, nats), ``<m>_L`` and ``se_<m>_L`` (the validation metric and its standard error,
``<m>`` = :data:`METRIC_COLUMN` of the task's metric: ``acc`` for accuracy, ``bpb`` for bits per byte) and
``val_loss_L`` (mean validation cross-entropy, nats per example or per byte). Each row also names ``metric``,
``higher_is_better``, ``val_split``, ``val_n`` (examples; byte windows for a language model) and ``bn``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .config import atomic_write_text, bit_str

# how normalisation statistics are used when the training stages score themselves (search re-calibrates BN per
# config instead); "none": models without BatchNorm (the byte LMs use LayerNorm, which keeps no running statistics)
BN_NOTE = {
    "multi": "per-bit BN as trained",
    "supernet": "Transitional BN as trained, not re-calibrated (search re-calibrates BN per config, so its "
    "scores differ)",
    "supernet-bit": "per-bit BN as trained, not re-calibrated (search re-calibrates BN per config, so its "
    "scores differ)",
    "none": "no BatchNorm (LayerNorm keeps no running statistics: no per-bit or Transitional BN, nothing to "
    "re-calibrate)",
}

# the task metric's column prefix (hasb.data.metric_name gives the metric of a task)
METRIC_COLUMN = {"accuracy": "acc", "bits_per_byte": "bpb"}


def pass_name(w_bit: int | None, a_bit: int | None) -> str:
    """Label of one precision: ``w8a8``, ``w4afp`` (weight-only, fp activations), ``fp`` (the float model)."""
    if w_bit is None and a_bit is None:
        return "fp"
    return f"w{bit_str(w_bit)}a{bit_str(a_bit)}"


def bit_name(b: int) -> str:
    """Label of uniform bit ``b`` with activations at the same width (the W+A default)."""
    return pass_name(b, b)


def binomial_se(p: float, n: int) -> float:
    """Standard error sqrt(p(1-p)/n) of an accuracy ``p`` measured on ``n`` independent samples (nan if n = 0)."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else math.nan


def metric_fields(label: str, result: dict) -> dict:
    """The row's columns for precision ``label`` from :func:`hasb.data.evaluate_metric`'s result: the metric, its
    standard error and the mean validation loss in nats."""
    col = METRIC_COLUMN[result["metric"]]
    return {
        f"{col}_{label}": result["value"],
        f"se_{col}_{label}": result["se"],
        f"val_loss_{label}": result["loss_nats"],
    }


def summary_line(stage: str, row: dict, labels: list[str], epochs: int) -> str:
    """``[multi] epoch 2/3 loss=… val split accuracy (n=…, BN …): w8a8=0.8125±0.0345 …`` (± one SE)."""
    metric = row.get("metric", "accuracy")
    col = METRIC_COLUMN[metric]
    vals = " ".join(f"{lb}={row[f'{col}_{lb}']:.4f}±{row[f'se_{col}_{lb}']:.4f}" for lb in labels)
    return (
        f"[{stage}] epoch {row['epoch']}/{epochs} loss={row['loss']:.4f} {row['val_split']} split {metric} "
        f"(n={row['val_n']}, {row['bn']}): {vals} (± 1 SE)"
    )


def write_metrics(out: Path, history: list[dict]) -> None:
    """``metrics.json`` (the rows) and ``metrics.csv`` (the union of their columns, first-seen order), atomically."""
    atomic_write_text(out / "metrics.json", json.dumps(history, indent=2))
    keys: list[str] = []
    for row in history:
        for k in row:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow(row)
    atomic_write_text(out / "metrics.csv", buf.getvalue())


__all__ = [
    "BN_NOTE",
    "METRIC_COLUMN",
    "pass_name",
    "bit_name",
    "binomial_se",
    "metric_fields",
    "summary_line",
    "write_metrics",
]
