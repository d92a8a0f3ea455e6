"""Faults injected for real, end to end through the CLI (slow): a driver stopped with SIGTERM marks its
runs killed and --resume finishes the study with no duplicate; a driver SIGKILLed leaves runs RUNNING
that --resume takes over; a second driver on the same study is refused while the first runs; a storage
volume that fills up (a real tmpfs) fails the run with the reason while finished runs stay intact.

    python -m pytest -m slow tests/test_faults.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scaling import names

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def write_study(tmp: Path, name: str, **overrides) -> Path:
    raw = {
        "study": name, "ladder": "tiny", "rungs": ["tiny-165K"],
        "arms": ["baseline", {"name": "dispersion", "lambda": 0.1, "layers": "all"}], "seeds": [0],
        "data": {"source": "bundled", "max_rows": 600},
        # Long enough (~40 s of steps on a quiet CPU) that the drivers are stopped mid-run, not after it.
        "training": {"seq_len": 32, "batch_size": 4, "micro_batch_size": 4, "max_steps": 3000, "lr": 3e-3,
                     "log_every": 10},
        "probes": {"every_steps": 1000, "texts": 2, "max_length": 32, "val_batches": 1},
        "resources": {"num_workers": 1, "zero_stage": 0},
        "checkpoint": {"every_steps": 100, "num_to_keep": 2, "max_failures": 0},
        "storage_path": str(tmp / "runs"), "tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    raw.update(overrides)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def driver(path: Path, tmp: Path, *extra: str, log: str = "driver.log") -> subprocess.Popen:
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    handle = open(tmp / log, "w")
    return subprocess.Popen([sys.executable, str(REPO / "scaling" / "run.py"), str(path), *extra], cwd=tmp, env=env,
                            stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)


def runs(tmp: Path, study: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(study)
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1000)


def training_runs(tmp: Path, study: str):
    return [r for r in runs(tmp, study) if r.data.tags.get(names.TAG_KIND) == names.KIND_TRAIN]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 -- the store may be mid-write
            pass
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def both_training(tmp: Path, study: str, past_step: int = 150) -> bool:
    """Both runs are past their first checkpoint, so a resume has one to continue from."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    trained = training_runs(tmp, study)
    return len(trained) == 2 and all(
        max((m.step for m in client.get_metric_history(r.info.run_id, names.TRAIN_CE_LOSS)), default=-1) >= past_step
        for r in trained)


def test_sigterm_marks_runs_killed_a_second_driver_is_refused_and_resume_finishes(tmp_path):
    path = write_study(tmp_path, "interrupt")
    first = driver(path, tmp_path)
    try:
        wait_for(lambda: both_training(tmp_path, "interrupt"), 600, "both runs to train")
        # A second driver on the same study and store is refused, naming the first.
        second = subprocess.run([sys.executable, str(REPO / "scaling" / "run.py"), str(path)], cwd=tmp_path,
                                env={**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"},
                                capture_output=True, text=True, timeout=600)
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        assert "is being run by another driver" in second.stderr and f"pid {first.pid}" in second.stderr
        started = time.time()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 130
        stopped_s = time.time() - started
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    log = (tmp_path / "driver.log").read_text()
    assert "marked killed" in log, log[-3000:]
    killed = training_runs(tmp_path, "interrupt")
    assert all(r.info.status == "KILLED" and r.data.tags[names.TAG_STATUS] == names.STATUS_KILLED for r in killed)
    assert not [r for r in runs(tmp_path, "interrupt") if r.info.status == "RUNNING"]
    ids = {r.info.run_id for r in killed}

    resumed = subprocess.run([sys.executable, str(REPO / "scaling" / "run.py"), str(path), "--resume"],
                             cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"},
                             capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finished = training_runs(tmp_path, "interrupt")
    assert {r.info.run_id for r in finished} == ids  # the same runs continued, none twice
    assert all(r.info.status == "FINISHED" and r.data.tags[names.TAG_STATUS] == names.STATUS_FINISHED
               for r in finished)
    assert all(int(r.data.tags[names.TAG_RESUMED_FROM_STEP]) >= 100 for r in finished)  # from a checkpoint
    print(f"SIGTERM -> exit 130 in {stopped_s:.1f} s")


def test_sigkilled_driver_leaves_running_runs_that_resume_takes_over(tmp_path):
    path = write_study(tmp_path, "killed")
    first = driver(path, tmp_path)
    try:
        wait_for(lambda: both_training(tmp_path, "killed"), 600, "both runs to train")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait()
    left = training_runs(tmp_path, "killed")
    assert {r.info.status for r in left} == {"RUNNING"}
    # The dead driver ran on this machine and its process is gone: --resume takes the study over at
    # once, without waiting for the lease's heartbeat to expire.
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"}
    resumed = subprocess.run([sys.executable, str(REPO / "scaling" / "run.py"), str(path), "--resume"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    finished = training_runs(tmp_path, "killed")
    assert {r.info.run_id for r in finished} == {r.info.run_id for r in left}
    assert {r.info.status for r in finished} == {"FINISHED"}


def test_a_full_storage_volume_fails_the_run_with_the_reason_and_keeps_finished_ones(tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(volume)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); needs root")
    try:
        # Checkpoints of tiny-165K take ~2 MB each: the first run's fits, the second's does not.
        path = write_study(tmp_path, "full", storage_path=str(volume),
                           training={"seq_len": 32, "batch_size": 4, "micro_batch_size": 4, "max_steps": 4,
                                     "lr": 3e-3},
                           checkpoint={"every_steps": 0, "num_to_keep": 1, "max_failures": 0},
                           resources={"num_workers": 1, "zero_stage": 0, "cpus_per_worker": 3})  # one run at a time
        result = subprocess.run([sys.executable, str(REPO / "scaling" / "run.py"), str(path)], cwd=tmp_path,
                                env={**os.environ, "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled"},
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        by_arm = {r.data.tags[names.TAG_ARM]: r for r in training_runs(tmp_path, "full")}
        statuses = sorted(r.data.tags[names.TAG_STATUS] for r in by_arm.values())
        assert statuses == [names.STATUS_FAILED, names.STATUS_FINISHED], statuses
        failed = next(r for r in by_arm.values() if r.data.tags[names.TAG_STATUS] == names.STATUS_FAILED)
        assert "the storage is full" in failed.data.tags[names.TAG_FAILURE]
        done = next(r for r in by_arm.values() if r.data.tags[names.TAG_STATUS] == names.STATUS_FINISHED)
        assert names.VAL_LOSS in done.data.metrics and done.info.status == "FINISHED"
    finally:
        subprocess.run(["umount", "-l", str(volume)], capture_output=True)
