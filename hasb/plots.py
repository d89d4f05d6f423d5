"""Figures for hasb's numbers: pure functions from DataFrames/dicts to a matplotlib ``Figure``.

Every function builds a ``matplotlib.figure.Figure`` directly (no pyplot), so it
holds no global state, works under any backend (the Agg canvas renders it) and
can be called from CLIs, tests and notebooks alike.  Figure sizes are
deterministic (``figure_size``), layouts are "constrained" so rotated labels are
never clipped, and ``save_figure`` writes PNG/SVG atomically.

Inputs follow the artifact contract (notes: sensitivity.json / pareto.csv /
metrics.csv); column names are listed in each docstring.  Units: traces are
dimensionless (loss curvature), BitOPs are shown in G (1e9) per sample, bits in bits.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

from .errors import HasbError

matplotlib.use("Agg", force=False)  # headless by default; an already chosen backend is kept

import numpy as np
import pandas as pd
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

__all__ = [
    "PlotError",
    "DPI",
    "figure_size",
    "bit_color",
    "save_figure",
    "figure_png_bytes",
    "plot_traces",
    "plot_omega_heatmap",
    "plot_spectral_density",
    "plot_bit_probabilities",
    "plot_bit_allocation",
    "plot_pareto",
    "plot_training_curves",
]

DPI = 100  # pixels per inch of saved PNGs (figure_size × DPI = pixel size)
_ROW_HEIGHT = 0.28  # inches per layer row in heatmaps
_COL_WIDTH = 0.36  # inches per layer in per-layer bar charts
NEG_COLOR = "#d62728"
POS_COLOR = "#1f77b4"
FIXED_COLOR = "#9e9e9e"

# One colour per bit everywhere (allocation, probabilities), so figures read together.
_BIT_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#e6b800", 5: "#8c564b", 6: "#2ca02c", 8: "#1f77b4", None: "#7f7f7f"}


class PlotError(HasbError):
    """Input a plot function cannot draw (missing columns, empty data, wrong shapes)."""


# ---------------------------------------------------------------------------------------------- helpers
def figure_size(kind: str, n: int = 0) -> tuple[float, float]:
    """Figure size in inches for a plot ``kind`` with ``n`` layers (or configs).

    Per-layer bar charts grow in width with the layer count so names stay readable;
    heatmaps grow in height.  Kinds: traces, omega, spectral, probabilities, allocation,
    pareto, training.
    """
    n = max(int(n), 1)
    if kind in ("traces", "probabilities"):  # + ~2 in for the legend outside the axes
        return (round(max(8.0, 3.6 + _COL_WIDTH * n), 2), 5.0)
    if kind == "allocation":
        return (round(max(8.0, 1.8 + _COL_WIDTH * n), 2), 7.5)
    if kind == "omega":
        return (7.0, round(max(3.5, 1.6 + _ROW_HEIGHT * n), 2))
    if kind == "spectral":
        return (8.0, 4.5)
    if kind == "pareto":
        return (8.0, 5.5)
    if kind == "training":
        return (11.0, 4.5)
    raise PlotError(
        f"unknown figure kind {kind!r}; accepted: traces, omega, spectral, probabilities, allocation, pareto, training"
    )


def bit_color(bit: int | None) -> str:
    """The colour used for ``bit`` in every figure (``None`` = fp)."""
    if bit in _BIT_COLORS:
        return _BIT_COLORS[bit]
    cmap = matplotlib.colormaps["viridis"]
    return mcolors.to_hex(cmap(min(max(int(bit), 1), 16) / 16.0))


def _bit_label(bit: int | None) -> str:
    return "fp" if bit is None else f"{bit}-bit"


def _parse_bit(b: Any) -> int | None:
    if b is None:
        return None
    if isinstance(b, str):
        s = b.strip().lower()
        if s in ("fp", "fp32", "float", "32", "none"):
            return None
        return int(float(s))
    if isinstance(b, float) and math.isnan(b):
        return None
    b = int(b)
    return None if b == 32 else b


def _bit_keyed(row: Mapping, layer: Any) -> dict:
    """{bit: value} with keys normalised (8, "8" → 8; "fp" → None), so JSON (str) and Python (int) keys agree."""
    try:
        return {_parse_bit(b): float(v) for b, v in dict(row).items()}
    except (TypeError, ValueError):
        raise PlotError(f"layer {layer!r}: expected {{bit: number}}, got {row!r}") from None


def _new_figure(size: tuple[float, float], ax: Axes | None = None) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


def _need_columns(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise PlotError(f"{what}: missing column(s) {missing}; got {list(df.columns)}")


def _layer_ticks(ax: Axes, names: Sequence[str], axis: str = "x") -> None:
    pos = np.arange(len(names))
    if axis == "x":
        ax.set_xticks(pos)
        # 45° keeps "layer2.0.conv1" legible without widening the figure further
        ax.set_xticklabels(names, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_xlim(-0.6, len(names) - 0.4)
    else:
        ax.set_yticks(pos)
        ax.set_yticklabels(names, fontsize=8)


def figure_png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """Render ``fig`` to PNG bytes of exactly ``figure_size × dpi`` pixels (no tight cropping)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def save_figure(fig: Figure, path: str | Path | Sequence[str | Path], dpi: int = DPI) -> list[Path]:
    """Write ``fig`` to one or more paths; format by suffix (``.png`` or ``.svg``), each atomically.

    The PNG has exactly ``fig.get_size_inches() × dpi`` pixels.  Returns the written paths.
    """
    from hasb import atomic_write_bytes  # the project's one atomic writer (temp file + rename)

    paths = [path] if isinstance(path, (str, Path)) else list(path)
    out = []
    for p in map(Path, paths):
        fmt = p.suffix.lower().lstrip(".")
        if fmt not in ("png", "svg"):
            raise PlotError(f"cannot save figure as {p.name!r}: accepted suffixes are .png and .svg")
        buf = io.BytesIO()
        fig.savefig(buf, format=fmt, dpi=dpi, facecolor="white")
        out.append(atomic_write_bytes(p, buf.getvalue()))
    return out


