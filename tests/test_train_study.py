"""End to end: the tiny ladder on a real local Ray, 2 Ray Train workers, real DeepSpeed ZeRO-3 on
gloo, a real MLflow SQLite store in a temp folder."""

from __future__ import annotations

import json

import pytest

from scaling import names
from conftest import tiny_train_study

STEPS = 4


tiny_study = tiny_train_study  # the shared tiny study (tests/conftest.py)


def client_for(study):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=study.tracking_uri)


def runs_of(study, kind):
    client = client_for(study)
    experiment = client.get_experiment_by_name(study.study)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.kind = '{kind}'")


@pytest.fixture(scope="module")
def finished_study(ray_session, tmp_path_factory):
    from scaling.study import run_study

    tmp = tmp_path_factory.mktemp("study")
    study = tiny_study(tmp, "paired")
    outcomes = run_study(study, "study: paired\n")
    return study, outcomes


def test_both_arms_finish(finished_study):
    _, outcomes = finished_study
    assert [(o.arm, o.status) for o in outcomes] == [("baseline", "finished"), ("dispersion", "finished")]
    for outcome in outcomes:
        assert outcome.val_loss is not None and outcome.val_loss > 0


def test_mlflow_parent_child_structure(finished_study):
    study, _ = finished_study
    parents = runs_of(study, names.KIND_STUDY)
    children = runs_of(study, names.KIND_TRAIN)
    assert len(parents) == 1 and len(children) == 2
    for child in children:
        tags = child.data.tags
        assert tags[names.TAG_STUDY_RUN_ID] == parents[0].info.run_id
        assert names.TAG_PARENT_RUN_ID not in tags  # top-level rows in MLflow's runs table
        assert tags[names.TAG_RUNG] == "tiny-165K" and tags[names.TAG_SEED] == "0"
        assert tags[names.TAG_STATUS] == names.STATUS_FINISHED
        assert int(tags[names.TAG_N_PARAMS]) > int(tags[names.TAG_N_PARAMS_NON_EMBEDDING]) > 0
        assert child.info.status == "FINISHED"


def test_metrics_per_step_and_artifacts(finished_study, tmp_path):
    study, _ = finished_study
    client = client_for(study)
    for child in runs_of(study, names.KIND_TRAIN):
        run_id = child.info.run_id
        ce_steps = [m.step for m in client.get_metric_history(run_id, names.TRAIN_CE_LOSS)]
        assert sorted(ce_steps) == list(range(1, STEPS + 1))
        assert sorted(m.step for m in client.get_metric_history(run_id, names.VAL_LOSS)) == [2, 4]
        assert sorted(m.step for m in client.get_metric_history(run_id, names.COND_SPEARMAN)) == [2, 4]
        assert client.get_metric_history(run_id, names.layer_metric(2, "mean_cos"))  # embedding output + 2 blocks (the last after the final norm)
        has_dispersion = bool(client.get_metric_history(run_id, names.TRAIN_DISPERSION_LOSS))
        assert has_dispersion == (child.data.tags[names.TAG_ARM] == names.ARM_DISPERSION)
        if has_dispersion:
            scaled = client.get_metric_history(run_id, names.TRAIN_DISPERSION_LOSS_SCALED)
            raw = client.get_metric_history(run_id, names.TRAIN_DISPERSION_LOSS)
            assert scaled[0].value == pytest.approx(0.1 * raw[0].value)
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {names.ARTIFACT_CONDENSATION_JSON, names.ARTIFACT_HEATMAP_PNG} <= artifacts
        local = client.download_artifacts(run_id, names.ARTIFACT_CONDENSATION_JSON, str(tmp_path))
        record = json.loads(open(local).read())
        assert len(record["layers"]) == 3 and -1 <= record["spearman"] <= 1
        assert len(record["layers"][0]["histogram"]) == 128


def test_paired_arms_share_init_and_data_order(finished_study):
    study, _ = finished_study
    children = runs_of(study, names.KIND_TRAIN)
    init = {c.data.tags["init_hash"] for c in children}
    order = {c.data.tags["data_order_hash"] for c in children}
    assert len(init) == 1 and len(order) == 1
    # ...and the arms really differ in what they optimise.
    losses = {c.data.tags[names.TAG_ARM]: c.data.metrics[names.TRAIN_CE_LOSS] for c in children}
    assert losses["baseline"] != losses["dispersion"]


