"""Study files: frozen, validated configs loaded strictly from YAML.

A study file describes one scaling study: which ladder and rungs, which arms (baseline,
dispersion, neftune, active_forgetting), seeds, data, training settings, probes, resources
and checkpoints. Loading is strict: an unknown key, a wrong type or a bad value fails before
any work starts, with a message that names the key (as a dotted path), the value and the fix.

`--set key=value` overrides use the same dotted paths (`training.max_steps=20`).

"The reference" here means the authors' code: the LM-Dispersion repository and the PyPI package
`embedding-condensation` 2.0 (docs/README.md#the-reference).
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from scaling import names
from scaling.dispersion_spec import VARIANTS, resolve_layers, validate_layer_spec
from scaling.errors import ConfigError
from scaling.ladder import RunConfigurator, get_ladder
from scaling.observe_config import ObserveConfig, observe_study_from_dict
from scaling.schema import as_list, build_config, read_study_mapping, to_plain

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from scaling.ladder import RunPlan, Rung

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ArmConfig:
    """One arm of the paired comparison. Only the fields of its own kind are used."""

    name: str
    """`baseline`, `dispersion`, `neftune` or `active_forgetting`."""
    variant: str = "angular_spread"
    """Dispersion loss variant (dispersion arm), see `scaling.dispersion.VARIANTS`."""
    lam: float = 0.1
    """Dispersion loss weight lambda (YAML key `lambda`); the paper's default is 0.1."""
    layers: str = "all"
    """Layers the loss applies to: all, last, early_half, late_half, "0,3,5" (block indices) or "0.5:1.0"."""
    tau: float = 1.0
    """Temperature of the dispersion loss."""
    clamp_threshold: float = 0.1
    """Cosine clamp t of angular_spread/orthogonalization (0.1 in GPT-2 runs, 0.25 in Qwen3 runs)."""
    neftune_alpha: float = 1.0
    """NEFTune noise scale alpha (neftune arm): uniform noise of magnitude alpha / sqrt(S * H)."""
    forget_every: int = 1000
    """Re-initialise the input embeddings every this many steps (active_forgetting arm)."""

    def __post_init__(self):
        if self.name not in names.ARMS:
            raise ConfigError(f"arms: unknown arm {self.name!r}; use one of {list(names.ARMS)}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"arms.{self.name}.lambda={self.lam}: must be a finite number >= 0")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"arms.{self.name}.tau={self.tau}: must be > 0")
        if not 0 <= self.clamp_threshold < 1:
            raise ConfigError(f"arms.{self.name}.clamp_threshold={self.clamp_threshold}: must be in [0, 1)")
        if self.neftune_alpha < 0:
            raise ConfigError(f"arms.{self.name}.neftune_alpha={self.neftune_alpha}: must be >= 0")
        if self.forget_every < 1:
            raise ConfigError(f"arms.{self.name}.forget_every={self.forget_every}: must be >= 1")
        if self.name == names.ARM_DISPERSION:
            if self.variant not in VARIANTS:
                raise ConfigError(
                    f"arms.dispersion.variant={self.variant!r} is unknown; use one of {list(VARIANTS)}"
                )
            validate_layer_spec(self.layers)

    def params(self) -> dict[str, Any]:
        """The arm's settings as flat MLflow params (only those that mean something for it)."""
        if self.name == names.ARM_DISPERSION:
            return {names.PARAM_LAMBDA: self.lam, names.PARAM_LAYERS: self.layers,
                    names.PARAM_VARIANT: self.variant, names.PARAM_TAU: self.tau,
                    names.PARAM_CLAMP: self.clamp_threshold}
        if self.name == names.ARM_NEFTUNE:
            return {names.PARAM_NEFTUNE_ALPHA: self.neftune_alpha}
        if self.name == names.ARM_ACTIVE_FORGETTING:
            return {names.PARAM_FORGET_EVERY: self.forget_every}
        return {names.PARAM_LAMBDA: 0.0}


@dataclass(frozen=True)
class DataConfig:
    source: str = "bundled"
    """Training text: bundled, wikitext, pubmed_qa, imdb, squad, hf:NAME[/CONFIG]:SPLIT:FIELD, or a .txt/.jsonl path."""
    tokenizer: str | None = None
    """Tokenizer name or path; null trains a byte-level BPE on the source (vocab = the rung's vocab_size)."""
    val_fraction: float = 0.1
    """Share of packed blocks held out for validation."""
    max_rows: int | None = None
    """Use only the first this many rows of the source (quick runs)."""

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"data.max_rows={self.max_rows}: must be >= 1 or null")


