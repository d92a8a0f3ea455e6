"""Per-rung sweeps: Ray Tune + Optuna + ASHA driving Ray Train + DeepSpeed, recorded in MLflow.

The end-to-end tests are `slow` (real sweeps of real Ray Train runs: minutes on 2 cores)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scaling import names
from scaling.config import study_from_dict
from scaling.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SAMPLES = 3


def sweep_study(tmp_path, name, **search):
    return {
        "study": name,
        "ladder": "tiny",
        "rungs": ["tiny-165K", "tiny-429K"],
        "arms": ["baseline"],
        "seeds": [0],
        "data": {"source": "bundled", "max_rows": 600},
        "training": {"seq_len": 32, "batch_size": 4, "micro_batch_size": 2, "max_steps": 4, "lr": 3e-3},
        "probes": {"every_steps": 1, "texts": 2, "max_length": 32, "val_batches": 1},
        "resources": {"num_workers": 1, "zero_stage": 0},
        "checkpoint": {"every_steps": 2, "num_to_keep": 1},
        "search": {"num_samples": SAMPLES, "lambda": [0.01, 1.0], "layers": ["all", "last", "0.5:1.0"],
                   "grace_period": 1, "reduction_factor": 2, **search},
        "storage_path": str(tmp_path / "runs"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


# --- fast: validation and helpers ------------------------------------------------------------------


@pytest.mark.parametrize("search, message", [
    ({"lambda": [1.0, 0.1]}, "empty or invalid log-uniform range"),
    ({"lambda": [0.0, 1.0]}, "empty or invalid"),
    ({"layers": ["all", "0,7"]}, "'0,7' is not valid for rung 'tiny-165K'"),
    ({"layers": []}, "search.layers is empty"),
    ({"metric": "val/accuracy"}, "not reported by any run"),
    ({"mode": "best"}, "search.mode='best'"),
    ({"variants": ["sparkle"]}, "'sparkle' is unknown"),
])
def test_bad_search_spaces_fail_before_any_trial(tmp_path, search, message):
    with pytest.raises(ConfigError) as info:
        study_from_dict(sweep_study(tmp_path, "bad", **search))
    assert message in str(info.value)


def test_search_needs_a_baseline_to_compare_against(tmp_path):
    raw = sweep_study(tmp_path, "nobase")
    raw["arms"] = ["neftune"]
    with pytest.raises(ConfigError, match="add `baseline`"):
        study_from_dict(raw)


def test_paper_default_is_evaluated_first_and_clipped_to_the_range(tmp_path):
    from scaling.sweep import initial_points

    study = study_from_dict(sweep_study(tmp_path, "points"))
    assert initial_points(study)[0]["lambda"] == 0.1 and initial_points(study)[0]["layers"] == "all"
    narrow = study_from_dict(sweep_study(tmp_path, "points", **{"lambda": [0.5, 2.0], "layers": ["last"]}))
    assert initial_points(narrow)[0]["lambda"] == 0.5 and initial_points(narrow)[0]["layers"] == "last"


def test_preemption_is_told_apart_from_real_failures():
    from ray.exceptions import ActorDiedError

    from scaling.runs import is_preemption

    try:
        try:
            raise ActorDiedError()
        except ActorDiedError as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as wrapped:
        assert is_preemption(wrapped)
    assert not is_preemption(ValueError("bad lambda"))
    assert not is_preemption(FloatingPointError("nan"))


def test_trial_queue_hands_out_wanted_trials_routes_reports_and_never_leaves_a_trial_waiting(ray_session):
    """The queue between Tune's trials and the sweep's worker groups, with real actors: a trial whose
    process died before its turn is never handed out, one that died while training is reported unwanted,
    a restarted group gets its own trial back, a preempted trial goes first (with retries left) and fails
    after, and once no group is left every waiting trial ends with the reason."""
    import ray

    from scaling.handoffs import Closed, Done, Preempted, Report
    from scaling.sweep import TrialQueue

    def handed(item):  # (trial id, task) of a Handout
        return item.trial_id, item.task

    @ray.remote(num_cpus=0)
    class Trial:
        def ping(self):
            return True

    queue = ray.remote(num_cpus=0, max_concurrency=100)(TrialQueue).remote(preemption_retries=1)
    owners = {name: Trial.remote() for name in ("t1", "t2", "t3", "t4")}
    ray.get([owner.ping.remote() for owner in owners.values()])
    try:
        for name, owner in owners.items():
            ray.get(queue.submit.remote(name, f"task-{name}", owner))
        ray.kill(owners["t1"])  # Tune stopped t1 before any group took it
        assert handed(ray.get(queue.take.remote("g0", 5.0))) == ("t2", "task-t2")
        assert handed(ray.get(queue.take.remote("g0", 5.0))) == ("t2", "task-t2")  # g0 restarted: its trial again
        assert ray.get(queue.report.remote("t2", {"val/loss": 1.0})) is True
        assert ray.get(queue.next_event.remote("t2", 5.0)) == Report({"val/loss": 1.0})
        assert ray.get(queue.next_event.remote("t2", 0.1)) is None
        ray.get(queue.finish.remote("g0", "t2"))
        assert ray.get(queue.next_event.remote("t2", 5.0)) == Done(None)
        assert handed(ray.get(queue.take.remote("g1", 5.0))) == ("t3", "task-t3")
        assert ray.get(queue.group_failed.remote("g1", "node lost", True)) is True  # preempted: t3 goes first
        assert ray.get(queue.next_event.remote("t3", 5.0)) == Preempted(1, "node lost")
        assert handed(ray.get(queue.take.remote("g2", 5.0))) == ("t3", "task-t3")
        ray.get(queue.abandon.remote("t3"))  # the trial left (Tune stopped it): the group is told at its report
        assert ray.get(queue.report.remote("t3", {"val/loss": 2.0})) is False
        assert ray.get(queue.group_failed.remote("g2", "no trial", False)) is True
        assert handed(ray.get(queue.take.remote("g3", 5.0))) == ("t4", "task-t4")
        assert ray.get(queue.group_failed.remote("g3", "node lost again", True)) is True  # t4's one retry
        assert ray.get(queue.group_failed.remote("g4", "never started", False)) is False  # had no trial
        ray.get(queue.expect_groups.remote(1))
        ray.get(queue.retire.remote("cannot place the workers"))  # the last group gave up
        events = [ray.get(queue.next_event.remote("t4", 5.0)) for _ in range(2)]
        assert isinstance(events[0], Preempted) and isinstance(events[1], Done) and "no worker group" in events[1].failure
        late = Trial.remote()
        ray.get(queue.submit.remote("t5", "task-t5", late))  # a trial that comes after: ends at once
        assert "cannot place the workers" in ray.get(queue.next_event.remote("t5", 5.0)).failure
        ray.get(queue.close.remote())
        assert ray.get(queue.take.remote("g5", 5.0)) == Closed()
    finally:
        ray.kill(queue)


def test_a_trial_resumed_after_its_end_still_reports_the_search_metric(ray_session, tmp_path, monkeypatch):
    """A driver that dies after a trial trained to the end, but before Tune took its last result in, leaves
    the trial to be restarted by the resumed search, with nothing left to train: either its outcome is in
    its folder (the run is skipped) or only its final checkpoint is (the worker died before writing the
    outcome). Either way the sweep's worker group must still report `val/loss` through the queue, or Tune
    fails the whole resumed search ("Trial returned a result which did not include the specified metric"),
    and record nothing twice."""
    import ray
    from ray import tune

    from conftest import tiny_train_study
    from scaling.config import plan_runs
    from scaling.run_folder import RunFolder
    from scaling.runs import build_task
    from scaling.study import data_refs, prepare_data
    from scaling.sweep import TrialQueue, serve_trials
    from scaling.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    study = tiny_train_study(tmp_path, "final-report", arms=["baseline"], resources={"num_workers": 1})
    (plan,) = plan_runs(study)
    refs = data_refs(study, prepare_data(study, plan.rung.vocab_size, progress=lambda *_: None))
    tracker = Tracker(study.tracking_uri, study.study)
    parent = tracker.study_run_id(study.record_params())
    run_id, _ = tracker.child_run(parent, "final", "final-report-run", {}, {})
    folder = RunFolder.for_trial(study.storage_path, study.study, plan.rung.name, "the-trial")
    task = build_task(study, plan, study.arms[0], 0, "final", run_id, tracker.tracking_uri, refs, folder)

    def follow(config, queue, task):  # a nested function: Ray ships it by value
        from scaling.sweep import follow_trial

        failure = follow_trial(queue, "the-trial", task, tune.report)
        assert failure is None, failure

    for life in (1, 2, 3):  # 2: the outcome is there, the run is skipped; 3: only the final checkpoint is
        if life == 3:
            assert folder.read_outcome()["failure"] is None
            folder.clear_outcome()
        queue = ray.remote(num_cpus=0, max_concurrency=100)(TrialQueue).remote()
        with serve_trials(study, queue, 1, f"life{life}", progress=lambda *_: None):
            grid = tune.Tuner(
                tune.with_resources(tune.with_parameters(follow, queue=queue, task=task), {"CPU": 0.01}),
                tune_config=tune.TuneConfig(metric=names.VAL_LOSS, mode="min"),
                run_config=tune.RunConfig(name=f"life{life}", storage_path=str(tmp_path / "tune"), verbose=0)).fit()
        ray.kill(queue)
        assert not grid.errors, f"life {life}: {grid.errors}"
        assert names.VAL_LOSS in grid.get_best_result().metrics
    history = Tracker(study.tracking_uri, study.study)._client.get_metric_history(run_id, names.VAL_LOSS)
    assert sorted(m.step for m in history) == [2, 4]  # the later lives recorded nothing twice
    assert folder.read_outcome()["report"][names.VAL_LOSS] == grid.get_best_result().metrics[names.VAL_LOSS]


# --- slow: real sweeps -------------------------------------------------------------------------------


def mlflow_runs(tracking_uri, study):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id], max_results=1000)


def by_kind(runs, kind):
    return [r for r in runs if r.data.tags.get(names.TAG_KIND) == kind]


@pytest.mark.slow
def test_two_rung_sweep_records_trials_picks_best_on_validation_and_survives_a_nan_trial(
        ray_session, tmp_path, monkeypatch):
    from scaling.study import run_study

    monkeypatch.chdir(tmp_path)
    study = study_from_dict(sweep_study(tmp_path, "sweep"))
    from scaling.faults import NAN_LOSS, Fault, install

    groups_before = set(ray_session.util.placement_group_table())
    with install(Fault(NAN_LOSS, step=1, run="trial1 ")):  # the second trial of each rung turns NaN
        outcomes = run_study(study, "")
    # No worker group outlives its trial (an early-stopped trial's used to stay reserved for good).
    table = ray_session.util.placement_group_table()
    assert not [g for key, g in table.items() if key not in groups_before and g["state"] != "REMOVED"]
    runs = mlflow_runs(study.tracking_uri, "sweep")
    (parent,) = by_kind(runs, names.KIND_STUDY)
    sweeps = by_kind(runs, names.KIND_SWEEP)
    assert sorted(s.data.tags[names.TAG_RUNG] for s in sweeps) == ["tiny-165K", "tiny-429K"]
    for sweep in sweeps:
        assert sweep.data.tags[names.TAG_STUDY_RUN_ID] == parent.info.run_id
        trials = [t for t in by_kind(runs, names.KIND_TRIAL)
                  if t.data.tags["mlflow.parentRunId"] == sweep.info.run_id]
        assert len(trials) == SAMPLES
        states = {t.data.tags[names.TAG_TRIAL_STATE] for t in trials}
        assert states <= {names.TRIAL_FINISHED, names.TRIAL_EARLY_STOPPED, names.TRIAL_FAILED}
        failed = [t for t in trials if t.data.tags[names.TAG_TRIAL_STATE] == names.TRIAL_FAILED]
        assert len(failed) == 1 and "non-finite loss" in failed[0].data.tags[names.TAG_FAILURE]
        for trial in trials:  # sampled values are the trial's params
            assert float(trial.data.params[names.PARAM_LAMBDA]) > 0 and trial.data.params[names.PARAM_LAYERS]
        finished = [t for t in trials if t.data.tags[names.TAG_TRIAL_STATE] == names.TRIAL_FINISHED]
        best = [t for t in trials if t.data.tags.get(names.TAG_BEST_TRIAL) == "true"]
        assert len(best) == 1
        assert best[0].data.metrics[names.VAL_LOSS] == min(t.data.metrics[names.VAL_LOSS] for t in finished)
        # The paper's default is evaluated first.
        first = min(trials, key=lambda t: t.info.start_time)
        assert float(first.data.params[names.PARAM_LAMBDA]) == pytest.approx(0.1)
    baselines = by_kind(runs, names.KIND_TRAIN)
    assert sorted(b.data.tags[names.TAG_RUNG] for b in baselines) == ["tiny-165K", "tiny-429K"]
    assert (tmp_path / "outputs" / "sweep" / "sweep_summary.csv").is_file()
    assert {o.rung for o in outcomes} == {"tiny-165K", "tiny-429K"}


@pytest.mark.slow
def test_killed_driver_resumes_without_duplicates_or_reruns(tmp_path):
    import yaml

    raw = sweep_study(tmp_path, "resume")
    raw["rungs"] = ["tiny-165K"]
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(REPO / "scaling" / "run.py"), str(path)]
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.time() + 600
        while time.time() < deadline and count_trials(tmp_path, "finished") < 1:
            time.sleep(2)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait()
    assert count_trials(tmp_path, "finished") >= 1
    done_before = finished_trial_ids(tmp_path)

    second = subprocess.run(command + ["--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    runs = mlflow_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "resume")
    trials = by_kind(runs, names.KIND_TRIAL)
    trial_ids = [t.data.tags["tune_trial_id"] for t in trials]
    assert len(trial_ids) == len(set(trial_ids)) == SAMPLES  # the same set of trials, none twice
    assert len(by_kind(runs, names.KIND_TRAIN)) == 1 and len(by_kind(runs, names.KIND_SWEEP)) == 1
    for trial in trials:
        if trial.data.tags["tune_trial_id"] in done_before:  # finished trials were not rerun
            history = [m.step for m in _history(tmp_path, trial.info.run_id)]
            assert len(history) == len(set(history))


def count_trials(tmp_path, state):
    return len(finished_trial_ids(tmp_path)) if state == "finished" else 0


def finished_trial_ids(tmp_path) -> set[str]:
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return set()
    try:
        with sqlite3.connect(db, timeout=1) as connection:
            rows = connection.execute(
                "select t2.value from tags t1 join tags t2 on t1.run_uuid = t2.run_uuid "
                "where t1.key = 'trial_state' and t1.value = 'finished' and t2.key = 'tune_trial_id'").fetchall()
    except sqlite3.Error:
        return set()
    return {row[0] for row in rows}


def _history(tmp_path, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        run_id, names.TRAIN_CE_LOSS)
