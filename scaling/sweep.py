"""Per-rung search over the dispersion settings with Ray Tune + Optuna (TPE) and ASHA early stopping.

Worker groups are kept across trials: a trial's own `TorchTrainer` would spend ~17 s of a short trial
starting processes, imports and the process group (bench/bench_startup.py). The sweep starts as many
Ray Train worker groups as trials fit side by side (`serve_trials`), each training trial after trial
(`scaling.run_loop.serve_trials_per_worker`); a `TrialQueue` actor hands the trials to the groups and the
groups' reports back to the trials. Each Tune trial is a function trainable that asks for almost no
CPU (`{"CPU": 0.01}`), queues its run and passes every report on to Tune (`follow_trial`), so ASHA
sees the validation loss at every probe; when ASHA stops a trial, Tune ends its process and the
group leaves the run at its next report.

MLflow: study parent run -> one `sweep` run per rung -> one `trial` run per Tune trial
(params = sampled values, tags `trial_state` and `best_trial`). The baseline arm runs once
per rung and seed outside the search. The best trial is chosen on the search metric (the
validation loss by default) among trials that ran to the end, never on test data; its
settings are then re-run with `search.extra_seeds` next to the baseline with those seeds.

Resume: the Tuner's experiment folder (`storage_path/<study>-<rung>-sweep-<hash>`) holds the
Optuna searcher state; a rerun restores it, finished trials are not rerun, and an
interrupted trial resumes from the latest checkpoint in its run folder (named after its trial id). MLflow trial
runs are found again by their Tune trial id, so nothing is recorded twice.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any

from scaling import cadence, faults, names
from scaling.storage import resolve_storage_path
from scaling.config import ArmConfig, StudyConfig
from scaling.console import say
from scaling.errors import TrainingFailure
from scaling.handoffs import Closed, Done, Handout, Preempted, Report, TrialEvent, TrialService
from scaling.run_folder import RunFolder
from scaling.runs import DataRefs, build_task, describe_run, run_outcome
from scaling.schema import config_hash

PAPER_DEFAULT = {names.LAMBDA: 0.1, "layers": "all"}  # the paper's setting, tried first
TRIAL_CPUS = 0.01
"""What a trial's own process asks Tune for: it only queues its run and passes reports on."""


@dataclass(frozen=True)
class SweepContext:
    """What every trial of one rung's sweep needs (handed to the trainable by `tune.with_parameters`)."""

    study: StudyConfig
    plan: Any  # scaling.ladder.RunPlan
    seed: int
    data: DataRefs
    tracking_uri: str
    sweep_run_id: str
    sweep_hash: str
    faults: tuple = ()  # scaling.faults.Fault installed by a test in the driver; re-installed in the trial
    queue: Any = None  # the TrialQueue actor of the sweep's worker groups


@dataclass
class SweepOutcome:
    rung: str
    sweep_run_id: str
    trials: int
    finished: int
    early_stopped: int
    failed: int
    best_run_id: str | None
    best_params: dict[str, Any]
    best_value: float | None
    seconds: float


def search_space(study: StudyConfig) -> dict[str, Any]:
    """Tune's search space, keyed by the dispersion arm's YAML keys: a trial's config is an arm's settings
    (`arm_from_trial`)."""
    from ray import tune

    search = study.search
    return {
        names.LAMBDA: tune.loguniform(*search.lam),
        # Optuna warns on non-string categorical values; layer sets are strings already ("0,1").
        "layers": tune.choice(list(search.layers)),
        "variant": tune.choice(list(search.variants)),
        "tau": tune.choice(list(search.tau)),
        "clamp_threshold": tune.choice(list(search.clamp_threshold)),
    }


def initial_points(study: StudyConfig) -> list[dict[str, Any]]:
    """The paper's default first (lambda 0.1 on all layers), clipped into the searched ranges."""
    search = study.search
    low, high = search.lam
    point = {names.LAMBDA: min(max(PAPER_DEFAULT[names.LAMBDA], low), high),
             "layers": PAPER_DEFAULT["layers"] if "all" in search.layers else search.layers[0],
             "variant": search.variants[0], "tau": search.tau[0], "clamp_threshold": search.clamp_threshold[0]}
    return [point]


def arm_from_trial(config: dict[str, Any]) -> ArmConfig:
    """The dispersion arm a trial trains: its sampled config holds the arm's YAML keys."""
    return ArmConfig.from_settings(names.ARM_DISPERSION, config)


