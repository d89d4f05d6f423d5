"""What a search writes and prints: the per-budget folder (config.json, deploy.pt, table.csv, plots), the shared
tables at the top of ``--out`` (pareto.csv, candidates.csv), the printed table, and the split scores.

Scores follow the data's task (:class:`search.evaluate.Metric`): accuracies are fractions in [0, 1] with their
binomial standard error sqrt(p(1−p)/n); bits per byte (language models, lower is better) carry the standard error
of the mean over n token windows.  Columns are named by the metric (``accuracy``/``accuracy_se`` or
``bits_per_byte``/``bits_per_byte_se``); every score printed or written names its split and size.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hasb.config import atomic_write_text
from hasb.cost import Budget, CostModel
from hasb.plots import plot_pareto, save_figure

from .evaluate import METRICS, EvalResult, Metric

PARETO_COLS = [
    "config_id",
    "bitops",
    "gbitops",
    "avg_bit_equivalent",
    "effective_bits",
    "size_bytes",
    "plain_avg_bits",
    "accuracy",
    "accuracy_se",
    "loss",
    "metric",
    "source",
    "sources",
    "on_front",
    "objective",
    "label",
    "config",
    "digest",
]
CAND_COLS = [
    "config_id",
    "source",
    "budget",
    "rank",
    "trial",
    "label",
    "pick_at",
    "bitops",
    "gbitops",
    "avg_bit_equivalent",
    "effective_bits",
    "size_bytes",
    "plain_avg_bits",
    "objective",
    "accuracy",
    "accuracy_se",
    "loss",
    "metric",
    "config",
    "digest",
]
TABLE_COLS = [
    "config_id",
    "gbitops",
    "avg_bit_equivalent",
    "effective_bits",
    "size_bytes",
    "accuracy",
    "accuracy_se",
    "on_front",
    "fits",
    "chosen",
    "pick_at",
    "source",
    "config",
    "digest",
]


def metric_cols(cols: Sequence[str], metric: Metric) -> list[str]:
    """A column list with ``accuracy``/``accuracy_se`` renamed to the metric's columns."""
    ren = {"accuracy": metric.name, "accuracy_se": metric.se_col}
    return [ren.get(c, c) for c in cols]


def table_metric(df: pd.DataFrame) -> Metric:
    """The metric of a candidate table (its ``metric`` column; accuracy for tables written before it)."""
    name = df["metric"].iloc[0] if "metric" in df and len(df) else "accuracy"
    return METRICS[str(name)]


def log(msg: str, progress: bool) -> None:
    """A progress line on stderr (silent with --quiet)."""
    if progress:
        print(msg, file=sys.stderr, flush=True)


def budget_dir_name(budgets: Sequence[Budget]) -> str:
    """Folder of one budget (set): ``budget-3.5``, ``budget-25GBOPs``, ``budget-5_size-20kB``, ``budget-3.5ebits``,
    ``budget-avg-bits-3``."""
    parts = []
    for b in budgets:
        if b.kind == "avg_bits":
            parts.append(f"{b.value:g}")
        elif b.kind == "bitops":
            parts.append(f"{b.limit / 1e9:.6g}GBOPs")
        elif b.kind == "size":
            parts.append(f"size-{b.limit / 1e3:.6g}kB")
        elif b.kind == "eff_bits":
            parts.append(f"{b.value:g}ebits")
        else:
            parts.append(f"avg-bits-{b.value:g}")
    return "budget-" + "_".join(parts)


@dataclass
class SplitInfo:
    """How a split was formed, for the one-line description next to every score of it."""

    split: str  # "validation" or "test"
    description: str  # e.g. "first 2000 of the 5000 images held out of fashion-mnist train (seed 0)"
    window_bytes: int | None = None  # language models: bytes per scored window (n counts windows)


def split_score(r: EvalResult, info: SplitInfo, *, selected_on: bool, n_candidates: int = 0) -> dict:
    """A SCORE of the config document (see search.export): the metric's value under its own name (``accuracy``
    or ``bits_per_byte``), ``metric``, its SE, size (``n``; for LMs also ``window_bytes``), split and role."""
    m = METRICS[r.metric]
    note = (
        f"selected on: the best of {n_candidates} configs scored on these {m.unit}, so optimistic"
        if selected_on
        else "held out: never used to select, scored once for the chosen config"
    )
    out = {
        "split": info.split,
        "description": info.description,
        "metric": m.name,
        "n": int(r.n),
        m.name: float(r.value),
        "se": float(r.se),
        "se_method": m.se_text,
        "loss": float(r.loss),
        "selected_on": selected_on,
        "note": note,
    }
    if m.name == "accuracy":
        out["correct"] = int(r.correct)
    if info.window_bytes is not None:
        out["window_bytes"] = int(info.window_bytes)
    return out


