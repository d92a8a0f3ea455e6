"""Paired effects of an arm against the baseline, and the best-lambda rule from sweeps.

Pure functions over numpy arrays and Polars frames of final values (one row per run with
columns `rung`, `n`, `arm`, `seed`, `value`); nothing reads MLflow or writes files.
Arms are paired by (rung, seed): the trainer gives paired arms the same seed, data order
and initialisation, so the per-seed difference removes most of the seed-to-seed noise.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from analysis.fit import (
    FitOptions,
    Interval,
    PowerLawFit,
    compute_trend,
    group_indices,
    interval_from_bootstrap_se,
    resample_within_groups,
    welch_df,
)
from scaling import names
from scaling.errors import ConfigError, DataError


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
    """OLS slope of the per-pair difference against log10 N (CI: pairs resampled within rungs,
    or across sizes when some rung has one pair)."""
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


def compute_paired_differences(paired: pl.DataFrame, options: FitOptions = FitOptions()) -> list[RungDifference]:
    """Per rung: mean paired difference, CI = mean +- t(k-1) x bootstrap SE over the k seed
    pairs (no CI with one pair)."""
    rng = np.random.default_rng(options.seed)
    results = []
    for (rung, n), group in paired.group_by("rung", "n", maintain_order=True):
        diffs = group["diff"].to_numpy()
        index = [np.arange(diffs.size)]
        samples = np.array([np.mean(resample_within_groups(np.zeros(diffs.size), diffs, index, rng)[1]) for _ in range(options.n_bootstrap if diffs.size > 1 else 0)])
        why = "1 seed" if diffs.size < 2 else "bootstrap disabled (n_bootstrap=0)"
        # t with k - 1 df: with 2 pairs a percentile interval spans only +-1.4 standard errors.
        interval = interval_from_bootstrap_se(float(np.mean(diffs)), samples, options.confidence, float(diffs.size - 1), why=why)
        results.append(RungDifference(str(rung), float(n), int(diffs.size), interval))
    return results


def compute_difference_trend(paired: pl.DataFrame, options: FitOptions = FitOptions()) -> DifferenceTrend:
    """Does the benefit shrink or grow with scale? Slope per decade of N, and Spearman.

    Raises `DataError` with fewer than 2 rungs or a constant difference (e.g. both arms'
    rank correlations saturated at +1, so every pair differs by 0)."""
    n = paired["n"].to_numpy().astype(float)
    diff = paired["diff"].to_numpy().astype(float)
    trend = compute_trend(n, diff, options, what="paired difference")
    return DifferenceTrend(trend.slope_per_decade, trend.spearman, trend.note)


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


# --- the paper's claims ----------------------------------------------------------------------------
#
# Each claim of arXiv 2602.00217 that a training study can test becomes one statistic with a
# bootstrap CI and a verdict read off the CI alone: "supported" when the whole interval lies
# on the claimed side of the threshold, "contradicted" when it lies wholly on the other side,
# "inconclusive" when it straddles it or there is no interval, "not tested" when the study
# did not record what the claim needs.

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTED = "supported", "contradicted", "inconclusive", "not tested"
VERDICTS = (SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_TESTED)
EVAL_MEAN_ACC = names.EVAL_MEAN_ACC  # mean downstream accuracy, logged when a study evaluates tasks
MAX_LOSS_COST = 0.01  # claim (c): dispersion costs at most 1% validation loss


@dataclass(frozen=True)
class VerdictRule:
    """Where the CI must lie for the claim to hold."""

    side: str
    """'below' or 'above' `threshold`, or 'nonzero' (the CI excludes 0, either side)."""
    threshold: float = 0.0
    inclusive: bool = False
    """A bound equal to the threshold still supports the claim (claim c: '<= +1%')."""

    def __post_init__(self) -> None:
        if self.side not in ("below", "above", "nonzero"):
            raise ConfigError(f"VerdictRule side={self.side!r}: use 'below', 'above' or 'nonzero'")

    def describe(self) -> str:
        t = f"{self.threshold:g}"
        if self.side == "nonzero":
            return "supported if the CI excludes 0; otherwise inconclusive (no CI can show 'no change')"
        mine, other = ("upper", "lower") if self.side == "below" else ("lower", "upper")
        cmp = ("<=" if self.inclusive else "<") if self.side == "below" else (">=" if self.inclusive else ">")
        opposite = ">" if self.side == "below" else "<"
        return f"supported if the CI's {mine} bound {cmp} {t}; contradicted if its {other} bound {opposite} {t}; else inconclusive"


def decide_verdict(interval: Interval, rule: VerdictRule) -> str:
    """Supported / contradicted / inconclusive from the CI alone (never the point estimate)."""
    if not interval.has_bounds:
        return INCONCLUSIVE
    low, high, t = interval.low, interval.high, rule.threshold
    if rule.side == "nonzero":
        return SUPPORTED if (low > 0 or high < 0) else INCONCLUSIVE
    if rule.side == "below":
        if high < t or (rule.inclusive and high <= t):
            return SUPPORTED
        return CONTRADICTED if low > t else INCONCLUSIVE
    if low > t or (rule.inclusive and low >= t):
        return SUPPORTED
    return CONTRADICTED if high < t else INCONCLUSIVE


@dataclass(frozen=True)
class PooledMean:
    """Mean over a ladder's units (seed pairs, or initialisations), rungs weighted equally."""

    mean: Interval
    n_units: int
    n_rungs: int
    units_per_rung: int
    """Fewest units at any rung (the seeds behind the thinnest rung)."""
    note: str = ""


