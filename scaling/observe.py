"""Observation studies: condensation of pretrained model families, one Ray task per (model, source).

A study file with `kind: observe` lists families of causal LMs (hub names or local folders),
text sources, R (repetitions) and T (max_length), and how to place a model by its size
(`sizing`: dtype per parameter count; `resources`: GPU memory, CPUs, reducer actors). The
driver reads each model's config (parameters are counted on the meta device, so nothing is
downloaded but the config), sizes a Ray task to it, and each task loads the model and
measures with the actor-sharded reduction (`scaling.actors`), or in-process when
`resources.num_actors: 0`. Results come back to the driver, which alone writes MLflow
(through `scaling.tracking`).

A measurement is identified by the hash of model + source + R + T + dtype: a finished one is
skipped on re-runs; a failed one (missing weights, bad path, out of memory, a model too large
for any node of the cluster) is recorded as failed with a one-line reason and retried on the
next run, while the rest go on.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from scaling import names
from scaling.config import _as_list, _build, _to_plain, config_hash, read_study_mapping
from scaling.errors import ConfigError, DataError, DispersionScalingError, ModelError

LOG_PREFIX = "[observe]"
DTYPE_BYTES = {"auto": 4, "float32": 4, "bfloat16": 2, "float16": 2}
KIND_KEY = "kind"
GPU_SHARE_STEP = 0.25  # small models share a GPU in quarters (Ray fractional GPUs)


# --- the study file ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """One model of a family."""

    name: str
    """Hub name (`gpt2`, `Qwen/Qwen3-0.6B`) or local folder; `./x` is relative to the study's base_dir."""
    tokenizer: str | None = None
    """Tokenizer name/folder; null: the model's own."""
    dtype: str | None = None
    """Overrides the dtype the sizing rules pick (auto, float32, bfloat16, float16)."""
    params: float | None = None
    """Approximate parameter count for sizing; skips reading the config on the driver (which
    needs the hub). The recorded n_params is always counted from the loaded model."""

    def __post_init__(self):
        if self.params is not None and not self.params > 0:
            raise ConfigError(f"model {self.name!r}: params={self.params}: must be > 0 or null")
        if not self.name or not self.name.strip():
            raise ConfigError("families[].models: a model entry has an empty name; give a hub name or a folder")
        if self.dtype is not None and self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"model {self.name!r}: dtype={self.dtype!r}; use one of {sorted(DTYPE_BYTES)}")


@dataclass(frozen=True)
class FamilyConfig:
    """Models compared with each other by size (one line per source in the family's plot)."""

    name: str
    """Family tag, e.g. gpt2, qwen3."""
    models: tuple[ModelEntry, ...]
    """The family's models (any order; the analysis sorts them by parameter count)."""

    def __post_init__(self):
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ConfigError(f"families[].name={self.name!r}: use letters, digits, '-', '_', '.'")
        if not self.models:
            raise ConfigError(f"families.{self.name}.models is empty; list at least one model")
        listed = [m.name for m in self.models]
        if len(set(listed)) != len(listed):
            raise ConfigError(f"families.{self.name}.models lists a model twice: {listed}")


@dataclass(frozen=True)
class SizeRule:
    """The dtype for models up to `max_params` parameters (the first matching rule applies)."""

    max_params: float | None = None
    """Upper bound on the parameter count; null: no bound (put it last)."""
    dtype: str = "auto"
    """auto (= float32, as the reference measured), float32, bfloat16 or float16 (GPU only)."""

    def __post_init__(self):
        if self.max_params is not None and not self.max_params > 0:
            raise ConfigError(f"sizing[].max_params={self.max_params}: must be > 0 or null")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(f"sizing[].dtype={self.dtype!r}: use one of {sorted(DTYPE_BYTES)}")


