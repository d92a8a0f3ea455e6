"""Observation studies: condensation of pretrained model families, one Ray task per (model, source).

The study file (`kind: observe`, `scaling.observe_config`) lists families of causal LMs (hub
names or local folders), text sources, R (repetitions) and T (max_length), and how to place a
model by its size. The driver reads each model's config (parameters are counted on the meta
device, so nothing is downloaded but the config), sizes a Ray task to it, and each task runs
the measurement `python -m scaling.condense` runs (`scaling.measure`), reduced on a pool of
actors or in the task. Results come back to the driver, which alone writes MLflow.

A measurement is identified by the hash of model + source + R + T + dtype: a finished one is
skipped on re-runs; a failed one (missing weights, bad path, out of memory, a model too large
for any node of the cluster) is recorded as failed with a one-line reason and retried on the
next run, while the rest go on.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaling import names
from scaling.config import redact_credentials
from scaling.console import say
from scaling.errors import DataError, DispersionScalingError, ModelError, one_line
from scaling.measure import Measurement, MeasureTask, measure_model
from scaling.observe_config import (ClusterShape, ModelPlan, ObserveConfig, compute_placement, measurement_hash,
                                    pick_dtype)


# --- planning: size each model -------------------------------------------------------------------


def count_parameters_from_config(path: str) -> int:
    """Parameters of a causal LM from its config alone: the model is built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    local = Path(path)
    if path.startswith(("/", ".", "~")) and not (local / "config.json").is_file():
        raise ModelError(f"model path {path!r} has no config.json (missing or not saved with save_pretrained); "
                         "fix the path in families[].models")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 -- hub/network/format errors all mean "cannot read the config"
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"cannot read the config of {path!r}: {type(exc).__name__}: {first[:200]}. "
                         "Check the name, or run where the hub (or a local cache) is reachable") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def plan_models(study: ObserveConfig, cluster: ClusterShape) -> list[ModelPlan]:
    """Every model of the study, with its parameter count and placement, or the reason it cannot run.

    With `family_dtype: uniform` a family is measured in the dtype its largest model needs."""
    plans = []
    for family in study.families:
        counted = []
        for entry in family.models:
            path = study.resolve_model(entry.name)
            try:
                counted.append((entry, path, int(entry.params) if entry.params else count_parameters_from_config(path)))
            except DispersionScalingError as exc:
                plans.append(ModelPlan(family.name, entry, path, None, None, problem=str(exc)))
        largest = max((n for _, _, n in counted), default=0)
        for entry, path, n_params in counted:
            dtype = entry.dtype or pick_dtype(study, largest if study.family_dtype == "uniform" else n_params)
            placement = compute_placement(n_params, dtype, study.resources, cluster)
            plans.append(ModelPlan(family.name, entry, path, n_params, placement, problem=placement.unsupported))
    return plans


def family_dtype_switches(plans: list[ModelPlan]) -> dict[str, list[str]]:
    """Families measured in more than one dtype (a size trend across them is confounded)."""
    dtypes: dict[str, list[str]] = {}
    for plan in plans:
        if plan.placement is not None and plan.placement.dtype not in dtypes.setdefault(plan.family, []):
            dtypes[plan.family].append(plan.placement.dtype)
    return {family: found for family, found in dtypes.items() if len(found) > 1}


def read_cluster_shape() -> ClusterShape:
    """The largest node of the connected cluster, for sizing."""
    from scaling.cluster import read_largest_node

    return ClusterShape(*read_largest_node())


# --- one measurement (inside a Ray task) ----------------------------------------------------------


def _measure_entry(task: MeasureTask, texts: list[str]) -> Measurement | dict[str, str]:
    # Module-level so Ray pickles a reference; user errors come back as plain data so the
    # driver records their message rather than a Ray traceback.
    try:
        return measure_model(task, texts)
    except DispersionScalingError as exc:
        return {"error": str(exc)}


