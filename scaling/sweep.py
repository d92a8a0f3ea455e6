"""Per-rung search over the dispersion settings with Ray Tune + Optuna (TPE) and ASHA early stopping.

Ray 2.60 (Train V2) pattern for Tune driving Train: each trial is a function trainable that
builds and fits its own `TorchTrainer`, whose reports reach Tune through `TuneReportCallback`
(so ASHA sees the validation loss at every probe). The trainable asks Tune for almost no
CPU (`{"CPU": 0.01}`); the trial's Ray Train workers hold the real resources.

MLflow: study parent run -> one `sweep` run per rung -> one `trial` run per Tune trial
(params = sampled values, tags `trial_state` and `best_trial`). The baseline arm runs once
per rung and seed outside the search. The best trial is chosen on the search metric (the
validation loss by default) among trials that ran to the end, never on test data; its
settings are then re-run with `search.extra_seeds` next to the baseline with those seeds.

Resume: the Tuner's experiment folder (`storage_path/<study>-<rung>-sweep-<hash>`) holds the
Optuna searcher state; a rerun restores it, finished trials are not rerun, and an
interrupted trial's TorchTrainer (same name, same run folder) resumes from its latest checkpoint. MLflow trial
runs are found again by their Tune trial id, so nothing is recorded twice.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from scaling import faults, names
from scaling.storage import resolve_storage_path
from scaling.config import ArmConfig, StudyConfig
from scaling.console import say
from scaling.errors import TrainingFailure, one_line
from scaling.runs import DataRefs, build_task, fit, run_folder_uri, run_outcome
from scaling.schema import config_hash

PAPER_DEFAULT = {"lambda": 0.1, "layers": "all"}  # the paper's setting, tried first


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
    janitor: Any = None  # PlacementGroupJanitor actor: frees the worker groups of trials Tune stopped


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
    from ray import tune

    search = study.search
    return {
        "lambda": tune.loguniform(*search.lam),
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
    point = {"lambda": min(max(PAPER_DEFAULT["lambda"], low), high),
             "layers": PAPER_DEFAULT["layers"] if "all" in search.layers else search.layers[0],
             "variant": search.variants[0], "tau": search.tau[0], "clamp_threshold": search.clamp_threshold[0]}
    return [point]


def arm_from_trial(config: dict[str, Any]) -> ArmConfig:
    return ArmConfig(name=names.ARM_DISPERSION, variant=config["variant"], lam=float(config["lambda"]),
                     layers=str(config["layers"]), tau=float(config["tau"]),
                     clamp_threshold=float(config["clamp_threshold"]))


# --- the trial --------------------------------------------------------------------------------


def run_trial(config: dict[str, Any], context: SweepContext) -> None:
    """One Tune trial: an MLflow trial run, then a TorchTrainer whose reports feed Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from scaling.tracking import Tracker

    study, plan = context.study, context.plan
    trial_id = tune.get_context().get_trial_id()
    arm = arm_from_trial(config)
    tracker = Tracker(context.tracking_uri, study.study)
    ordinal = len(tracker.trial_runs(context.sweep_run_id))  # trials recorded before this one
    run_name = f"trial{ordinal} {plan.rung.name} {trial_id}"  # short, as the fixed arms' names
    run_id, _ = tracker.child_run(
        context.sweep_run_id, run_name, config_hash({"sweep": context.sweep_hash, "trial": trial_id}),
        tags={names.TAG_RUNG: plan.rung.name, names.TAG_ARM: names.ARM_DISPERSION, names.TAG_SEED: context.seed,
              names.TAG_N_PARAMS: plan.params.total,
              names.TAG_N_PARAMS_NON_EMBEDDING: plan.params.non_embedding, names.TAG_TOKENS: plan.tokens,
              names.TAG_STEPS: plan.steps, names.TAG_TUNE_TRIAL_ID: trial_id, names.TAG_LADDER: study.ladder},
        params={**arm.params(), "lr": plan.lr, "warmup_steps": plan.warmup_steps},
        kind=names.KIND_TRIAL)
    with faults.install(*context.faults):
        # Trials are compared on validation metrics as they train; downstream evaluation is for the fixed
        # arms and the extra-seed reruns of the best settings.
        name = f"{study.study}-{plan.rung.name}-trial-{trial_id}"
        task = build_task(study, plan, arm, context.seed, run_name, run_id, context.tracking_uri, context.data,
                          run_folder_uri(study, name), evaluate=False)
    if context.janitor is not None:  # if Tune stops this trial, the janitor frees its worker group
        import ray

        task = dataclasses.replace(task, placement_group_watch=(context.janitor,
                                                                ray.get_runtime_context().current_actor))

    def preempted(count: int, reason: str) -> None:
        tracker.set_tags(run_id, {names.TAG_PREEMPTIONS: count})
        say(f"{run_name}: preempted ({reason}); retry {count}")

    failure = fit(study, [task], name, callbacks=[TuneReportCallback()],
                  preemption_retries=study.search.preemption_retries, on_preempted=preempted)
    ended = run_outcome(tracker, task)
    failure = failure or (ended[0] if ended else "the trial ended without recording how its run ended")
    if failure:
        tracker.set_tags(run_id, {names.TAG_TRIAL_STATE: names.TRIAL_FAILED})
        tracker.finish(run_id, names.STATUS_FAILED, failure)
        raise TrainingFailure(f"{run_name}: {failure}")
    tracker.set_tags(run_id, {names.TAG_TRIAL_STATE: names.TRIAL_FINISHED})
    tracker.finish(run_id, names.STATUS_FINISHED)


