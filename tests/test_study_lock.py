"""The one-driver-per-study lease (`scaling.tracking.StudyLock`) on a real MLflow store."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from scaling import names
from scaling.errors import ConfigError
from scaling.tracking import StudyLock, Tracker


@pytest.fixture
def study(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "locked")
    return tracker, tracker.study_run_id({})


def plant_lease(tracker, run_id, *, pid: int, host: str, beat: float) -> None:
    lease = {"holder": f"{host} pid {pid} (planted)", "host": host, "pid": pid, "since": beat, "beat": beat}
    tracker.set_tags(run_id, {names.TAG_DRIVER_LEASE: json.dumps(lease)})


def test_a_live_driver_refuses_a_second_one_and_releases_on_exit(study):
    tracker, run_id = study
    with StudyLock(tracker, run_id, settle_s=0.0):
        with pytest.raises(ConfigError, match="is being run by another driver"):
            with StudyLock(tracker, run_id, settle_s=0.0):
                pass
    with StudyLock(tracker, run_id, settle_s=0.0):  # released: the next driver gets it
        pass
    assert names.TAG_DRIVER_LEASE not in tracker.get_run(run_id).data.tags


def test_a_dead_driver_on_this_machine_is_taken_over_at_once(study):
    import socket

    tracker, run_id = study
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plant_lease(tracker, run_id, pid=child.pid, host=socket.gethostname(), beat=time.time())
        with pytest.raises(ConfigError, match=f"pid {child.pid}"):  # alive: refused, named
            with StudyLock(tracker, run_id, settle_s=0.0):
                pass
    finally:
        child.kill()
        child.wait()
    with StudyLock(tracker, run_id, settle_s=0.0):  # its process is gone: no need to wait out the lease
        pass


def test_a_driver_on_another_machine_holds_until_its_heartbeat_expires(study):
    tracker, run_id = study
    plant_lease(tracker, run_id, pid=1, host="another-machine", beat=time.time())
    with pytest.raises(ConfigError, match="another-machine"):
        with StudyLock(tracker, run_id, settle_s=0.0, ttl_s=180.0):
            pass
    plant_lease(tracker, run_id, pid=1, host="another-machine", beat=time.time() - 200)
    with StudyLock(tracker, run_id, settle_s=0.0, ttl_s=180.0):  # silent for longer than the ttl: expired
        pass