def test_a_finished_run_accounts_for_every_second_of_its_slot(finished_study):
    """`time/*`: every phase's seconds, what no phase claimed, and the slot they add up to (issue 25)."""
    from scaling import timing

    study, _ = finished_study
    for child in runs_of(study, names.KIND_TRAIN):
        metrics = child.data.metrics
        slot = metrics[timing.SLOT]
        phases = [metrics[timing.seconds_key(phase)] for phase in timing.PHASES]
        assert slot > 0 and min(phases) >= 0 and metrics[timing.OTHER] >= 0
        assert sum(phases) + metrics[timing.OTHER] == pytest.approx(slot, rel=0.01)
        assert metrics[timing.seconds_key("step")] > 0 and metrics[timing.seconds_key("startup")] > 0
        assert 0 < metrics[timing.GOODPUT] <= 1
        assert metrics[timing.seconds_key("probe")] > 0 and metrics[timing.seconds_key("checkpoint")] > 0
        assert metrics[names.TIME_RUN_S] <= slot  # the slot starts before the run's record opens
        has_dispersion = child.data.tags[names.TAG_ARM] == names.ARM_DISPERSION
        dispersion = metrics[timing.seconds_key("dispersion")]
        assert (0 < dispersion < metrics[timing.seconds_key("step")]) if has_dispersion else dispersion == 0


def test_rerun_skips_finished_runs(finished_study):
    from scaling.study import run_study

    study, _ = finished_study
    outcomes = run_study(study, "study: paired\n")
    assert [o.status for o in outcomes] == ["skipped", "skipped"]
    assert len(runs_of(study, names.KIND_TRAIN)) == 2
    assert len(runs_of(study, names.KIND_STUDY)) == 1


def test_killed_worker_resumes_from_checkpoint(ray_session, tmp_path):
    from scaling.study import run_study

    # Checkpoints at steps 2 and 4; rank 1 dies once after step 6. Ray Train registers a reported
    # checkpoint asynchronously, so a kill right after a report may fall back to the one before:
    # either is a resume, a restart from step 0 is not.
    from scaling.faults import KILL_WORKER, Fault, install

    study = tiny_study(tmp_path, "killed", arms=["baseline"], resources={"num_workers": 2, "zero_stage": 2},
                       training={"max_steps": 7})
    with install(Fault(KILL_WORKER, step=6, rank=1)):
        outcomes = run_study(study, "")
    assert [o.status for o in outcomes] == ["finished"]
    (child,) = runs_of(study, names.KIND_TRAIN)
    assert child.data.tags["resumed_from_step"] in {"2", "4"}
    ce_steps = sorted(m.step for m in client_for(study).get_metric_history(child.info.run_id, names.TRAIN_CE_LOSS))
    assert ce_steps == list(range(1, 8))  # the steps the resumed life ran again are not recorded twice


def test_nan_loss_fails_that_run_and_the_study_goes_on(ray_session, tmp_path):
    from scaling.study import run_study

    # A NaN loss injected at step 2 of every run (an lr big enough to overflow is refused as bad input).
    from scaling.faults import NAN_LOSS, Fault, install

    study = tiny_study(tmp_path, "nan", arms=["baseline"], rungs=["tiny-165K", "tiny-429K"],
                       training={"max_steps": 3}, resources={"num_workers": 1, "zero_stage": 0})
    with install(Fault(NAN_LOSS, step=2)):
        outcomes = run_study(study, "")
    assert [o.status for o in outcomes] == ["failed", "failed"]  # both ran: one failure did not stop the study
    for child in runs_of(study, names.KIND_TRAIN):
        assert child.data.tags[names.TAG_STATUS] == names.STATUS_FAILED
        assert "non-finite loss" in child.data.tags[names.TAG_FAILURE]


