"""What MLflow can show of a study without clicks: the saved view the driver writes (in the envelope MLflow's UI
reads, with state keys its runs page knows), the numbers a run carries for plotting (N, log10 N, lambda; the
baseline's "none" for another arm's settings), and the analysis run's findings as metrics and tags.
Real MLflow stores; the UI's own bundle is read to check the view's format still matches it."""

from __future__ import annotations

import base64
import json
import math
import re
import zlib
from pathlib import Path

import pytest

from scaling import names


def decode_envelope(value: str) -> tuple[dict, dict]:
    """(envelope, state) as MLflow 3.17's UI decodes a saved view (`savedViewEnvelope.ts`): a JSON envelope with a
    string name, a number createdAt and a string state, the state deflated ("deflate;" + base64) or plain JSON."""
    envelope = json.loads(value)
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    state = envelope["state"]
    assert isinstance(state, str)
    if state.startswith("deflate;"):
        state = zlib.decompress(base64.b64decode(state.removeprefix("deflate;"))).decode()
    return envelope, json.loads(state)


def ui_bundle() -> str:
    import mlflow

    folder = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    return "".join(path.read_text(errors="replace") for path in folder.glob("*.js"))


def known_state_keys(bundle: str) -> set[str]:
    """The runs page's search-facet and UI-state keys, from the UI's bundle (the lists its shared-view reader
    picks from: a key outside them is ignored)."""
    facets = re.search(r'\["searchFilter","orderByKey","orderByAsc"[^\]]*\]', bundle)
    ui_state = re.search(r'\["selectedColumns","columnOrder","columnWidths"[^\]]*\]', bundle)
    assert facets and ui_state, "MLflow's UI no longer names its view state keys as expected: check its format"
    return set(json.loads(facets.group(0))) | set(json.loads(ui_state.group(0)))


def test_the_study_view_is_a_saved_view_mlflows_ui_can_open(tmp_path):
    from mlflow.tracking import MlflowClient

    from scaling.tracking import Tracker, study_view_state

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "viewed")
    path = tracker.save_view("viewed: runs by rung", study_view_state(evaluates=True))
    assert path == (f"#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning"
                    f"&{names.VIEW_URL_PARAM}={names.STUDY_VIEW_ID}")
    tags = MlflowClient(tracker.tracking_uri).get_experiment(tracker.experiment_id).tags
    envelope, state = decode_envelope(tags[names.VIEW_TAG_PREFIX + names.STUDY_VIEW_ID])
    assert envelope["name"] == "viewed: runs by rung"
    bundle = ui_bundle()
    assert names.VIEW_TAG_PREFIX in bundle and f'"{names.VIEW_URL_PARAM}"' in bundle
    assert set(state) <= known_state_keys(bundle), set(state) - known_state_keys(bundle)
    assert [key["groupByData"] for key in state["groupBy"]["groupByKeys"]] == [names.TAG_RUNG, names.TAG_ARM]
    assert state["selectedColumns"] == [
        "tags.`arm`", "metrics.`N`", "metrics.`final/val_loss`", "metrics.`final/late_half_mean_cos`",
        "metrics.`final/last_layer_mean_cos`", "metrics.`final/spearman`", "metrics.`final/mean_acc`",
        "metrics.`time/run_s`"]
    assert state["runsHiddenMode"] == "SHOW_ALL" and state["searchFilter"] == "tags.`kind` = 'train'"
    assert "mean_acc" not in json.dumps(study_view_state(evaluates=False))
    charts = state["compareRunCharts"]  # the chart view opens on metrics against log10 N
    assert [(c["type"], c["xaxis"]["key"], c["yaxis"]["key"]) for c in charts][0] == ("SCATTER", "log10_N", "val/loss")
    assert {c["metricSectionId"] for c in charts} == {s["uuid"] for s in state["compareRunSections"]}
    tracker.save_view("again", study_view_state(evaluates=False))  # rewritten, never a second view
    tags = MlflowClient(tracker.tracking_uri).get_experiment(tracker.experiment_id).tags
    assert [key for key in tags if key.startswith(names.VIEW_TAG_PREFIX)] == [names.VIEW_TAG_PREFIX + "study"]


def test_every_run_carries_n_and_lambda_as_numbers_and_the_baseline_no_other_arms_settings(tmp_path):
    from conftest import tiny_train_study

    from scaling.config import plan_runs
    from scaling.runs import resolve_run

    study = tiny_train_study(tmp_path, "numbers")
    (plan,) = plan_runs(study)
    base, disp = (resolve_run(study, plan, arm.for_family(plan.rung.family), 0, "data") for arm in study.arms)
    n = plan.params.non_embedding
    assert base.metrics == {names.RUN_N: n, names.RUN_LOG10_N: pytest.approx(math.log10(n)), names.RUN_LAMBDA: 0.0}
    assert disp.metrics[names.RUN_LAMBDA] == 0.1 and disp.metrics[names.RUN_N] == n
    assert base.params[names.PARAM_ARM] == "baseline" and disp.params[names.PARAM_ARM] == "dispersion"
    assert base.tags[names.TAG_RUN_COLOR] != disp.tags[names.TAG_RUN_COLOR]  # charts colour runs by arm
    assert float(base.params[names.PARAM_LAMBDA]) == 0.0
    for key in (names.PARAM_LAYERS, names.PARAM_VARIANT, names.PARAM_TAU, names.PARAM_CLAMP):
        assert base.params[key] == names.PARAM_NONE and disp.params[key] not in (None, names.PARAM_NONE)


def test_final_values_are_the_latest_metrics_at_four_significant_digits():
    from scaling.runs import final_values

    assert final_values({names.VAL_LOSS: 7.081887722015381, names.COND_SPEARMAN: float("nan"),
                         names.COND_LAST_LAYER_MEAN_COS: 0.9990701997311731, "train/ce_loss": 6.0}) == {
        "final/val_loss": 7.082, "final/last_layer_mean_cos": 0.9991}


def test_the_analysis_run_carries_each_claims_estimate_interval_and_verdict(tmp_path):
    import polars as pl
    from mlflow.tracking import MlflowClient

    from analysis.load import StudyRecords, claim_records, log_analysis_run
    from scaling.tracking import Tracker

    assert claim_records([("a", 0.5, None, float("nan"), None)]) == ({"claim/a/estimate": 0.5}, {})
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "claims")
    records = StudyRecords("claims", tracker.experiment_id, tracker.tracking_uri, None, pl.DataFrame(),
                           pl.DataFrame(), pl.DataFrame())
    report = tmp_path / "out" / "report.md"
    report.parent.mkdir()
    report.write_text("# report")
    run_id = log_analysis_run(records, report.parent, [report], params={}, tags={}, claims=[
        ("b_late_half", -0.12, -0.2, -0.05, "supported"), ("c trend", 0.3, -0.1, 0.7, "inconclusive")])
    run = MlflowClient(tracker.tracking_uri).get_run(run_id)
    assert run.data.metrics == {"claim/b_late_half/estimate": -0.12, "claim/b_late_half/low": -0.2,
                                "claim/b_late_half/high": -0.05, "claim/c trend/estimate": 0.3,
                                "claim/c trend/low": -0.1, "claim/c trend/high": 0.7}
    assert run.data.tags["claim/b_late_half/verdict"] == "supported"
    assert run.data.tags["claim/c trend/verdict"] == "inconclusive"