def fmt_score(sc: dict) -> str:
    """``76.50 ± 0.95 % (validation, n=2000)`` or ``2.4120 ± 0.0130 bits/byte (validation, n=80 windows × 64 B)``."""
    m = METRICS[sc.get("metric", "accuracy")]
    size = f"n={sc['n']}" + (f" windows × {sc['window_bytes']} B" if sc.get("window_bytes") else "")
    return f"{m.fmt(sc[m.name], sc['se'])} ({sc['split']}, {size})"


def write_shared(out: Path, cand: pd.DataFrame, uniq: pd.DataFrame) -> dict[str, Path]:
    """pareto.csv (one row per distinct config, with on_front) and candidates.csv (every (config, source) row)."""
    m = table_metric(uniq)
    u = uniq.copy()
    cols = metric_cols(PARETO_COLS, m)
    for c in cols:
        if c not in u:
            u[c] = np.nan
    ccols = metric_cols(CAND_COLS, m)
    paths = {
        "pareto_csv": atomic_write_text(out / "pareto.csv", u[cols].to_csv(index=False)),
        "candidates_csv": atomic_write_text(
            out / "candidates.csv", cand[[c for c in ccols if c in cand]].to_csv(index=False)
        ),
    }
    return paths


def write_table(folder: Path, uniq: pd.DataFrame) -> Path:
    """table.csv of one budget: every distinct config, whether it fits this budget and which one was chosen."""
    t = uniq.copy()
    cols = metric_cols(TABLE_COLS, table_metric(uniq))
    for c in cols:
        if c not in t:
            t[c] = np.nan
    return atomic_write_text(folder / "table.csv", t[cols].to_csv(index=False))


def plot(
    uniq: pd.DataFrame,
    best: Any,
    test: dict,
    budgets: Sequence[Budget],
    cost: CostModel,
    folder: Path,
    model_name: str,
    val: dict,
    metric: Metric = METRICS["accuracy"],
) -> tuple[Path, Path]:
    """pareto.png + pareto.svg (error bars: ±1 SE of the metric) via hasb.plots.plot_pareto."""
    bud = [b.limit for b in budgets if b.kind in ("avg_bits", "bitops")]
    chosen = {
        metric.name: float(best[metric.name]),
        "gbitops": float(best.gbitops),
        "label": "chosen (validation)",
        metric.se_col: float(best[metric.se_col]),
        f"test_{metric.name}": test[metric.name],
        "test_se": test["se"],
        "test_label": f"chosen, test (n={test['n']})",
    }
    short = {
        "avg_bits": "avg-bit ≤ {v:g}",
        "bitops": "≤ {g:.3g} GBitOPs",
        "size": "size ≤ {m:.3g} MB",
        "eff_bits": "effective bits ≤ {v:g}",
        "plain_avg": "plain avg bit ≤ {v:g}",
    }
    title = (
        f"{model_name}: {metric.label} vs BitOPs (budget: "
        + ", ".join(short[b.kind].format(v=b.value, g=b.limit / 1e9, m=b.limit / 1e6) for b in budgets)
        + ")"
    )
    fig = plot_pareto(
        uniq,
        chosen=chosen,
        budget_bitops=min(bud) if bud else None,
        avg_bits_fn=cost,
        title=title,
        accuracy_label=axis_label(metric, val),
        metric=metric.name,
        higher_is_better=metric.higher_is_better,
    )
    paths = save_figure(fig, [folder / "pareto.png", folder / "pareto.svg"])
    return paths[0], paths[1]


def axis_label(metric: Metric, sc: dict) -> str:
    """``accuracy [%] on validation (n=2000), ± 1 SE`` or ``bits per byte (validation, 80 windows × 64 bytes),
    ± 1 SE``."""
    if metric.percent:
        return f"{metric.label} [%] on {sc['split']} (n={sc['n']}), ± 1 SE"
    size = f"{sc['n']} windows × {sc['window_bytes']} bytes" if sc.get("window_bytes") else f"n={sc['n']}"
    return f"{metric.label} ({sc['split']}, {size}), ± 1 SE; lower is better"