# ---------------------------------------------------------------------------------------------- traces
def plot_traces(
    df: pd.DataFrame, ax: Axes | None = None, log: bool = True, value: str = "trace", title: str | None = None
) -> Figure:
    """Per-layer Hessian trace with error bars of ± 1 standard error (SE), said so in the title and legend.

    Args:
        df: one row per layer in execution order; columns ``layer``, ``value`` (``trace`` or
            ``trace_per_param``) and ``stderr`` (1 SE of ``trace``); for ``trace_per_param`` the bar is
            ``stderr_per_param`` when present, else ``stderr / n_params`` (the same quantity); optional
            ``searchable`` (fixed layers are drawn grey).
        log: log y-axis.  Traces can be negative (indefinite Hessian blocks away from a
            minimum) or zero: |trace| is drawn, negative layers in red with hatching and a
            legend entry; zeros are marked on the axis floor.
        value: which column to plot.
    Returns the Figure (``ax.figure`` when ``ax`` is given).
    """
    if value not in ("trace", "trace_per_param"):
        raise PlotError(f"value must be 'trace' or 'trace_per_param', got {value!r}")
    if not isinstance(df, pd.DataFrame):
        df = pd.DataFrame(df)
    _need_columns(df, ["layer", value], "plot_traces")
    if df.empty:
        raise PlotError("plot_traces: no layers to plot")
    names = [str(x) for x in df["layer"]]
    v = df[value].to_numpy(dtype=float)
    se = df["stderr"].to_numpy(dtype=float) if "stderr" in df.columns else np.zeros_like(v)
    if value == "trace_per_param" and "stderr_per_param" in df.columns:
        se = df["stderr_per_param"].to_numpy(dtype=float)
    elif value == "trace_per_param" and "stderr" in df.columns:
        if "n_params" not in df.columns:
            raise PlotError("plot_traces: value='trace_per_param' needs column 'n_params' to scale 'stderr'")
        se = se / df["n_params"].to_numpy(dtype=float)
    se = np.nan_to_num(se, nan=0.0)
    searchable = df["searchable"].astype(bool).to_numpy() if "searchable" in df.columns else np.ones(len(v), bool)

    fig, ax = _new_figure(figure_size("traces", len(names)), ax)
    x = np.arange(len(names))
    mag = np.abs(v)
    neg = v < 0
    zero = mag == 0
    if log:
        pos_vals = mag[mag > 0]
        floor = (pos_vals.min() / 10.0) if pos_vals.size else 1e-12
        ax.set_yscale("log")
    else:
        floor = 0.0
    heights = np.where(zero, np.nan, mag)
    base_colors = np.where(searchable, POS_COLOR, FIXED_COLOR)
    face = [NEG_COLOR if n else c for n, c in zip(neg, base_colors, strict=False)]
    bars = ax.bar(
        x,
        np.nan_to_num(heights, nan=0.0) - (floor if log else 0.0),
        bottom=floor if log else 0.0,
        color=face,
        edgecolor="black",
        linewidth=0.4,
        width=0.75,
        zorder=2,
    )
    for b, n in zip(bars, neg, strict=False):
        if n:
            b.set_hatch("//")
    # Error bars: on a log axis the lower bar may cross zero; clip it to the floor instead of dropping it.
    lower = np.minimum(se, np.where(log, np.maximum(mag - floor * 1.0001, 0.0), mag))
    ok = ~zero
    ax.errorbar(
        x[ok],
        mag[ok],
        yerr=np.vstack([lower[ok], se[ok]]),
        fmt="none",
        ecolor="black",
        elinewidth=0.9,
        capsize=2.5,
        zorder=3,
    )
    if zero.any():
        ax.scatter(
            x[zero],
            np.full(zero.sum(), floor * (1.5 if log else 1.0) if log else 0.0),
            marker="x",
            color="black",
            zorder=4,
        )

    _layer_ticks(ax, names)
    unit = "Tr(H_l)" if value == "trace" else "Tr(H_l) / n_l"
    ax.set_ylabel(f"|{unit}|" + (" (log scale)" if log else "") + "  [loss curvature, unitless]")
    ax.set_xlabel("layer (execution order)")
    # one SE convention everywhere: the bars are ± 1 SE and both the title and the legend say so
    ax.set_title(
        (title or ("Per-layer Hessian trace" if value == "trace" else "Per-parameter Hessian trace"))
        + " (bars: ± 1 SE)"
    )
    ax.grid(axis="y", which="major", alpha=0.3, zorder=0)
    handles = [Patch(facecolor=POS_COLOR, edgecolor="black", label="trace > 0 (searchable)")]
    if (~searchable).any():
        handles.append(Patch(facecolor=FIXED_COLOR, edgecolor="black", label="fixed layer (not searched)"))
    if neg.any():
        handles.append(
            Patch(
                facecolor=NEG_COLOR,
                edgecolor="black",
                hatch="//",
                label=f"trace < 0: |trace| shown ({int(neg.sum())} layer{'s' if neg.sum() > 1 else ''})",
            )
        )
    if zero.any():
        handles.append(ax.scatter([], [], marker="x", color="black", label="trace = 0"))
    handles.append(
        matplotlib.lines.Line2D(
            [], [], color="black", marker="|", linestyle="none", markersize=10, label="± 1 SE (standard error)"
        )
    )
    # outside the axes: bars of any height can sit under an in-axes legend
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# ---------------------------------------------------------------------------------------------- omega
def _layer_bit_frame(
    data: Mapping[str, Mapping[Any, float]] | pd.DataFrame, value: str, what: str, descending: bool
) -> pd.DataFrame:
    """Layers × bits DataFrame (columns: bits) from {layer: {bit: x}}, a wide frame, or a long frame
    (layer, bit, ``value``).  ``what`` names the argument in errors."""
    if isinstance(data, pd.DataFrame):
        df = data.copy()
        if "layer" in df.columns:
            df = df.set_index("layer")
        if {"bit", value} <= set(df.columns):  # long form → wide
            df = df.reset_index().pivot(index="layer", columns="bit", values=value)
    elif isinstance(data, Mapping):
        if not data:
            raise PlotError(f"{what} is empty")
        df = pd.DataFrame.from_dict({k: _bit_keyed(v, k) for k, v in data.items()}, orient="index").loc[list(data)]
    else:
        raise PlotError(f"{what} must be a dict {{layer: {{bit: value}}}} or a DataFrame, got {type(data).__name__}")
    try:
        df.columns = [_parse_bit(c) for c in df.columns]
    except (TypeError, ValueError):
        raise PlotError(f"{what} columns must be bits (8, '6', 'fp'); got {list(df.columns)}") from None
    order = sorted(df.columns, key=lambda b: 99 if b is None else b, reverse=descending)
    return df[order].astype(float)


