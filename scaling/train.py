"""The per-worker training loop: (rung, arm, seed) runs on Ray Train workers with DeepSpeed ZeRO.

One worker group trains a chain of runs in turn (`scaling.runs` decides which). For each run, read
top to bottom: build the model (seeded, so paired arms start identical), wrap it with DeepSpeed,
restore the run's latest checkpoint from its own folder (`scaling.run_folder`), then step through a
data order fixed by the seed (so paired arms see identical batches), probing validation loss and
condensation and checkpointing at the configured steps, and write the run's outcome. Every rank
reports to Ray Train the same number of times; only rank 0 writes to MLflow.

The loop gets a plain dict (`{"tasks": [RunTask, ...]}`), so it pickles cleanly to the workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scaling import faults, names, run_folder
from scaling.console import LOG_PREFIX
from scaling.ladder import split_weight_decay


@dataclass(frozen=True)
class RunTask:
    """Everything one run's workers need, resolved by the driver."""

    run_name: str
    run_id: str
    tracking_uri: str
    folder: str
    """The run's own folder on the storage (`scaling.run_folder`): checkpoints, outcome, spill, exports."""
    rung: Any  # scaling.ladder.Rung
    arm: Any  # scaling.config.ArmConfig
    seed: int
    steps: int
    lr: float
    warmup_steps: int
    training: Any  # scaling.config.TrainingConfig
    probes: Any  # scaling.config.ProbeConfig
    resources: Any  # scaling.config.ResourcesConfig
    checkpoint_every: int
    checkpoints_to_keep: int
    train_blocks: Any  # ObjectRef or np.ndarray [n, seq_len]
    val_blocks: Any
    probe_ids: Any  # list of token-id arrays
    init_from: str | None = None  # the rung's pretrained checkpoint (None: from scratch)
    evaluation: Any = None  # scaling.evaluate.EvalConfig (absolute paths) or None: no downstream evaluation
    tokenizer_uri: str | None = None  # the study's tokenizer folder on shared storage (evaluations need it)
    pad_token_id: int | None = None  # the tokenizer's pad token, else EOS: the row active forgetting zeroes
    faults: tuple = ()  # scaling.faults.Fault: injected by tests, empty otherwise
    record: Any = None  # with run_id "": what rank 0 creates the MLflow run from when the run starts (runs.open_record)
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


# --- the loop -------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The runs of the chain in turn, in this one worker group (processes, process group and imports are
    paid once). A run that already ended (its outcome is in its folder) is skipped: that is how a worker
    group restarted by Ray Train, or a chain started again by the driver, continues where it stopped."""
    import ray.train

    tasks: list[RunTask] = loop_config["tasks"]
    rank, world, device = _worker_place()
    for index, task in enumerate(tasks):
        _run_unless_ended(task, rank, world, device, ray.train.report)
        if index < len(tasks) - 1:
            _wait_for_rank0(task)


class RunStopped(Exception):
    """The search stopped the run's trial (ASHA): every rank leaves the run at the same report."""


def serve_trials_per_worker(loop_config: dict[str, Any]) -> None:
    """A sweep's worker group: trains the trials its queue (`scaling.sweep.TrialQueue`) hands out, one after
    another, until the sweep closes the queue. Reports go to Ray Train (the ranks' barrier) and, from rank 0,
    to the trial through the queue; a trial that Tune stopped is left at its next report."""
    import ray
    import ray.train

    queue, pool = loop_config["queue"], loop_config["pool"]
    rank, world, device = _worker_place()
    while True:
        item = _from_rank0(ray.get(queue.take.remote(pool, 5.0)) if rank == 0 else None, rank, device)
        if item is None:
            continue  # nothing to train yet
        if item == "closed":
            return
        trial_id, task = item

        def report(metrics: dict[str, Any], trial_id=trial_id) -> None:
            ray.train.report(metrics)
            wanted = ray.get(queue.report.remote(trial_id, metrics)) if rank == 0 else None
            if not _from_rank0(wanted, rank, device):
                raise RunStopped(trial_id)

        try:
            _run_unless_ended(task, rank, world, device, report)
        except RunStopped:
            _log(rank, f"{task.run_name}: stopped by the search")
        _wait_for_rank0(task)
        if rank == 0:
            ray.get(queue.finish.remote(pool, trial_id))
        if loop_config.get("one_trial"):
            return  # search.reuse_worker_groups: false


def _worker_place():
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device()


