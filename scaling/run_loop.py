"""One run on one Ray Train worker, as an object: `RunLoop`, driven by `train_run`'s short loop.

A worker group trains a chain of runs in turn (`train_loop_per_worker`, `scaling.runs` decides which) or
the trials a sweep's queue hands out (`serve_trials_per_worker`); either way each run is a `RunLoop`:

    open -> build -> restore -> start -> (train_step, log, probe, evaluate, checkpoint)* -> finish | fail

Each method owns its part of the run's state: the engine and data order (`build`, `restore`), the
step, tokens and data-order hash (`train_step`), the throughput window (`log`), the evaluations
(`evaluate`), the last report (`checkpoint`). Every rank runs the same methods in the same order (their
collectives must match) and reports to Ray Train the same number of times; only rank 0 writes to MLflow
and to the run's folder. Each method also records where the worker's time went in the run's
`scaling.timing.TimeLedger`, logged as `time/*` when the run ends.

A run with a successor in its chain gives the worker group to it at its last step: rank 0 finishes its
records (the final condensation figures, the last evaluations, the MLflow flush, the outcome) on a
`RecordFinisher` thread while the next run trains. The chain's last run and a sweep's trials hold their
slot until their records are in. A run resumed after its last step evaluates again the exports its record
lacks, so a worker lost while it finished a run's records loses none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import numpy as np

from scaling import cadence, faults, names
from scaling.run_folder import RunFolder
from scaling.console import LOG_PREFIX
from scaling.handoffs import WORK_KEY, ChainWork, Closed, Handout, TrialService
from scaling.timing import TimeLedger
from scaling.train import (DataOrder, RunTask, block_losses, build_deepspeed_config, build_lr_lambdas,
                           build_param_groups, chain_hash, dispersion_layers, engine_precision, float32_model,
                           full_model, initial_model, install_arm_hooks, last_hidden_state_raw,
                           mean_and_standard_error, num_params, resolve, skip_cpu_shm_build, state_hash,
                           validation_indices)

if TYPE_CHECKING:
    from scaling.tracking import RunLogger

Report = Callable[[dict[str, Any]], None]
"""`ray.train.report`, or a sweep's that also forwards to the trial (and raises `RunStopped`)."""


class WorkerPlace(NamedTuple):
    rank: int
    world: int
    device: Any  # torch.device


class RunStopped(Exception):
    """The search stopped the run's trial (ASHA): every rank leaves the run at the same report."""


# --- the worker groups ------------------------------------------------------------------------


def worker_main(loop_config: dict[str, Any]) -> None:
    """Ray Train's loop function: the work the driver handed the group (`scaling.handoffs`)."""
    work = loop_config[WORK_KEY]
    if isinstance(work, TrialService):
        serve_trials_per_worker(work)
    else:
        train_loop_per_worker(work)


def train_loop_per_worker(work: ChainWork) -> None:
    """The runs of the chain in turn, in this one worker group (processes, process group and imports are
    paid once). A run that already ended (its outcome is in its folder) is skipped: that is how a worker
    group restarted by Ray Train, or a chain started again by the driver, continues where it stopped.
    A run's slot starts when its chain was submitted (the first) or the run before it ended; a run with a
    successor ends its slot at its last step and its records are finished beside the next run."""
    import ray.train

    entered, previous_end = time.time(), 0.0
    place = _worker_place()
    with RecordFinisher() as finisher:
        for index, task in enumerate(work.tasks):
            has_successor = index < len(work.tasks) - 1
            slot_start = max(task.queued_since, previous_end) or entered
            previous_end = run_unless_ended(task, place, ray.train.report, slot_start,
                                            finisher if has_successor and work.finish_beside_next else None
                                            ) or previous_end
            if has_successor:
                _wait_for_rank0(task)


class RecordFinisher:
    """Rank 0 of a chain: finishes runs' records one after another on one thread, while the chain's next
    run trains. Leaving the block waits for all of them; a finish that raised is raised then (the worker
    group fails, Ray Train restarts it, and the run without an outcome resumes after its last step)."""

    def __init__(self):
        self._executor: ThreadPoolExecutor | None = None
        self._finishing: list[Future] = []

    def submit(self, finish: Callable[[], None]) -> None:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-records")
        self._finishing.append(self._executor.submit(finish))

    def __enter__(self) -> "RecordFinisher":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._executor is None:
            return
        self._executor.shutdown(wait=True)
        raised = [future.exception() for future in self._finishing if future.exception() is not None]
        if raised and kind is None:
            raise raised[0]


