"""Observation studies' config: which pretrained families, text sources, R and T, and how a
model is placed by its size. Pure Python: sizing and placement are arithmetic on parameter
counts; the driver (`scaling.observe`) reads the counts and the cluster.

A study file with top-level `kind: observe` is an observation study (`scaling.config.load_study_file`
dispatches on it). A model's placement: memory = parameters x bytes of its dtype x overhead +
activations; models that fit a GPU share it in quarters (Ray fractional GPUs); larger ones take
whole GPUs of one node (device_map='auto'); what cannot fit any node is recorded as unsupported.

"The reference" here means the authors' code: the LM-Dispersion repository and the PyPI package
`embedding-condensation` 2.0 (docs/README.md#the-reference).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from scaling import names
from scaling.errors import ConfigError, DataError
from scaling.schema import as_list, build_config, check_path_name, config_hash, read_study_mapping, to_plain

DTYPE_BYTES = {"auto": 4, "float32": 4, "bfloat16": 2, "float16": 2}
BUILD_TINY = "python -m scaling.observe --build-tiny-models outputs/observe-tiny"
"""The command that writes the local models and texts of search_spaces/observe_tiny.yaml."""
GPU_SHARE_STEP = 0.25  # small models share a GPU in quarters (Ray fractional GPUs)


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
        check_path_name("families[].name", self.name)
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
    family_dtype: str = "uniform"
    """`uniform`: every model of a family in the dtype its largest model needs, so a dtype switch never
    confounds the size trend; `per_model`: each model by `sizing` (a switch is flagged and recorded)."""
    resources: ObserveResources = field(default_factory=ObserveResources)
    base_dir: str = "."
    """Folder that `./` model paths and relative text files are resolved against ($VARS expanded)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""

    def __post_init__(self):
        check_path_name("study", self.study)
        if self.kind != names.KIND_OBSERVE:
            raise ConfigError(f"kind={self.kind!r}: an observation study has kind: {names.KIND_OBSERVE}")
        if not self.families:
            raise ConfigError("families is empty; list at least one family with its models")
        family_names = [f.name for f in self.families]
        if len(set(family_names)) != len(family_names):
            raise ConfigError(f"families: {family_names} lists a family twice")
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"sources={list(self.sources)}: give one or more distinct text sources")
        if self.repetitions > 100_000:
            raise ConfigError(f"repetitions={self.repetitions}: at most 100000 texts per measurement (the reference: "
                              "100)")
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
        if self.family_dtype not in ("uniform", "per_model"):
            raise ConfigError(f"family_dtype={self.family_dtype!r}: use uniform or per_model")
        self.check_local_paths()

    def check_local_paths(self) -> None:
        """Local models and text files must be there before any work: a missing one would otherwise start Ray
        and record a failed measurement per source."""
        missing = [(f"families.{family.name}.models", model.name, self.resolve_model(model.name))
                   for family in self.families for model in family.models
                   if model.name.startswith(("./", "../", "/", "~")) and not Path(self.resolve_model(model.name)).exists()]
        missing += [("sources", spec, self.resolve_source(spec)) for spec in self.sources
                    if spec.endswith((".txt", ".jsonl")) and not Path(self.resolve_source(spec)).exists()]
        if missing:
            key, name, path = missing[0]
            raise ConfigError(f"{key}: {name!r} is not there ({path}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}); "
                              f"build the tiny study's models and texts with `{BUILD_TINY}`, or fix base_dir / the path")
        from scaling.data import parse_text_source  # the one parser of text sources

        for spec in self.sources:
            try:
                parse_text_source(self.resolve_source(spec))
            except DataError as exc:
                raise ConfigError(f"sources: {exc}") from None
    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

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


def load_observe_study(path: str | Path, overrides: Sequence[str] = ()) -> ObserveConfig:
    """Read an observation study YAML, apply `key=value` overrides, validate everything."""
    return observe_study_from_dict(read_study_mapping(path, overrides, example="search_spaces/observe_tiny.yaml"))


