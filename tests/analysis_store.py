"""Fill a real MLflow SQLite store with a synthetic study, through MLflow's own client.

The records follow the trainer's contract in `scaling/names.py`: one experiment per study,
a parent run (kind=study), a child run per (rung, arm, seed) with tags, dotted params,
step metrics and a `condensation.json` artifact. The metrics come from known curves plus
seeded noise, so tests can check what the analysis recovers:

- val/loss = 1.0 * (N / N_ref)^-0.35 + 2.0 for the baseline; the dispersion arm behaves as
  a baseline with `loss_multiplier` (default `DISPERSION_MULTIPLIER`) times as many parameters;
- last-layer / late-half mean cosine = 0.3 * (N / N_ref)^-0.4 + 0.1 (dispersion: `cos_factor`
  times that, default 0.8);
- Spearman falls linearly in log10 N from 0.95 (dispersion: 0.15 lower);
- at step 0 (both arms of a pair share it: same initialisation) Spearman = `initial_spearman`
  and a per-layer profile rising with depth; per-layer mean cosines at every step;
- eval/mean_acc when `accuracy_gain` is given (dispersion: that much higher); with `eval_steps`,
  downstream results at those steps as the trainer logs them: per-task acc (and acc_stderr) of
  `EVAL_TEST_TASKS`, their mean eval/mean_acc, the validation-split task `EVAL_SELECTION_TASK`
  and eval/selection_mean_acc (unless `selection_task=False`), paloma_wikitext_103 word
  perplexity; step 0 (if listed) is shared by paired arms. Test accuracy peaks at
  `test_best_step`, the validation signals (selection accuracy and val/loss) at `val_best_step`.

Usable from the command line to get a store to play with:
`python tests/analysis_store.py sqlite:////tmp/demo/mlflow.db`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from analysis.effects import EVAL_MEAN_ACC
from scaling import names

N_REF = 1e7
DISPERSION_MULTIPLIER = 1.5
LOSS_ALPHA, LOSS_SCALE, LOSS_OFFSET = 0.35, 1.0, 2.0
RUNG_SIZES = {"tiny-1M": 1e6, "small-4M": 4e6, "base-16M": 1.6e7, "mid-64M": 6.4e7}
EVAL_TEST_TASKS = {"arc_easy": 0.1, "piqa": 0.2, "winogrande": 0.0}
"""Test tasks and their accuracy offsets above the shared curve."""
EVAL_SELECTION_TASK = "bundled_cloze_val"
EVAL_PERPLEXITY_TASK = names.PAPER_PERPLEXITY_TASK
EVAL_PEAK_DROP = 0.1
"""Accuracy lost per whole training run of distance from the peak step (validation and test alike)."""
INITIAL_ACC = 0.25


@dataclass(frozen=True)
class SyntheticStudy:
    """What was written: enough for tests to check the analysis against the truth."""

    tracking_uri: str
    study: str
    experiment_id: str
    parent_run_id: str
    finished_run_ids: tuple[str, ...]
    failed_run_ids: tuple[str, ...]


def true_loss(n: float, arm: str = names.ARM_BASELINE, multiplier: float = DISPERSION_MULTIPLIER) -> float:
    effective = n * (multiplier if arm == names.ARM_DISPERSION else 1.0)
    return LOSS_SCALE * (effective / N_REF) ** (-LOSS_ALPHA) + LOSS_OFFSET


def _true_mean_cos(n: float, arm: str, cos_factor: float = 0.8) -> float:
    factor = cos_factor if arm == names.ARM_DISPERSION else 1.0
    return factor * (0.3 * (n / N_REF) ** (-0.4) + 0.1)


def _true_spearman(n: float, arm: str) -> float:
    return 0.95 - 0.25 * math.log10(n / 1e6) - (0.15 if arm == names.ARM_DISPERSION else 0.0)


def _condensation_record(n: float, arm: str, n_layers: int, rng: np.random.Generator, cos_factor: float = 0.8) -> dict:
    """A `condensation.json` whose per-layer mean cosine rises with depth to the final value."""
    last = _true_mean_cos(n, arm, cos_factor)
    layers = []
    grid = np.linspace(-1, 1, 128)
    for layer in range(n_layers + 1):
        mean_cos = last * (0.3 + 0.7 * layer / n_layers) + rng.normal(0, 0.002)
        density = np.exp(-0.5 * ((grid - mean_cos) / 0.15) ** 2)
        density /= density.sum() * (2 / 128)
        layers.append(
            {
                "layer": layer,
                "mean_cosine": mean_cos,
                "mean_cosine_offdiag": mean_cos - 0.01,
                "histogram": density.tolist(),
                "effective_rank": 10.0 + layer,
            }
        )
    return {
        "layers": layers,
        "spearman": _true_spearman(n, arm),
        "kendall": _true_spearman(n, arm) * 0.8,
        "model": f"synthetic-{int(n)}",
        "num_params": int(n),
        "repetitions": 4,
        "max_length": 32,
    }


def true_accuracy(n: float, arm: str, gain: float, offset: float = 0.0) -> float:
    """A trained model's accuracy at its peak step: rises with N; dispersion adds `gain`."""
    return 0.3 + offset + 0.02 * math.log10(n / 1e6) + (gain if arm == names.ARM_DISPERSION else 0.0)


