"""Memory plan of a run: what one GPU must hold, from the rung's shape and the run's settings (pure Python).

A run that cannot fit its GPU is refused before any GPU is rented (the dry run) and again before any
worker starts on a cluster (the preflight), with the smallest change of settings that fits; the dry
run also prints the per-GPU figure of every rung.

What one GPU holds, in bytes (P parameters, N GPUs of the run, DeepSpeed ZeRO stage z):

- **model states** (weights, gradients, optimizer states) as DeepSpeed's own estimators count them
  (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`, offload off):
  under bf16 mixed precision, 2 bytes of bf16 weights, 2 of bf16 gradients, 4 of float32 gradients,
  4 of float32 master weights and 8 of Adam moments: ZeRO-0 20P (nothing partitioned; DeepSpeed's
  bf16 optimizer partitions its master weights over data-parallel ranks, which we leave as margin),
  ZeRO-1 4P + 16P/N, ZeRO-2 2P + 18P/N, ZeRO-3 18P/N + 4 x the largest layer (gathered
  for its forward). In float32: 4 + 4 + 8
  bytes, i.e. 16P, 8P + 8P/N, 4P + 12P/N, 16P/N + 4 x largest layer. Offload is not modelled: the
  training loop does not offer it.
- **activations** of one micro batch of b sequences of s tokens, per layer and token (Korthikanti et
  al. 2022, "Reducing Activation Recomputation in Large Transformer Models", 34 h bytes for GPT-2
  with memory-efficient attention: no s x s score matrix, as PyTorch's SDPA on a GPU), generalised to
  the rung's MLP width and grouped-query heads; with gradient checkpointing, one layer input per
  layer plus one layer's full set (recomputed in the backward pass).
- **logits**: b x s x vocab x 12 bytes (the logits in training precision, their float32 upcast for
  the loss and its gradient), the largest single tensor of a large-vocabulary model.
- **dispersion**: the dispersion arm's token-pair matrices (at most 256 tokens per sequence, float32,
  ~6 live per selected layer) and its float32 copies of the hidden states.
- **probe**: the condensation probe measures in float32 (`scaling.train.float32_model`): under bf16
  it holds a float32 copy of the whole model (4P) beside the model states, plus every layer's hidden
  state of one probe text; the validation loss forward holds one micro batch's logits.
- **runtime**: CUDA context, NCCL and DeepSpeed buffers, allocator slack: `RUNTIME_GIB` flat.

The peak is the larger of the training step (model states + activations + logits + dispersion) and
the probe (model states + probe). Figures are estimates, meant to refuse what clearly cannot fit and
to name what would; a run near the line (`MARGIN`) is refused too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterable

from scaling.errors import ConfigError
from scaling.ladder import count_params

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from scaling.ladder import RunPlan, Rung

StudyConfig = Any  # scaling.config.StudyConfig, which imports this module (no import back)

GIB = 2**30

GPU_MEMORY_GIB: dict[str, float] = {
    # What the driver reports as the card's total (nvidia-smi's MiB / 1024), the SXM parts.
    "H100": 81559 / 1024,
    "H100-80GB": 81559 / 1024,
    "H200": 143771 / 1024,
    "H200-141GB": 143771 / 1024,
    "A100": 40960 / 1024,  # a bare A100 is taken as the 40 GB part; name A100-80GB for the larger one
    "A100-40GB": 40960 / 1024,
    "A100-80GB": 81920 / 1024,
    "L4": 23034 / 1024,
    "L40S": 46068 / 1024,  # clusters/aws.yaml's one-GPU nodes (g6e)
    "A10G": 23028 / 1024,
}
"""GPU memory per named GPU, in GiB (`--gpu NAME`, or a number of GiB)."""

RUNTIME_GIB = 2.0
"""CUDA context, NCCL and DeepSpeed buffers and allocator slack, per GPU."""
MARGIN = 0.05
"""Fraction of the GPU's memory kept free: fragmentation, and what the estimate leaves out."""
LOGIT_BYTES = 12
"""Bytes per logit in a training step (training-precision logits, float32 upcast, its gradient)."""
DISPERSION_MAX_TOKENS = 256
"""Token positions per sequence the dispersion loss uses (`scaling.dispersion.DispersionOptions.max_tokens`)."""
MAX_GPUS_PER_RUN = 64
"""The refusal's search for a fitting placement stops at this many GPUs per run."""


