"""Training runs from plan to record: resolve them, build their tasks and trainer, fit, read the outcomes.

Used by the study driver for the fixed arms and the extra-seed reruns (`train_chain`); the sweep
builds its trials' tasks here too (`build_task`, `build_trainer`, `run_outcome`). A run is identified by
the hash of its resolved config (same config -> same MLflow run and same folder on the storage): a
finished one is skipped, an unfinished one continues its MLflow run from the latest checkpoint in its
folder (`scaling.run_folder.RunFolder`, the one owner of a run's folder). A run's tags, params and plottable
metrics are written by one function for the fixed arms and the sweep's trials alike (`describe_run`).

Runs that would wait for each other anyway (more runs than the cluster fits side by side) are
chained: one Ray Train worker group trains them in turn, so its start-up (processes, imports, process
group, DeepSpeed: ~16 s for 2 workers on 2 cores) is paid once per chain instead of once per run.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from scaling import faults, names
from scaling.cluster import placement_strategy
from scaling.run_folder import RunFolder
from scaling.storage import resolve_storage_path
from scaling.config import StudyConfig
from scaling.console import significant
from scaling.errors import one_line
from scaling.handoffs import ChainWork, Work, trainer_config
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
    pad_token_id: int | None = None
    """The tokenizer's padding token, else its EOS: the embedding row active forgetting zeroes."""


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
    late_half_cos: float | None = None
    last_layer_cos: float | None = None
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
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    """What a run is as numbers MLflow can plot (N, log10 N, lambda), logged at step 0."""

    def folder(self, study: StudyConfig) -> RunFolder:
        """The run's folder on the storage (its name is also the Ray Train name of a chain of one)."""
        return RunFolder.for_run(study.storage_path, study.study, self.slug, self.config_hash)


def run_name(arm: str, rung: str, seed: int) -> str:
    return f"{names.ARM_LABELS.get(arm, arm)} {rung} s{seed}"


def resolve_run(study: StudyConfig, plan, arm, seed: int, data_fingerprint: str) -> ResolvedRun:
    """The hash covers everything that changes what the run computes, so the same config always
    maps to the same MLflow run. `arm` is the arm as trained (family defaults filled in)."""
    rung = plan.rung
    resolved = {"rung": dataclasses.asdict(rung), "arm": dataclasses.asdict(arm), "seed": seed,
                "steps": plan.steps, "lr": plan.lr, "warmup_steps": plan.warmup_steps,
                "training": study.training.identity(), "probes": dataclasses.asdict(study.probes),
                "zero_stage": study.resources.zero_stage, "num_workers": study.resources.num_workers,
                "precision": study.resources.precision, "data": data_fingerprint}
    if study.eval is not None:  # keeps the hashes of runs without evaluation as they were
        resolved["eval"] = dataclasses.asdict(study.eval)
    tags, params, metrics = describe_run(study, plan, arm, seed)
    return ResolvedRun(config_hash(resolved), run_name(arm.name, rung.name, seed), f"{rung.name}-{arm.name}-s{seed}",
                       tags, params, metrics)


