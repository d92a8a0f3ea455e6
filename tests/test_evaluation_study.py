"""Downstream evaluation as part of a study, end to end: real Ray, real DeepSpeed, real MLflow and real
lm-eval-harness on the bundled cloze task. Each run evaluates its model at step 0, 2 and 4 as a Ray task
beside training; results land at their step; the final model's folder is recorded and lm-eval's own CLI
scores it the same; an unknown task stops the study before any training; a task whose data cannot be
loaded is recorded as failed while the run finishes."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from conftest import tiny_train_study
from scaling import names

LIMIT = 20


def client_for(study):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=study.tracking_uri)


def training_runs(study):
    client = client_for(study)
    experiment = client.get_experiment_by_name(study.study)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.kind = '{names.KIND_TRAIN}'")


@pytest.fixture(scope="module")
def evaluated(ray_session, tmp_path_factory):
    from scaling.study import run_study

    tmp = tmp_path_factory.mktemp("evaluated")
    broken = tmp / "tasks"
    broken.mkdir()
    (broken / "missing.yaml").write_text(
        "task: missing_data_cloze\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {broken / 'no-such-file.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    study = tiny_train_study(tmp, "evaluated", resources={"num_workers": 1, "zero_stage": 0},
                             probes={"every_steps": 2},
                             eval={"tasks": ["bundled_cloze", "bundled_cloze_val", "missing_data_cloze"],
                                   "selection_tasks": ["bundled_cloze_val"], "limit": LIMIT, "batch_size": 8,
                                   "dtype": "float32",
                                   "every_steps": 2, "at_start": True, "include_path": str(broken)})
    outcomes = run_study(study, "")
    return study, outcomes


def test_every_run_is_evaluated_at_its_steps_while_it_trains(evaluated, tmp_path):
    study, outcomes = evaluated
    assert [o.status for o in outcomes] == ["finished", "finished"]
    client = client_for(study)
    for run in training_runs(study):
        history = client.get_metric_history(run.info.run_id, "eval/bundled_cloze/acc")
        assert sorted(m.step for m in history) == [0, 2, 4]
        assert all(0.0 <= m.value <= 1.0 for m in history)
        selection = client.get_metric_history(run.info.run_id, names.EVAL_SELECTION_MEAN_ACC)
        assert sorted(m.step for m in selection) == [0, 2, 4]
        # The failed task is recorded, and the test mean is not a mean over fewer tasks.
        assert names.EVAL_MEAN_ACC not in run.data.metrics
        assert run.data.metrics[names.EVAL_NUM_FAILED] == 1
        failed = json.loads(run.data.tags[f"{names.TAG_EVAL_FAILED_PREFIX}4"])
        assert list(failed) == ["missing_data_cloze"] and "FileNotFoundError" in failed["missing_data_cloze"]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval/step_000004")}
        assert artifacts == {"eval/step_000004/eval_results.json"}
        assert run.info.status == "FINISHED"
        # Chance level beside the accuracies (4 choices), and per-item results of the tasks that ran.
        assert run.data.metrics["eval/bundled_cloze/chance_acc"] == 0.25
        assert run.data.metrics[names.EVAL_CHANCE_SELECTION_MEAN_ACC] == 0.25
        assert names.EVAL_CHANCE_MEAN_ACC not in run.data.metrics  # as eval/mean_acc: a task failed
        samples = {a.path for a in client.list_artifacts(run.info.run_id, "eval/samples/step_000004")}
        assert samples == {names.eval_samples_path(4, t) for t in ("bundled_cloze", "bundled_cloze_val")}
        record = json.loads(open(client.download_artifacts(run.info.run_id, names.eval_artifact_path(4), str(tmp_path))).read())
        assert record["settings"]["fewshot_seed_used"] == int(run.data.tags[names.TAG_SEED])
        assert record["settings"]["dtype"] == "float32"


def test_the_time_split_holds_the_exports_and_the_evaluations_own_seconds(evaluated):
    """Exports (and the end's wait for the last evaluations) are slot time; the evaluations' own seconds,
    on their own resources, are counted apart (issue 25)."""
    from scaling import timing

    study, _ = evaluated
    for run in training_runs(study):
        metrics = run.data.metrics
        assert metrics[timing.seconds_key("eval_export")] > 0 and metrics[timing.seconds_key("eval_wait")] >= 0
        assert metrics[timing.seconds_key("evaluation")] > 0  # three evaluations' eval/seconds
        phases = sum(metrics[timing.seconds_key(phase)] for phase in timing.PHASES)
        assert phases + metrics[timing.OTHER] == pytest.approx(metrics[timing.SLOT], rel=0.01)


def test_per_item_results_read_back_through_the_analysis(evaluated):
    """analysis.load.read_item_results reads what the trainer logged: every document of every task at every
    evaluation step, averaging to the accuracy the run logged; the item bootstrap pairs the two arms."""
    from analysis import load
    from analysis.downstream import INITIAL, chosen_items, paired_item_bootstrap, select_checkpoints

    study, _ = evaluated
    records = load.read_study(study.tracking_uri, study.study)
    items = load.read_item_results(records)
    assert items.height == 2 * 3 * 2 * LIMIT  # runs x steps x tasks x documents
    logged = records.metrics.filter(pl.col("metric").is_in(["eval/bundled_cloze/acc", "eval/bundled_cloze_val/acc"]))
    means = items.group_by("run_id", "step", "task").agg(pl.col("acc").mean().alias("mean"))
    joined = means.join(logged.with_columns(pl.col("metric").str.split("/").list.get(1).alias("task")),
                        on=["run_id", "step", "task"])
    assert joined.height == means.height and (joined["mean"] - joined["value"]).abs().max() < 1e-9
    initial = chosen_items(items, select_checkpoints(records.metrics), INITIAL)
    same_start = paired_item_bootstrap(initial, treatment=names.ARM_DISPERSION, control=names.ARM_BASELINE)
    # Paired arms share their initial weights: at step 0 they answer every document alike.
    assert same_start.estimate == 0 and not same_start.has_bounds and same_start.seeds == 1


def test_the_final_model_folder_loads_and_lm_eval_cli_scores_it_the_same(evaluated, tmp_path):
    from transformers import AutoModelForCausalLM

    from scaling.eval_tasks import TASKS_DIR

    study, _ = evaluated
    run = training_runs(study)[0]
    model_dir = run.data.tags[names.TAG_MODEL_DIR]
    assert model_dir.endswith("step_0000004")
    AutoModelForCausalLM.from_pretrained(model_dir)
    out = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir}",
                    "--tasks", "bundled_cloze", "--include_path", str(TASKS_DIR), "--device", "cpu",
                    "--limit", str(LIMIT), "--batch_size", "8", "--output_path", str(out)],
                   check=True, capture_output=True, text=True, cwd=tmp_path)
    [results] = out.rglob("results_*.json")
    cli = json.loads(results.read_text())["results"]["bundled_cloze"]["acc,none"]
    logged = [m for m in client_for(study).get_metric_history(run.info.run_id, "eval/bundled_cloze/acc") if m.step == 4]
    assert cli == logged[0].value


def test_an_unknown_task_stops_the_study_before_any_training(ray_session, tmp_path):
    from scaling.errors import ConfigError
    from scaling.study import run_study

    study = tiny_train_study(tmp_path, "typo", eval={"tasks": ["bundled_clozee"]})
    with pytest.raises(ConfigError, match="'bundled_clozee' is not an lm-eval task.*close matches: bundled_cloze"):
        run_study(study, "")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_the_report_shows_chance_and_document_level_uncertainty(evaluated, tmp_path):
    """The analysis CLI over the evaluated study: the accuracy section states the chance level and
    the items x seeds interval of the arms' difference, read from the per-item artifacts."""
    from analysis.scaling_curves import main

    study, _ = evaluated
    out = tmp_path / "report"
    assert main(["--tracking-uri", study.tracking_uri, "--study", study.study, "--out", str(out), "--no-log", "--bootstrap", "20"]) == 0
    report = (out / "report.md").read_text()
    section = report[report.index("## Downstream accuracy"):report.index("## Method")]
    assert "Chance level" in section  # eval/mean_acc has a failed task here: the line says why there is no chance mean
    assert "with document-level uncertainty" in section and f"| {names.ARM_DISPERSION} |" in section


def test_a_chained_run_finishes_its_records_beside_the_next_and_a_worker_lost_meanwhile_loses_none(ray_session,
                                                                                                   tmp_path):
    """Two runs queue in one worker group (it takes 3 of the 4 CPUs, the evaluations the fourth). With
    `finish_records: beside_next` the first gives the group to the second at its last step and finishes its
    records on a thread: its slot holds no evaluation wait (issue 25). The worker dies there, before the first
    run's last evaluation is recorded: Ray Train restarts the group, the first run resumes after its last step
    and evaluates again what its record lacks, so both runs end FINISHED with every evaluation step."""
    from scaling import timing
    from scaling.faults import KILL_WHILE_FINISHING, Fault, install
    from scaling.study import run_study

    study = tiny_train_study(tmp_path, "finishing",
                             resources={"num_workers": 1, "zero_stage": 0, "cpus_per_worker": 3,
                                        "finish_records": "beside_next"},
                             checkpoint={"every_steps": 0, "num_to_keep": 1, "max_failures": 1},
                             eval={"tasks": ["bundled_cloze"], "limit": LIMIT, "batch_size": 8, "every_steps": 2,
                                   "at_start": True, "num_cpus": 1})
    with install(Fault(KILL_WHILE_FINISHING, step=4)):
        outcomes = run_study(study, "")
    assert [o.status for o in outcomes] == ["finished", "finished"], [o.detail for o in outcomes]
    client = client_for(study)
    runs = training_runs(study)
    finished_beside = [run for run in runs if timing.seconds_key("finishing") in run.data.metrics]
    assert len(finished_beside) == 1, "only the chain's first run finishes its records after its slot"
    (first,) = finished_beside
    (last,) = [run for run in runs if run is not first]
    assert first.data.tags[names.TAG_RESUMED_FROM_STEP] == "4"  # the killed finish resumed after the last step
    assert first.data.metrics[timing.seconds_key("eval_wait")] == 0
    assert last.data.metrics[timing.seconds_key("eval_wait")] > 0  # the chain's last run holds its slot
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags[names.TAG_MODEL_DIR].endswith("step_0000004")
        history = client.get_metric_history(run.info.run_id, "eval/bundled_cloze/acc")
        assert sorted({m.step for m in history}) == [0, 2, 4]
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}  # the final record, drawn again
        assert {names.ARTIFACT_CONDENSATION_JSON, names.ARTIFACT_HEATMAP_PNG} <= artifacts, artifacts
        metrics = run.data.metrics
        phases = sum(metrics[timing.seconds_key(phase)] for phase in timing.PHASES)
        assert phases + metrics[timing.OTHER] == pytest.approx(metrics[timing.SLOT], rel=0.01)