@dataclass(frozen=True)
class MemorySettings:
    """What the plan depends on, besides the rung."""

    num_gpus: int = 1
    zero_stage: int = 0
    mixed_precision: bool = True
    """bf16 weights and activations over float32 master weights (resources.precision bf16, or auto on a GPU)."""
    micro_batch_size: int = 1
    seq_len: int = 1024
    gradient_checkpointing: bool = False
    dispersion_layers: int = 0
    """Layers the dispersion loss reads (0: no dispersion arm)."""
    probe_tokens: int = 0
    """Tokens of the longest probe text."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one GPU holds for a run, by part (see the module docstring)."""

    rung_name: str
    settings: MemorySettings
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    dispersion: int
    probe: int
    runtime: int

    @property
    def model_states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def training_peak(self) -> int:
        return self.model_states + self.activations + self.logits + self.dispersion + self.runtime

    @property
    def probe_peak(self) -> int:
        return self.model_states + self.probe + self.runtime

    @property
    def peak(self) -> int:
        return max(self.training_peak, self.probe_peak)

    def fits(self, gpu_gib: float) -> bool:
        return self.peak <= gpu_gib * GIB * (1 - MARGIN)

    def describe(self) -> str:
        """`71.3 GiB (states 40.1, activations 12.0, logits 7.0, probe 16.0)`."""
        parts = [("states", self.model_states), ("activations", self.activations), ("logits", self.logits)]
        if self.dispersion:
            parts.append(("dispersion", self.dispersion))
        parts.append(("probe", self.probe))
        return f"{self.peak / GIB:.1f} GiB (" + ", ".join(f"{k} {v / GIB:.1f}" for k, v in parts) + ")"


# --- the arithmetic ---------------------------------------------------------------------------------


def largest_layer_params(rung: Rung) -> int:
    """Parameters of the largest single module (its own, not its children's), as DeepSpeed's ZeRO-3
    estimator counts them: the token table or an untied head, else the widest projection."""
    d, ff = rung.d_model, rung.d_ff
    if rung.family == "gpt2":
        candidates = [rung.vocab_size * d, rung.max_seq_len * d, 3 * d * d + 3 * d, d * ff + ff]
    else:
        candidates = [rung.vocab_size * d, d * ff, d * rung.d_attn]
    return max(candidates)


def model_state_bytes(params: int, largest_layer: int, *, num_gpus: int, zero_stage: int,
                      mixed_precision: bool) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) per GPU in bytes; the parts sum to DeepSpeed's estimate
    (offload off) for stages 2 and 3. Partitioned amounts round down, as DeepSpeed's do."""
    n, p = num_gpus, params
    if mixed_precision:
        # bf16 weights 2, bf16 grads 2, float32 grads 4 (gradients), float32 master 4 + Adam 8 (optimizer)
        if zero_stage == 0:
            return 2 * p, 6 * p, 12 * p
        if zero_stage == 1:
            return 2 * p, 2 * p + 4 * p // n, 12 * p // n
        if zero_stage == 2:
            return 2 * p, 6 * p // n, 12 * p // n
        return 2 * p // n + 4 * largest_layer, 4 * p // n, 12 * p // n  # DeepSpeed's 18P/N
    # float32: weights 4, grads 4, Adam 8
    if zero_stage == 0:
        return 4 * p, 4 * p, 8 * p
    if zero_stage == 1:
        return 4 * p, 4 * p, 8 * p // n
    if zero_stage == 2:
        return 4 * p, 4 * p // n, 8 * p // n
    return 4 * p // n + 4 * largest_layer, 4 * p // n, 8 * p // n


