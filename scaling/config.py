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

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from scaling import cadence, names
from scaling.data import PACKINGS, parse_text_source  # the one parser of text sources (dry run, shards, condense)
from scaling.dispersion_spec import VARIANTS, resolve_layers, validate_layer_spec
from scaling.errors import ConfigError, DispersionScalingError
from scaling.evaluate import EvalConfig
from scaling.ladder import MAX_LR, RunConfigurator, get_ladder, with_tied_embeddings
from scaling.observe_config import ObserveConfig, observe_study_from_dict
from scaling.schema import YAML_RENAMES, as_list, build_config, check_path_name, flatten, read_study_mapping, to_plain
from scaling.sequential import PAIRED_CLAIMS, SLOPE_CLAIMS, DecideConfig, describe_plan, plan_waves

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from scaling.ladder import RunPlan, Rung

PRECISIONS = ("auto", "fp32", "bf16")
LAST_BLOCK_OUTPUTS = ("final_norm", "raw")
DEFAULT_BATCH_SIZE = 8
"""A study's sequences per optimizer step when it sets neither training.batch_size nor training.batch_tokens."""
LATER_KEYS = {"param_basis": "non_embedding", "batch_tokens": None}
"""Training keys added after runs were first hashed, with their defaults (`TrainingConfig.identity`)."""
MAX_WORKERS = 4096
"""Ceiling on workers per run and CPUs per worker: beyond it Ray waits forever for resources no cluster has."""
FAMILY_DEFAULTS: dict[str, dict[str, float]] = {
    # What the authors' scripts use per model family (docs/protocols.md): the Qwen3 scripts keep
    # the clamp at its default 0.25 and use NEFTune alpha 5; the GPT-2 ones 0.1 and 1.
    "gpt2": {"clamp_threshold": 0.1, "neftune_alpha": 1.0},
    "qwen3": {"clamp_threshold": 0.25, "neftune_alpha": 5.0},
}


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
    clamp_threshold: float | None = None
    """Cosine clamp t of angular_spread/orthogonalization; null: the rung family's default (GPT-2 0.1, Qwen3 0.25)."""
    last_block_output: str = "final_norm"
    """The last block's hidden state the loss sees: `final_norm` (Hugging Face's last hidden state) or `raw`
    (before the final norm, as the authors' torchtitan run)."""
    neftune_alpha: float | None = None
    """NEFTune noise scale alpha (neftune arm): uniform noise of magnitude alpha / sqrt(S * H); null: the
    family's default (GPT-2 1, Qwen3 5)."""
    forget_every: int = 1000
    """Re-initialise the input embeddings every this many steps (active_forgetting arm)."""
    embedding_lr: float | None = 5e-5
    """active_forgetting: peak learning rate of the input embeddings' own schedule (the reference: 5e-5); null: the
    run's schedule."""
    embedding_warmup_fraction: float = 0.08
    """active_forgetting: linear warmup share of the embeddings' schedule, then linear decay to 0 (the reference: 8%)."""

    def __post_init__(self):
        if self.name not in names.ARMS:
            raise ConfigError(f"arms: unknown arm {self.name!r}; use one of {list(names.ARMS)}")
        if not (math.isfinite(self.lam) and self.lam >= 0):
            raise ConfigError(f"arms.{self.name}.lambda={self.lam}: must be a finite number >= 0")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(f"arms.{self.name}.tau={self.tau}: must be > 0")
        if self.clamp_threshold is not None and not 0 <= self.clamp_threshold < 1:
            raise ConfigError(f"arms.{self.name}.clamp_threshold={self.clamp_threshold}: must be in [0, 1) or null")
        if self.neftune_alpha is not None and self.neftune_alpha < 0:
            raise ConfigError(f"arms.{self.name}.neftune_alpha={self.neftune_alpha}: must be >= 0 or null")
        if self.forget_every < 1:
            raise ConfigError(f"arms.{self.name}.forget_every={self.forget_every}: must be >= 1")
        if self.last_block_output not in LAST_BLOCK_OUTPUTS:
            raise ConfigError(f"arms.{self.name}.last_block_output={self.last_block_output!r}: use one of "
                              f"{list(LAST_BLOCK_OUTPUTS)}")
        if self.embedding_lr is not None and not 0 < self.embedding_lr <= MAX_LR:
            raise ConfigError(f"arms.{self.name}.embedding_lr={self.embedding_lr}: must be in (0, {MAX_LR}] or null")
        if not 0 <= self.embedding_warmup_fraction < 1:
            raise ConfigError(f"arms.{self.name}.embedding_warmup_fraction={self.embedding_warmup_fraction}: "
                              "must be in [0, 1)")
        if self.name == names.ARM_DISPERSION:
            if self.variant not in VARIANTS:
                raise ConfigError(
                    f"arms.dispersion.variant={self.variant!r} is unknown; use one of {list(VARIANTS)}"
                )
            validate_layer_spec(self.layers)

    def for_family(self, family: str) -> ArmConfig:
        """The arm with the family's defaults filled in where it leaves them null (what a run trains)."""
        defaults = FAMILY_DEFAULTS.get(family, FAMILY_DEFAULTS["gpt2"])
        return replace(self, **{key: value for key, value in defaults.items() if getattr(self, key) is None})

    def params(self) -> dict[str, Any]:
        """The arm's settings as flat MLflow params (only those that mean something for it)."""
        if self.name == names.ARM_DISPERSION:  # `dispersion.<YAML key>`: what `from_params` reads back
            return {names.arm_param(self.name, key): value for key, value in self.settings().items()}
        if self.name == names.ARM_NEFTUNE:
            return {names.PARAM_NEFTUNE_ALPHA: self.neftune_alpha}
        if self.name == names.ARM_ACTIVE_FORGETTING:
            return {names.PARAM_FORGET_EVERY: self.forget_every, names.PARAM_EMBEDDING_LR: self.embedding_lr}
        return {names.PARAM_LAMBDA: 0.0}

    def settings(self) -> dict[str, Any]:
        """The YAML keys that mean something for this arm (what a study record shows of it)."""
        keys = {names.ARM_DISPERSION: ("variant", "lam", "layers", "tau", "clamp_threshold", "last_block_output"),
                names.ARM_NEFTUNE: ("neftune_alpha",),
                names.ARM_ACTIVE_FORGETTING: ("forget_every", "embedding_lr", "embedding_warmup_fraction")}
        yaml_keys = {field: key for key, field in YAML_RENAMES.items()}
        return {yaml_keys.get(key, key): getattr(self, key) for key in keys.get(self.name, ())}

    @classmethod
    def from_settings(cls, name: str, settings: typing.Mapping[str, Any]) -> ArmConfig:
        """An arm from its YAML keys (a study's `arms` entry; a sweep trial's sampled config, whose keys are
        these), checked as a study file's arm is: the one parse of an arm."""
        return build_config(cls, {"name": name, **settings}, f"arms.{name}")

    @classmethod
    def from_params(cls, name: str, params: typing.Mapping[str, str]) -> ArmConfig:
        """The dispersion arm a run's MLflow params describe (its `dispersion.<YAML key>` params, strings), e.g.
        a sweep's best trial; through `from_settings`, like a trial's sampled config."""
        if name != names.ARM_DISPERSION:
            raise ConfigError(f"arms: only the {names.ARM_DISPERSION} arm is read back from run params, not {name!r}")
        hints = typing.get_type_hints(cls)
        prefix = names.arm_param(name, "")
        settings: dict[str, Any] = {}
        for param, text in params.items():
            if not param.startswith(prefix) or text == names.PARAM_NONE:
                continue
            key = param[len(prefix):]
            hint = hints.get(YAML_RENAMES.get(key, key))
            numeric = hint is float or float in typing.get_args(hint)
            settings[key] = None if text == "None" else float(text) if numeric else text
        return cls.from_settings(name, settings)