# --- the trial --------------------------------------------------------------------------------


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    """One Tune trial: an MLflow trial run, then its run queued for the sweep's worker groups, whose reports
    feed Tune."""
    from ray import tune

    from scaling.tracking import Tracker

    study, plan = context.study, context.plan
    trial_id = tune.get_context().get_trial_id()
    arm = arm_from_trial(config)
    tracker = Tracker(context.tracking_uri, study.study)
    ordinal = len(tracker.trial_runs(context.sweep_run_id))  # trials recorded before this one
    run_name = f"trial{ordinal} {plan.rung.name} {trial_id}"  # short, as the fixed arms' names
    tags, params, metrics = describe_run(study, plan, arm, context.seed)  # as a fixed arm's run is described
    run_id, _ = tracker.child_run(
        context.sweep_run_id, run_name, config_hash({"sweep": context.sweep_hash, "trial": trial_id}),
        tags={**tags, names.TAG_TUNE_TRIAL_ID: trial_id}, params=params, kind=names.KIND_TRIAL, metrics=metrics)
    with faults.install(*context.faults):
        # Trials are compared on validation metrics as they train; downstream evaluation is for the fixed
        # arms and the extra-seed reruns of the best settings.
        folder = RunFolder.for_trial(study.storage_path, study.study, plan.rung.name, trial_id)
        task = build_task(study, plan, arm, context.seed, run_name, run_id, context.tracking_uri, context.data,
                          folder, evaluate=False)

    def preempted(count: int, reason: str) -> None:
        tracker.set_tags(run_id, {names.TAG_PREEMPTIONS: count})
        say(f"{run_name}: preempted ({reason}); retry {count}")

    failure = follow_trial(context.queue, trial_id, task, tune.report, on_preempted=preempted)
    ended = run_outcome(tracker, task)
    failure = failure or (ended[0] if ended else "the trial ended without recording how its run ended")
    if failure:
        end_trial(tracker, run_id, names.STATUS_FAILED, failure, ended_at=ended[3] if ended else None)
        raise TrainingFailure(f"{run_name}: {failure}")
    end_trial(tracker, run_id, names.STATUS_FINISHED, ended_at=ended[3])


def end_trial(tracker, run_id: str, status: str, failure: str | None = None, ended_at: float | None = None) -> None:
    """Record how a trial ended: its `trial_state` tag (`names.TRIAL_STATES`), then its status."""
    tracker.set_tags(run_id, {names.TAG_TRIAL_STATE: names.TRIAL_STATES[status]})
    tracker.finish(run_id, status, failure, ended_at=ended_at)


def follow_trial(queue, trial_id: str, task, report, on_preempted=None) -> str | None:
    """In a trial's process: queue its run for the sweep's worker groups and pass each of the run's reports
    to `report` (Tune's) until it ends; returns why its worker group failed it, None when the run ended
    (its outcome is in its folder). If the trial leaves early (Tune stopped it), its run is given up."""
    import ray

    ray.get(queue.submit.remote(trial_id, task, ray.get_runtime_context().current_actor))
    ended = False
    try:
        while True:
            event = ray.get(queue.next_event.remote(trial_id, 10.0))
            if isinstance(event, Report):
                report(event.metrics)
            elif isinstance(event, Preempted):
                if on_preempted is not None:
                    on_preempted(event.count, event.reason)
            elif isinstance(event, Done):
                ended = True
                return event.failure
    finally:
        if not ended:
            queue.abandon.remote(trial_id)


