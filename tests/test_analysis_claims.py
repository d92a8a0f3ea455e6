"""The paper's claims, checked with known truth: the tests under each verdict (random rung
effect, exact permutation null, Holm, TOST, clipped intervals), and whole synthetic studies
(real MLflow SQLite store) where dispersion clearly helps, does nothing, goes against the
paper, or starts from one pretrained checkpoint."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from analysis_store import fill_synthetic_study

from analysis import load
from analysis.claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    NO_EFFECT,
    NOT_TESTABLE,
    NOT_TESTED,
    SUPPORTED,
    ClaimSpec,
    check_paper_claims,
    compute_depth_trend,
    compute_pooled_effect,
    compute_slope_effect,
    holm,
)
from analysis.effects import compute_paired_differences, difference_range, pair_arms, slope_range
from analysis.fit import FitOptions
from analysis.report import StudyAnalysis, build_claims_table, render_markdown
from analysis.scaling_curves import analyse_study, parse_smallest_effects
from scaling import names
from scaling.errors import ConfigError

FAST = FitOptions(n_bootstrap=80)
METRICS = [names.VAL_LOSS, names.COND_LATE_HALF_MEAN_COS]
SMALL_LADDER = {"tiny-1M": 1e6, "small-4M": 4e6, "base-16M": 1.6e7, "mid-64M": 6.4e7}
FOUR_RUNGS = np.repeat([1e6, 4e6, 1.6e7, 6.4e7], 2)


def test_holm_adjusts_step_down_and_skips_untested_claims():
    assert holm([0.01, 0.04, math.nan, 0.03]) == pytest.approx([0.03, 0.06, math.nan, 0.06], nan_ok=True)
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([math.nan]) == [pytest.approx(math.nan, nan_ok=True)]


def test_pooled_effect_uses_rung_means_so_rung_variation_counts():
    rng = np.random.default_rng(1)
    # Every rung clearly negative at its own seeds, but the rung means scatter widely about
    # zero: a random rung effect makes the pooled mean uncertain, as it should.
    rung_effect = np.repeat([-0.30, 0.25, -0.28, 0.27], 2)
    values = rung_effect + rng.normal(0, 0.001, 8)
    result = compute_pooled_effect(FOUR_RUNGS, values, threshold=0.0, delta=None, confidence=0.95, bounds=(-1, 1), unit="pair")
    assert result.p_value > 0.5 and result.estimate.contains(0.0)
    assert result.n_units == 8 and result.n_rungs == 4 and result.seeds_per_rung == 2 and "3 df" in result.method
    # A consistent effect is decided with the same 2 seeds.
    steady = -0.05 + rng.normal(0, 0.005, 8)
    decided = compute_pooled_effect(FOUR_RUNGS, steady, threshold=0.0, delta=0.02, confidence=0.95, bounds=(-1, 1), unit="pair")
    assert decided.p_value < 0.01 and decided.estimate.high < 0 and decided.mde < 0.05


def test_pooled_effect_of_identical_units_is_not_testable_never_a_zero_width_interval():
    result = compute_pooled_effect(FOUR_RUNGS, np.full(8, 0.3), threshold=0.0, delta=None, confidence=0.95, bounds=(-1, 1), unit="pair")
    assert not math.isfinite(result.p_value) and not result.estimate.has_bounds
    assert "replicate nothing" in result.estimate.why


@pytest.mark.parametrize("seed", range(5))
def test_intervals_never_leave_the_statistics_range(seed):
    rng = np.random.default_rng(seed)
    n = np.repeat([1e6, 4e6], 2)
    spearman_diffs = rng.uniform(-2, 2, 4)  # differences of two rank correlations
    result = compute_pooled_effect(n, spearman_diffs, threshold=0.0, delta=None, confidence=0.95,
                                   bounds=difference_range(names.COND_SPEARMAN), unit="pair")
    assert -2.0 <= result.estimate.low <= result.estimate.high <= 2.0
    slope = compute_slope_effect(np.repeat([1e6, 4e6, 1.6e7], 2), rng.uniform(0, 1, 6), delta=None, confidence=0.95,
                                 bounds=slope_range(names.COND_LATE_HALF_MEAN_COS, np.array([1e6, 4e6, 1.6e7])), unit="run")
    most = slope_range(names.COND_LATE_HALF_MEAN_COS, np.array([1e6, 4e6, 1.6e7]))[1]
    assert -most <= slope.estimate.low <= slope.estimate.high <= most


def test_per_rung_differences_show_pairs_below_three_seeds_and_a_t_interval_from_three():
    rows = [{"rung": "r", "n": 1e6, "seed": s, "diff": d} for s, d in enumerate([0.45, -0.2])]
    two = compute_paired_differences(pl.DataFrame(rows), FAST, bounds=(-2, 2))[0]
    assert not two.difference.has_bounds and "2 pairs: shown as points" in two.difference.why
    assert two.pairs == (0.45, -0.2) and two.spread == pytest.approx(np.std([0.45, -0.2], ddof=1))
    rows.append({"rung": "r", "n": 1e6, "seed": 2, "diff": 1.9})
    three = compute_paired_differences(pl.DataFrame(rows), FAST, bounds=(-2, 2))[0]
    assert three.difference.has_bounds and -2.0 <= three.difference.low and three.difference.high == 2.0  # clipped at the bound


def test_depth_trend_at_its_bound_is_decided_by_the_exact_permutation_null():
    profiles = [np.array([0.03, 0.06, 0.1]) + 0.001 * i for i in range(8)]  # 8 initial states, each monotone over 3 hidden states
    result = compute_depth_trend(profiles, confidence=0.95)
    assert result.p_value == pytest.approx(2 * (1 / 6) ** 8)  # +1 by chance: 1 in 3! per state
    assert not result.estimate.has_bounds and "exact permutation test" in result.estimate.why
    assert result.effect_size is not None and result.effect_size.estimate == pytest.approx(0.07)
    assert result.effect_size.has_bounds is False  # every state rises by the same 0.07: no spread, no interval
    one_state = compute_depth_trend(profiles[:1], confidence=0.95)
    assert one_state.p_value == pytest.approx(2 / 6)  # a single monotone profile of 3 is unremarkable


def test_depth_trend_rejects_at_its_level_when_profiles_have_no_trend():
    rng = np.random.default_rng(0)
    p_values = [compute_depth_trend([rng.normal(0, 1, 5) for _ in range(8)], confidence=0.95, seed=s, draws=2000).p_value for s in range(200)]
    assert 0.01 <= np.mean(np.array(p_values) < 0.05) <= 0.1


def test_smallest_effects_are_validated():
    assert parse_smallest_effects(["f=0.02", "b=0.05"]) == {"f": 0.02, "b": 0.05}
    for bad in ("f", "z=0.1", "f=-1", "f=nan", "f=abc"):
        with pytest.raises(ConfigError, match="--smallest-effect"):
            parse_smallest_effects([bad])
    with pytest.raises(ConfigError, match="side='left'"):
        ClaimSpec("x", "", "", "", "left", 0.0, None, "", False)


# --- whole studies with known truth -------------------------------------------------------------


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, StudyAnalysis]:
    """Synthetic studies with known truth in one store, analysed (no files written)."""
    root = tmp_path_factory.mktemp("claims")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = {"rungs": SMALL_LADDER, "seeds": (0, 1), "failed": 0, "with_artifacts": False, "steps": 2}
    # Dispersion clearly lowers cosine (0.8x), is worth 1.5x parameters, improves accuracy.
    fill_synthetic_study(uri, "helps", accuracy_gain=0.05, **common)
    # No effect at all on cosine, loss or accuracy; no step-0 probe recorded.
    fill_synthetic_study(uri, "no-effect", cos_factor=1.0, loss_multiplier=1.0, accuracy_gain=0.0, initial_spearman=None, **common)
    # Everything against the paper: dispersion raises cosine, costs ~10% loss, hurts accuracy.
    fill_synthetic_study(uri, "against", cos_factor=1.25, loss_multiplier=0.5, accuracy_gain=-0.05, **common)
    fill_synthetic_study(uri, "baseline-only", rungs={"a": 1e6, "b": 4e6}, arms=(names.ARM_BASELINE,), seeds=(0, 1), failed=0,
                         with_artifacts=False, steps=1)
    # The paper's main study: every seed mid-trains one pretrained checkpoint per rung.
    fill_synthetic_study(uri, "midtrain", init_from="gpt2", seeds=(0, 1, 2), **{k: v for k, v in common.items() if k != "seeds"})
    return {study: analyse_study(load.read_study(uri, study), metrics=METRICS, size_column="n_params", control_arm=names.ARM_BASELINE, options=FAST)
            for study in ("helps", "no-effect", "against", "baseline-only", "midtrain")}


@pytest.fixture(scope="module")
def verdicts(studies) -> dict[str, dict[str, object]]:
    """The claim checks by study and key."""
    return {study: {c.key: c for c in analysis.claims} for study, analysis in studies.items()}


def test_a_study_where_dispersion_helps_supports_the_paper(verdicts):
    checks = verdicts["helps"]
    assert {k: checks[k].verdict for k in ("a", "b-rho", "f")} == dict.fromkeys(("a", "b-rho", "f"), SUPPORTED)
    # The cosine effect is 0.8x of a curve that falls 3.5x over the ladder: every rung lowers it, but by
    # amounts so different that the mean over sizes stays uncertain once 9 claims are Holm-adjusted.
    assert checks["b"].verdict in (SUPPORTED, INCONCLUSIVE) and checks["b"].estimate.high < 0 and checks["b"].p_value < 0.05
    assert checks["a"].n_units == 8 and checks["a"].unit == "initial states"  # one per (rung, seed), not per run
    assert checks["a"].effect_size is not None and checks["a"].effect_size.estimate > 0.5  # condensed, not just monotone
    assert checks["b"].estimate.high < 0 and checks["b"].n_units == 8 and checks["b"].seeds_per_rung == 2
    assert checks["c"].verdict in (SUPPORTED, INCONCLUSIVE) and checks["c"].estimate.high < 0.01  # 1.5x effective parameters: lower loss
    assert checks["d"].estimate.estimate < 0 and checks["d"].n_rungs == 4
    assert all(c.p_adjusted >= c.p_value for c in checks.values() if math.isfinite(c.p_value))
    assert not any(c.contradicts_paper for c in checks.values())


def test_a_study_without_effect_never_supports_and_can_say_no_effect(verdicts):
    checks = verdicts["no-effect"]
    for key in ("b", "c", "e", "f"):
        assert checks[key].verdict in (INCONCLUSIVE, NO_EFFECT), (key, checks[key])
        assert checks[key].estimate.contains(checks[key].estimate.estimate)
    assert checks["b"].verdict == NO_EFFECT and checks["b"].contradicts_paper  # |effect| < 0.02 cosine: against a paper that claims one
    assert checks["a"].verdict == NOT_TESTED and "no step-0 probe recorded (the first probe is at step 2)" in checks["a"].note


def test_a_study_against_the_paper_is_contradicted_and_says_so(studies, verdicts, tmp_path):
    checks = verdicts["against"]
    assert checks["f"].verdict == CONTRADICTED and checks["f"].contradicts_paper
    # 1.25x of a curve that falls 3.5x over the ladder: raised at every rung, by amounts too different to decide the mean.
    assert checks["b"].verdict in (CONTRADICTED, INCONCLUSIVE) and checks["b"].estimate.low > 0
    assert checks["c"].verdict in (CONTRADICTED, INCONCLUSIVE) and not checks["c"].contradicts_paper  # the paper makes no in-domain loss claim
    assert checks["c"].estimate.low > 0.01
    report = render_markdown(studies["against"], [], tmp_path)
    assert "**Contradicts the paper — (f)**" in report
    assert "Contradicts the paper — (c)" not in report and "Holm" in report
    assert "No verdict contradicts the paper." in render_markdown(studies["helps"], [], tmp_path)


def test_a_midtraining_study_does_not_test_initialisation(studies, verdicts):
    checks = verdicts["midtrain"]
    assert checks["a"].verdict == NOT_TESTED and "pretrained weights (training.init_from = gpt2)" in checks["a"].note
    assert checks["b"].n_units == 12  # the seeds still replicate training: 4 rungs x 3 seed pairs
    caveats = studies["midtrain"].budget.caveats
    assert any("claim (a), about random initialisation, is not tested" in c for c in caveats)
    assert not any("tokens per parameter" in c for c in caveats)


def test_paper_step0_values_shared_by_every_seed_are_four_units_not_twelve():
    """The issue's example: step-0 Spearman +0.38, -0.06, +0.11, -0.59 at 4 rungs, identical
    across 3 seeds and both arms, recorded with one init_hash per rung."""
    rows = []
    for rung, n, rho in (("gpt2", 124e6, 0.38), ("medium", 355e6, -0.06), ("large", 774e6, 0.11), ("xl", 1.5e9, -0.59)):
        profile = np.linspace(0, 1, 13) * rho + 0.3
        for seed in (0, 1, 2):
            for arm in (names.ARM_BASELINE, names.ARM_DISPERSION):
                rows += [{"rung": rung, "n": n, "arm": arm, "seed": seed, "init_hash": f"h-{rung}", "metric": names.layer_metric(layer),
                          "value": float(v)} for layer, v in enumerate(profile)]
    initial = pl.DataFrame(rows)
    final = initial.head(0)
    with_start = check_paper_claims(final, initial, pretrained="training.init_from = gpt2")
    assert with_start[0].verdict == NOT_TESTED
    # Even without the init_from record, identical initial states are 4 units, not 24 runs.
    without = {c.key: c for c in check_paper_claims(final, initial)}["a"]
    assert without.n_units == 4 and without.verdict != CONTRADICTED and not without.contradicts_paper


def test_claims_of_a_study_without_a_dispersion_arm_are_not_tested(studies, verdicts):
    checks = verdicts["baseline-only"]
    for key in ("b", "b-rho", "c", "e", "e-rho", "f"):
        assert checks[key].verdict == NOT_TESTED and "no finished runs of arm(s) dispersion" in checks[key].note
    assert checks["a"].verdict == SUPPORTED
    assert checks["d"].verdict == NOT_TESTABLE and "2 rung(s)" in checks["d"].note  # a slope through 2 rung means has no error
    budget = studies["baseline-only"].budget
    assert budget is not None and [r for r, _ in budget.rungs] == ["a", "b"] and budget.steps == (1, 1)
    assert any("2 rungs: no power law" in c for c in budget.caveats)
    assert len(checks) == 9


def test_saturated_rank_correlations_are_not_testable(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fill_synthetic_study(uri, "saturated", rungs=SMALL_LADDER, seeds=(0, 1), failed=0, with_artifacts=False, steps=1,
                         metric_overrides={names.COND_SPEARMAN: 1.0})
    analysis = analyse_study(load.read_study(uri, "saturated"), metrics=METRICS, size_column="n_params", control_arm=names.ARM_BASELINE, options=FAST)
    checks = {c.key: c for c in analysis.claims}
    for key in ("b-rho", "d-rho", "e-rho"):
        assert checks[key].verdict == NOT_TESTABLE and "saturated" in checks[key].note
    table = build_claims_table(analysis.claims)
    assert {"p_holm", "p_no_effect_holm", "mde", "smallest_effect", "method"} <= set(table.columns)


def test_pair_arms_pairs_by_rung_and_seed():
    final = pl.DataFrame([{"rung": "r", "n": 1.0, "seed": s, "arm": arm, "value": v}
                          for s, (b, d) in enumerate([(1.0, 0.5), (2.0, 1.0)]) for arm, v in ((names.ARM_BASELINE, b), (names.ARM_DISPERSION, d))])
    paired = pair_arms(final, treatment=names.ARM_DISPERSION, control=names.ARM_BASELINE, relative=True)
    assert paired["diff"].to_list() == [-0.5, -0.5]