def plot_omega_heatmap(
    omega: Mapping[str, Mapping[Any, float]] | pd.DataFrame,
    ax: Axes | None = None,
    annotate: bool = True,
    title: str | None = None,
) -> Figure:
    """Heatmap of Ω_l(b) = (Tr(H_l)/n_l)·‖Q_b(W_l) − W_l‖² for layers (rows) × candidate bits (columns).

    Args:
        omega: ``{layer: {bit: value}}`` (bits as int or str) or a DataFrame indexed by layer
            (or with a ``layer`` column) whose columns are bits; long form
            (``layer, bit, omega``) is accepted too.
        annotate: print each value in its cell.
    Colour is log-scaled.  Non-positive cells (from negative traces) cannot sit on a log scale:
    they are shown hatched grey and labelled "≤0".
    """
    df = _layer_bit_frame(omega, "omega", "plot_omega_heatmap: omega", descending=True)
    if df.empty:
        raise PlotError("plot_omega_heatmap: no layers")
    vals = df.to_numpy(dtype=float)
    posv = vals[np.isfinite(vals) & (vals > 0)]
    fig, ax = _new_figure(figure_size("omega", len(df)), ax)
    if posv.size == 0:
        raise PlotError("plot_omega_heatmap: no positive Ω value to put on a log colour scale")
    vmin, vmax = float(posv.min()), float(posv.max())
    if vmin == vmax:
        vmin, vmax = vmin / 10, vmax * 10
    masked = np.ma.masked_where(~(np.isfinite(vals) & (vals > 0)), vals)
    ax.set_facecolor("#dddddd")
    im = ax.imshow(
        masked, aspect="auto", cmap="magma_r", norm=mcolors.LogNorm(vmin=vmin, vmax=vmax), interpolation="nearest"
    )
    ax.set_xticks(np.arange(df.shape[1]))
    ax.set_xticklabels([_bit_label(b) for b in df.columns])
    _layer_ticks(ax, [str(i) for i in df.index], axis="y")
    ax.set_xlabel("candidate bit-width b (weights = activations)  [bits]")
    ax.set_ylabel("layer (execution order)")
    ax.set_title(title or "Hessian-weighted quantization perturbation Ω_l(b)")
    cb = fig.colorbar(im, ax=ax, shrink=0.9)
    cb.set_label("Ω_l(b) = (Tr H_l / n_l) · ‖Q_b(W_l) − W_l‖²  (log scale)")
    if annotate:
        norm = mcolors.LogNorm(vmin=vmin, vmax=vmax)
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                v = vals[i, j]
                if not np.isfinite(v):
                    continue
                if v <= 0:
                    ax.text(j, i, "≤0", ha="center", va="center", fontsize=7, color="black")
                    continue
                dark = norm(v) > 0.55  # light text on dark cells
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    return fig