@dataclass(frozen=True)
class ObserveResources:
    """How a measurement task is placed on the cluster."""

    device: str = "auto"
    """auto (GPU when the cluster has one, else CPU), cpu or cuda."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU of the cluster (H100: 80)."""
    memory_overhead: float = 1.2
    """Weights x this = memory a loaded model needs (CUDA context, buffers)."""
    activation_gb: float = 2.0
    """Extra memory for one sequence's activations and hidden states."""
    cpus_per_task: float = 1.0
    """CPUs of each measurement task (tokenizing, moving hidden states)."""
    num_actors: int = 2
    """Reducer actors per measurement (`scaling.actors`); 0: reduce in the task itself."""
    actor_cpus: float = 1.0
    """CPUs of each reducer actor."""
    max_concurrent: int = 4
    """Measurements running at once."""
    max_gpus_per_model: int = 8
    """A model needing more GPUs than this (or than any node has) is reported unsupported."""

    def __post_init__(self):
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"resources.device={self.device!r}: use auto, cpu or cuda")
        for key in ("gpu_memory_gb", "memory_overhead", "cpus_per_task", "actor_cpus"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"resources.{key}={getattr(self, key)}: must be > 0")
        if self.activation_gb < 0 or self.num_actors < 0:
            raise ConfigError(f"resources: activation_gb={self.activation_gb} and num_actors={self.num_actors} "
                              "must be >= 0")
        if self.max_concurrent < 1 or self.max_gpus_per_model < 1:
            raise ConfigError(f"resources: max_concurrent={self.max_concurrent} and max_gpus_per_model="
                              f"{self.max_gpus_per_model} must be >= 1")


@dataclass(frozen=True)
class ObserveConfig:
    """A whole observation study. Load with `load_observe_study`."""

    study: str
    """Study name: the MLflow experiment."""
    families: tuple[FamilyConfig, ...]
    sources: tuple[str, ...]
    """Text sources: bundled, wikitext, pubmed_qa, imdb, squad, hf:NAME[/CONFIG]:SPLIT:FIELD, or a .txt/.jsonl file."""
    kind: str = names.KIND_OBSERVE
    """Always `observe` (what tells `scaling/run.py` this is not a training study)."""
    repetitions: int = 100
    """Texts per measurement (R; the reference uses 100)."""
    max_length: int = 512
    """Tokens per text (T; the reference uses 512); shorter texts are measured at their length."""
    last_n: int = 4
    """condensation.json also reports the mean cosine of the last N hidden states."""
    effective_rank: bool = True
    """Also compute RankMe per layer (an eigen-decomposition per layer and text)."""
    sizing: tuple[SizeRule, ...] = (SizeRule(max_params=3e9, dtype="float32"), SizeRule(dtype="bfloat16"))
    """dtype by parameter count; the first rule with N <= max_params applies."""
    resources: ObserveResources = field(default_factory=ObserveResources)
    base_dir: str = "."
    """Folder that `./` model paths and relative text files are resolved against ($VARS expanded)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""

    def __post_init__(self):
        if not self.study or not all(c.isalnum() or c in "-_." for c in self.study):
            raise ConfigError(f"study={self.study!r}: use a non-empty name of letters, digits, '-', '_', '.'")
        if self.kind != names.KIND_OBSERVE:
            raise ConfigError(f"kind={self.kind!r}: an observation study has kind: {names.KIND_OBSERVE}")
        if not self.families:
            raise ConfigError("families is empty; list at least one family with its models")
        family_names = [f.name for f in self.families]
        if len(set(family_names)) != len(family_names):
            raise ConfigError(f"families: {family_names} lists a family twice")
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"sources={list(self.sources)}: give one or more distinct text sources")
        if self.repetitions < 1 or self.max_length < 1 or self.last_n < 1:
            raise ConfigError(f"repetitions={self.repetitions}, max_length={self.max_length} and "
                              f"last_n={self.last_n} must all be >= 1")
        if not self.sizing:
            raise ConfigError("sizing is empty; give at least one rule, e.g. [{max_params: null, dtype: auto}]")
        bounds = [r.max_params for r in self.sizing]
        if None in bounds[:-1]:
            raise ConfigError("sizing: only the last rule may have max_params: null (it catches every size)")
        finite = [b for b in bounds if b is not None]
        if finite != sorted(finite):
            raise ConfigError(f"sizing: max_params must increase from rule to rule, got {bounds}")

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def resolve_base(self) -> Path:
        return Path(os.path.expandvars(self.base_dir)).expanduser()

    def resolve_model(self, name: str) -> str:
        """`./x` and `../x` against base_dir (made absolute); anything else as written."""
        if name.startswith(("./", "../")):
            return str((self.resolve_base() / name).resolve())
        return str(Path(name).expanduser()) if name.startswith("~") else name

    def resolve_source(self, spec: str) -> str:
        """Relative .txt/.jsonl files against base_dir; names and hf: specs as written."""
        if spec.endswith((".txt", ".jsonl")) and not Path(spec).is_absolute():
            return str((self.resolve_base() / spec).resolve())
        return spec


def read_study_kind(path: str | Path) -> str:
    """The top-level `kind` of a study file (`train` when absent: training studies are the default)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "train"  # let the strict loader report the problem
    kind = raw.get(KIND_KEY, "train") if isinstance(raw, dict) else "train"
    return str(kind)