def test_queued_runs_train_in_turn_in_one_worker_group_and_a_broken_one_costs_only_itself(ray_session, tmp_path):
    from scaling.faults import KILL_WORKER, Fault, install
    from scaling.study import run_study

    # A worker group takes all 4 CPUs, so the 4 runs queue: one group trains them in turn. The third
    # run's worker dies with no restart left (max_failures 0): it fails with the reason, and a new
    # group trains the fourth run.
    study = tiny_study(tmp_path, "chain", seeds=[0, 1], training={"max_steps": 3},
                       resources={"num_workers": 1, "zero_stage": 0, "cpus_per_worker": 4},
                       checkpoint={"every_steps": 0, "num_to_keep": 1, "max_failures": 0})
    with install(Fault(KILL_WORKER, step=2, run="base tiny-165K s1")):
        outcomes = run_study(study, "")
    assert [(o.seed, o.arm, o.status) for o in outcomes] == [
        (0, "baseline", "finished"), (0, "dispersion", "finished"), (1, "baseline", "failed"),
        (1, "dispersion", "finished")], [o.detail for o in outcomes]
    runs = {(int(r.data.tags[names.TAG_SEED]), r.data.tags[names.TAG_ARM]): r for r in runs_of(study, names.KIND_TRAIN)}
    broken = runs[1, "baseline"]
    assert broken.data.tags[names.TAG_STATUS] == names.STATUS_FAILED and broken.info.status == "FAILED"
    assert broken.data.tags[names.TAG_FAILURE]
    groups = [runs[key].data.tags[names.TAG_WORKER_GROUP] for key in sorted(runs)]
    assert groups[0] == groups[1] == groups[2] != groups[3], groups  # one process for three runs, then a new one
    for key in ((0, "baseline"), (0, "dispersion"), (1, "dispersion")):
        assert runs[key].info.status == "FINISHED" and names.VAL_LOSS in runs[key].data.metrics
    # A run second in its group starts from the same weights as its pair that came first.
    assert runs[0, "baseline"].data.tags[names.TAG_INIT_HASH] == runs[0, "dispersion"].data.tags[names.TAG_INIT_HASH]
    rerun = run_study(study, "")  # the failed run is tried again (no fault now), the others skipped
    assert [o.status for o in rerun] == ["skipped", "skipped", "finished", "skipped"], [o.detail for o in rerun]


@pytest.mark.slow  # ~40 s: the driver's side of a lost finish (the run loop's side is in test_evaluation_study)
def test_a_worker_lost_while_a_run_finishes_beside_the_next_fails_the_run_that_was_training(ray_session, tmp_path):
    """`finish_records: beside_next`, no restart left: the worker dies while it finishes the first run's
    records (the second run has just started). The second run is failed with the reason; the first, which
    trained to its end, resumes after its last step in a new group and finishes. Run again, the second trains."""
    from scaling.faults import KILL_WHILE_FINISHING, Fault, install
    from scaling.study import run_study

    study = tiny_study(tmp_path, "beside", training={"max_steps": 3}, probes={"every_steps": 0},
                       resources={"num_workers": 1, "zero_stage": 0, "cpus_per_worker": 4,
                                  "finish_records": "beside_next"},
                       checkpoint={"every_steps": 0, "num_to_keep": 1, "max_failures": 0})
    with install(Fault(KILL_WHILE_FINISHING, step=3)):
        outcomes = run_study(study, "")
    assert sorted(o.status for o in outcomes) == ["failed", "finished"], [o.detail for o in outcomes]
    (finished,) = [r for r in runs_of(study, names.KIND_TRAIN) if r.info.status == "FINISHED"]
    assert finished.data.tags[names.TAG_RESUMED_FROM_STEP] == "3"  # from its final checkpoint: nothing retrained
    assert sorted(m.step for m in client_for(study).get_metric_history(finished.info.run_id, names.TRAIN_CE_LOSS)) == [1, 2, 3]
    assert sorted(o.status for o in run_study(study, "")) == ["finished", "skipped"]


def test_an_outcome_the_driver_never_took_in_is_recorded_without_training_and_a_failed_run_resumes(ray_session,
                                                                                                     tmp_path):
    from scaling.study import run_study
    from scaling.tracking import Tracker

    study = tiny_study(tmp_path, "outcome", arms=["baseline"], training={"max_steps": 3},
                       resources={"num_workers": 1, "zero_stage": 0}, probes={"every_steps": 0})
    assert [o.status for o in run_study(study, "")] == ["finished"]
    (child,) = runs_of(study, names.KIND_TRAIN)
    run_id, group = child.info.run_id, child.data.tags[names.TAG_WORKER_GROUP]
    tracker = Tracker(study.tracking_uri, study.study)
    tracker.reopen(run_id)  # as if the driver died after the run wrote its outcome, before recording it
    (outcome,) = run_study(study, "")
    (child,) = runs_of(study, names.KIND_TRAIN)
    assert outcome.status == "finished" and child.info.status == "FINISHED"
    assert child.data.tags[names.TAG_WORKER_GROUP] == group  # taken in from its folder: no group trained it again
    tracker.finish(run_id, names.STATUS_FAILED, "records missing")  # a run the driver failed: tried again
    (outcome,) = run_study(study, "")
    (child,) = runs_of(study, names.KIND_TRAIN)
    assert outcome.status == "finished" and child.data.tags[names.TAG_WORKER_GROUP] != group
    assert child.data.tags[names.TAG_RESUMED_FROM_STEP] == "3"  # from its final checkpoint, not step 0
    assert names.TAG_FAILURE not in child.data.tags
    steps = sorted(m.step for m in client_for(study).get_metric_history(run_id, names.TRAIN_CE_LOSS))
    assert steps == [1, 2, 3]