# ---------------------------------------------------------------------------------------------- spectrum
def plot_spectral_density(
    grid: Sequence[float],
    density: Sequence[float],
    eigenvalues: Sequence[float] | None = None,
    ax: Axes | None = None,
    log: bool = True,
    top_k: int = 5,
    title: str | None = None,
) -> Figure:
    """Eigenvalue spectral density of the Hessian (stochastic Lanczos quadrature) with top eigenvalues marked.

    Args:
        grid: eigenvalue grid λ, shape [G].
        density: density values on ``grid``, shape [G] (integrates to 1).
        eigenvalues: optional top eigenvalues (any order); the ``top_k`` largest are drawn as
            vertical lines and labelled λ1, λ2, ….
        log: log-scaled density axis (ESDs span many orders of magnitude).
    """
    g = np.asarray(grid, dtype=float).ravel()
    d = np.asarray(density, dtype=float).ravel()
    if g.size == 0 or g.shape != d.shape:
        raise PlotError(
            f"plot_spectral_density: grid and density must be non-empty and of equal length, got {g.size} and {d.size}"
        )
    fig, ax = _new_figure(figure_size("spectral"), ax)
    if log:
        posd = d[d > 0]
        if posd.size == 0:
            raise PlotError("plot_spectral_density: density has no positive value to draw on a log axis")
        # Gaussian-broadened SLQ tails decay to 1e-30 and below; 12 decades under the peak keep the plot readable.
        floor = max(posd.min(), posd.max() * 1e-12)
        ax.set_yscale("log")
        ax.plot(g, np.maximum(d, floor), color=POS_COLOR, linewidth=1.4, label="spectral density (SLQ)")
        ax.fill_between(g, floor, np.maximum(d, floor), color=POS_COLOR, alpha=0.2)
    else:
        ax.plot(g, d, color=POS_COLOR, linewidth=1.4, label="spectral density (SLQ)")
        ax.fill_between(g, 0, d, color=POS_COLOR, alpha=0.2)
    if eigenvalues is not None and len(eigenvalues):
        ev = np.sort(np.asarray(eigenvalues, dtype=float))[::-1][:top_k]
        ymax = ax.get_ylim()[1]
        for i, e in enumerate(ev):
            ax.axvline(
                e,
                color=NEG_COLOR,
                linestyle="--",
                linewidth=1.0,
                alpha=0.8,
                label="top eigenvalues (Lanczos)" if i == 0 else None,
            )
        # Label only the largest few and stagger heights: close eigenvalues would otherwise overlap.
        for i, e in enumerate(ev[:3]):
            ax.annotate(
                f"λ{i + 1}={e:.3g}",
                xy=(e, ymax),
                xytext=(-4, -12 - 12 * i),
                textcoords="offset points",
                ha="right",
                va="top",
                fontsize=8,
                color=NEG_COLOR,
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.9),
            )
    ax.set_xlabel("eigenvalue λ of the loss Hessian  [loss curvature, unitless]")
    ax.set_ylabel("density" + (" (log scale)" if log else ""))
    ax.set_title(title or "Hessian eigenvalue spectral density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


# ---------------------------------------------------------------------------------------------- probabilities
def plot_bit_probabilities(
    probs: Mapping[str, Mapping[Any, float]] | pd.DataFrame,
    ax: Axes | None = None,
    sensitive: Iterable[str] | None = None,
    title: str | None = None,
) -> Figure:
    """HASB bit-switching probabilities per layer as stacked bars (each bar sums to 1).

    Args:
        probs: ``{layer: {bit: p}}`` or a DataFrame (layers × bits, or long form ``layer, bit, p``).
        sensitive: optional layer names the sampler classed as sensitive (t_l ≥ mean); their
            tick labels are bold.
    The expected bit per layer (Σ b·p) is drawn as a black marker on a right-hand axis in bits.
    """
    df = _layer_bit_frame(probs, "p", "plot_bit_probabilities: probs", descending=False).fillna(0.0)
    sums = df.sum(axis=1).to_numpy()
    if not np.allclose(sums, 1.0, atol=1e-3):
        bad = df.index[np.argmax(np.abs(sums - 1))]
        raise PlotError(
            f"plot_bit_probabilities: probabilities of layer {bad!r} sum to "
            f"{sums[np.argmax(np.abs(sums - 1))]:.4g}, expected 1"
        )
    names = [str(i) for i in df.index]
    fig, ax = _new_figure(figure_size("probabilities", len(names)), ax)
    x = np.arange(len(names))
    bottom = np.zeros(len(names))
    for b in df.columns:
        p = df[b].to_numpy()
        ax.bar(
            x, p, bottom=bottom, color=bit_color(b), edgecolor="white", linewidth=0.5, width=0.75, label=_bit_label(b)
        )
        bottom += p
    _layer_ticks(ax, names)
    if sensitive is not None:
        sens = set(sensitive)
        for t, n in zip(ax.get_xticklabels(), names, strict=False):
            if n in sens:
                t.set_fontweight("bold")
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability of drawing bit b")
    ax.set_xlabel("layer (execution order)" + ("; bold = sensitive (t_l ≥ mean)" if sensitive is not None else ""))
    bits = np.array([32 if b is None else b for b in df.columns], dtype=float)
    expected = df.to_numpy() @ bits
    ax2 = ax.twinx()
    ax2.plot(x, expected, "o", color="black", markersize=4, label="expected bit Σ b·p")
    ax2.set_ylabel("expected bit  [bits]")
    ax2.set_ylim(0, max(bits.max(), expected.max()) * 1.05)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(
        h1[::-1] + h2,
        l1[::-1] + l2,
        fontsize=8,
        title="bit (W = A)",
        title_fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.07, 1.0),
    )
    ax.set_title(title or "HASB bit-switching probabilities per layer")
    return fig


