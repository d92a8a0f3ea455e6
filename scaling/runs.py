"""One training run from plan to record: resolve it, build its task and trainer, fit, read the outcome.

Used by the study driver for the fixed arms and the extra-seed reruns, and by the sweep for
each trial. A run is identified by the hash of its resolved config (same config -> same MLflow
run): a finished one is skipped, an unfinished one continues its MLflow run and its Ray Train
folder, from whose latest checkpoint Ray Train resumes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from scaling import faults, names
from scaling.cluster import placement_strategy
from scaling.storage import resolve_storage_path
from scaling.config import StudyConfig
from scaling.errors import one_line
from scaling.schema import config_hash
from scaling.tracking import UNWRITTEN_KEY
from scaling.train import RunTask

STOPPING = threading.Event()
"""Set when the driver is interrupted: runs in flight stop recording their outcome (the driver marks
them killed) and no new run starts."""

STORAGE_FULL = "No space left on device"

PREEMPTION_ERRORS = ("ActorDiedError", "NodeDiedError", "WorkerCrashedError", "ActorUnavailableError",
                     "OwnerDiedError", "ObjectLostError", "RayActorError", "WorkerGroupError")
"""Failures that mean "the machine went away", not "the run is broken" (levanter's split): they
get their own retry budget; anything else fails the run at once."""


@dataclass(frozen=True)
class DataRefs:
    """The study's tokenized data as the workers receive it (views of the token shards, small enough to
    travel in every run's task; or Ray object refs), and its fingerprint."""

    train_blocks: Any
    val_blocks: Any
    probe_ids: Any
    fingerprint: str
    """Identifies the data in run hashes."""
    tokenizer_uri: str | None = None
    """The study's tokenizer on shared storage (what exported models carry for their evaluations)."""


@dataclass
class RunOutcome:
    rung: str
    arm: str
    seed: int
    status: str  # finished / failed / skipped
    run_id: str
    seconds: float = 0.0
    val_loss: float | None = None
    spearman: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class ResolvedRun:
    """What identifies and describes one run in MLflow."""

    config_hash: str
    run_name: str
    """Short, arm first (`disp tiny-754K s0`): what the MLflow runs table shows."""
    slug: str
    """`tiny-754K-dispersion-s0`: file and folder names."""
    tags: dict[str, Any]
    """What a run is (rung, arm, seed, sizes, budget): the columns to group and filter by."""
    params: dict[str, Any]
    """What a run was trained with that differs between the runs of a study: the arm's settings and the
    resolved schedule. Study-wide settings are the study run's params."""


def run_name(arm: str, rung: str, seed: int) -> str:
    return f"{names.ARM_LABELS.get(arm, arm)} {rung} s{seed}"


def resolve_run(study: StudyConfig, plan, arm, seed: int, data_fingerprint: str) -> ResolvedRun:
    """The hash covers everything that changes what the run computes, so the same config always
    maps to the same MLflow run. `arm` is the arm as trained (family defaults filled in)."""
    rung = plan.rung
    resolved = {"rung": dataclasses.asdict(rung), "arm": dataclasses.asdict(arm), "seed": seed,
                "steps": plan.steps, "lr": plan.lr, "warmup_steps": plan.warmup_steps,
                "training": dataclasses.asdict(study.training), "probes": dataclasses.asdict(study.probes),
                "zero_stage": study.resources.zero_stage, "num_workers": study.resources.num_workers,
                "precision": study.resources.precision, "data": data_fingerprint}
    if study.eval is not None:  # keeps the hashes of runs without evaluation as they were
        resolved["eval"] = dataclasses.asdict(study.eval)
    tags = {names.TAG_RUNG: rung.name, names.TAG_ARM: arm.name, names.TAG_SEED: seed,
            names.TAG_N_PARAMS: plan.params.total, names.TAG_N_PARAMS_NON_EMBEDDING: plan.params.non_embedding,
            names.TAG_TOKENS: plan.tokens, names.TAG_STEPS: plan.steps, names.TAG_LADDER: study.ladder}
    params = {**arm.params(), "lr": plan.lr, "warmup_steps": plan.warmup_steps}
    init_from = study.training.init_from_for(rung.name)
    if init_from:
        params["init_from"] = init_from
    return ResolvedRun(config_hash(resolved), run_name(arm.name, rung.name, seed), f"{rung.name}-{arm.name}-s{seed}",
                       tags, params)


def build_task(study: StudyConfig, plan, arm, seed: int, run_name: str, run_id: str, tracking_uri: str,
               data: DataRefs, *, evaluate: bool = True) -> RunTask:
    """Everything the run's workers need; faults a test installed in this process ride along."""
    return RunTask(run_name=run_name, run_id=run_id, tracking_uri=tracking_uri, rung=plan.rung,
                   arm=arm.for_family(plan.rung.family), seed=seed, steps=plan.steps, lr=plan.lr,
                   warmup_steps=plan.warmup_steps, training=study.training, probes=study.probes,
                   resources=study.resources, checkpoint_every=study.checkpoint.every_steps,
                   train_blocks=data.train_blocks, val_blocks=data.val_blocks, probe_ids=data.probe_ids,
                   init_from=study.training.init_from_for(plan.rung.name),
                   evaluation=study.eval.with_absolute_paths() if study.eval is not None and evaluate else None,
                   tokenizer_uri=data.tokenizer_uri, faults=faults.installed())


def build_trainer(study: StudyConfig, task: RunTask, name: str, callbacks=()):
    """A TorchTrainer for one run. Its Ray Train folder is `storage_path/name`: a later trainer with
    the same name restores the latest checkpoint there (Ray Train V2)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = study.resources
    return TorchTrainer(
        _train_entry,
        train_loop_config=task.to_loop_config(),
        # STRICT_PACK when the worker group fits one node (a large rung takes a whole node), else PACK.
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker},
                                     placement_strategy=placement_strategy(study)),
        run_config=RunConfig(
            name=name,
            storage_path=resolve_storage_path(study.storage_path),
            failure_config=FailureConfig(max_failures=study.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=study.checkpoint.num_to_keep),
            callbacks=list(callbacks),
        ),
    )


def _train_entry(loop_config):
    # A module-level function that imports lazily, so Ray pickles a reference, not the code.
    from scaling.train import train_loop_per_worker

    train_loop_per_worker(loop_config)


def is_preemption(exc: BaseException) -> bool:
    """True when the failure is a lost node/actor rather than a bug or a bad setting."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in PREEMPTION_ERRORS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@dataclass(frozen=True)
class FitResult:
    """How a run's `fit` ended: `failure` is None when it trained to the end."""

    seconds: float
    metrics: dict[str, Any]
    failure: str | None
    preemptions: int = 0


def fit(study: StudyConfig, task: RunTask, tracker, trainer_name: str, *, callbacks=(), preemption_retries: int = 0,
        on_preempted: Callable[[int, str], None] | None = None) -> FitResult:
    """Train one run to the end, retrying a lost node/actor up to `preemption_retries` times.

    A real failure (an exception, or a NaN loss the workers recorded in MLflow) ends the run; a
    worker that dies mid-run is restarted by Ray Train itself (`checkpoint.max_failures`).
    """
    started = time.perf_counter()
    preemptions = 0
    while True:
        trainer = build_trainer(study, task, trainer_name, callbacks)
        try:
            result = trainer.fit()
            break
        except Exception as exc:  # noqa: BLE001 -- classified below; a run's failure is recorded
            if is_preemption(exc) and preemptions < preemption_retries:
                preemptions += 1
                if on_preempted is not None:
                    on_preempted(preemptions, one_line(exc))
                continue
            reason = one_line(exc)
            if STORAGE_FULL in str(exc) or STORAGE_FULL in reason:
                reason = (f"the storage is full ({reason}): free space under storage_path={study.storage_path!r} or "
                          "point it at a larger volume, then re-run (finished runs and their records are intact)")
            return FitResult(time.perf_counter() - started, {}, reason, preemptions)
    metrics = result.metrics or {}
    failure = tracker.recorded_failure(task.run_id) or tracker.unwritten(task.run_id, metrics.get(UNWRITTEN_KEY))
    return FitResult(time.perf_counter() - started, metrics, failure, preemptions)


def train_run(study: StudyConfig, plan, arm, seed: int, data: DataRefs, tracker, parent_id: str,
              say: Callable[[str], None]) -> RunOutcome:
    """One fixed (rung, arm, seed) run: skip it if finished, else train it and record how it ended."""
    rung = plan.rung
    arm = arm.for_family(rung.family)
    run = resolve_run(study, plan, arm, seed, data.fingerprint)
    if STOPPING.is_set():
        return RunOutcome(rung.name, arm.name, seed, names.STATUS_KILLED, "")
    run_id, status = tracker.child_run(parent_id, run.run_name, run.config_hash, run.tags, run.params)
    if status == names.STATUS_FINISHED:
        say(f"{run.run_name}: already finished (run {run_id[:8]}), skipped")
        return RunOutcome(rung.name, arm.name, seed, names.STATUS_SKIPPED, run_id)
    if status != names.STATUS_RUNNING:  # failed or killed before: this driver takes it over (a failure
        tracker.reopen(run_id)            # left on the record would be read back after `fit` and fail it again)
    task = build_task(study, plan, arm, seed, run.run_name, run_id, tracker.tracking_uri, data)
    say(f"{run.run_name}: {plan.steps} steps on {study.resources.num_workers} worker(s), "
        f"ZeRO-{study.resources.zero_stage}, run {run_id[:8]}")
    outcome = fit(study, task, tracker, f"{study.study}-{run.slug}-{run.config_hash[:8]}")
    if STOPPING.is_set():  # interrupted: the driver has marked the run killed; --resume continues it
        return RunOutcome(rung.name, arm.name, seed, names.STATUS_KILLED, run_id, outcome.seconds)
    if outcome.failure:
        tracker.finish(run_id, names.STATUS_FAILED, outcome.failure)
        say(f"{run.run_name}: FAILED: {outcome.failure}")
        return RunOutcome(rung.name, arm.name, seed, names.STATUS_FAILED, run_id, outcome.seconds,
                          detail=outcome.failure)
    tracker.finish(run_id, names.STATUS_FINISHED)
    val_loss, spearman = outcome.metrics.get(names.VAL_LOSS), outcome.metrics.get(names.COND_SPEARMAN)
    say(f"{run.run_name}: finished in {outcome.seconds:.0f} s"
        + (f", val/loss {val_loss:.4f}" if val_loss is not None else ""))
    return RunOutcome(rung.name, arm.name, seed, names.STATUS_FINISHED, run_id, outcome.seconds,
                      val_loss=val_loss, spearman=spearman)