def _eval_metrics(n: float, arm: str, run_seed: int, step: int, *, steps: int, gain: float, val_best: int, test_best: int,
                  selection_task: bool, noise: float, rng: np.random.Generator) -> dict[str, float]:
    """One evaluation's metrics as the trainer logs them (`scaling.evaluate.flatten_results`)."""
    if step == 0:
        # The initial model depends on (rung, seed) only: paired arms share it.
        init = np.random.default_rng([int(n), run_seed, 7])
        acc = {task: INITIAL_ACC + init.normal(0, 0.005) for task in EVAL_TEST_TASKS}
        selection = INITIAL_ACC + init.normal(0, 0.005)
        perplexity = 5000.0 * math.exp(init.normal(0, 0.01))
    else:
        acc = {task: true_accuracy(n, arm, gain, offset) - EVAL_PEAK_DROP * abs(step - test_best) / steps + rng.normal(0, noise)
               for task, offset in EVAL_TEST_TASKS.items()}
        selection = true_accuracy(n, arm, gain) - EVAL_PEAK_DROP * abs(step - val_best) / steps + rng.normal(0, noise)
        perplexity = 200.0 * (n / 1e6) ** -0.2 * (1 + 0.5 * abs(step - val_best) / steps) * math.exp(rng.normal(0, noise))
    metrics = {names.eval_metric_key(task, "acc"): value for task, value in acc.items()}
    metrics.update({names.eval_metric_key(task, "acc_stderr"): 0.02 for task in acc})
    metrics[EVAL_MEAN_ACC] = float(np.mean(list(acc.values())))
    if selection_task:
        metrics[names.eval_metric_key(EVAL_SELECTION_TASK, "acc")] = selection
        metrics[names.EVAL_SELECTION_MEAN_ACC] = selection
    metrics[names.eval_metric_key(EVAL_PERPLEXITY_TASK, "word_perplexity")] = perplexity
    metrics[names.EVAL_NUM_FAILED] = 0.0
    metrics[names.EVAL_SECONDS] = 1.5
    return metrics


