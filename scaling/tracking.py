"""MLflow records of a study: the only module of `scaling` that imports mlflow.

Layout: one experiment per study (named after it); a parent run (tag kind=study); a child
run per (rung, arm, seed) (kind=train) identified by the hash of its resolved config, so
that a re-run finds it: finished runs are skipped, unfinished ones are continued (same run
id) rather than duplicated. Sweeps add a `sweep` run per rung with a `trial` run per Tune
trial; observation studies a run per (model, source). Every query and filter string lives
here; the tag and metric names live in `scaling.names`.

Everything goes through `MlflowClient` with explicit run ids (no global "active run"), so
the driver and a Ray Train worker can log to the same run.

When the store goes away (a tracking server restarted, a network cut), nothing that trains waits
for it: a run's metrics, tags and files go through a `RunLogger`, whose background thread writes
them with their original timestamps and steps while the loop goes on, and a run ends only once
they are written. The driver's calls (`Tracker`) wait and retry. Both retry with backoff for
`RetryPolicy.budget_s` of unbroken failure (SCALING_MLFLOW_RETRY_S, default 30 min), with the
MLflow client's own HTTP retries off: they blocked the caller for minutes and re-sent batches
whose first attempt had landed. Past the budget a run logger spills what it holds to a JSONL
file that the run's next life (`--resume`) writes; the driver stops with one line.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from scaling import names
from scaling.console import LOG_PREFIX, format_duration, say
from scaling.errors import ConfigError, TrackingUnavailable, one_line
from scaling.provenance import compare_page, git_commit, run_page, runs_page, sqlite_path, view_page  # noqa: F401 -- the UI links, re-exported

PARAM_VALUE_LIMIT = 6000  # MLflow rejects longer param values
TAG_VALUE_LIMIT = 8000  # nor longer tag values
REACHABLE_TIMEOUT_S = 10
RETRY_BUDGET_ENV = "SCALING_MLFLOW_RETRY_S"
UNWRITTEN_KEY = "tracking_unwritten"
"""In a run's last report when some of its records could not reach MLflow (why, and where they are)."""
METRICS_PER_BATCH, TAGS_PER_BATCH = 1000, 100  # MLflow's log_batch limits


# --- retries while the store does not answer -------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How MLflow calls are retried while the store does not answer (driver and run loggers alike)."""

    budget_s: float = 1800.0
    """Give up once the store has failed this long without a break (counted per call or batch)."""
    first_backoff_s: float = 1.0
    """Wait after the first failure; it doubles after each further failure (with 10% jitter)."""
    max_backoff_s: float = 30.0
    """The longest wait between two attempts: the store is noticed within this once it is back."""
    request_timeout_s: int = 30
    """One HTTP request's timeout (MLFLOW_HTTP_REQUEST_TIMEOUT unless set): a hung server is a failure."""
    max_buffered: int = 200_000
    """Metric values (a tag or a file counts one) a RunLogger holds in memory; past it, it spills them."""

    def __post_init__(self):
        for name in ("budget_s", "first_backoff_s", "max_backoff_s", "request_timeout_s", "max_buffered"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"RetryPolicy.{name}={getattr(self, name)!r} must be > 0")

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """The default policy, with the budget from SCALING_MLFLOW_RETRY_S (seconds) when it is set."""
        raw = os.environ.get(RETRY_BUDGET_ENV)
        if raw is None or not raw.strip():
            return cls()
        try:
            budget = float(raw)
        except ValueError:
            budget = -1.0
        if not 0 < budget < float("inf"):
            raise ConfigError(f"{RETRY_BUDGET_ENV}={raw!r} is not a number of seconds > 0; "
                              "set it to e.g. 1800 (wait up to 30 min for MLflow) or unset it")
        return cls(budget_s=budget)

    def waits(self) -> Iterator[float]:
        """Seconds to wait before each retry: exponential backoff with a little jitter."""
        wait = self.first_backoff_s
        while True:
            yield wait * random.uniform(0.9, 1.1)
            wait = min(wait * 2, self.max_backoff_s)


def own_http_retries(policy: RetryPolicy) -> None:
    """Turn the MLflow client's HTTP retries off in this process: ours replace them.

    MLflow 3.17 reads MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT at every
    request (`mlflow.utils.rest_utils.http_request`), for every client in the process. Its own
    retries (7, backoff 2 s doubling) held a caller for ~5 min inside one call and re-sent a
    `log-batch` whose first attempt may have landed; ours back off without blocking the loop
    and check what landed before re-sending. A timeout the user set is kept.
    """
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(policy.request_timeout_s)))