def describe_run(study: StudyConfig, plan, arm, seed: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(tags, params, metrics) of a training run or a sweep trial: the one place a run's record is described.
    Tags say what a run is (rung, arm, seed, sizes, budget); params what it was trained with that differs
    between the runs of a study (the arm's settings, the resolved schedule); metrics what it is as numbers
    MLflow can plot (N, log10 N, lambda)."""
    rung = plan.rung
    tags = {names.TAG_RUNG: rung.name, names.TAG_ARM: arm.name, names.TAG_SEED: seed,
            names.TAG_N_PARAMS: plan.params.total, names.TAG_N_PARAMS_NON_EMBEDDING: plan.params.non_embedding,
            names.TAG_TOKENS: plan.tokens, names.TAG_STEPS: plan.steps, names.TAG_LADDER: study.ladder}
    if arm.name in names.ARM_COLORS:
        tags[names.TAG_RUN_COLOR] = names.ARM_COLORS[arm.name]
    # Every run carries every arm's setting keys: another arm's are "none" (never that arm's values), so MLflow's
    # parallel coordinates draw no made-up value for a run without the setting.
    others = {key: names.PARAM_NONE for other in study.arms for key in other.for_family(rung.family).params()}
    params = {**others, **arm.params(), names.PARAM_ARM: arm.name, "lr": plan.lr, "warmup_steps": plan.warmup_steps}
    init_from = study.training.init_from_for(rung.name)
    if init_from:
        params[names.PARAM_INIT_FROM] = init_from
    n = plan.params.non_embedding
    metrics = {names.RUN_N: n, names.RUN_LOG10_N: math.log10(n) if n > 0 else 0.0,
               names.RUN_LAMBDA: float(arm.lam) if arm.name == names.ARM_DISPERSION else 0.0}
    return tags, params, metrics


def build_task(study: StudyConfig, plan, arm, seed: int, run_name: str, run_id: str, tracking_uri: str,
               data: DataRefs, folder: RunFolder, *, evaluate: bool = True, record: dict | None = None) -> RunTask:
    """Everything the run's workers need; faults a test installed in this process ride along. `run_id` ""
    with a `record` (`open_record`): the run is new and its worker creates its MLflow run when it starts."""
    return RunTask(run_name=run_name, run_id=run_id, record=record, tracking_uri=tracking_uri, folder=folder.uri,
                   rung=plan.rung,
                   arm=arm.for_family(plan.rung.family), seed=seed, steps=plan.steps, lr=plan.lr,
                   warmup_steps=plan.warmup_steps, training=study.training, probes=study.probes,
                   resources=study.resources, checkpoint_every=study.checkpoint.every_steps,
                   checkpoints_to_keep=study.checkpoint.num_to_keep,
                   train_blocks=data.train_blocks, val_blocks=data.val_blocks, probe_ids=data.probe_ids,
                   init_from=study.training.init_from_for(plan.rung.name),
                   evaluation=study.eval.with_absolute_paths() if study.eval is not None and evaluate else None,
                   tokenizer_uri=data.tokenizer_uri, pad_token_id=data.pad_token_id, faults=faults.installed())


def build_trainer(study: StudyConfig, work: Work, name: str):
    """A TorchTrainer whose one worker group trains a `ChainWork`'s runs in turn, or serves a sweep's trials
    (`TrialService`). Checkpoints live in each run's own folder (`RunFolder`), not in
    Ray Train's `storage_path/name`, so which worker group trains a run does not matter: a restarted group
    (`checkpoint.max_failures`) continues where it was."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = study.resources
    return TorchTrainer(
        _train_entry,
        train_loop_config=trainer_config(work),
        # STRICT_PACK when the worker group fits one node (a large rung takes a whole node), else PACK.
        scaling_config=ScalingConfig(num_workers=resources.num_workers, use_gpu=resources.use_gpu,
                                     resources_per_worker={"CPU": resources.cpus_per_worker},
                                     placement_strategy=placement_strategy(study)),
        run_config=RunConfig(
            name=name,
            storage_path=resolve_storage_path(study.storage_path),
            failure_config=FailureConfig(max_failures=study.checkpoint.max_failures),
        ),
    )


def _train_entry(loop_config):
    # A module-level function that imports lazily, so Ray pickles a reference, not the code.
    from scaling.run_loop import worker_main

    worker_main(loop_config)


def is_preemption(exc: BaseException) -> bool:
    """True when the failure is a lost node/actor rather than a bug or a bad setting."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in PREEMPTION_ERRORS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def fit(study: StudyConfig, tasks: Sequence[RunTask], trainer_name: str) -> str | None:
    """Train a chain of runs in one worker group; None when the group got to the end of the chain, else
    why it stopped (each run's own outcome is in its folder: `run_outcome`). A worker that dies mid-run
    is restarted by Ray Train itself (`checkpoint.max_failures`); anything else stops the chain."""
    trainer = build_trainer(study, ChainWork(tuple(tasks), study.resources.finishes_beside_next), trainer_name)
    try:
        trainer.fit()
        return None
    except Exception as exc:  # noqa: BLE001 -- the run it stopped on is failed with the reason
        return failure_reason(study, exc)


def failure_reason(study: StudyConfig, exc: BaseException) -> str:
    """One line for a worker group's failure; a full storage volume says what to do."""
    reason = one_line(exc)
    if STORAGE_FULL in str(exc) or STORAGE_FULL in reason:
        reason = (f"the storage is full ({reason}): free space under storage_path={study.storage_path!r} or "
                  "point it at a larger volume, then re-run (finished runs and their records are intact)")
    return reason


def run_outcome(tracker, task: RunTask, run_id: str | None = None
                ) -> tuple[str | None, dict[str, Any], float, float | None] | None:
    """(failure or None, last report, seconds, ended at (epoch s) or None) of a run that ended, from its
    folder; None if it has not. A run that trained to the end still fails when some of its records did not
    reach MLflow. `run_id`: when the task has none yet (its worker created the run)."""
    ended = RunFolder.at(task.folder).read_outcome()
    if ended is None:
        return None
    report = ended["report"]
    run_id = run_id or task.run_id
    failure = (ended["failure"] or tracker.recorded_failure(run_id) or tracker.unwritten(run_id, report.get(UNWRITTEN_KEY)))
    return failure, report, float(ended.get("seconds") or 0.0), ended.get("ended_at")


def final_values(metrics: dict[str, float]) -> dict[str, float]:
    """A finished run's key values at 4 significant digits (`final/val_loss`, ...: `names.FINAL_VALUES`), from
    its latest metrics: what MLflow's runs table shows without 17 digits."""
    return {names.FINAL_PREFIX + name: float(f"{metrics[key]:.4g}") for name, key in names.FINAL_VALUES.items()
            if key in metrics and math.isfinite(metrics[key])}


def open_record(study: StudyConfig, tracker, parent_id: str, run: ResolvedRun) -> dict:
    """What a worker needs to create a new run's MLflow record when the run starts (`Tracker.child_run`)."""
    return {"experiment_id": tracker.experiment_id, "study": study.study, "parent_id": parent_id,
            "run_name": run.run_name, "config_hash": run.config_hash, "tags": run.tags, "params": run.params,
            "metrics": run.metrics}


@dataclass
class _Queued:
    """A run of a chain: its place in the caller's list, what it is, and its task. `run_id` is "" until the
    run's MLflow record exists (a new run's worker creates it when the run starts)."""

    index: int
    rung: str
    arm: str
    seed: int
    task: RunTask
    folder: RunFolder
    run_id: str = ""


def train_chain(study: StudyConfig, jobs: Sequence[tuple], data: DataRefs, tracker, parent_id: str,
                say: Callable[[str], None], tally=None) -> list[RunOutcome]:
    """Fixed (plan, arm, seed) runs, trained in turn by one worker group (start-up paid once); finished
    runs are skipped. Each run's outcome is recorded in MLflow as soon as it ends. If the group stops on a
    run (an error, after Ray Train's restarts), that run fails with the reason and a new group trains the
    runs after it, so one broken run never costs its siblings. `tally` (`scaling.console.ChainProgress`):
    each run's line ends with the study's progress."""
    outcomes: list[RunOutcome | None] = [None] * len(jobs)

    def progress_note(trained: bool = True, seconds: float | None = None) -> str:
        return f"  {tally.ended(trained, seconds)}" if tally is not None else ""

    queue: list[_Queued] = []
    for index, (plan, arm, seed) in enumerate(jobs):
        rung = plan.rung
        arm = arm.for_family(rung.family)
        run = resolve_run(study, plan, arm, seed, data.fingerprint)
        if STOPPING.is_set():
            outcomes[index] = RunOutcome(rung.name, arm.name, seed, names.STATUS_KILLED, "")
            continue
        queued = bool(queue)
        # A new run gets its MLflow record when it starts (its worker creates it), so MLflow's start time is
        # when it trained, not when the study began; one that exists (resumed, retried) keeps its record.
        run_id, status = tracker.child_run(parent_id, run.run_name, run.config_hash, run.tags, run.params,
                                           metrics=run.metrics, create=False)
        if status == names.STATUS_FINISHED:
            say(f"{run.run_name}: already finished (run {run_id[:8]}), skipped{progress_note(trained=False)}")
            outcomes[index] = RunOutcome(rung.name, arm.name, seed, names.STATUS_SKIPPED, run_id)
            continue
        folder = run.folder(study)
        ended = folder.read_outcome()
        if ended is not None and (ended["failure"] or status in (names.STATUS_FAILED, names.STATUS_KILLED, None)):
            # Tried again, from its latest checkpoint: a NaN, or records that never reached MLflow (the
            # resumed life writes what its earlier one spilled), or an outcome without a record (a store
            # replaced since). An outcome the driver never took in (it died first: the run is still running or
            # queued in MLflow) is taken in without training.
            folder.clear_outcome()
        if status is not None and status != (names.STATUS_QUEUED if queued else names.STATUS_RUNNING):
            tracker.reopen(run_id, queued=queued)  # failed or killed before: a failure left on the record would
            #                                         be read back after training and fail it again
        queue.append(_Queued(index, rung.name, arm.name, seed,
                             build_task(study, plan, arm, seed, run.run_name, run_id, tracker.tracking_uri, data,
                                        folder, record=open_record(study, tracker, parent_id, run)),
                             folder, run_id))
    while queue and not STOPPING.is_set():
        resources = study.resources
        names_in_chain = ", ".join(q.task.run_name for q in queue)
        say((f"{tally.label}: " if tally is not None else "")
            + f"{names_in_chain}: {queue[0].task.steps} steps each on {resources.num_workers} worker(s), "
            f"ZeRO-{resources.zero_stage}" + (", in turn in one worker group" if len(queue) > 1 else
                                              f", run {queue[0].run_id[:8]}" if queue[0].run_id else ""))
        watcher = _OutcomeWatcher(tracker, queue, outcomes, say, progress_note)
        submitted = time.time()  # each run's time/queued_s counts from here
        with watcher:
            failure = fit(study, [dataclasses.replace(q.task, queued_since=submitted) for q in queue],
                          _chain_name(study, queue))
        if STOPPING.is_set():
            break
        left = [q for q in queue if outcomes[q.index] is None]
        if left:
            # The group stopped on the first run without an outcome; when runs finish their records beside the
            # next, on the first that had not trained to its end: one before it lost only the finish of its
            # records and resumes after its last step in the next group. Each pass removes one run.
            beside = study.resources.finishes_beside_next
            stopped = next((q for q in left if not (beside and q.folder.trained_to(q.task.steps))), left[0])
            watcher.fail(stopped, failure or "its worker group ended without recording how the run ended")
            left.remove(stopped)
        queue = left
    for q in queue:  # interrupted: the driver has marked them killed; --resume continues them
        if outcomes[q.index] is None:
            outcomes[q.index] = RunOutcome(q.rung, q.arm, q.seed, names.STATUS_KILLED, q.run_id)
    return outcomes


def _chain_name(study: StudyConfig, queue: Sequence[_Queued]) -> str:
    """Ray Train's name for the group: the run's own name for one run, else one derived from its runs."""
    if len(queue) == 1:
        return queue[0].folder.name
    return f"{study.study}-chain-{config_hash([q.folder.uri for q in queue])[:8]}"


class _OutcomeWatcher:
    """While a chain trains, records each run's outcome in MLflow (and prints it) as soon as its folder
    has one; a last pass when the chain ends."""

    def __init__(self, tracker, queue: Sequence[_Queued], outcomes: list, say: Callable[[str], None],
                 ended: Callable[..., str] = lambda **_: "", poll_s: float = 5.0):
        self.tracker, self.queue, self.outcomes, self.say, self.poll_s = tracker, queue, outcomes, say, poll_s
        self.ended = ended  # the study's progress after one more run ended, for the run's line
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="outcomes", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if not STOPPING.is_set():
            self.take_in()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.take_in()
            except Exception:  # noqa: BLE001 -- the store or the storage may be busy; the last pass retries
                continue

    def run_id(self, q: _Queued) -> str:
        """The run's MLflow id: its worker created the record when the run started; a run that never started
        (its group failed before it) gets one now, to carry its failure."""
        if not q.run_id:
            record = q.task.record
            q.run_id, _ = self.tracker.child_run(record["parent_id"], record["run_name"], record["config_hash"],
                                                 record["tags"], record["params"], metrics=record["metrics"])
        return q.run_id

    def fail(self, q: _Queued, reason: str, seconds: float = 0.0, ended_at: float | None = None) -> None:
        """Record a run failed, in MLflow, on the console and in the outcomes."""
        run_id = self.run_id(q)
        self.tracker.finish(run_id, names.STATUS_FAILED, reason, ended_at=ended_at)
        self.say(f"{q.task.run_name}: FAILED: {reason}{self.ended(seconds=seconds or None)}")
        self.outcomes[q.index] = RunOutcome(q.rung, q.arm, q.seed, names.STATUS_FAILED, run_id, seconds,
                                            detail=reason)

    def take_in(self) -> None:
        for q in self.queue:
            if self.outcomes[q.index] is not None or STOPPING.is_set():
                continue
            if q.folder.read_outcome() is None:
                continue
            ended = run_outcome(self.tracker, q.task, self.run_id(q))
            if ended is None:
                continue
            failure, report, seconds, ended_at = ended
            if failure:
                self.fail(q, failure, seconds, ended_at)
                continue
            finals = final_values(self.tracker.get_run(q.run_id).data.metrics)
            if finals:
                self.tracker.log_metrics(q.run_id, finals, step=q.task.steps)
            self.tracker.finish(q.run_id, names.STATUS_FINISHED, ended_at=ended_at)
            val_loss, late_half = report.get(names.VAL_LOSS), report.get(names.COND_LATE_HALF_MEAN_COS)
            self.say(f"{q.task.run_name}: finished in {seconds:.0f} s"
                     + (f", val/loss {significant(val_loss)}" if val_loss is not None else "")
                     + (f", late-half mean cos {significant(late_half)}" if late_half is not None else "")
                     + self.ended(seconds=seconds))
            self.outcomes[q.index] = RunOutcome(q.rung, q.arm, q.seed, names.STATUS_FINISHED, q.run_id,
                                                seconds, val_loss=val_loss, spearman=report.get(names.COND_SPEARMAN),
                                                late_half_cos=late_half,
                                                last_layer_cos=report.get(names.COND_LAST_LAYER_MEAN_COS))