class PlacementGroupJanitor:
    """Removes the placement group of a trial whose process died while its worker group held it.

    When ASHA stops a trial, Tune ends the trial's process; the trial's Ray Train controller dies
    with it, but the placement group the controller reserved for the workers outlives it (it belongs
    to the job). Ray Train's own cleaner would remove it, but asks the dashboard's State API whether
    the controller is alive, and a local Ray started without a dashboard cannot answer: the CPUs stay
    reserved and, after a few stopped trials, the next one waits forever. This actor, owned by the
    sweep's driver, needs only the GCS: rank 0 of every trial registers its placement group and the
    trial's actor; once a second the janitor pings the trials and removes the group of any that died.
    """

    def __init__(self, poll_s: float = 1.0):
        import threading

        self._watched: dict[str, tuple] = {}  # placement group id (hex) -> (the group, the trial actor owning it)
        self._lock = threading.Lock()  # a pass (the loop's or `sweep`'s) and `watch` never overlap
        self._poll_s = poll_s
        threading.Thread(target=self._loop, name="placement-group-janitor", daemon=True).start()

    def watch(self, owner, group) -> None:
        with self._lock:
            self._watched[group.id.hex()] = (group, owner)

    def sweep(self) -> int:
        """One pass: forget the groups Ray Train released, remove those of dead owners; returns how many
        were removed."""
        from ray.util.placement_group import placement_group_table, remove_placement_group

        removed = 0
        with self._lock:
            for key, (group, owner) in list(self._watched.items()):
                if placement_group_table(group).get("state") == "REMOVED":
                    del self._watched[key]
                elif not _alive(owner):
                    remove_placement_group(group)
                    del self._watched[key]
                    removed += 1
        return removed

    def _loop(self) -> None:
        import time

        while True:
            time.sleep(self._poll_s)
            try:
                self.sweep()
            except Exception as exc:  # noqa: BLE001 -- keep watching; the next pass retries
                say(f"placement group janitor: {type(exc).__name__}: {exc}")