# ---------------------------------------------------------------------------------------------- allocation
def _config_pairs(cfg: Any) -> dict[str, tuple[int | None, int | None]]:
    if hasattr(cfg, "layers") and isinstance(cfg.layers, Mapping):  # hasb.BitConfig
        cfg = cfg.layers
    if not isinstance(cfg, Mapping):
        raise PlotError(f"a config must be a BitConfig or {{layer: (w, a)}}, got {type(cfg).__name__}")
    out = {}
    for n, wb in cfg.items():
        if isinstance(wb, Mapping):
            wb = (wb.get("w_bits"), wb.get("a_bits"))
        if isinstance(wb, (int, str)) or wb is None:
            wb = (wb, wb)
        w, a = wb
        out[str(n)] = (_parse_bit(w), _parse_bit(a))
    return out


def plot_bit_allocation(configs: Mapping[str, Any], macs: Any, title: str | None = None) -> Figure:
    """Chosen bits per layer for one or more budgets, and each layer's share of the config's BitOPs.

    Args:
        configs: ``{label: BitConfig or {layer: (w_bits, a_bits)}}``, e.g. one entry per budget
            (``"3.5 avg bits"``).  Bits may be ints or ``"fp"``.
        macs: ``{layer: MACs per sample}`` or a ``hasb.CostModel`` (whose fixed layers then
            count in the BitOPs total).  Layer order follows ``macs``.
    Top panel: weight bits per layer (bar colour = bit; one hatch per config); activation bits,
    where they differ, as ◆ markers.  Bottom panel: share (%) of the config's total BitOPs per layer
    (BitOPs = MACs · b_w · b_a via ``hasb.cost.layer_bitops``).
    """
    from hasb.cost import layer_bitops  # the one home of the BitOPs formula

    if not isinstance(configs, Mapping) or not configs:
        raise PlotError("plot_bit_allocation: configs must be a non-empty {label: config} dict")
    pairs = {str(k): _config_pairs(v) for k, v in configs.items()}
    fixed_total = 0.0
    if hasattr(macs, "layers") and hasattr(macs, "fixed_bitops"):  # a CostModel
        order = [l.name for l in macs.layers]
        mac = {l.name: float(l.macs) for l in macs.layers}
        fixed_total = float(macs.fixed_bitops())
        fixed_names = {l.name for l in macs.layers if not l.searchable}
    elif isinstance(macs, Mapping):
        order = list(macs)
        mac = {str(k): float(v) for k, v in macs.items()}
        fixed_names = set()
    else:
        raise PlotError(f"macs must be {{layer: MACs}} or a hasb.CostModel, got {type(macs).__name__}")
    in_any = set().union(*[set(p) for p in pairs.values()])
    names = [n for n in order if n in in_any and n not in fixed_names]
    unknown = sorted(in_any - set(mac))
    if unknown:
        raise PlotError(f"plot_bit_allocation: no MACs for layer(s) {unknown[:3]}; layers with MACs: {order[:4]}...")
    if not names:
        raise PlotError("plot_bit_allocation: the configs share no layer with macs")

    n_cfg = len(pairs)
    fig = Figure(figsize=figure_size("allocation", len(names)), dpi=DPI, layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [1.2, 1.0]})
    x = np.arange(len(names))
    width = 0.8 / n_cfg
    hatches = ["", "//", "..", "xx", "\\\\", "++"]
    used_bits: set = set()
    any_act = False
    for k, (label, cfg) in enumerate(pairs.items()):
        off = (k - (n_cfg - 1) / 2) * width
        w = [cfg.get(n, (None, None))[0] if n in cfg else np.nan for n in names]
        a = [cfg.get(n, (None, None))[1] if n in cfg else np.nan for n in names]
        heights = [np.nan if n not in cfg else (32 if wb is None else wb) for n, wb in zip(names, w, strict=False)]
        cols = [bit_color(wb) if n in cfg else "white" for n, wb in zip(names, w, strict=False)]
        used_bits.update(wb for n, wb in zip(names, w, strict=False) if n in cfg)
        ax.bar(
            x + off,
            np.nan_to_num(heights),
            width=width,
            color=cols,
            edgecolor="black",
            linewidth=0.4,
            hatch=hatches[k % len(hatches)],
        )
        diff = [(i, ab) for i, (n, wb, ab) in enumerate(zip(names, w, a, strict=False)) if n in cfg and ab != wb]
        if diff:
            any_act = True
            ax.scatter(
                [x[i] + off for i, _ in diff],
                [32 if ab is None else ab for _, ab in diff],
                marker="D",
                s=14,
                color="black",
                zorder=4,
            )
        total = fixed_total + sum(layer_bitops(mac[n], *cfg[n]) for n in cfg if n in mac and n not in fixed_names)
        share = [100.0 * layer_bitops(mac[n], *cfg[n]) / total if n in cfg else 0.0 for n in names]
        ax2.bar(
            x + off,
            share,
            width=width,
            color="#4c72b0",
            alpha=0.35 + 0.65 * (k + 1) / n_cfg,
            edgecolor="black",
            linewidth=0.4,
            hatch=hatches[k % len(hatches)],
            label=f"{label}  ({total / 1e9:.3g} GBitOPs)",
        )
    # the full 0..8 (or higher) scale even when a config uses only low bits, so heights compare across figures
    maxbit = max([32 if b is None else b for b in used_bits] + [8])
    ax.set_ylim(0, maxbit * 1.1)
    ticks = sorted(
        {32 if b is None else b for b in used_bits} | {2, 4, 6, 8}
        if maxbit <= 8
        else {32 if b is None else b for b in used_bits}
    )
    ax.set_yticks(ticks)
    ax.set_ylabel("weight bits  [bits]")
    ax.set_title(title or "Bit allocation per layer")
    ax.grid(axis="y", alpha=0.3)
    bit_handles = [
        Patch(facecolor=bit_color(b), edgecolor="black", label=_bit_label(b))
        for b in sorted(used_bits, key=lambda b: 99 if b is None else b, reverse=True)
    ]
    if any_act:
        bit_handles.append(
            matplotlib.lines.Line2D(
                [], [], marker="D", color="black", linestyle="none", markersize=4, label="activation bits (≠ weight)"
            )
        )
    ax.legend(
        handles=bit_handles, fontsize=8, title="bit", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0)
    )
    ax2.set_ylabel("share of config BitOPs  [%]")
    ax2.set_xlabel("layer (execution order; MACs per sample from the cost model)")
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8, title="config (hatch)", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _layer_ticks(ax2, names)
    return fig


