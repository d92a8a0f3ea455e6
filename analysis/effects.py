"""Paired effects of an arm against the baseline, and the best-lambda rule from sweeps.

Pure functions over numpy arrays and Polars frames of final values (one row per run with
columns `rung`, `n`, `arm`, `seed`, `value`); nothing reads MLflow or writes files.
Arms are paired by (rung, seed): the trainer gives paired arms the same seed, data order
and initialisation, so the per-seed difference removes most of the seed-to-seed noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from analysis.fit import RANK_METRICS, FitOptions, Interval, PowerLawFit, is_constant, resample_within_groups, rung_slope, t_interval
from scaling import names
from scaling.errors import DataError

EVAL_MEAN_ACC = names.EVAL_MEAN_ACC  # mean downstream accuracy, logged when a study evaluates tasks
MIN_PAIRS_FOR_INTERVAL = 3
"""Fewest seed pairs at a rung for a per-rung interval: with 2, t has 1 df and multiplies the
standard error by 12.7 (an interval wider than anything a difference of ranks can take)."""

_UNIT_METRICS = frozenset({names.COND_LAST_LAYER_MEAN_COS, names.COND_LATE_HALF_MEAN_COS, names.EVAL_MEAN_ACC,
                           names.EVAL_SELECTION_MEAN_ACC})


def value_range(metric: str) -> tuple[float, float]:
    """What one value of `metric` can take: rank correlations [-1, 1]; mean cosines with the
    diagonal (||sum x||^2 / T^2) and accuracies [0, 1]; losses [0, inf)."""
    if metric in RANK_METRICS:
        return (-1.0, 1.0)
    if metric in _UNIT_METRICS or (metric.startswith("condensation/") and metric.endswith("mean_cos")):
        return (0.0, 1.0)
    if metric.startswith(f"{names.EVAL_PREFIX}/") and metric.endswith("/acc"):
        return (0.0, 1.0)
    return (0.0, math.inf) if "loss" in metric else (-math.inf, math.inf)


def difference_range(metric: str, *, relative: bool = False) -> tuple[float, float]:
    """What a treatment-minus-control difference of `metric` can take ((t - c) / c >= -1 for
    positive values)."""
    low, high = value_range(metric)
    if relative:
        return (-1.0, math.inf) if low >= 0 else (-math.inf, math.inf)
    return (low - high, high - low)


def slope_range(metric: str, n: np.ndarray, *, difference: bool = False) -> tuple[float, float]:
    """What a least-squares slope of rung means per decade of N can take, given the values' range."""
    low, high = difference_range(metric) if difference else value_range(metric)
    x = np.log10(np.unique(np.asarray(n, dtype=float)))
    if x.size < 2 or not (math.isfinite(low) and math.isfinite(high)):
        return (-math.inf, math.inf)
    weights = (x - x.mean()) / float(np.sum((x - x.mean()) ** 2))
    most = float(np.sum(np.abs(weights))) * (high - low) / 2.0
    return (-most, most)


@dataclass(frozen=True)
class RungDifference:
    """Treatment minus control at one rung: mean over seed pairs, a t interval from 3 pairs on,
    else the pairs themselves and their spread."""

    rung: str
    n: float
    n_pairs: int
    difference: Interval
    pairs: tuple[float, ...] = ()
    """Every seed pair's difference, small seed first."""
    spread: float = math.nan
    """Standard deviation of the pairs (NaN with one)."""


@dataclass(frozen=True)
class DifferenceTrend:
    """How the paired difference changes with size."""

    slope_per_decade: Interval
    """OLS slope of the rung means of the difference on log10 N; t interval with R - 2 df (the
    rung as a random effect), none below 3 rungs."""
    note: str = ""


@dataclass(frozen=True)
class Multiplier:
    """N at which the baseline's fitted curve reaches the treatment's value, over the rung's N."""


    rung: str
    n: float
    treatment_value: float
    """The treatment's value read on the baseline curve: baseline fit at N + mean paired difference."""
    multiplier: Interval
    note: str = ""


