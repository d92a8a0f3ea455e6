"""Studies that decide their claims in waves: the `decide:` section, the alpha-spending plan, the decision rule
(pure and fast), the report's course section, the sequential benchmark's smoke run, and (slow) a real study on
a real local Ray + MLflow store killed between waves and resumed, deciding as an uninterrupted one does."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from analysis.waves import (DECIDED, MORE_RUNGS, MORE_SEEDS, OVER_BUDGET, UNDECIDED, WaveRecord, compute_seeds_needed,
                            compute_variance, read_course, run_look)
from scaling import names
from scaling.config import describe_study_plan, load_study_file, plan_runs
from scaling.errors import ConfigError
from scaling.sequential import DecideConfig, compute_spent_alpha, plan_waves

REPO = Path(__file__).resolve().parent.parent
DEMO = str(REPO / "search_spaces" / "demo.yaml")


# --- the section ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decide,message", [
    ({"claims": ["x"], "max_seeds": 5}, "decide.claims: 'x' is not a claim"),
    ({"claims": [], "max_seeds": 5}, "decide.claims is empty"),
    ({"claims": ["b"]}, "decide: no budget; give max_seeds"),
    ({"claims": ["b"], "max_seeds": 1}, "the budget (max_seeds 1) is smaller than the first wave"),
    ({"claims": ["b"], "max_runs": 8}, "the budget (max_runs 8 (1 seeds x 4 rung(s) x 2 arm(s))) is smaller"),
    ({"claims": ["b"], "max_seeds": 4, "alpha": 0.7}, "decide.alpha=0.7: must be in (0, 0.5]"),
    ({"claims": ["b"], "max_seeds": 4, "power": 0.2}, "decide.power=0.2: must be in [0.5, 1)"),
    ({"claims": ["c"], "max_seeds": 4, "smallest_effects": {"c": 0.1}}, "claim c has no 'no effect' verdict"),
    ({"claims": ["b"], "max_seeds": 4, "smallest_effects": {"f": 0.1}}, "decide.smallest_effects.f: 'f' is not among decide.claims"),
    ({"claims": ["b"], "max_seeds": 4, "smallest_effects": {"b": 0}}, "decide.smallest_effects.b=0.0: must be > 0"),
    ({"claims": ["b"], "max_seeds": 4, "spending": "wild"}, "decide.spending='wild': use one of obrien_fleming, pocock"),
    ({"claims": ["b"], "max_runs": 10**9}, "decide.max_runs=1000000000: allows"),
    ({"claims": ["b"], "max_seeds": 4, "wave_sedes": 1}, "unknown key 'decide.wave_sedes'"),
])
def test_bad_decide_sections_are_refused_naming_key_value_and_fix(decide, message, tmp_path, monkeypatch):
    import json

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_study_file(DEMO, [f"decide={json.dumps(decide)}"])
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides,message", [
    (["decide={claims: [d], max_seeds: 4}", "rungs=[tiny-165K, tiny-429K]"], "claim 'd' needs a slope over at least 3 rungs"),
    (["decide={claims: [f], max_seeds: 4}", "eval=null"], "claim 'f' needs downstream accuracy"),
    (["decide={claims: [a], max_seeds: 4}", "probes.at_start=false"], "claim 'a' needs a step-0 probe"),
    (["decide={claims: [b], max_seeds: 4}", "arms=[baseline]"], "claim 'b' needs paired arms"),
    (["decide={claims: [b], max_seeds: 4}", "search.num_samples=2"], "search.num_samples: 0 or drop decide"),
])
def test_a_claim_the_design_cannot_test_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=None) as caught:
        load_study_file(DEMO, overrides)
    assert message in str(caught.value)


def test_the_dry_run_prints_the_plan():
    study = load_study_file(DEMO)
    assert study.decide is not None, "the demo decides its claims"
    text = describe_study_plan(study, plan_runs(study), gpu=None)
    plan = plan_waves(study.decide, study.seeds, len(study.rungs), len(study.arms))
    assert f"first wave {plan.looks[0].runs} runs" in text and f"growing to {plan.looks[-1].runs} runs" in text
    assert "budget bound:" in text and "alpha per look" in text


# --- the plan -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spending", ["obrien_fleming", "pocock"])
def test_spending_is_monotone_and_the_looks_spend_exactly_alpha(spending):
    values = [compute_spent_alpha(t, 0.05, spending) for t in np.linspace(0, 1, 21)]
    assert values[0] == 0 and math.isclose(values[-1], 0.05) and all(b >= a for a, b in zip(values, values[1:]))
    plan = plan_waves(DecideConfig(claims=("b",), max_seeds=7, wave_seeds=2, spending=spending), (3, 9), 4, 2)
    assert [look.seeds for look in plan.looks] == [2, 4, 6, 7]
    assert math.isclose(sum(look.alpha for look in plan.looks), 0.05) and all(look.alpha > 0 for look in plan.looks)
    assert plan.seeds_at(1) == (3, 9) and plan.seeds_at(4) == (3, 9, 10, 11, 12, 13, 14)  # deterministic, never reused


def test_the_smaller_budget_binds():
    plan = plan_waves(DecideConfig(claims=("b",), max_seeds=9, max_runs=40), (0, 1), 4, 2)
    assert plan.max_seeds == 5 and plan.looks[-1].runs == 40 and plan.bound.startswith("max_runs 40")


# --- the decision rule ----------------------------------------------------------------------------------------


def study_frames(effect: float, rung_sd: float, pair_sd: float, seeds: int, rungs: int = 4, seed: int = 0):
    """(final, initial) of a synthetic study: paired late-half cosine differences with a rung random effect."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(rungs):
        n = 1e5 * 3 ** r
        shift = rng.normal(0, rung_sd)
        for s in range(seeds):
            base = 0.3 + rng.normal(0, 0.01)
            diff = effect + shift + rng.normal(0, pair_sd)
            for arm, value in ((names.ARM_BASELINE, base), (names.ARM_DISPERSION, base + diff)):
                rows.append({"rung": f"r{r}", "n": n, "arm": arm, "seed": s, "metric": names.COND_LATE_HALF_MEAN_COS, "value": value})
                rows.append({"rung": f"r{r}", "n": n, "arm": arm, "seed": s, "metric": names.VAL_LOSS, "value": 5.0})
    final = pl.DataFrame(rows)
    return final, final.clear()


