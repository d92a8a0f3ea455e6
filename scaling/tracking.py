"""MLflow records of a study: the only module of `scaling` that imports mlflow.

Layout: one experiment per study (named after it); a parent run (tag kind=study); a child
run per (rung, arm, seed) (kind=train) identified by the hash of its resolved config, so
that a re-run finds it: finished runs are skipped, unfinished ones are continued (same run
id) rather than duplicated. Sweeps add a `sweep` run per rung with a `trial` run per Tune
trial; observation studies a run per (model, source). Every query and filter string lives
here; the tag and metric names live in `scaling.names`.

Everything goes through `MlflowClient` with explicit run ids (no global "active run"), so
the driver and a Ray Train worker can log to the same run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from scaling import names
from scaling.errors import ConfigError, one_line
from scaling.provenance import git_commit, sqlite_path

PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values
REACHABLE_TIMEOUT_S = 10


def check_reachable(tracking_uri: str, timeout_s: int = REACHABLE_TIMEOUT_S) -> str:
    """'' when the store answers a one-experiment search within `timeout_s`; else the problem.

    A SQLite store that does not exist yet is not created here (a refused study writes
    nothing): its folder must exist and be writable.
    """
    database = sqlite_path(tracking_uri)
    if database is not None and not database.exists():
        folder = database.parent
        if not folder.is_dir():
            return f"folder {str(folder)!r} of the SQLite store does not exist"
        if not os.access(folder, os.W_OK):
            return f"folder {str(folder)!r} of the SQLite store is not writable"
        return ""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
    os.environ.update(MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        return ""
    except Exception as exc:  # noqa: BLE001 -- reported with the URI
        return one_line(exc, 300)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def find_study_run(tracking_uri: str, study: str):
    """The study's parent run in the store, or None (never creates anything)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(study)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        return None
    runs = client.search_runs([experiment.experiment_id], filter_string=_tag_equals(names.TAG_KIND, names.KIND_STUDY),
                              max_results=1)
    return runs[0] if runs else None


