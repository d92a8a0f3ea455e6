"""Read a study's MLflow runs into tidy Polars tables, and log the analysis run back.

The only module of `analysis` that talks to MLflow. Three tables come out:

- `runs`: one row per run (training, sweep, trial or observation), its tags and params;
- `metrics`: the tidy table, one row per (run, metric, step) with the run's columns
  repeated, so a single filter/group-by answers most questions;
- `profiles`: the final per-layer condensation profile of every finished run, from its
  `condensation.json` artifact (or, when that is missing, from its per-layer metrics).

Everything is cached as parquet keyed by a fingerprint of the runs' ids, statuses and end
times, so re-running the analysis on an unchanged study skips the metric-history calls.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from scaling import names
from scaling.errors import ConfigError, DataError
from scaling.provenance import resolve_tracking_uri, tracking_uri_problem

KIND_UNKNOWN = "unknown"
_LAYER_METRIC = re.compile(r"^condensation/layer_(\d+)/(mean_cos|mean_cos_offdiag|effective_rank)$")
_PARENT_TAG = "mlflow.parentRunId"
# Older runs carry the optimizer steps and token budget as params only (the report's budget).
_STEPS_PARAM = "steps"
_TOKENS_PARAM = "tokens"

RUN_SCHEMA = {
    "run_id": pl.String,
    "parent_run_id": pl.String,
    "study": pl.String,
    "kind": pl.String,
    "status": pl.String,
    "failure": pl.String,
    "rung": pl.String,
    "n_params": pl.Int64,
    "n_params_non_embedding": pl.Int64,
    "tokens": pl.Int64,
    "steps": pl.Int64,
    "arm": pl.String,
    "seed": pl.Int64,
    "lambda": pl.Float64,
    "layers": pl.String,
    "variant": pl.String,
    "tau": pl.Float64,
    "clamp_threshold": pl.Float64,
    "family": pl.String,
    "model": pl.String,
    "source": pl.String,
    "trial_state": pl.String,
    "best_trial": pl.Boolean,
    "config_hash": pl.String,
    "git_commit": pl.String,
    "init_from": pl.String,
    "init_hash": pl.String,
    "start_time": pl.Int64,
    "end_time": pl.Int64,
}
PROFILE_SCHEMA = {
    "run_id": pl.String,
    "layer": pl.Int64,
    "layer_fraction": pl.Float64,
    "mean_cosine": pl.Float64,
    "mean_cosine_offdiag": pl.Float64,
    "effective_rank": pl.Float64,
    "histogram": pl.List(pl.Float64),
}
PROBE_PROFILE_SCHEMA = {"step": pl.Int64, **PROFILE_SCHEMA}
"""Profiles at every probe step of a training run (its `probes/step_*.json` artifacts)."""
_TIDY_METRIC_SCHEMA = {"run_id": pl.String, "step": pl.Int64, "metric": pl.String, "value": pl.Float64}
ITEM_SCHEMA = {"run_id": pl.String, "step": pl.Int64, "task": pl.String, "leaf": pl.String, "doc_id": pl.Int64,
               "doc_hash": pl.String, "acc": pl.Float64, "acc_norm": pl.Float64}
"""Per-item downstream results (`read_item_results`): one row per run, evaluation step and document."""
_STEP_FOLDER = re.compile(r"^step_(\d+)$")
_CACHE_VERSION = 2


@dataclass(frozen=True)
class StudyRecords:
    """Everything the analysis needs from one study."""

    study: str
    experiment_id: str
    tracking_uri: str
    parent_run_id: str | None
    runs: pl.DataFrame
    metrics: pl.DataFrame
    profiles: pl.DataFrame
    probe_profiles: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=PROBE_PROFILE_SCHEMA))
    """The per-layer profile (and histograms) at every probe step of training runs."""
    from_cache: bool = False
    study_params: dict[str, str] = field(default_factory=dict)
    """The study run's params: the study's settings, flattened (e.g. `eval.selection_tasks`)."""
    study_metrics: dict[str, float] = field(default_factory=dict)
    """The study run's metrics, latest values (e.g. its `time/*` accounting)."""
    study_tags: dict[str, str] = field(default_factory=dict)
    """The study run's tags (a deciding study's looks: `decide/wave_NN`, `analysis.waves.read_course`)."""

    def finished(self, kind: str | None = names.KIND_TRAIN) -> pl.DataFrame:
        """Runs that finished (optionally of one kind): the only ones that enter fits."""
        runs = self.runs.filter(pl.col("status") == names.STATUS_FINISHED)
        return runs if kind is None else runs.filter(pl.col("kind") == kind)

    def failed(self) -> pl.DataFrame:
        return self.runs.filter(pl.col("status") == names.STATUS_FAILED)


