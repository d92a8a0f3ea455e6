"""Run a training study: every (rung, seed, arm) as one Ray Train + DeepSpeed run.

The driver resolves each run's full config, hashes it (same config -> same run), and
asks MLflow whether it already finished (skip) or started (continue the same MLflow run
and the same Ray Train run folder, whose latest checkpoint Ray Train restores). Data is
tokenized once per study and handed to the workers through the Ray object store.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scaling import names
from scaling.config import StudyConfig, config_hash, flatten
from scaling.errors import ConfigError, DispersionScalingError
from scaling.train import LOG_PREFIX, RunTask


@dataclass(frozen=True)
class StudyData:
    """Tokenized blocks shared by every run of a study."""

    train_blocks: np.ndarray
    val_blocks: np.ndarray
    probe_ids: list[np.ndarray]
    vocab_size: int
    fingerprint: str  # identifies the data in run hashes


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


def prepare_data(study: StudyConfig, vocab_size: int) -> StudyData:
    """Tokenize the study's text source, pack it into blocks, split off validation, draw probe texts."""
    import hashlib

    from scaling.data import build_tokenizer, pack_blocks, parse_text_source, read_rows, sample_texts, \
        split_train_val

    rows = read_rows(parse_text_source(study.data.source))
    if study.data.max_rows is not None:
        rows = rows[: study.data.max_rows]
    # Mid-training reads text with the pretrained model's own tokenizer unless one is named.
    tokenizer = build_tokenizer(study.data.tokenizer or study.training.init_from, rows=rows, vocab_size=vocab_size)
    if len(tokenizer) > vocab_size:
        raise ConfigError(
            f"data.tokenizer has {len(tokenizer)} tokens but the smallest rung's vocab_size is {vocab_size}; "
            "use a ladder whose vocab fits the tokenizer, or train a local tokenizer (data.tokenizer: null)"
        )
    token_rows = tokenizer(rows, add_special_tokens=False)["input_ids"]
    blocks = pack_blocks(token_rows, study.training.seq_len, tokenizer.eos_token_id)
    # One split for the whole study (seed 0): validation data must not depend on the run's seed.
    train, val = split_train_val(blocks, study.data.val_fraction, seed=0)
    probe_texts = sample_texts(rows, study.probes.texts)
    probe_ids = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"][: study.probes.max_length],
                            dtype=np.int64) for t in probe_texts]
    digest = hashlib.sha256(blocks.tobytes())
    for ids in probe_ids:
        digest.update(ids.tobytes())
    return StudyData(train, val, probe_ids, len(tokenizer), digest.hexdigest()[:16])


def resolved_yaml(study: StudyConfig) -> str:
    """The study with every default filled in, as recorded with the study's MLflow run."""
    import yaml

    return yaml.safe_dump(study.to_dict(), sort_keys=False)


def plan_runs(study: StudyConfig):
    """(rung, RunPlan) for every selected rung, with the study's caps applied."""
    from scaling.ladder import RunConfigurator, get_ladder

    ladder = get_ladder(study.ladder)
    rungs = [ladder.rung(name) for name in study.rungs] if study.rungs else list(ladder.rungs)
    training = study.training
    configurator = RunConfigurator(tokens_per_param=training.tokens_per_param, seq_len=training.seq_len,
                                   batch_size=training.batch_size, lr=training.lr,
                                   warmup_fraction=training.warmup_fraction, max_tokens=training.max_tokens,
                                   max_steps=training.max_steps)
    return [configurator.plan(rung, num_workers=study.resources.num_workers) for rung in rungs]