def serve_trials_per_worker(work: TrialService) -> None:
    """A sweep's worker group: trains the trials its queue (`scaling.sweep.TrialQueue`) hands out, one after
    another, until the sweep closes the queue. Reports go to Ray Train (the ranks' barrier) and, from rank 0,
    to the trial through the queue; a trial that Tune stopped is left at its next report. A trial's slot
    starts when both it and the group were there, or when the group's previous trial ended."""
    import ray
    import ray.train

    entered, previous_end = time.time(), 0.0
    place = _worker_place()
    while True:
        taken = ray.get(work.queue.take.remote(work.pool, 5.0)) if place.rank == 0 else None
        item = _from_rank0(taken, place)
        if item is None:
            continue  # nothing to train yet
        if isinstance(item, Closed):
            return
        assert isinstance(item, Handout), item

        def report(metrics: dict[str, Any], trial_id=item.trial_id) -> None:
            ray.train.report(metrics)
            wanted = ray.get(work.queue.report.remote(trial_id, metrics)) if place.rank == 0 else None
            if not _from_rank0(wanted, place):
                raise RunStopped(trial_id)

        slot_start = max(item.submitted, work.submitted, previous_end) or entered
        try:
            previous_end = run_unless_ended(item.task, place, report, slot_start) or previous_end
        except RunStopped:
            _log(place.rank, f"{item.task.run_name}: stopped by the search")
            previous_end = time.time()
        _wait_for_rank0(item.task)
        if place.rank == 0:
            ray.get(work.queue.finish.remote(work.pool, item.trial_id))
        if work.one_trial:
            return  # search.reuse_worker_groups: false


def _worker_place() -> WorkerPlace:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    return WorkerPlace(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device())


def _wait_for_rank0(task: RunTask) -> None:
    """Every rank waits here until rank 0 has recorded the run (MLflow, outcome) or handed its records to the
    finisher, however long its evaluations and an MLflow outage take: a gloo collective of the next run would
    time out."""
    import ray.train

    ray.train.report({"step": task.steps, "ended": task.run_name})


def _from_rank0(value, place: WorkerPlace):
    """Rank 0's `value` on every rank."""
    import torch.distributed as dist

    box = [value if place.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=place.device if place.device.type == "cuda" else None)
    return box[0]


def run_unless_ended(task: RunTask, place: WorkerPlace, send_report: Report, slot_start: float,
                     finisher: RecordFinisher | None = None) -> float | None:
    """Train the run, or if its folder says it ended, report what it ended with (a Tune trial resumed after
    its end still gives Tune its result); then free its memory for the next run. When the run's slot ended
    (epoch s); None for a run that had already ended. With a `finisher`, its records are finished there."""
    import gc

    import torch

    ended = _read_outcome(task)
    if ended is not None:
        _log(place.rank, f"{task.run_name}: ended before ({ended['failure'] or 'finished'}), skipped")
        if ended["report"]:
            send_report(ended["report"])
        return None
    try:
        return train_run(task, place, send_report, TimeLedger(slot_start), finisher)
    finally:
        gc.collect()  # this run's engine, optimizer state and model, before the next run builds its own
        if place.device.type == "cuda":
            torch.cuda.empty_cache()


# --- one run ----------------------------------------------------------------------------------


def train_run(task: RunTask, place: WorkerPlace, send_report: Report, ledger: TimeLedger,
              finisher: RecordFinisher | None = None) -> float:
    """One run, from its latest checkpoint (if any) to its outcome in its folder (written on `finisher`'s
    thread, when given, after the slot ended); when its slot ended."""
    loop = RunLoop(task, place, send_report, ledger, finisher)
    loop.open()
    try:
        loop.build()
        loop.restore()
        loop.start()
        while loop.step < loop.task.steps:
            losses = loop.train_step()
            if not losses.finite:
                return loop.fail(losses.failure(loop.step))
            loop.log(losses)
            loop.inject_kill()
            report: dict[str, Any] = {"step": loop.step}
            probed = loop.probe_due()
            if probed:
                report.update(loop.probe())
            loop.evaluate()
            if loop.checkpoint_due():
                loop.checkpoint(report)
            elif probed:
                loop.send_report(report)
        return loop.finish()
    except RunStopped:
        loop.stopped()
        raise