def runs_page(experiment_id: str) -> str:
    """The MLflow UI path of a study's runs table, in the model-training view (not the GenAI one)."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _tag_equals(tag: str, value: Any) -> str:
    return f"tags.`{tag}` = '{value}'"


def _all_of(tags: Mapping[str, Any]) -> str:
    return " and ".join(_tag_equals(key, value) for key, value in tags.items())


class Tracker:
    """A study's MLflow store: find or create the experiment, parent and child runs, query them."""

    def __init__(self, tracking_uri: str, study: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.study = study
        self._client = MlflowClient(tracking_uri=tracking_uri)
        try:
            experiment = self._client.get_experiment_by_name(study)
        except Exception as exc:  # noqa: BLE001 -- any failure here means the store is unusable
            raise ConfigError(
                f"MLflow store {tracking_uri!r} cannot be reached ({one_line(exc, 300)}); "
                "check tracking_uri / MLFLOW_TRACKING_URI"
            ) from None
        if experiment is None:
            # Opens in MLflow's model-training view (runs, metrics), not its GenAI one (traces, judges).
            self.experiment_id = self._client.create_experiment(
                study, tags={names.EXPERIMENT_KIND_TAG: names.EXPERIMENT_KIND})
        elif experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {study!r} was deleted; restore it (mlflow experiments restore) or rename the study"
            )
        else:
            self.experiment_id = experiment.experiment_id
            if names.EXPERIMENT_KIND_TAG not in experiment.tags:
                self._client.set_experiment_tag(self.experiment_id, names.EXPERIMENT_KIND_TAG, names.EXPERIMENT_KIND)

    # -- finding runs -----------------------------------------------------------------
    def _search(self, filter_string: str) -> list:
        return self._client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                        order_by=["attributes.start_time ASC"])

    def find_by_hash(self, config_hash: str):
        """The run of a config hash (oldest first if somehow several), or None."""
        runs = self._search(_tag_equals(names.TAG_CONFIG_HASH, config_hash))
        return runs[0] if runs else None

    def get_run(self, run_id: str):
        return self._client.get_run(run_id)

    def recorded_failure(self, run_id: str) -> str | None:
        """A failure the workers recorded themselves (e.g. a NaN loss), if any."""
        return self._client.get_run(run_id).data.tags.get(names.TAG_FAILURE)

    def trial_runs(self, sweep_run_id: str) -> list:
        """The trial runs of one rung's sweep, oldest first."""
        return self._search(_all_of({names.TAG_KIND: names.KIND_TRIAL, names.TAG_PARENT_RUN_ID: sweep_run_id}))

    def finished_training_runs(self, rung: str, arm: str) -> list:
        """Finished training runs of one arm on one rung (every seed)."""
        return self._search(_all_of({names.TAG_KIND: names.KIND_TRAIN, names.TAG_RUNG: rung, names.TAG_ARM: arm,
                                     names.TAG_STATUS: names.STATUS_FINISHED}))

    def best_trials(self, rung: str) -> list:
        """The trial(s) tagged best for a rung (one per sweep)."""
        return self._search(_all_of({names.TAG_KIND: names.KIND_TRIAL, names.TAG_RUNG: rung,
                                     names.TAG_BEST_TRIAL: "true"}))

    def running_runs(self) -> list:
        """Training and trial runs whose record says they are running (for progress lines)."""
        return [run for run in self._search(_tag_equals(names.TAG_STATUS, names.STATUS_RUNNING))
                if run.data.tags.get(names.TAG_KIND) in (names.KIND_TRAIN, names.KIND_TRIAL)]

    # -- creating runs ---------------------------------------------------------------------
    def study_run_id(self, params: Mapping[str, Any], study_source: str | None = None,
                     resolved_yaml: str | None = None) -> str:
        """The study's parent run: created once, reused by every later invocation."""
        runs = self._search(_tag_equals(names.TAG_KIND, names.KIND_STUDY))
        if runs:
            run_id = runs[0].info.run_id
            self._client.update_run(run_id, status="RUNNING")
            return run_id
        run = self._client.create_run(self.experiment_id, run_name=self.study, tags={
            names.TAG_KIND: names.KIND_STUDY, names.TAG_STUDY: self.study, names.TAG_GIT_COMMIT: git_commit()})
        self.log_params(run.info.run_id, params)
        if study_source:
            self._client.log_text(run.info.run_id, study_source, names.ARTIFACT_STUDY_SOURCE)
        if resolved_yaml:
            self._client.log_text(run.info.run_id, resolved_yaml, names.ARTIFACT_STUDY_YAML)
        return run.info.run_id

    def child_run(self, parent_id: str, run_name: str, config_hash: str, tags: Mapping[str, Any],
                  params: Mapping[str, Any], kind: str = names.KIND_TRAIN) -> tuple[str, str]:
        """(run_id, status) of the child run for `config_hash`, created if new.

        An existing run keeps its id (a resumed run continues its record); `status` tells the
        caller whether it already finished. Only trials nest under their parent (a rung's sweep)
        in MLflow's runs table: training and observation runs are top-level rows, so the table
        compares them at once, and name their study run in a tag instead.
        """
        existing = self.find_by_hash(config_hash)
        if existing is not None:
            return existing.info.run_id, existing.data.tags.get(names.TAG_STATUS, names.STATUS_RUNNING)
        all_tags = {names.TAG_KIND: kind, names.TAG_STUDY: self.study,
                    names.TAG_CONFIG_HASH: config_hash, names.TAG_GIT_COMMIT: git_commit(),
                    names.TAG_STATUS: names.STATUS_RUNNING,
                    names.TAG_PARENT_RUN_ID if kind == names.KIND_TRIAL else names.TAG_STUDY_RUN_ID: parent_id,
                    **{k: str(v) for k, v in tags.items()}}
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id, names.STATUS_RUNNING

    # -- writing ------------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self._client.log_batch(run_id, params=items[start:start + 100])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._client.set_tag(run_id, key, str(value))

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        self._client.log_artifact(run_id, str(path))

    def delete_tag(self, run_id: str, key: str) -> None:
        self._client.delete_tag(run_id, key)

    def finish(self, run_id: str, status: str, failure: str | None = None) -> None:
        """Mark a run finished, failed or stopped (with a one-line reason)."""
        self._client.set_tag(run_id, names.TAG_STATUS, status)
        if failure:
            self._client.set_tag(run_id, names.TAG_FAILURE, failure[:5000])
        self._client.set_terminated(run_id, status="FINISHED" if status == names.STATUS_FINISHED else "FAILED")

    def reopen(self, run_id: str) -> None:
        """Mark a run running again before it is (re)tried: a retried failure loses its old reason."""
        self._client.set_tag(run_id, names.TAG_STATUS, names.STATUS_RUNNING)
        if names.TAG_FAILURE in self._client.get_run(run_id).data.tags:
            self._client.delete_tag(run_id, names.TAG_FAILURE)
        self._client.update_run(run_id, status="RUNNING")

    def log_observation(self, run_id: str, metrics: Mapping[str, float], files: list[Path],
                        tags: Mapping[str, Any]) -> None:
        """An observation run's record: metrics at step 0, files as top-level artifacts, tags."""
        RunLogger(self.tracking_uri, run_id).log_metrics(metrics, step=0)
        for path in files:
            self._client.log_artifact(run_id, str(path))
        self.set_tags(run_id, tags)

    def end_study(self, run_id: str, failed: bool, killed: bool = False) -> None:
        self._client.set_terminated(run_id, status="KILLED" if killed else "FAILED" if failed else "FINISHED")

    def kill_running_runs(self) -> list[str]:
        """Mark every run of the study still recorded as running killed (an interrupted driver); returns
        their ids."""
        killed = []
        for run in self._search(_tag_equals(names.TAG_STATUS, names.STATUS_RUNNING)):
            self._client.set_tag(run.info.run_id, names.TAG_STATUS, names.STATUS_KILLED)
            self._client.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run.info.run_id)
        return killed


