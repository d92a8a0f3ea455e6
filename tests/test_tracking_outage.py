"""A tracking server that goes away: a real MLflow server process, killed (SIGKILL) or frozen
(SIGSTOP) while a RunLogger logs steps from a loop, then restarted. The loop must never wait on
it, every step must reach the store exactly once with the time it was measured, and the driver's
calls must wait the outage out (or fail with one clear line past their budget)."""

from __future__ import annotations

import threading
import time

import pytest

from mlflow_server import MlflowServer
from scaling import names
from scaling.errors import TrackingUnavailable
from scaling.tracking import RetryPolicy, RunLogger, Tracker

FAST = RetryPolicy(budget_s=120, first_backoff_s=0.2, max_backoff_s=1.0, request_timeout_s=3)
CE = names.TRAIN_CE_LOSS
BLOCKED = 20  # a log call longer than 1/20 of the outage waited on the server (an enqueue takes microseconds)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        server.start()
        yield server


@pytest.fixture
def live(server, monkeypatch):
    """The server, answering (a test that killed it restarts it)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(FAST.request_timeout_s))
    if server.process.poll() is not None:
        server.start()
    return server


class Loop:
    """A training loop's logging: one step per call, timed, with the wall-clock window of each call."""

    def __init__(self, logger: RunLogger):
        self.logger, self.step, self.calls_s, self.window = logger, 0, [], {}

    def log(self, n: int = 1, pause_s: float = 0.02) -> None:
        for _ in range(n):
            self.step += 1
            before, started = int(time.time() * 1000), time.perf_counter()
            self.logger.log_metrics({CE: 10.0 / self.step, names.TRAIN_LR: self.step * 1e-4}, self.step)
            self.calls_s.append(time.perf_counter() - started)
            self.window[self.step] = (before, int(time.time() * 1000))
            time.sleep(pause_s)

    def log_until(self, event: threading.Event, pause_s: float = 0.05) -> None:
        while not event.is_set():
            self.log(1, pause_s)


def new_run(uri: str, name: str, policy=FAST, notes=None) -> tuple[Tracker, str]:
    tracker = Tracker(uri, "outage", policy=policy, notice=(notes.append if notes is not None else print))
    parent = tracker.study_run_id({})
    run_id, _ = tracker.child_run(parent, name, name, {}, {"steps": 1})
    return tracker, run_id


def history(uri: str, run_id: str, key: str = CE) -> list:
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient(tracking_uri=uri).get_metric_history(run_id, key), key=lambda m: m.step)


def assert_each_step_once_as_measured(uri: str, run_id: str, loop: Loop) -> None:
    recorded = history(uri, run_id)
    assert [m.step for m in recorded] == list(range(1, loop.step + 1))  # every step, none twice
    for metric in recorded:
        before, after = loop.window[metric.step]
        assert before <= metric.timestamp <= after  # the time it was measured, not the time it was written
        assert metric.value == pytest.approx(10.0 / metric.step)


def ready_event(server: MlflowServer) -> threading.Event:
    ready = threading.Event()
    threading.Thread(target=lambda: (server.wait_ready(), ready.set()), daemon=True).start()
    return ready


def test_a_killed_and_restarted_server_never_blocks_the_loop_and_loses_nothing(live, tmp_path):
    notes: list[str] = []
    _, run_id = new_run(live.uri, "killed", notes=notes)
    logger = RunLogger(live.uri, run_id, spill_dir=tmp_path, policy=FAST, notice=notes.append)
    loop = Loop(logger)
    loop.log(20)
    assert logger.flush() is None

    live.kill()
    killed = time.monotonic()
    loop.log(40, pause_s=0.05)  # ~2 s with no server at all
    artifact = tmp_path / "made-during-the-outage.txt"
    artifact.write_text("written while the server was down")
    logger.log_artifact(artifact)
    artifact.unlink()  # the caller may delete it at once, as train.py's temp folders do
    logger.set_tags({"phase": "outage"})
    live.start(wait=False)
    ready = ready_event(live)
    loop.log_until(ready)  # the restart takes seconds: the loop logs on meanwhile
    outage_s = time.monotonic() - killed
    loop.log(20)
    assert logger.close() is None

    assert_each_step_once_as_measured(live.uri, run_id, loop)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=live.uri)
    assert client.get_run(run_id).data.tags["phase"] == "outage"
    assert "made-during-the-outage.txt" in {a.path for a in client.list_artifacts(run_id)}
    assert any("does not answer" in n for n in notes) and any("answers again" in n for n in notes)
    print(f"outage {outage_s:.1f} s, {loop.step} steps, slowest log call {max(loop.calls_s) * 1000:.1f} ms")
    assert max(loop.calls_s) < outage_s / BLOCKED


def test_a_frozen_server_that_takes_a_timed_out_batch_later_gets_it_once(live, tmp_path):
    # SIGSTOP: connections are accepted and requests wait in the socket; the client times out after
    # 3 s, then SIGCONT lets the server write the batch the client gave up on.
    _, run_id = new_run(live.uri, "frozen")
    logger = RunLogger(live.uri, run_id, spill_dir=tmp_path, policy=FAST, notice=print)
    loop = Loop(logger)
    loop.log(5)
    assert logger.flush() is None
    live.freeze()
    frozen = time.monotonic()
    try:
        loop.log(1)
        loop.log(100, pause_s=0.06)  # ~6 s: two timeouts of the writer
    finally:
        live.thaw()
    frozen_s = time.monotonic() - frozen
    loop.log(5)
    assert logger.close() is None
    assert_each_step_once_as_measured(live.uri, run_id, loop)
    print(f"frozen {frozen_s:.1f} s, {loop.step} steps, slowest log call {max(loop.calls_s) * 1000:.1f} ms, "
          f"{logger.already_written} value(s) found written before a re-send")
    assert max(loop.calls_s) < frozen_s / BLOCKED