@dataclasses.dataclass(frozen=True)
class StepLosses:
    """One optimizer step's losses, averaged over every rank's micro-batches."""

    ce: float
    dispersion: float
    total: float

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.ce, self.dispersion, self.total))

    def failure(self, step: int) -> str:
        return f"non-finite loss at step {step} (ce={self.ce}, dispersion={self.dispersion}, total={self.total})"


class RunLoop:
    """One run on one rank: what each step of its life needs, and where its time went (`ledger`)."""

    def __init__(self, task: RunTask, place: WorkerPlace, send_report: Report, ledger: TimeLedger,
                 finisher: RecordFinisher | None = None):
        self.task, self.send_report, self.ledger = task, send_report, ledger
        self.finisher = finisher  # rank 0 finishes the records there, after the slot (None: in the slot)
        self.rank, self.world, self.device = place
        self.logger: RunLogger | None = None
        self.started = time.perf_counter()
        self.step, self.tokens_seen, self.order_hash, self.resumed = 0, 0, "", False
        self.final_report: dict[str, Any] = {}  # what the run's last report said: its outcome keeps it
        self.evaluations = None  # scaling.evaluations.RunEvaluations, when the study evaluates
        self._window_start, self._window_tokens = time.perf_counter(), 0
        self._dispersion_events: list = []  # CUDA event pairs around the dispersion term, read after the step's sync
        self._startup_recorded = False
        self._final_condensation = None  # the last probe's CondensationResult, drawn by the finisher
        self._probe_result = None  # the latest probe's CondensationResult

    # -- the run's life ------------------------------------------------------------------------

    def open(self) -> None:
        """Rank 0: the run's MLflow record (created now when the run is new, so its start is when it trains)
        and its writer; the record says it runs, where, and how long it waited."""
        if self.rank != 0:
            return
        with self.ledger.phase("logging"):
            if not self.task.run_id:
                self.task = dataclasses.replace(self.task, run_id=_open_record(self.task))
            self.started = time.perf_counter()  # the run's seconds match its MLflow duration
            self.logger = _rank0_logger(self.task)
            self.logger.mark_running()  # it may have waited in the chain's queue
            self.logger.set_tags({names.TAG_WORKER_GROUP: _worker_group()})
            if self.task.queued_since:
                self.logger.log_metrics({names.TIME_QUEUED_S: max(0.0, time.time() - self.task.queued_since)}, step=0)

    def build(self) -> None:
        """The model (same seed or the same pretrained checkpoint -> same initial weights in every arm; its
        hash is recorded), the arm's hooks, and the DeepSpeed engine with its optimizer and schedule."""
        import torch

        task, on_gpu = self.task, self.device.type == "cuda"
        torch.manual_seed(task.seed)
        model = initial_model(task)
        self.init_hash = state_hash(model)
        self.hooks = install_arm_hooks(model, task)
        if not on_gpu:
            skip_cpu_shm_build()
        import deepspeed

        optimizer = torch.optim.AdamW(build_param_groups(model, task), lr=task.lr, betas=tuple(task.training.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambdas(task))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config=build_deepspeed_config(task, self.world, on_gpu), dist_init_required=False)
        self.dispersion_layers = dispersion_layers(task, model.config.num_hidden_layers)
        self.generator = torch.Generator(device="cpu").manual_seed(task.seed)

    def restore(self) -> None:
        """The run's latest readable checkpoint, if any: step, tokens seen and data-order hash go on from it."""
        client_state, skipped = _restore_checkpoint(self.engine, self.task, self.device)  # start-up's time
        if client_state is None:
            return
        self.resumed = True
        self.step = int(client_state["step"])
        self.tokens_seen = int(client_state["tokens_seen"])
        self.order_hash = client_state["order_hash"]
        if skipped:
            self._say(f"warning: {self.task.run_name} resumed from an older checkpoint; skipped: {'; '.join(skipped)}")
        self._say(f"{self.task.run_name}: resumed from checkpoint at step {self.step}")
        if self.logger is not None:
            with self.ledger.phase("logging"):
                self.logger.set_tags({names.TAG_RESUMED_FROM_STEP: self.step})
                if skipped:
                    self.logger.set_tags({names.TAG_CHECKPOINT_FALLBACK: "; ".join(skipped)[:4000]})

    def start(self) -> None:
        """The data, the run's identity tags, and what comes before the first step: the step-0 probe and
        evaluation, or (a run resumed after its last step) its final probe reported again."""
        task = self.task
        with self.ledger.phase("data"):
            self.train_blocks, self.val_blocks = resolve(task.train_blocks), resolve(task.val_blocks)
            self.probe_ids = resolve(task.probe_ids)
            self.order = DataOrder(self.train_blocks.shape[0], task.training.batch_size, task.seed)
        if self.logger is not None and self.step == 0:
            with self.ledger.phase("logging"):
                self.logger.set_tags({names.TAG_INIT_HASH: self.init_hash, names.TAG_WORLD_SIZE: self.world,
                                      names.TAG_DEVICE: self.device.type, names.TAG_PRECISION: engine_precision(self.engine)})
        if self.step == 0 and cadence.is_due(0, task.probes.every_steps, task.steps, task.probes.at_start):
            self.probe()  # the initial state (MLflow only: Tune sees training probes)
        if self.resumed and self.step >= task.steps:
            # The earlier life trained to the end and saved its last checkpoint, but died before it wrote its
            # outcome. Nothing is left to train, so without a report here a sweep trial resumed by Tune would
            # end with no `val/loss` and fail the whole resumed search: report the final probe again (not
            # recorded twice in MLflow). The loop has no step to run.
            self.final_report = {"step": self.step, **self.probe(record=False)}
            self.send_report(self.final_report)
            if self.logger is not None:  # the earlier life may have died before it drew the final record
                self._final_condensation_record(self._probe_result)
        self.evaluations = _run_evaluations(task, self.rank, self.logger, self.engine)
        if self.evaluations is not None and self.resumed and self.step >= task.steps and self.logger is not None:
            again = self.evaluations.submit_unrecorded(_recorded_evaluations(task), task.steps)
            if again:
                self._say(f"{task.run_name}: evaluating again at step(s) {again}: its earlier life ended "
                          "before it recorded them")
        if self.evaluations is not None and self.step == 0 and self.evaluations.due(0):  # the pretrained/initial row
            with self.ledger.phase("eval_export"):
                self.evaluations.export_and_submit(full_model(self.engine, self.evaluations.precision_dtype), 0)
        self._window_start, self._window_tokens = time.perf_counter(), 0  # train/tokens_per_s: from the first step

    def train_step(self) -> StepLosses:
        """One optimizer step: this rank's share of the global batch in micro-batches (gradient
        accumulation), the arm's hooks, and the losses averaged over every rank (the same on all ranks, so
        every rank takes the same decisions)."""
        import torch

        self._record_startup()
        clock, task = self.ledger.clock, self.task
        started = clock()
        indices = self.order.batch(self.step)
        self.order_hash = chain_hash(self.order_hash, indices)
        per_rank, micro = task.training.batch_size // self.world, task.training.micro_batch_size
        mine = indices[self.rank * per_rank:(self.rank + 1) * per_rank]
        rows = [self.train_blocks[mine[start:start + micro]] for start in range(0, per_rank, micro)]
        assembled = clock()
        self.ledger.add("data", assembled - started)
        self.engine.train()
        # ce, dispersion (unscaled), total loss, micro-batches; on the device: NCCL reduces no CPU tensor, and
        # no per-micro-batch .cpu() sync stalls the GPU
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for block in rows:
            batch = torch.as_tensor(block, device=self.device)  # a GPU copy queues behind the step's kernels
            loss = self._micro_batch_loss(batch, sums)
            self.engine.backward(loss)
            self.engine.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self._window_tokens += self.tokens_per_step
        self.hooks.after_step(self.step, self.engine)
        torch.distributed.all_reduce(sums)
        ce, dispersion, total = (float(v) for v in (sums[:3] / sums[3]).cpu())  # syncs the device: the step's end
        self.ledger.add("step", clock() - assembled)
        self._read_dispersion_events()
        return StepLosses(ce, dispersion, total)

    @property
    def tokens_per_step(self) -> int:
        return self.task.training.batch_size * self.train_blocks.shape[1]

    def _micro_batch_loss(self, batch, sums):
        """Forward one micro-batch; its loss with the arm's dispersion term (timed on its own), added to `sums`."""
        task, arm, layers = self.task, self.task.arm, self.dispersion_layers
        with last_hidden_state_raw(self.engine.module, layers is not None and arm.last_block_output == "raw"):
            outputs = self.engine(input_ids=batch, labels=batch, output_hidden_states=layers is not None)
        loss = outputs.loss
        if layers is not None:
            from scaling.dispersion import dispersion_over_layers

            with self._dispersion_timer():
                disp = dispersion_over_layers(outputs.hidden_states, layers, arm.variant, tau=arm.tau,
                                              clamp_threshold=arm.clamp_threshold, generator=self.generator,
                                              subset_per_layer=True)
            loss = loss + arm.lam * disp
            sums[1] += disp.detach().double()
        if faults.due(task.faults, faults.NAN_LOSS, step=self.step + 1, rank=self.rank, run_name=task.run_name,
                      resumed=self.resumed):
            loss = loss * float("nan")
        sums[0] += outputs.loss.detach().double()
        sums[2] += loss.detach().double()
        sums[3] += 1
        return loss

    def log(self, losses: StepLosses) -> None:
        """Every `training.log_every` steps and at the last: the losses, the lr and the throughput since the
        last log line (`train/tokens_per_s`: this window's tokens over its wall seconds)."""
        task = self.task
        if self.step % task.training.log_every != 0 and self.step != task.steps:
            return
        elapsed = time.perf_counter() - self._window_start
        if self.logger is not None:
            with self.ledger.phase("logging"):
                metrics = {names.TRAIN_CE_LOSS: losses.ce,
                           names.TRAIN_LR: float(f"{self.scheduler.get_last_lr()[0]:.6g}"),
                           names.TRAIN_TOKENS_PER_S: self._window_tokens / max(elapsed, 1e-9),
                           names.TRAIN_TOKENS_SEEN: self.tokens_seen, names.TRAIN_LOSS: losses.total}
                if self.dispersion_layers is not None:
                    metrics[names.TRAIN_DISPERSION_LOSS] = losses.dispersion
                    metrics[names.TRAIN_DISPERSION_LOSS_SCALED] = task.arm.lam * losses.dispersion
                self.logger.log_metrics(metrics, self.step)
                self._say(f"{task.run_name} step {self.step}/{task.steps} ce {losses.ce:.4f}"
                          + (f" disp {losses.dispersion:+.4f}" if self.dispersion_layers is not None else "")
                          + f" tok/s {metrics[names.TRAIN_TOKENS_PER_S]:.0f}")
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def inject_kill(self) -> None:
        """A test's fault: the worker process exits here, as a preempted node's would."""
        task = self.task
        if faults.due(task.faults, faults.KILL_WORKER, step=self.step, rank=self.rank, run_name=task.run_name,
                      resumed=self.resumed):
            os._exit(1)

    def probe_due(self) -> bool:
        return cadence.is_due(self.step, self.task.probes.every_steps, self.task.steps)

    def checkpoint_due(self) -> bool:
        return cadence.is_due(self.step, self.task.checkpoint_every, self.task.steps)

    def probe(self, *, record: bool = True) -> dict[str, float]:
        """Validation loss and the condensation probe at this step; rank 0 records them (unless not
        `record`). What Tune may optimise (`SEARCH_METRICS`)."""
        from scaling.config import SEARCH_METRICS

        with self.ledger.phase("probe"):
            metrics, result = self._measure()
        self._probe_result = result
        if record and self.logger is not None:
            self._record_probe(metrics, result)
        return {key: metrics[key] for key in SEARCH_METRICS}

    def _measure(self):
        """Validation loss (sharded over ranks) and the condensation probe (every rank runs the same
        forwards, which ZeRO-3 needs). Condensation is measured in float32, from the float32 master weights
        under bf16 mixed precision, as the reference measures saved models."""
        import torch

        from scaling.condensation import CondensationAccumulator

        engine, device, micro = self.engine, self.device, self.task.training.micro_batch_size
        engine.eval()
        chosen = validation_indices(len(self.val_blocks), micro, self.world, self.task.probes.val_batches)
        shard = chosen[self.rank::self.world]
        n_batches = math.ceil(math.ceil(len(chosen) / self.world) / micro)  # the same on every rank (ZeRO-3 gathers)
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # on the device: NCCL reduces no CPU tensor
        accumulator = CondensationAccumulator()
        with torch.no_grad():
            for b in range(n_batches):
                mine = shard[b * micro:(b + 1) * micro]
                ids = torch.as_tensor(np.asarray(self.val_blocks[mine if len(mine) else chosen[:1]]), device=device)
                losses = block_losses(engine(input_ids=ids).logits, ids)  # a lazy view of the shards reads above
                if len(mine):  # a rank with no block left still runs the forward, and counts nothing
                    totals += torch.stack([losses.sum(), losses.square().sum(), losses.new_tensor(len(mine))])
            base = float32_model(engine).base_model
            for ids in self.probe_ids:
                outputs = base(input_ids=torch.as_tensor(ids, device=device)[None, :], output_hidden_states=True)
                accumulator.update(torch.stack(outputs.hidden_states)[:, 0].float())
        torch.distributed.all_reduce(totals)
        result = accumulator.finalize()
        loss, loss_se = mean_and_standard_error(*(float(v) for v in totals.cpu()))
        engine.train()
        return {names.VAL_LOSS: loss, names.VAL_LOSS_SE: loss_se, **result.to_metrics()}, result

    def _record_probe(self, metrics: dict[str, float], result) -> None:
        """Rank 0: the probe's metrics and profile (heatmaps over training); at the last step, the run's
        condensation record (JSON, heatmap) as artifacts."""
        task, step = self.task, self.step
        with self.ledger.phase("logging"), tempfile.TemporaryDirectory() as directory:
            self.logger.log_metrics(metrics, step)
            self._say(f"{task.run_name} step {step} val/loss {metrics[names.VAL_LOSS]:.4f} "
                      f"condensation spearman {result.spearman:+.3f}")
            path = Path(directory) / f"step_{step:07d}.json"
            path.write_text(result.to_json(extra={"step": step, "run_name": task.run_name}, indent=None),
                            encoding="utf-8")
            self.logger.log_artifact(path, names.ARTIFACT_PROBES_DIR)
        if step == task.steps:
            self._final_condensation_record(result)

    def _final_condensation_record(self, result) -> None:
        """Rank 0: the run's final condensation record, drawn now or (with a finisher) after the slot."""
        if self.finisher is not None:
            self._final_condensation = result
        else:
            _log_condensation_record(self.logger, self.task, result, self.ledger)

    def evaluate(self) -> None:
        """At an evaluation step, export the model (every rank gathers it) for its evaluation on its own
        resources; record the evaluations that finished meanwhile (training never waits for one)."""
        if self.evaluations is None:
            return
        if self.evaluations.due(self.step):
            with self.ledger.phase("eval_export"):
                self.evaluations.export_and_submit(full_model(self.engine, self.evaluations.precision_dtype),
                                                   self.step)
        with self.ledger.phase("logging"):
            self.evaluations.collect(wait=False)

    def checkpoint(self, report: dict[str, Any]) -> None:
        """Save a DeepSpeed checkpoint in the run's folder, then report. At the last step rank 0 first waits
        for the evaluations and the MLflow writes, after the save's collectives, so the other ranks wait for
        it in the report, which has no timeout (a gloo call would time out after 30 minutes of evaluations);
        what did not reach MLflow joins the report. With a finisher, that wait is the finisher's instead."""
        with self.ledger.phase("checkpoint"):
            _save_checkpoint(self.engine, self.task, self.step, {"step": self.step, "tokens_seen": self.tokens_seen,
                                                                 "order_hash": self.order_hash})
        if self.step == self.task.steps and self.logger is not None and self.finisher is None:
            report.update(self._final_records())
        self.send_report(report)
        if self.step == self.task.steps:
            self.final_report = report

    def _final_records(self) -> dict[str, str]:
        """Rank 0, last step: a finished run has every record. What did not reach MLflow, and why, goes in
        the report, so the driver fails the run instead of finishing it with metrics missing."""
        return _settle_records(self.logger, self.evaluations, self.order_hash, self.task.steps, self.ledger)

    def finish(self) -> float:
        """The run trained to its end: its time split and duration, its data-order hash, then its outcome;
        with a finisher, the slot ends now and rank 0 writes them on the finisher's thread."""
        self.engine.destroy()
        self._record_startup()  # a run resumed after its last step has no first step
        if self.logger is not None:
            records = FinalRecords(self.task, self.logger, self.ledger, self.evaluations, self.final_report,
                                   self.order_hash, self.started, self.resumed, self._final_condensation,
                                   in_slot=self.finisher is None)
            if self.finisher is None:
                records.write()
            else:
                self.ledger.close()
                self.finisher.submit(records.write)
        return self._slot_end()

    def fail(self, failure: str) -> float:
        """The run cannot go on (a non-finite loss): recorded failed, without a report (every rank alike). A
        NaN is deterministic, so a Ray Train retry would only fail again, and a report without the validation
        metrics would confuse Tune's searcher. The driver reads the failure from the run's outcome."""
        self.engine.destroy()
        self._say(f"{self.task.run_name}: FAILED: {failure}")
        if self.logger is not None:
            _log_time(self.logger, self.ledger, self.evaluations, self.task.steps)
            self.logger.mark_failed(failure)
            self.logger.close()
            _write_outcome(self.task, failure=failure, report={}, seconds=time.perf_counter() - self.started)
        return self._slot_end()

    def stopped(self) -> None:
        """The search stopped the trial: keep what was logged until the stop."""
        self._record_startup()
        if self.logger is not None:
            _log_time(self.logger, self.ledger, self.evaluations, self.step)
            self.logger.close()

    # -- time accounting -----------------------------------------------------------------------

    def _record_startup(self) -> None:
        """Everything from the slot's start to the first step that no phase claimed is start-up: the worker
        processes, imports and process group (for the chain's first run), the model and DeepSpeed."""
        if not self._startup_recorded:
            self._startup_recorded = True
            self.ledger.since_slot_start("startup")

    def _dispersion_timer(self):
        """Times the dispersion term into the ledger: the wall clock on CPU; on CUDA a pair of events, read
        after the step's own sync (`_read_dispersion_events`), so no micro-batch waits for the device."""
        if self.device.type != "cuda":
            return self.ledger.phase("dispersion")
        return _CudaInterval(self._dispersion_events)

    def _read_dispersion_events(self) -> None:
        if self._dispersion_events:
            self.ledger.add("dispersion", sum(a.elapsed_time(b) for a, b in self._dispersion_events) / 1000)
            self._dispersion_events.clear()

    def _slot_end(self) -> float:
        return self.ledger.slot_end if self.ledger.slot_end is not None else self.ledger.clock()

    def _say(self, message: str) -> None:
        _log(self.rank, message)