def load_observe_study(path: str | Path, overrides: Sequence[str] = ()) -> ObserveConfig:
    """Read an observation study YAML, apply `key=value` overrides, validate everything."""
    return observe_study_from_dict(read_study_mapping(path, overrides, example="search_spaces/observe_tiny.yaml"))


def observe_study_from_dict(raw: dict[str, Any]) -> ObserveConfig:
    raw = dict(raw)
    if "families" in raw:
        raw["families"] = [_family_entry(f) for f in _as_list(raw["families"], "families")]
    return _build(ObserveConfig, raw, "")


def _family_entry(entry: Any) -> dict[str, Any]:
    """A family is `{name: gpt2, models: [gpt2, {name: gpt2-xl, dtype: bfloat16}]}`."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"families: entry {entry!r} needs a name and models, e.g. {{name: gpt2, models: [gpt2, gpt2-medium]}}")
    entry = dict(entry)
    if "models" in entry:
        entry["models"] = [{"name": m} if isinstance(m, str) else m
                           for m in _as_list(entry["models"], f"families.{entry['name']}.models")]
    return entry


# --- planning: size each (model, source) measurement ------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where and how a model runs: the Ray task's resources and the load arguments."""

    device: str
    """cpu or cuda."""
    dtype: str
    num_gpus: float = 0.0
    """Ray GPUs of the task (fractions share a GPU; > 1 loads with device_map='auto')."""
    memory_gb: float = 0.0
    """Estimated memory the loaded model needs."""
    unsupported: str | None = None
    """Why this cluster cannot run the model (the measurement is recorded failed with it)."""

    @property
    def device_map(self) -> str | None:
        return "auto" if self.num_gpus > 1 else None


@dataclass(frozen=True)
class ModelPlan:
    """A model of the study, resolved: its path, parameter count and placement (or why not)."""

    family: str
    entry: ModelEntry
    path: str
    n_params: int | None
    placement: Placement | None
    problem: str | None = None
    """Why the model cannot be measured (config unreadable, ...); None when it can."""

    @property
    def label(self) -> str:
        return Path(self.entry.name).name if self.entry.name.startswith((".", "/", "~")) else self.entry.name


@dataclass(frozen=True)
class ClusterShape:
    """What the biggest node offers (from Ray), for sizing decisions."""

    max_gpus_per_node: int = 0
    max_memory_gb_per_node: float = math.inf


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


def pick_dtype(study: ObserveConfig, n_params: int) -> str:
    for rule in study.sizing:
        if rule.max_params is None or n_params <= rule.max_params:
            return rule.dtype
    return study.sizing[-1].dtype


