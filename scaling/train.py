"""What one training run is made of: its task (`RunTask`), its schedule and optimizer groups, its DeepSpeed
config, its data order, its arm's hooks (NEFTune, active forgetting), its model and the probe's arithmetic.

`scaling.run_loop` puts these together on each Ray Train worker: build the model (seeded, so paired arms
start identical), wrap it with DeepSpeed, restore the run's latest checkpoint from its own folder, then
step through a data order fixed by the seed (so paired arms see identical batches). Nothing here talks to
Ray, MLflow or the run's folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from scaling import names
from scaling.ladder import split_weight_decay

if TYPE_CHECKING:
    from ray import ObjectRef

    from scaling.config import ArmConfig, ProbeConfig, ResourcesConfig, TrainingConfig
    from scaling.evaluate import EvalConfig
    from scaling.faults import Fault
    from scaling.ladder import Rung


class Blocks(Protocol):
    """Token blocks [n, seq_len] as the workers read them (an array, or a view of the study's token shards):
    indexed by an array of block indices, they give those blocks' token ids."""

    shape: tuple[int, ...]

    def __getitem__(self, indices: Any) -> np.ndarray: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class RunTask:
    """Everything one run's workers need, resolved by the driver (`scaling.runs.build_task`)."""

    run_name: str
    run_id: str
    tracking_uri: str
    folder: str
    """The run's own folder on the storage (`scaling.run_folder`): checkpoints, outcome, spill, exports."""
    rung: Rung
    arm: ArmConfig
    seed: int
    steps: int
    lr: float
    warmup_steps: int
    training: TrainingConfig
    probes: ProbeConfig
    resources: ResourcesConfig
    checkpoint_every: int | None
    """`checkpoint.every_steps` (`scaling.cadence`)."""
    checkpoints_to_keep: int
    train_blocks: Blocks | ObjectRef
    val_blocks: Blocks | ObjectRef
    probe_ids: list[np.ndarray] | ObjectRef
    """The probe texts' token ids, one array each."""
    init_from: str | None = None  # the rung's pretrained checkpoint (None: from scratch)
    evaluation: EvalConfig | None = None  # absolute paths; None: no downstream evaluation
    tokenizer_uri: str | None = None  # the study's tokenizer folder on shared storage (evaluations need it)
    pad_token_id: int | None = None  # the tokenizer's pad token, else EOS: the row active forgetting zeroes
    faults: tuple[Fault, ...] = ()  # injected by tests, empty otherwise
    record: dict[str, Any] | None = None
    """With run_id "": what rank 0 creates the MLflow run from when the run starts (`scaling.runs.open_record`)."""
    queued_since: float = 0.0  # epoch s its chain was submitted: time/queued_s (0: not measured)


# --- schedule and DeepSpeed config -----------------------------------------------------------


def lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup to the peak, then cosine decay to min_ratio * peak at the last step. Step s of the
    warmup runs at s / warmup, as Hugging Face's schedules (the first update at lr 0)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def linear_lr_at(step: int, *, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup (s / warmup) to the peak, then linear decay to 0 at the last step."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * step / warmup_steps
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def forgetting_embedding_lr_at(step: int, *, peak: float, warmup_fraction: float, total_steps: int,
                               forget_every: int) -> float:
    """Active forgetting's embedding schedule as the reference indexes it (language-model-plasticity's):
    the linear warmup-decay of `linear_lr_at`, at index ((step + 1) x floor(T / K)) mod T for T steps and
    forgetting every K, so each forgetting period runs through the whole warmup-decay again. The
    warmup is floor(T x warmup_fraction) steps; while T < 2K the index is just step + 1 (and with T < K
    it stays 0: the embeddings never move, as in the reference)."""
    index = ((step + 1) * (total_steps // forget_every)) % total_steps
    return linear_lr_at(min(index, total_steps - 1), peak=peak, total_steps=total_steps,
                        warmup_steps=int(total_steps * warmup_fraction))


def build_param_groups(model, task: RunTask) -> list[dict[str, Any]]:
    """AdamW groups: decayed matrices, undecayed biases/norms, and (active forgetting)
    the input embeddings alone, last (index 2), with their own peak lr when the arm gives one.

    A group of its own lets a forgetting step reset exactly the embeddings' optimizer state:
    DeepSpeed's ZeRO and mixed-precision optimizers keep each group in buffers of its own.
    """
    embedding = model.get_input_embeddings().weight if separate_embedding_group(task) else None
    named = [(n, p) for n, p in model.named_parameters() if p is not embedding]
    decay, no_decay = split_weight_decay(named)
    groups = [{"params": decay, "weight_decay": task.training.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if embedding is not None:
        groups.append({"params": [embedding], "weight_decay": task.training.weight_decay,
                       "lr": task.arm.embedding_lr or task.lr})
    return groups


EMBEDDING_GROUP = 2
"""Index of the input embeddings' own optimizer group (active forgetting)."""


def separate_embedding_group(task: RunTask) -> bool:
    return task.arm.name == names.ARM_ACTIVE_FORGETTING


def build_lr_lambdas(task: RunTask) -> list:
    """One multiplier schedule per group of `build_param_groups` (LambdaLR scales each group's lr)."""
    main = lambda s: lr_at(s, peak=1.0, warmup_steps=task.warmup_steps, total_steps=task.steps,  # noqa: E731
                           min_ratio=task.training.min_lr_ratio)
    lambdas = [main, main]
    if separate_embedding_group(task):
        if task.arm.embedding_lr is None:
            lambdas.append(main)
        else:
            lambdas.append(lambda s: forgetting_embedding_lr_at(
                s, peak=1.0, warmup_fraction=task.arm.embedding_warmup_fraction, total_steps=task.steps,
                forget_every=task.arm.forget_every))
    return lambdas


def build_deepspeed_config(task: RunTask, world_size: int, on_gpu: bool) -> dict[str, Any]:
    training, resources = task.training, task.resources
    accumulation = training.batch_size // (training.micro_batch_size * world_size)
    bf16 = resources.precision == "bf16" or (resources.precision == "auto" and on_gpu)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": training.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": training.batch_size,
        "gradient_clipping": training.grad_clip,
        "zero_optimization": {"stage": resources.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # progress is ours; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if resources.zero_stage == 3:
        # Gather weights to rank 0 on save, so a checkpoint also holds loadable full weights.
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-builds a shared-memory op (~55 s once per machine) used only
    for inference all-reduce; training does not need it, and works without it on gloo."""
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


# --- the data order ---------------------------------------------------------------------------


class DataOrder:
    """Which training blocks make up each global batch: a permutation per epoch seeded by
    (seed, epoch), so every arm with the same seed sees the same batches in the same order."""

    def __init__(self, n_blocks: int, batch_size: int, seed: int):
        if n_blocks < batch_size:
            from scaling.errors import DataError

            raise DataError(f"{n_blocks} training blocks cannot fill one batch of {batch_size}; "
                            "use more text, a shorter seq_len or a smaller batch_size")
        self.n_blocks, self.batch_size, self.seed = n_blocks, batch_size, seed
        self.batches_per_epoch = n_blocks // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return self._perm[position * self.batch_size:(position + 1) * self.batch_size]


# --- arms -----------------------------------------------------------------------------------


class _ArmHooks:
    def __init__(self, after_step=None):
        self._after_step = after_step

    def after_step(self, step, engine):
        if self._after_step is not None:
            self._after_step(step, engine)


def install_arm_hooks(model, task: RunTask) -> _ArmHooks:
    """NEFTune noise on the input embeddings, or active forgetting of them (docs/protocols.md)."""
    import torch

    arm = task.arm
    embeddings = model.get_input_embeddings()
    if arm.name == names.ARM_NEFTUNE:
        def add_noise(module, inputs, output):
            if not module.training:
                return output
            seq_len, hidden = output.shape[-2], output.shape[-1]
            magnitude = arm.neftune_alpha / math.sqrt(seq_len * hidden)
            return output + torch.empty_like(output).uniform_(-magnitude, magnitude)

        embeddings.register_forward_hook(add_noise)
    if arm.name == names.ARM_ACTIVE_FORGETTING:
        def forget(step, engine):
            if step % arm.forget_every == 0:
                forget_input_embeddings(engine, seed=task.seed, step=step, pad_token_id=task.pad_token_id)

        return _ArmHooks(forget)
    return _ArmHooks()


def fresh_embeddings(shape, *, seed: int, step: int, padding_idx: int | None):
    """N(0, 0.02) embeddings drawn from (seed, step), the padding row zeroed: every rank draws the same."""
    import torch

    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    weight = torch.empty(shape, dtype=torch.float32).normal_(0.0, 0.02, generator=generator)
    if padding_idx is not None and 0 <= padding_idx < shape[0]:
        weight[padding_idx] = 0.0
    return weight


def zeroed_row(embeddings, pad_token_id: int | None) -> int | None:
    """The row a re-initialisation zeroes, as the reference: the embedding's padding_idx when it has one,
    else the tokenizer's pad token (EOS for GPT-2, whose `wte` has no padding_idx)."""
    padding_idx = getattr(embeddings, "padding_idx", None)
    return padding_idx if padding_idx is not None else pad_token_id


def forget_input_embeddings(engine, *, seed: int, step: int, pad_token_id: int | None = None) -> None:
    """Active forgetting: re-initialise the input embeddings and forget their optimizer state.

    What the next forward uses must be the fresh weights, whatever DeepSpeed keeps: the module's
    weight (bf16 under mixed precision) and every float32 master copy of it (the unfused
    mixed-precision optimizer's per-parameter copies, the fused one's flat group, ZeRO 1-2's
    partitions), or the next step would write the old weights back. The embeddings' Adam moments
    and step count (their own group, `EMBEDDING_GROUP`) are zeroed in place: DeepSpeed keeps views
    into them.
    """
    import torch
    from deepspeed.utils import safe_set_full_fp32_param

    embeddings = engine.module.get_input_embeddings()
    weight = embeddings.weight
    fresh = fresh_embeddings(tuple(weight.shape), seed=seed, step=step,
                             padding_idx=zeroed_row(embeddings, pad_token_id)).to(weight.device)
    wrapper = engine.optimizer
    with torch.no_grad():
        weight.copy_(fresh.to(weight.dtype))
        safe_set_full_fp32_param(weight, fresh)  # ZeRO 1-2 partitions, DeepSpeed's BF16_Optimizer
        for i, group in enumerate(getattr(wrapper, "fp16_groups", ())):  # DeepSpeed's fp16/bf16 wrappers
            for j, parameter in enumerate(group):
                if parameter is weight and hasattr(wrapper, "fp32_groups"):
                    wrapper.fp32_groups[i][j].copy_(fresh)
                elif parameter is weight and hasattr(wrapper, "fp32_groups_flat"):
                    wrapper.fp32_groups_flat[i].copy_(fresh.flatten())
    inner = getattr(wrapper, "optimizer", wrapper)
    for parameter in inner.param_groups[EMBEDDING_GROUP]["params"]:
        for value in inner.state.get(parameter, {}).values():
            if torch.is_tensor(value):
                value.zero_()


def initial_model(task: RunTask):
    """From scratch: the rung's shape, initialised from the seed. Mid-training (training.init_from):
    the rung's pretrained checkpoint, as the paper's GPT-2 / Qwen3 runs start."""
    if task.init_from:
        from scaling.model import build_causal_lm

        model = build_causal_lm(task.init_from, device="cpu", dtype="float32").model.train()
    else:
        from scaling.ladder import build_model

        model = build_model(task.rung, seed=task.seed, dropout=task.training.dropout)
    if task.training.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


@contextlib.contextmanager
def last_hidden_state_raw(module, raw: bool):
    """While active, the model's last hidden state is its last block's raw output, not the final-norm
    output Hugging Face puts there (transformers reads `config.tie_last_hidden_states` per call)."""
    if not raw:
        yield
        return
    saved = getattr(module.config, "tie_last_hidden_states", None)
    module.config.tie_last_hidden_states = False
    try:
        yield
    finally:
        module.config.tie_last_hidden_states = saved


def engine_precision(engine) -> str:
    import torch

    return "bf16" if next(engine.module.parameters()).dtype == torch.bfloat16 else "fp32"


def dispersion_layers(task: RunTask, n_blocks: int):
    if task.arm.name != names.ARM_DISPERSION:
        return None
    from scaling.dispersion_spec import resolve_layers

    return resolve_layers(task.arm.layers, n_blocks)


# --- probes and checkpoints ---------------------------------------------------------------------


def validation_indices(n_blocks: int, micro: int, world: int, val_batches: int | None) -> np.ndarray:
    """The validation blocks a probe averages: all of them (`probes.val_batches` null), or val_batches x
    micro x world blocks spread evenly over the split (validation text is in file order: the first blocks
    would be one stretch of it)."""
    wanted = n_blocks if val_batches is None else min(n_blocks, val_batches * micro * world)
    if wanted >= n_blocks:
        return np.arange(n_blocks)
    return np.unique(np.linspace(0, n_blocks - 1, wanted).round().astype(np.int64))


def block_losses(logits, ids):
    """Each block's mean next-token cross-entropy, in float32 (what Hugging Face's loss averages)."""
    import torch

    shifted = logits[:, :-1].float()
    losses = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="none")
    return losses.view(ids.shape[0], -1).mean(dim=1).double()


def mean_and_standard_error(total: float, total_squares: float, count: float) -> tuple[float, float]:
    """Mean of per-block values from their sum and sum of squares, and its standard error (sample standard
    deviation / sqrt(n); 0 for one block)."""
    mean = total / count
    if count < 2:
        return mean, 0.0
    variance = max(0.0, (total_squares - count * mean * mean) / (count - 1))
    return mean, math.sqrt(variance / count)


def float32_model(engine):
    """The trained model in float32 for measurement: the module itself when it trains in float32
    (under ZeRO-3 its forward gathers the weights), else `full_model` in float32."""
    import torch

    module = engine.module
    if next(module.parameters()).dtype == torch.float32:
        return module
    return full_model(engine, dtype=torch.float32)


def full_model(engine, dtype):
    """The trained model with all its weights, in `dtype`: the module itself when it holds them in
    that dtype, else a copy built from DeepSpeed's float32 master weights (gathered under ZeRO-3).
    Every rank must call this: gathering a partitioned weight is a collective."""
    import torch
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    first = next(module.parameters())
    if first.dtype == dtype and not hasattr(first, "ds_id"):
        return module
    copy = type(module)(module.config).to(device=first.device, dtype=torch.float32).eval()
    own = dict(copy.named_parameters())
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            master = safe_get_full_fp32_param(parameter)
            own[name].copy_(master if master is not None else parameter.float())
    return copy.to(dtype)


# --- small helpers ---------------------------------------------------------------------------


def num_params(task: RunTask) -> int:
    from scaling.ladder import count_params

    return count_params(task.rung).total


def resolve(value):
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def state_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def chain_hash(previous: str, indices: np.ndarray) -> str:
    """Data-order fingerprint, chained step by step so that it survives a resume unchanged."""
    return hashlib.sha256(previous.encode() + indices.astype(np.int64).tobytes()).hexdigest()[:32]