def test_a_resumed_life_does_not_record_its_replayed_steps_twice(live, tmp_path):
    # A worker restarted from its step-3 checkpoint logs steps 4-6 again: the store keeps the first.
    _, run_id = new_run(live.uri, "resumed")
    first = Loop(RunLogger(live.uri, run_id, spill_dir=tmp_path, policy=FAST))
    first.log(6)
    assert first.logger.close() is None
    second = Loop(RunLogger(live.uri, run_id, spill_dir=tmp_path, policy=FAST))
    second.step = 3
    second.log(7)
    assert second.logger.close() is None
    assert second.logger.already_written == 3 * 2  # steps 4-6, two metrics each: read back, not re-sent
    recorded = history(live.uri, run_id)
    assert [m.step for m in recorded] == list(range(1, 11))
    for metric in recorded:
        window = (first if metric.step <= 6 else second).window[metric.step]
        assert window[0] <= metric.timestamp <= window[1]


def test_past_its_budget_a_logger_spills_and_the_next_life_writes_it_all_once(live, tmp_path):
    notes: list[str] = []
    tracker, run_id = new_run(live.uri, "spilled")
    impatient, other_run = new_run(live.uri, "driver-gives-up", policy=RetryPolicy(budget_s=2, first_backoff_s=0.2))
    _, finished_run = new_run(live.uri, "driver-waits")
    spill = tmp_path / "spill"
    live.kill()
    killed = time.monotonic()

    logger = RunLogger(live.uri, run_id, spill_dir=spill, policy=RetryPolicy(
        budget_s=2, first_backoff_s=0.2, max_backoff_s=0.5, request_timeout_s=3), notice=notes.append)
    loop = Loop(logger)
    loop.log(3)
    artifact = tmp_path / "record.json"
    artifact.write_text("{}")
    logger.log_artifact(artifact)
    artifact.unlink()
    logger.mark_failed("not really: a tag written through the spill")
    deadline = time.monotonic() + 30
    while logger.problem() is None and time.monotonic() < deadline:
        loop.log(1, pause_s=0.1)
    loop.log(5)  # after giving up: straight to the spill file
    problem = logger.close()
    assert problem is not None and "did not answer" in problem and str(spill) in problem
    assert (spill / f"{run_id}.jsonl").exists()
    assert max(loop.calls_s) < (time.monotonic() - killed) / BLOCKED

    # The driver: one call gives up with a clear line past its budget; one waits until the server is back.
    with pytest.raises(TrackingUnavailable, match="did not answer .* --resume"):
        impatient.finish(other_run, names.STATUS_FINISHED)
    errors: list[BaseException] = []

    def finish():
        try:
            tracker.finish(finished_run, names.STATUS_FINISHED)
        except BaseException as exc:  # noqa: BLE001 -- reported by the assertion below
            errors.append(exc)

    finisher = threading.Thread(target=finish)
    finisher.start()
    time.sleep(1.0)
    live.start()
    finisher.join(timeout=60)
    assert not finisher.is_alive() and not errors

    # The run's next life (same spill folder) writes the spill first, then its own steps.
    resumed = Loop(RunLogger(live.uri, run_id, spill_dir=spill, policy=FAST, notice=notes.append))
    resumed.step = loop.step
    resumed.log(3)
    assert resumed.logger.close() is None
    loop.window.update(resumed.window)
    loop.step = resumed.step
    assert_each_step_once_as_measured(live.uri, run_id, loop)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=live.uri)
    record = client.get_run(run_id)
    assert record.data.tags[names.TAG_FAILURE].startswith("not really")
    assert "record.json" in {a.path for a in client.list_artifacts(run_id)}
    assert not list(spill.glob("*.jsonl")) and not list(spill.glob("*/staged-*"))
    assert client.get_run(finished_run).info.status == "FINISHED"
    assert client.get_run(finished_run).data.tags[names.TAG_STATUS] == names.STATUS_FINISHED


def test_a_refusal_is_not_retried_and_is_reported(live, tmp_path):
    # The store answers "no such run" (a 4xx): retrying cannot help, so close() reports it at once.
    logger = RunLogger(live.uri, "0" * 32, spill_dir=tmp_path, policy=FAST, notice=print)
    logger.log_metrics({CE: 1.0}, 1)
    started = time.monotonic()
    problem = logger.close()
    assert problem is not None and "refused" in problem and "0" * 32 in problem
    assert time.monotonic() - started < FAST.budget_s / 10


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf"])
def test_a_bad_retry_budget_is_refused_with_the_fix(monkeypatch, value):
    from scaling.errors import ConfigError
    from scaling.tracking import RETRY_BUDGET_ENV

    monkeypatch.setenv(RETRY_BUDGET_ENV, value)
    with pytest.raises(ConfigError, match=f"{RETRY_BUDGET_ENV}=.* seconds > 0.*unset it"):
        RetryPolicy.from_env()
    monkeypatch.setenv(RETRY_BUDGET_ENV, "45")
    assert RetryPolicy.from_env().budget_s == 45
