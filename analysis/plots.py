"""PNG figures of a study's analysis. Each function writes one file and returns its path.

Uses `matplotlib.figure.Figure` with the Agg canvas directly (no pyplot, no global state,
no display needed), so it runs headless on a laptop or in CI.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless even if something imports pyplot later

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.effects import RungDifference
from analysis.fit import CurveResult
from scaling import names

_ARM_COLORS = {
    names.ARM_BASELINE: "#4c72b0",
    names.ARM_DISPERSION: "#dd8452",
    names.ARM_NEFTUNE: "#55a868",
    names.ARM_ACTIVE_FORGETTING: "#c44e52",
}


def _color(arm: str, index: int) -> str:
    return _ARM_COLORS.get(arm, f"C{index % 10}")


def _save(fig: Figure, path: Path) -> Path:
    # Fixed margins instead of a layout engine: constrained/tight layout draws every
    # figure twice, which doubled the plotting time on a 2-core machine.
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.1, top=0.92, wspace=0.35, hspace=0.45)
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_metric_curves(path: Path, metric: str, final: pl.DataFrame, curves: dict[str, CurveResult], *, size_label: str) -> Path:
    """Metric vs N on log axes: every run, rung means, fitted curve and CI band per arm."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    final = final.filter(pl.col("value").is_finite() & pl.col("n").is_not_null())
    if final.is_empty():
        ax.text(0.5, 0.5, f"{metric}: no finite values", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    positive = bool((final["value"] > 0).all())
    for i, (arm, group) in enumerate(sorted(final.group_by("arm"), key=lambda item: str(item[0][0]))):
        arm = str(arm[0])
        color = _color(arm, i)
        ax.scatter(group["n"], group["value"], s=12, alpha=0.45, color=color)
        means = group.group_by("n").agg(pl.col("value").mean()).sort("n")
        result = curves.get(arm)
        label = arm
        if result is not None and result.fit is not None:
            fit = result.fit
            ax.plot(fit.curve_n, fit.law.predict(fit.curve_n), color=color, lw=1.6)
            if np.all(np.isfinite(fit.curve_low)):
                ax.fill_between(fit.curve_n, fit.curve_low, fit.curve_high, color=color, alpha=0.18, lw=0)
            label += f"  ({fit.law.scale:.3g}·(N/{fit.law.n_ref:.2g})^-{fit.law.alpha:.2f} + {fit.law.offset:.3g})"
        elif result is not None and result.trend is not None:
            label += f"  (trend ρ={result.trend.spearman.estimate:+.2f})"
        ax.plot(means["n"], means["value"], "o--" if result is None or result.fit is None else "o", color=color, ms=5, lw=0.8, label=label)
    ax.set_xscale("log")
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel(size_label)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs model size")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)
    return _save(fig, path)


def plot_paired_differences(path: Path, differences: dict[str, list[RungDifference]], *, treatment: str, control: str, size_label: str) -> Path:
    """Treatment minus control per rung with CIs, one panel per metric."""
    metrics = [m for m, rows in differences.items() if rows]
    cols = max(1, min(3, len(metrics)))
    rows_n = max(1, math.ceil(len(metrics) / cols))
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows_n))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(rows_n, cols, k + 1)
        rows = differences[metric]
        n = np.array([r.n for r in rows])
        est = np.array([r.difference.estimate for r in rows])
        low = np.array([r.difference.low for r in rows])
        high = np.array([r.difference.high for r in rows])
        err = np.vstack([np.where(np.isfinite(low), est - low, 0), np.where(np.isfinite(high), high - est, 0)])
        ax.errorbar(n, est, yerr=err, fmt="o-", color=_color(treatment, 1), capsize=3)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(size_label)
        ax.set_title(f"{metric}\n{treatment} − {control}", fontsize=9)
        ax.grid(True, alpha=0.25)
    if not metrics:
        fig.add_subplot().text(0.5, 0.5, "no paired runs", ha="center", va="center")
    return _save(fig, path)


def _mean_histograms(cell: pl.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    with_hist = cell.drop_nulls("histogram")
    if with_hist.is_empty():
        return None
    per_layer = with_hist.group_by("layer_fraction").agg(pl.col("histogram")).sort("layer_fraction")
    fractions = per_layer["layer_fraction"].to_numpy()
    # Average the seeds' densities per layer (same 128 bins over [-1, 1]).
    grid = np.stack([np.mean(np.array(hists.to_list(), dtype=float), axis=0) for hists in per_layer["histogram"]])
    return fractions, grid


def plot_heatmap_grid(path: Path, profiles: pl.DataFrame) -> Path:
    """The paper's condensation heatmaps, rows = rungs (small to large), columns = arms:
    x = layer fraction, y = cosine similarity, colour = density (seeds averaged)."""
    rungs = profiles.select("rung", "n").unique().sort("n")["rung"].to_list()
    arms = sorted(profiles["arm"].unique().to_list())
    return _heatmap_grid(path, profiles, ("rung", rungs), ("arm", arms), titles=arms, empty="no histogram")


def _heatmap_grid(path: Path, profiles: pl.DataFrame, rows: tuple[str, list], columns: tuple[str, list], *,
                  titles: list[str], empty: str) -> Path:
    """One heatmap per (row, column) cell of `profiles`, in the paper's colours (white -> red,
    density 0..10, as scaling/plots.py draws a single one)."""
    (row_key, row_values), (col_key, col_values) = rows, columns
    fig = Figure(figsize=(3.0 * max(1, len(col_values)), 2.4 * max(1, len(row_values))))
    for r, row in enumerate(row_values):
        for c, column in enumerate(col_values):
            ax = fig.add_subplot(len(row_values), len(col_values), r * len(col_values) + c + 1)
            cell = profiles.filter((pl.col(row_key) == row) & (pl.col(col_key) == column))
            made = _mean_histograms(cell) if not cell.is_empty() else None
            if made is None:
                ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=8, transform=ax.transAxes)
            else:
                fractions, grid = made
                ax.imshow(grid.T, origin="lower", aspect="auto", cmap="Reds", vmin=0.0, vmax=10.0,
                          extent=(float(fractions.min()), float(fractions.max()), -1.0, 1.0))
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{row}\ncosine", fontsize=8)
            if r == len(row_values) - 1:
                ax.set_xlabel("layer fraction", fontsize=8)
            ax.tick_params(labelsize=7)
    return _save(fig, path)