def compute_pooled_mean(n: np.ndarray, values: np.ndarray, options: FitOptions = FitOptions(), *, unit: str = "pair") -> PooledMean:
    """Mean of the rung means of `values`, CI = mean +- t(df) x bootstrap SE.

    Every rung with >= 2 units: units resampled within rungs (the CI of the average effect
    over these rungs), df by Welch-Satterthwaite from the rungs' spreads. Some rung with one
    unit (1 seed) but >= 4 units: units resampled across the ladder, treating rungs as
    exchangeable (noted), df = units - 1. Otherwise no interval.
    """
    n = np.asarray(n, dtype=float)
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise DataError(f"pooled mean: no {unit}s to average")
    groups = group_indices(n)
    per_rung = min(g.size for g in groups)

    def rung_mean(v: np.ndarray, parts: list[np.ndarray]) -> float:
        return float(np.mean([np.mean(v[g]) for g in parts]))

    estimate = rung_mean(values, groups)
    rng = np.random.default_rng(options.seed)
    samples, note = [], ""
    why = "bootstrap disabled (n_bootstrap=0)"
    df = math.nan
    if per_rung >= 2:
        for _ in range(options.n_bootstrap):
            n_b, v_b = resample_within_groups(n, values, groups, rng)
            samples.append(rung_mean(v_b, group_indices(n_b)))
        weights = np.empty(values.size)
        for g in groups:
            weights[g] = 1.0 / (len(groups) * g.size)
        df = welch_df(values, groups, weights)
    elif values.size >= 4:
        note = f"1 seed at some rung: {unit}s resampled across rungs (rungs taken as exchangeable)"
        for _ in range(options.n_bootstrap):
            idx = rng.integers(0, values.size, values.size)
            samples.append(float(np.mean(values[idx])))
        df = float(values.size - 1)
    else:
        why = f"1 seed, {values.size} {unit}{'s' if values.size != 1 else ''}"
    interval = interval_from_bootstrap_se(estimate, np.array(samples, dtype=float), options.confidence, df, why=why)
    return PooledMean(interval, int(values.size), len(groups), int(per_rung), note)


@dataclass(frozen=True)
class ClaimCheck:
    """One of the paper's claims tested on a study: statistic, CI, verdict and what it rests on."""

    key: str
    """'a'..'f', as listed in `PAPER_CLAIMS`."""
    claim: str
    metric: str
    statistic: str
    """What `estimate` is, in words."""
    estimate: Interval
    verdict: str
    rule: str
    n_units: int
    """Pairs, initialisations or runs the estimate averages (0 when not tested)."""
    unit: str
    n_rungs: int
    seeds_per_rung: int
    """Fewest seeds at any rung (< 2: no within-rung interval)."""
    paper: str
    """What the paper says."""
    contradicts_paper: bool
    note: str = ""


@dataclass(frozen=True)
class ClaimSpec:
    """A claim's fixed wording, metric and decision rule."""

    key: str
    claim: str
    metric: str
    statistic: str
    rule: VerdictRule
    paper: str
    against_paper: str
    """The verdict that goes against the paper ('' when the paper takes no side)."""