@dataclasses.dataclass
class FinalRecords:
    """Rank 0: what a finished run still writes, holding only what that needs (not the engine, whose memory
    the next run wants): the final figures and last evaluations (when finished after the slot), the
    data-order hash, the time split and duration, then the outcome the driver takes in."""

    task: RunTask
    logger: Any  # RunLogger
    ledger: TimeLedger
    evaluations: Any  # RunEvaluations | None
    report: dict[str, Any]
    order_hash: str
    started: float  # perf_counter at the run's start
    resumed: bool
    condensation: Any = None  # the last probe's CondensationResult, when its figures are still to draw
    in_slot: bool = True  # False: finished after the slot, beside the chain's next run

    def write(self) -> None:
        from scaling.tracking import UNWRITTEN_KEY

        task, logger = self.task, self.logger
        report = dict(self.report)
        if self.in_slot:  # the last report already holds what the settling found (`RunLoop.checkpoint`)
            with self.ledger.phase("logging"):
                logger.set_tags({names.TAG_DATA_ORDER_HASH: self.order_hash, names.TAG_STEPS: task.steps})
        else:
            if faults.due(task.faults, faults.KILL_WHILE_FINISHING, step=task.steps, rank=0, run_name=task.run_name,
                          resumed=self.resumed):
                os._exit(1)
            if self.condensation is not None:
                _log_condensation_record(logger, task, self.condensation)
            report.update(_settle_records(logger, self.evaluations, self.order_hash, task.steps))
        _log_time(logger, self.ledger, self.evaluations, task.steps,
                  {names.TIME_RUN_S: float(f"{time.perf_counter() - self.started:.4g}")})
        problem = logger.close()
        if problem and not report.get(UNWRITTEN_KEY):
            report[UNWRITTEN_KEY] = problem
        _write_outcome(task, failure=None, report=report, seconds=time.perf_counter() - self.started)