@dataclass(frozen=True)
class DataConfig:
    source: str = "bundled"
    """Training text: bundled, wikitext (the raw version), pubmed_qa, imdb, squad, hf:[ORG/]NAME[/CONFIG]:SPLIT:FIELD, or
    a .txt/.jsonl/.parquet file or folder (local path or s3://)."""
    tokenizer: str | None = None
    """Tokenizer name or path; null trains a byte-level BPE on the source (vocab = the rung's vocab_size)."""
    val_fraction: float = 0.1
    """Share of packed blocks held out for validation."""
    max_rows: int | None = None
    """Use only the first this many rows of the source (quick runs)."""
    packing: str = "eos"
    """How rows become blocks: `eos` (an end-of-text token after every row) or `raw` (rows concatenated as they are,
    newlines kept, no separator: the authors' mid-training data)."""
    val_split: str | None = None
    """The source's own validation split (e.g. `validation`); null: hold out `val_fraction` of the blocks."""

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: must be in (0, 1)")
        if self.max_rows is not None and self.max_rows < 1:
            raise ConfigError(f"data.max_rows={self.max_rows}: must be >= 1 or null")
        if self.packing not in PACKINGS:
            raise ConfigError(f"data.packing={self.packing!r}: use one of {list(PACKINGS)}")
        from scaling.errors import DataError

        try:
            parse_text_source(self.source, training=True)
        except DataError as exc:
            raise ConfigError(f"data.source: {exc}") from None
        if self.val_split is not None and not self.val_split.strip():
            raise ConfigError("data.val_split is empty; name the split (e.g. validation) or use null")


