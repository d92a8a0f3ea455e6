"""MLflow records of a study: the only module of `scaling` that imports mlflow.

Layout: one experiment per study (named after it); a parent run (tag kind=study); a child
run per (rung, arm, seed) (kind=train) identified by the hash of its resolved config, so
that a re-run finds it: finished runs are skipped, unfinished ones are continued (same run
id) rather than duplicated. Everything goes through `MlflowClient` with explicit run ids
(no global "active run"), so the driver and a Ray Train worker can log to the same run.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from scaling import names
from scaling.errors import ConfigError

_PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The study's URI, else $MLFLOW_TRACKING_URI, else a SQLite file in the working directory.

    Relative SQLite paths are made absolute so that Ray workers (other working directories)
    write to the same file as the driver.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or names.DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit of the checkout at `cwd` (default: this package's), with '+dirty' when tracked
    files have changes; "unknown" outside a git checkout. Pure Python: `analysis` uses it too."""
    cwd = cwd if cwd is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if commit and dirty else "")


class Tracker:
    """A study's MLflow store: find or create the experiment, parent and child runs."""

    def __init__(self, tracking_uri: str, study: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.study = study
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            experiment = self.client.get_experiment_by_name(study)
        except Exception as exc:  # noqa: BLE001 -- any failure here means the store is unusable
            raise ConfigError(
                f"MLflow store {tracking_uri!r} cannot be reached ({type(exc).__name__}: {exc}); "
                "check tracking_uri / MLFLOW_TRACKING_URI"
            ) from None
        if experiment is None:
            self.experiment_id = self.client.create_experiment(study)
        elif experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {study!r} was deleted; restore it (mlflow experiments restore) or rename the study"
            )
        else:
            self.experiment_id = experiment.experiment_id

    # -- finding runs -----------------------------------------------------------------
    def search_runs(self, filter_string: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1000,
                                       order_by=["attributes.start_time ASC"])

    def find_by_hash(self, config_hash: str):
        """The run of a config hash (oldest first if somehow several), or None."""
        runs = self.search_runs(f"tags.{names.TAG_CONFIG_HASH} = '{config_hash}'")
        return runs[0] if runs else None

    def study_run_id(self, params: Mapping[str, Any], study_yaml: str | None = None,
                     resolved_yaml: str | None = None) -> str:
        """The study's parent run: created once, reused by every later invocation."""
        runs = self.search_runs(f"tags.{names.TAG_KIND} = '{names.KIND_STUDY}'")
        if runs:
            run_id = runs[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=self.study, tags={
            names.TAG_KIND: names.KIND_STUDY, names.TAG_STUDY: self.study, names.TAG_GIT_COMMIT: git_commit()})
        self.log_params(run.info.run_id, params)
        if study_yaml:
            self.client.log_text(run.info.run_id, study_yaml, "study_source.yaml")
        if resolved_yaml:
            self.client.log_text(run.info.run_id, resolved_yaml, names.ARTIFACT_STUDY_YAML)  # defaults filled in
        return run.info.run_id

    def child_run(self, parent_id: str, run_name: str, config_hash: str, tags: Mapping[str, Any],
                  params: Mapping[str, Any], kind: str = names.KIND_TRAIN) -> tuple[str, str]:
        """(run_id, status) of the child run for `config_hash`, created if new.

        An existing run keeps its id (a resumed run continues its record); `status` tells the
        caller whether it already finished.
        """
        existing = self.find_by_hash(config_hash)
        if existing is not None:
            return existing.info.run_id, existing.data.tags.get(names.TAG_STATUS, names.STATUS_RUNNING)
        all_tags = {names.TAG_KIND: kind, names.TAG_STUDY: self.study,
                    names.TAG_CONFIG_HASH: config_hash, names.TAG_GIT_COMMIT: git_commit(),
                    names.TAG_STATUS: names.STATUS_RUNNING, "mlflow.parentRunId": parent_id,
                    **{k: str(v) for k, v in tags.items()}}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id, names.STATUS_RUNNING

    # -- writing ------------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[start:start + 100])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def finish(self, run_id: str, status: str, failure: str | None = None) -> None:
        """Mark a run finished or failed (with a one-line reason)."""
        self.client.set_tag(run_id, names.TAG_STATUS, status)
        if failure:
            self.client.set_tag(run_id, names.TAG_FAILURE, failure[:5000])
        self.client.set_terminated(run_id, status="FINISHED" if status == names.STATUS_FINISHED else "FAILED")

    def reopen(self, run_id: str) -> None:
        """Mark a run running again before it is (re)tried: a retried failure loses its old reason."""
        self.client.set_tag(run_id, names.TAG_STATUS, names.STATUS_RUNNING)
        if names.TAG_FAILURE in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, names.TAG_FAILURE)
        self.client.update_run(run_id, status="RUNNING")

    def log_observation(self, run_id: str, metrics: Mapping[str, float], files: list[Path],
                        tags: Mapping[str, Any]) -> None:
        """An observation run's record: metrics at step 0, files as top-level artifacts, tags."""
        RunLogger(self.tracking_uri, run_id).log_metrics(metrics, step=0)
        for path in files:
            self.client.log_artifact(run_id, str(path))
        self.set_tags(run_id, tags)

    def end_study(self, run_id: str, failed: bool) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


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