def run_study(study: StudyConfig, study_yaml: str, *, fault_at_step: int | None = None,
              nan_trial_index: int | None = None, progress=print) -> list[RunOutcome]:
    """Train every (rung, seed, arm) of the study that has not finished yet; with a `search`
    section, the dispersion arm is searched per rung instead (see `scaling.sweep`)."""
    import ray

    from scaling.tracking import Tracker, resolve_tracking_uri

    plans = plan_runs(study)
    check_cluster_fits(study)
    tracking_uri = resolve_tracking_uri(study.tracking_uri)
    tracker = Tracker(tracking_uri, study.study)
    parent_id = tracker.study_run_id(flatten(study.to_dict()), study_yaml, resolved_yaml(study))
    data = prepare_data(study, vocab_size=min(plan.rung.vocab_size for plan in plans))
    refs = (ray.put(data.train_blocks), ray.put(data.val_blocks), ray.put(data.probe_ids))
    progress(f"{LOG_PREFIX} study {study.study}: {len(plans)} rung(s) x {len(study.seeds)} seed(s) x "
             f"{len(study.arms)} arm(s); {len(data.train_blocks)} train / {len(data.val_blocks)} val blocks; "
             f"MLflow {tracking_uri}")

    def run(plan, arm, seed):
        return _run_one(study, plan, arm, seed, data, refs, tracker, parent_id, tracking_uri, fault_at_step,
                        progress)

    from scaling.preflight import concurrent_runs, run_side_by_side

    searching = study.search.num_samples > 0
    fixed = [(plan, arm, seed) for plan in plans for seed in study.seeds for arm in study.arms
             if not (searching and arm.name == names.ARM_DISPERSION)]
    # Runs go side by side as far as the cluster fits their worker groups; outcomes keep this order.
    width = concurrent_runs(study, len(fixed))
    outcomes: list[RunOutcome] = [] if searching else run_side_by_side(run, fixed, width)
    for plan in plans if searching else ():  # a rung's sweep needs its baselines first
        outcomes.extend(run_side_by_side(run, [job for job in fixed if job[0] is plan], width))
        outcomes.extend(_search_rung(study, plan, data, refs, tracker, parent_id, run, progress,
                                     nan_trial_index))
    if searching:
        write_sweep_summary(study, tracker, parent_id, plans, progress)
    tracker.end_study(parent_id, failed=any(o.status == names.STATUS_FAILED for o in outcomes))
    return outcomes


def _search_rung(study, plan, data, refs, tracker, parent_id, run, progress, nan_trial_index) -> list[RunOutcome]:
    """One rung's sweep, then its best settings re-run with the extra seeds (paired with baselines)."""
    from scaling.sweep import best_arm, run_sweep

    seed = study.seeds[0]
    sweep = run_sweep(study, plan, seed, refs, data.fingerprint, tracker, parent_id, progress,
                      nan_trial_index=nan_trial_index)
    progress(f"{LOG_PREFIX} {plan.rung.name}: sweep of {sweep.trials} trial(s): {sweep.finished} finished, "
             f"{sweep.early_stopped} early-stopped, {sweep.failed} failed; best {study.search.metric} = "
             f"{sweep.best_value} with {_settings(sweep.best_params)}")
    outcomes = [RunOutcome(plan.rung.name, "dispersion-sweep", seed,
                           names.STATUS_FINISHED if sweep.best_run_id else names.STATUS_FAILED,
                           sweep.sweep_run_id, sweep.seconds,
                           val_loss=sweep.best_value if study.search.metric == names.VAL_LOSS else None,
                           detail=f"{sweep.trials} trials, best: {_settings(sweep.best_params)}")]
    arm = best_arm(sweep)
    if arm is not None:
        for extra in study.search.extra_seeds:
            if extra not in study.seeds:
                outcomes.append(run(plan, study.arm(names.ARM_BASELINE), extra))
            outcomes.append(run(plan, arm, extra))
    return outcomes


def _settings(params: dict) -> str:
    if not params:
        return "-"
    return (f"lambda={float(params[names.PARAM_LAMBDA]):.3g} layers={params[names.PARAM_LAYERS]} "
            f"variant={params[names.PARAM_VARIANT]}")


