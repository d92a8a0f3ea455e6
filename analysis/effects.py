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

from analysis.fit import FitOptions, Interval, PowerLawFit, compute_trend, group_indices, interval_from_samples, resample_within_groups
from scaling.errors import DataError


@dataclass(frozen=True)
class RungDifference:
    """Treatment minus control at one rung, mean over seed pairs, bootstrap CI over pairs."""

    rung: str
    n: float
    n_pairs: int
    difference: Interval


@dataclass(frozen=True)
class DifferenceTrend:
    """How the paired difference changes with size."""

    slope_per_decade: Interval
    """OLS slope of the per-pair difference against log10 N (CI: pairs resampled within rungs)."""
    spearman: Interval | None
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
class LambdaRule:
    """Best lambda per rung and the fitted rule lambda*(N) = k * N^beta (log-log OLS)."""

    best: tuple[tuple[str, float, float, float], ...]
    """(rung, N, best lambda, its validation loss) per rung."""
    coefficient: float
    exponent: float
    exponent_interval: Interval | None
    note: str = ""


def pair_arms(final: pl.DataFrame, *, treatment: str, control: str) -> pl.DataFrame:
    """Join treatment and control final values on (rung, seed); columns rung, n, seed, diff."""
    keys = ["rung", "n", "seed"]
    treat = final.filter(pl.col("arm") == treatment).select(*keys, pl.col("value").alias("treatment"))
    ctrl = final.filter(pl.col("arm") == control).select(*keys, pl.col("value").alias("control"))
    paired = treat.join(ctrl, on=keys, how="inner")
    return paired.with_columns((pl.col("treatment") - pl.col("control")).alias("diff")).drop_nans("diff").sort("n", "seed")


def compute_paired_differences(paired: pl.DataFrame, options: FitOptions = FitOptions()) -> list[RungDifference]:
    """Per rung: mean paired difference with a bootstrap CI over seed pairs (NaN with one pair)."""
    rng = np.random.default_rng(options.seed)
    results = []
    for (rung, n), group in paired.group_by("rung", "n", maintain_order=True):
        diffs = group["diff"].to_numpy()
        index = [np.arange(diffs.size)]
        samples = np.array([np.mean(resample_within_groups(np.zeros(diffs.size), diffs, index, rng)[1]) for _ in range(options.n_bootstrap if diffs.size > 1 else 0)])
        results.append(RungDifference(str(rung), float(n), int(diffs.size), interval_from_samples(float(np.mean(diffs)), samples, options.confidence)))
    return results


def _slope_per_decade(n: np.ndarray, diff: np.ndarray) -> float:
    x = np.log10(n)
    if np.ptp(x) == 0:
        return math.nan
    return float(np.polyfit(x, diff, 1)[0])


def compute_difference_trend(paired: pl.DataFrame, options: FitOptions = FitOptions()) -> DifferenceTrend:
    """Does the benefit shrink or grow with scale? Slope per decade of N, and Spearman."""
    n = paired["n"].to_numpy().astype(float)
    diff = paired["diff"].to_numpy().astype(float)
    groups = group_indices(n)
    if len(groups) < 2:
        raise DataError(f"paired difference: pairs at {len(groups)} rung(s); a trend with N needs >= 2 rungs")
    rng = np.random.default_rng(options.seed)
    samples = []
    if all(g.size >= 2 for g in groups):
        for _ in range(options.n_bootstrap):
            n_b, d_b = resample_within_groups(n, diff, groups, rng)
            samples.append(_slope_per_decade(n_b, d_b))
    slope = interval_from_samples(_slope_per_decade(n, diff), np.array(samples, dtype=float), options.confidence)
    try:
        spearman = compute_trend(n, diff, options, what="paired difference").spearman
        note = ""
    except DataError as err:
        spearman, note = None, str(err)
    return DifferenceTrend(slope, spearman, note)


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
            results.append(Multiplier(str(rung), n, target, Interval(estimate, math.nan, math.nan), note or "no bootstrap (one seed pair or no baseline bootstrap)"))
            continue
        draws = np.empty(len(laws))
        index = [np.arange(diffs.size)]
        for i, law in enumerate(laws):
            shift = float(np.mean(resample_within_groups(np.zeros(diffs.size), diffs, index, rng)[1]))
            draws[i] = law.size_reaching(float(law.predict(n)) + shift) / n
        low, high = _percentile_with_inf(draws, options.confidence)
        results.append(Multiplier(str(rung), n, target, Interval(estimate, low, high), note))
    return results


def compute_lambda_rule(trials: pl.DataFrame, options: FitOptions = FitOptions()) -> LambdaRule:
    """Best lambda per rung from sweep trials and the log-log rule lambda*(N) = k N^beta.

    `trials`: one row per finished trial with `rung`, `n`, `lambda`, `value` (validation
    loss) and `best_trial`. A trial tagged best_trial wins; otherwise the lowest loss.
    """
    usable = trials.drop_nulls(["lambda", "value"]).filter(pl.col("value").is_finite())
    if usable.is_empty():
        raise DataError("lambda rule: no finished sweep trial with both dispersion.lambda and val/loss; run a sweep first")
    best = []
    for (rung, n), group in usable.group_by("rung", "n", maintain_order=True):
        flagged = group.filter(pl.col("best_trial").fill_null(False))
        row = (flagged if not flagged.is_empty() else group).sort("value").row(0, named=True)
        best.append((str(rung), float(n), float(row["lambda"]), float(row["value"])))
    best.sort(key=lambda item: item[1])
    positive = [(n, lam) for _, n, lam, _ in best if lam > 0]
    if len(positive) < 2:
        return LambdaRule(tuple(best), math.nan, math.nan, None, f"{len(positive)} rung(s) with a positive best lambda; a lambda*(N) rule needs >= 2")
    x = np.log([p[0] for p in positive])
    y = np.log([p[1] for p in positive])
    slope, intercept = np.polyfit(x, y, 1)
    interval, note = None, ""
    if len(positive) >= 3:
        # Classical OLS interval of the slope (t with m - 2 degrees of freedom).
        from scipy import stats

        resid = y - (slope * x + intercept)
        se = math.sqrt(float(np.sum(resid**2)) / (len(x) - 2) / float(np.sum((x - x.mean()) ** 2)))
        t = float(stats.t.ppf(0.5 + options.confidence / 2, len(x) - 2))
        interval = Interval(float(slope), float(slope - t * se), float(slope + t * se))
    else:
        note = "two rungs: the exponent has no interval"
    return LambdaRule(tuple(best), float(math.exp(intercept)), float(slope), interval, note)