PAPER_CLAIMS = (
    ClaimSpec("a", "models are condensed at initialisation", names.COND_SPEARMAN,
              "mean Spearman(layer, mean cosine) at step 0 over initialisations",
              VerdictRule("above", 0.0), "random initialisation: Spearman close to +1", CONTRADICTED),
    ClaimSpec("b", "the dispersion loss lowers late-layer mean cosine", names.COND_LATE_HALF_MEAN_COS,
              "mean paired difference dispersion - baseline (final)",
              VerdictRule("below", 0.0), "dispersion counteracts condensation", CONTRADICTED),
    ClaimSpec("c", "the dispersion loss costs at most 1% validation loss", names.VAL_LOSS,
              "mean paired relative difference (dispersion - baseline) / baseline (final)",
              VerdictRule("below", MAX_LOSS_COST, inclusive=True), "dispersion improves generalisation", CONTRADICTED),
    ClaimSpec("d", "smaller models condense more (baseline late-half mean cosine falls with N)", names.COND_LATE_HALF_MEAN_COS,
              "slope of the baseline's final value per decade of N",
              VerdictRule("below", 0.0), "small models condense more than large ones", CONTRADICTED),
    ClaimSpec("e", "the dispersion effect on late-half mean cosine changes with N", names.COND_LATE_HALF_MEAN_COS,
              "slope of the paired difference (dispersion - baseline) per decade of N",
              VerdictRule("nonzero"), "no direct claim (its framing: small models need it most)", ""),
    ClaimSpec("f", "the dispersion loss improves downstream accuracy", EVAL_MEAN_ACC,
              "mean paired difference dispersion - baseline (validation-selected checkpoint)",
              VerdictRule("above", 0.0), "dispersion improves downstream accuracy", CONTRADICTED),
)


def _claim(spec: ClaimSpec, estimate: Interval, *, n_units: int, unit: str, n_rungs: int, seeds: int, note: str = "") -> ClaimCheck:
    verdict = decide_verdict(estimate, spec.rule)
    if not estimate.has_bounds and estimate.why.startswith("1 seed"):
        note = "; ".join(x for x in ("no CI: a CI needs >= 2 seeds per rung (or, with 1 seed, >= 4 rungs to resample across)", note) if x)
    return ClaimCheck(spec.key, spec.claim, spec.metric, spec.statistic, estimate, verdict, spec.rule.describe(),
                      n_units, unit, n_rungs, seeds, spec.paper, bool(spec.against_paper) and verdict == spec.against_paper, note)


def _untested(spec: ClaimSpec, reason: str) -> ClaimCheck:
    return ClaimCheck(spec.key, spec.claim, spec.metric, spec.statistic, Interval(math.nan, math.nan, math.nan, reason),
                      NOT_TESTED, spec.rule.describe(), 0, "", 0, 0, spec.paper, False, reason)


def _check_initial(spec: ClaimSpec, initial: pl.DataFrame, first_probe_step: int | None, options: FitOptions) -> ClaimCheck:
    rows = initial.filter((pl.col("metric") == spec.metric) & pl.col("value").is_finite()).drop_nulls("n")
    if rows.is_empty():
        later = f" (the first probe is at step {first_probe_step})" if first_probe_step is not None else ""
        return _untested(spec, f"no step-0 probe recorded{later}")
    # Paired arms share their initialisation: one value per (rung, seed), not per run.
    inits = rows.group_by("rung", "n", "seed").agg(pl.col("value").mean()).sort("n", "seed")
    pooled = compute_pooled_mean(inits["n"].to_numpy(), inits["value"].to_numpy(), options, unit="initialisation")
    values = inits["value"].to_numpy()
    note = pooled.note
    if np.all(np.abs(np.abs(values) - 1.0) < 1e-9):
        note = "; ".join(x for x in (f"every initialisation at {values[0]:+.3f}: saturated (monotone in every run; says nothing on degree)", note) if x)
    return _claim(spec, pooled.mean, n_units=pooled.n_units, unit="initialisations", n_rungs=pooled.n_rungs, seeds=pooled.units_per_rung, note=note)