# --- the driver ------------------------------------------------------------------------------------------


@dataclass
class ObserveOutcome:
    family: str
    model: str
    source: str
    status: str  # finished / failed / skipped
    run_id: str
    n_params: int | None = None
    spearman: float | None = None
    seconds: float = 0.0
    detail: str = ""


def source_label(spec: str) -> str:
    from scaling.data import parse_text_source

    try:
        return parse_text_source(spec).label
    except DataError:
        return Path(spec).stem if spec.endswith((".txt", ".jsonl")) else spec


def run_observation_study(study: ObserveConfig, study_source: str, *, progress=say) -> list[ObserveOutcome]:
    """Measure every (model, source), skipping finished ones; failures are recorded, never fatal."""
    import ray

    from scaling.data import read_measurement_texts
    from scaling.provenance import resolve_tracking_uri
    from scaling.tracking import Tracker

    tracker = Tracker(resolve_tracking_uri(study.tracking_uri), study.study)
    parent_id = tracker.study_run_id({"kind": names.KIND_OBSERVE, "repetitions": study.repetitions,
                                      "max_length": study.max_length}, redact_credentials(study_source))
    plans = plan_models(study, read_cluster_shape())
    family_dtypes = family_dtype_switches(plans)
    for family, dtypes in family_dtypes.items():
        progress(f"warning: family {family} is measured in {' and '.join(dtypes)} (recorded in tag "
                 f"{names.TAG_FAMILY_DTYPES}): the dtype switch confounds its size trend")
    texts_by_source: dict[str, Any] = {}
    outcomes: list[ObserveOutcome] = []
    pending: dict[Any, tuple] = {}
    remote = ray.remote(_measure_entry)

    def finish(job, reply=None, failure=None):
        plan, spec, run_id, started = job
        label = source_label(spec)
        seconds = time.perf_counter() - started
        if failure is None and isinstance(reply, dict):
            failure = reply["error"]
        if failure is not None:
            tracker.finish(run_id, names.STATUS_FAILED, failure)
            progress(f"{plan.label} / {label}: FAILED: {failure}")
            outcomes.append(ObserveOutcome(plan.family, plan.label, label, names.STATUS_FAILED, run_id,
                                           plan.n_params, seconds=seconds, detail=failure))
            return
        record_measurement(tracker, run_id, study, plan, spec, reply)
        tracker.finish(run_id, names.STATUS_FINISHED)
        progress(f"{plan.label} / {label}: spearman {reply.result.spearman:+.3f} ({seconds:.1f} s)")
        outcomes.append(ObserveOutcome(plan.family, plan.label, label, names.STATUS_FINISHED, run_id,
                                       reply.num_params, reply.result.spearman, seconds))

    def drain(limit: int):
        while len(pending) > limit:
            done, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(done[0])
            try:
                finish(job, reply=ray.get(done[0]))
            except Exception as exc:  # noqa: BLE001 -- a worker crash, Ray OOM kill: recorded, the rest go on
                finish(job, failure=one_line(exc))

    for spec in study.sources:
        resolved = study.resolve_source(spec)
        label = source_label(resolved)
        try:
            texts, _ = read_measurement_texts(resolved, study.repetitions)
            texts_by_source[spec] = ray.put(texts)
        except DispersionScalingError as exc:
            texts_by_source[spec] = exc
        for plan in plans:
            dtype = plan.placement.dtype if plan.placement else (plan.entry.dtype or "auto")
            digest = measurement_hash(plan.path, resolved, study.repetitions, study.max_length, dtype)
            tags = {names.TAG_FAMILY: plan.family, names.TAG_MODEL: plan.label, names.TAG_SOURCE: label,
                    names.TAG_FAMILY_DTYPES: ",".join(family_dtypes.get(plan.family, [dtype]))}
            if plan.n_params is not None:
                tags[names.TAG_N_PARAMS] = plan.n_params
            params = {"model.path": plan.path, "source.spec": resolved, "repetitions": study.repetitions,
                      "max_length": study.max_length, "dtype": dtype,
                      "device": plan.placement.device if plan.placement else "",
                      "num_gpus": plan.placement.num_gpus if plan.placement else 0,
                      "num_actors": study.resources.num_actors}
            run_id, status = tracker.child_run(parent_id, f"{plan.label}__{label}", digest, tags, params,
                                               kind=names.KIND_OBSERVE)
            if status == names.STATUS_FINISHED:
                progress(f"{plan.label} / {label}: already measured (run {run_id[:8]}), skipped")
                outcomes.append(ObserveOutcome(plan.family, plan.label, label, names.STATUS_SKIPPED, run_id,
                                               plan.n_params))
                continue
            tracker.reopen(run_id)
            job = (plan, resolved, run_id, time.perf_counter())
            texts_ref = texts_by_source[spec]
            if plan.problem is not None or isinstance(texts_ref, Exception):
                finish(job, failure=plan.problem or str(texts_ref))
                continue
            task = MeasureTask(
                model_path=plan.path,
                tokenizer=study.resolve_model(plan.entry.tokenizer) if plan.entry.tokenizer else None,
                device=plan.placement.device, dtype=plan.placement.dtype, max_length=study.max_length,
                device_map=plan.placement.device_map, num_actors=study.resources.num_actors,
                actor_cpus=study.resources.actor_cpus, effective_rank=study.effective_rank)
            options = {"num_cpus": study.resources.cpus_per_task, "num_gpus": plan.placement.num_gpus, "max_retries": 0}
            if plan.placement.device == "cpu":
                options["memory"] = int(plan.placement.memory_gb * 1e9)
            progress(f"{plan.label} / {label}: {plan.n_params:,} params, {plan.placement.dtype} on "
                     f"{plan.placement.device}" + (f" x{plan.placement.num_gpus:g} GPU" if plan.placement.num_gpus else ""))
            pending[remote.options(**options).remote(task, texts_ref)] = job
            drain(study.resources.max_concurrent - 1)
    drain(0)
    tracker.end_study(parent_id, failed=any(o.status == names.STATUS_FAILED for o in outcomes))
    return outcomes