def _phases(ledger: TimeLedger | None):
    """`ledger.phase`, or (after the slot, where no phase is counted) a context that counts nothing."""
    return ledger.phase if ledger is not None else (lambda name: contextlib.nullcontext())


def _settle_records(logger, evaluations, order_hash: str, steps: int, ledger: TimeLedger | None = None
                    ) -> dict[str, str]:
    """Rank 0, a run's end: wait for its last evaluations, tag its data order, flush its writes. What did not
    reach MLflow, and why, for the outcome's report (the driver then fails the run instead of finishing it
    with metrics missing). Counted in `ledger`'s phases when in the slot."""
    from scaling.tracking import UNWRITTEN_KEY

    phase = _phases(ledger)
    if evaluations is not None:
        with phase("eval_wait"):
            evaluations.finish()
    with phase("logging"):
        logger.set_tags({names.TAG_DATA_ORDER_HASH: order_hash, names.TAG_STEPS: steps})
        problem = logger.flush()
    return {UNWRITTEN_KEY: problem} if problem else {}


def _log_time(logger, ledger: TimeLedger, evaluations, step: int, extra: dict[str, float] | None = None) -> None:
    """Rank 0: the run's `time/*` split (and `extra`), with its evaluations' own seconds. The slot closes now,
    unless it closed at the last step (records finished beside the next run: the seconds since are
    `finishing`, including any wait behind an earlier run's)."""
    if evaluations is not None and evaluations.seconds:
        ledger.add("evaluation", evaluations.seconds)
    if ledger.slot_end is None:
        times = ledger.close()
    else:
        ledger.add("finishing", ledger.clock() - ledger.slot_end)
        times = ledger.metrics()
    logger.log_metrics({**(extra or {}), **times}, step=step)