@dataclass(frozen=True)
class TrainingConfig(RunConfigurator):
    """A study's `training` section: the run configurator's planning keys (`scaling.ladder.RunConfigurator`:
    tokens_per_param, param_basis, tokens, seq_len, batch_tokens, batch_size, lr, lr_scaling, warmup_fraction,
    warmup_steps, max_tokens, max_steps; declared and validated there once) with a study's defaults, and what
    only training uses. `plan(rung, num_workers=...)` plans a rung's run."""

    KEY_PREFIX = "training."

    seq_len: int = 128
    """Tokens per training block."""
    batch_size: int | None = None
    """Sequences per optimizer step, over all workers; null: batch_tokens / seq_len when batch_tokens is set,
    else 8. Every rung trains this batch."""
    micro_batch_size: int = 4
    """Sequences per worker per forward pass; gradient accumulation makes up the rest."""
    min_lr_ratio: float = 0.1
    """Cosine schedule decays to this fraction of the peak (0: to zero, as Hugging Face's cosine schedule)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices, the position table included (not on biases or norms), as Hugging Face's Trainer."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Gradient clipping by global norm."""
    dropout: float = 0.0
    """Dropout of a model trained from scratch (residual, embedding, attention); GPT-2's own template uses 0.1."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory for large rungs, ~30% more compute."""
    init_from: str | dict[str, str] | None = None
    """null trains from scratch; a model name or path starts every rung from those pretrained weights; a mapping
    rung -> model makes a pretrained ladder (each rung mid-trained from its own checkpoint)."""
    log_every: int = 1
    """Log train metrics every this many steps."""

    def __post_init__(self):
        if self.batch_size is None:  # resolved before the configurator's checks (the trainer reads an integer);
            #                            a batch_tokens that does not divide into sequences is refused there
            whole = bool(self.batch_tokens and self.seq_len and not self.batch_tokens % self.seq_len)
            object.__setattr__(self, "batch_size", DEFAULT_BATCH_SIZE if self.batch_tokens is None
                               else self.batch_tokens // self.seq_len if whole else None)
        super().__post_init__()
        for key in ("micro_batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"training.{key}={getattr(self, key)}: must be >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"training.min_lr_ratio={self.min_lr_ratio}: must be in [0, 1] (0 decays to zero)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"training.dropout={self.dropout}: must be in [0, 1)")
        if isinstance(self.init_from, dict) and not self.init_from:
            raise ConfigError("training.init_from is an empty mapping; map rung names to checkpoints or use null")
        if any(not 0 <= beta < 1 for beta in self.betas):
            raise ConfigError(f"training.betas={list(self.betas)}: each AdamW beta must be in [0, 1), e.g. [0.9, 0.95]")
        if self.weight_decay >= 1:
            raise ConfigError(f"training.weight_decay={self.weight_decay}: must be in [0, 1) (AdamW's decoupled "
                              "decay; the paper's 0.1)")
        checkpoints = self.init_from.items() if isinstance(self.init_from, dict) else [(None, self.init_from)]
        for rung, checkpoint in checkpoints:
            check_local_model(f"training.init_from{'.' + rung if rung else ''}", checkpoint)

    def identity(self) -> dict[str, Any]:
        """What a run's config hash covers of these settings: every key, less those added since runs were first
        hashed while they hold their defaults, so an earlier study's runs keep their hashes (and resume)."""
        plain = dataclasses.asdict(self)
        for key, default in LATER_KEYS.items():
            if plain[key] == default:
                del plain[key]
        return plain

    def init_from_for(self, rung: str) -> str | None:
        """The checkpoint a rung starts from (None: from scratch)."""
        if isinstance(self.init_from, dict):
            return self.init_from.get(rung)
        return self.init_from


@dataclass(frozen=True)
class ProbeConfig:
    every_steps: int | None = 0
    """Validation loss and condensation probe every this many steps, and at the last step; 0: only at the last
    step; null: every floor(steps / 5) + 1 (`scaling.cadence`, the same rule as eval and checkpoint)."""
    texts: int = 8
    """Number of fixed probe texts."""
    max_length: int = 128
    """Tokens per probe text (the first max_length tokens of each)."""
    source: str | None = None
    """Where the probe texts come from: null, the training data (consecutive rows from a seeded start until 1024
    words); or any text source (`wikitext` is wikitext-103-v1's train split, the paper's figures; bundled,
    pubmed_qa, imdb, squad, hf:NAME[/CONFIG]:SPLIT:FIELD, a .txt/.jsonl file) read with the authors' sampler
    (`scaling.data.sample_reference_texts`)."""
    val_batches: int | None = None
    """null (default): `val/loss` over the whole validation split at every probe. A number: that many
    micro-batches per worker, of blocks spread evenly over the split (a sample; `val/loss_se` states its
    standard error)."""
    at_start: bool = False
    """Also probe at step 0: the initial state (condensation at initialisation, the pretrained row)."""

    def __post_init__(self):
        cadence.check_every_steps("probes.every_steps", self.every_steps)
        for key in ("texts", "max_length", "val_batches"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"probes.{key}={getattr(self, key)}: must be >= 1")
        if self.texts > 100_000 or (self.val_batches or 0) > 100_000:
            raise ConfigError(f"probes: texts={self.texts} and val_batches={self.val_batches} must be at most 100000 "
                              "(every probe runs them all)")
        if self.source is not None:
            try:
                parse_text_source(self.source)
            except DispersionScalingError as exc:
                raise ConfigError(f"probes.source={self.source!r}: {exc}") from None


CHAIN_ORDERS = ("longest_first", "plan")
FINISH_RECORDS = ("auto", "beside_next", "in_slot")


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
    chain_order: str = "longest_first"
    """How runs that queue for the cluster are dealt to the chains of worker groups: `longest_first` (by
    parameters x tokens, in a snake, so the chains end together) or `plan` (in turn, in plan order)."""
    finish_records: str = "auto"
    """When a run with a successor in its chain finishes its records (last evaluations, MLflow flush,
    outcome): `beside_next` gives the worker group to the next run at its last step and finishes them on a
    thread beside it; `in_slot` holds the group until they are in; `auto` (default) is `beside_next` on GPUs
    (the training device would idle while the evaluations run on their own) and `in_slot` on CPUs, where the
    evaluations share the training's cores: on 2 cores a third busy process made the study 3-15% longer
    (`bench/README.md`)."""

    def __post_init__(self):
        if self.chain_order not in CHAIN_ORDERS:
            raise ConfigError(f"resources.chain_order={self.chain_order!r}: use one of {list(CHAIN_ORDERS)}")
        if self.finish_records not in FINISH_RECORDS:
            raise ConfigError(f"resources.finish_records={self.finish_records!r}: use one of {list(FINISH_RECORDS)}")
        if self.num_workers < 1:
            raise ConfigError(f"resources.num_workers={self.num_workers}: must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"resources.zero_stage={self.zero_stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"resources.precision={self.precision!r}: use one of {list(PRECISIONS)}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"resources.cpus_per_worker={self.cpus_per_worker}: must be > 0")
        if self.num_workers > MAX_WORKERS or self.cpus_per_worker > MAX_WORKERS:
            raise ConfigError(f"resources: num_workers={self.num_workers} and cpus_per_worker={self.cpus_per_worker:g} "
                              f"must be at most {MAX_WORKERS} (no cluster schedules more)")

    @property
    def finishes_beside_next(self) -> bool:
        """`finish_records` resolved: True when a run with a successor finishes its records beside it."""
        return self.finish_records == "beside_next" or (self.finish_records == "auto" and self.use_gpu)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = 0
    """Save a DeepSpeed checkpoint every this many steps, and at the last step; 0: only at the last step; null:
    every floor(steps / 5) + 1 (`scaling.cadence`, the same rule as probes and eval)."""
    num_to_keep: int = 2
    """Complete checkpoints kept in each run's folder (the newest ones)."""
    max_failures: int = 1
    """Restarts of a worker group after a worker dies (Ray Train FailureConfig); the group resumes its run
    from the latest checkpoint. A chain of runs shares one group, so it shares these restarts."""

    def __post_init__(self):
        cadence.check_every_steps("checkpoint.every_steps", self.every_steps)
        if self.num_to_keep < 1 or self.max_failures < 0:
            raise ConfigError(
                f"checkpoint: num_to_keep={self.num_to_keep} (>= 1), max_failures={self.max_failures} (>= 0): "
                "fix the value out of range"
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
    reuse_worker_groups: bool = True
    """Train trial after trial in the same Ray Train worker groups (start-up paid once per group); false
    starts a group per trial (slower for short trials; the benchmark's baseline). Not part of the sweep's
    identity: a resumed sweep may change it."""
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
        if self.metric.startswith(f"{names.EVAL_PREFIX}/"):
            raise ConfigError(f"search.metric={self.metric!r}: downstream evaluations run beside training and "
                              "report after the probes ASHA decides on; search on val/loss (or a condensation "
                              "metric) and compare the finished runs' eval/selection_mean_acc in the analysis")
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
    tie_embeddings: bool | None = None
    """Output head shared with the token embedding: null keeps each rung's own (the ladder ties GPT-2 and Qwen3 up
    to 4B); false unties every rung (the authors' from-scratch Qwen3, ~101.7M parameters: docs/protocols.md)."""
    arms: tuple[ArmConfig, ...] = (ArmConfig(name="baseline"), ArmConfig(name="dispersion"))
    seeds: tuple[int, ...] = (0,)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig | None = None
    """Downstream evaluation with lm-eval-harness during training (`scaling.evaluate`); null: none."""
    decide: DecideConfig | None = None
    """Claims to decide, with error rates and a budget: the study adds seeds in waves until they are decided
    (`scaling.sequential`); null: train `seeds` once."""
    storage_path: str = "runs"
    """Ray Train storage: a local folder (relative to the working directory) or s3://..."""
    tracking_uri: str | None = None
    """MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory."""

    def __post_init__(self):
        check_path_name("study", self.study)
        if not self.arms:
            raise ConfigError("arms: empty; list at least one arm, e.g. [baseline, dispersion]")
        arm_names = [a.name for a in self.arms]
        if len(set(arm_names)) != len(arm_names):
            raise ConfigError(f"arms: {arm_names} lists an arm twice; each arm once")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={list(self.seeds)[:8]}: give one or more distinct integers")
        if set(self.search.extra_seeds) & set(self.seeds):
            raise ConfigError(f"search.extra_seeds={list(self.search.extra_seeds)[:8]} repeats a seed of seeds="
                              f"{list(self.seeds)[:8]}: extra seeds re-run the best settings with new seeds")
        batch = (f"training.batch_size={self.training.batch_size}" if self.training.batch_tokens is None else
                 f"training.batch_tokens={self.training.batch_tokens} ({self.training.batch_size} sequences)")
        if self.training.micro_batch_size * self.resources.num_workers > self.training.batch_size:
            raise ConfigError(
                f"{batch} is smaller than micro_batch_size "
                f"({self.training.micro_batch_size}) x num_workers ({self.resources.num_workers}); raise it"
            )
        if self.training.batch_size % (self.training.micro_batch_size * self.resources.num_workers):
            raise ConfigError(
                f"{batch} must be a multiple of micro_batch_size x "
                f"num_workers = {self.training.micro_batch_size * self.resources.num_workers}"
            )
        if any(a.name == names.ARM_ACTIVE_FORGETTING for a in self.arms) and self.resources.zero_stage == 3:
            raise ConfigError(
                "arms: active_forgetting re-initialises the input embeddings, which ZeRO-3 keeps partitioned "
                "across workers; use resources.zero_stage 0, 1 or 2"
            )
        rungs = self.selected_rungs()  # raises on an unknown ladder or rung
        for rung in rungs:  # the model has max_seq_len positions: a longer block or probe has no position to use
            for key, length in (("training.seq_len", self.training.seq_len), ("probes.max_length", self.probes.max_length)):
                if length > rung.max_seq_len:
                    raise ConfigError(f"{key}={length} is longer than rung {rung.name}'s context ({rung.max_seq_len} "
                                      f"tokens); use at most {rung.max_seq_len} or drop the rung")
        if self.tie_embeddings is not None and self.training.init_from:
            raise ConfigError(f"tie_embeddings={self.tie_embeddings}: a pretrained model (training.init_from) "
                              "keeps its own output head; use null, or train from scratch (init_from: null)")
        if isinstance(self.training.init_from, dict):
            missing = [r.name for r in rungs if r.name not in self.training.init_from]
            unknown = sorted(set(self.training.init_from) - {r.name for r in rungs})
            if missing or unknown:
                raise ConfigError(f"training.init_from maps rungs to checkpoints but {'misses ' + str(missing) if missing else ''}"
                                  f"{' and ' if missing and unknown else ''}{'names unknown rungs ' + str(unknown) if unknown else ''}; "
                                  f"give one checkpoint per rung of {[r.name for r in rungs]}")
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
        if self.decide is not None:
            self._check_decide(arm_names, len(rungs))

    def _check_decide(self, arm_names: list[str], rungs: int) -> None:
        """Every stated claim must be testable by this study's design, before anything trains."""

        if self.search.num_samples:
            raise ConfigError("decide: a study that searches the dispersion arm (search.num_samples > 0) has no fixed "
                              "paired arms to add seeds to; set search.num_samples: 0 or drop decide")
        for key in self.decide.claims:
            needs = None
            if key in PAIRED_CLAIMS and not {names.ARM_BASELINE, names.ARM_DISPERSION} <= set(arm_names):
                needs = f"paired arms {names.ARM_BASELINE} and {names.ARM_DISPERSION} (arms: {arm_names})"
            elif key in SLOPE_CLAIMS and rungs < 3:
                needs = f"a slope over at least 3 rungs (the study has {rungs})"
            elif key == "f" and self.eval is None:
                needs = "downstream accuracy (an eval section)"
            elif key == "a" and self.training.init_from:
                needs = "random initialisation (this study starts from training.init_from)"
            elif key == "a" and not self.probes.at_start:
                needs = "a step-0 probe (probes.at_start: true)"
            if needs:
                raise ConfigError(f"decide.claims: claim {key!r} needs {needs}; drop it from decide.claims or change the study")
        plan_waves(self.decide, self.seeds, rungs, len(self.arms))  # a budget below the first wave fails here

    def selected_rungs(self) -> list[Rung]:
        """The rungs this study trains, in ladder order unless `rungs` lists them."""
        ladder = get_ladder(self.ladder)
        rungs = [ladder.rung(name) for name in self.rungs] if self.rungs else list(ladder.rungs)
        if self.tie_embeddings is None:
            return rungs
        return [with_tied_embeddings(rung, self.tie_embeddings) for rung in rungs]

    def arm(self, name: str) -> ArmConfig:
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise ConfigError(f"arm {name!r} is not in this study; it has {[a.name for a in self.arms]}")

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)

    def record_params(self) -> dict[str, Any]:
        """The study's settings as flat MLflow params of its parent run: each arm with only what applies
        to it, the search only when there is one."""
        plain = self.to_dict()
        plain["arms"] = {arm.name: arm.settings() or "-" for arm in self.arms}
        if not self.search.num_samples:
            del plain["search"]
        if self.decide is None:
            del plain["decide"]
        for key in ("tracking_uri", "storage_path"):  # never a password in a record
            plain[key] = redact_credentials(plain[key])
        return flatten(plain)

    def to_yaml(self) -> str:
        """The study with every default filled in."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def check_local_model(key: str, reference: str | None) -> None:
    """A model reference that is a local path (./x, ../x, /x, ~/x, or an existing folder) must be a model folder
    (config.json, as `save_pretrained` writes); a hub name (`gpt2`, `Qwen/Qwen3-0.6B`) is checked when it loads."""
    if not reference or "://" in reference:
        return
    path = Path(reference).expanduser()
    if not (reference.startswith(("./", "../", "/", "~")) or path.exists()):
        return
    if not path.is_dir():
        raise ConfigError(f"{key}={reference!r}: no such model folder; check the path (relative paths are from the "
                          "working directory) or give a hub name such as gpt2")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}={reference!r} is not a model folder (no config.json); give a folder written by "
                          "save_pretrained, or a hub name such as gpt2")


def plan_runs(study: StudyConfig) -> list[RunPlan]:
    """The RunPlan of every selected rung (token budget, batch, steps, lr), the study's caps applied."""
    return [study.training.plan(rung, num_workers=study.resources.num_workers) for rung in study.selected_rungs()]


_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


def redact_credentials(text: str | None) -> str | None:
    """Text with the user:password part of every URI in it masked (http://user:pw@host -> http://***@host):
    what a study records (params, the study file) never carries a password."""
    return _CREDENTIALS.sub(r"\1***@", text) if text else text


FEW_STEPS = 100
"""A rung whose budget gives fewer optimizer steps than this is flagged by the dry run: its warmup
and schedule barely happen, so what it measures is mostly the initialisation."""


def describe_study_plan(study: StudyConfig, plans: list[RunPlan], gpu: str | None = "H100", mfu: float = 0.4,
                        gpu_memory: float | None = None) -> str:
    """The dry run as a user reads it: the rung table (with each run's memory per GPU), then the study's
    totals and what to watch. `gpu` None: no GPU-hour estimate (a CPU study that did not ask for one);
    `gpu_memory`: GiB per GPU (None: the named `gpu`'s, `scaling.memory`)."""
    from scaling.ladder import format_ladder_table
    from scaling.memory import describe_memory_column

    runs_per_rung = len(study.seeds) * len(study.arms)
    hours = sum(plan.gpu_hours(gpu, mfu) for plan in plans) * runs_per_rung if gpu is not None else 0.0  # already summed over GPUs
    column, memory_line = describe_memory_column(study, plans, gpu or "H100", gpu_memory)
    lines = [format_ladder_table(plans, gpu=gpu, mfu=mfu, extra=column), memory_line, "",
             f"{len(plans) * runs_per_rung} runs: {len(plans)} rung(s) x {len(study.arms)} arm(s) "
             f"({', '.join(a.name for a in study.arms)}) x {len(study.seeds)} seed(s)"
             + (f"; about {hours:,.3g} GPU-hours in all at {mfu:.0%} MFU" if gpu is not None else "")
             + (" (the runs train on CPU here: resources.use_gpu is false)" if not study.resources.use_gpu else "")]
    if study.decide is not None:

        lines += describe_plan(plan_waves(study.decide, study.seeds, len(plans), len(study.arms)), study.decide)
    families = sorted({plan.rung.family for plan in plans})
    for arm in study.arms:
        resolved = {family: arm.for_family(family) for family in families}
        if arm.name == names.ARM_DISPERSION:
            lines.append("dispersion: " + ", ".join(
                f"{family} clamp {r.clamp_threshold:g}" + (" (family default)" if arm.clamp_threshold is None else "")
                for family, r in resolved.items()) + f"; lambda {arm.lam:g}, layers {arm.layers}, last block "
                f"{arm.last_block_output}")
        if arm.name == names.ARM_NEFTUNE:
            lines.append("neftune: " + ", ".join(
                f"{family} alpha {r.neftune_alpha:g}" + (" (family default)" if arm.neftune_alpha is None else "")
                for family, r in resolved.items()))
    if study.eval is not None:
        evaluation = study.eval
        steps = evaluation.eval_steps(plans[0].steps) if plans else ()
        shots = sorted({evaluation.fewshot_for(task) for task in evaluation.task_names()})
        lines.append(f"evaluation: {', '.join(evaluation.tasks)} ({len(evaluation.task_names())} tasks, "
                     f"{'/'.join(str(s) for s in shots)}-shot, limit {evaluation.limit or 'all'}) at steps "
                     f"{', '.join(str(s) for s in steps[:8])}{' ...' if len(steps) > 8 else ''}; each on "
                     f"{evaluation.num_cpus:g} CPU(s) + {evaluation.num_gpus:g} GPU(s) beside its run")
    if study.training.init_from:
        lines.append("mid-training from: " + ", ".join(
            f"{plan.rung.name} <- {study.training.init_from_for(plan.rung.name)}" for plan in plans))
    for plan in plans:
        if plan.steps < FEW_STEPS:
            lines.append(f"warning: rung {plan.rung.name} trains only {plan.steps} steps ({plan.warmup_steps} of "
                         f"warmup): too few for the schedule to matter; raise its budget or drop the rung")
    return "\n".join(lines)


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