@dataclass(frozen=True)
class BestLambda:
    """A sweep's best lambda at one rung, as found: one seed per trial, so no interval."""

    rung: str
    n: float
    best_lambda: float
    val_loss: float
    tried: tuple[float, float]
    """Smallest and largest lambda any finished trial of the rung tried."""
    at_bound: bool
    """The best lambda is the smallest or largest tried: the optimum may lie outside the range."""


def pair_arms(final: pl.DataFrame, *, treatment: str, control: str, relative: bool = False) -> pl.DataFrame:
    """Join treatment and control final values on (rung, seed); columns rung, n, seed, diff
    (treatment - control, or that over |control| when `relative`)."""
    keys = ["rung", "n", "seed"]
    treat = final.filter(pl.col("arm") == treatment).select(*keys, pl.col("value").alias("treatment"))
    ctrl = final.filter(pl.col("arm") == control).select(*keys, pl.col("value").alias("control"))
    paired = treat.join(ctrl, on=keys, how="inner")
    diff = pl.col("treatment") - pl.col("control")
    if relative:
        diff = diff / pl.col("control").abs()
    return paired.with_columns(diff.alias("diff")).drop_nans("diff").filter(pl.col("diff").is_finite()).sort("n", "seed")


def compute_paired_differences(paired: pl.DataFrame, options: FitOptions = FitOptions(), *,
                                bounds: tuple[float, float] = (-math.inf, math.inf)) -> list[RungDifference]:
    """Per rung: mean paired difference; from `MIN_PAIRS_FOR_INTERVAL` pairs on a t interval
    (k - 1 df) clipped to `bounds`, below that no interval: the pairs and their spread are the result."""
    results = []
    for (rung, n), group in paired.group_by("rung", "n", maintain_order=True):
        diffs = group.sort("seed")["diff"].to_numpy().astype(float)
        spread = float(diffs.std(ddof=1)) if diffs.size > 1 else math.nan
        if diffs.size >= MIN_PAIRS_FOR_INTERVAL and spread > 0:
            interval = t_interval(float(diffs.mean()), spread / math.sqrt(diffs.size), diffs.size - 1, options.confidence, bounds)
        elif diffs.size >= MIN_PAIRS_FOR_INTERVAL:
            interval = Interval(float(diffs.mean()), math.nan, math.nan, f"every one of the {diffs.size} pairs differs by the same amount: no spread")
        else:
            why = "1 seed" if diffs.size < 2 else f"{diffs.size} pairs: shown as points (a t interval with {diffs.size - 1} df is not informative)"
            interval = Interval(float(diffs.mean()), math.nan, math.nan, why)
        results.append(RungDifference(str(rung), float(n), int(diffs.size), interval, tuple(diffs.tolist()), spread))
    return results


def compute_difference_trend(paired: pl.DataFrame, options: FitOptions = FitOptions(), *,
                             bounds: tuple[float, float] = (-math.inf, math.inf)) -> DifferenceTrend:
    """Does the benefit shrink or grow with scale? Slope of the rung means per decade of N.

    Raises `DataError` with fewer than 2 rungs or a constant difference (e.g. both arms'
    rank correlations saturated at +1, so every pair differs by 0)."""
    n = paired["n"].to_numpy().astype(float)
    diff = paired["diff"].to_numpy().astype(float)
    if np.unique(n).size < 2:
        raise DataError("paired difference: only one size; a trend with N needs >= 2 rungs; add rungs")
    if is_constant(diff):
        raise DataError(f"paired difference: constant at {diff[0]:.6g} in every pair; no trend to report")
    slope, _, se, rungs = rung_slope(n, diff)
    if math.isfinite(se) and se > 0:
        interval = t_interval(slope, se, rungs - 2, options.confidence, bounds)
        note = f"{rungs} rungs: {rungs - 2} df" if rungs < 5 else ""
    else:
        interval = Interval(slope, math.nan, math.nan, f"{rungs} rungs: a slope through fewer than 3 rung means has no error estimate")
        note = ""
    return DifferenceTrend(interval, note)