def _table_rows(uniq: pd.DataFrame, best: Any, metric: Metric) -> list[str]:
    shown = uniq[uniq.on_front | (uniq.source == "uniform") | (uniq.digest == best.digest) | uniq.pick_at.notna()]
    head = "val acc % ± SE" if metric.percent else "val bits/byte ± SE"
    lines = [
        f"{'':1} {'config_id':10}  {'source':8} {'GBitOPs':>9} {'avg-bit':>7} {'eff-bit':>7} {'size kB':>8} "
        f"{head:>18} {'loss':>6}  {'front':5} {'fits':4}  config"
    ]
    for _, r in shown.iterrows():
        mark = "*" if r.digest == best.digest else " "
        src = r.label if isinstance(r.get("label"), str) else r.source
        v, se = float(r[metric.name]), float(r[metric.se_col])
        score = f"{100 * v:6.2f} ± {100 * se:4.2f}" if metric.percent else f"{v:7.4f} ± {se:6.4f}"
        pick = f"  (pick at {r.pick_at})" if isinstance(r.get("pick_at"), str) else ""
        eff = float(r.get("effective_bits", np.nan))
        lines.append(
            f"{mark} {r.config_id:10}  {src:8} {r.gbitops:9.4f} {r.avg_bit_equivalent:7.3f} {eff:7.3f} "
            f"{r.size_bytes / 1e3:8.1f} {score:>18} {r.loss:6.3f}  "
            f"{'yes' if r.on_front else '':5} {'yes' if r.fits else '':4}  {r.config}{pick}"
        )
    return lines


def monotone_note(uniq: pd.DataFrame, this_folder: str) -> str | None:
    """A line naming earlier picks (other budgets in this --out) that fit this budget: they were candidates here,
    so this pick scores at least as well on validation as each of them."""
    m = table_metric(uniq)
    prev = uniq[uniq.pick_at.notna() & (uniq.pick_at != this_folder) & uniq.fits]
    if prev.empty:
        return None
    what = ", ".join(f"{r.pick_at} ({r.config}, {m.short(float(r[m.name]))})" for _, r in prev.iterrows())
    return f"monotone: the pick at {what} fits this budget too and was a candidate here"


def print_table(
    uniq: pd.DataFrame,
    best: Any,
    summary: dict,
    budgets: Sequence[Budget],
    metric: Metric = METRICS["accuracy"],
    *,
    file=sys.stdout,
    quiet: bool = False,
) -> None:
    """The front, the uniform configs, earlier picks and the chosen config, then where everything went."""
    sc = summary["scores"]
    head = [
        f"{metric.label}: {sc['validation']['split']} split, {sc['validation']['description']}; "
        f"± = {metric.se_text}; BN {summary['bn']}"
    ]
    lines = head + _table_rows(uniq, best, metric) + [""]
    lines.append(
        f"budget: {'; '.join(b.describe() for b in budgets)}"
        + ("" if summary["budget_binds"] else "  (does not bind: every config fits)")
    )
    note = monotone_note(uniq, summary["folder_name"])
    if note:
        lines.append(note)
    c = summary["chosen"]
    lines.append(
        f"chosen (*): {c['config']}  {c['gbitops']:.4g} GBitOPs, average-bit equivalent "
        f"{c['avg_bit_equivalent']:.3f}, effective bits {c['effective_bits']:.3f}, {c['size_bytes'] / 1e3:.1f} kB "
        f"[{c['source']}]"
    )
    lines.append(f"  validation {fmt_score(sc['validation'])}: {sc['validation']['note']}")
    lines.append(f"  test       {fmt_score(sc['test'])}: {sc['test']['description']}; {sc['test']['note']}")
    p = summary["paths"]
    lines.append(f"plot:   {p['plot_png']}  (+ {Path(p['plot_svg']).name})")
    lines.append(f"config: {p['config']}  integer checkpoint: {p['integer_checkpoint']}")
    lines.append(
        f"table:  {p['pareto_csv']}  (all candidates: {Path(p['candidates_csv']).name}; this budget: {p['table_csv']})"
    )
    if quiet:
        lines = lines[-7:]
    print("\n".join(lines), file=file, flush=True)


__all__ = [
    "log",
    "budget_dir_name",
    "SplitInfo",
    "split_score",
    "fmt_score",
    "write_shared",
    "write_table",
    "plot",
    "print_table",
    "monotone_note",
    "metric_cols",
    "table_metric",
    "axis_label",
]