def activation_bytes_per_token(rung: Rung, element: int) -> tuple[int, int]:
    """(one layer's saved activations, one layer's input) per token in bytes, memory-efficient attention.

    GPT-2 (Korthikanti et al. 2022 with d_ff = 4h: 34h at 2 bytes): two norm inputs, the QKV input, Q, K,
    V, the attention output, the MLP input, the GELU input and output, two 1-byte dropout masks. Qwen3:
    the same with grouped K/V, per-head q/k norms (their inputs and the rotated Q, K) and SwiGLU (gate, up,
    the activated gate, the down projection's input)."""
    h, ff, d_attn = rung.d_model, rung.d_ff, rung.d_attn
    kv = rung.kv_heads * rung.attention_head_dim
    if rung.family == "gpt2":
        saved = element * (2 * h + h + 3 * d_attn + d_attn + h + 2 * ff) + 2 * h
    else:
        saved = element * (2 * h + h + (d_attn + 2 * kv) + 2 * (d_attn + kv) + d_attn + h + 4 * ff)
    return saved, element * h


def plan_memory(rung: Rung, settings: MemorySettings) -> MemoryPlan:
    """The memory plan of one run of `rung` under `settings`."""
    s = settings
    params = count_params(rung).total
    weights, gradients, optimizer = model_state_bytes(
        params, largest_layer_params(rung), num_gpus=s.num_gpus, zero_stage=s.zero_stage,
        mixed_precision=s.mixed_precision)
    element = 2 if s.mixed_precision else 4
    tokens = s.micro_batch_size * s.seq_len
    per_layer, layer_input = activation_bytes_per_token(rung, element)
    if s.gradient_checkpointing:
        activations = tokens * (rung.n_layers * layer_input + per_layer)
    else:
        activations = tokens * rung.n_layers * per_layer
    activations += tokens * element * rung.d_model * 2  # embedding output and final norm
    logits = tokens * rung.vocab_size * LOGIT_BYTES
    dispersion = 0
    if s.dispersion_layers:
        kept = min(s.seq_len, DISPERSION_MAX_TOKENS)
        dispersion = s.dispersion_layers * s.micro_batch_size * (6 * kept * kept * 4 + 3 * kept * rung.d_model * 4)
    # The probe: a float32 copy of the model under bf16 (or gathered under ZeRO-3), every hidden state of one
    # probe text in float32 and one layer's transient activations; or the validation forward's logits.
    copy = 4 * params if (s.mixed_precision or s.zero_stage == 3) else 0
    probe_states = s.probe_tokens * ((rung.n_layers + 1) * rung.d_model * 4 + per_layer * 2)
    val_forward = tokens * rung.vocab_size * (element + 4)
    probe = max(copy + probe_states, val_forward)
    return MemoryPlan(rung_name=rung.name, settings=s, weights=weights, gradients=gradients, optimizer=optimizer,
                      activations=activations, logits=logits, dispersion=dispersion, probe=probe,
                      runtime=int(RUNTIME_GIB * GIB))


# --- GPUs ---------------------------------------------------------------------------------------------


def resolve_gpu_memory(gpu: str | float) -> float:
    """GiB of a GPU named in GPU_MEMORY_GIB (`H100-80GB`, `A100-40GB`, `H200`), or a number of GiB."""
    if isinstance(gpu, (int, float)):
        value = float(gpu)
    elif gpu in GPU_MEMORY_GIB:
        return GPU_MEMORY_GIB[gpu]
    else:
        try:
            value = float(gpu)
        except ValueError:
            value = math.nan
    if not (math.isfinite(value) and 0 < value < 10_000):
        raise ConfigError(f"GPU memory {gpu!r}: name one of {sorted(GPU_MEMORY_GIB)} or give the GiB per GPU, "
                          "e.g. --gpu-memory 80")
    return value


