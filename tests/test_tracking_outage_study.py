"""A study against a real `mlflow server` that is killed mid-study and restarted five minutes later
(longer than the MLflow client's own retries, ~4-5 min): the runs keep training meanwhile, and
every run ends FINISHED with all its metrics, no step recorded twice.

Slow (about 8-10 min): `python -m pytest -m slow -s tests/test_tracking_outage_study.py`
(SCALING_TEST_OUTAGE_S shortens the outage for a quick try). It prints, per run, the gaps
between consecutive `train/ce_loss` entries during the outage. It uses only the study driver's
public entry point, so the same file measures an older checkout too.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

import pytest

from conftest import tiny_train_study
from mlflow_server import MlflowServer
from scaling import names

OUTAGE_S = float(os.environ.get("SCALING_TEST_OUTAGE_S", "300"))
STEPS = 600  # ~0.3-0.5 s a step here: training goes on for minutes after the kill
KILL_AFTER_STEP = 20


def _latest_steps(client, run_ids) -> list[int]:
    return [max((m.step for m in client.get_metric_history(run_id, names.TRAIN_CE_LOSS)), default=0)
            for run_id in run_ids]


def outage_report(history: list, down_ms: int, up_ms: int) -> dict:
    """Gaps between consecutive ce_loss entries (by step) that overlap the outage, and duplicates."""
    by_step = sorted(history, key=lambda m: (m.step, m.timestamp))
    gaps = [(b.timestamp - a.timestamp) / 1000 for a, b in zip(by_step, by_step[1:])
            if b.timestamp >= down_ms and a.timestamp <= up_ms]
    during = [m for m in by_step if down_ms <= m.timestamp <= up_ms]
    steps = [m.step for m in by_step]
    return {"entries": len(steps), "duplicates": len(steps) - len(set(steps)), "steps_during_outage": len(during),
            "max_gap_s": max(gaps, default=None), "median_gap_s": statistics.median(gaps) if gaps else None}


@pytest.mark.slow
def test_a_study_trains_through_a_five_minute_outage_and_records_everything_once(ray_session, tmp_path):
    from mlflow.tracking import MlflowClient

    from scaling.study import run_study

    with MlflowServer(tmp_path / "server", cli=True) as server:
        started_in = server.start()
        study = tiny_train_study(tmp_path, "outage", tracking_uri=server.uri,
                                 training={"max_steps": STEPS, "log_every": 1},
                                 probes={"every_steps": 100}, checkpoint={"every_steps": 100})
        outcome: dict = {}

        def driver():
            try:
                outcome["runs"] = run_study(study, "")
            except BaseException as exc:  # noqa: BLE001 -- asserted below
                outcome["error"] = exc

        thread = threading.Thread(target=driver, name="driver")
        thread.start()

        client = MlflowClient(tracking_uri=server.uri)
        run_ids: list[str] = []
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and thread.is_alive():
            experiment = client.get_experiment_by_name("outage")
            if experiment is not None:
                runs = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'train'")
                run_ids = [r.info.run_id for r in runs]
                if len(run_ids) == 2 and min(_latest_steps(client, run_ids)) >= KILL_AFTER_STEP:
                    break
            time.sleep(1)
        assert len(run_ids) == 2 and thread.is_alive(), "the runs did not start logging"

        server.kill()
        down_ms = int(time.time() * 1000)
        time.sleep(OUTAGE_S)
        server.start(wait=False)
        back_after = server.wait_ready(timeout_s=600)
        up_ms = int(time.time() * 1000)
        thread.join(timeout=1800)
        assert not thread.is_alive(), "the study did not end"

        reports = {}
        for run_id in run_ids:
            run = client.get_run(run_id)
            reports[run.data.tags[names.TAG_ARM]] = (run, outage_report(
                client.get_metric_history(run_id, names.TRAIN_CE_LOSS), down_ms, up_ms))
        print(f"\nserver answered {started_in:.0f} s after start; killed for {OUTAGE_S:.0f} s, answered again "
              f"{back_after:.0f} s after the restart (outage {(up_ms - down_ms) / 1000:.0f} s)")
        for arm, (run, report) in reports.items():
            print(f"{arm}: status {run.info.status} / {run.data.tags.get(names.TAG_STATUS)}; {report}")

        assert "error" not in outcome, outcome.get("error")
        assert [o.status for o in outcome["runs"]] == ["finished", "finished"]
        for arm, (run, report) in reports.items():
            assert run.info.status == "FINISHED" and run.data.tags[names.TAG_STATUS] == names.STATUS_FINISHED
            assert names.TAG_DATA_ORDER_HASH in run.data.tags
            steps = [m.step for m in client.get_metric_history(run.info.run_id, names.TRAIN_CE_LOSS)]
            assert sorted(steps) == list(range(1, STEPS + 1)), arm  # all of them, none twice
            for key in (names.VAL_LOSS, names.COND_SPEARMAN):
                probed = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                assert probed == list(range(100, STEPS + 1, 100)), (arm, key)
            assert report["steps_during_outage"] >= 10, arm  # it trained while the server was away
            assert report["max_gap_s"] < (up_ms - down_ms) / 1000 / 5, arm  # no stall (was ~340 s in the client)
        study_run = client.search_runs([client.get_experiment_by_name("outage").experiment_id],
                                       filter_string="tags.kind = 'study'")[0]
        assert study_run.info.status == "FINISHED"


def _cli(args: list[str], cwd, log_path, budget_s: int):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "SCALING_MLFLOW_RETRY_S": str(budget_s),
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "scaling.run", *args], cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_past_the_budget_a_run_fails_with_its_spill_file_and_a_rerun_writes_it_and_finishes(tmp_path):
    # The CLI in its own process (its own local Ray, so the workers see SCALING_MLFLOW_RETRY_S=10):
    # the server is killed at step 20 and restarted once rank 0 has given up and spilled; the run
    # trains to the end, fails with the spill file's path, and the next invocation writes the
    # spill (original timestamps, no step twice) and finishes it.
    from mlflow.tracking import MlflowClient

    steps = 300
    with MlflowServer(tmp_path / "server") as server:
        server.start()
        study = tiny_train_study(tmp_path, "spill", tracking_uri=server.uri, arms=["baseline"],
                                 training={"max_steps": steps, "log_every": 1},
                                 probes={"every_steps": 100}, checkpoint={"every_steps": 100})
        study_file = tmp_path / "spill.yaml"
        study_file.write_text(study.to_yaml())
        first = _cli([str(study_file)], tmp_path, tmp_path / "first.log", budget_s=10)
        client = MlflowClient(tracking_uri=server.uri)
        run_id = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and first.poll() is None:
            experiment = client.get_experiment_by_name("spill")
            runs = client.search_runs([experiment.experiment_id], "tags.kind = 'train'") if experiment else []
            if runs and _latest_steps(client, [runs[0].info.run_id])[0] >= KILL_AFTER_STEP:
                run_id = runs[0].info.run_id
                break
            time.sleep(1)
        assert run_id is not None, (tmp_path / "first.log").read_text()
        server.kill()
        down_ms = int(time.time() * 1000)
        deadline = time.monotonic() + 300
        while not list((tmp_path / "runs").glob(f"*/mlflow-spill/{run_id}.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.5)
        spilled = list((tmp_path / "runs").glob(f"*/mlflow-spill/{run_id}.jsonl"))
        assert spilled and first.poll() is None, "rank 0 did not spill while training"
        server.start()
        up_ms = int(time.time() * 1000)
        assert first.wait(timeout=900) == 1, (tmp_path / "first.log").read_text()  # a failed run: exit 1

        run = client.get_run(run_id)
        print(f"\nfirst invocation: {run.info.status} / {run.data.tags.get(names.TAG_FAILURE)}")
        assert run.info.status == "FAILED" and str(spilled[0]) in run.data.tags[names.TAG_FAILURE]
        assert len(client.get_metric_history(run_id, names.TRAIN_CE_LOSS)) < steps  # the spilled ones are missing

        second_ms = int(time.time() * 1000)
        second = _cli([str(study_file), "--resume"], tmp_path, tmp_path / "second.log", budget_s=10)
        assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()

        run = client.get_run(run_id)
        recorded = client.get_metric_history(run_id, names.TRAIN_CE_LOSS)
        report = outage_report(recorded, down_ms, up_ms)
        print(f"second invocation: {run.info.status}; {report}")
        assert run.info.status == "FINISHED" and run.data.tags[names.TAG_STATUS] == names.STATUS_FINISHED
        assert names.TAG_FAILURE not in run.data.tags
        assert sorted(m.step for m in recorded) == list(range(1, steps + 1))
        assert all(m.timestamp < second_ms for m in recorded)  # as measured in the first life, not when written
        assert report["steps_during_outage"] >= 10
        assert not list((tmp_path / "runs").glob("*/mlflow-spill/*.jsonl"))