def record_measurement(tracker, run_id: str, study: ObserveConfig, plan: ModelPlan, spec: str,
                       measurement: Measurement) -> None:
    """Per-layer and summary metrics, condensation.json and heatmap.png of one finished measurement."""
    from scaling.plots import write_condensation_record

    result = measurement.result
    metadata = {"model": plan.path, "family": plan.family, "repetitions": study.repetitions,
                "max_length": study.max_length, "source": {"spec": spec, "label": source_label(spec)},
                **measurement.metadata()}
    title = f"{plan.label} on {source_label(spec)} (R={result.num_sequences}, T={result.max_length})"
    with tempfile.TemporaryDirectory() as tmp:
        files = write_condensation_record(result, tmp, title=title, metadata=metadata, last_n=study.last_n)
        tracker.log_observation(run_id, result.to_metrics(), list(files),
                                {names.TAG_N_PARAMS: measurement.num_params, names.TAG_DTYPE: measurement.dtype,
                                 names.TAG_DEVICE: measurement.device,
                                 names.TAG_HIDDEN_STATES_END: measurement.hidden_states_end})


def format_plan(study: ObserveConfig, plans: list[ModelPlan]) -> str:
    """The dry-run table: one line per model with its size, dtype and placement (or problem)."""
    header = f"{'family':<10} {'model':<28} {'params':>14} {'dtype':<9} {'placement':<16} problem"
    lines = [header, "-" * len(header)]
    for plan in plans:
        p = plan.placement
        where = "-" if p is None else (f"{p.device} x{p.num_gpus:g} GPU" if p.num_gpus else p.device)
        params = f"{plan.n_params:,}" if plan.n_params is not None else "?"
        lines.append(f"{plan.family:<10} {plan.label[:28]:<28} {params:>14} {(p.dtype if p else '-'):<9} "
                     f"{where:<16} {plan.problem or ''}")
    lines.append(f"{len(plans)} models x {len(study.sources)} sources = {len(plans) * len(study.sources)} "
                 f"measurements, R={study.repetitions}, T={study.max_length}")
    if any(p.placement is not None and p.placement.num_gpus for p in plans):
        lines.append("placement: 'x0.25 GPU' = a quarter of one GPU (Ray fractional GPUs: four such measurements "
                     "share a GPU); 'x2 GPU' = two whole GPUs of one node, the model spread with device_map='auto'")
    for family, dtypes in family_dtype_switches(plans).items():
        lines.append(f"warning: family {family} is measured in {' and '.join(dtypes)}: the dtype switch confounds "
                     "its size trend; use family_dtype: uniform (the default) or say so when reporting it")
    return "\n".join(lines)