def is_transient(exc: BaseException) -> bool:
    """True for a failure that may pass (no answer, a timeout, a 5xx, a locked SQLite file); False
    when the store answered and refused (a 4xx: unknown run, bad value), which no retry can fix."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        status = exc.get_http_status_code()
        return not 400 <= status < 500 or status == 429
    return isinstance(exc, (OSError, TimeoutError)) or type(exc).__name__ == "OperationalError"


def call_with_retries(fn: Callable[[], Any], what: str, *, uri: str, policy: RetryPolicy,
                      notice: Callable[[str], None]) -> Any:
    """`fn()`, retried with backoff while the failure is transient, for up to `policy.budget_s`;
    then `TrackingUnavailable`. `fn` must be safe to run again after an attempt that may have landed."""
    started, waits = None, policy.waits()
    while True:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 -- classified: a refusal is raised at once
            if not is_transient(exc):
                raise
            now = time.monotonic()
            if started is None:
                started = now
                notice(f"MLflow at {uri} does not answer ({one_line(exc, 200)}); {what}: retrying for up to "
                       f"{format_duration(policy.budget_s)}")
            wait = next(waits)
            if now - started + wait > policy.budget_s:
                raise TrackingUnavailable(
                    f"MLflow at {uri} did not answer for {format_duration(now - started)} while {what} "
                    f"({one_line(exc, 200)}); start the server (or fix tracking_uri / MLFLOW_TRACKING_URI) and run "
                    f"again with --resume, or set {RETRY_BUDGET_ENV} to wait longer") from None
            time.sleep(wait)
            continue
        if started is not None:
            notice(f"MLflow at {uri} answers again after {format_duration(time.monotonic() - started)} ({what})")
        return result


_retrying = threading.local()  # set while a Tracker call retries: the calls it makes do not retry again


def _retried(what: str):
    """A Tracker method that waits out an outage (see `call_with_retries`); it must be re-entrant."""
    def wrap(method):
        @functools.wraps(method)
        def call(self, *args, **kwargs):
            if getattr(_retrying, "active", False):
                return method(self, *args, **kwargs)
            _retrying.active = True
            try:
                return call_with_retries(lambda: method(self, *args, **kwargs), what, uri=self.tracking_uri,
                                         policy=self.policy, notice=self.notice)
            finally:
                _retrying.active = False
        return call
    return wrap


def recorded_steps(tracking_uri: str, run_id: str, key: str) -> set[int]:
    """The steps at which a run has a value of `key` (a worker's read; waits out an outage like every call)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return call_with_retries(lambda: {m.step for m in client.get_metric_history(run_id, key)},
                             "reading which steps a run recorded", uri=tracking_uri,
                             policy=RetryPolicy.from_env(), notice=_worker_notice)


def default_spill_dir() -> Path:
    """Where a run logger with no spill folder of its own keeps what MLflow did not take."""
    return Path(tempfile.gettempdir()) / "dispersion-scaling" / "mlflow-spill"


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


def _column(kind: str, key: str) -> str:
    """A runs-table column as MLflow's UI names it: `metrics.`val/loss``, `tags.`arm``."""
    return f"{kind}.`{key}`"


def study_view_state(*, evaluates: bool) -> dict[str, Any]:
    """The runs-page state of a study's view: its training runs only, grouped by rung and arm (a group row is
    one arm's mean over seeds, never baseline and dispersion averaged together), sorted by N, every run shown
    (charts too), and the columns the study is about. The keys are MLflow 3.17's runs-page state (search facets
    and UI state, `ExperimentPageUIState`); the UI keeps only the keys it knows."""
    finals = [names.FINAL_PREFIX + name for name in ("val_loss", "late_half_mean_cos", "last_layer_mean_cos",
                                                     "spearman")] + ([names.FINAL_PREFIX + "mean_acc"] if evaluates else [])
    metrics = [names.RUN_N] + finals + [names.TIME_RUN_S]
    columns = [_column("tags", names.TAG_ARM)] + [_column("metrics", key) for key in metrics]
    run_name = _column("attributes", "Run Name")
    return {
        "searchFilter": f"tags.`{names.TAG_KIND}` = '{names.KIND_TRAIN}'",
        "orderByKey": _column("metrics", names.RUN_N), "orderByAsc": True,
        "selectedColumns": columns, "columnOrder": [run_name] + columns,
        # wide enough for a group's label (`Group: rung: tiny-429K, arm: dispersion`) and the metrics' names
        "columnWidths": {run_name: 300, **{column: 170 for column in columns if "_mean_cos" in column}},
        "runsHiddenMode": "SHOW_ALL",
        "groupBy": {"aggregateFunction": "average",
                    "groupByKeys": [{"mode": "tag", "groupByData": names.TAG_RUNG},
                                    {"mode": "tag", "groupByData": names.TAG_ARM}]},
        "groupsExpanded": {}, "useGroupedValuesInCharts": False, "hideEmptyCharts": True,
        # The chart view opens on the study's picture: a metric against model size, a colour per arm (each run
        # carries its arm's colour, `names.ARM_COLORS`); MLflow adds its own charts of every metric after these.
        "compareRunCharts": [_scatter(names.RUN_LOG10_N, key) for key in (
            names.VAL_LOSS, names.COND_LATE_HALF_MEAN_COS, names.COND_LAST_LAYER_MEAN_COS)],
        "compareRunSections": [{"uuid": _STUDY_SECTION, "name": "Against model size (log10 N), by arm",
                                "display": True, "isReordered": True}],
        "isAccordionReordered": True,
    }


_STUDY_SECTION = "study-against-n"


def _scatter(x: str, y: str) -> dict[str, Any]:
    """A chart card of MLflow's runs charts (`RunsChartsScatterCardConfig`): metric `y` against metric `x`."""
    return {"type": "SCATTER", "uuid": f"study-{y.replace('/', '-')}", "metricSectionId": _STUDY_SECTION,
            "deleted": False, "isGenerated": False, "runsCountToCompare": 100,
            "xaxis": {"key": x, "type": "METRIC"}, "yaxis": {"key": y, "type": "METRIC"}}