# ---------------------------------------------------------------------------------------------- pareto
_SOURCE_STYLE = {"ilp": ("#1f77b4", "o"), "optuna": ("#ff7f0e", "^"), "uniform": ("black", "s")}


def _gbitops(df: pd.DataFrame, what: str) -> np.ndarray:
    if "gbitops" in df.columns:
        return df["gbitops"].to_numpy(dtype=float)
    if "bitops" in df.columns:
        return df["bitops"].to_numpy(dtype=float) / 1e9
    raise PlotError(f"plot_pareto: {what} needs a 'gbitops' or 'bitops' column; got {list(df.columns)}")


def _acc_scale(*frames: pd.DataFrame | None) -> float:
    """Accuracies in [0, 1] are shown in percent; ones already in percent are left alone."""
    vals = [f["accuracy"].to_numpy(dtype=float) for f in frames if f is not None and len(f)]
    if not vals:
        return 100.0
    return 100.0 if np.nanmax(np.concatenate(vals)) <= 1.0 + 1e-9 else 1.0


def _uniform_label(row: Mapping) -> str:
    for key in ("label", "name"):
        if key in row and isinstance(row[key], str) and row[key]:
            return row[key]
    cfg = row.get("config")
    if isinstance(cfg, str) and cfg:
        parts = re.split(r"[-|]", cfg.replace("w", "").replace("a", ""))
        if len(set(parts)) == 1:
            return f"w{parts[0]}a{parts[0]}"
    if "avg_bit_equivalent" in row and np.isfinite(row["avg_bit_equivalent"]):
        b = row["avg_bit_equivalent"]
        return f"w{b:.3g}a{b:.3g}"
    return "uniform"


def _avg_funcs(avg_bits_fn: Any) -> tuple[Callable, Callable] | None:
    """(G BitOPs → avg bits, avg bits → G BitOPs), vectorised, from a CostModel or a (fwd, inv) pair on BitOPs."""
    if avg_bits_fn is None:
        return None
    if hasattr(avg_bits_fn, "bitops_to_avg_bits") and hasattr(avg_bits_fn, "uniform_bitops"):
        fwd, inv = avg_bits_fn.bitops_to_avg_bits, avg_bits_fn.uniform_bitops
    elif isinstance(avg_bits_fn, (tuple, list)) and len(avg_bits_fn) == 2 and all(map(callable, avg_bits_fn)):
        fwd, inv = avg_bits_fn
    else:
        raise PlotError("avg_bits_fn must be a hasb.CostModel or a pair (bitops → avg bits, avg bits → bitops)")

    def g_to_bits(g):
        g = np.asarray(g, dtype=float)
        return np.vectorize(lambda v: fwd(max(v, 0.0) * 1e9) if np.isfinite(v) else np.nan, otypes=[float])(g)

    def bits_to_g(b):
        b = np.asarray(b, dtype=float)
        return np.vectorize(lambda v: inv(max(v, 0.0)) / 1e9 if np.isfinite(v) else np.nan, otypes=[float])(b)

    return g_to_bits, bits_to_g


