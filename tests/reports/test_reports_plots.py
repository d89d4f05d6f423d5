"""Unit tests of reports.plots on small inputs: axes labels/units, negative traces flagged, sizes, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import hasb
from hasb import plots as P
from hasb.models import build_model


@pytest.fixture(scope="module")
def cost():
    return hasb.CostModel.from_model(hasb.quantize_model(build_model("small_cnn"), bits=(8, 6, 4, 2)))


def _traces(names, vals):
    return pd.DataFrame(
        {
            "layer": names,
            "trace": vals,
            "stderr": np.abs(vals) * 0.1,
            "n_params": 100,
            "trace_per_param": np.asarray(vals) / 100,
            "searchable": [True] * len(names),
        }
    )


def test_traces_flags_negative_and_zero_on_log_axis():
    names = [f"layer{i}.0.conv1" for i in range(5)]
    fig = P.plot_traces(_traces(names, np.array([3.0, -0.5, 0.02, 0.0, 10.0])))
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("trace < 0" in l and "1 layer" in l for l in labels), labels
    assert any("trace = 0" in l for l in labels)
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    assert "log scale" in ax.get_ylabel()
    # the negative layer's bar is red and hatched, drawn at |trace|
    bars = ax.patches[:5]
    assert bars[1].get_hatch() == "//" and np.allclose(bars[1].get_facecolor()[:3], P.mcolors.to_rgb(P.NEG_COLOR))
    assert np.isclose(bars[1].get_y() + bars[1].get_height(), 0.5)


def test_traces_without_negatives_has_no_negative_entry_and_width_grows():
    names = [f"l{i}" for i in range(30)]
    fig = P.plot_traces(_traces(names, np.linspace(1, 2, 30)))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert not any("< 0" in l for l in labels)
    assert fig.get_size_inches()[0] == P.figure_size("traces", 30)[0] > P.figure_size("traces", 5)[0]


def test_traces_per_param_needs_n_params():
    df = _traces(["a", "b"], np.array([1.0, 2.0])).drop(columns="n_params")
    with pytest.raises(P.PlotError, match="n_params"):
        P.plot_traces(df, value="trace_per_param")
    with pytest.raises(P.PlotError, match="missing column"):
        P.plot_traces(pd.DataFrame({"layer": ["a"]}))


def test_omega_heatmap_log_colourbar_and_bits(cost):
    om = {n: {"8": 1e-6 * (i + 1), "6": 1e-5, "4": 1e-4, "2": 1e-2} for i, n in enumerate(cost.names)}
    fig = P.plot_omega_heatmap(om)
    ax, cax = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8-bit", "6-bit", "4-bit", "2-bit"]
    assert "[bits]" in ax.get_xlabel()
    assert "Ω_l(b)" in cax.get_ylabel() and "log" in cax.get_ylabel()
    assert isinstance(ax.images[0].norm, P.mcolors.LogNorm)
    assert [t.get_text() for t in ax.get_yticklabels()] == cost.names
    with pytest.raises(P.PlotError):
        P.plot_omega_heatmap({})


def test_spectral_density_marks_top_eigenvalues():
    g = np.linspace(-1, 10, 50)
    fig = P.plot_spectral_density(g, np.exp(-(g**2)) + 1e-4, eigenvalues=[1.0, 9.0, 5.0])
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts[0] == "λ1=9" and "λ2=5" in texts
    assert "eigenvalue" in ax.get_xlabel() and ax.get_yscale() == "log"
    with pytest.raises(P.PlotError, match="equal length"):
        P.plot_spectral_density([1, 2], [1])


def test_bit_probabilities_stacks_to_one_and_validates():
    probs = {"a": {8: 0.4, 6: 0.3, 4: 0.2, 2: 0.1}, "b": {"8": 0.25, "6": 0.25, "4": 0.25, "2": 0.25}}
    fig = P.plot_bit_probabilities(probs, sensitive=["a"])
    ax = fig.axes[0]
    tops = {}
    for bar in ax.patches:
        x = round(bar.get_x() + bar.get_width() / 2)
        tops[x] = max(tops.get(x, 0), bar.get_y() + bar.get_height())
    assert np.allclose(list(tops.values()), 1.0)
    assert "[bits]" in fig.axes[1].get_ylabel()
    # expected bits: a = 0.4·8+0.3·6+0.2·4+0.1·2 = 6.0, b = 5.0
    assert np.allclose(fig.axes[1].lines[0].get_ydata(), [6.0, 5.0])
    assert ax.get_xticklabels()[0].get_fontweight() == "bold"
    with pytest.raises(P.PlotError, match="sum to"):
        P.plot_bit_probabilities({"a": {8: 0.5, 2: 0.2}})


def test_bit_allocation_shares_use_cost_model(cost):
    lo = hasb.BitConfig.uniform(cost.names, 2)
    mixed = lo.with_layers({cost.names[0]: (8, 8)})
    fig = P.plot_bit_allocation({"low": lo, "mixed": mixed}, cost)
    ax, ax2 = fig.axes[0], fig.axes[1]
    assert "[bits]" in ax.get_ylabel() and "[%]" in ax2.get_ylabel()
    n = len(cost.names)
    shares_mixed = [b.get_height() for b in ax2.patches[n : 2 * n]]
    # share = layer BitOPs / the config's total BitOPs (fixed layers included), from the one cost model
    want = hasb.cost.layer_bitops(cost.layers[1].macs, 8, 8) / cost.bitops(mixed) * 100
    assert cost.layers[1].name == cost.names[0]
    assert np.isclose(shares_mixed[0], want)
    legend = [t.get_text() for t in ax2.get_legend().get_texts()]
    assert any("GBitOPs" in t for t in legend)
    assert [t.get_text() for t in ax2.get_xticklabels()] == cost.names
    with pytest.raises(P.PlotError, match="no MACs"):
        P.plot_bit_allocation({"x": {"nope": (4, 4)}}, {"a": 10})


def test_pareto_units_secondary_axis_uniform_labels_and_chosen(cost):
    rows = []
    for b in (8, 4, 2):
        c = hasb.BitConfig.uniform(cost.names, b)
        rows.append(
            {
                "bitops": cost.bitops(c),
                "accuracy": 0.8 + 0.01 * b,
                "source": "uniform",
                "config": c.short(),
                "on_front": True,
            }
        )
    rows.append({"bitops": cost.uniform_bitops(5), "accuracy": 0.9, "source": "ilp", "config": "", "on_front": True})
    df = pd.DataFrame(rows)
    fig = P.plot_pareto(
        df,
        chosen={"bitops": rows[-1]["bitops"], "accuracy": 0.9},
        budget_bitops=cost.uniform_bitops(5.5),
        avg_bits_fn=cost,
    )
    ax = fig.axes[0]
    assert "GBitOPs" in ax.get_xlabel() and "[%]" in ax.get_ylabel()
    labels = {t.get_text() for t in ax.texts}
    assert {"w8a8", "w4a4", "w2a2"} <= labels
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "90.00%" in legend and "budget" in legend and "5.5 avg bits" in legend
    sec = ax.child_axes  # secondary_xaxis lives under the main axes
    assert sec and "average-bit" in sec[0].get_xlabel()
    # the secondary axis maps G BitOPs to the cost model's average-bit equivalent
    fwd, inv = P._avg_funcs(cost)
    assert np.isclose(fwd(cost.uniform_bitops(4) / 1e9), 4.0) and np.isclose(inv(4.0), cost.uniform_bitops(4) / 1e9)
    with pytest.raises(P.PlotError, match="avg_bits_fn"):
        P.plot_pareto(df, avg_bits_fn=42)


def test_training_curves_of_a_language_model():
    """LM metrics (bits per byte per weight-only config, lower is better) plot as they are, labelled as such."""
    m = pd.DataFrame(
        {
            "epoch": [1, 2],
            "loss": [3.5, 3.0],
            "bpb_w8afp": [5.1, 4.6],
            "bpb_w2afp": [5.9, 5.2],
            "se_bpb_w8afp": [0.05, 0.05],
        }
    )
    fig = P.plot_training_curves(m)
    assert "bits per byte" in fig.axes[0].get_ylabel()
    assert [l.get_label() for l in fig.axes[0].lines] == ["w8afp", "w2afp"]
    assert list(fig.axes[0].lines[0].get_ydata()) == [5.1, 4.6]  # not scaled to %


def test_training_curves_and_save_figure(tmp_path):
    m = pd.DataFrame(
        {
            "epoch": [1, 2],
            "loss": [2.0, 1.0],
            "acc_w8a8": [0.5, 0.7],
            "acc_w2a2": [0.4, 0.6],
            "lr_weights": [1e-3, 5e-4],
        }
    )
    fig = P.plot_training_curves(m)
    assert "[%]" in fig.axes[0].get_ylabel()
    assert [l.get_label() for l in fig.axes[0].lines] == ["w8a8", "w2a2"]
    paths = P.save_figure(fig, [tmp_path / "t.png", tmp_path / "t.svg"])
    import matplotlib.image as mpimg

    img = mpimg.imread(paths[0])
    w, h = P.figure_size("training")
    assert img.shape[:2] == (round(h * P.DPI), round(w * P.DPI))
    assert paths[1].read_text().lstrip().startswith("<?xml")
    assert not list(tmp_path.glob(".*tmp"))
    with pytest.raises(P.PlotError, match="suffix"):
        P.save_figure(fig, tmp_path / "t.jpg")