def fill_synthetic_study(
    tracking_uri: str,
    study: str = "synthetic",
    *,
    rungs: dict[str, float] | None = None,
    arms: tuple[str, ...] = (names.ARM_BASELINE, names.ARM_DISPERSION),
    seeds: tuple[int, ...] = (0, 1, 2),
    noise: float = 0.01,
    steps: int = 3,
    n_layers: int = 4,
    failed: int = 1,
    with_artifacts: bool = True,
    metric_overrides: dict[str, float] | None = None,
    seed: int = 0,
    artifact_root: str | None = None,
    cos_factor: float = 0.8,
    loss_multiplier: float = DISPERSION_MULTIPLIER,
    initial_spearman: float | None = 0.95,
    accuracy_gain: float | None = None,
    eval_steps: tuple[int, ...] | None = None,
    selection_task: bool = True,
    val_best_step: int | None = None,
    test_best_step: int | None = None,
    val_every: int = 1,
    study_params: bool = True,
    init_from: str | None = None,
) -> SyntheticStudy:
    """Write one synthetic study; returns the run ids. `failed` extra runs end failed.

    `metric_overrides` forces a metric to a constant (or NaN) in every run, to test
    degenerate inputs. Artifacts go under `artifact_root` (default: next to a SQLite file).
    `cos_factor`, `loss_multiplier`, `initial_spearman` (None: no step-0 probe) and
    `accuracy_gain` (None: no eval/mean_acc) set the truth the paper's claims are checked on.
    `eval_steps` (needs `accuracy_gain`; None: eval/mean_acc at the last step only) log downstream
    results at those steps; `val_best_step` / `test_best_step` (default: the last step) place the
    best validation signal and the best test accuracy; val/loss is logged every `val_every` steps
    and at the last; `study_params` puts `eval.tasks` / `eval.selection_tasks` on the study run.
    `init_from`: a mid-training study: every run starts from that checkpoint (param `init_from`),
    so step 0 depends on the rung only and `init_hash` is one value per rung.
    """
    val_best = steps if val_best_step is None else val_best_step
    test_best = steps if test_best_step is None else test_best_step
    rungs = RUNG_SIZES if rungs is None else rungs
    rng = np.random.default_rng(seed)
    client = MlflowClient(tracking_uri)
    if artifact_root is None:
        db_path = Path(tracking_uri.removeprefix("sqlite:///"))
        artifact_root = str(db_path.parent / "artifacts")
    experiment_id = client.create_experiment(study, artifact_location=f"{artifact_root}/{study}")
    parent = client.create_run(experiment_id, tags={names.TAG_KIND: names.KIND_STUDY, names.TAG_STUDY: study}, run_name=study)
    if eval_steps is not None and study_params:
        chosen = [EVAL_SELECTION_TASK] if selection_task else []
        client.log_batch(parent.info.run_id, params=[Param("eval.tasks", str([*EVAL_TEST_TASKS, *chosen, EVAL_PERPLEXITY_TASK])),
                                                     Param("eval.selection_tasks", str(chosen))])
    finished, failures = [], []
    cells = [(rung, arm, s) for rung in rungs for arm in arms for s in seeds]
    cells += [(list(rungs)[0], arms[0], 1000 + i) for i in range(failed)]
    for rung, arm, run_seed in cells:
        n = rungs[rung]
        is_failed = run_seed >= 1000
        tags = {
            names.TAG_KIND: names.KIND_TRAIN,
            names.TAG_STUDY: study,
            names.TAG_RUNG: rung,
            names.TAG_N_PARAMS: str(int(n)),
            names.TAG_N_PARAMS_NON_EMBEDDING: str(int(n * 0.6)),
            names.TAG_TOKENS: str(int(20 * n)),
            names.TAG_STEPS: str(steps),
            names.TAG_ARM: arm,
            names.TAG_SEED: str(run_seed),
            names.TAG_CONFIG_HASH: f"{rung}-{arm}-{run_seed}",
            names.TAG_GIT_COMMIT: "synthetic",
            names.TAG_STATUS: names.STATUS_FAILED if is_failed else names.STATUS_FINISHED,
            names.TAG_INIT_HASH: f"init-{rung}" if init_from else f"init-{rung}-{run_seed}",
            "mlflow.parentRunId": parent.info.run_id,
        }
        if is_failed:
            tags[names.TAG_FAILURE] = "loss became NaN at step 2"
        run = client.create_run(experiment_id, tags=tags, run_name=f"{rung}-{arm}-s{run_seed}")
        run_id = run.info.run_id
        lam = 0.1 if arm == names.ARM_DISPERSION else 0.0
        params = {names.PARAM_LAMBDA: lam, names.PARAM_LAYERS: "all", names.PARAM_VARIANT: "angular_spread", names.PARAM_TAU: 1.0,
                  names.PARAM_CLAMP: 0.1, "steps": steps}
        if init_from:
            params[names.PARAM_INIT_FROM] = init_from
        finals = {
            names.VAL_LOSS: true_loss(n, arm, loss_multiplier) * math.exp(rng.normal(0, noise)),
            names.COND_LAST_LAYER_MEAN_COS: _true_mean_cos(n, arm, cos_factor) * math.exp(rng.normal(0, noise)),
            names.COND_LATE_HALF_MEAN_COS: 0.9 * _true_mean_cos(n, arm, cos_factor) * math.exp(rng.normal(0, noise)),
            names.COND_SPEARMAN: _true_spearman(n, arm) + rng.normal(0, 0.02),
            names.COND_KENDALL: 0.8 * _true_spearman(n, arm) + rng.normal(0, 0.02),
        }
        if accuracy_gain is not None and eval_steps is None:
            gain = accuracy_gain if arm == names.ARM_DISPERSION else 0.0
            finals[EVAL_MEAN_ACC] = 0.3 + 0.02 * math.log10(n / 1e6) + gain + rng.normal(0, noise)
        finals.update(metric_overrides or {})
        now = int(time.time() * 1000)
        metrics = []
        for step in range(1, steps + 1):
            warm = 1.0 + 0.5 * (steps - step) / steps  # earlier steps: higher loss
            metrics += [Metric(names.TRAIN_CE_LOSS, finals[names.VAL_LOSS] * warm, now, step), Metric(names.TRAIN_LR, 1e-3, now, step)]
            if step % val_every == 0 or step == steps:
                # Lowest at val_best (by default the last step, where it equals the final value).
                metrics.append(Metric(names.VAL_LOSS, finals[names.VAL_LOSS] * (1.0 + 0.5 * abs(step - val_best) / steps), now, step))
        for step in eval_steps or ():
            values = _eval_metrics(n, arm, run_seed, step, steps=steps, gain=accuracy_gain or 0.0, val_best=val_best, test_best=test_best,
                                   selection_task=selection_task, noise=0.3 * noise, rng=rng)
            metrics += [Metric(key, value, now, step) for key, value in values.items()]
        for key in (names.COND_LAST_LAYER_MEAN_COS, names.COND_LATE_HALF_MEAN_COS, names.COND_SPEARMAN, names.COND_KENDALL, EVAL_MEAN_ACC):
            if key in finals:
                metrics.append(Metric(key, finals[key], now, steps))
        record = _condensation_record(n, arm, n_layers, rng, cos_factor)
        for layer in record["layers"]:
            for step in range(1, steps + 1):
                # The profile moves from its initial shape to the final one over training.
                share = step / steps
                metrics.append(Metric(names.layer_metric(layer["layer"]), layer["mean_cosine"] * (0.5 + 0.5 * share), now, step))
        if initial_spearman is not None:
            # Step 0 depends on (rung, seed) only: paired arms share their initialisation (and on the
            # rung only when every run starts from one pretrained checkpoint).
            init = np.random.default_rng([int(n)] if init_from else [int(n), run_seed])
            metrics.append(Metric(names.COND_SPEARMAN, float(np.clip(initial_spearman + init.normal(0, 0.03), -1, 1)), now, 0))
            metrics.append(Metric(names.COND_LATE_HALF_MEAN_COS, 0.6 + init.normal(0, 0.01), now, 0))
            for layer in range(n_layers + 1):
                metrics.append(Metric(names.layer_metric(layer), 0.1 + 0.8 * layer / n_layers + init.normal(0, 0.01), now, 0))
        client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()], tags=[RunTag("note", "synthetic")])
        if with_artifacts and not is_failed:
            client.log_dict(run_id, record, names.ARTIFACT_CONDENSATION_JSON)
        client.set_terminated(run_id, "FAILED" if is_failed else "FINISHED")
        (failures if is_failed else finished).append(run_id)
    client.set_terminated(parent.info.run_id, "FINISHED")
    return SyntheticStudy(tracking_uri, study, experiment_id, parent.info.run_id, tuple(finished), tuple(failures))