def course(final, initial, decide):
    plan = plan_waves(decide, (0, 1), 4, 2)
    records, earlier = [], None
    for wave in range(1, len(plan.looks) + 1):
        seeds = plan.seeds_at(wave)
        earlier = run_look(final.filter(pl.col("seed").is_in(seeds)), initial, plan, decide, wave, earlier)
        records.append(earlier)
        if not earlier.added:
            break
    return records


def test_a_large_effect_is_decided_at_the_first_look_and_the_study_stops():
    final, initial = study_frames(-0.2, 0.005, 0.01, seeds=5)
    records = course(final, initial, DecideConfig(claims=("b",), max_seeds=5))
    assert len(records) == 1 and records[0].state("b").state == "supported" and records[0].state("b").decided_at == 1
    assert records[0].added == () and records[0].stop == "every stated claim is decided"
    assert records[0].state("b").low < -0.2 < records[0].state("b").high  # the look's repeated interval


def test_seeds_are_added_while_they_can_decide_and_a_decision_is_kept():
    final, initial = study_frames(-0.03, 0.0, 0.03, seeds=5)  # seed noise only: seeds buy power
    records = course(final, initial, DecideConfig(claims=("b",), max_seeds=5))
    assert records[0].state("b").state == MORE_SEEDS and records[0].added == (2,)
    assert "may decide it" in records[0].state("b").why
    assert [r.seeds for r in records] == [(0, 1), (0, 1, 2), (0, 1, 2, 3), (0, 1, 2, 3, 4)][:len(records)]
    decided = [r for r in records if r.state("b").state in DECIDED]
    for later in decided[1:]:
        assert later.state("b") == decided[0].state("b")


def test_when_the_rung_spread_dominates_more_rungs_are_needed_and_no_seed_is_spent():
    final, initial = study_frames(0.004, 0.1, 0.002, seeds=5)  # the rungs disagree; seeds agree within a rung
    records = course(final, initial, DecideConfig(claims=("b",), max_seeds=5))
    assert records[0].state("b").state == MORE_RUNGS and records[0].added == ()
    assert "add rungs" in records[0].state("b").why and records[0].stop.startswith("more seeds cannot decide")


def test_the_last_look_stops_with_the_budget_spent_and_quotes_a_fixed_design():
    final, initial = study_frames(-0.012, 0.0, 0.03, seeds=3)
    records = course(final, initial, DecideConfig(claims=("b",), max_seeds=3, futility=False))
    last = records[-1]
    assert last.wave == 2 and last.added == ()
    if last.state("b").state not in DECIDED:
        assert last.state("b").state == UNDECIDED and last.state("b").fixed_seeds is not None


def test_a_claim_over_budget_says_so():
    final, initial = study_frames(-0.02, 0.0, 0.05, seeds=2, seed=3)
    records = course(final, initial, DecideConfig(claims=("b",), max_seeds=3))
    assert records[0].state("b").state in (OVER_BUDGET, MORE_SEEDS, MORE_RUNGS)


def test_variance_parts_and_seeds_needed():
    n = np.repeat([1e5, 1e6, 1e7, 1e8], 50)
    rng = np.random.default_rng(1)
    rung_effects = np.repeat(rng.normal(0, 0.05, 4), 50)
    var = compute_variance(n, rung_effects + rng.normal(0, 0.02, n.size), slope=False)
    assert abs(math.sqrt(var.within_var) - 0.02) < 0.003 and var.df == 3 and not var.one_rung
    assert var.se(1e9) == pytest.approx(math.sqrt(var.rung_var / 4))  # seeds cannot shrink the rung part
    only_seeds = compute_variance(n, rng.normal(0, 0.02, n.size), slope=False)
    few = compute_seeds_needed(only_seeds, 0.02, math.nan, 0.05, 0.8, 1)
    assert few is not None and compute_seeds_needed(only_seeds, 0.01, math.nan, 0.05, 0.8, 1) > few
    assert compute_variance(np.array([1e5, 1e6]), np.array([0.1, 0.2]), slope=False) is None  # one unit per rung