class TrialQueue:
    """Hands a sweep's trials to its worker groups and the groups' reports back to the trials.

    A threaded actor owned by the sweep's driver. A trial `submit`s its run and reads its events
    (`next_event`: `Report`s, then one `Done`; `scaling.handoffs`); a worker group's rank 0 `take`s the next
    trial (a `Handout`; or, after its group restarted, the one it was training), `report`s and `finish`es it. A trial is no longer wanted
    once its process has gone (Tune stopped it) or it `abandon`ed its run: `report` tells the group so,
    and a trial that has not started yet is never handed out.
    """

    def __init__(self, preemption_retries: int = 0):
        self._cond = threading.Condition()
        self._pending: collections.deque = collections.deque()  # trial ids, oldest first
        self._tasks: dict[str, Any] = {}  # trial id -> its scaling.train.RunTask
        self._submitted: dict[str, float] = {}  # trial id -> when it was queued (epoch s): its slot's start
        self._owners: dict[str, Any] = {}  # trial id -> the trial's actor
        self._events: dict[str, collections.deque[TrialEvent]] = {}
        self._running: dict[str, str] = {}  # worker group -> trial id
        self._abandoned: set[str] = set()
        self._preemptions: dict[str, int] = {}
        self._retries = preemption_retries
        self._groups = 0
        self._no_groups: str | None = None  # why no group is left to train trials
        self._closed = False

    def submit(self, trial_id: str, task, owner) -> None:
        with self._cond:
            self._owners[trial_id] = owner
            self._abandoned.discard(trial_id)
            self._events.setdefault(trial_id, collections.deque())
            if self._no_groups is not None:
                self._events[trial_id].append(Done(self._no_groups))
            elif trial_id not in self._running.values() and trial_id not in self._pending:
                self._tasks[trial_id] = task
                self._submitted[trial_id] = time.time()
                self._pending.append(trial_id)
            self._cond.notify_all()

    def take(self, pool: str, timeout: float) -> Handout | Closed | None:
        """The next trial for the group `pool`; None when nothing came within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if pool in self._running:  # the group restarted: it continues its trial
                    return self._handout(self._running[pool])
                if self._closed:
                    return Closed()
                if not self._pending:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._cond.wait(left)
                    continue
                trial_id = self._pending.popleft()
                owner = self._owners[trial_id]
                abandoned = trial_id in self._abandoned
            if not abandoned and _alive(owner):  # outside the lock: a slow answer must not stall the others
                with self._cond:
                    self._running[pool] = trial_id
                return self._handout(trial_id)

    def _handout(self, trial_id: str) -> Handout:
        return Handout(trial_id, self._tasks[trial_id], self._submitted.get(trial_id, 0.0))

    def report(self, trial_id: str, metrics: dict) -> bool:
        """Pass a report on; False when the trial is no longer wanted."""
        with self._cond:
            self._events[trial_id].append(Report(metrics))
            self._cond.notify_all()
            owner, abandoned = self._owners[trial_id], trial_id in self._abandoned
        return not abandoned and _alive(owner)

    def finish(self, pool: str, trial_id: str) -> None:
        """The group is done with the trial: its run ended (outcome in its folder) or was stopped."""
        self._end(pool, trial_id, None)

    def group_failed(self, pool: str, reason: str, preempted: bool) -> bool:
        """The group `pool` stopped for good. Its trial goes back to the front of the queue (to resume from
        its checkpoint in another group) when its node was lost and retries are left, else fails. False
        when the group had no trial."""
        with self._cond:
            trial_id = self._running.pop(pool, None)
            if trial_id is None:
                return False
            count = self._preemptions.get(trial_id, 0) + 1
            if preempted and count <= self._retries:
                self._preemptions[trial_id] = count
                self._pending.appendleft(trial_id)
                self._events[trial_id].append(Preempted(count, reason))
                self._cond.notify_all()
                return True
        self._end(pool, trial_id, reason)
        return True

    def expect_groups(self, count: int) -> None:
        with self._cond:
            self._groups = count

    def retire(self, reason: str) -> None:
        """A group gave up; once none is left, every waiting trial (and any later one) fails with `reason`."""
        with self._cond:
            self._groups -= 1
            if self._groups > 0:
                return
            self._no_groups = f"no worker group could start ({reason})"
            while self._pending:
                self._events[self._pending.popleft()].append(Done(self._no_groups))
            self._cond.notify_all()

    def _end(self, pool: str, trial_id: str, failure: str | None) -> None:
        with self._cond:
            if self._running.get(pool) == trial_id:
                del self._running[pool]
            self._events[trial_id].append(Done(failure))
            self._cond.notify_all()

    def next_event(self, trial_id: str, timeout: float) -> TrialEvent | None:
        """The trial's next `Report`, `Preempted` or `Done`; None when nothing came within `timeout`."""
        with self._cond:
            self._cond.wait_for(lambda: self._events[trial_id], timeout=timeout)
            return self._events[trial_id].popleft() if self._events[trial_id] else None

    def abandon(self, trial_id: str) -> None:
        with self._cond:
            self._abandoned.add(trial_id)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def closed(self) -> bool:
        return self._closed