def gpu_from_accelerator_type(resources: dict[str, float]) -> str | None:
    """The GPU name of a Ray node's `accelerator_type:<NAME>` resource when it is one of ours (Ray says
    `A100-40G`, `A100-80G`, `H100`, ...), else None."""
    for key in resources:
        if key.startswith("accelerator_type:"):
            name = key.split(":", 1)[1].upper()
            name = name + "B" if name.endswith("G") and "-" in name else name
            if name in GPU_MEMORY_GIB:
                return name
    return None


# --- a study --------------------------------------------------------------------------------------------


def study_settings(study: StudyConfig, plan: RunPlan, *, on_gpu: bool = True) -> MemorySettings:
    """The memory settings of a study's runs of one rung (the largest over its arms)."""
    from scaling import names
    from scaling.dispersion_spec import resolve_layers

    resources, training = study.resources, study.training
    layers = max((len(resolve_layers(arm.layers, plan.rung.n_layers)) for arm in study.arms
                  if arm.name == names.ARM_DISPERSION), default=0)
    if study.search.num_samples:
        layers = plan.rung.n_layers  # a search may pick any layer set
    mixed = resources.precision == "bf16" or (resources.precision == "auto" and on_gpu)
    return MemorySettings(num_gpus=resources.num_workers, zero_stage=resources.zero_stage, mixed_precision=mixed,
                          micro_batch_size=training.micro_batch_size, seq_len=plan.seq_len,
                          gradient_checkpointing=training.gradient_checkpointing, dispersion_layers=layers,
                          probe_tokens=study.probes.max_length)


def study_memory_plans(study: StudyConfig, plans: Iterable[RunPlan]) -> list[MemoryPlan]:
    """The memory plan of every rung of the study (on GPUs: resources.precision auto means bf16)."""
    return [plan_memory(plan.rung, study_settings(study, plan)) for plan in plans]


def check_study_memory(study: StudyConfig, plans: list[RunPlan], gpu_gib: float, gpu_label: str) -> None:
    """Refuse (ConfigError) a study with a rung whose run cannot fit its GPU, naming the smallest change of
    settings that fits every rung. A study on CPUs (resources.use_gpu false) is not checked."""
    if not study.resources.use_gpu:
        return
    memory = study_memory_plans(study, plans)
    failing = [(plan, m) for plan, m in zip(plans, memory) if not m.fits(gpu_gib)]
    if not failing:
        return
    plan, worst = max(failing, key=lambda pair: pair[1].peak)
    fix = smallest_fitting_change(study, plans, gpu_gib)
    names_ = ", ".join(p.rung.name for p, _ in failing)
    raise ConfigError(
        f"resources: rung {plan.rung.name} needs ~{worst.describe()} per GPU at ZeRO-{study.resources.zero_stage} "
        f"on {study.resources.num_workers} GPU(s) but {gpu_label} has {gpu_gib:.1f} GiB (rungs that do not fit: "
        f"{names_}); " + (f"smallest change that fits every rung: {fix}" if fix else
                          "no placement up to 64 GPUs per run fits; use a GPU with more memory"))