@dataclass(frozen=True)
class TrainingConfig:
    tokens_per_param: float = 20.0
    """Token budget as a multiple of the rung's non-embedding parameters (Chinchilla-style)."""
    max_tokens: int | None = None
    """Cap on the token budget (smoke runs)."""
    max_steps: int | None = None
    """Cap on optimizer steps (smoke runs); applied after the token budget."""
    seq_len: int = 128
    """Tokens per training block."""
    batch_size: int = 8
    """Sequences per optimizer step, over all workers."""
    micro_batch_size: int = 4
    """Sequences per worker per forward pass; gradient accumulation makes up the rest."""
    lr: float | None = None
    """Peak learning rate; null derives it from the rung's size."""
    warmup_fraction: float = 0.2
    """Share of steps spent in linear warmup (the paper: 20%)."""
    min_lr_ratio: float = 0.1
    """Cosine schedule decays to this fraction of the peak."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    init_from: str | None = None
    """null trains from scratch; a model name or path starts from pretrained weights (mid-training)."""
    log_every: int = 1
    """Log train metrics every this many steps."""

    def __post_init__(self):
        for key in ("seq_len", "batch_size", "micro_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"training.{key}={getattr(self, key)}: must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"training.max_steps={self.max_steps}: must be >= 1 or null")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"training.lr={self.lr}: must be > 0 or null")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"training.warmup_fraction={self.warmup_fraction}: must be in [0, 1)")
        if not self.tokens_per_param > 0:
            raise ConfigError(f"training.tokens_per_param={self.tokens_per_param}: must be > 0")


@dataclass(frozen=True)
class ProbeConfig:
    every_steps: int = 0
    """Validation loss and condensation probe every this many steps (0: only at the end)."""
    texts: int = 8
    """Number of fixed probe texts (reference protocol on the data source)."""
    max_length: int = 128
    """Tokens per probe text."""
    val_batches: int = 4
    """Validation micro-batches per worker per probe."""

    def __post_init__(self):
        if self.every_steps < 0:
            raise ConfigError(f"probes.every_steps={self.every_steps}: must be >= 0")
        for key in ("texts", "max_length", "val_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"probes.{key}={getattr(self, key)}: must be >= 1")


@dataclass(frozen=True)
class ResourcesConfig:
    num_workers: int = 2
    """Ray Train workers per run (one process each, a GPU each when use_gpu)."""
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""

    def __post_init__(self):
        if self.num_workers < 1:
            raise ConfigError(f"resources.num_workers={self.num_workers}: must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"resources.zero_stage={self.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"resources.precision={self.precision!r}: use one of {list(PRECISIONS)}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"resources.cpus_per_worker={self.cpus_per_worker}: must be > 0")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 0
    """Save a DeepSpeed checkpoint every this many steps (0: only at the end)."""
    num_to_keep: int = 2
    max_failures: int = 1
    """Restarts from the latest checkpoint after a worker dies (Ray Train FailureConfig)."""

    def __post_init__(self):
        if self.every_steps < 0 or self.num_to_keep < 1 or self.max_failures < 0:
            raise ConfigError(
                f"checkpoint: every_steps={self.every_steps} (>= 0), num_to_keep={self.num_to_keep} (>= 1), "
                f"max_failures={self.max_failures} (>= 0): fix the value out of range"
            )


SEARCH_METRICS = (names.VAL_LOSS, names.COND_SPEARMAN, names.COND_LAST_LAYER_MEAN_COS,
                  names.COND_LATE_HALF_MEAN_COS)
"""Metrics every run reports at each probe, so a search may optimise any of them."""


@dataclass(frozen=True)
class SearchConfig:
    """A Ray Tune + Optuna search over the dispersion arm's settings, per rung (num_samples 0: none)."""

    num_samples: int = 0
    """Trials per rung; 0 disables the search (the study's arms run as listed)."""
    metric: str = names.VAL_LOSS
    """What the search optimises: val/loss, or a condensation target (condensation/spearman, ...)."""
    mode: str = "min"
    seed: int = 0
    """Seed of the Optuna TPE sampler (the trials' training seed is the study's first seed)."""
    lam: tuple[float, float] = (0.003, 3.0)
    """Log-uniform range of lambda (YAML key `lambda`)."""
    layers: tuple[str, ...] = ("all", "last", "early_half", "late_half")
    """Layer selections to choose from: names, explicit block sets "0,2" or depth fractions "0.5:1.0"."""
    variants: tuple[str, ...] = ("angular_spread",)
    tau: tuple[float, ...] = (1.0,)
    clamp_threshold: tuple[float, ...] = (0.1,)
    max_concurrent: int = 1
    """Trials running at once (each has resources.num_workers Ray Train workers)."""
    grace_period: int = 1
    """ASHA: probes a trial gets before it may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the best 1/reduction_factor at each rung of the schedule."""
    preemption_retries: int = 2
    """Retries of a trial whose node or actor died (preemption), separate from real failures (never retried)."""
    extra_seeds: tuple[int, ...] = ()
    """Re-run the best settings (and the baseline) with these seeds after the search."""

    def __post_init__(self):
        if self.num_samples < 0:
            raise ConfigError(f"search.num_samples={self.num_samples}: must be >= 0")
        if self.metric not in SEARCH_METRICS:
            raise ConfigError(f"search.metric={self.metric!r} is not reported by any run; use one of "
                              f"{list(SEARCH_METRICS)}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"search.mode={self.mode!r}: use min or max")
        low, high = self.lam
        if not (0 < low < high and math.isfinite(high)):
            raise ConfigError(f"search.lambda=[{low}, {high}] is an empty or invalid log-uniform range; "
                              "give 0 < low < high, e.g. [0.003, 3.0]")
        for key in ("layers", "variants", "tau", "clamp_threshold"):
            if not getattr(self, key):
                raise ConfigError(f"search.{key} is empty; list at least one choice")
        for spec in self.layers:
            validate_layer_spec(spec)
        for variant in self.variants:
            if variant not in VARIANTS:
                raise ConfigError(f"search.variants: {variant!r} is unknown; use one of {list(VARIANTS)}")
        if any(t <= 0 for t in self.tau):
            raise ConfigError(f"search.tau={list(self.tau)}: every tau must be > 0")
        if any(not 0 <= c < 1 for c in self.clamp_threshold):
            raise ConfigError(f"search.clamp_threshold={list(self.clamp_threshold)}: each must be in [0, 1)")
        if self.max_concurrent < 1 or self.grace_period < 1 or self.reduction_factor < 2:
            raise ConfigError("search: max_concurrent >= 1, grace_period >= 1 and reduction_factor >= 2 are required")
        if self.preemption_retries < 0:
            raise ConfigError(f"search.preemption_retries={self.preemption_retries}: must be >= 0")


@dataclass(frozen=True)
class StudyConfig:
    """A whole study. Load with `load_study`."""

    study: str
    """Study name: the MLflow experiment and the parent run."""
    ladder: str = "tiny"
    """Ladder name, see `scaling.ladder.LADDERS`."""
    rungs: tuple[str, ...] = ()
    """Rungs to train (empty: every rung of the ladder)."""
    arms: tuple[ArmConfig, ...] = (ArmConfig(name="baseline"), ArmConfig(name="dispersion"))
    seeds: tuple[int, ...] = (0,)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    storage_path: str = "runs"
    """Ray Train storage: a local folder (relative to the working directory) or s3://..."""
    tracking_uri: str | None = None
    """MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""

    def __post_init__(self):
        if not self.study or not all(c.isalnum() or c in "-_." for c in self.study):
            raise ConfigError(f"study={self.study!r}: use a non-empty name of letters, digits, '-', '_', '.'")
        if not self.arms:
            raise ConfigError("arms: empty; list at least one arm, e.g. [baseline, dispersion]")
        arm_names = [a.name for a in self.arms]
        if len(set(arm_names)) != len(arm_names):
            raise ConfigError(f"arms: {arm_names} lists an arm twice; each arm once")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={list(self.seeds)}: give one or more distinct integers")
        if self.training.micro_batch_size * self.resources.num_workers > self.training.batch_size:
            raise ConfigError(
                f"training.batch_size={self.training.batch_size} is smaller than micro_batch_size "
                f"({self.training.micro_batch_size}) x num_workers ({self.resources.num_workers}); raise it"
            )
        if self.training.batch_size % (self.training.micro_batch_size * self.resources.num_workers):
            raise ConfigError(
                f"training.batch_size={self.training.batch_size} must be a multiple of micro_batch_size x "
                f"num_workers = {self.training.micro_batch_size * self.resources.num_workers}"
            )
        if any(a.name == names.ARM_ACTIVE_FORGETTING for a in self.arms) and self.resources.zero_stage != 0:
            raise ConfigError(
                "arms: active_forgetting resets the embeddings' optimizer state, which ZeRO stages 1-3 "
                f"partition; set resources.zero_stage: 0 (it is {self.resources.zero_stage})"
            )
        rungs = self.selected_rungs()  # raises on an unknown ladder or rung
        if self.search.num_samples:
            if names.ARM_BASELINE not in arm_names:
                raise ConfigError("search: a sweep is compared against the baseline arm; add `baseline` to arms")
            for rung in rungs:
                for spec in self.search.layers:
                    try:
                        resolve_layers(spec, rung.n_layers)
                    except ConfigError as exc:
                        raise ConfigError(f"search.layers: {spec!r} is not valid for rung {rung.name!r} "
                                          f"({rung.n_layers} blocks): {exc}") from None
        for arm in self.arms:
            if arm.name == names.ARM_DISPERSION:
                for rung in rungs:
                    resolve_layers(arm.layers, rung.n_layers)

    def selected_rungs(self) -> list[Rung]:
        """The rungs this study trains, in ladder order unless `rungs` lists them."""
        ladder = get_ladder(self.ladder)
        return [ladder.rung(name) for name in self.rungs] if self.rungs else list(ladder.rungs)

    def arm(self, name: str) -> ArmConfig:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(f"arm {name!r} is not in this study; it has {[a.name for a in self.arms]}")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def to_yaml(self) -> str:
        """The study with every default filled in (recorded with the study's MLflow run)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def plan_runs(study: StudyConfig) -> list[RunPlan]:
    """The RunPlan of every selected rung (token budget, batch, steps, lr), the study's caps applied."""
    training = study.training
    configurator = RunConfigurator(tokens_per_param=training.tokens_per_param, seq_len=training.seq_len,
                                   batch_size=training.batch_size, lr=training.lr,
                                   warmup_fraction=training.warmup_fraction, max_tokens=training.max_tokens,
                                   max_steps=training.max_steps)
    return [configurator.plan(rung, num_workers=study.resources.num_workers) for rung in study.selected_rungs()]


# --- loading -------------------------------------------------------------------------------------------

KIND_KEY = "kind"
"""Top-level key that names a study file's kind: `train` (the default) or `observe`."""


def load_study_file(path: str | Path, overrides: typing.Sequence[str] = ()) -> StudyConfig | ObserveConfig:
    """Read any study file once and build the config its `kind` says (training when absent)."""
    raw = read_study_mapping(path, overrides)
    kind = raw.get(KIND_KEY, names.KIND_TRAIN)
    if kind == names.KIND_OBSERVE:
        return observe_study_from_dict(raw)
    if kind != names.KIND_TRAIN:
        raise ConfigError(f"{KIND_KEY}={kind!r} in {path}: use {names.KIND_TRAIN} (the default) or "
                          f"{names.KIND_OBSERVE}")
    raw.pop(KIND_KEY, None)
    return study_from_dict(raw)


def load_study(path: str | Path, overrides: typing.Sequence[str] = ()) -> StudyConfig:
    """Read a training study YAML file, apply `key=value` overrides, validate everything."""
    study = load_study_file(path, overrides)
    if not isinstance(study, StudyConfig):
        raise ConfigError(f"{path} is an observation study (kind: observe), not a training study")
    return study


def study_from_dict(raw: dict[str, Any]) -> StudyConfig:
    raw = dict(raw)
    if "arms" in raw:
        raw["arms"] = [_arm_entry(a) for a in as_list(raw["arms"], "arms")]
    return build_config(StudyConfig, raw, "")


def _arm_entry(entry: Any) -> dict[str, Any]:
    """Arms are written as a name (`baseline`) or a mapping with a `name`."""
    if isinstance(entry, str):
        return {"name": entry}
    if isinstance(entry, dict) and "name" in entry:
        return entry
    raise ConfigError(f"arms: entry {entry!r} needs a name, e.g. `- baseline` or `- {{name: dispersion, lambda: 0.1}}`")


