"""Developer tool (not installed): generate ``reports/sensitivity.ipynb`` (nbformat v4) from the cell texts below.

Run ``python tools/make_notebook.py`` from the repository root after editing; the notebook is committed so users
can open it directly, and ``tests/test_reports_build.py`` checks that the committed file is exactly what this
script writes.  Cell ids are their position (``cell-00`` …), so regenerating an unchanged notebook changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "reports" / "sensitivity.ipynb"

# Section headings; tests check every one appears in the HTML.
SECTIONS = {
    "artifacts": "Artifacts in this run",
    "traces": "1. Per-layer Hessian traces",
    "omega": "2. Quantization perturbation Ω_l(b)",
    "spectral_density": "3. Hessian eigenvalue spectral density",
    "bit_probabilities": "4. HASB bit-switching probabilities",
    "training": "5. Training curves",
    "pareto": "6. Accuracy (or bits per byte) vs BitOPs: the Pareto front",
    "bit_allocation": "7. Bit allocation of the chosen configs",
}
# Figures each section writes into report_figures/ (name → file stem).
FIGURES = {
    "traces": ["traces"],
    "omega": ["omega"],
    "spectral_density": ["spectral_density"],
    "bit_probabilities": ["bit_probabilities"],
    "training": ["training_multi", "training_supernet"],
    "pareto": ["pareto"],
    "bit_allocation": ["bit_allocation"],
}


# The cells in order: (kind, source[, tags]); md = markdown, code = code.
CELLS = [
    (
        "md",
        """
# hasb sensitivity report

This notebook reads what hasb's commands wrote into one run directory — Hessian sensitivity
(`python -m analysis.sensitivity`), training metrics (`python -m hasb.train`) and the bit search
(`python -m search.pareto`) — and draws them.  It recomputes nothing.  Build it headless with

    python -m reports.build --run runs/demo

(`runs/demo/report.html`, figures in `runs/demo/report_figures/`).

Each section checks for its own artifact; a missing one is named together with the command that makes it,
and the remaining sections still render.
""",
    ),
    (
        "code",
        """
# Parameters (reports.build injects a cell after this one, like papermill)
run_dir = "runs/demo"
fig_dir = None   # where figures are saved as PNG; None = only display
budget = None    # which RUN/budget-<B>/ search folder to show; None = the newest
""",
        ["parameters"],
    ),
    (
        "code",
        """
import pandas as pd
from IPython.display import Markdown, display

from reports.artifacts import Run, chosen_scores, config_from_record, pareto_view
from reports.nbtools import Report
from reports.plots import (
    plot_bit_allocation,
    plot_bit_probabilities,
    plot_omega_heatmap,
    plot_pareto,
    plot_spectral_density,
    plot_traces,
    plot_training_curves,
)

pd.set_option("display.precision", 4)
run = Run.open(run_dir, budget)
report = Report(fig_dir)
print("run directory:", run.root.resolve())
print("search outputs from:", run.search_dir())
""",
    ),
    (
        "md",
        f"## {SECTIONS['artifacts']}\n\nWhich files of the artifact contract this run holds, and the command "
        "that makes each.",
    ),
    (
        "code",
        """
with report.section("artifacts"):
    display(run.inventory())
""",
    ),
    (
        "md",
        f"""
## {SECTIONS["traces"]}

**How to read it.** Each bar is the trace of the loss Hessian restricted to one layer's weights, Tr(H_l),
estimated by Hutchinson probes; the whisker is the standard error of that estimate (the legend says how many).  A taller bar means the loss
curves more sharply along that layer's weights, so quantization noise there costs more accuracy.  The y-axis is
logarithmic: layers differ by orders of magnitude.  Red hatched bars are **negative** traces (the Hessian block is
indefinite away from a minimum) drawn as |trace|; treat them as "flat or unreliable", not "very sensitive".
Grey bars are layers kept at a fixed precision (first/last), which the search does not change.
""",
    ),
    (
        "code",
        """