def best_lambda(n: float) -> float:
    """The synthetic sweeps' optimum: lambda*(N) = 0.5 * (N / 1e6)^-0.3."""
    return 0.5 * (n / 1e6) ** -0.3


def fill_sweep_trials(tracking_uri: str, study: SyntheticStudy, *, rungs: dict[str, float] | None = None, lambdas: tuple[float, ...] = (0.05, 0.2, 0.5)) -> list[str]:
    """Add kind=trial runs to a study: val/loss is lowest at `best_lambda(N)` (in log lambda)."""
    rungs = RUNG_SIZES if rungs is None else rungs
    client = MlflowClient(tracking_uri)
    made = []
    for rung, n in rungs.items():
        for lam in lambdas:
            tags = {
                names.TAG_KIND: names.KIND_TRIAL,
                names.TAG_STUDY: study.study,
                names.TAG_RUNG: rung,
                names.TAG_N_PARAMS: str(int(n)),
                names.TAG_ARM: names.ARM_DISPERSION,
                names.TAG_SEED: "0",
                names.TAG_STATUS: names.STATUS_FINISHED,
                names.TAG_TRIAL_STATE: "finished",
                "mlflow.parentRunId": study.parent_run_id,
            }
            run = client.create_run(study.experiment_id, tags=tags)
            loss = true_loss(n) + 0.05 * math.log(lam / best_lambda(n)) ** 2
            client.log_batch(run.info.run_id, metrics=[Metric(names.VAL_LOSS, loss, int(time.time() * 1000), 1)], params=[Param(names.PARAM_LAMBDA, str(lam))])
            client.set_terminated(run.info.run_id, "FINISHED")
            made.append(run.info.run_id)
    return made