def _alive(actor) -> bool:
    """False only once the actor is known dead (a slow answer is not a death)."""
    import ray

    try:
        ray.get(actor.__ray_ready__.remote(), timeout=30)
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
    sweep_hash = config_hash({"search": dataclasses.asdict(search), "rung": rung.name, "seed": seed,
                              "steps": plan.steps, "training": dataclasses.asdict(study.training),
                              "probes": dataclasses.asdict(study.probes), "data": data.fingerprint})
    sweep_run_id, status = tracker.child_run(
        parent_id, f"{rung.name}-sweep", sweep_hash,
        tags={names.TAG_RUNG: rung.name, names.TAG_N_PARAMS: plan.params.total,
              names.TAG_N_PARAMS_NON_EMBEDDING: plan.params.non_embedding, names.TAG_SEED: seed},
        params={"search.num_samples": search.num_samples, "search.metric": search.metric,
                "search.mode": search.mode, "search.lambda": list(search.lam),
                "search.layers": list(search.layers), "search.variants": list(search.variants)},
        kind=names.KIND_SWEEP)
    if status == names.STATUS_FINISHED:
        progress(f"{rung.name}: sweep already finished (run {sweep_run_id[:8]}), skipped")
        return summarize_sweep(tracker, rung.name, sweep_run_id, search, 0.0)

    import ray

    janitor = ray.remote(num_cpus=0)(PlacementGroupJanitor).remote()
    context = SweepContext(study, plan, seed, data, tracker.tracking_uri, sweep_run_id, sweep_hash,
                           faults.installed(), janitor)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), {"CPU": 0.01})
    experiment = f"{study.study}-{rung.name}-sweep-{sweep_hash[:8]}"
    storage = resolve_storage_path(study.storage_path)
    path = f"{storage.rstrip('/')}/{experiment}"
    started = time.perf_counter()
    if tune.Tuner.can_restore(path):
        progress(f"{rung.name}: resuming the sweep in {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        probes_per_run = max(1, plan.steps // study.probes.every_steps) if study.probes.every_steps else 1
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
                                        search_alg=ConcurrencyLimiter(searcher, max_concurrent=search.max_concurrent),
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name=experiment, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=0),
        )
    progress(f"{rung.name}: searching {search.num_samples} trial(s) of {plan.steps} steps, "
             f"optimising {search.metric} ({search.mode})")
    try:
        tuner.fit()
    finally:
        try:
            ray.get(janitor.sweep.remote(), timeout=120)  # the last trials' groups too, before the janitor goes
        except Exception as exc:  # noqa: BLE001 -- a clean-up must not fail a search that ran
            progress(f"{rung.name}: could not check the trials' worker groups at the end ({one_line(exc)})")
        ray.kill(janitor)
    mark_stopped_trials(tracker, sweep_run_id)
    outcome = summarize_sweep(tracker, rung.name, sweep_run_id, search, time.perf_counter() - started)
    tracker.finish(sweep_run_id, names.STATUS_FINISHED)
    return outcome


def mark_stopped_trials(tracker, sweep_run_id: str) -> None:
    """Trials Tune stopped never reached their own bookkeeping. Those whose workers completed every
    step (the worker tags `data_order_hash` only then) finished; the rest were stopped early."""
    for run in tracker.trial_runs(sweep_run_id):
        if names.TAG_TRIAL_STATE in run.data.tags:
            continue
        if names.TAG_DATA_ORDER_HASH in run.data.tags:
            tracker.set_tags(run.info.run_id, {names.TAG_TRIAL_STATE: names.TRIAL_FINISHED})
            tracker.finish(run.info.run_id, names.STATUS_FINISHED)
        else:
            tracker.set_tags(run.info.run_id, {names.TAG_TRIAL_STATE: names.TRIAL_EARLY_STOPPED})
            tracker.finish(run.info.run_id, names.STATUS_STOPPED)


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
    p = outcome.best_params
    return ArmConfig(name=names.ARM_DISPERSION, variant=p[names.PARAM_VARIANT], lam=float(p[names.PARAM_LAMBDA]),
                     layers=p[names.PARAM_LAYERS], tau=float(p[names.PARAM_TAU]),
                     clamp_threshold=float(p[names.PARAM_CLAMP]))