def _alive(actor) -> bool:
    """False only once the actor is known dead. Asked of the GCS's actor table, which answers at once: a
    trial's process is busy running the trial, so a task sent to it (`__ray_ready__`) would wait for the
    whole trial. That table is a private API of Ray (pinned in .ci/constraints.txt); without it, a ping."""
    import ray

    try:
        from ray._private import state

        return state.actors(actor_id=actor._actor_id.hex()).get("State") != "DEAD"
    except Exception:  # noqa: BLE001 -- another Ray version: the slower, public way
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return False
        except ray.exceptions.GetTimeoutError:
            pass
        return True


# --- the sweep of one rung ---------------------------------------------------------------------


def run_sweep(study: StudyConfig, plan, seed: int, data: DataRefs, tracker, parent_id: str,
              progress=say) -> SweepOutcome:
    """Search the dispersion settings for one rung (resuming a stopped search), then tag the best trial."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # its import set INFO ("A new study created ...")

    search = study.search
    rung = plan.rung
    identity = {key: value for key, value in dataclasses.asdict(search).items() if key != "reuse_worker_groups"}
    sweep_hash = config_hash({"search": identity, "rung": rung.name, "seed": seed,
                              "steps": plan.steps, "training": study.training.identity(),
                              "probes": dataclasses.asdict(study.probes), "data": data.fingerprint})
    sweep_run_id, status = tracker.child_run(
        parent_id, f"{rung.name}-sweep", sweep_hash,
        tags={names.TAG_RUNG: rung.name, names.TAG_N_PARAMS: plan.params.total,
              names.TAG_N_PARAMS_NON_EMBEDDING: plan.params.non_embedding, names.TAG_SEED: seed},
        params={"search.num_samples": search.num_samples, "search.metric": search.metric,
                "search.mode": search.mode, f"search.{names.LAMBDA}": list(search.lam),
                "search.layers": list(search.layers), "search.variants": list(search.variants)},
        kind=names.KIND_SWEEP)
    if status == names.STATUS_FINISHED:
        progress(f"{rung.name}: sweep already finished (run {sweep_run_id[:8]}), skipped")
        return summarize_sweep(tracker, rung.name, sweep_run_id, search, 0.0)

    import ray

    from scaling.cluster import concurrent_runs

    # Trials side by side: as many worker groups as fit beside the trials' own processes (TRIAL_CPUS each).
    groups = max(1, min(search.max_concurrent, concurrent_runs(study, search.num_samples,
                                                               extra={"num_cpus": TRIAL_CPUS})))
    queue = ray.remote(num_cpus=0, max_concurrency=1000)(TrialQueue).remote(search.preemption_retries)
    context = SweepContext(study, plan, seed, data, tracker.tracking_uri, sweep_run_id, sweep_hash,
                           faults.installed(), queue)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": TRIAL_CPUS})
    experiment = f"{study.study}-{rung.name}-sweep-{sweep_hash[:8]}"
    storage = resolve_storage_path(study.storage_path)
    path = f"{storage.rstrip('/')}/{experiment}"
    started = time.perf_counter()
    if tune.Tuner.can_restore(path):
        progress(f"{rung.name}: resuming the sweep in {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        probes_per_run = max(1, plan.steps // cadence.interval(study.probes.every_steps, plan.steps))
        searcher = OptunaSearch(metric=search.metric, mode=search.mode, seed=search.seed,
                                points_to_evaluate=initial_points(study))
        # max_t one past the last probe: reaching the end is never an ASHA stop, so a complete
        # trial always gets to record itself as finished.
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=probes_per_run + 1,
                                  grace_period=min(search.grace_period, probes_per_run),
                                  reduction_factor=search.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(study),
            tune_config=tune.TuneConfig(metric=search.metric, mode=search.mode, num_samples=search.num_samples,
                                        search_alg=ConcurrencyLimiter(searcher, max_concurrent=groups),
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name=experiment, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=0),
        )
    progress(f"{rung.name}: searching {search.num_samples} trial(s) of {plan.steps} steps, "
             f"optimising {search.metric} ({search.mode}), in {groups} worker group(s)"
             + (" kept across trials" if search.reuse_worker_groups else ", a new one per trial"))
    try:
        with serve_trials(study, queue, groups, experiment, progress):
            tuner.fit()
    finally:
        ray.kill(queue)
    mark_stopped_trials(tracker, sweep_run_id)
    outcome = summarize_sweep(tracker, rung.name, sweep_run_id, search, time.perf_counter() - started)
    tracker.finish(sweep_run_id, names.STATUS_FINISHED)
    return outcome


@contextlib.contextmanager
def serve_trials(study: StudyConfig, queue, groups: int, name: str, progress=say):
    """`groups` Ray Train worker groups training the queue's trials while the block runs. A group that stops
    for good hands its trial back (`TrialQueue.group_failed`) and another takes its place; a group that
    fails without a trial (it cannot start) is not replaced, and when none is left the queue fails the
    trials still waiting, so no trial waits forever."""
    import ray

    from scaling.runs import build_trainer, failure_reason, is_preemption

    def serve(number: int) -> None:
        attempt = 0
        while True:
            pool = f"{number}.{attempt}"
            try:
                work = TrialService(queue, pool, one_trial=not study.search.reuse_worker_groups, submitted=time.time())
                build_trainer(study, work, f"{name}-group{number}").fit()
                if ray.get(queue.closed.remote()):
                    return  # the search is over
                attempt += 1  # a group per trial: the next one
                continue
            except Exception as exc:  # noqa: BLE001 -- the group's trial is failed or retried, the search goes on
                reason = failure_reason(study, exc)
                had_trial = ray.get(queue.group_failed.remote(pool, reason, is_preemption(exc)))
                if not had_trial:
                    progress(f"{name}: worker group {number} could not start ({reason})")
                    ray.get(queue.retire.remote(reason))
                    return
                progress(f"{name}: worker group {number} stopped ({reason}); starting another")
                attempt += 1

    ray.get(queue.expect_groups.remote(groups))
    threads = [threading.Thread(target=serve, args=(number,), name=f"trial-group-{number}", daemon=True)
               for number in range(groups)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        ray.get(queue.close.remote())
        for thread in threads:
            thread.join(timeout=300)


def mark_stopped_trials(tracker, sweep_run_id: str) -> None:
    """Trials Tune stopped never reached their own bookkeeping. Those whose workers completed every
    step (the worker tags `data_order_hash` only then) finished; the rest were stopped early."""
    for run in tracker.trial_runs(sweep_run_id):
        if names.TAG_TRIAL_STATE in run.data.tags:
            continue
        end_trial(tracker, run.info.run_id,
                  names.STATUS_FINISHED if names.TAG_DATA_ORDER_HASH in run.data.tags else names.STATUS_STOPPED)


def summarize_sweep(tracker, rung: str, sweep_run_id: str, search, seconds: float) -> SweepOutcome:
    """Count trial states and pick (and tag) the best trial among those that ran to the end."""
    runs = tracker.trial_runs(sweep_run_id)
    states = [run.data.tags.get(names.TAG_TRIAL_STATE) for run in runs]
    candidates = [run for run in runs if run.data.tags.get(names.TAG_TRIAL_STATE) == names.TRIAL_FINISHED
                  and search.metric in run.data.metrics]
    best = None
    if candidates:
        sign = 1 if search.mode == "min" else -1
        best = min(candidates, key=lambda run: sign * run.data.metrics[search.metric])
        for run in runs:
            flag = "true" if run.info.run_id == best.info.run_id else "false"
            if run.data.tags.get(names.TAG_BEST_TRIAL) != flag:
                tracker.set_tags(run.info.run_id, {names.TAG_BEST_TRIAL: flag})
        tracker.set_tags(sweep_run_id, {names.TAG_BEST_RUN_ID: best.info.run_id})
    return SweepOutcome(
        rung=rung, sweep_run_id=sweep_run_id, trials=len(runs),
        finished=states.count(names.TRIAL_FINISHED), early_stopped=states.count(names.TRIAL_EARLY_STOPPED),
        failed=states.count(names.TRIAL_FAILED), best_run_id=best.info.run_id if best else None,
        best_params=dict(best.data.params) if best else {},
        best_value=best.data.metrics[search.metric] if best else None, seconds=seconds)


def best_arm(outcome: SweepOutcome) -> ArmConfig | None:
    """The best trial's settings as a dispersion arm (for re-runs with extra seeds)."""
    if not outcome.best_params:
        return None
    return ArmConfig.from_params(names.ARM_DISPERSION, outcome.best_params)