def observe_study_from_dict(raw: dict[str, Any]) -> ObserveConfig:
    raw = dict(raw)
    if "families" in raw:
        raw["families"] = [_family_entry(f) for f in as_list(raw["families"], "families")]
    return build_config(ObserveConfig, raw, "")


def _family_entry(entry: Any) -> dict[str, Any]:
    """A family is `{name: gpt2, models: [gpt2, {name: gpt2-xl, dtype: bfloat16}]}`."""
    if not isinstance(entry, dict) or "name" not in entry:
        raise ConfigError(f"families: entry {entry!r} needs a name and models, e.g. {{name: gpt2, models: [gpt2, gpt2-medium]}}")
    entry = dict(entry)
    if "models" in entry:
        entry["models"] = [{"name": m} if isinstance(m, str) else m
                           for m in as_list(entry["models"], f"families.{entry['name']}.models")]
    return entry



# --- sizing and placement (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPlacement:
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
    placement: ModelPlacement | None
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


def pick_dtype(study: ObserveConfig, n_params: int) -> str:
    for rule in study.sizing:
        if rule.max_params is None or n_params <= rule.max_params:
            return rule.dtype
    return study.sizing[-1].dtype


def compute_placement(n_params: int, dtype: str, resources: ObserveResources, cluster: ClusterShape) -> ModelPlacement:
    """Memory from the parameter count and dtype; GPUs from that memory; refuse what cannot fit."""
    memory_gb = n_params * DTYPE_BYTES[dtype] * resources.memory_overhead / 1e9 + resources.activation_gb
    use_gpu = resources.device == "cuda" or (resources.device == "auto" and cluster.max_gpus_per_node > 0)
    if not use_gpu:
        if dtype == "float16":
            return ModelPlacement("cpu", dtype, 0.0, memory_gb, unsupported=(
                "dtype float16 on CPU is refused (slow or missing kernels); set sizing dtype float32 or bfloat16, "
                "or run on a cluster with GPUs"))
        if memory_gb > cluster.max_memory_gb_per_node:
            return ModelPlacement("cpu", dtype, 0.0, memory_gb, unsupported=(
                f"needs ~{memory_gb:.1f} GB on CPU ({n_params:,} params in {dtype}) but the largest node offers "
                f"{cluster.max_memory_gb_per_node:.1f} GB to Ray; use bfloat16 or a bigger node"))
        return ModelPlacement("cpu", dtype, 0.0, memory_gb)
    if cluster.max_gpus_per_node == 0:
        return ModelPlacement("cuda", dtype, 1.0, memory_gb, unsupported=(
            "resources.device is cuda but the cluster has no GPU; use device auto or cpu, or a GPU cluster"))
    gpus_needed = memory_gb / resources.gpu_memory_gb
    if gpus_needed <= 1:
        share = min(1.0, math.ceil(gpus_needed / GPU_SHARE_STEP) * GPU_SHARE_STEP)
        return ModelPlacement("cuda", dtype, share, memory_gb)
    whole = math.ceil(gpus_needed)
    limit = min(resources.max_gpus_per_model, cluster.max_gpus_per_node)
    if whole > limit:
        return ModelPlacement("cuda", dtype, float(whole), memory_gb, unsupported=(
            f"unsupported on this cluster: needs ~{memory_gb:.0f} GB = {whole} GPUs of {resources.gpu_memory_gb:g} GB "
            f"on one node ({n_params:,} params in {dtype}), but at most {limit} GPUs per model are available; "
            "use a node with more GPUs, raise resources.max_gpus_per_model, or a smaller dtype"))
    return ModelPlacement("cuda", dtype, float(whole), memory_gb)


def measurement_hash(model_path: str, source: str, repetitions: int, max_length: int, dtype: str) -> str:
    """Identifies a measurement: the same model, source, R, T and dtype is the same run."""
    return config_hash({"kind": names.KIND_OBSERVE, "model": model_path, "source": source,
                        "repetitions": repetitions, "max_length": max_length, "dtype": dtype})