def _tag_equals(tag: str, value: Any) -> str:
    return f"tags.`{tag}` = '{value}'"


def _all_of(tags: Mapping[str, Any]) -> str:
    return " and ".join(_tag_equals(key, value) for key, value in tags.items())


class Tracker:
    """A study's MLflow store: find or create the experiment, parent and child runs, query them.

    Every call but `running_runs` (progress lines, best effort) waits out an outage of the store
    (see `RetryPolicy`) and is safe to repeat after an attempt that may have landed; past the
    budget it raises `TrackingUnavailable`. Only the first contact fails at once: a study that
    cannot reach its store at start is refused before any work.
    """

    def __init__(self, tracking_uri: str, study: str, *, policy: RetryPolicy | None = None,
                 notice: Callable[[str], None] = say, experiment_id: str | None = None):
        """`experiment_id`: the study's experiment, known already (a worker opening its run's record): no
        first contact, so an outage is waited out like any other call instead of refused."""
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.study = study
        self.policy = policy or RetryPolicy.from_env()
        self.notice = notice
        own_http_retries(self.policy)
        self._client = MlflowClient(tracking_uri=tracking_uri)
        if experiment_id is not None:
            self.experiment_id = experiment_id
            return
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

    @_retried("looking up a run by its config hash")
    def find_by_hash(self, config_hash: str):
        """The run of a config hash (oldest first if somehow several), or None."""
        runs = self._search(_tag_equals(names.TAG_CONFIG_HASH, config_hash))
        return runs[0] if runs else None

    @_retried("reading a run")
    def get_run(self, run_id: str):
        return self._client.get_run(run_id)

    @_retried("reading how a run ended")
    def recorded_failure(self, run_id: str) -> str | None:
        """A failure the workers recorded themselves (e.g. a NaN loss), if any."""
        return self._client.get_run(run_id).data.tags.get(names.TAG_FAILURE)

    @_retried("checking a run's records are complete")
    def unwritten(self, run_id: str, reported: str | None) -> str | None:
        """`reported` (why some records of a run did not reach MLflow, from the last report in its
        outcome) unless the record now has rank 0's data-order tag: it is written after every other
        record of the loop, so the records have reached the store since."""
        if not reported:
            return None
        return None if names.TAG_DATA_ORDER_HASH in self._client.get_run(run_id).data.tags else reported

    @_retried("listing a sweep's trials")
    def trial_runs(self, sweep_run_id: str) -> list:
        """The trial runs of one rung's sweep, oldest first."""
        return self._search(_all_of({names.TAG_KIND: names.KIND_TRIAL, names.TAG_PARENT_RUN_ID: sweep_run_id}))

    @_retried("listing finished runs")
    def finished_training_runs(self, rung: str, arm: str) -> list:
        """Finished training runs of one arm on one rung (every seed)."""
        return self._search(_all_of({names.TAG_KIND: names.KIND_TRAIN, names.TAG_RUNG: rung, names.TAG_ARM: arm,
                                     names.TAG_STATUS: names.STATUS_FINISHED}))

    @_retried("listing a rung's best trials")
    def best_trials(self, rung: str) -> list:
        """The trial(s) tagged best for a rung (one per sweep)."""
        return self._search(_all_of({names.TAG_KIND: names.KIND_TRIAL, names.TAG_RUNG: rung,
                                     names.TAG_BEST_TRIAL: "true"}))

    @_retried("listing the runs that ended")
    def runs_ended_since(self, since_s: float) -> list:
        """Training and trial runs whose record ended at or after `since_s` (epoch seconds): what one
        invocation of the driver trained (a run resumed from an earlier life keeps its old start time)."""
        since_ms = since_s * 1000
        runs = [run for kind in (names.KIND_TRAIN, names.KIND_TRIAL)
                for run in self._search(_tag_equals(names.TAG_KIND, kind))]
        return [run for run in runs if run.info.end_time and run.info.end_time >= since_ms]

    def running_runs(self) -> list:
        """Training and trial runs whose record says they are running (for progress lines).

        Not retried: a progress line skipped while the store is away is better than a stalled board.
        """
        return [run for run in self._search(_tag_equals(names.TAG_STATUS, names.STATUS_RUNNING))
                if run.data.tags.get(names.TAG_KIND) in (names.KIND_TRAIN, names.KIND_TRIAL)]

    # -- creating runs ---------------------------------------------------------------------
    @_retried("opening the study's parent run")
    def study_run_id(self, params: Mapping[str, Any], study_source: str | None = None,
                     resolved_yaml: str | None = None) -> str:
        """The study's parent run: created once, reused by every later invocation."""
        runs = self._search(_tag_equals(names.TAG_KIND, names.KIND_STUDY))
        if runs:
            run_id = runs[0].info.run_id
            self._client.update_run(run_id, status=names.MLFLOW_RUNNING)
            return run_id
        run = self._client.create_run(self.experiment_id, run_name=self.study, tags={
            names.TAG_KIND: names.KIND_STUDY, names.TAG_STUDY: self.study, names.TAG_GIT_COMMIT: git_commit()})
        self.log_params(run.info.run_id, params)
        if study_source:
            self._client.log_text(run.info.run_id, study_source, names.ARTIFACT_STUDY_SOURCE)
        if resolved_yaml:
            self._client.log_text(run.info.run_id, resolved_yaml, names.ARTIFACT_STUDY_YAML)
        return run.info.run_id

    @_retried("creating a run")
    def child_run(self, parent_id: str, run_name: str, config_hash: str, tags: Mapping[str, Any],
                  params: Mapping[str, Any], kind: str = names.KIND_TRAIN, *,
                  metrics: Mapping[str, float] | None = None, create: bool = True) -> tuple[str, str | None]:
        """(run_id, status) of the child run for `config_hash`, created if new (("", None) when it is new and
        `create` is False: a queued run's worker creates it when it starts, so MLflow's start time is when it
        trained; `update_run` cannot move a start time).

        An existing run keeps its id (a resumed run continues its record); `status` tells the
        caller whether it already finished. Only trials nest under their parent (a rung's sweep)
        in MLflow's runs table: training and observation runs are top-level rows, so the table
        compares them at once, and name their study run in a tag instead. Looking up first makes a
        retry after a creation that landed find that run rather than create another. `metrics` (what a run
        is, as numbers MLflow can plot: N, log10 N, lambda) are logged at step 0.
        """
        existing = self.find_by_hash(config_hash)
        if existing is not None:
            missing = {k: v for k, v in params.items() if k not in existing.data.params}
            if missing:  # created, but (some of) its params never arrived, or a run of an earlier version
                self.log_params(existing.info.run_id, missing)
            absent = {k: v for k, v in (metrics or {}).items() if k not in existing.data.metrics}
            if absent:
                self.log_metrics(existing.info.run_id, absent)
            return existing.info.run_id, existing.data.tags.get(names.TAG_STATUS, names.STATUS_RUNNING)
        if not create:
            return "", None
        all_tags = {names.TAG_KIND: kind, names.TAG_STUDY: self.study,
                    names.TAG_CONFIG_HASH: config_hash, names.TAG_GIT_COMMIT: git_commit(),
                    names.TAG_STATUS: names.STATUS_RUNNING,
                    names.TAG_PARENT_RUN_ID if kind == names.KIND_TRIAL else names.TAG_STUDY_RUN_ID: parent_id,
                    **{k: str(v) for k, v in tags.items()}}
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.log_params(run.info.run_id, params)
        if metrics:
            self.log_metrics(run.info.run_id, metrics)
        return run.info.run_id, all_tags[names.TAG_STATUS]

    # -- writing ------------------------------------------------------------------------
    @_retried("logging params")
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
        for start in range(0, len(items), TAGS_PER_BATCH):
            self._client.log_batch(run_id, params=items[start:start + TAGS_PER_BATCH])

    @_retried("logging metrics")
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        """Values that describe a run rather than follow its training (N, lambda): one per key, at `step`."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    @_retried("setting tags")
    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for start in range(0, len(items), TAGS_PER_BATCH):
            self._client.log_batch(run_id, tags=items[start:start + TAGS_PER_BATCH])

    @_retried("uploading a file")
    def log_artifact(self, run_id: str, path: str | Path) -> None:
        self._client.log_artifact(run_id, str(path))

    @_retried("removing a tag")
    def delete_tag(self, run_id: str, key: str) -> None:
        self._client.delete_tag(run_id, key)

    @_retried("recording how a run ended")
    def finish(self, run_id: str, status: str, failure: str | None = None, ended_at: float | None = None) -> None:
        """Mark a run finished, failed or stopped (with a one-line reason); `ended_at` (epoch seconds) is when
        its training ended (from its outcome), so MLflow's end time does not wait for the driver to notice."""
        self._client.set_tag(run_id, names.TAG_STATUS, status)
        if failure:
            self._client.set_tag(run_id, names.TAG_FAILURE, failure[:5000])
        self._client.set_terminated(run_id, status=names.mlflow_status(status),
                                    end_time=int(ended_at * 1000) if ended_at else None)

    @_retried("reopening a run")
    def reopen(self, run_id: str, queued: bool = False) -> None:
        """Mark a run running (or queued) again before it is (re)tried: a retried failure loses its old reason."""
        self._client.set_tag(run_id, names.TAG_STATUS, names.STATUS_QUEUED if queued else names.STATUS_RUNNING)
        if names.TAG_FAILURE in self._client.get_run(run_id).data.tags:
            self._client.delete_tag(run_id, names.TAG_FAILURE)
        self._client.update_run(run_id, status=names.mlflow_status(names.STATUS_QUEUED if queued else names.STATUS_RUNNING))

    def log_observation(self, run_id: str, metrics: Mapping[str, float], files: list[Path],
                        tags: Mapping[str, Any]) -> None:
        """An observation run's record: metrics at step 0, files as top-level artifacts, tags; written
        (and waited for) through a RunLogger, so an outage neither loses nor doubles any of it."""
        logger = RunLogger(self.tracking_uri, run_id, policy=self.policy, notice=self.notice)
        logger.log_metrics(metrics, step=0)
        for path in files:
            logger.log_artifact(path)
        logger.set_tags(tags)
        problem = logger.close()
        if problem:
            raise TrackingUnavailable(problem)

    @_retried("closing the study's parent run")
    def end_study(self, run_id: str, failed: bool, killed: bool = False) -> None:
        self._client.set_terminated(run_id, status=names.mlflow_status(
            names.STATUS_KILLED if killed else names.STATUS_FAILED if failed else names.STATUS_FINISHED))

    @_retried("logging a wave's decisions")
    def log_wave(self, run_id: str, wave: int, record: str, runs: int, spent: float) -> None:
        """A deciding study's look after `wave`: its decisions as a JSON tag (what a resumed study replays), the
        runs it used and the alpha spent as metrics at step = wave (MLflow plots the course)."""
        from mlflow.entities import Metric, RunTag

        if len(record) > TAG_VALUE_LIMIT:
            raise ValueError(f"wave {wave}'s record has {len(record)} characters; MLflow keeps {TAG_VALUE_LIMIT} in a tag")
        now = int(time.time() * 1000)
        self._client.log_batch(run_id, metrics=[Metric(names.METRIC_WAVE_RUNS, float(runs), now, wave),
                                                Metric(names.METRIC_WAVE_ALPHA, float(spent), now, wave)],
                               tags=[RunTag(f"{names.TAG_WAVE_PREFIX}{wave:02d}", record)])

    @_retried("reading the study's waves")
    def read_waves(self, run_id: str) -> list[str]:
        """The logged wave records of a study run, in wave order."""
        tags = self._client.get_run(run_id).data.tags
        return [tags[k] for k in sorted(k for k in tags if k.startswith(names.TAG_WAVE_PREFIX))]

    @_retried("saving the study's view")
    def save_view(self, name: str, state: Mapping[str, Any], view_id: str = names.STUDY_VIEW_ID) -> str:
        """Store a saved view of the runs page (MLflow >= 3.15 "Views"): an experiment tag holding the envelope
        its UI writes and lists, `{name, createdAt, state}` with the state deflated as its own writer does
        (`mlflow.demo.generators.saved_views`). Rewritten on every call, so it follows the code. Its UI path."""
        import base64
        import zlib

        compact = json.dumps(dict(state), separators=(",", ":"))
        envelope = {"name": name, "createdAt": int(time.time() * 1000),
                    "state": "deflate;" + base64.b64encode(zlib.compress(compact.encode())).decode("ascii")}
        self._client.set_experiment_tag(self.experiment_id, names.VIEW_TAG_PREFIX + view_id,
                                        json.dumps(envelope, separators=(",", ":")))
        return view_page(self.experiment_id, view_id)

    @_retried("marking interrupted runs killed")
    def kill_running_runs(self) -> list[str]:
        """Mark every run of the study still recorded as running or queued killed (an interrupted driver);
        returns their ids."""
        killed = []
        for run in (self._search(_tag_equals(names.TAG_STATUS, names.STATUS_RUNNING))
                    + self._search(_tag_equals(names.TAG_STATUS, names.STATUS_QUEUED))):
            self._client.set_tag(run.info.run_id, names.TAG_STATUS, names.STATUS_KILLED)
            self._client.set_terminated(run.info.run_id, status=names.MLFLOW_KILLED)
            killed.append(run.info.run_id)
        return killed