def _run_unless_ended(task: RunTask, rank: int, world: int, device, send_report) -> None:
    """Train the run, or if its folder says it ended, report what it ended with (a Tune trial resumed after
    its end still gives Tune its result); then free its memory for the next run."""
    import gc

    import torch

    ended = run_folder.read_outcome(task.folder)
    if ended is not None:
        _log(rank, f"{task.run_name}: ended before ({ended['failure'] or 'finished'}), skipped")
        if ended["report"]:
            send_report(ended["report"])
        return
    try:
        _train_run(task, rank, world, device, send_report)
    finally:
        gc.collect()  # this run's engine, optimizer state and model, before the next run builds its own
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _wait_for_rank0(task: RunTask) -> None:
    """Every rank waits here until rank 0 has recorded the run (MLflow, outcome), however long its
    evaluations and an MLflow outage take: a gloo collective of the next run would time out."""
    import ray.train

    ray.train.report({"step": task.steps, "ended": task.run_name})


def _from_rank0(value, rank: int, device):
    """Rank 0's `value` on every rank."""
    import torch.distributed as dist

    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def _train_run(task: RunTask, rank: int, world: int, device, send_report) -> None:
    """One run, from its latest checkpoint (if any) to its outcome in its folder. `send_report` is
    `ray.train.report`, or a sweep's that also forwards to the trial (and raises `RunStopped`)."""
    import ray.train

    if rank == 0 and not task.run_id:  # a new run: its MLflow record starts now, when it trains
        task = dataclasses.replace(task, run_id=_open_record(task))
    started = time.perf_counter()  # after the record opened: the run's seconds match its MLflow duration
    logger = _rank0_logger(task) if rank == 0 else None
    if logger is not None:
        logger.mark_running()  # it may have waited in the chain's queue
        logger.set_tags({names.TAG_WORKER_GROUP: f"{ray.train.get_context().get_experiment_name()} pid {os.getpid()}"})
        if task.queued_since:
            logger.log_metrics({names.TIME_QUEUED_S: max(0.0, time.time() - task.queued_since)}, step=0)
    try:
        _train_steps(task, rank, world, device, logger, started, send_report)
    except RunStopped:
        if logger is not None:
            logger.close()  # what it logged until the stop
        raise