def fill_observation_study(tracking_uri: str, study: str = "observe", *, artifact_root: str | None = None, with_eval: bool = False) -> list[str]:
    """kind=observe runs: two families, one source, Spearman falling with size; with `with_eval`,
    each model's downstream results at step 0 too (accuracy rising with size)."""
    client = MlflowClient(tracking_uri)
    if artifact_root is None:
        artifact_root = str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts")
    experiment_id = client.create_experiment(study, artifact_location=f"{artifact_root}/{study}")
    made = []
    for family, sizes in {"gpt2": (124e6, 355e6, 774e6, 1.5e9), "qwen3": (0.6e9, 1.7e9, 4e9)}.items():
        for n in sizes:
            tags = {
                names.TAG_KIND: names.KIND_OBSERVE,
                names.TAG_STUDY: study,
                names.TAG_FAMILY: family,
                names.TAG_MODEL: f"{family}-{n:.2g}",
                names.TAG_N_PARAMS: str(int(n)),
                names.TAG_SOURCE: "wikitext",
                names.TAG_STATUS: names.STATUS_FINISHED,
            }
            run = client.create_run(experiment_id, tags=tags)
            rho = 0.9 - 0.5 * math.log10(n / 1e8)
            now = int(time.time() * 1000)
            metrics = [Metric(names.COND_SPEARMAN, rho, now, 0)]
            if with_eval:
                acc = {task: 0.3 + offset + 0.05 * math.log10(n / 1e8) for task, offset in EVAL_TEST_TASKS.items()}
                metrics += [Metric(names.eval_metric_key(task, "acc"), value, now, 0) for task, value in acc.items()]
                metrics += [Metric(EVAL_MEAN_ACC, float(np.mean(list(acc.values()))), now, 0),
                            Metric(names.eval_metric_key(EVAL_PERPLEXITY_TASK, "word_perplexity"), 30.0 * (n / 1e8) ** -0.3, now, 0)]
            client.log_batch(run.info.run_id, metrics=metrics)
            client.set_terminated(run.info.run_id, "FINISHED")
            made.append(run.info.run_id)
    return made


if __name__ == "__main__":
    uri = sys.argv[1] if len(sys.argv) > 1 else "sqlite:///mlflow.db"
    made = fill_synthetic_study(uri, sys.argv[2] if len(sys.argv) > 2 else "synthetic")
    print(f"wrote study {made.study!r}: {len(made.finished_run_ids)} finished, {len(made.failed_run_ids)} failed runs -> {uri}")