def test_more_workers_than_the_cluster_has_fails_before_any_work(ray_session, tmp_path):
    from scaling.errors import ConfigError
    from scaling.study import run_study

    study = tiny_study(tmp_path, "toobig", resources={"num_workers": 64},
                       training={"batch_size": 128, "micro_batch_size": 2})
    with pytest.raises(ConfigError, match="num_workers=64"):
        run_study(study, "")
    assert not (tmp_path / "mlflow.db").exists()


def test_pretrained_ladder_mid_trains_each_rung_from_its_checkpoint(ray_session, tmp_path, tokenizer):
    from scaling.model import save_tiny_gpt2
    from scaling.study import run_study

    # A pretrained ladder of two local checkpoints (3 and 4 blocks, unlike the rungs' own shapes), the
    # raw-packing data path, a fixed token budget and a probe of the initial state.
    small = save_tiny_gpt2(tmp_path / "small", tokenizer, n_layer=3, seed=1)
    large = save_tiny_gpt2(tmp_path / "large", tokenizer, n_layer=4, n_embd=48, seed=2)
    study = tiny_study(tmp_path, "midtrain", rungs=["tiny-165K", "tiny-429K"],
                       arms=["baseline", {"name": "dispersion", "layers": "last"}],
                       data={"packing": "raw"},
                       training={"init_from": {"tiny-165K": str(small), "tiny-429K": str(large)},
                                 "tokens": 300, "max_steps": None},
                       probes={"every_steps": 0, "at_start": True}, resources={"num_workers": 1, "zero_stage": 0})
    outcomes = run_study(study, "")
    assert [o.status for o in outcomes] == ["finished"] * 4
    client = client_for(study)
    for child in runs_of(study, names.KIND_TRAIN):
        blocks = 3 if child.data.tags[names.TAG_RUNG] == "tiny-165K" else 4
        history = client.get_metric_history(child.info.run_id, names.layer_metric(blocks, "mean_cos"))
        assert sorted(m.step for m in history) == [0, 3]  # the initial state and the end
        # 300 tokens at 4 x 32 = 128 per step: the budget is a floor, so 3 steps (384 tokens).
        assert sorted(m.step for m in client.get_metric_history(child.info.run_id, names.TRAIN_CE_LOSS)) == [1, 2, 3]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id, names.ARTIFACT_PROBES_DIR)}
        assert artifacts == {f"{names.ARTIFACT_PROBES_DIR}/step_0000000.json", f"{names.ARTIFACT_PROBES_DIR}/step_0000003.json"}
    for rung in ("tiny-165K", "tiny-429K"):  # paired arms start from the same checkpoint
        assert len({c.data.tags["init_hash"] for c in runs_of(study, names.KIND_TRAIN)
                    if c.data.tags[names.TAG_RUNG] == rung}) == 1


def test_active_forgetting_trains_in_bf16_under_zero_2(ray_session, tmp_path):
    from scaling.study import run_study

    study = tiny_study(tmp_path, "forgetting", arms=[{"name": "active_forgetting", "forget_every": 2}],
                       training={"max_steps": 4}, probes={"every_steps": 0},
                       resources={"num_workers": 2, "zero_stage": 2, "precision": "bf16"})
    (outcome,) = run_study(study, "")
    assert outcome.status == "finished", outcome.detail
    (child,) = runs_of(study, names.KIND_TRAIN)
    assert child.data.tags[names.TAG_PRECISION] == "bf16"
    assert float(child.data.params[names.PARAM_EMBEDDING_LR]) == 5e-5