def plot_pareto(
    points_df: pd.DataFrame,
    front_df: pd.DataFrame | None = None,
    uniform_df: pd.DataFrame | None = None,
    chosen: Mapping[str, Any] | None = None,
    budget_bitops: float | None = None,
    avg_bits_fn: Any = None,
    ax: Axes | None = None,
    title: str | None = None,
    accuracy_label: str | None = None,
    metric: str = "accuracy",
    higher_is_better: bool = True,
) -> Figure:
    """A score (accuracy, or another metric such as bits per byte) vs BitOPs: all evaluated configs, the
    non-dominated front, uniform configs, the chosen one.

    Args:
        points_df: evaluated configs; columns ``accuracy`` (fraction or %) and ``gbitops`` or
            ``bitops``; optional ``source`` (ilp / optuna / uniform: colour and marker) and
            ``on_front``.  Uniform rows are taken from here when ``uniform_df`` is None.
        front_df: the front (default: rows of ``points_df`` with ``on_front`` true), drawn as a step line.
        uniform_df: uniform configs, labelled ``w8a8`` … (from ``label``/``config`` columns or the
            average-bit equivalent).
        chosen: the picked config, a mapping with ``accuracy`` and ``gbitops``/``bitops`` (optional ``label``,
            ``accuracy_se``, and its held-out score ``test_accuracy``/``test_se``/``test_label``, drawn beside it).
        budget_bitops: the budget in BitOPs (not G); drawn as a vertical line.
        avg_bits_fn: ``hasb.CostModel`` or ``(bitops → avg bits, avg bits → bitops)``; adds a top axis
            in average-bit equivalent.
        accuracy_label: y-axis label naming the split and size (default ``accuracy [%]`` / the metric's name).
        metric: the score column (``accuracy``, shown in %; any other, e.g. ``bits_per_byte``, shown as is); every
            ``accuracy`` key above then reads ``<metric>`` (``<metric>_se``, ``test_<metric>`` in ``chosen``).
        higher_is_better: direction of the metric (False for bits per byte); the legend says it.
    A ``<metric>_se`` column (same units as the metric) draws ±1 SE error bars on every point.
    """
    if not isinstance(points_df, pd.DataFrame):
        points_df = pd.DataFrame(points_df)
    ycol, se_col = metric, f"{metric}_se"
    _need_columns(points_df, [ycol], "plot_pareto points")
    if points_df.empty:
        raise PlotError("plot_pareto: no points to plot")
    if uniform_df is None and "source" in points_df.columns:
        uniform_df = points_df[points_df["source"] == "uniform"]
    if front_df is None and "on_front" in points_df.columns:
        front_df = points_df[points_df["on_front"].astype(str).str.lower().isin(["true", "1"])]
    scale = _acc_scale(points_df, front_df, uniform_df) if ycol == "accuracy" else 1.0
    unit = "%" if ycol == "accuracy" else ""
    fig, ax = _new_figure(figure_size("pareto"), ax)

    x = _gbitops(points_df, "points_df")
    y = points_df[ycol].to_numpy(dtype=float) * scale
    src = points_df["source"].astype(str).to_numpy() if "source" in points_df.columns else np.full(len(x), "config")
    if se_col in points_df.columns:
        ax.errorbar(
            x,
            y,
            yerr=points_df[se_col].to_numpy(dtype=float) * scale,
            fmt="none",
            ecolor="#7f7f7f",
            elinewidth=0.7,
            alpha=0.5,
            zorder=1,
        )
    for s in dict.fromkeys(src):
        if s == "uniform":
            continue  # drawn below with labels
        m = src == s
        col, mk = _SOURCE_STYLE.get(s, ("#7f7f7f", "o"))
        ax.scatter(
            x[m],
            y[m],
            s=18,
            color=col,
            marker=mk,
            alpha=0.55,
            linewidths=0,
            label=f"{s} configs ({int(m.sum())})",
            zorder=2,
        )
    if front_df is not None and len(front_df):
        fx = _gbitops(front_df, "front_df")
        fy = front_df[ycol].to_numpy(dtype=float) * scale
        o = np.argsort(fx)
        front_label = "Pareto front" + ("" if higher_is_better else " (lower is better)")
        ax.step(fx[o], fy[o], where="post", color="#2ca02c", linewidth=1.8, label=front_label, zorder=3)
        ax.scatter(fx[o], fy[o], s=22, color="#2ca02c", zorder=3)
    if uniform_df is not None and len(uniform_df):
        ux = _gbitops(uniform_df, "uniform_df")
        uy = uniform_df[ycol].to_numpy(dtype=float) * scale
        ax.scatter(
            ux,
            uy,
            s=46,
            marker="s",
            facecolor="white",
            edgecolor="black",
            linewidths=1.3,
            label="uniform configs",
            zorder=4,
        )
        order = np.argsort(ux)
        for rank, i in enumerate(order):
            # alternate above/below: neighbouring uniform points (w2a2, w3a3) sit close in BitOPs
            dy = 9 if rank % 2 == 0 else -13
            ax.annotate(
                _uniform_label(uniform_df.iloc[i].to_dict()),
                xy=(ux[i], uy[i]),
                xytext=(0, dy),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                zorder=5,
                bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8),
            )
    funcs = _avg_funcs(avg_bits_fn)
    if budget_bitops is not None and np.isfinite(budget_bitops):
        blab = f"budget {budget_bitops / 1e9:.3g} GBitOPs"
        if funcs is not None:
            blab += f" (= {float(funcs[0](budget_bitops / 1e9)):.3g} avg bits)"
        ax.axvline(budget_bitops / 1e9, color="#9467bd", linestyle="--", linewidth=1.3, label=blab, zorder=1)
    if chosen is not None:
        cdf = pd.DataFrame([dict(chosen)])
        cx = float(_gbitops(cdf, "chosen")[0])
        cy = float(cdf[ycol].iloc[0]) * scale
        lab = chosen.get("label") or "chosen config"
        ax.scatter(
            [cx],
            [cy],
            s=240,
            marker="*",
            color="gold",
            edgecolor="black",
            linewidths=1.0,
            zorder=6,
            label=f"{lab}: {_fmt_score(cy, unit)} @ {cx:.3g} GBitOPs",
        )
        _chosen_error_bars(ax, chosen, cx, cy, scale, ycol, unit)
    ax.set_xlabel("BitOPs per sample  [GBitOPs = 10⁹ bit-operations]")
    ax.set_ylabel(accuracy_label or ("accuracy  [%]" if ycol == "accuracy" else ycol.replace("_", " ")))
    ax.set_title(title or f"{ycol.replace('_', ' ').capitalize()} vs BitOPs", pad=10)
    ax.grid(alpha=0.3)
    if funcs is not None:
        sec = ax.secondary_xaxis("top", functions=funcs)
        sec.set_xlabel("average-bit equivalent  [bits]")
    ax.legend(fontsize=8, loc="best", framealpha=0.9)  # "best": fronts differ in shape run to run
    return fig