class RunLogger:
    """One run's metrics, tags and files, written to MLflow by a background thread.

    Used by rank 0 of a training run and by the driver for observation runs. Every call returns at
    once and never raises for the store: records (a metric keeps the time it was measured and its
    step) queue in memory, bounded by `RetryPolicy.max_buffered`, and the writer thread sends them
    in order, batched, retrying with backoff while the store does not answer. A run ends with
    `close()` (or `flush()` before its last report), which waits until everything is written.

    No (metric, step) is recorded twice: the MLflow client's HTTP retries are off, and after a
    failed attempt (which may have landed) or in a run that already has metrics (a resumed run,
    or an earlier life's spill being replayed), the steps already in the store are read back and
    skipped. This relies on the project's rule of one value per metric and step. Tags are the
    same value twice and files the same path twice, so repeating them is harmless.

    Past the budget (or the memory bound), the logger stops trying: everything it holds, and
    everything logged after, goes to `spill_path` (JSON lines; files are staged next to it), and
    `close()` says so. The next RunLogger of the same run and spill folder (the run resumed once
    the store answers) writes that file first, skipping what had landed.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, spill_dir: str | Path | None = None,
                 policy: RetryPolicy | None = None, notice: Callable[[str], None] | None = None):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.policy = policy or RetryPolicy.from_env()
        self.spill_path = Path(spill_dir or default_spill_dir()) / f"{run_id}.jsonl"
        self._notice = notice or _worker_notice
        own_http_retries(self.policy)
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()  # (record, size), oldest first
        self._buffered = 0  # sizes of the records in the queue
        self._current: list[dict] | None = None  # the batch the writer holds (sent or being retried)
        self._closed = False
        self._gave_up: str | None = None  # why the logger stopped writing to MLflow
        self._dumped = False  # the writer moved what it held to the spill file: new records go straight there
        self._spill_file = None
        self._spilled = 0
        self._spill_error: str | None = None
        self._refused: list[str] = []  # records the store refused (a 4xx), one line each
        self._unstaged: list[str] = []  # files that could not even be copied for upload
        self._client = None
        # Steps already in the store, for metric keys that may repeat: key -> (steps, largest step).
        self._known: dict[str, tuple[set[int], int]] = {}
        self._unchecked: set[str] | None = None  # keys the run had in the store before this logger wrote
        self._stale: set[str] = set()  # keys whose last batch failed after it may have landed
        self._replaying = self.spill_path.exists() or self._replay_path.exists()  # an earlier life's spill
        self.already_written = 0  # metric values skipped because the store had their (key, step)
        self._thread = threading.Thread(target=self._write_loop, name=f"mlflow-writer-{run_id[:8]}", daemon=True)
        self._thread.start()

    # -- what the loop calls (never blocks on the store, never raises for it) -------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if metrics:
            values = {key: float(value) for key, value in metrics.items()}
            self._put({"kind": "metrics", "timestamp": int(time.time() * 1000), "step": int(step),
                       "values": values}, len(values))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if tags:
            self._put({"kind": "tags", "tags": {key: str(value) for key, value in tags.items()}}, len(tags))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file later: it is copied now, so the caller may delete it at once."""
        staged = self._stage(Path(path))
        if staged is not None:
            self._put({"kind": "artifact", "file": str(staged), "artifact_path": artifact_path}, 1)

    def mark_running(self) -> None:
        """The run starts (it may have waited SCHEDULED in a chain's queue)."""
        self.set_tags({names.TAG_STATUS: names.STATUS_RUNNING})
        self._put({"kind": "status", "status": names.MLFLOW_RUNNING}, 1)

    def mark_failed(self, failure: str) -> None:
        self.set_tags({names.TAG_STATUS: names.STATUS_FAILED, names.TAG_FAILURE: failure[:5000]})

    def flush(self) -> str | None:
        """Wait until everything logged so far is written (or the logger gave up); `problem()`."""
        with self._cond:
            self._cond.wait_for(lambda: (not self._queue and self._current is None and not self._replaying)
                                or self._dumped or not self._thread.is_alive())
        return self.problem()

    def close(self) -> str | None:
        """Write everything (waiting out an outage up to the budget), stop the writer; `problem()`."""
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=self.policy.budget_s + 4 * self.policy.request_timeout_s)
        with self._cond:
            if self._thread.is_alive():  # stuck inside one call: keep what it holds
                if self._gave_up is None:
                    self._give_up("the MLflow writer did not finish")
                self._dump(self._current or ())
            if self._spill_file is not None:
                self._spill_file.close()
                self._spill_file = None
        return self.problem()

    def problem(self) -> str | None:
        """None when every record reached MLflow; else one line: what did not, why, where it is."""
        parts = []
        if self._gave_up is not None:
            parts.append(f"{self._gave_up}: {self._spilled} record(s) of run {self.run_id} kept in "
                         f"{self.spill_path}; resuming the run (--resume) with MLflow answering writes them")
        if self._spill_error is not None:
            parts.append(self._spill_error)
        if self._unstaged:
            parts.append(f"{len(self._unstaged)} file(s) of run {self.run_id} not recorded ({self._unstaged[0]})")
        if self._refused:
            parts.append(f"MLflow refused {len(self._refused)} batch(es) of records of run {self.run_id} "
                         f"({self._refused[0]})")
        return "; ".join(parts) or None

    # -- the queue ---------------------------------------------------------------------------
    def _put(self, record: dict, size: int) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError(f"RunLogger of run {self.run_id} used after close()")
            if self._gave_up is None and self._buffered + size > self.policy.max_buffered:
                self._give_up(f"more than {self.policy.max_buffered} metric values waited for MLflow at "
                              f"{self.tracking_uri}")
            if self._dumped:
                self._spill([record])
                return
            self._queue.append((record, size))  # after giving up, only until the writer dumps the queue
            self._buffered += size
            self._cond.notify_all()

    def _take(self) -> list[dict] | None:
        """The next batch: consecutive records of one kind within MLflow's batch limits."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed or self._gave_up is not None)
            if self._gave_up is not None:
                self._dump()
                return None
            if not self._queue:
                return None
            first, total = self._queue.popleft()
            batch = [first]
            limit = {"metrics": METRICS_PER_BATCH, "tags": TAGS_PER_BATCH}.get(first["kind"], 0)
            while self._queue and self._queue[0][0]["kind"] == first["kind"] and total + self._queue[0][1] <= limit:
                record, size = self._queue.popleft()
                batch.append(record)
                total += size
            self._buffered -= total
            self._current = batch
            return batch

    def _done_with_batch(self) -> None:
        with self._cond:
            self._current = None
            self._cond.notify_all()

    # -- giving up: the spill file -------------------------------------------------------------
    def _give_up(self, reason: str) -> None:
        """(Lock held.) Stop writing to MLflow; the writer then moves everything to the spill file."""
        self._gave_up = reason
        self._notice(f"run {self.run_id[:8]}: {reason}; its records now go to {self.spill_path} (training goes on; "
                     "resuming the run with MLflow answering writes them)")
        self._cond.notify_all()

    def _dump(self, held: Iterable[dict] = (), rest: Iterable[str] = ()) -> None:
        """(Lock held.) Spill, oldest first: the batch in hand, the rest of a spill being replayed,
        the queue. The order is kept so that a record written on replay says all before it were."""
        if self._dumped:
            return
        self._spill(held, rest)
        self._spill([record for record, _ in self._queue])
        self._queue.clear()
        self._buffered = 0
        self._dumped = True
        self._cond.notify_all()

    def _spill(self, records: Iterable[dict], lines: Iterable[str] = ()) -> None:
        """(Lock held.) Append records (and raw JSON lines) to the spill file; never raises."""
        try:
            if self._spill_file is None:
                self.spill_path.parent.mkdir(parents=True, exist_ok=True)
                self._spill_file = open(self.spill_path, "a", encoding="utf-8")
            for record in records:
                self._spill_file.write(json.dumps(record) + "\n")
                self._spilled += 1
            for line in lines:
                if line.strip():
                    self._spill_file.write(line if line.endswith("\n") else line + "\n")
                    self._spilled += 1
            self._spill_file.flush()
        except OSError as exc:
            self._spill_error = f"records of run {self.run_id} lost: the spill file {self.spill_path} " \
                                f"cannot be written ({exc.strerror or exc})"

    def _stage(self, path: Path) -> Path | None:
        """A private copy of a file to upload, next to the spill file (or in a temp folder)."""
        for parent in (self.spill_path.parent / f"{self.run_id}.files", Path(tempfile.gettempdir())):
            folder = parent / f"staged-{uuid.uuid4().hex[:12]}"
            try:
                folder.mkdir(parents=True)
                return Path(shutil.copyfile(path, folder / path.name))
            except OSError as exc:
                problem = f"file {str(path)!r} not recorded: {exc.strerror or exc}"
        with self._cond:
            self._unstaged.append(problem)
        return None

    # -- the writer thread --------------------------------------------------------------------
    def _write_loop(self) -> None:
        try:
            self._replay_spill()
            while (batch := self._take()) is not None:
                self._deliver(batch)
                self._done_with_batch()
        except BaseException as exc:  # noqa: BLE001 -- a bug here must not cost the records or the run
            with self._cond:
                if self._gave_up is None:
                    self._give_up(f"the MLflow writer failed ({one_line(exc, 200)})")
                self._dump(self._current or ())
        finally:
            with self._cond:
                self._current = None
                self._replaying = False
                self._cond.notify_all()

    def _deliver(self, batch: list[dict], rest: Iterable[str] = ()) -> bool:
        """Write one batch, retrying while the store is away; False once the logger gave up (the
        batch, then `rest` (spill lines not yet replayed), went to the spill file)."""
        started, waits = None, self.policy.waits()
        while True:
            with self._cond:
                if self._gave_up is not None:  # the memory bound was passed meanwhile
                    self._dump(batch, rest)
                    return False
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 -- classified: a refusal drops the batch, with a note
                if not is_transient(exc):
                    with self._cond:
                        self._refused.append(one_line(exc, 300))
                    return True
                if batch[0]["kind"] == "metrics":  # it may have landed: read back before re-sending
                    self._stale.update(key for record in batch for key in record["values"])
                now = time.monotonic()
                if started is None:
                    started = now
                    self._notice(f"run {self.run_id[:8]}: MLflow at {self.tracking_uri} does not answer "
                                 f"({one_line(exc, 200)}); training goes on, its records wait in memory; retrying "
                                 f"for up to {format_duration(self.policy.budget_s)}")
                wait = next(waits)
                with self._cond:
                    if self._gave_up is None and now - started + wait > self.policy.budget_s:
                        self._give_up(f"MLflow at {self.tracking_uri} did not answer for "
                                      f"{format_duration(now - started)} (retry budget "
                                      f"{format_duration(self.policy.budget_s)}, {RETRY_BUDGET_ENV}; "
                                      f"{one_line(exc, 200)})")
                    if self._gave_up is None:
                        self._cond.wait_for(lambda: self._gave_up is not None, timeout=wait)
                    if self._gave_up is not None:
                        self._dump(batch, rest)
                        return False
                continue
            if started is not None:
                self._notice(f"run {self.run_id[:8]}: MLflow answers again after "
                             f"{format_duration(time.monotonic() - started)}; writing what was logged meanwhile")
            return True

    def _send(self, batch: list[dict]) -> None:
        from mlflow.entities import Metric, RunTag

        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        kind = batch[0]["kind"]
        if kind == "tags":
            tags: dict[str, str] = {}
            for record in batch:
                tags.update(record["tags"])
            self._client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        elif kind == "artifact":
            staged = Path(batch[0]["file"])
            if staged.exists():  # else an earlier life uploaded it before its spill was replayed
                self._client.log_artifact(self.run_id, str(staged), batch[0]["artifact_path"])
                shutil.rmtree(staged.parent, ignore_errors=True)
                try:
                    staged.parent.parent.rmdir()  # the run's staging folder, once empty
                except OSError:
                    pass
        elif kind == "status":
            self._client.update_run(self.run_id, status=batch[-1]["status"])
        elif kind == "metrics":
            items = [(key, value, record["timestamp"], record["step"])
                     for record in batch for key, value in record["values"].items()]
            items = self._not_in_store(items)
            for start in range(0, len(items), METRICS_PER_BATCH):
                self._client.log_batch(self.run_id, metrics=[
                    Metric(key, value, timestamp, step) for key, value, timestamp, step
                    in items[start:start + METRICS_PER_BATCH]])
            self._remember(items)

    def _not_in_store(self, items: list[tuple]) -> list[tuple]:
        """`items` less the (key, step) pairs the store already has, for keys that may have any."""
        if self._unchecked is None:
            self._unchecked = set(self._client.get_run(self.run_id).data.metrics)
        for key in {item[0] for item in items} & (self._unchecked | self._stale):
            steps = {metric.step for metric in self._client.get_metric_history(self.run_id, key)}
            self._known[key] = (steps, max(steps, default=-1))
            self._unchecked.discard(key)
            self._stale.discard(key)
        kept = [item for item in items if item[0] not in self._known or item[3] not in self._known[item[0]][0]]
        self.already_written += len(items) - len(kept)
        return kept

    def _remember(self, items: list[tuple]) -> None:
        """Add what was just written to the known steps; forget a key once the loop is past them
        (a loop's steps only grow, so nothing it logs later can collide)."""
        lowest: dict[str, int] = {}
        for key, _, _, step in items:
            if key in self._known:
                lowest[key] = min(step, lowest.get(key, step))
        for key, low in lowest.items():
            steps, largest = self._known[key]
            if not self._replaying and low > largest:
                del self._known[key]
                continue
            steps.update(step for k, _, _, step in items if k == key)
            self._known[key] = (steps, max([largest] + [step for k, _, _, step in items if k == key]))

    @property
    def _replay_path(self) -> Path:
        return self.spill_path.with_name(f"{self.run_id}.replaying.jsonl")

    def _replay_spill(self) -> None:
        """Write what an earlier life of this run spilled, before anything logged now."""
        try:
            self._replay_file()
        finally:
            with self._cond:
                self._replaying = False
                self._cond.notify_all()

    def _replay_file(self) -> None:
        replaying = self._replay_path
        try:
            if self.spill_path.exists():
                if replaying.exists():  # an earlier replay was cut short: keep both, oldest first
                    with open(replaying, "a", encoding="utf-8") as out, open(self.spill_path, encoding="utf-8") as src:
                        shutil.copyfileobj(src, out)
                    self.spill_path.unlink()
                else:
                    self.spill_path.rename(replaying)
            if not replaying.exists():
                return
        except OSError as exc:
            self._notice(f"run {self.run_id[:8]}: cannot replay {self.spill_path} ({exc.strerror or exc})")
            return
        self._notice(f"run {self.run_id[:8]}: writing the records an earlier MLflow outage left in {replaying}")
        with open(replaying, encoding="utf-8") as lines:
            batch: list[dict] = []
            total = 0
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:  # a line cut short when an earlier life was killed
                    continue
                size = len(record.get("values") or record.get("tags") or [0])
                limit = {"metrics": METRICS_PER_BATCH, "tags": TAGS_PER_BATCH}.get(record["kind"], 0)
                if batch and (record["kind"] != batch[0]["kind"] or total + size > limit):
                    if not self._deliver(batch, rest=lines):
                        break
                    batch, total = [], 0
                batch.append(record)
                total += size
            else:
                if batch:
                    self._deliver(batch, rest=lines)
        replaying.unlink(missing_ok=True)  # written, or moved to the spill file with the rest


def _worker_notice(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", flush=True)


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

        self.tracker, self.run_id = tracker, study_run_id
        self.ttl_s, self.beat_s, self.settle_s = ttl_s, beat_s, settle_s
        self.host = socket.gethostname()
        self.holder = f"{self.host} pid {os.getpid()} ({uuid.uuid4().hex[:8]})"
        self._since = time.time()
        self._stop = None

    def _read(self) -> dict | None:
        text = self.tracker.get_run(self.run_id).data.tags.get(names.TAG_DRIVER_LEASE)
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def _write(self) -> None:
        lease = {"holder": self.holder, "host": self.host, "pid": os.getpid(), "since": self._since,
                 "beat": time.time()}
        self.tracker.set_tags(self.run_id, {names.TAG_DRIVER_LEASE: json.dumps(lease)})

    def _holder_died_here(self, lease: dict) -> bool:
        """The lease's driver ran on this machine and its process is gone (SIGKILL, OOM): no need to wait
        for its heartbeat to expire."""
        if lease.get("host") != self.host or not isinstance(lease.get("pid"), int):
            return False
        try:
            os.kill(lease["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False

    def _refuse_if_held(self) -> None:
        lease = self._read()
        if (lease and lease.get("holder") != self.holder and time.time() - float(lease.get("beat", 0)) < self.ttl_s
                and not self._holder_died_here(lease)):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(lease.get("since", 0))))
            raise ConfigError(
                f"study {self.tracker.study!r} is being run by another driver ({lease.get('holder')}, started "
                f"{started}, last seen {time.time() - float(lease['beat']):.0f} s ago); wait for it to finish or "
                f"stop it (a driver that died on another machine frees the study {self.ttl_s:.0f} s after its last "
                f"heartbeat; on this one, at once)")

    def __enter__(self):
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
