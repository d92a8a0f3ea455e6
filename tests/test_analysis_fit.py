"""Fits and paired effects on synthetic data drawn from known curves (no MLflow here)."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from analysis.effects import compute_best_lambdas, compute_difference_trend, compute_paired_differences, compute_parameter_multipliers, pair_arms
from analysis.fit import FitOptions, PowerLaw, check_leave_largest_out, compute_trend, fit_power_law, fit_scaling_curve
from scaling import names
from scaling.errors import ConfigError, DataError

RUNGS = np.array([1e6, 4e6, 1.6e7, 6.4e7, 2.56e8])
TRUTH = PowerLaw(scale=1.0, alpha=0.35, offset=2.0, n_ref=float(np.exp(np.mean(np.log(RUNGS)))))
FAST = FitOptions(n_bootstrap=60)


def draw(seed: int, *, seeds_per_rung: int = 3, noise: float = 0.01, law: PowerLaw = TRUTH, rungs: np.ndarray = RUNGS) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = np.repeat(rungs, seeds_per_rung)
    return n, law.predict(n) * np.exp(rng.normal(0.0, noise, n.size))


def test_power_law_round_trips_through_size_reaching():
    for n in (1e5, 3e7, 1e10):
        assert TRUTH.size_reaching(float(TRUTH.predict(n))) == pytest.approx(n, rel=1e-9)
    assert TRUTH.size_reaching(TRUTH.offset) == math.inf
    assert TRUTH.a == pytest.approx(TRUTH.scale * TRUTH.n_ref**TRUTH.alpha)


def test_fit_recovers_parameters_within_their_intervals():
    n, y = draw(1)
    fit = fit_power_law(n, y, FitOptions(n_bootstrap=150))
    assert fit.bootstrap == "rungs and runs"
    assert fit.alpha.contains(TRUTH.alpha), fit.alpha
    assert fit.offset.contains(TRUTH.offset), fit.offset
    assert fit.a.contains(TRUTH.a), fit.a
    assert fit.alpha.estimate == pytest.approx(TRUTH.alpha, abs=0.08)
    assert np.all(fit.curve_low <= fit.curve_high)


def test_noise_free_fit_is_exact_from_the_grid_of_starts():
    n = np.repeat(RUNGS, 2)
    fit = fit_power_law(n, TRUTH.predict(n), FitOptions(n_bootstrap=0))
    assert fit.law.alpha == pytest.approx(TRUTH.alpha, rel=1e-3)
    assert fit.law.offset == pytest.approx(TRUTH.offset, rel=1e-3)
    assert fit.bootstrap == "none" and math.isnan(fit.alpha.low)


def test_curve_interval_coverage_is_about_nominal():
    """Over 40 synthetic ladders the 95% band at an interior size holds the truth ~95% of the time."""
    middle = 1.6e7
    hits = 0
    draws = 40
    for seed in range(draws):
        n, y = draw(100 + seed)
        fit = fit_power_law(n, y, FitOptions(n_bootstrap=60, seed=seed), curve_n=np.array([middle]))
        hits += bool(fit.curve_low[0] <= TRUTH.predict(middle) <= fit.curve_high[0])
    assert 0.8 <= hits / draws <= 1.0, f"coverage {hits}/{draws}"


def test_leave_largest_out_accepts_a_true_curve_and_flags_a_broken_one():
    n, y = draw(7)
    good = check_leave_largest_out(n, y, FAST)
    assert good.inside and abs(good.relative_error) < 0.02
    broken = y.copy()
    broken[n == n.max()] *= 1.15  # the largest rung stops improving: not the same law
    bad = check_leave_largest_out(n, broken, FAST)
    assert not bad.inside
    assert bad.relative_error < -0.1


def test_leave_largest_out_needs_five_rungs():
    n, y = draw(3, rungs=RUNGS[:4])
    with pytest.raises(DataError, match="needs >= 5 rungs"):
        check_leave_largest_out(n, y, FAST)


def test_power_law_is_refused_below_four_rungs_and_fitted_from_four():
    """Three rungs fix a 3-parameter law exactly: no fit, no curve, a trend and the reason."""
    n3, y3 = draw(5, rungs=RUNGS[:3])
    three = fit_scaling_curve(names.VAL_LOSS, n3, y3, FAST)
    assert not three.supported and three.fit is None and three.holdout is None
    assert "3 rung(s)" in three.reason and "needs >= 4" in three.reason
    assert three.trend is not None and three.trend.slope_per_decade.estimate < 0 and three.trend.slope_per_decade.has_bounds
    with pytest.raises(DataError, match="needs >= 4"):
        fit_power_law(n3, y3, FAST)
    n4, y4 = draw(5, rungs=RUNGS[:4])
    four = fit_scaling_curve(names.VAL_LOSS, n4, y4, FAST)
    assert four.supported and four.fit is not None and four.fit.n_rungs == 4
    assert four.holdout is None and "needs >= 5 rungs" in four.reason


@pytest.mark.parametrize(
    ("n", "y", "message"),
    [
        (np.array([1e6, 1e6, 1e6]), np.array([3.0, 3.1, 3.05]), "1 distinct size"),
        (np.repeat(RUNGS, 2), np.full(10, 2.5), "constant at 2.5"),
        (np.repeat(RUNGS, 2), np.r_[np.full(9, 2.5), np.nan], "NaN or infinite"),
        (np.repeat(RUNGS, 2), np.linspace(-0.5, 0.5, 10), "values must be > 0"),
        (np.array([]), np.array([]), "no observations"),
    ],
)
def test_degenerate_inputs_raise_clear_data_errors(n, y, message):
    with pytest.raises(DataError, match=message):
        fit_power_law(n, y, FAST)


def test_trend_of_one_rung_or_constant_metric_says_why():
    with pytest.raises(DataError, match="needs >= 2 rungs"):
        compute_trend(np.array([1e6, 1e6]), np.array([0.5, 0.6]), FAST)
    with pytest.raises(DataError, match="constant"):
        compute_trend(np.repeat(RUNGS, 2), np.full(10, 0.3), FAST)
    # A rank correlation pinned at +1 (few layers) is named as saturated, not as a logging fault.
    with pytest.raises(DataError, match="saturated: every run at \\+1.000"):
        compute_trend(np.repeat(RUNGS, 2), np.ones(10), FAST)


def test_trend_without_seeds_has_no_interval_and_says_why():
    n = RUNGS[:3]
    trend = compute_trend(n, np.array([0.5, 0.4, 0.35]), FAST)
    # Three rung means leave 1 df for the slope: an interval, wide; Spearman over 3 points: none.
    assert trend.slope_per_decade.has_bounds and trend.slope_per_decade.high - trend.slope_per_decade.low > 0.1
    assert not trend.spearman.has_bounds and trend.spearman.why == "1 seed, 3 points" and trend.runs_per_rung == 1
    two = compute_trend(RUNGS[:2], np.array([0.5, 0.4]), FAST)
    assert not two.slope_per_decade.has_bounds and "fewer than 3" in two.slope_per_decade.why


def test_trend_sign_and_interval():
    n = np.repeat(RUNGS, 3)
    rng = np.random.default_rng(0)
    rho = 0.95 - 0.25 * np.log10(n / 1e6) + rng.normal(0, 0.02, n.size)
    trend = compute_trend(n, rho, FAST)
    assert trend.spearman.estimate < -0.9
    assert not trend.spearman.has_bounds and "descriptive" in trend.spearman.why  # seeds cannot resample rungs
    assert trend.slope_per_decade.contains(-0.25) and trend.slope_per_decade.high < 0


def test_rank_correlations_get_a_trend_never_a_power_law():
    n = np.repeat(RUNGS, 2)
    result = fit_scaling_curve(names.COND_SPEARMAN, n, 0.9 - 0.2 * np.log10(n / 1e6), FAST)
    assert not result.supported and result.fit is None
    assert "rank correlation" in result.reason
    assert result.trend is not None and result.trend.spearman.estimate < 0


def test_increasing_or_too_short_metric_falls_back_to_trend():
    n = np.repeat(RUNGS, 2)
    rising = fit_scaling_curve(names.VAL_LOSS, n, 2.0 + 0.1 * np.log10(n), FAST)
    assert not rising.supported and "increases with N" in rising.reason and rising.trend is not None
    short = fit_scaling_curve(names.VAL_LOSS, n[:6], TRUTH.predict(n[:6]), FAST)
    assert not short.supported and "needs >= 4" in short.reason


def test_supported_curve_has_fit_and_holdout():
    n, y = draw(11)
    result = fit_scaling_curve(names.VAL_LOSS, n, y, FAST)
    assert result.supported and result.fit is not None and result.holdout is not None and result.holdout.inside


def test_fit_options_validate():
    with pytest.raises(ConfigError, match="confidence"):
        FitOptions(confidence=1.5)
    with pytest.raises(ConfigError, match="min_rungs"):
        FitOptions(min_rungs=3)


# --- paired effects ------------------------------------------------------------------------------


def _paired_frame(multiplier: float, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i, n in enumerate(RUNGS):
        for s in range(3):
            common = rng.normal(0, 0.01)  # shared by the pair: paired differences cancel it
            for arm, factor in ((names.ARM_BASELINE, 1.0), (names.ARM_DISPERSION, multiplier)):
                value = float(TRUTH.predict(n * factor)) * math.exp(common + rng.normal(0, 0.002))
                rows.append({"rung": f"r{i}", "n": float(n), "arm": arm, "seed": s, "value": value})
    return pl.DataFrame(rows)


def test_paired_differences_and_multiplier_recover_the_truth():
    final = _paired_frame(multiplier=2.0)
    paired = pair_arms(final, treatment=names.ARM_DISPERSION, control=names.ARM_BASELINE)
    assert paired.height == RUNGS.size * 3
    diffs = compute_paired_differences(paired, FAST)
    for d in diffs:
        truth = float(TRUTH.predict(d.n * 2.0) - TRUTH.predict(d.n))
        assert d.n_pairs == 3
        assert d.difference.estimate == pytest.approx(truth, abs=0.02)
        assert d.difference.low <= d.difference.estimate <= d.difference.high < 0
    trend = compute_difference_trend(paired, FAST)
    assert trend.slope_per_decade.estimate > 0  # the benefit shrinks as the curve flattens
    baseline = final.filter(pl.col("arm") == names.ARM_BASELINE)
    base_fit = fit_power_law(baseline["n"].to_numpy(), baseline["value"].to_numpy(), FitOptions(n_bootstrap=100))
    multipliers = compute_parameter_multipliers(base_fit, paired, FitOptions(n_bootstrap=100))
    for m in multipliers:
        assert m.multiplier.estimate == pytest.approx(2.0, rel=0.35)
        assert m.multiplier.low <= 2.0 <= m.multiplier.high, m


def test_best_lambda_per_rung_prefers_flagged_trials_and_flags_a_search_bound():
    rows = []
    for i, n in enumerate(RUNGS):
        best = 0.5 * (n / 1e6) ** -0.3
        for lam in best * np.array([0.25, 1.0, 4.0]):
            rows.append({"rung": f"r{i}", "n": float(n), "lambda": float(lam), "value": 2.0 + 0.05 * math.log(lam / best) ** 2, "best_trial": None})
    best = compute_best_lambdas(pl.DataFrame(rows))
    assert [b.n for b in best] == sorted(float(n) for n in RUNGS)
    assert best[0].best_lambda == pytest.approx(0.5) and not best[0].at_bound  # the middle of three tried values
    flagged = pl.DataFrame(rows).with_columns(best_trial=pl.when(pl.col("lambda") == pl.col("lambda").max().over("rung")).then(True).otherwise(None))
    edge = compute_best_lambdas(flagged)
    assert edge[0].best_lambda == pytest.approx(0.5 * 4.0) and edge[0].at_bound  # the largest tried: the optimum may lie beyond it


def test_best_lambda_without_trials_says_so():
    empty = pl.DataFrame(schema={"rung": pl.String, "n": pl.Float64, "lambda": pl.Float64, "value": pl.Float64, "best_trial": pl.Boolean})
    with pytest.raises(DataError, match="no finished sweep trial"):
        compute_best_lambdas(empty)