def _train_steps(task: RunTask, rank: int, world: int, device, logger, started: float, send_report) -> None:
    import torch

    on_gpu = device.type == "cuda"
    torch.manual_seed(task.seed)

    # Same seed (or the same pretrained checkpoint) -> same initial weights in every arm (hash recorded).
    model = _initial_model(task)
    init_hash = _state_hash(model)
    hooks = _install_arm_hooks(model, task)

    if not on_gpu:
        skip_cpu_shm_build()
    import deepspeed

    optimizer = torch.optim.AdamW(build_param_groups(model, task), lr=task.lr, betas=tuple(task.training.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambdas(task))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=build_deepspeed_config(task, world, on_gpu), dist_init_required=False)

    start_step, tokens_seen, order_hash = 0, 0, ""
    client_state, skipped = run_folder.restore_checkpoint(engine, task.folder, device)
    resumed = client_state is not None
    if resumed:
        if skipped:
            _log(rank, f"warning: {task.run_name} resumed from an older checkpoint; skipped: {'; '.join(skipped)}")
        start_step = int(client_state["step"])
        tokens_seen = int(client_state["tokens_seen"])
        order_hash = client_state["order_hash"]
        _log(rank, f"{task.run_name}: resumed from checkpoint at step {start_step}")
        if logger is not None:
            logger.set_tags({names.TAG_RESUMED_FROM_STEP: start_step})
            if skipped:
                logger.set_tags({names.TAG_CHECKPOINT_FALLBACK: "; ".join(skipped)[:4000]})

    train_blocks = _resolve(task.train_blocks)
    val_blocks = _resolve(task.val_blocks)
    probe_ids = _resolve(task.probe_ids)
    order = DataOrder(train_blocks.shape[0], task.training.batch_size, task.seed)
    per_rank = task.training.batch_size // world
    micro = task.training.micro_batch_size
    arm = task.arm
    disp_layers = _dispersion_layers(task, model.config.num_hidden_layers)
    tokens_per_step = task.training.batch_size * train_blocks.shape[1]
    generator = torch.Generator(device="cpu").manual_seed(task.seed)

    if logger is not None and start_step == 0:
        logger.set_tags({names.TAG_INIT_HASH: init_hash, names.TAG_WORLD_SIZE: world, names.TAG_DEVICE: device.type,
                         names.TAG_PRECISION: _precision(engine)})
    if start_step == 0 and task.probes.at_start:  # the initial state (MLflow only: Tune sees training probes)
        _probe(engine, task, val_blocks, probe_ids, device, rank, world, logger, 0, final=False)
    final_report: dict[str, Any] = {}  # what the run's last report said: its outcome keeps it
    if resumed and start_step >= task.steps:
        # The earlier life trained to the end and saved its last checkpoint, but died before it wrote its
        # outcome. Nothing is left to train, so without a report here a sweep trial
        # resumed by Tune would end with no `val/loss` and fail the whole resumed search: report the
        # final probe again (not recorded twice in MLflow: no logger). The loop below has no step to run.
        final_report = {"step": start_step, **_probe(engine, task, val_blocks, probe_ids, device, rank, world,
                                                     None, start_step, final=True)}
        send_report(final_report)
    evaluations = _run_evaluations(task, rank, logger, engine)
    if evaluations is not None and start_step == 0 and evaluations.due(0):  # the pretrained/initial row
        evaluations.export_and_submit(full_model(engine, evaluations.precision_dtype), 0)

    failure = None
    step = start_step
    window_start, window_tokens = time.perf_counter(), 0
    while step < task.steps:
        engine.train()
        indices = order.batch(step)
        order_hash = chain_hash(order_hash, indices)
        mine = indices[rank * per_rank:(rank + 1) * per_rank]
        # ce, dispersion (unscaled), total loss, micro-batches; on the device: NCCL reduces no CPU tensor, and
        # no per-micro-batch .cpu() sync stalls the GPU
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        for start in range(0, per_rank, micro):
            batch = torch.as_tensor(train_blocks[mine[start:start + micro]], device=device)
            with _last_hidden_state_raw(engine.module, disp_layers is not None and arm.last_block_output == "raw"):
                outputs = engine(input_ids=batch, labels=batch, output_hidden_states=disp_layers is not None)
            loss = outputs.loss
            if disp_layers is not None:
                from scaling.dispersion import dispersion_over_layers

                disp = dispersion_over_layers(
                    outputs.hidden_states, disp_layers, arm.variant, tau=arm.tau,
                    clamp_threshold=arm.clamp_threshold, generator=generator, subset_per_layer=True)
                loss = loss + arm.lam * disp
                sums[1] += disp.detach().double()
            if faults.due(task.faults, faults.NAN_LOSS, step=step + 1, rank=rank, run_name=task.run_name,
                          resumed=resumed):
                loss = loss * float("nan")
            sums[0] += outputs.loss.detach().double()
            sums[2] += loss.detach().double()
            sums[3] += 1
            engine.backward(loss)
            engine.step()
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        hooks.after_step(step, engine)

        torch.distributed.all_reduce(sums)  # every rank sees the same numbers -> same decisions
        ce, disp_value, total = (float(v) for v in (sums[:3] / sums[3]).cpu())
        if not all(math.isfinite(v) for v in (ce, disp_value, total)):
            failure = f"non-finite loss at step {step} (ce={ce}, dispersion={disp_value}, total={total})"
            break

        if step % task.training.log_every == 0 or step == task.steps:
            elapsed = time.perf_counter() - window_start
            metrics = {names.TRAIN_CE_LOSS: ce, names.TRAIN_LR: float(f"{scheduler.get_last_lr()[0]:.6g}"),
                       names.TRAIN_TOKENS_PER_S: window_tokens / max(elapsed, 1e-9),
                       names.TRAIN_TOKENS_SEEN: tokens_seen,
                       names.TRAIN_LOSS: total}
            if disp_layers is not None:
                metrics[names.TRAIN_DISPERSION_LOSS] = disp_value
                metrics[names.TRAIN_DISPERSION_LOSS_SCALED] = arm.lam * disp_value
            if logger is not None:
                logger.log_metrics(metrics, step)
                _log(rank, f"{task.run_name} step {step}/{task.steps} ce {ce:.4f}"
                     + (f" disp {disp_value:+.4f}" if disp_layers is not None else "")
                     + f" tok/s {metrics[names.TRAIN_TOKENS_PER_S]:.0f}")
            window_start, window_tokens = time.perf_counter(), 0

        if faults.due(task.faults, faults.KILL_WORKER, step=step, rank=rank, run_name=task.run_name, resumed=resumed):
            os._exit(1)  # as a preempted node's worker would

        is_last = step == task.steps
        probe_now = is_last or (task.probes.every_steps and step % task.probes.every_steps == 0)
        save_now = is_last or (task.checkpoint_every and step % task.checkpoint_every == 0)
        report: dict[str, Any] = {"step": step}
        if probe_now:
            report.update(_probe(engine, task, val_blocks, probe_ids, device, rank, world, logger, step,
                                 final=is_last))
        if evaluations is not None:
            if evaluations.due(step):
                evaluations.export_and_submit(full_model(engine, evaluations.precision_dtype), step)
            evaluations.collect(wait=False)  # what has finished; training never waits for one
        if save_now:
            def finish_records():  # rank 0, after the checkpoint: a finished run has every record
                if evaluations is not None:
                    evaluations.finish()
                logger.set_tags({names.TAG_DATA_ORDER_HASH: order_hash, names.TAG_STEPS: task.steps})
                return _wait_for_records(logger)

            _save_and_report(engine, task, report, step, tokens_seen, order_hash, send_report,
                             finish=finish_records if is_last and logger is not None else None)
        elif probe_now:
            send_report(report)
        if is_last:
            final_report = report

    engine.destroy()
    if failure is not None:
        _log(rank, f"{task.run_name}: FAILED: {failure}")
        if logger is not None:
            logger.mark_failed(failure)
            logger.close()
            run_folder.write_outcome(task.folder, failure=failure, report={}, seconds=time.perf_counter() - started)
        # Return normally without a report (every rank alike): a NaN is deterministic, so a Ray
        # Train retry would only fail again, and a report without the validation metrics would
        # confuse Tune's searcher. The driver reads the failure from the run's outcome.
        return
    if logger is not None:
        from scaling.tracking import UNWRITTEN_KEY

        logger.log_metrics({names.TIME_RUN_S: float(f"{time.perf_counter() - started:.4g}")}, step=task.steps)
        logger.set_tags({names.TAG_DATA_ORDER_HASH: order_hash, names.TAG_STEPS: task.steps})
        problem = logger.close()
        if problem and not final_report.get(UNWRITTEN_KEY):
            final_report = {**final_report, UNWRITTEN_KEY: problem}
        run_folder.write_outcome(task.folder, failure=None, report=final_report, seconds=time.perf_counter() - started)


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