with report.section("traces"):
    tr = run.traces()
    report.show(plot_traces(tr), "traces")
    neg = run.sensitivity().get("negative_traces") or list(tr.loc[tr["trace"] < 0, "layer"])
    if neg:
        print("negative traces:", ", ".join(neg))
    if "n_params" in tr:   # the per-parameter trace beside its own SE, not the SE of the layer's total
        tr["stderr_per_param"] = tr["stderr"] / tr["n_params"]
    cols = [c for c in ("layer", "n_params", "trace", "stderr", "trace_per_param", "stderr_per_param", "n_hvp",
                        "searchable") if c in tr]
    display(tr[cols])
""",
    ),
    (
        "md",
        f"""
## {SECTIONS["omega"]}

**How to read it.** Ω_l(b) = (Tr(H_l)/n_l)·‖Q_b(W_l) − W_l‖² estimates the loss increase of quantizing layer l
alone to b bits (HAWQ-V2/V3's objective; the ILP search minimises Σ_l Ω_l(b_l)).  Rows are layers, columns
candidate bits; darker is worse (log colour scale).  Reading across a row shows how fast a layer degrades as bits
drop; reading down a column ranks layers at that bit.  Grey "≤0" cells come from negative traces.
""",
    ),
    (
        "code",
        """
with report.section("omega"):
    report.show(plot_omega_heatmap(run.omega()), "omega")
""",
    ),
    (
        "md",
        f"""
## {SECTIONS["spectral_density"]}

**How to read it.** The density of Hessian eigenvalues (stochastic Lanczos quadrature), log-scaled, with the top
eigenvalues from Lanczos as dashed lines.  Most mass near zero with a few large outliers is the usual picture;
negative eigenvalues show the model is not at a minimum.  A large λ1 relative to the bulk means a few sharp
directions dominate the curvature.
""",
    ),
    (
        "code",
        """
with report.section("spectral_density"):
    grid, density, eig = run.spectrum()
    report.show(plot_spectral_density(grid, density, eig), "spectral_density")
""",
    ),
    (
        "md",
        f"""
## {SECTIONS["bit_probabilities"]}

**How to read it.** During mixed-precision supernet training each layer switches to a random bit drawn from its
own distribution (HASB, Alg. 1 of arXiv 2502.01199).  Layers whose per-parameter trace t_l = Tr(H_l)/n_l is at least
the mean are *sensitive* (bold names) and draw bit b with p ∝ b, favouring high bits; the others draw uniformly.
Stacks show p_l(b); black dots give the expected bit Σ b·p on the right axis.
""",
    ),
    (
        "code",
        """
with report.section("bit_probabilities"):
    probs, sensitive, source = run.bit_probabilities()
    print("probabilities from:", source)
    report.show(plot_bit_probabilities(probs, sensitive=sensitive), "bit_probabilities")
""",
    ),
    (
        "md",
        f"""
## {SECTIONS["training"]}

**How to read it.** Left: validation accuracy per epoch for each uniform bit-width sub-net (w8a8 … w2a2) of the
shared weights; the gaps between curves are the price of fewer bits.  Right: training loss, with learning rates per
parameter group (ALRS scales the quantization-scale learning rate per precision) on a log axis.
The multi-precision stage comes first, the mixed-precision supernet starts from it.
""",
    ),
    (
        "code",
        """
for stage in ("multi", "supernet"):
    with report.section(f"training_{stage}"):
        display(Markdown(f"**{stage} stage** — `{run.train_dir(stage)}`"))
        m = run.metrics(stage)
        report.show(plot_training_curves(m, title=f"Training curves — {stage} stage"), f"training_{stage}")
        display(m.tail(3))
""",
    ),
    (
        "md",
        f"""
## {SECTIONS["pareto"]}

**How to read it.** Every evaluated bit configuration is a point: x is its cost in BitOPs per sample (bottom,
in G = 10⁹; top, the equivalent uniform bit-width), y its validation score: accuracy, or bits per byte for a
language model (lower is better; the axis says which, on how many images or windows).  The green step line is the
Pareto front — no config is both cheaper and better than a point on it.  Squares are uniform configs (w8a8 …) for
reference: front points above and left of them are what mixed precision buys.  The dashed line is the budget and
the star the config picked within it.
""",
    ),
    (
        "code",
        """
with report.section("pareto"):
    view = pareto_view(run)   # in the run's metric: accuracy, or bits per byte for a language model
    for note in view["notes"]:
        print(note)
    report.show(plot_pareto(**view["plot"]), "pareto")
    m = view["metric"]
    if view["chosen"] is not None:
        what = "accuracy as a fraction" if m.name == "accuracy" else f"{m.label}, lower is better; n counts windows"
        display(Markdown(f"**Scores of the chosen config** ({what}; se = its standard error, "
                         "blank where config.json gives none)"))
        display(chosen_scores(view["chosen"]))
    display(Markdown(f"**Pareto front** ({m.label})"))
    display(view["front_table"])
""",
    ),
    (
        "md",
        f"""
## {SECTIONS["bit_allocation"]}

**How to read it.** Top: the bits each searchable layer gets in the chosen config and in front configs at
neighbouring budgets (bar colour = bit, hatch = config).  Bottom: each layer's share of that config's BitOPs —
layers with many MACs dominate the cost, so the search tends to cut their bits first unless their Ω is high.
""",
    ),
    (
        "code",
        """
with report.section("bit_allocation"):
    cost = run.cost_model()
    chosen = run.chosen()
    configs = {}
    cfg = config_from_record(chosen, cost.names)
    configs[f"chosen ({cost.avg_bit_equivalent(cfg):.2f} avg bits)"] = cfg
    try:
        pts = run.pareto()
    except Exception:
        pts = None
    if pts is not None and "config" in pts and "on_front" in pts:
        front = pts[pts["on_front"].astype(str).str.lower().isin(["true", "1"])]
        target = cost.avg_bit_equivalent(cfg)
        fr = front.assign(_avg=[cost.avg_bit_equivalent(config_from_record(s, cost.names)) for s in front["config"]])
        for delta in (-1.0, 1.0):   # the front config nearest one average bit below / above the chosen one
            side = fr[(fr["_avg"] - target) * delta > 0.25]
            if side.empty:
                continue
            row = side.iloc[(side["_avg"] - (target + delta)).abs().argsort().iloc[0]]
            c2 = config_from_record(row["config"], cost.names)
            if c2.short() not in {c.short() for c in configs.values()}:
                configs[f"front ({row['_avg']:.2f} avg bits)"] = c2
    configs = dict(sorted(configs.items(), key=lambda kv: cost.bitops(kv[1])))   # low → high budget
    report.show(plot_bit_allocation(configs, cost), "bit_allocation")
""",
    ),
    ("md", "## Summary\n\nSection outcomes (ok / missing / error) and where the figures were saved."),
    (
        "code",
        """
report.write_manifest()
display(pd.DataFrame([{"section": k, **{kk: (", ".join(v) if isinstance(v, list) else v) for kk, v in s.items()}}
                      for k, s in report.sections.items()]))
""",
    ),
]


def build_notebook() -> nbformat.NotebookNode:
    """The report notebook: a parameters cell, one guarded section per SECTIONS entry, a summary."""
    cells = []
    for kind, src, *tags in CELLS:
        if kind == "md":
            cells.append(new_markdown_cell(src.strip()))
        else:
            cells.append(new_code_cell(src.strip(), metadata={"tags": tags[0]} if tags else {}))
    nb = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
            "language_info": {"name": "python"},
        },
    )
    return nb


def render() -> str:
    """The notebook file's text, cell ids set by position so the output is deterministic."""
    nb = build_notebook()
    for i, c in enumerate(nb.cells):
        c["id"] = f"cell-{i:02d}"
    nbformat.validate(nb)
    return nbformat.writes(nb)


def main() -> None:
    sys.path.insert(0, str(REPO))
    from hasb import atomic_write_text

    atomic_write_text(NOTEBOOK, render())
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