def format_outcomes(outcomes: list[ObserveOutcome]) -> str:
    header = f"{'family':<10} {'model':<28} {'source':<12} {'status':<9} {'spearman':>9} {'time':>7}"
    lines = [header, "-" * len(header)]
    for o in outcomes:
        rho = f"{o.spearman:+.3f}" if o.spearman is not None and math.isfinite(o.spearman) else "-"
        lines.append(f"{o.family:<10} {o.model[:28]:<28} {o.source[:12]:<12} {o.status:<9} {rho:>9} {o.seconds:>6.0f}s"
                     + (f"  {o.detail}" if o.detail else ""))
    return "\n".join(lines)


def dry_run_observe(study: ObserveConfig) -> None:
    """Print the plan without a cluster: assume GPU nodes as large as allowed when GPUs are asked for."""
    gpus = study.resources.max_gpus_per_model if study.resources.device != "cpu" else 0
    print(format_plan(study, plan_models(study, ClusterShape(max_gpus_per_node=gpus))))
    print(f"(dry run: cluster not inspected; placement assumes nodes with {gpus} GPUs of "
          f"{study.resources.gpu_memory_gb:g} GB)")


# --- tiny offline models for the demo and the tests --------------------------------------------------------

TINY_SHAPES = {"tiny-2L": (2, 16), "tiny-3L": (3, 32), "tiny-4L": (4, 64)}
"""name -> (n_layers, d_model) of the tiny GPT-2 family of `observe_tiny.yaml`."""
SHORT_TEXTS_FILE = "short_texts.txt"


def build_tiny_models(directory: str | Path, tokenizer=None, *, n_positions: int = 128) -> Path:
    """Save the tiny GPT-2 family (random init, seeded) and a .txt of short documents under
    `directory`. Without `tokenizer`, a byte-level BPE (vocab 1024) is trained on the bundled text."""
    from scaling.data import build_tokenizer, parse_text_source, read_rows
    from scaling.model import save_tiny_gpt2

    directory = Path(directory)
    rows = read_rows(parse_text_source("bundled"))
    tokenizer = tokenizer or build_tokenizer(None, rows=rows, vocab_size=1024)
    for seed, (name, (n_layers, d_model)) in enumerate(TINY_SHAPES.items()):
        save_tiny_gpt2(directory / name, tokenizer, n_layer=n_layers, n_embd=d_model, n_head=2,
                       n_positions=n_positions, seed=seed)
    # Short documents (a few to a few dozen words): they tokenize shorter than max_length.
    lines = [" ".join(row.split()[: 5 + 7 * (i % 6)]) for i, row in enumerate(rows[:400:10])]
    (directory / SHORT_TEXTS_FILE).write_text("\n".join(line for line in lines if line) + "\n", encoding="utf-8")
    return directory


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--build-tiny-models":
        print(f"wrote {build_tiny_models(sys.argv[2])}")
        sys.exit(0)
    print("usage: python -m scaling.observe --build-tiny-models DIR", file=sys.stderr)
    sys.exit(2)