def _install_arm_hooks(model, task: RunTask) -> _ArmHooks:
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


def _initial_model(task: RunTask):
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
def _last_hidden_state_raw(module, raw: bool):
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


def _precision(engine) -> str:
    import torch

    return "bf16" if next(engine.module.parameters()).dtype == torch.bfloat16 else "fp32"


def _dispersion_layers(task: RunTask, n_blocks: int):
    if task.arm.name != names.ARM_DISPERSION:
        return None
    from scaling.dispersion_spec import resolve_layers

    return resolve_layers(task.arm.layers, n_blocks)


# --- probes and checkpoints ---------------------------------------------------------------------


def _probe(engine, task, val_blocks, probe_ids, device, rank, world, logger, step, final) -> dict[str, float]:
    """Validation loss (sharded over ranks) and the condensation probe (every rank runs the same
    forwards, which ZeRO-3 needs; rank 0 records it). Condensation is measured in float32, from the
    float32 master weights under bf16 mixed precision, as the reference measures saved models."""
    import torch

    from scaling.condensation import CondensationAccumulator

    engine.eval()
    micro = task.training.micro_batch_size
    chosen = validation_indices(len(val_blocks), micro, world, task.probes.val_batches)
    shard = chosen[rank::world]
    n_batches = math.ceil(math.ceil(len(chosen) / world) / micro)  # the same on every rank (ZeRO-3 gathers)
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # on the device: NCCL reduces no CPU tensor
    accumulator = CondensationAccumulator()
    with torch.no_grad():
        for b in range(n_batches):
            mine = shard[b * micro:(b + 1) * micro]
            ids = torch.as_tensor(np.asarray(val_blocks[mine if len(mine) else chosen[:1]]), device=device)
            losses = block_losses(engine(input_ids=ids).logits, ids)  # a lazy view of the shards reads above
            if len(mine):  # a rank with no block left still runs the forward, and counts nothing
                totals += torch.stack([losses.sum(), losses.square().sum(), losses.new_tensor(len(mine))])
        base = _float32_model(engine).base_model
        for ids in probe_ids:
            outputs = base(input_ids=torch.as_tensor(ids, device=device)[None, :], output_hidden_states=True)
            accumulator.update(torch.stack(outputs.hidden_states)[:, 0].float())
    torch.distributed.all_reduce(totals)
    result = accumulator.finalize()
    loss, loss_se = mean_and_standard_error(*(float(v) for v in totals.cpu()))
    metrics = {names.VAL_LOSS: loss, names.VAL_LOSS_SE: loss_se, **result.to_metrics()}
    if logger is not None:
        logger.log_metrics(metrics, step)
        _log(rank, f"{task.run_name} step {step} val/loss {metrics[names.VAL_LOSS]:.4f} "
             f"condensation spearman {result.spearman:+.3f}")
        with tempfile.TemporaryDirectory() as directory:  # every probe's profile: heatmaps over training
            path = Path(directory) / f"step_{step:07d}.json"
            path.write_text(result.to_json(extra={"step": step, "run_name": task.run_name}, indent=None),
                            encoding="utf-8")
            logger.log_artifact(path, names.ARTIFACT_PROBES_DIR)
        if final:
            _log_final_condensation(logger, result, task)
    engine.train()
    from scaling.config import SEARCH_METRICS

    return {key: metrics[key] for key in SEARCH_METRICS}  # what Tune may optimise


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


