"""PNG figures of a study's analysis. Each function writes one file and returns its path.

Uses `matplotlib.figure.Figure` with the Agg canvas directly (no pyplot, no global state,
no display needed), so it runs headless on a laptop or in CI.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless even if something imports pyplot later

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedFormatter, FixedLocator, MaxNLocator, NullFormatter, NullLocator, PercentFormatter

from analysis.downstream import INITIAL, MEAN_ACC, SELECTION_LABELS, SELECTION_MEAN_ACC, TEST, VALIDATION, WORD_PERPLEXITY, EvalTasks, table_columns
from analysis.claims import MAX_LOSS_COST, NOT_TESTABLE, NOT_TESTED, ClaimCheck
from analysis.effects import EVAL_MEAN_ACC, DifferenceTrend, RungDifference
from analysis.fit import RANK_METRICS, CurveResult
from scaling import names
from scaling.console import format_count

_ARM_COLORS = {
    names.ARM_BASELINE: "#4c72b0",
    names.ARM_DISPERSION: "#dd8452",
    names.ARM_NEFTUNE: "#55a868",
    names.ARM_ACTIVE_FORGETTING: "#c44e52",
}




def _color(arm: str, index: int) -> str:
    return _ARM_COLORS.get(arm, f"C{index % 10}")


def _grid(fig: Figure, nrows: int, ncols: int, *, left: float = 0.85, right: float = 0.25, bottom: float = 0.65, top: float = 0.55,
          wspace: float = 0.75, hspace: float = 0.75, width_ratios: list[float] | None = None):
    """A GridSpec with margins and gaps in inches, so labels fit whatever the figure size
    (a layout engine would draw every figure twice: slow on 2 cores)."""
    w, h = fig.get_size_inches()
    ratios = width_ratios or [1.0] * ncols
    axis_w = (w - left - right - (ncols - 1) * wspace) / sum(ratios) * (sum(ratios) / ncols)
    axis_h = (h - top - bottom - (nrows - 1) * hspace) / nrows
    return fig.add_gridspec(nrows, ncols, left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h,
                            wspace=wspace / max(axis_w, 1e-3), hspace=hspace / max(axis_h, 1e-3), width_ratios=width_ratios)


METRIC_LABELS = {
    names.VAL_LOSS: "validation loss",
    names.COND_LATE_HALF_MEAN_COS: "late-half mean cosine",
    names.COND_LAST_LAYER_MEAN_COS: "last-layer mean cosine",
    names.COND_SPEARMAN: "Spearman(depth, mean cosine)",
    names.COND_KENDALL: "Kendall(depth, mean cosine)",
    EVAL_MEAN_ACC: "mean downstream accuracy",
}


def metric_label(metric: str) -> str:
    """A human axis label for a metric key (the key itself when there is none)."""
    return METRIC_LABELS.get(metric, metric)


def _save(fig: Figure, path: Path, *, dpi: int = 100, vector: bool = False) -> Path:
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    if vector:
        fig.savefig(path.with_suffix(".svg"))
    return path


def plot_claim(path: Path, check: ClaimCheck, *, size_label: str) -> Path | None:
    """The figure a claim's verdict rests on: its units, their rung means, the threshold and the
    pooled estimate or fitted slope (None when the claim was not tested). 200 dpi PNG + SVG."""
    if check.verdict == NOT_TESTED or (check.verdict == NOT_TESTABLE and not check.points and not check.profiles):
        return None
    fig = Figure(figsize=(5.2, 3.9))
    ax = fig.add_subplot(_grid(fig, 1, 1, left=0.9, bottom=0.62, top=0.85, right=0.2)[0, 0])
    color = _color(names.ARM_DISPERSION, 1)
    est = check.estimate
    ci = f"{est.estimate:+.3g} [{est.low:+.3g}, {est.high:+.3g}]" if est.has_bounds else f"{est.estimate:+.3g} (no interval)"
    if check.profiles:
        for profile in check.profiles:
            depth = np.linspace(0.0, 1.0, len(profile))
            ax.plot(depth, profile, "-o", ms=2.5, lw=1.0, color=color, alpha=0.6)
        ax.set_xlabel("depth (0 = embedding output, 1 = last hidden state)", fontsize=8)
        ax.set_ylabel("mean cosine at step 0", fontsize=8)
        values = np.concatenate([np.asarray(p) for p in check.profiles])
        ax.set_ylim(max(0.0, values.min() - 0.05), min(1.0, values.max() + 0.05))
        what = f"{len(check.profiles)} initial states; mean Spearman {ci}"
        if check.effect_size is not None:
            rise = check.effect_size
            what += f"\nmean cosine rises by {rise.estimate:+.3g}" + (f" [{rise.low:+.3g}, {rise.high:+.3g}]" if rise.has_bounds else "")
    else:
        points = np.array(check.points, dtype=float)
        n, y = points[:, 0], points[:, 1]
        scale = 100.0 if check.key == "c" else 1.0
        sizes = np.unique(n)
        means = np.array([y[n == v].mean() for v in sizes])
        ax.scatter(n, y * scale, s=14, color="0.45", alpha=0.7, zorder=2, label=check.unit or "units")
        ax.plot(sizes, means * scale, "o", color=color, ms=6, zorder=3, label="rung mean")
        if check.line is not None:
            grid = np.geomspace(sizes.min(), sizes.max(), 32)
            intercept, slope = check.line
            ax.plot(grid, (intercept + slope * np.log10(grid)) * scale, "-", color=color, lw=1.4, label="fit to the rung means")
            what = f"slope per decade of N {ci}"
        else:
            if est.has_bounds:
                ax.axhspan(est.low * scale, est.high * scale, color=color, alpha=0.15, lw=0, label="pooled estimate, CI")
            ax.axhline(est.estimate * scale, color=color, lw=1.2)
            what = f"pooled {ci}" if scale == 1 else f"pooled {est.estimate:+.2%}" + (
                f" [{est.low:+.2%}, {est.high:+.2%}]" if est.has_bounds else "")
        if check.key == "c":
            ax.axhline(100.0 * MAX_LOSS_COST, color="black", lw=0.8, ls="--", label=f"margin: +{MAX_LOSS_COST:.0%}")
        if check.key.startswith(("b", "c", "e", "f")):
            ax.axhline(0.0, color="black", lw=0.8, label="no difference")
        _log_n_axis(ax, sizes.tolist(), size_label)
        ax.xaxis.label.set_fontsize(8)
        label = metric_label(check.metric)
        difference = check.key.startswith(("b", "c", "e", "f"))
        ylabel = ("relative difference in validation loss (%)" if check.key == "c" else
                  f"{label}, dispersion − baseline" if difference else f"baseline {label}")
        ax.set_ylabel(ylabel, fontsize=8)
        if check.metric in RANK_METRICS and not difference:
            low, high = y.min(), y.max()
            ax.set_ylim(max(-1.05, low - 0.1), min(1.05, high + 0.1))
        ax.legend(fontsize=7, loc="best")
    p = "–" if not math.isfinite(check.p_adjusted) else (f"{check.p_adjusted:.2g}" if check.p_adjusted >= 1e-4 else "< 1e-4")
    title = textwrap.fill(f"({check.key}) {check.claim}", width=70)
    ax.set_title(f"{title}\n{what}; {check.verdict} (Holm p {p})", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.25)
    return _save(fig, path, dpi=200, vector=True)


def _log_n_axis(ax, sizes, label: str) -> None:
    """Log N on x with one labelled tick per rung (no minor labels such as '3x10^5 4x10^5')."""
    sizes = sorted({float(v) for v in sizes if v is not None and np.isfinite(v) and v > 0})
    ax.set_xscale("log")
    if sizes:
        lo, hi = sizes[0], sizes[-1]
        pad = max(1.25, (hi / lo) ** 0.08)
        ax.set_xlim(lo / pad, hi * pad)
        step = max(1, math.ceil(len(sizes) / 7))
        ticks = sizes[::step]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FixedFormatter([format_count(v) for v in ticks]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


def _y_for(ax, metric: str, values=None) -> None:
    """Rank correlations: the data's range padded, never beyond [-1, 1] (a fixed [-1, 1] axis
    squeezed data that lie in [0.4, 1] into a third of the panel)."""
    if metric in RANK_METRICS:
        data = np.asarray([v for v in (values if values is not None else []) if np.isfinite(v)], dtype=float)
        if data.size:
            pad = max(0.05, 0.1 * float(np.ptp(data)))
            ax.set_ylim(max(-1.05, float(data.min()) - pad), min(1.05, float(data.max()) + pad))
        else:
            ax.set_ylim(-1.05, 1.05)


def _arm_offsets(arms: list[str]) -> dict[str, float]:
    """Small multiplicative x offsets so the arms' points at one rung do not hide each other."""
    k = len(arms)
    return {arm: 10 ** (0.012 * (i - (k - 1) / 2)) for i, arm in enumerate(arms)}


