"""hasb reports: figures (``reports.plots``) and the executed sensitivity notebook (``python -m reports.build``)."""

from .plots import (
    PlotError,
    bit_color,
    figure_png_bytes,
    figure_size,
    plot_bit_allocation,
    plot_bit_probabilities,
    plot_omega_heatmap,
    plot_pareto,
    plot_spectral_density,
    plot_traces,
    plot_training_curves,
    save_figure,
)

__all__ = [
    "PlotError",
    "bit_color",
    "figure_png_bytes",
    "figure_size",
    "plot_bit_allocation",
    "plot_bit_probabilities",
    "plot_omega_heatmap",
    "plot_pareto",
    "plot_spectral_density",
    "plot_traces",
    "plot_training_curves",
    "save_figure",
]
