"""Pure Pareto math on (cost ↓, accuracy ↑) points: the non-dominated mask, the front, the hypervolume."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def pareto_mask(bitops: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
    """Non-dominated points of (bitops ↓, accuracy ↑): [N] bool.

    A point is dominated when another has bitops ≤ and accuracy ≥ with at least one strict.
    Exact duplicates do not dominate each other (both stay on the front).
    """
    b = np.asarray(bitops, dtype=float)
    a = np.asarray(accuracy, dtype=float)
    n = len(b)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    order = np.lexsort((-a, b))  # bitops ascending, accuracy descending
    best_cheaper = -np.inf  # best accuracy among strictly cheaper points
    i = 0
    while i < n:
        j = i
        while j < n and b[order[j]] == b[order[i]]:
            j += 1
        grp = order[i:j]
        top = a[grp].max()  # within equal bitops only the most accurate survive
        for k in grp:
            keep[k] = a[k] == top and a[k] > best_cheaper
        best_cheaper = max(best_cheaper, top)
        i = j
    return keep


def hypervolume(cost: Sequence[float], accuracy: Sequence[float], ref_cost: float, ref_accuracy: float) -> float:
    """Area dominated by (cost ↓, accuracy ↑) points inside [min cost, ref_cost] × [ref_accuracy, max]: a float.

    Points costlier than ``ref_cost`` or less accurate than ``ref_accuracy`` add nothing.  Units: cost units ×
    accuracy units (divide by the box's area to normalise).  Compares fronts found with equal evaluation budgets.
    """
    c = np.asarray(cost, dtype=float)
    a = np.asarray(accuracy, dtype=float)
    keep = (c <= ref_cost) & (a >= ref_accuracy)
    c, a = c[keep], a[keep]
    if len(c) == 0:
        return 0.0
    order = np.argsort(c, kind="stable")
    c, a = c[order], np.maximum.accumulate(a[order])  # best accuracy at cost ≤ c
    widths = np.diff(np.append(c, ref_cost))
    return float(np.sum(widths * (a - ref_accuracy)))


def pareto_front(df: pd.DataFrame, x: str = "bitops", y: str = "accuracy") -> pd.DataFrame:
    """Rows of ``df`` on the front, sorted by ``x``."""
    m = pareto_mask(df[x].to_numpy(), df[y].to_numpy())
    return df[m].sort_values(x).reset_index(drop=True)


__all__ = ["pareto_mask", "pareto_front", "hypervolume"]