def smallest_fitting_change(study: StudyConfig, plans: list[RunPlan], gpu_gib: float) -> str | None:
    """The fewest `--set` changes (then the cheapest) under which every rung fits: gradient checkpointing,
    a higher ZeRO stage (not 3 with active forgetting), a smaller micro batch, more GPUs per run."""
    from scaling import names

    resources, training = study.resources, study.training
    top_stage = 2 if any(a.name == names.ARM_ACTIVE_FORGETTING for a in study.arms) else 3
    base = study_memory_plans(study, plans)
    options = []
    for checkpointing in sorted({training.gradient_checkpointing, True}):
        for stage in range(resources.zero_stage, top_stage + 1):
            for workers in _doublings(resources.num_workers, MAX_GPUS_PER_RUN):
                for micro in _halvings(training.micro_batch_size):
                    if training.batch_size % (micro * workers):
                        continue
                    changes = {}
                    if checkpointing != training.gradient_checkpointing:
                        changes["training.gradient_checkpointing"] = "true"
                    if stage != resources.zero_stage:
                        changes["resources.zero_stage"] = str(stage)
                    if micro != training.micro_batch_size:
                        changes["training.micro_batch_size"] = str(micro)
                    if workers != resources.num_workers:
                        changes["resources.num_workers"] = str(workers)
                    if not changes:
                        continue
                    fits = all(plan_memory(plan.rung, replace(
                        m.settings, gradient_checkpointing=checkpointing, zero_stage=stage, num_gpus=workers,
                        micro_batch_size=micro)).fits(gpu_gib) for plan, m in zip(plans, base))
                    if fits:
                        # fewest changes, then fewest GPUs, then no recomputation, the lowest stage, the largest micro
                        options.append(((len(changes), workers, checkpointing, stage, -micro), changes))
    if not options:
        return None
    changes = min(options, key=lambda option: option[0])[1]
    line = " ".join(f"--set {key}={value}" for key, value in changes.items())
    if "resources.num_workers" in changes and study.training.lr_scaling == "sqrt_world_size":
        line += " (more GPUs raise the peak lr: training.lr_scaling is sqrt_world_size)"
    return line


def _doublings(start: int, limit: int) -> list[int]:
    values = [start]
    while values[-1] * 2 <= limit:
        values.append(values[-1] * 2)
    return values


def _halvings(start: int) -> list[int]:
    values = [start]
    while values[-1] > 1:
        values.append(max(1, values[-1] // 2))
    return sorted(set(values), reverse=True)


def gpu_capacity(gpu: str, gpu_memory: float | None = None) -> tuple[float | None, str]:
    """(GiB per GPU or None when unknown, its label) for the dry run's `--gpu NAME` / `--gpu-memory GIB`."""
    if gpu_memory is not None:
        return resolve_gpu_memory(gpu_memory), f"{gpu_memory:g} GiB GPU"
    if gpu in GPU_MEMORY_GIB:
        return GPU_MEMORY_GIB[gpu], gpu
    return None, gpu


def describe_memory_column(study: StudyConfig, plans: list[RunPlan], gpu: str, gpu_memory: float | None = None
                           ) -> tuple[tuple[str, list[str]], str]:
    """The dry run's memory column (header, a cell per rung) and the line under the table."""
    memory = [plan_memory(plan.rung, study_settings(study, plan, on_gpu=study.resources.use_gpu)) for plan in plans]
    resources, training = study.resources, study.training
    setup = (f"ZeRO-{resources.zero_stage} on {resources.num_workers} {'GPU' if resources.use_gpu else 'worker'}(s) "
             f"per run, micro batch {training.micro_batch_size} x {training.seq_len}, gradient checkpointing "
             f"{'on' if training.gradient_checkpointing else 'off'}")
    if not resources.use_gpu:
        return (("GiB/worker", [f"{m.peak / GIB:.2f}" for m in memory]),
                f"memory per worker (float32 on CPU): {setup}; no GPU to check against (resources.use_gpu is false)")
    capacity, label = gpu_capacity(gpu, gpu_memory)
    cells = [f"{m.peak / GIB:.1f}" + ("" if capacity is None or m.fits(capacity) else " NO") for m in memory]
    if capacity is None:
        return ("GiB/GPU", cells), (f"memory per GPU: {setup}; not checked: --gpu {gpu} names no memory size, "
                                    "give --gpu-memory GIB")
    verdict = ("every rung fits" if all(m.fits(capacity) for m in memory)
               else "NO marks a rung that does not fit")
    return (f"GiB/GPU({label})", cells), (
        f"memory per GPU (peak of a training step or a probe, scaling/memory.py): {setup}; against {label}'s "
        f"{capacity:.1f} GiB less {MARGIN:.0%}: {verdict}")