def compute_placement(n_params: int, dtype: str, resources: ObserveResources, cluster: ClusterShape) -> Placement:
    """Memory from the parameter count and dtype; GPUs from that memory; refuse what cannot fit."""
    memory_gb = n_params * DTYPE_BYTES[dtype] * resources.memory_overhead / 1e9 + resources.activation_gb
    use_gpu = resources.device == "cuda" or (resources.device == "auto" and cluster.max_gpus_per_node > 0)
    if not use_gpu:
        if dtype == "float16":
            return Placement("cpu", dtype, 0.0, memory_gb, unsupported=(
                "dtype float16 on CPU is refused (slow or missing kernels); set sizing dtype float32 or bfloat16, "
                "or run on a cluster with GPUs"))
        if memory_gb > cluster.max_memory_gb_per_node:
            return Placement("cpu", dtype, 0.0, memory_gb, unsupported=(
                f"needs ~{memory_gb:.1f} GB on CPU ({n_params:,} params in {dtype}) but the largest node offers "
                f"{cluster.max_memory_gb_per_node:.1f} GB to Ray; use bfloat16 or a bigger node"))
        return Placement("cpu", dtype, 0.0, memory_gb)
    if cluster.max_gpus_per_node == 0:
        return Placement("cuda", dtype, 1.0, memory_gb, unsupported=(
            "resources.device is cuda but the cluster has no GPU; use device auto or cpu, or a GPU cluster"))
    gpus_needed = memory_gb / resources.gpu_memory_gb
    if gpus_needed <= 1:
        share = min(1.0, math.ceil(gpus_needed / GPU_SHARE_STEP) * GPU_SHARE_STEP)
        return Placement("cuda", dtype, share, memory_gb)
    whole = math.ceil(gpus_needed)
    limit = min(resources.max_gpus_per_model, cluster.max_gpus_per_node)
    if whole > limit:
        return Placement("cuda", dtype, float(whole), memory_gb, unsupported=(
            f"unsupported on this cluster: needs ~{memory_gb:.0f} GB = {whole} GPUs of {resources.gpu_memory_gb:g} GB "
            f"on one node ({n_params:,} params in {dtype}), but at most {limit} GPUs per model are available; "
            "use a node with more GPUs, raise resources.max_gpus_per_model, or a smaller dtype"))
    return Placement("cuda", dtype, float(whole), memory_gb)


def read_cluster_shape() -> ClusterShape:
    """The largest node's GPUs and memory, from the connected Ray cluster."""
    import ray

    gpus, memory = 0, 0.0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        gpus = max(gpus, int(resources.get("GPU", 0)))
        memory = max(memory, resources.get("memory", 0.0) / 1e9)
    return ClusterShape(gpus, memory or math.inf)


def plan_models(study: ObserveConfig, cluster: ClusterShape) -> list[ModelPlan]:
    """Every model of the study, with its parameter count and placement, or the reason it cannot run."""
    plans = []
    for family in study.families:
        for entry in family.models:
            path = study.resolve_model(entry.name)
            try:
                n_params = int(entry.params) if entry.params else count_parameters_from_config(path)
            except DispersionScalingError as exc:
                plans.append(ModelPlan(family.name, entry, path, None, None, problem=str(exc)))
                continue
            dtype = entry.dtype or pick_dtype(study, n_params)
            placement = compute_placement(n_params, dtype, study.resources, cluster)
            plans.append(ModelPlan(family.name, entry, path, n_params, placement, problem=placement.unsupported))
    return plans


def measurement_hash(model_path: str, source: str, repetitions: int, max_length: int, dtype: str) -> str:
    """Identifies a measurement: the same model, source, R, T and dtype is the same run."""
    return config_hash({"kind": names.KIND_OBSERVE, "model": model_path, "source": source,
                        "repetitions": repetitions, "max_length": max_length, "dtype": dtype})


# --- the measurement (runs inside a Ray task) ---------------------------------------------------------------


@dataclass(frozen=True)
class MeasureTask:
    """Everything one measurement task needs (plain data: it travels to a Ray worker)."""

    model_path: str
    tokenizer: str | None
    device: str
    dtype: str
    device_map: str | None
    max_length: int
    num_actors: int
    actor_cpus: float
    effective_rank: bool


