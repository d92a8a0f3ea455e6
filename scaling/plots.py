"""A condensation record on disk: `condensation.json` and the heatmap in the paper's style.

One writer (`write_condensation_record`) for every producer: training probes, observation
studies and `python -m scaling.condense`. The heatmap (matplotlib Agg; no torch import):
x = layer fraction l / L, y = cosine similarity in [-1, 1], colour = probability density of
the averaged token-token cosine matrix's entries (white -> red, fixed scale 0 .. 10 so plots
of different models compare at a glance).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from scaling import names

DENSITY_MAX = 10.0  # the paper's fixed colour scale


def write_condensation_record(result, directory: str | os.PathLike, *, title: str, metadata: dict[str, Any],
                              last_n: int | None = None) -> tuple[Path, Path]:
    """`condensation.json` (written atomically: a reader never sees half a file) and `heatmap.png`
    of a `CondensationResult` in `directory`; `metadata` becomes top-level JSON keys."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / names.ARTIFACT_CONDENSATION_JSON
    tmp = json_path.with_name(f".{json_path.name}.tmp{os.getpid()}")
    last_n = None if last_n is None else min(last_n, result.num_layers)
    tmp.write_text(result.to_json(last_n=last_n, extra=metadata) + "\n", encoding="utf-8")
    tmp.replace(json_path)
    png_path = plot_condensation_heatmap(result.histograms, directory / names.ARTIFACT_HEATMAP_PNG, title=title)
    return json_path, png_path


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