# --- tracking URI and study selection ------------------------------------------------------


SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_store_exists(uri: str) -> None:
    # MLflow would silently create an empty database; a missing file is a user error.
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            raise DataError(
                f"--tracking-uri {uri!r}: no MLflow database at {path.resolve()}; run a study first, "
                "or point --tracking-uri / MLFLOW_TRACKING_URI at the store the trainer wrote"
            )
        with open(path, "rb") as handle:
            if path.stat().st_size and handle.read(len(SQLITE_MAGIC)) != SQLITE_MAGIC:
                raise DataError(f"--tracking-uri {uri!r}: {path} is not an MLflow (SQLite) store; point "
                                "--tracking-uri / MLFLOW_TRACKING_URI at the store the trainer wrote")


def _client(uri: str):
    _check_store_exists(uri)
    return _cached_client(uri)


@functools.lru_cache(maxsize=8)
def _cached_client(uri: str):
    # Building a client on SQLite checks the schema (~4 s on 2 busy cores): do it once per URI.
    problem = tracking_uri_problem(uri)  # MLflow's client would retry a dead server for minutes
    if problem:
        remedy = "" if problem.startswith("scheme") else "start the server or "
        raise DataError(f"--tracking-uri {uri!r}: MLflow is unreachable ({problem}); {remedy}fix --tracking-uri / "
                        "MLFLOW_TRACKING_URI")
    from mlflow.tracking import MlflowClient  # deferred: importing mlflow costs ~1 s

    return MlflowClient(uri)


def _study_experiments(client) -> list:
    """Experiments holding a study parent run or any training/observation run, newest first."""
    from mlflow.entities import ViewType

    found = []
    for experiment in client.search_experiments(view_type=ViewType.ACTIVE_ONLY, order_by=["creation_time DESC"]):
        hits = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.{names.TAG_KIND} != '{names.KIND_ANALYSIS}'",  # MLflow has no IN for tags
            max_results=1,
        )
        if hits:
            found.append(experiment)
    return found


def find_experiment(client, study: str | None):
    """The study's experiment: by name, by a run tagged study=NAME, or the newest study."""
    experiments = _study_experiments(client)
    if not experiments:
        raise DataError("the MLflow store holds no study (no run tagged kind=study/train/observe); run a study first or check --tracking-uri")
    if study is None:
        return experiments[0]
    for experiment in experiments:
        if experiment.name == study:
            return experiment
    for experiment in experiments:
        if client.search_runs([experiment.experiment_id], filter_string=f"tags.{names.TAG_STUDY} = '{study}'", max_results=1):
            return experiment
    known = ", ".join(repr(e.name) for e in experiments[:10])
    raise ConfigError(f"--study {study!r}: no such study in this store; known studies (newest first): {known}")


def find_study_name(tracking_uri: str | None, study: str | None) -> str:
    """The study's name as stored (the experiment's name); the newest study when None."""
    return find_experiment(_client(resolve_tracking_uri(tracking_uri)), study).name


# --- runs ---------------------------------------------------------------------------------