def plot_metric_curves(path: Path, metric: str, final: pl.DataFrame, curves: dict[str, CurveResult], *, size_label: str) -> Path:
    """Metric vs N (log x, linear y): every run, rung means, and the fitted power law with its
    CI band only where a fit is supported (the legend says why not, otherwise)."""
    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.add_subplot(_grid(fig, 1, 1, left=0.95, bottom=0.7, top=0.75)[0, 0])  # room for a 4-line title
    final = final.filter(pl.col("value").is_finite() & pl.col("n").is_not_null())
    if final.is_empty():
        ax.text(0.5, 0.5, f"{metric}: no finite values", ha="center", va="center", transform=ax.transAxes)
        return _save(fig, path)
    arms = sorted(str(a) for a in final["arm"].drop_nulls().unique().to_list())
    offsets = _arm_offsets(arms)
    for i, arm in enumerate(arms):
        group = final.filter(pl.col("arm") == arm)
        color = _color(arm, i)
        ax.scatter(group["n"].to_numpy() * offsets[arm], group["value"], s=14, alpha=0.45, color=color)
        means = group.group_by("n").agg(pl.col("value").mean()).sort("n")
        result = curves.get(arm)
        fit = result.fit if result is not None else None
        if fit is not None:
            ax.plot(fit.curve_n, fit.law.predict(fit.curve_n), color=color, lw=1.6)
            if np.all(np.isfinite(fit.curve_low)):
                ax.fill_between(fit.curve_n, fit.curve_low, fit.curve_high, color=color, alpha=0.18, lw=0)
            label = f"{arm}: {fit.law.scale:.3g}·(N/{format_count(fit.law.n_ref)})^-{fit.law.alpha:.2f} + {fit.law.offset:.3g}"
        else:
            label = f"{arm}: rung means, no power law"
        ax.plot(means["n"].to_numpy() * offsets[arm], means["value"], "o" if fit is not None else "o:", color=color, ms=5, lw=1.0, label=label)
    _log_n_axis(ax, final["n"].to_list(), size_label)
    _y_for(ax, metric, final["value"].to_list())
    ax.set_ylabel(metric_label(metric))
    reasons = sorted({r.reason for r in curves.values() if r is not None and r.fit is None and r.reason})
    subtitle = "" if not reasons else "\n" + "\n".join(textwrap.wrap("no power law: " + reasons[0], width=80)[:3])
    ax.set_title(f"{metric_label(metric)} vs model size ({metric}){subtitle}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.25)
    return _save(fig, path)


def plot_paired_differences(path: Path, differences: dict[str, list[RungDifference]], *, treatment: str, control: str, size_label: str,
                            pairs: dict[str, pl.DataFrame] | None = None, trends: dict[str, DifferenceTrend] | None = None) -> Path:
    """Treatment minus control vs N, one panel per metric: each seed pair (dots), the rung
    mean with its CI as a band and error bars, zero line, the slope per decade of N."""
    first = (names.COND_LATE_HALF_MEAN_COS, names.VAL_LOSS, EVAL_MEAN_ACC)  # the claims' metrics lead
    metrics = sorted((m for m, rows in differences.items() if rows), key=lambda m: first.index(m) if m in first else len(first))
    cols = max(1, min(3, len(metrics)))
    rows_n = max(1, math.ceil(len(metrics) / cols))
    fig = Figure(figsize=(4.6 * cols, 3.6 * rows_n))
    grid = _grid(fig, rows_n, cols, left=0.95, wspace=1.0, hspace=1.15, top=0.75, bottom=0.7)
    color = _color(treatment, 1)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        rows = sorted(differences[metric], key=lambda r: r.n)
        n = np.array([r.n for r in rows])
        est = np.array([r.difference.estimate for r in rows])
        low = np.array([r.difference.low for r in rows])
        high = np.array([r.difference.high for r in rows])
        has_ci = np.isfinite(low) & np.isfinite(high)
        if pairs is not None and metric in pairs and pairs[metric].height > len(rows):  # more than one pair per rung
            ax.scatter(pairs[metric]["n"], pairs[metric]["diff"], s=10, color="0.45", alpha=0.6, zorder=2, label="seed pairs")
        if has_ci.sum() >= 2:
            ax.fill_between(n[has_ci], low[has_ci], high[has_ci], color=color, alpha=0.2, lw=0, label="CI of the rung mean")
        err = np.vstack([np.where(has_ci, est - low, 0), np.where(has_ci, high - est, 0)])
        ax.errorbar(n, est, yerr=err, fmt="-", color=color, capsize=3, zorder=3)
        if has_ci.any():
            ax.plot(n[has_ci], est[has_ci], "o", color=color, ms=5, zorder=4, label="rung mean ± CI")
        if (~has_ci).any():
            ax.plot(n[~has_ci], est[~has_ci], "o", mfc="white", mec=color, ms=6, zorder=4, label="rung mean, 1 seed: no CI")
        ax.axhline(0.0, color="black", lw=0.8)
        _log_n_axis(ax, n, size_label)
        ax.xaxis.label.set_fontsize(8)
        ax.set_ylabel(f"{treatment} − {control}", fontsize=8)
        title = metric
        trend = (trends or {}).get(metric)
        if trend is not None:
            s = trend.slope_per_decade
            ci = f" [{s.low:+.3g}, {s.high:+.3g}]" if s.has_bounds else f" (no CI: {s.why or 'no bootstrap'})"
            title += f"\nslope per decade of N: {s.estimate:+.3g}{ci}"
        ax.set_title(title, fontsize=8)
        ax.grid(True, alpha=0.25)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    if not metrics:
        fig.add_subplot().text(0.5, 0.5, "no paired runs", ha="center", va="center")
    return _save(fig, path)


def plot_accuracy_curves(path: Path, values: pl.DataFrame, tasks: EvalTasks, *, size_label: str) -> Path:
    """Downstream accuracy vs N at the validation-selected checkpoint, one panel per column of the
    paper's table (the mean first, then each test task; word perplexities last, log y): each seed
    (dots), the arm's mean over seeds with ± one standard deviation, the initial model (step 0,
    grey) and, on the mean panel, the paper's test-selected mean (dashed: optimistic)."""
    test, selection, perplexity = table_columns(tasks)
    per_task = test[:-1] if len(test[:-1]) > 1 else []  # one task: its panel would repeat the mean's
    panels = [MEAN_ACC] + per_task + ([SELECTION_MEAN_ACC] if tasks.selection else []) + perplexity
    frame = values.with_columns(pl.col("metric").str.strip_prefix(f"{names.EVAL_PREFIX}/")).filter(
        pl.col("metric").is_in(panels) & pl.col("value").is_finite() & pl.col("n").is_not_null())
    panels = [p for p in panels if frame.filter(pl.col("metric") == p).height] or [MEAN_ACC]
    cols = min(4, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.9 * cols + 0.4, 3.3 * rows_n + 0.3))
    grid = _grid(fig, rows_n, cols, left=0.8, wspace=0.75, hspace=1.0, top=0.55, bottom=0.7)
    arms = sorted(frame.filter(pl.col("selection") != INITIAL)["arm"].drop_nulls().unique().to_list())
    offsets = _arm_offsets(arms)
    for k, column in enumerate(panels):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        rows = frame.filter(pl.col("metric") == column)
        initial = rows.filter(pl.col("selection") == INITIAL).group_by("n", "seed").agg(pl.col("value").mean())
        if initial.height:
            line = initial.group_by("n").agg(pl.col("value").mean()).sort("n")
            ax.plot(line["n"], line["value"], "x--", color="0.5", ms=5, lw=1.0, label=SELECTION_LABELS[INITIAL])
        for i, arm in enumerate(arms):
            color = _color(arm, i)
            chosen = rows.filter((pl.col("arm") == arm) & (pl.col("selection") == VALIDATION))
            if chosen.height:
                ax.scatter(chosen["n"].to_numpy() * offsets[arm], chosen["value"], s=10, alpha=0.4, color=color)
                stats = chosen.group_by("n").agg(pl.col("value").mean().alias("mean"), pl.col("value").std().fill_null(0.0).alias("std")).sort("n")
                ax.errorbar(stats["n"].to_numpy() * offsets[arm], stats["mean"], yerr=stats["std"], fmt="o-", color=color, ms=4, lw=1.4,
                            capsize=3, label=f"{arm} (validation-selected)")
            paper = rows.filter((pl.col("arm") == arm) & (pl.col("selection") == TEST))
            if column == MEAN_ACC and paper.height:
                line = paper.group_by("n").agg(pl.col("value").mean()).sort("n")
                ax.plot(line["n"].to_numpy() * offsets[arm], line["value"], "o--", mfc="white", color=color, ms=4, lw=0.9,
                        label=f"{arm}, test-selected (optimistic)")
        _log_n_axis(ax, rows["n"].to_list() or frame["n"].to_list(), size_label)
        ax.xaxis.label.set_fontsize(8)
        if column.endswith(WORD_PERPLEXITY):
            spread = rows["value"].max() / max(rows["value"].min(), 1e-12) if rows.height else 1.0
            if spread > 10:  # e.g. the initial model next to trained ones; otherwise a log axis has no labelled tick
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("word perplexity" + (" (log scale)" if spread > 10 else ""), fontsize=8)
        ax.set_title("mean accuracy (the paper's score)" if column == MEAN_ACC else
                     f"{SELECTION_MEAN_ACC} (validation)" if column == SELECTION_MEAN_ACC else column, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.25)
        if k == 0:
            ax.set_ylabel("accuracy (mean ± std over seeds)", fontsize=8)
            ax.legend(fontsize=6)
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
    """The paper's condensation heatmaps of the final profile, one row per rung (small to
    large), the arms side by side: x = layer fraction, y = cosine similarity, colour =
    density (seeds averaged), the per-layer mean cosine drawn over it, one shared colorbar."""
    rungs = profiles.select("rung", "n").unique().sort("n")
    labels = [f"{r} (N={format_count(n)})" if n is not None else str(r) for r, n in rungs.iter_rows()]
    arms = sorted(profiles["arm"].unique().to_list())
    return _heatmap_grid(path, profiles, ("rung", rungs["rung"].to_list()), ("arm", arms), titles=arms, row_labels=labels, empty="no histogram")


