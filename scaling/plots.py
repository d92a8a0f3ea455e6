"""The condensation heatmap in the paper's style (matplotlib Agg; no torch import).

x = layer fraction l / L, y = cosine similarity in [-1, 1], colour = probability density of
the averaged token-token cosine matrix's entries (white -> red, fixed scale 0 .. 10 so plots
of different models compare at a glance).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DENSITY_MAX = 10.0  # the paper's fixed colour scale


def plot_condensation_heatmap(
    histograms: np.ndarray,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    density_max: float = DENSITY_MAX,
    dpi: int = 150,
) -> Path:
    """Write a [L+1, bins] stack of density histograms over [-1, 1] as a PNG; returns the path."""
    # A bare Figure renders through Agg for PNG without pyplot: no global backend or figure
    # state, so it is safe in threads and Ray actors and never needs a display.
    from matplotlib.figure import Figure

    histograms = np.asarray(histograms, dtype=np.float64)
    if histograms.ndim != 2 or histograms.shape[0] < 1:
        raise ValueError(f"histograms must be [layers, bins], got shape {histograms.shape}")
    figure = Figure(figsize=(7.5, 6.0))
    axes = figure.add_subplot(1, 1, 1)
    axes.spines["top"].set_visible(False)
    axes.spines["right"].set_visible(False)
    image = axes.imshow(histograms.T, aspect="auto", origin="lower", cmap="Reds",
                        extent=(0.0, 1.0, -1.0, 1.0), vmin=0.0, vmax=density_max, interpolation="nearest")
    axes.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axes.set_xlabel("Layer Fraction", fontsize=16)
    axes.set_ylabel("Cosine Similarity", fontsize=16)
    axes.tick_params(axis="both", which="major", labelsize=12)
    if title:
        axes.set_title(title, fontsize=14)
    colorbar = figure.colorbar(image, ax=axes)
    colorbar.ax.set_title("Probability\nDensity", fontsize=11, pad=10)
    colorbar.ax.tick_params(labelsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
