"""Training metrics: per-epoch rows (losses, validation accuracies with their split, size and binomial standard
error, learning rates) written to ``metrics.csv``/``metrics.json``, and the one-line epoch summary."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from .config import atomic_write_text

# how BN is used when the training stages score themselves (search re-calibrates BN per config instead)
BN_NOTE = {
    "multi": "per-bit BN as trained",
    "supernet": "Transitional BN as trained, not re-calibrated (search re-calibrates BN per config, so its "
    "scores differ)",
    "supernet-bit": "per-bit BN as trained, not re-calibrated (search re-calibrates BN per config, so its "
    "scores differ)",
}


def bit_name(b: int) -> str:
    return f"w{b}a{b}"


def binomial_se(p: float, n: int) -> float:
    """Standard error sqrt(p(1-p)/n) of an accuracy ``p`` measured on ``n`` independent samples (nan if n = 0)."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else math.nan


def accuracy_fields(b: int, acc: float, val_loss: float, n: int) -> dict:
    """The row's columns for bit ``b``: accuracy, its standard error and the mean validation CE loss."""
    return {
        f"acc_{bit_name(b)}": acc,
        f"se_acc_{bit_name(b)}": binomial_se(acc, n),
        f"val_loss_{bit_name(b)}": val_loss,
    }


def summary_line(stage: str, row: dict, bits: list[int], epochs: int) -> str:
    """``[multi] epoch 2/3 loss=… val split (n=…, BN …): w8a8=0.8125±0.0345 …`` (± one binomial SE)."""
    accs = " ".join(f"{bit_name(b)}={row[f'acc_{bit_name(b)}']:.4f}±{row[f'se_acc_{bit_name(b)}']:.4f}" for b in bits)
    return (
        f"[{stage}] epoch {row['epoch']}/{epochs} loss={row['loss']:.4f} {row['val_split']} split "
        f"(n={row['val_n']}, {row['bn']}): {accs} (± 1 SE)"
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


__all__ = ["BN_NOTE", "bit_name", "binomial_se", "accuracy_fields", "summary_line", "write_metrics"]