def _percentile_with_inf(values: np.ndarray, confidence: float) -> tuple[float, float]:
    # 'nearest' never interpolates between a finite value and inf (which would give NaN).
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(values, [tail, 100.0 - tail], method="nearest")
    return float(low), float(high)


def compute_parameter_multipliers(baseline_fit: PowerLawFit, paired: pl.DataFrame, options: FitOptions = FitOptions()) -> list[Multiplier]:
    """Effective-parameter multiplier per rung: N_eff / N where baseline(N_eff) = treatment.

    The treatment's loss is read as the baseline curve at N plus the mean paired
    difference: pairing cancels the seed noise both arms share, which comparing the raw
    treatment mean with the curve would keep. The CI pairs each bootstrap law of the
    baseline with a resample of the seed pairs. inf = the treatment beats the baseline's
    asymptote c, so no baseline size reaches it.
    """
    rng = np.random.default_rng(options.seed)
    laws = baseline_fit.boot_laws
    results = []
    for (rung, n), group in paired.group_by("rung", "n", maintain_order=True):
        n = float(n)
        diffs = group["diff"].to_numpy().astype(float)
        target = float(baseline_fit.law.predict(n)) + float(np.mean(diffs))
        estimate = baseline_fit.law.size_reaching(target) / n
        note = "treatment below the baseline's fitted asymptote: no baseline size reaches it" if math.isinf(estimate) else ""
        if not laws or diffs.size < 2:
            why = "1 seed" if diffs.size < 2 else "the baseline fit has no bootstrap"
            results.append(Multiplier(str(rung), n, target, Interval(estimate, math.nan, math.nan, why), note))
            continue
        draws = np.empty(len(laws))
        index = [np.arange(diffs.size)]
        for i, law in enumerate(laws):
            shift = float(np.mean(resample_within_groups(np.zeros(diffs.size), diffs, index, rng)[1]))
            draws[i] = law.size_reaching(float(law.predict(n)) + shift) / n
        low, high = _percentile_with_inf(draws, options.confidence)
        results.append(Multiplier(str(rung), n, target, Interval(estimate, low, high), note))
    return results


def compute_best_lambdas(trials: pl.DataFrame) -> tuple[BestLambda, ...]:
    """Best lambda per rung from sweep trials, small rung first.

    `trials`: one row per finished trial with `rung`, `n`, `lambda`, `value` (validation loss)
    and `best_trial`. A trial tagged best_trial wins; otherwise the lowest loss. No rule
    lambda*(N) is fitted: each best is one seed's argmin over a handful of trials, with no
    uncertainty, and a rule through 3-4 such points would predict nothing it was tested on.
    """
    usable = trials.drop_nulls(["lambda", "value"]).filter(pl.col("value").is_finite())
    if usable.is_empty():
        raise DataError("best lambda: no finished sweep trial with both dispersion.lambda and val/loss; run a sweep first")
    best = []
    for (rung, n), group in usable.group_by("rung", "n", maintain_order=True):
        flagged = group.filter(pl.col("best_trial").fill_null(False))
        row = (flagged if not flagged.is_empty() else group).sort("value").row(0, named=True)
        low, high = float(group["lambda"].min()), float(group["lambda"].max())
        lam = float(row["lambda"])
        at_bound = group["lambda"].n_unique() > 1 and (math.isclose(lam, low) or math.isclose(lam, high))
        best.append(BestLambda(str(rung), float(n), lam, float(row["value"]), (low, high), bool(at_bound)))
    return tuple(sorted(best, key=lambda b: b.n))