def _to_int(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _to_float(value: str | None) -> float | None:
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _status_of(run) -> str:
    tagged = run.data.tags.get(names.TAG_STATUS)
    if tagged:
        return tagged
    return names.STATUS_OF_MLFLOW.get(run.info.status, names.STATUS_RUNNING)


def _run_row(run, study: str) -> dict:
    tags = run.data.tags
    # Another arm's setting on a run without it is recorded "none" (so MLflow draws no made-up value): no value here.
    params = {key: value for key, value in run.data.params.items() if value != names.PARAM_NONE}
    best = tags.get(names.TAG_BEST_TRIAL)
    return {
        "run_id": run.info.run_id,
        "parent_run_id": tags.get(_PARENT_TAG),
        "study": tags.get(names.TAG_STUDY, study),
        "kind": tags.get(names.TAG_KIND, KIND_UNKNOWN),
        "status": _status_of(run),
        "failure": tags.get(names.TAG_FAILURE),
        "rung": tags.get(names.TAG_RUNG),
        "n_params": _to_int(tags.get(names.TAG_N_PARAMS)),
        "n_params_non_embedding": _to_int(tags.get(names.TAG_N_PARAMS_NON_EMBEDDING)),
        "tokens": _to_int(tags.get(names.TAG_TOKENS) or params.get(_TOKENS_PARAM)),
        "steps": _to_int(tags.get(names.TAG_STEPS) or params.get(_STEPS_PARAM)),
        "arm": tags.get(names.TAG_ARM),
        "seed": _to_int(tags.get(names.TAG_SEED)),
        "lambda": _to_float(params.get(names.PARAM_LAMBDA)),
        "layers": params.get(names.PARAM_LAYERS),
        "variant": params.get(names.PARAM_VARIANT),
        "tau": _to_float(params.get(names.PARAM_TAU)),
        "clamp_threshold": _to_float(params.get(names.PARAM_CLAMP)),
        "family": tags.get(names.TAG_FAMILY),
        "model": tags.get(names.TAG_MODEL),
        "source": tags.get(names.TAG_SOURCE),
        "trial_state": tags.get(names.TAG_TRIAL_STATE),
        "best_trial": None if best is None else best.lower() == "true",
        "config_hash": tags.get(names.TAG_CONFIG_HASH),
        "git_commit": tags.get(names.TAG_GIT_COMMIT),
        "init_from": params.get(names.PARAM_INIT_FROM),
        "init_hash": tags.get(names.TAG_INIT_HASH),
        "start_time": run.info.start_time,
        "end_time": run.info.end_time,
    }


def _search_all_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


# --- metrics and profiles ------------------------------------------------------------------


def _metric_rows(client, run) -> list[dict]:
    rows = []
    for key in sorted(run.data.metrics):
        for point in client.get_metric_history(run.info.run_id, key):
            rows.append({"run_id": run.info.run_id, "step": int(point.step), "metric": key, "value": float(point.value)})
    return rows


def _profile_from_artifact(client, run_id: str) -> list[dict] | None:
    available = {entry.path for entry in client.list_artifacts(run_id)}
    if names.ARTIFACT_CONDENSATION_JSON not in available:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, names.ARTIFACT_CONDENSATION_JSON, tmp)
        record = json.loads(Path(path).read_text())
    return _profile_rows(run_id, record)


def _probe_profiles(client, run_id: str) -> list[dict]:
    """Rows of PROBE_PROFILE_SCHEMA from a training run's probes/step_*.json artifacts (none: [])."""
    entries = [e.path for e in client.list_artifacts(run_id, names.ARTIFACT_PROBES_DIR) if e.path.endswith(".json")]
    if not entries:
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, names.ARTIFACT_PROBES_DIR, tmp))
        for path in sorted(folder.glob("step_*.json")):
            record = json.loads(path.read_text())
            step = int(record.get("step", path.stem.removeprefix("step_")))
            rows += [{"step": step, **row} for row in _profile_rows(run_id, record)]
    return rows


def _profile_rows(run_id: str, record: dict) -> list[dict]:
    layers = record.get("layers") or []
    last = max((entry["layer"] for entry in layers), default=0) or 1
    return [
        {
            "run_id": run_id,
            "layer": int(entry["layer"]),
            "layer_fraction": float(entry.get("layer_fraction", entry["layer"] / last)),
            "mean_cosine": _to_float(entry.get("mean_cosine")),
            "mean_cosine_offdiag": _to_float(entry.get("mean_cosine_offdiag")),
            "effective_rank": _to_float(entry.get("effective_rank")),
            "histogram": [float(v) for v in entry["histogram"]] if entry.get("histogram") else None,
        }
        for entry in layers
    ]


def _profile_from_metrics(run_id: str, final_metrics: dict[str, float]) -> list[dict]:
    """Fallback without the artifact: per-layer final metrics, no histograms."""
    by_layer: dict[int, dict] = {}
    for key, value in final_metrics.items():
        match = _LAYER_METRIC.match(key)
        if match:
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = float(value)
    if not by_layer:
        return []
    last = max(by_layer) or 1
    return [
        {
            "run_id": run_id,
            "layer": layer,
            "layer_fraction": layer / last,
            "mean_cosine": stats.get("mean_cos"),
            "mean_cosine_offdiag": stats.get("mean_cos_offdiag"),
            "effective_rank": stats.get("effective_rank"),
            "histogram": None,
        }
        for layer, stats in sorted(by_layer.items())
    ]


# --- cache ----------------------------------------------------------------------------------


def _fingerprint(experiment_id: str, runs: list) -> str:
    digest = hashlib.sha256(f"v{_CACHE_VERSION}:{experiment_id}".encode())
    for run in sorted(runs, key=lambda r: r.info.run_id):
        digest.update(f"{run.info.run_id}:{_status_of(run)}:{run.info.status}:{run.info.end_time}:{len(run.data.metrics)}".encode())
    return digest.hexdigest()[:16]


_CACHED_TABLES = ("metrics", "profiles", "probe_profiles")