def test_records_round_trip_through_json_and_tags():
    final, initial = study_frames(-0.03, 0.0, 0.03, seeds=3)
    records = course(final, initial, DecideConfig(claims=("b", "c"), max_seeds=3))
    for record in records:
        assert WaveRecord.from_json(record.to_json()).to_json() == record.to_json() and len(record.to_json()) < 8000
    tags = {f"{names.TAG_WAVE_PREFIX}{r.wave:02d}": r.to_json() for r in records} | {"other": "x"}
    assert [r.to_json() for r in read_course(tags)] == [r.to_json() for r in records]


def test_the_report_tells_the_course(tmp_path):
    from analysis.fit import FitOptions
    from analysis.report import StudyAnalysis, render_markdown

    final, initial = study_frames(-0.03, 0.0, 0.03, seeds=5)
    records = course(final, initial, DecideConfig(claims=("b", "c"), max_seeds=5))
    analysis = StudyAnalysis("s", "n", ("dispersion",), "baseline", {}, {}, {}, {}, (), None, pl.DataFrame(), pl.DataFrame(), (),
                             FitOptions(), course=tuple(records))
    text = render_markdown(analysis, [], tmp_path)
    assert "## How the study decided (waves)" in text and f"Spent: {records[-1].runs} of at most 40 runs" in text
    assert "| wave | seeds added |" in text and "seeds per rung a fixed design needs" in text


def test_the_sequential_benchmark_runs():
    out = subprocess.run([sys.executable, "bench/bench_sequential.py", "--quick"], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=300).stdout
    assert "sequential, O'Brien-Fleming" in out and "any wrong (FWER)" in out and "runs spent" in out


# --- a real study: killed between waves, resumed ----------------------------------------------------------------


class Killed(Exception):
    """The driver dies right after logging a wave's decisions (before the next wave trains)."""


def wave_study(tmp_path, name: str):
    from conftest import tiny_train_study

    tmp_path.mkdir(parents=True, exist_ok=True)
    # futility off: the course must reach wave 2 whatever 4 training steps measure (1 rung: claims over its pairs)
    return tiny_train_study(tmp_path, name, seeds=[0, 1], resources={"num_workers": 1, "zero_stage": 0},
                            decide={"claims": ["b", "c"], "max_seeds": 3, "futility": False})


def logged_course(study):
    from mlflow.tracking import MlflowClient

    from scaling.tracking import find_study_run

    run = find_study_run(study.tracking_uri, study.study)
    return read_course(MlflowClient(study.tracking_uri).get_run(run.info.run_id).data.tags), run


@pytest.mark.slow
def test_a_study_killed_between_waves_resumes_at_the_next_wave_and_decides_as_an_uninterrupted_one(ray_session, tmp_path):
    """~1-2 min on 2 cores: 12 four-step runs on a real local Ray, real MLflow stores."""
    from analysis import load
    from analysis.waves import decide_wave
    from scaling.study import run_study

    study = wave_study(tmp_path / "killed", "waves")
    seen: list[str] = []

    def dies_after_wave_1(line: str) -> None:
        seen.append(line)
        if line.startswith("wave 1: "):
            raise Killed(line)

    with pytest.raises(Killed):
        run_study(study, "study: waves\n", progress=dies_after_wave_1)
    (first,), _ = logged_course(study)
    assert first.wave == 1 and first.added == (2,) and first.seeds == (0, 1) and first.runs == 4

    resumed_lines: list[str] = []
    outcomes = run_study(study, "study: waves\n", progress=resumed_lines.append)
    assert any(line.startswith("wave 1 was decided before") for line in resumed_lines)
    assert sorted((o.seed, o.arm) for o in outcomes) == [(2, names.ARM_BASELINE), (2, names.ARM_DISPERSION)]  # nothing retrained
    course, record = logged_course(study)
    assert [r.wave for r in course] == [1, 2] and course[0].to_json() == first.to_json() and course[1].added == ()
    assert course[1].runs == 6 and record.data.metrics[names.METRIC_WAVE_RUNS] == 6

    # Every decision is a function of the recorded runs: wave 1 decided again from the final store is the same.
    plan = plan_waves(study.decide, study.seeds, 1, 2)
    again = decide_wave(load.read_study(study.tracking_uri, study.study), plan, study.decide, 1)
    assert again.to_json() == first.to_json()

    twin = wave_study(tmp_path / "straight", "waves")
    run_study(twin, "study: waves\n", progress=lambda line: None)
    straight, _ = logged_course(twin)
    assert [(r.wave, r.seeds, r.added, r.runs, [(c.key, c.state, c.decided_at) for c in r.claims]) for r in straight] == \
           [(r.wave, r.seeds, r.added, r.runs, [(c.key, c.state, c.decided_at) for c in r.claims]) for r in course]