def _check_paired(spec: ClaimSpec, final: pl.DataFrame, treatment: str, control: str, options: FitOptions, *, relative: bool = False) -> ClaimCheck:
    rows = final.filter(pl.col("metric") == spec.metric)
    if rows.is_empty():
        if spec.metric == EVAL_MEAN_ACC:
            return _untested(spec, f"the study evaluated no downstream tasks (no {EVAL_MEAN_ACC} logged)")
        return _untested(spec, f"{spec.metric} was not logged by any finished training run")
    paired = pair_arms(rows, treatment=treatment, control=control, relative=relative)
    if paired.is_empty():
        return _untested(spec, f"no finished ({treatment}, {control}) pair with the same rung and seed")
    pooled = compute_pooled_mean(paired["n"].to_numpy(), paired["diff"].to_numpy(), options, unit="pair")
    return _claim(spec, pooled.mean, n_units=pooled.n_units, unit="pairs", n_rungs=pooled.n_rungs, seeds=pooled.units_per_rung, note=pooled.note)


def _check_slope(spec: ClaimSpec, n: np.ndarray, y: np.ndarray, options: FitOptions, unit: str) -> ClaimCheck:
    if np.unique(n).size < 2:
        return _untested(spec, f"{np.unique(n).size} rung(s): a trend with N needs >= 2")
    try:
        trend = compute_trend(n, y, options, what=spec.metric)
    except DataError as err:
        return _untested(spec, str(err))
    note = trend.note
    if trend.n_rungs < 4:
        note = "; ".join(x for x in (f"only {trend.n_rungs} rungs: a slope through so few sizes is fragile", note) if x)
    return _claim(spec, trend.slope_per_decade, n_units=trend.n_points, unit=unit, n_rungs=trend.n_rungs, seeds=trend.runs_per_rung, note=note)


def check_paper_claims(final: pl.DataFrame, initial: pl.DataFrame, *, treatment: str = names.ARM_DISPERSION, control: str = names.ARM_BASELINE,
                       first_probe_step: int | None = None, options: FitOptions = FitOptions()) -> tuple[ClaimCheck, ...]:
    """Test `PAPER_CLAIMS` on a study.

    `final`: final values of finished training runs (columns rung, n, arm, seed, metric,
    value), with eval/mean_acc at each run's validation-selected checkpoint
    (`analysis.downstream.with_selected_accuracy`: claim f never reads a test-selected or
    merely last evaluation); `initial`: the same columns at step 0 (may be empty: claim a is
    then not tested). Never raises for missing data: an untestable claim says why.
    """
    specs = {spec.key: spec for spec in PAPER_CLAIMS}
    checks = [_check_initial(specs["a"], initial, first_probe_step, options)]
    arms = set(final["arm"].drop_nulls().to_list()) if final.height else set()
    missing = [arm for arm in (treatment, control) if arm not in arms]
    for key, relative in (("b", False), ("c", True)):
        checks.append(_untested(specs[key], f"no finished runs of arm(s) {', '.join(missing)}") if missing else
                      _check_paired(specs[key], final, treatment, control, options, relative=relative))
    base = final.filter((pl.col("arm") == control) & (pl.col("metric") == specs["d"].metric) & pl.col("value").is_finite()).drop_nulls("n")
    checks.append(_check_slope(specs["d"], base["n"].to_numpy(), base["value"].to_numpy(), options, "runs") if base.height else
                  _untested(specs["d"], f"no finished {control} run logged {specs['d'].metric}"))
    if missing:
        checks.append(_untested(specs["e"], f"no finished runs of arm(s) {', '.join(missing)}"))
    else:
        paired = pair_arms(final.filter(pl.col("metric") == specs["e"].metric), treatment=treatment, control=control)
        if paired.is_empty():
            checks.append(_untested(specs["e"], "no paired runs"))
        else:
            check = _check_slope(specs["e"], paired["n"].to_numpy(), paired["diff"].to_numpy(), options, "pairs")
            if check.verdict == SUPPORTED:
                # Same sign as the mean effect: the effect's size grows with N; opposite: it shrinks.
                grows = (check.estimate.estimate > 0) == (float(paired["diff"].mean()) > 0)
                check = dataclasses.replace(check, note="; ".join(x for x in (f"the effect {'grows' if grows else 'shrinks'} with N", check.note) if x))
            checks.append(check)
    checks.append(_untested(specs["f"], f"no finished runs of arm(s) {', '.join(missing)}") if missing else
                  _check_paired(specs["f"], final, treatment, control, options))
    return tuple(checks)