def _read_cache(cache_dir: Path, fingerprint: str) -> tuple[pl.DataFrame, ...] | None:
    stamp = cache_dir / "fingerprint.txt"
    if not stamp.exists() or stamp.read_text().strip() != fingerprint:
        return None
    try:
        return tuple(pl.read_parquet(cache_dir / f"{name}.parquet") for name in _CACHED_TABLES)
    except (OSError, pl.exceptions.PolarsError):
        return None  # a damaged cache is rebuilt, never trusted


def _write_cache(cache_dir: Path, fingerprint: str, *tables: pl.DataFrame) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, table in zip(_CACHED_TABLES, tables):
        table.write_parquet(cache_dir / f"{name}.parquet")
    (cache_dir / "fingerprint.txt").write_text(fingerprint + "\n")


# --- public -------------------------------------------------------------------------------------


def read_study(tracking_uri: str | None = None, study: str | None = None, *, cache_dir: Path | None = None) -> StudyRecords:
    """Load one study (default: the newest) into `StudyRecords`.

    Analysis runs (kind=analysis) and the study's parent run are not data; the parent's id
    is kept for provenance. Histories and profiles are cached in `cache_dir` when given.
    """
    uri = resolve_tracking_uri(tracking_uri)
    client = _client(uri)
    experiment = find_experiment(client, study)
    all_runs = _search_all_runs(client, experiment.experiment_id)
    parents = [r for r in all_runs if r.data.tags.get(names.TAG_KIND) == names.KIND_STUDY]
    data_runs = [r for r in all_runs if r.data.tags.get(names.TAG_KIND) not in (names.KIND_STUDY, names.KIND_ANALYSIS)]
    study_name = parents[0].data.tags.get(names.TAG_STUDY, experiment.name) if parents else experiment.name
    runs = pl.DataFrame([_run_row(r, study_name) for r in data_runs], schema=RUN_SCHEMA, orient="row") if data_runs else pl.DataFrame(schema=RUN_SCHEMA)

    fingerprint = _fingerprint(experiment.experiment_id, data_runs)
    cached = _read_cache(cache_dir, fingerprint) if cache_dir is not None else None
    if cached is not None:
        raw_metrics, profiles, probe_profiles = cached
    else:
        metric_rows, profile_rows, probe_rows = [], [], []
        for run in data_runs:
            metric_rows.extend(_metric_rows(client, run))
            if _status_of(run) == names.STATUS_FINISHED:
                profile = _profile_from_artifact(client, run.info.run_id)
                profile_rows.extend(profile if profile is not None else _profile_from_metrics(run.info.run_id, run.data.metrics))
                if run.data.tags.get(names.TAG_KIND) == names.KIND_TRAIN:
                    probe_rows.extend(_probe_profiles(client, run.info.run_id))
        raw_metrics = pl.DataFrame(metric_rows, schema=_TIDY_METRIC_SCHEMA, orient="row") if metric_rows else pl.DataFrame(schema=_TIDY_METRIC_SCHEMA)
        profiles = pl.DataFrame(profile_rows, schema=PROFILE_SCHEMA, orient="row") if profile_rows else pl.DataFrame(schema=PROFILE_SCHEMA)
        probe_profiles = pl.DataFrame(probe_rows, schema=PROBE_PROFILE_SCHEMA, orient="row") if probe_rows else pl.DataFrame(schema=PROBE_PROFILE_SCHEMA)
        if cache_dir is not None:
            _write_cache(cache_dir, fingerprint, raw_metrics, profiles, probe_profiles)
    metrics = raw_metrics.join(runs, on="run_id", how="left").sort("run_id", "metric", "step")
    return StudyRecords(
        study=study_name,
        experiment_id=experiment.experiment_id,
        tracking_uri=uri,
        parent_run_id=parents[0].info.run_id if parents else None,
        runs=runs,
        metrics=metrics,
        profiles=profiles,
        probe_profiles=probe_profiles,
        from_cache=cached is not None,
        study_params=dict(parents[0].data.params) if parents else {},
        study_metrics=dict(parents[0].data.metrics) if parents else {},
        study_tags=dict(parents[0].data.tags) if parents else {},
    )