def _fmt_score(v: float, unit: str) -> str:
    return f"{v:.2f}{unit}" if unit else f"{v:.4g}"


def _chosen_error_bars(
    ax: Axes, chosen: Mapping[str, Any], cx: float, cy: float, scale: float, col: str = "accuracy", unit: str = "%"
) -> None:
    """±1 SE of the chosen config's score, and its held-out (test) score beside it when given."""
    if chosen.get(f"{col}_se") is not None:
        ax.errorbar(
            [cx],
            [cy],
            yerr=[float(chosen[f"{col}_se"]) * scale],
            fmt="none",
            ecolor="black",
            elinewidth=1.2,
            capsize=3,
            zorder=6,
        )
    if chosen.get(f"test_{col}") is not None:
        ty = float(chosen[f"test_{col}"]) * scale
        ax.errorbar(
            [cx],
            [ty],
            yerr=[float(chosen.get("test_se") or 0.0) * scale],
            fmt="D",
            color="#d62728",
            markersize=6,
            capsize=3,
            zorder=6,
            label=f"{chosen.get('test_label') or 'chosen, held-out test'}: {_fmt_score(ty, unit)}",
        )


# ---------------------------------------------------------------------------------------------- training
def plot_training_curves(metrics: pd.DataFrame, title: str | None = None) -> Figure:
    """Per-epoch training curves: the validation metric per bit and the loss.

    Args:
        metrics: one row per epoch; column ``epoch``, the metric per config: ``acc_w8a8``… (accuracy, fraction
            or %) or ``bpb_w8afp``… (bits per byte, language models; ``bpb_fp`` for the float stage), optional
            ``loss`` and ``lr*`` columns (learning rate per group, drawn log-scaled).
    """
    if not isinstance(metrics, pd.DataFrame):
        metrics = pd.DataFrame(metrics)
    _need_columns(metrics, ["epoch"], "plot_training_curves")
    prefix = "bpb_" if any(str(c).startswith("bpb_") for c in metrics.columns) else "acc_"
    acc_cols = [c for c in metrics.columns if str(c).startswith(prefix)]
    if metrics.empty or not acc_cols:
        raise PlotError(f"plot_training_curves: need rows and acc_* or bpb_* columns; got {list(metrics.columns)}")
    fig = Figure(figsize=figure_size("training"), dpi=DPI, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    ep = metrics["epoch"].to_numpy(dtype=float)
    is_acc = prefix == "acc_"
    scale = 100.0 if is_acc and np.nanmax(metrics[acc_cols].to_numpy(dtype=float)) <= 1.0 + 1e-9 else 1.0

    def bit_of(c: str) -> int | None:
        m = re.search(r"w(\d+|fp)a", c)
        return _parse_bit(m.group(1)) if m else None

    for c in sorted(acc_cols, key=lambda c: -(bit_of(c) or 99)):
        b = bit_of(c)
        ax1.plot(
            ep,
            metrics[c].to_numpy(dtype=float) * scale,
            marker="o",
            markersize=3,
            color=bit_color(b) if b is not None else None,
            label=c.replace(prefix, ""),
        )
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("validation accuracy  [%]" if is_acc else "validation bits per byte  (lower is better)")
    ax1.set_title(("Accuracy" if is_acc else "Bits per byte") + " per bit-width")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8, title="config", title_fontsize=8)
    if "loss" in metrics.columns:
        ax2.plot(
            ep, metrics["loss"].to_numpy(dtype=float), color="black", marker="o", markersize=3, label="training loss"
        )
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("loss  [cross-entropy, nats]" if is_acc else "loss  [cross-entropy, nats per byte]")
    ax2.set_title("Loss and learning rates")
    ax2.grid(alpha=0.3)
    lr_cols = [c for c in metrics.columns if str(c).startswith("lr")]
    h, l = ax2.get_legend_handles_labels()
    if lr_cols:
        ax3 = ax2.twinx()
        for c in lr_cols:
            vals = metrics[c].to_numpy(dtype=float)
            if np.all(~np.isfinite(vals) | (vals <= 0)):
                continue
            ax3.plot(ep, vals, linestyle="--", linewidth=1.0, label=c)
        ax3.set_yscale("log")
        ax3.set_ylabel("learning rate (log scale)")
        h3, l3 = ax3.get_legend_handles_labels()
        h, l = h + h3, l + l3
    if h:
        # outside the axes: several learning-rate lines can coincide with the loss curve anywhere
        fig.legend(h, l, fontsize=7, loc="outside right upper")
    for a in (ax1, ax2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or "Training curves")
    return fig