def write_sweep_summary(study: StudyConfig, tracker, parent_id: str, plans, progress=print) -> Path:
    """Per rung: baseline vs best dispersion trial (validation loss, condensation), printed and saved
    as CSV + parquet under outputs/<study>/ and as artifacts of the study's parent run."""
    import polars as pl

    rows = []
    for plan in plans:
        rung = plan.rung.name
        base = tracker.search_runs(f"tags.{names.TAG_KIND} = '{names.KIND_TRAIN}' and tags.{names.TAG_RUNG} = '{rung}' "
                               f"and tags.{names.TAG_ARM} = '{names.ARM_BASELINE}' "
                               f"and tags.{names.TAG_STATUS} = '{names.STATUS_FINISHED}'")
        best = tracker.search_runs(f"tags.{names.TAG_KIND} = '{names.KIND_TRIAL}' and tags.{names.TAG_RUNG} = '{rung}' "
                               f"and tags.{names.TAG_BEST_TRIAL} = 'true'")

        def mean(runs, key):
            values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
            return sum(values) / len(values) if values else None

        row = {"rung": rung, "n_params": plan.params.total, "baseline_runs": len(base),
               "baseline_val_loss": mean(base, names.VAL_LOSS),
               "baseline_spearman": mean(base, names.COND_SPEARMAN),
               "baseline_last_layer_mean_cos": mean(base, names.COND_LAST_LAYER_MEAN_COS),
               "best_val_loss": mean(best, names.VAL_LOSS), "best_spearman": mean(best, names.COND_SPEARMAN),
               "best_last_layer_mean_cos": mean(best, names.COND_LAST_LAYER_MEAN_COS),
               "best_lambda": float(best[0].data.params[names.PARAM_LAMBDA]) if best else None,
               "best_layers": best[0].data.params.get(names.PARAM_LAYERS) if best else None,
               "best_variant": best[0].data.params.get(names.PARAM_VARIANT) if best else None,
               "best_run_id": best[0].info.run_id if best else None}
        rows.append(row)
    frame = pl.DataFrame(rows, infer_schema_length=None)
    out = Path("outputs") / study.study
    out.mkdir(parents=True, exist_ok=True)
    frame.write_csv(out / "sweep_summary.csv")
    frame.write_parquet(out / "sweep_summary.parquet")
    tracker.client.log_artifact(parent_id, str(out / "sweep_summary.csv"))
    tracker.client.log_artifact(parent_id, str(out / "sweep_summary.parquet"))
    with pl.Config(tbl_rows=100, tbl_cols=20, fmt_str_lengths=20, tbl_width_chars=200):
        progress(str(frame.drop("best_run_id", "baseline_runs")))
    return out


def resolve_run(study: StudyConfig, plan, arm, seed: int, data: StudyData, kind: str = names.KIND_TRAIN):
    """(config_hash, run_name, tags, params) of one run: the hash covers everything that changes
    what the run computes, so the same config always maps to the same MLflow run."""
    rung = plan.rung
    resolved = {"rung": dataclasses.asdict(rung), "arm": dataclasses.asdict(arm), "seed": seed,
                "steps": plan.steps, "lr": plan.lr, "warmup_steps": plan.warmup_steps,
                "training": dataclasses.asdict(study.training), "probes": dataclasses.asdict(study.probes),
                "zero_stage": study.resources.zero_stage, "num_workers": study.resources.num_workers,
                "precision": study.resources.precision, "data": data.fingerprint, "kind": kind}
    if kind == names.KIND_TRAIN:
        del resolved["kind"]  # keep hashes of plain training runs stable
    run_name = f"{rung.name}-{arm.name}-s{seed}"
    tags = {names.TAG_RUNG: rung.name, names.TAG_ARM: arm.name, names.TAG_SEED: seed,
            names.TAG_N_PARAMS: plan.params.total, names.TAG_N_PARAMS_NON_EMBEDDING: plan.params.non_embedding,
            names.TAG_TOKENS: plan.tokens, "ladder": study.ladder}
    params = {**arm.params(), "rung": rung.name, "seed": seed, "steps": plan.steps, "lr": plan.lr,
              "warmup_steps": plan.warmup_steps, "tokens": plan.tokens,
              **flatten(dataclasses.asdict(study.training), "training."),
              **flatten(dataclasses.asdict(study.resources), "resources.")}
    return config_hash(resolved), run_name, tags, params


def build_task(study: StudyConfig, plan, arm, seed: int, run_name: str, run_id: str, tracking_uri: str, refs,
               fault_at_step: int | None = None, nan_at_step: int | None = None) -> RunTask:
    return RunTask(run_name=run_name, run_id=run_id, tracking_uri=tracking_uri, rung=plan.rung, arm=arm,
                   seed=seed, steps=plan.steps, lr=plan.lr, warmup_steps=plan.warmup_steps,
                   training=study.training, probes=study.probes, resources=study.resources,
                   checkpoint_every=study.checkpoint.every_steps, train_blocks=refs[0], val_blocks=refs[1],
                   probe_ids=refs[2], fault_at_step=fault_at_step, nan_at_step=nan_at_step)