def _log_condensation_record(logger, task: RunTask, result, ledger: TimeLedger | None = None) -> None:
    """The run's condensation record (JSON, heatmap) as artifacts; drawing is probe time, uploading logging
    time, when drawn in the slot (`ledger`)."""
    from scaling.plots import write_condensation_record

    phase = _phases(ledger)
    with tempfile.TemporaryDirectory() as directory:
        with phase("probe"):
            paths = write_condensation_record(result, directory, title=task.run_name, metadata={
                "model": task.rung.name, "run_name": task.run_name, "num_params": num_params(task),
                "repetitions": result.num_sequences, "max_length": task.probes.max_length})
        with phase("logging"):
            for path in paths:
                logger.log_artifact(path)


class _CudaInterval:
    """A CUDA event pair around a block, kept in `events` to be read once the device has synced."""

    def __init__(self, events: list):
        self.events = events

    def __enter__(self):
        import torch

        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record()
        return self

    def __exit__(self, *exc):
        import torch

        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.events.append((self.start, end))


# --- the run's folder and record (one place: where a run's files live) ------------------------


def _folder(task: RunTask) -> RunFolder:
    return RunFolder.at(task.folder)


def _read_outcome(task: RunTask):
    return _folder(task).read_outcome()


def _write_outcome(task: RunTask, *, failure: str | None, report: dict[str, Any], seconds: float) -> None:
    _folder(task).write_outcome(failure=failure, report=report, seconds=seconds)


