"""The paper's claims, checked with known truth: verdict rules, pooled means, and whole
synthetic studies (real MLflow SQLite store) where dispersion clearly helps, does nothing,
or goes against the paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
from analysis_store import fill_synthetic_study

from analysis import load
from analysis.effects import (
    CONTRADICTED,
    INCONCLUSIVE,
    NOT_TESTED,
    SUPPORTED,
    VerdictRule,
    compute_pooled_mean,
    decide_verdict,
)
from analysis.fit import FitOptions, Interval
from analysis.report import StudyAnalysis, render_markdown
from analysis.scaling_curves import analyse_study
from scaling import names
from scaling.errors import ConfigError

FAST = FitOptions(n_bootstrap=80)
METRICS = [names.VAL_LOSS, names.COND_LATE_HALF_MEAN_COS]
SMALL_LADDER = {"tiny-1M": 1e6, "small-4M": 4e6, "base-16M": 1.6e7, "mid-64M": 6.4e7}


@pytest.mark.parametrize(
    ("rule", "interval", "verdict"),
    [
        (VerdictRule("below", 0.0), Interval(-0.2, -0.3, -0.1), SUPPORTED),
        (VerdictRule("below", 0.0), Interval(-0.2, -0.3, 0.05), INCONCLUSIVE),
        (VerdictRule("below", 0.0), Interval(0.2, 0.1, 0.3), CONTRADICTED),
        (VerdictRule("below", 0.0), Interval(-5.0, math.nan, math.nan, "1 seed"), INCONCLUSIVE),  # never the point estimate
        (VerdictRule("below", 0.01, inclusive=True), Interval(0.0, -0.01, 0.01), SUPPORTED),  # "<= +1%"
        (VerdictRule("below", 0.01, inclusive=True), Interval(0.02, 0.011, 0.03), CONTRADICTED),
        (VerdictRule("above", 0.0), Interval(1.0, 1.0, 1.0), SUPPORTED),
        (VerdictRule("above", 0.0), Interval(-0.5, -0.7, -0.2), CONTRADICTED),
        (VerdictRule("nonzero"), Interval(0.3, 0.1, 0.5), SUPPORTED),
        (VerdictRule("nonzero"), Interval(-0.3, -0.5, -0.1), SUPPORTED),
        (VerdictRule("nonzero"), Interval(0.3, -0.1, 0.5), INCONCLUSIVE),
    ],
)
def test_verdict_is_read_off_the_interval(rule, interval, verdict):
    assert decide_verdict(interval, rule) == verdict


def test_verdict_rule_rejects_an_unknown_side():
    with pytest.raises(ConfigError, match="side='left'"):
        VerdictRule("left")


def test_pooled_mean_weights_rungs_equally_and_says_why_without_seeds():
    n = np.array([1e6, 1e6, 1e6, 4e6])
    values = np.array([1.0, 1.0, 1.0, 3.0])
    one_seed_at_a_rung = compute_pooled_mean(n, values, FAST)
    assert one_seed_at_a_rung.mean.estimate == pytest.approx(2.0)  # (1 + 3) / 2, not 6 / 4
    assert one_seed_at_a_rung.units_per_rung == 1 and "resampled across rungs" in one_seed_at_a_rung.note
    few = compute_pooled_mean(np.array([1e6, 4e6]), np.array([0.1, 0.2]), FAST)
    assert not few.mean.has_bounds and few.mean.why == "1 seed, 2 pairs"
    rng = np.random.default_rng(0)
    n2 = np.repeat([1e6, 4e6, 1.6e7], 3)
    draws = -0.1 + rng.normal(0, 0.01, n2.size)
    seeded = compute_pooled_mean(n2, draws, FAST)
    assert seeded.mean.has_bounds and seeded.mean.contains(-0.1) and seeded.units_per_rung == 3 and seeded.note == ""


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
    # Everything against the paper: dispersion raises cosine, costs ~10% loss, hurts accuracy,
    # and models start anti-condensed.
    fill_synthetic_study(uri, "against", cos_factor=1.25, loss_multiplier=0.5, accuracy_gain=-0.05, initial_spearman=-0.8, **common)
    fill_synthetic_study(uri, "baseline-only", rungs={"a": 1e6, "b": 4e6}, arms=(names.ARM_BASELINE,), seeds=(0, 1), failed=0,
                         with_artifacts=False, steps=1)
    return {study: analyse_study(load.read_study(uri, study), metrics=METRICS, size_column="n_params", control_arm=names.ARM_BASELINE, options=FAST)
            for study in ("helps", "no-effect", "against", "baseline-only")}


@pytest.fixture(scope="module")
def verdicts(studies) -> dict[str, dict[str, object]]:
    """The claim checks by study and key."""
    return {study: {c.key: c for c in analysis.claims} for study, analysis in studies.items()}


def test_a_study_where_dispersion_helps_supports_the_paper(verdicts):
    checks = verdicts["helps"]
    assert [checks[k].verdict for k in "abcdef"] == [SUPPORTED] * 6
    assert checks["a"].n_units == 8 and checks["a"].unit == "initialisations"  # one per (rung, seed), not per run
    assert checks["b"].estimate.high < 0 and checks["b"].n_units == 8 and checks["b"].seeds_per_rung == 2
    assert checks["c"].estimate.high < 0  # 1.5x effective parameters: lower loss
    assert checks["d"].estimate.high < 0 and checks["d"].n_rungs == 4
    assert "shrinks with N" in checks["e"].note  # 0.8x of a falling curve: the gap closes with N
    assert not any(c.contradicts_paper for c in checks.values())


def test_a_study_without_effect_is_inconclusive(verdicts):
    checks = verdicts["no-effect"]
    for key in "bef":
        assert checks[key].verdict == INCONCLUSIVE, (key, checks[key])
        assert checks[key].estimate.has_bounds and checks[key].estimate.contains(0.0)
    # "Costs at most 1%": no cost is consistent with it, but 1% run noise cannot show it either.
    assert checks["c"].verdict != CONTRADICTED and checks["c"].estimate.contains(0.0)
    assert checks["a"].verdict == NOT_TESTED and "no step-0 probe recorded (the first probe is at step 2)" in checks["a"].note


def test_a_study_against_the_paper_is_contradicted_and_says_so(studies, verdicts, tmp_path):
    checks = verdicts["against"]
    for key in "abcf":
        assert checks[key].verdict == CONTRADICTED, (key, checks[key])
        assert checks[key].contradicts_paper
    assert checks["c"].estimate.low > 0.01
    report = render_markdown(studies["against"], [], tmp_path)
    for key in "abcf":
        assert f"**Contradicts the paper — ({key})**" in report
    assert "No verdict contradicts the paper." in render_markdown(studies["helps"], [], tmp_path)


def test_claims_of_a_study_without_a_dispersion_arm_are_not_tested(studies, verdicts):
    checks = verdicts["baseline-only"]
    for key in "bcef":
        assert checks[key].verdict == NOT_TESTED and "no finished runs of arm(s) dispersion" in checks[key].note
    assert checks["a"].verdict == SUPPORTED and checks["d"].verdict in (SUPPORTED, INCONCLUSIVE)
    budget = studies["baseline-only"].budget
    assert budget is not None and [r for r, _ in budget.rungs] == ["a", "b"] and budget.steps == (1, 1)
    assert any("2 rungs: no power law" in c for c in budget.caveats)
    assert len(checks) == 6


def test_pooled_mean_interval_holds_the_truth_about_nominally_with_two_seeds():
    """4 rungs x 2 seeds, noise that differs by rung: a percentile bootstrap covered ~75% here."""
    n = np.repeat([1e6, 4e6, 1.6e7, 6.4e7], 2)
    sd = 0.01 * np.repeat([0.77, 0.48, 0.31, 0.22], 2)
    draws = 60
    hits = sum(compute_pooled_mean(n, np.random.default_rng(s).normal(-0.05, sd), FitOptions(n_bootstrap=100, seed=s)).mean.contains(-0.05)
               for s in range(draws))
    assert 0.85 <= hits / draws <= 1.0, f"coverage {hits}/{draws}"