def plot_layer_profiles(path: Path, profiles: pl.DataFrame) -> Path:
    """Per-layer mean cosine vs layer fraction, one line per rung, one panel per arm."""
    arms = sorted(profiles["arm"].unique().to_list())
    fig = Figure(figsize=(4.2 * max(1, len(arms)), 3.4))
    rungs = profiles.select("rung", "n").unique().sort("n")
    cmap = matplotlib.colormaps["viridis"]
    for a, arm in enumerate(arms):
        ax = fig.add_subplot(1, max(1, len(arms)), a + 1)
        for r, rung in enumerate(rungs["rung"].to_list()):
            cell = profiles.filter((pl.col("rung") == rung) & (pl.col("arm") == arm)).drop_nulls("mean_cosine")
            if cell.is_empty():
                continue
            line = cell.group_by("layer_fraction").agg(pl.col("mean_cosine").mean()).sort("layer_fraction")
            ax.plot(line["layer_fraction"], line["mean_cosine"], "o-", ms=3, color=cmap(r / max(1, rungs.height - 1)), label=rung)
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("layer fraction")
        ax.set_ylabel("mean cosine similarity")
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_observation_trends(path: Path, final: pl.DataFrame, *, metric: str) -> Path:
    """Observation studies: metric vs N per (family, source)."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    for i, ((family, source), group) in enumerate(sorted(final.group_by("family", "source"), key=lambda item: (str(item[0][0]), str(item[0][1])))):
        group = group.sort("n")
        ax.plot(group["n"], group["value"], "o-", color=f"C{i % 10}", label=f"{family} / {source}")
    ax.set_xscale("log")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("parameters")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.25)
    return _save(fig, path)


def plot_observation_family(path: Path, final: pl.DataFrame, trends: pl.DataFrame | None, *, family: str) -> Path:
    """One family, as the paper plots it: each condensation metric vs log N, one line per
    text source, with the fitted line a + b·log10 N (slope and Spearman in the legend)."""
    from analysis.observe import OBSERVATION_METRICS

    metrics = [m for m in OBSERVATION_METRICS if final.filter(pl.col("metric") == m).height]
    fig = Figure(figsize=(4.4 * max(1, len(metrics)), 3.8))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, max(1, len(metrics)), k + 1)
        rows = final.filter((pl.col("metric") == metric) & pl.col("value").is_finite()).drop_nulls("n")
        for i, (source, group) in enumerate(sorted(rows.group_by("source"), key=lambda item: str(item[0][0]))):
            source = str(source[0])
            group = group.sort("n")
            label = source
            if trends is not None and trends.height:
                hit = trends.filter((pl.col("source") == source) & (pl.col("metric") == metric))
                if hit.height:
                    row = hit.row(0, named=True)
                    label += f" (ρ={row['spearman_vs_log_n']:+.2f}, {row['slope_per_decade']:+.2f}/dec)"
            ax.plot(group["n"], group["value"], "o", color=f"C{i % 10}", label=label)
            x = np.log10(group["n"].to_numpy())
            if np.unique(x).size >= 2:
                b, a = np.polyfit(x, group["value"].to_numpy(), 1)
                grid = np.linspace(x.min(), x.max(), 20)
                ax.plot(10**grid, a + b * grid, "-", color=f"C{i % 10}", lw=1.2)
        ax.set_xscale("log")
        if metric != names.COND_LATE_HALF_MEAN_COS:
            ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlabel("parameters (log)")
        ax.set_ylabel(metric.removeprefix("condensation/"))
        ax.set_title(f"{family}: {metric.removeprefix('condensation/')}", fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=6)
    if not metrics:
        fig.add_subplot().text(0.5, 0.5, "no finished measurement", ha="center", va="center")
    return _save(fig, path)


def plot_observation_heatmaps(path: Path, profiles: pl.DataFrame, *, family: str) -> Path:
    """Condensation heatmaps of one family: rows = models (small to large), columns = sources."""
    models = profiles.select("model", "n").unique().sort("n", nulls_last=True)["model"].to_list()
    sources = sorted(profiles["source"].drop_nulls().unique().to_list())
    return _heatmap_grid(path, profiles, ("model", models), ("source", sources),
                         titles=[f"{family} / {source}" for source in sources], empty="not measured")