def _restore_checkpoint(engine, task: RunTask, device):
    return _folder(task).restore_checkpoint(engine, device)


def _save_checkpoint(engine, task: RunTask, step: int, client_state: dict[str, Any]) -> None:
    _folder(task).save_checkpoint(engine, step, client_state, keep=task.checkpoints_to_keep)


def _run_evaluations(task: RunTask, rank: int, logger, engine):
    """The run's downstream evaluations (None when the study evaluates nothing); exports go to its folder."""
    if task.evaluation is None:
        return None
    import torch

    from scaling.evaluations import RunEvaluations

    dtype = next(engine.module.parameters()).dtype
    return RunEvaluations(task.evaluation, total_steps=task.steps, rank=rank, logger=logger,
                          tokenizer_uri=task.tokenizer_uri, run_folder=task.folder, seed=task.seed,
                          precision_dtype=dtype if dtype == torch.bfloat16 else torch.float32)


def _recorded_evaluations(task: RunTask) -> set[int]:
    """Rank 0: the steps whose evaluation the run's MLflow record holds (`eval/seconds`, logged with each)."""
    from scaling.tracking import recorded_steps

    return recorded_steps(task.tracking_uri, task.run_id, names.EVAL_SECONDS)


def _open_record(task: RunTask) -> str:
    """Rank 0: create the new run's MLflow record (or find it, if an earlier life of the chain did), waiting
    out an outage like every tracker call; its id."""
    from scaling.tracking import Tracker

    record = task.record
    tracker = Tracker(task.tracking_uri, record["study"], experiment_id=record["experiment_id"], notice=_worker_notice)
    run_id, _ = tracker.child_run(record["parent_id"], record["run_name"], record["config_hash"], record["tags"],
                                  record["params"], metrics=record["metrics"])
    return run_id


def _rank0_logger(task: RunTask):
    """Rank 0's MLflow writer; what an outage leaves unwritten is spilled to the run's folder."""
    from scaling.tracking import RunLogger

    return RunLogger(task.tracking_uri, task.run_id, spill_dir=_folder(task).spill_dir)


def _worker_group() -> str:
    import ray.train

    return f"{ray.train.get_context().get_experiment_name()} pid {os.getpid()}"


def _worker_notice(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", flush=True)


def _log(rank: int, message: str) -> None:
    if rank == 0:
        print(f"{LOG_PREFIX} {message}", flush=True)