def build_final_norm_base(base):
    """For a base model whose `hidden_states` do not end with the final-norm output: a module
    that runs it and returns hidden_states[-1] = last_hidden_state, so index L is what SPEC.md
    asks for (the number of hidden states stays L+1)."""
    import torch

    class _Patched(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = getattr(inner, "config", None)

        def forward(self, **kwargs):
            output = self.inner(**kwargs)
            states = tuple(output.hidden_states)
            output.hidden_states = states[:-1] + (output.last_hidden_state,)
            return output

    return _Patched(base)


def check_final_norm(base, tokens: dict) -> bool:
    """True when the model's hidden_states already end with last_hidden_state (the usual case)."""
    import torch

    with torch.inference_mode():
        output = base(**tokens, output_hidden_states=True, use_cache=False)
    last = getattr(output, "last_hidden_state", None)
    if last is None or output.hidden_states is None:
        raise ModelError("the model returns no last_hidden_state/hidden_states; measurement needs a "
                         "Hugging Face base model that supports output_hidden_states=True")
    return bool(torch.equal(output.hidden_states[-1], last))


def check_tokens_fit(model, tokenizer, texts: Sequence[str], max_length: int) -> tuple[int, int]:
    """Refuse a tokenizer that produces ids the model cannot embed, or empty texts. Returns the
    (shortest, longest) token count of the texts."""
    from scaling.condensation import tokenize_for_measurement

    rows = model.get_input_embeddings().weight.shape[0]
    lengths, top = [], -1
    for index, text in enumerate(texts):
        ids = tokenize_for_measurement(tokenizer, text, max_length)["input_ids"]
        if ids.numel() == 0:
            raise DataError(f"text {index} tokenizes to no tokens; remove empty rows from the source")
        lengths.append(int(ids.shape[-1]))
        top = max(top, int(ids.max()))
    if top >= rows:
        raise ModelError(f"the tokenizer produces token id {top} but the model embeds only {rows} tokens; "
                         "give the model's own tokenizer (families[].models[].tokenizer)")
    return min(lengths), max(lengths)


def _load_model(task: MeasureTask):
    """(model, device): build_causal_lm for one device; device_map='auto' over several GPUs."""
    from scaling.model import build_causal_lm, resolve_device, resolve_dtype

    if task.device_map is None:
        loaded = build_causal_lm(task.model_path, device=task.device, dtype=task.dtype)
        return loaded.model, loaded.device, loaded.num_params
    try:
        import accelerate  # noqa: F401 -- transformers needs it for device_map
    except ImportError:
        raise ModelError(f"{task.model_path!r} needs several GPUs (device_map='auto'), which needs the "
                         "`accelerate` package on the cluster; pip install accelerate") from None
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(task.dtype, resolve_device("cuda"))
    try:
        model = AutoModelForCausalLM.from_pretrained(task.model_path, dtype=dtype, device_map="auto")
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load {task.model_path!r} with device_map='auto': {type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    model.eval()
    return model, next(model.parameters()).device, sum(p.numel() for p in model.parameters())


def measure_model(task: MeasureTask, texts: Sequence[str]) -> dict[str, Any]:
    """Load, check, measure; returns the finalized result and what the record needs."""
    import torch

    from scaling.actors import measure_condensation_sharded
    from scaling.condensation import measure_condensation, tokenize_for_measurement
    from scaling.data import build_tokenizer

    started = time.perf_counter()
    model, device, num_params = _load_model(task)
    tokenizer = build_tokenizer(task.tokenizer or task.model_path)
    shortest, longest = check_tokens_fit(model, tokenizer, texts, task.max_length)
    base = model.base_model
    first = {k: v.to(device) for k, v in tokenize_for_measurement(tokenizer, texts[0], task.max_length).items()}
    ends_with_norm = check_final_norm(base, first)
    measured = base if ends_with_norm else build_final_norm_base(base)
    try:
        if task.num_actors > 0:
            accumulator = measure_condensation_sharded(measured, tokenizer, texts, task.max_length,
                                                       num_actors=task.num_actors, device=device, progress=False,
                                                       effective_rank=task.effective_rank, num_cpus=task.actor_cpus)
        else:
            accumulator = measure_condensation(measured, tokenizer, texts, task.max_length, device, progress=False,
                                               effective_rank=task.effective_rank)
    except torch.OutOfMemoryError as exc:
        raise ModelError(f"out of memory measuring {task.model_path!r} on {device} in {task.dtype} "
                         f"({str(exc).splitlines()[0][:120]}); use bfloat16, more GPUs or a smaller max_length") from None
    return {
        "result": accumulator.finalize(),
        "num_params": num_params,
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "tokens": [shortest, longest],
        "hidden_states_end": "last_hidden_state" if ends_with_norm else "replaced by last_hidden_state",
        "seconds": round(time.perf_counter() - started, 3),
    }


def _measure_entry(task: MeasureTask, texts: list[str]) -> dict[str, Any]:
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


def read_source_texts(spec: str, repetitions: int) -> tuple[list[str], str]:
    """R texts of a source (the reference protocol; a local file: document r mod n) and its label."""
    from scaling.data import cycle_texts, parse_text_source, read_rows, sample_texts

    source = parse_text_source(spec)
    rows = read_rows(source)
    texts = cycle_texts(rows, repetitions) if source.kind == "file" else sample_texts(rows, repetitions)
    return texts, source.label


def source_label(spec: str) -> str:
    from scaling.data import parse_text_source

    try:
        return parse_text_source(spec).label
    except DataError:
        return Path(spec).stem if spec.endswith((".txt", ".jsonl")) else spec


def run_observation_study(study: ObserveConfig, study_yaml: str, *, progress=print) -> list[ObserveOutcome]:
    """Measure every (model, source), skipping finished ones; failures are recorded, never fatal."""
    import ray

    from scaling.study import one_line
    from scaling.tracking import Tracker, resolve_tracking_uri

    tracker = Tracker(resolve_tracking_uri(study.tracking_uri), study.study)
    parent_id = tracker.study_run_id({"kind": names.KIND_OBSERVE, "repetitions": study.repetitions,
                                      "max_length": study.max_length}, study_yaml)
    plans = plan_models(study, read_cluster_shape())
    texts_by_source: dict[str, Any] = {}
    outcomes: list[ObserveOutcome] = []
    pending: dict[Any, tuple] = {}
    remote = ray.remote(_measure_entry)

    def finish(job, reply=None, failure=None):
        plan, spec, run_id, started = job
        label = source_label(spec)
        seconds = time.perf_counter() - started
        if failure is None and reply is not None and "error" in reply:
            failure = reply["error"]
        if failure is not None:
            tracker.finish(run_id, names.STATUS_FAILED, failure)
            progress(f"{LOG_PREFIX} {plan.label} / {label}: FAILED: {failure}")
            outcomes.append(ObserveOutcome(plan.family, plan.label, label, names.STATUS_FAILED, run_id,
                                           plan.n_params, seconds=seconds, detail=failure))
            return
        result = reply["result"]
        record_measurement(tracker, run_id, study, plan, spec, reply)
        tracker.finish(run_id, names.STATUS_FINISHED)
        progress(f"{LOG_PREFIX} {plan.label} / {label}: spearman {result.spearman:+.3f} ({seconds:.1f} s)")
        outcomes.append(ObserveOutcome(plan.family, plan.label, label, names.STATUS_FINISHED, run_id,
                                       reply["num_params"], result.spearman, seconds))

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
            texts, _ = read_source_texts(resolved, study.repetitions)
            texts_by_source[spec] = ray.put(texts)
        except DispersionScalingError as exc:
            texts_by_source[spec] = exc
        for plan in plans:
            dtype = plan.placement.dtype if plan.placement else (plan.entry.dtype or "auto")
            digest = measurement_hash(plan.path, resolved, study.repetitions, study.max_length, dtype)
            tags = {names.TAG_FAMILY: plan.family, names.TAG_MODEL: plan.label, names.TAG_SOURCE: label}
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
                progress(f"{LOG_PREFIX} {plan.label} / {label}: already measured (run {run_id[:8]}), skipped")
                outcomes.append(ObserveOutcome(plan.family, plan.label, label, "skipped", run_id, plan.n_params))
                continue
            tracker.reopen(run_id)
            job = (plan, resolved, run_id, time.perf_counter())
            texts_ref = texts_by_source[spec]
            if plan.problem is not None or isinstance(texts_ref, Exception):
                finish(job, failure=plan.problem or str(texts_ref))
                continue
            task = MeasureTask(plan.path, study.resolve_model(plan.entry.tokenizer) if plan.entry.tokenizer else None,
                               plan.placement.device, plan.placement.dtype, plan.placement.device_map,
                               study.max_length, study.resources.num_actors, study.resources.actor_cpus,
                               study.effective_rank)
            options = {"num_cpus": study.resources.cpus_per_task, "num_gpus": plan.placement.num_gpus, "max_retries": 0}
            if plan.placement.device == "cpu":
                options["memory"] = int(plan.placement.memory_gb * 1e9)
            progress(f"{LOG_PREFIX} {plan.label} / {label}: {plan.n_params:,} params, {plan.placement.dtype} on "
                     f"{plan.placement.device}" + (f" x{plan.placement.num_gpus:g} GPU" if plan.placement.num_gpus else ""))
            pending[remote.options(**options).remote(task, texts_ref)] = job
            drain(study.resources.max_concurrent - 1)
    drain(0)
    tracker.end_study(parent_id, failed=any(o.status == names.STATUS_FAILED for o in outcomes))
    return outcomes


def record_measurement(tracker, run_id: str, study: ObserveConfig, plan: ModelPlan, spec: str, reply: dict) -> None:
    """Per-layer and summary metrics, condensation.json and heatmap.png of one finished measurement."""
    from scaling.plots import plot_condensation_heatmap

    result = reply["result"]
    metadata = {"model": plan.path, "family": plan.family, "num_params": reply["num_params"],
                "repetitions": study.repetitions, "max_length": study.max_length,
                "source": {"spec": spec, "label": source_label(spec)}, "device": reply["device"],
                "dtype": reply["dtype"], "hidden_states_end": reply["hidden_states_end"], "seconds": reply["seconds"]}
    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / names.ARTIFACT_CONDENSATION_JSON
        json_path.write_text(result.to_json(last_n=min(study.last_n, result.num_layers), extra=metadata) + "\n")
        title = f"{plan.label} on {source_label(spec)} (R={result.num_sequences}, T={result.max_length})"
        png_path = plot_condensation_heatmap(result.histograms, Path(tmp) / names.ARTIFACT_HEATMAP_PNG, title=title)
        tracker.log_observation(run_id, result.to_metrics(), [json_path, png_path],
                                {names.TAG_N_PARAMS: reply["num_params"], "dtype": reply["dtype"],
                                 "device": reply["device"], "hidden_states_end": reply["hidden_states_end"]})


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
    return "\n".join(lines)


def format_outcomes(outcomes: list[ObserveOutcome]) -> str:
    header = f"{'family':<10} {'model':<28} {'source':<12} {'status':<9} {'spearman':>9} {'time':>7}"
    lines = [header, "-" * len(header)]
    for o in outcomes:
        rho = f"{o.spearman:+.3f}" if o.spearman is not None and math.isfinite(o.spearman) else "-"
        lines.append(f"{o.family:<10} {o.model[:28]:<28} {o.source[:12]:<12} {o.status:<9} {rho:>9} {o.seconds:>6.0f}s"
                     + (f"  {o.detail}" if o.detail else ""))
    return "\n".join(lines)


def main_observe(path: str, overrides: Sequence[str], *, dry_run: bool = False) -> int:
    """`scaling/run.py` for `kind: observe` files: plan (and with --dry-run stop), run, summarise."""
    study = load_observe_study(path, overrides)
    if dry_run:
        # The cluster is not inspected: assume GPU nodes as large as allowed when GPUs are asked for.
        gpus = study.resources.max_gpus_per_model if study.resources.device != "cpu" else 0
        print(format_plan(study, plan_models(study, ClusterShape(max_gpus_per_node=gpus))))
        print(f"(dry run: cluster not inspected; placement assumes nodes with {gpus} GPUs of "
              f"{study.resources.gpu_memory_gb:g} GB)")
        return 0
    from scaling.study import connect_ray

    connect_ray()
    outcomes = run_observation_study(study, Path(path).read_text(encoding="utf-8"))
    print()
    print(format_outcomes(outcomes))
    return 1 if any(o.status == names.STATUS_FAILED for o in outcomes) else 0


# --- tiny offline models for the demo and the tests --------------------------------------------------------

TINY_SHAPES = {"tiny-2L": (2, 16), "tiny-3L": (3, 32), "tiny-4L": (4, 64)}
"""name -> (n_layers, d_model) of the tiny GPT-2 family of `observe_tiny.yaml`."""
SHORT_TEXTS_FILE = "short_texts.txt"


def build_tiny_models(directory: str | Path, tokenizer=None, *, n_positions: int = 128) -> Path:
    """Save the tiny GPT-2 family (random init, seeded) and a .txt of short documents under
    `directory`. Without `tokenizer`, a byte-level BPE (vocab 1024) is trained on the bundled text."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from scaling.data import build_tokenizer, parse_text_source, read_rows

    directory = Path(directory)
    rows = read_rows(parse_text_source("bundled"))
    tokenizer = tokenizer or build_tokenizer(None, rows=rows, vocab_size=1024)
    for seed, (name, (n_layers, d_model)) in enumerate(TINY_SHAPES.items()):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=len(tokenizer), n_layer=n_layers, n_embd=d_model, n_head=2,
                            n_positions=n_positions, bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        GPT2LMHeadModel(config).save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
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