def _item_rows(client, run_id: str) -> list[dict]:
    """Rows of ITEM_SCHEMA from a run's eval/samples/step_*/<task>.jsonl artifacts (none: [])."""
    steps = [e.path for e in client.list_artifacts(run_id, names.EVAL_SAMPLES_DIR) if e.is_dir]
    if not steps:
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(client.download_artifacts(run_id, names.EVAL_SAMPLES_DIR, tmp))
        for step_dir in sorted(folder.iterdir()):
            match = _STEP_FOLDER.match(step_dir.name)
            if not match:
                continue
            for path in sorted(step_dir.glob("*.jsonl")):
                for line in path.read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    rows.append({"run_id": run_id, "step": int(match.group(1)), "task": path.stem,
                                 "leaf": record.get("task", path.stem), "doc_id": int(record["doc_id"]),
                                 "doc_hash": record.get("doc_hash"), "acc": _to_float(record.get("acc")),
                                 "acc_norm": _to_float(record.get("acc_norm"))})
    return rows


def read_item_results(records: StudyRecords, run_ids: list[str] | None = None) -> pl.DataFrame:
    """Per-document downstream results of a study's runs (default: its finished training runs), from the
    `eval/samples` artifacts the trainer logs with `eval.log_samples`: ITEM_SCHEMA columns plus the runs'
    rung, n_params, arm and seed. `task` is the configured task (the artifact's name), `leaf` the lm-eval
    task inside it (a group's subtask); acc/acc_norm are 1.0 (correct) or 0.0. Empty when nothing was logged.
    Downloads every run's files: read it once per analysis."""
    client = _client(records.tracking_uri)
    ids = records.finished()["run_id"].to_list() if run_ids is None else list(run_ids)
    rows = [row for run_id in ids for row in _item_rows(client, run_id)]
    items = pl.DataFrame(rows, schema=ITEM_SCHEMA, orient="row") if rows else pl.DataFrame(schema=ITEM_SCHEMA)
    info = records.runs.select("run_id", "rung", "n_params", "arm", "seed")
    return items.join(info, on="run_id", how="left")


def compute_final_values(metrics: pl.DataFrame) -> pl.DataFrame:
    """One row per (run, metric): the value at the run's last logged step of that metric."""
    return (
        metrics.sort("step")
        .group_by("run_id", "metric", maintain_order=True)
        .agg(pl.col("value").last(), pl.col("step").last())
        .join(metrics.select(pl.exclude("step", "metric", "value")).unique("run_id"), on="run_id", how="left")
    )


def scan_tidy(path: str | Path) -> pl.LazyFrame:
    """Lazy view of a tidy parquet written by the analysis (for large sweeps)."""
    return pl.scan_parquet(path)


def claim_records(claims) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of an analysis run's claims: `claims` are (key, estimate, low, high, verdict); each gives
    metrics `claim/<key>/estimate`, `claim/<key>/low`, `claim/<key>/high` (a None or non-finite number is left
    out) and tag `claim/<key>/verdict`, so MLflow's runs table compares the findings of studies side by side."""
    import math

    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for key, estimate, low, high, verdict in claims:
        safe = re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(key))  # MLflow keys allow these (and "/")
        for part, value in (("estimate", estimate), ("low", low), ("high", high)):
            if value is not None and math.isfinite(float(value)):
                metrics[f"claim/{safe}/{part}"] = float(value)
        if verdict is not None:
            tags[f"claim/{safe}/verdict"] = str(verdict)
    return metrics, tags


def log_analysis_run(records: StudyRecords, out_dir: Path, files: list[Path], *, params: dict[str, str],
                     tags: dict[str, str], claims=()) -> str:
    """A kind=analysis run in the study's experiment (nested under the study run) holding
    `files` (paths under `out_dir`, kept relative) and the findings: `claims`, an iterable of
    (key, estimate, low, high, verdict), as metrics and tags (`claim_records`); returns its run id."""
    client = _client(records.tracking_uri)
    claim_metrics, claim_tags = claim_records(claims)
    run_tags = {names.TAG_KIND: names.KIND_ANALYSIS, names.TAG_STUDY: records.study, **tags, **claim_tags}
    if records.parent_run_id:
        run_tags[_PARENT_TAG] = records.parent_run_id
    run = client.create_run(records.experiment_id, tags=run_tags, run_name=f"analysis-{records.study}")
    import time

    from mlflow.entities import Metric, Param

    try:
        client.log_batch(run.info.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        now = int(time.time() * 1000)
        client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in claim_metrics.items()])
        # One upload of a staged copy: each log_artifact call builds its own client (~0.3 s).
        with tempfile.TemporaryDirectory() as staging:
            for path in files:
                target = Path(staging) / path.relative_to(out_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
            client.log_artifacts(run.info.run_id, staging)
    except Exception:
        client.set_terminated(run.info.run_id, names.MLFLOW_FAILED)
        raise
    client.set_terminated(run.info.run_id, names.MLFLOW_FINISHED)
    return run.info.run_id