def _log_final_condensation(logger, result, task: RunTask) -> None:
    from scaling.plots import write_condensation_record

    with tempfile.TemporaryDirectory() as directory:
        for path in write_condensation_record(result, directory, title=task.run_name, metadata={
                "model": task.rung.name, "run_name": task.run_name, "num_params": _num_params(task),
                "repetitions": result.num_sequences, "max_length": task.probes.max_length}):
            logger.log_artifact(path)


def _float32_model(engine):
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


def _save_and_report(engine, task: RunTask, report, step, tokens_seen, order_hash, send_report, finish=None) -> None:
    """Save a DeepSpeed checkpoint in the run's folder and report. `finish` (rank 0, last step) runs after
    the save's collectives, so the other ranks wait for it in the report, which has no timeout (a gloo
    call would time out after 30 minutes of evaluations); what it returns joins the report."""
    run_folder.save_checkpoint(engine, task.folder, step, {"step": step, "tokens_seen": tokens_seen,
                                                           "order_hash": order_hash}, keep=task.checkpoints_to_keep)
    if finish is not None:
        report.update(finish())
    send_report(report)


# --- small helpers ---------------------------------------------------------------------------


def _num_params(task: RunTask) -> int:
    from scaling.ladder import count_params

    return count_params(task.rung).total


def _resolve(value):
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _state_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def chain_hash(previous: str, indices: np.ndarray) -> str:
    """Data-order fingerprint, chained step by step so that it survives a resume unchanged."""
    return hashlib.sha256(previous.encode() + indices.astype(np.int64).tobytes()).hexdigest()[:32]


def _run_evaluations(task: RunTask, rank: int, logger, engine):
    """The run's downstream evaluations (None when the study evaluates nothing)."""
    if task.evaluation is None:
        return None
    import torch

    from scaling.evaluations import RunEvaluations

    return RunEvaluations(task.evaluation, total_steps=task.steps, rank=rank, logger=logger,
                          tokenizer_uri=task.tokenizer_uri, run_folder=task.folder, seed=task.seed,
                          precision_dtype=next(engine.module.parameters()).dtype
                          if next(engine.module.parameters()).dtype == torch.bfloat16 else torch.float32)


def _open_record(task: RunTask) -> str:
    """Rank 0: create the new run's MLflow record (or find it, if an earlier life of the chain did), waiting
    out an outage like every tracker call; its id."""
    from scaling.tracking import Tracker

    record = task.record
    tracker = Tracker(task.tracking_uri, record["study"], experiment_id=record["experiment_id"], notice=_worker_notice)
    run_id, _ = tracker.child_run(record["parent_id"], record["run_name"], record["config_hash"], record["tags"],
                                  record["params"], metrics=record["metrics"])
    return run_id


def _worker_notice(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", flush=True)


def _rank0_logger(task: RunTask):
    """Rank 0's MLflow writer; what an outage leaves unwritten is spilled to the run's folder."""
    from scaling.tracking import RunLogger

    return RunLogger(task.tracking_uri, task.run_id, spill_dir=_spill_dir(task.folder))


def _spill_dir(folder: str):
    """`<run folder>/mlflow-spill` when that folder is a local (or mounted) path, so a resumed run finds
    what its earlier life spilled; else RunLogger's default temp folder."""
    return os.path.join(folder, "mlflow-spill") if "://" not in folder else None


def _wait_for_records(logger) -> dict[str, str]:
    """Before the last report: wait until rank 0's records reached MLflow; what did not, and why,
    goes in the report, so the driver fails the run instead of finishing it with metrics missing."""
    from scaling.tracking import UNWRITTEN_KEY

    problem = logger.flush()
    return {UNWRITTEN_KEY: problem} if problem else {}


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"{LOG_PREFIX} {message}", flush=True)