def build_trainer(study: StudyConfig, task: RunTask, name: str, callbacks=()):
    """A TorchTrainer for one run. Its Ray Train folder is `storage_path/name`: a later trainer with
    the same name restores the latest checkpoint there (Ray Train V2)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from scaling.preflight import placement_strategy, resolve_storage_path

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


def recorded_failure(tracker, run_id: str) -> str | None:
    """A failure the workers recorded themselves in MLflow (e.g. a NaN loss), if any."""
    return tracker.client.get_run(run_id).data.tags.get(names.TAG_FAILURE)


def _run_one(study, plan, arm, seed, data, refs, tracker, parent_id, tracking_uri, fault_at_step,
             progress) -> RunOutcome:
    rung = plan.rung
    digest, run_name, tags, params = resolve_run(study, plan, arm, seed, data)
    run_id, status = tracker.child_run(parent_id, run_name, digest, tags, params)
    if status == names.STATUS_FINISHED:
        progress(f"{LOG_PREFIX} {run_name}: already finished (run {run_id[:8]}), skipped")
        return RunOutcome(rung.name, arm.name, seed, "skipped", run_id)

    task = build_task(study, plan, arm, seed, run_name, run_id, tracking_uri, refs, fault_at_step)
    trainer = build_trainer(study, task, f"{study.study}-{run_name}-{digest[:8]}")
    progress(f"{LOG_PREFIX} {run_name}: {plan.steps} steps on {study.resources.num_workers} worker(s), "
             f"ZeRO-{study.resources.zero_stage}, run {run_id[:8]}")
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 -- a run's failure is recorded; the study goes on
        reason = one_line(exc)
        tracker.finish(run_id, names.STATUS_FAILED, reason)
        progress(f"{LOG_PREFIX} {run_name}: FAILED: {reason}")
        return RunOutcome(rung.name, arm.name, seed, names.STATUS_FAILED, run_id,
                          time.perf_counter() - started, detail=reason)
    seconds = time.perf_counter() - started
    metrics = result.metrics or {}
    failure = recorded_failure(tracker, run_id)
    if failure:
        tracker.finish(run_id, names.STATUS_FAILED, failure)
        return RunOutcome(rung.name, arm.name, seed, names.STATUS_FAILED, run_id, seconds, detail=failure)
    tracker.finish(run_id, names.STATUS_FINISHED)
    return RunOutcome(rung.name, arm.name, seed, names.STATUS_FINISHED, run_id, seconds,
                      val_loss=metrics.get(names.VAL_LOSS), spearman=metrics.get(names.COND_SPEARMAN))


def _train_entry(loop_config):
    # A module-level function that imports lazily, so Ray pickles a reference, not the code.
    from scaling.train import train_loop_per_worker

    train_loop_per_worker(loop_config)


def check_cluster_fits(study: StudyConfig) -> None:
    """Fail before any work when the cluster cannot run the study (see `scaling.preflight`); print warnings."""
    from scaling.preflight import check_study_against_cluster

    for warning in check_study_against_cluster(study, plan_runs(study)):
        print(f"{LOG_PREFIX} warning: {warning}", file=sys.stderr)


def one_line(exc: BaseException) -> str:
    """The innermost meaningful line of a (possibly Ray-wrapped) exception."""
    while getattr(exc, "__cause__", None) is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    lines = [line for line in text if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def format_summary(outcomes: list[RunOutcome]) -> str:
    header = f"{'rung':<14} {'arm':<18} {'seed':>4} {'status':<9} {'val/loss':>9} {'spearman':>9} {'time':>7}"
    lines = [header, "-" * len(header)]
    for o in outcomes:
        val = f"{o.val_loss:.4f}" if o.val_loss is not None else "-"
        rho = f"{o.spearman:+.3f}" if o.spearman is not None else "-"
        lines.append(f"{o.rung:<14} {o.arm:<18} {o.seed:>4} {o.status:<9} {val:>9} {rho:>9} {o.seconds:>6.0f}s"
                     + (f"  {o.detail}" if o.detail else ""))
    return "\n".join(lines)


def connect_ray(num_cpus: int | None = None):
    """Join the cluster `ray start` brought up on this machine (what `ray submit` and the cluster
    launcher do) or the one RAY_ADDRESS names; otherwise start a private local Ray.

    Unlike `ray.init(address="auto")`, a Ray that some other program started with `ray.init()`
    on the same machine is never joined: its lifetime is that program's, not ours.
    RAY_ADDRESS=local forces a private local Ray.
    """
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    if ray.is_initialized():
        return
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]}
    address = os.environ.get("RAY_ADDRESS") or _started_cluster_address()
    if address and address != "local":
        ray.init(address=address, runtime_env={"env_vars": env})
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
             runtime_env={"env_vars": env})


def _started_cluster_address() -> str | None:
    """The address the last `ray start` on this machine wrote, if that cluster is still running."""
    try:
        from ray._private.services import find_bootstrap_address, find_gcs_addresses

        address = find_bootstrap_address(None)
        return address if address and address in find_gcs_addresses() else None
    except Exception:  # noqa: BLE001 -- private API: if it moves, start a local Ray
        return None


def main_error(exc: DispersionScalingError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2