_DENSITY_MAX = 10.0  # the paper's colour scale, density 0..10 over cosine in [-1, 1]: used when the data give none


def _heatmap_grid(path: Path, profiles: pl.DataFrame, rows: tuple[str, list], columns: tuple[str, list], *,
                  titles: list[str], empty: str, row_labels: list[str] | None = None) -> Path:
    """One heatmap per (row, column) cell of `profiles`, in the paper's colours (white -> red), with
    one colour scale for all cells set by the data and a shared colorbar."""
    (row_key, row_values), (col_key, col_values) = rows, columns
    n_rows, n_cols = max(1, len(row_values)), max(1, len(col_values))
    fig = Figure(figsize=(3.1 * n_cols + 1.3, 2.5 * n_rows + 0.6))
    grid = _grid(fig, n_rows, n_cols + 1, left=0.95, right=0.55, top=0.45, bottom=0.6, wspace=0.35, hspace=0.45,
                 width_ratios=[1.0] * n_cols + [0.06])
    image = None
    mean_drawn = False
    cells = {(row, column): profiles.filter((pl.col(row_key) == row) & (pl.col(col_key) == column)) for row in row_values for column in col_values}
    made_cells = {key: _mean_histograms(cell) if not cell.is_empty() else None for key, cell in cells.items()}
    densities = [made[1] for made in made_cells.values() if made is not None]
    # The colour scale follows the data (its 99.5th percentile), so sparse densities are not washed out.
    top = float(np.percentile(np.concatenate([d.ravel() for d in densities]), 99.5)) if densities else _DENSITY_MAX
    vmax = top if top > 0 else _DENSITY_MAX
    for r, row in enumerate(row_values):
        for c, column in enumerate(col_values):
            ax = fig.add_subplot(grid[r, c])
            cell = cells[(row, column)]
            made = made_cells[(row, column)]
            if made is None:
                ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=8, transform=ax.transAxes)
                ax.set_xlim(0, 1)
                ax.set_ylim(-1, 1)
            else:
                fractions, hist = made
                # Each column centred on its layer fraction (half a layer of margin either side).
                half = 0.5 / max(1, fractions.size - 1)
                image = ax.imshow(hist.T, origin="lower", aspect="auto", cmap="Reds", vmin=0.0, vmax=vmax,
                                  extent=(float(fractions.min()) - half, float(fractions.max()) + half, -1.0, 1.0))
                means = cell.drop_nulls("mean_cosine").group_by("layer_fraction").agg(pl.col("mean_cosine").mean()).sort("layer_fraction")
                if means.height:
                    ax.plot(means["layer_fraction"], means["mean_cosine"], "o-", color="black", ms=2.5, lw=0.9,
                            label="mean cosine" if not mean_drawn else None)
                    mean_drawn = True
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(f"{(row_labels or row_values)[r]}\ncosine similarity", fontsize=8)
            else:
                ax.set_yticklabels([])
            if r == n_rows - 1:
                ax.set_xlabel("layer fraction (0 = embeddings)", fontsize=8)
            ax.tick_params(labelsize=7)
    if mean_drawn:
        fig.axes[0].legend(fontsize=6, loc="lower right")
    cax = fig.add_subplot(grid[:, n_cols])
    if image is not None:
        bar = fig.colorbar(image, cax=cax, extend="max")
        bar.set_label("density of pairwise cosine", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    else:
        cax.set_axis_off()
    return _save(fig, path)


def plot_heatmaps_over_training(path: Path, probe_profiles: pl.DataFrame, *, rung: str, n: float | None) -> Path:
    """One rung's condensation heatmap at every probe step: a row per arm, a column per step (the
    paper's figure of GPT-2 mid-training), histograms averaged over the seeds of each cell."""
    arms = sorted(probe_profiles["arm"].unique().to_list(), key=lambda a: (a != "baseline", a))
    steps = sorted(probe_profiles["step"].unique().to_list())
    seeds = probe_profiles["seed"].n_unique()
    size = f", N={format_count(n)}" if n else ""
    titles = [f"{rung}{size}\nstep {step}" + (" (initial)" if step == 0 else "") for step in steps]
    return _heatmap_grid(path, probe_profiles, rows=("arm", arms), columns=("step", steps), titles=titles,
                         empty="no probe", row_labels=[f"{arm} ({seeds} seed{'s' * (seeds > 1)})" for arm in arms])


def plot_layer_profiles(path: Path, profiles: pl.DataFrame) -> Path:
    """Final per-layer mean cosine vs layer fraction, one line per rung, one panel per arm
    (shared y, so the arms compare at a glance)."""
    arms = sorted(profiles["arm"].unique().to_list())
    fig = Figure(figsize=(4.4 * max(1, len(arms)) + 0.6, 3.8))
    grid = _grid(fig, 1, max(1, len(arms)), left=0.95, bottom=0.7, top=0.45, wspace=0.45)
    rungs = profiles.select("rung", "n").unique().sort("n")
    cmap = matplotlib.colormaps["viridis"]
    first = None
    for a, arm in enumerate(arms):
        ax = fig.add_subplot(grid[0, a], sharey=first)
        first = first or ax
        for r, (rung, n) in enumerate(rungs.iter_rows()):
            cell = profiles.filter((pl.col("rung") == rung) & (pl.col("arm") == arm)).drop_nulls("mean_cosine")
            if cell.is_empty():
                continue
            line = cell.group_by("layer_fraction").agg(pl.col("mean_cosine").mean()).sort("layer_fraction")
            label = f"{rung} (N={format_count(n)})" if n is not None else str(rung)
            ax.plot(line["layer_fraction"], line["mean_cosine"], "o-", ms=3, color=cmap(r / max(1, rungs.height - 1)), label=label)
        ax.set_title(f"{arm}: final profile", fontsize=9)
        ax.set_xlabel("layer fraction (0 = embeddings)")
        if a == 0:
            ax.set_ylabel("mean cosine similarity")
        else:
            ax.tick_params(labelleft=False)
        ax.grid(True, alpha=0.25)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_profile_over_training(path: Path, layers: pl.DataFrame) -> Path:
    """How the condensation profile moves during training: per-layer mean cosine at every
    probe step (colour = step, dashed = step 0), one row per rung, one column per arm.

    `layers`: columns rung, n, arm, step, layer, value (seeds already averaged or not)."""
    rungs = layers.select("rung", "n").unique().sort("n")
    arms = sorted(layers["arm"].drop_nulls().unique().to_list())
    steps = sorted(layers["step"].unique().to_list())
    n_rows, n_cols = max(1, rungs.height), max(1, len(arms))
    fig = Figure(figsize=(3.6 * n_cols + 1.4, 2.6 * n_rows + 0.7))
    grid = _grid(fig, n_rows, n_cols + 1, left=0.95, right=0.7, top=0.5, bottom=0.65, wspace=0.3, hspace=0.5,
                 width_ratios=[1.0] * n_cols + [0.06])
    cmap = matplotlib.colormaps["viridis_r"]
    norm = matplotlib.colors.Normalize(vmin=min(steps) if steps else 0, vmax=max(steps) if steps else 1)
    first = None
    for r, (rung, n) in enumerate(rungs.iter_rows()):
        for c, arm in enumerate(arms):
            ax = fig.add_subplot(grid[r, c], sharey=first)
            first = first or ax
            cell = layers.filter((pl.col("rung") == rung) & (pl.col("arm") == arm))
            for step in steps:
                line = cell.filter(pl.col("step") == step).group_by("layer").agg(pl.col("value").mean()).sort("layer")
                if line.height:
                    ax.plot(line["layer"], line["value"], "--" if step == 0 else "-", marker="o", ms=2.5, lw=1.1, color=cmap(norm(step)))
            if r == 0:
                ax.set_title(arm, fontsize=9)
            if c == 0:
                label = f"{rung} (N={format_count(n)})" if n is not None else str(rung)
                ax.set_ylabel(f"{label}\nmean cosine", fontsize=8)
            else:
                ax.tick_params(labelleft=False)
            if r == n_rows - 1:
                ax.set_xlabel("layer (0 = embeddings)", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.25)
    if 0 in steps and first is not None:
        first.plot([], [], "--", color=cmap(norm(0)), lw=1.1, label="step 0 (initial state)")
        first.plot([], [], "-", color=cmap(norm(max(steps))), lw=1.1, label="later probes (colour = step)")
        first.legend(fontsize=6, loc="best")
    cax = fig.add_subplot(grid[:, n_cols])
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    if 0 < len(steps) <= 12:
        bar.set_ticks(steps)
    else:
        bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    bar.set_label("probe step" + ("" if 0 in steps else " (no step-0 probe recorded)"), fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return _save(fig, path)


def plot_observation_trends(path: Path, final: pl.DataFrame, *, metric: str) -> Path:
    """Observation studies: metric vs N per (family, source)."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(_grid(fig, 1, 1, left=0.95, bottom=0.7, top=0.35)[0, 0])
    for i, ((family, source), group) in enumerate(sorted(final.group_by("family", "source"), key=lambda item: (str(item[0][0]), str(item[0][1])))):
        group = group.sort("n")
        ax.plot(group["n"], group["value"], "o-", color=f"C{i % 10}", label=f"{family} / {source}")
    _log_n_axis(ax, final["n"].to_list(), "parameters")
    _y_for(ax, metric)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.25)
    return _save(fig, path)


def plot_observation_family(path: Path, final: pl.DataFrame, trends: pl.DataFrame | None, *, family: str) -> Path:
    """One family, as the paper plots it: each condensation metric vs log N, one line per
    text source, with the fitted line a + b·log10 N (slope and Spearman in the legend)."""
    from analysis.observe import OBSERVATION_METRICS

    metrics = [m for m in OBSERVATION_METRICS if final.filter(pl.col("metric") == m).height]
    fig = Figure(figsize=(4.6 * max(1, len(metrics)), 3.9))
    panels = _grid(fig, 1, max(1, len(metrics)), left=0.85, wspace=0.95, bottom=0.7, top=0.45)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(panels[0, k])
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
        _log_n_axis(ax, rows["n"].to_list(), "parameters (log)")
        _y_for(ax, metric)
        if metric != names.COND_LATE_HALF_MEAN_COS:
            ax.axhline(0.0, color="black", lw=0.6)
        ax.set_ylabel(metric.removeprefix("condensation/"))
        ax.set_title(f"{family}: {metric.removeprefix('condensation/')}", fontsize=9)
        ax.grid(True, alpha=0.25)
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


_PHASE_COLORS = {"startup": "#9e9e9e", "data": "#c7b299", "step_without_dispersion": "#2e7d32", "dispersion": "#81c784",
                 "probe": "#1565c0", "eval_export": "#7e57c2", "eval_wait": "#ce93d8", "checkpoint": "#ef6c00", "logging": "#f9a825",
                 "other": "#e0e0e0"}
_PHASE_LABELS = {"step_without_dispersion": "optimizer steps", "dispersion": "steps: dispersion term",
                 "eval_export": "evaluation export", "eval_wait": "waiting for evaluations", "other": "unaccounted"}


def plot_time_split(path: Path, runs: pl.DataFrame, phases: tuple[str, ...], totals: dict[str, float]) -> Path:
    """Where each run's worker-slot seconds went (one stacked bar per run, seconds) and the study's total
    (one bar, share of all slot time): green is training, everything else is what surrounds it."""
    height = max(3.4, 0.22 * runs.height + 2.0)
    fig = Figure(figsize=(10.0, height))
    grid = fig.add_gridspec(1, 2, width_ratios=[4.2, 1.0], left=0.2, right=0.97, bottom=1.1 / height,
                            top=1 - 0.4 / height, wspace=0.25)
    ax, total_ax = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    labels = [f"{r['rung']} {r['arm']} s{r['seed']}" for r in runs.iter_rows(named=True)]
    y = np.arange(runs.height)
    left = np.zeros(runs.height)
    bottom = 0.0
    for phase in phases:
        seconds = runs[phase].fill_null(0.0).to_numpy()
        label = _PHASE_LABELS.get(phase, phase)
        ax.barh(y, seconds, left=left, color=_PHASE_COLORS.get(phase, "#607d8b"), label=label, height=0.75)
        left += seconds
        share = totals.get(phase, 0.0)
        total_ax.bar([0], [share], bottom=bottom, color=_PHASE_COLORS.get(phase, "#607d8b"), width=0.6)
        if share >= 0.04:
            total_ax.text(0, bottom + share / 2, f"{share:.0%}", ha="center", va="center", fontsize=8)
        bottom += share
    beside = runs["finishing_s"].fill_null(0.0).to_numpy() if "finishing_s" in runs.columns else np.zeros(runs.height)
    if beside.any():  # after the slot: the worker group already trains the chain's next run
        shown = beside > 0
        ax.barh(y[shown], beside[shown], left=left[shown], color="none", edgecolor="#9e9e9e", hatch="////", linewidth=0.5, height=0.75,
                label="records finished beside the next run (not slot time)")
    for yi, goodput in zip(y, runs["goodput"].to_numpy()):
        ax.text((left[yi] + beside[yi]) * 1.01, yi, f"{goodput:.2f}", va="center", fontsize=7, color="#424242")
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, float((left + beside).max()) * 1.1 if runs.height else 1.0)
    ax.set_xlabel("seconds of the run's worker slot (number: goodput = optimizer-step share)")
    ax.set_title("Where each run's slot time went", fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), fontsize=7, loc="lower center", ncol=5, frameon=False)
    total_ax.set_xlim(-0.6, 0.6)
    total_ax.set_ylim(0, 1)
    total_ax.set_xticks([])
    total_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    total_ax.set_title("study total", fontsize=10)
    return _save(fig, path)
