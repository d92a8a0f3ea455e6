"""Observation studies (kind=observe): condensation of pretrained families against size.

Pure mechanics on Polars frames of final values (no MLflow, no files): per family and text
source, the trend of each condensation metric with log N (Spearman with a bootstrap CI, as
`analysis.fit.compute_trend`) and a fitted straight line metric = a + b * log10 N with a
case-bootstrap CI on the slope b; plus the comparison with the paper's published figures.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from analysis.fit import FitOptions, compute_trend, interval_from_samples
from scaling import names
from scaling.errors import DataError

OBSERVATION_METRICS = (names.COND_SPEARMAN, names.COND_KENDALL, names.COND_LATE_HALF_MEAN_COS)
"""What the observation report trends against N (the paper plots the first)."""

# Spearman of per-layer mean cosine vs depth on wikitext, read off the paper's plots
# (arXiv 2602.00217, figure of the first finding; about +-0.05). Keyed by hub name.
PAPER_SPEARMAN_WIKITEXT = {
    "gpt2": 0.38,
    "gpt2-medium": -0.06,
    "gpt2-large": 0.11,
    "gpt2-xl": -0.59,
    "Qwen/Qwen3-0.6B": 0.90,
    "Qwen/Qwen3-32B": -0.46,
}
PAPER_TOLERANCE = 0.05
PAPER_SOURCE = "wikitext"


def compute_log_slope(n: np.ndarray, y: np.ndarray, options: FitOptions) -> tuple[float, float, float]:
    """Least-squares slope of y on log10 N (change per decade) with a case-bootstrap CI
    (NaN bounds with fewer than 4 points or when every resample is degenerate)."""
    x = np.log10(np.asarray(n, dtype=float))
    y = np.asarray(y, dtype=float)
    if np.unique(x).size < 2:
        return math.nan, math.nan, math.nan
    estimate = float(np.polyfit(x, y, 1)[0])
    samples = []
    if x.size >= 4:
        rng = np.random.default_rng(options.seed)
        for _ in range(options.n_bootstrap):
            idx = rng.integers(0, x.size, x.size)
            if np.unique(x[idx]).size >= 2:
                samples.append(float(np.polyfit(x[idx], y[idx], 1)[0]))
    interval = interval_from_samples(estimate, np.array(samples, dtype=float), options.confidence)
    return estimate, interval.low, interval.high


def compute_observation_trends(observe: pl.DataFrame, options: FitOptions) -> pl.DataFrame | None:
    """One row per (family, source, metric): Spearman vs log N with CI, slope per decade with CI.

    `observe` holds final values of finished kind=observe runs (columns family, source,
    metric, value, n). None when there is nothing to trend.
    """
    rows = observe.filter(pl.col("metric").is_in(list(OBSERVATION_METRICS)) & pl.col("value").is_finite()).drop_nulls("n")
    if rows.is_empty():
        return None
    order = {m: i for i, m in enumerate(OBSERVATION_METRICS)}
    out = []
    groups = sorted(rows.group_by("family", "source", "metric"), key=lambda item: (str(item[0][0]), str(item[0][1]), order[item[0][2]]))
    for (family, source, metric), group in groups:
        record = {"family": str(family), "source": str(source), "metric": str(metric), "models": group.height,
                  "spearman_vs_log_n": math.nan, "low": math.nan, "high": math.nan,
                  "slope_per_decade": math.nan, "slope_low": math.nan, "slope_high": math.nan, "note": ""}
        n, y = group["n"].to_numpy(), group["value"].to_numpy()
        try:
            trend = compute_trend(n, y, options, what=f"{family}/{source}/{metric}")
            record.update(spearman_vs_log_n=trend.spearman.estimate, low=trend.spearman.low, high=trend.spearman.high, note=trend.note)
        except DataError as err:
            record["note"] = str(err)
        slope, low, high = compute_log_slope(n, y, options)
        record.update(slope_per_decade=slope, slope_low=low, slope_high=high)
        out.append(record)
    return pl.DataFrame(out, infer_schema_length=None)


_ACCURACY_METRIC = r"^eval/([^/]+/(acc|word_perplexity)|mean_acc|selection_mean_acc)$"
"""Downstream results shown next to condensation: task accuracies, their means, word perplexities."""


def _accuracy_metrics(observe: pl.DataFrame) -> list[str]:
    found = observe.filter(pl.col("metric").str.contains(_ACCURACY_METRIC))["metric"].unique().to_list()
    # The paper's score first, then the tasks' accuracies, then perplexities.
    return sorted(found, key=lambda m: (m != names.EVAL_MEAN_ACC, m.endswith("word_perplexity"), m))


def build_observation_table(observe: pl.DataFrame) -> pl.DataFrame:
    """One row per finished (family, model, source): N, the summary metrics and, when the models
    were evaluated, their downstream results (per model, whichever source's run logged them)."""
    accuracy = _accuracy_metrics(observe)
    wanted = observe.filter(pl.col("metric").is_in([*OBSERVATION_METRICS, names.COND_LAST_LAYER_MEAN_COS, *accuracy]))
    if wanted.is_empty():
        return pl.DataFrame()
    table = wanted.pivot(on="metric", index=["family", "model", "source", "n"], values="value", aggregate_function="first")
    return table.with_columns(pl.col(m).mean().over("family", "model") for m in accuracy).sort("family", "source", "n")


def build_observation_accuracy(observe: pl.DataFrame) -> pl.DataFrame:
    """Accuracy next to condensation per pretrained model: one row per (family, model), N, its
    downstream results and its Spearman per text source; empty when no model was evaluated."""
    accuracy = _accuracy_metrics(observe)
    if not accuracy:
        return pl.DataFrame()
    models = (observe.filter(pl.col("metric").is_in(accuracy))
              .pivot(on="metric", index=["family", "model", "n"], values="value", aggregate_function="mean"))
    spearman = observe.filter((pl.col("metric") == names.COND_SPEARMAN) & pl.col("source").is_not_null())
    if spearman.height:
        per_source = (spearman.with_columns(pl.format("spearman ({})", pl.col("source")).alias("column"))
                      .pivot(on="column", index=["family", "model"], values="value", aggregate_function="first"))
        models = models.join(per_source, on=["family", "model"], how="left")
    return models.select("family", "model", "n", *accuracy, *[c for c in models.columns if c.startswith("spearman (")]).sort("family", "n")


def compare_with_paper(observe: pl.DataFrame) -> pl.DataFrame:
    """Measured vs the paper's Spearman on wikitext for the paper's models present in the study
    (empty when the study does not hold them: then it is not the paper's study)."""
    rows = observe.filter((pl.col("metric") == names.COND_SPEARMAN) & (pl.col("source") == PAPER_SOURCE)
                          & pl.col("model").is_in(list(PAPER_SPEARMAN_WIKITEXT)))
    out = []
    for row in rows.sort("family", "n").iter_rows(named=True):
        paper = PAPER_SPEARMAN_WIKITEXT[row["model"]]
        diff = row["value"] - paper
        out.append({"family": row["family"], "model": row["model"], "n": row["n"], "measured": row["value"], "paper": paper,
                    "difference": diff, "within_tolerance": bool(abs(diff) <= PAPER_TOLERANCE)})
    return pl.DataFrame(out, infer_schema_length=None) if out else pl.DataFrame()