class RunLogger:
    """Logs metrics and artifacts of one run from anywhere (driver or rank 0 of a worker group)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start:start + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def mark_failed(self, failure: str) -> None:
        self.client.set_tag(self.run_id, names.TAG_STATUS, names.STATUS_FAILED)
        self.client.set_tag(self.run_id, names.TAG_FAILURE, failure[:5000])


class StudyLock:
    """One driver at a time on a study: a lease in a tag of the study's run (which driver, since when,
    last heartbeat). A second driver is refused with the first one named; a lease whose heartbeat
    stopped (a crashed or killed driver) expires after `ttl_s`, so it never stays stuck.

    MLflow has no compare-and-set, so taking the lease is write, wait, read back: of two drivers that
    write at once, the one whose lease is read back wins and the other is refused.
    """

    def __init__(self, tracker: Tracker, study_run_id: str, *, ttl_s: float = 180.0, beat_s: float = 30.0,
                 settle_s: float = 2.0):
        import socket
        import uuid

        self.tracker, self.run_id = tracker, study_run_id
        self.ttl_s, self.beat_s, self.settle_s = ttl_s, beat_s, settle_s
        self.holder = f"{socket.gethostname()} pid {os.getpid()} ({uuid.uuid4().hex[:8]})"
        self._since = time.time()
        self._stop = None

    def _read(self) -> dict | None:
        import json

        text = self.tracker.get_run(self.run_id).data.tags.get(names.TAG_DRIVER_LEASE)
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def _write(self) -> None:
        import json

        lease = {"holder": self.holder, "since": self._since, "beat": time.time()}
        self.tracker.set_tags(self.run_id, {names.TAG_DRIVER_LEASE: json.dumps(lease)})

    def _refuse_if_held(self) -> None:
        lease = self._read()
        if lease and lease.get("holder") != self.holder and time.time() - float(lease.get("beat", 0)) < self.ttl_s:
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("since", 0))))
            raise ConfigError(
                f"study {self.tracker.study!r} is being run by another driver ({lease.get('holder')}, started "
                f"{started}, last seen {time.time() - float(lease['beat']):.0f} s ago); wait for it to finish or "
                f"stop it (a driver that died frees the study {self.ttl_s:.0f} s after its last heartbeat)")

    def __enter__(self):
        import threading

        self._refuse_if_held()
        self._write()
        time.sleep(self.settle_s)
        self._refuse_if_held()  # another driver wrote after us: it holds the study
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(self.beat_s):
                try:
                    self._write()
                except Exception:  # noqa: BLE001 -- the store may be away for a while: the lease outlives it
                    pass

        threading.Thread(target=beat, name="study-lease", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        try:
            lease = self._read()
            if lease and lease.get("holder") == self.holder:
                self.tracker.delete_tag(self.run_id, names.TAG_DRIVER_LEASE)
        except Exception:  # noqa: BLE001 -- an unreleased lease expires by itself
            pass
