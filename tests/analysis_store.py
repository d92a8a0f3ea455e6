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
- eval/mean_acc when `accuracy_gain` is given (dispersion: that much higher).

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
) -> SyntheticStudy:
    """Write one synthetic study; returns the run ids. `failed` extra runs end failed.

    `metric_overrides` forces a metric to a constant (or NaN) in every run, to test
    degenerate inputs. Artifacts go under `artifact_root` (default: next to a SQLite file).
    `cos_factor`, `loss_multiplier`, `initial_spearman` (None: no step-0 probe) and
    `accuracy_gain` (None: no eval/mean_acc) set the truth the paper's claims are checked on.
    """
    rungs = RUNG_SIZES if rungs is None else rungs
    rng = np.random.default_rng(seed)
    client = MlflowClient(tracking_uri)
    if artifact_root is None:
        db_path = Path(tracking_uri.removeprefix("sqlite:///"))
        artifact_root = str(db_path.parent / "artifacts")
    experiment_id = client.create_experiment(study, artifact_location=f"{artifact_root}/{study}")
    parent = client.create_run(experiment_id, tags={names.TAG_KIND: names.KIND_STUDY, names.TAG_STUDY: study}, run_name=study)
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
            "mlflow.parentRunId": parent.info.run_id,
        }
        if is_failed:
            tags[names.TAG_FAILURE] = "loss became NaN at step 2"
        run = client.create_run(experiment_id, tags=tags, run_name=f"{rung}-{arm}-s{run_seed}")
        run_id = run.info.run_id
        lam = 0.1 if arm == names.ARM_DISPERSION else 0.0
        params = {names.PARAM_LAMBDA: lam, names.PARAM_LAYERS: "all", names.PARAM_VARIANT: "angular_spread", names.PARAM_TAU: 1.0,
                  names.PARAM_CLAMP: 0.1, "steps": steps}
        finals = {
            names.VAL_LOSS: true_loss(n, arm, loss_multiplier) * math.exp(rng.normal(0, noise)),
            names.COND_LAST_LAYER_MEAN_COS: _true_mean_cos(n, arm, cos_factor) * math.exp(rng.normal(0, noise)),
            names.COND_LATE_HALF_MEAN_COS: 0.9 * _true_mean_cos(n, arm, cos_factor) * math.exp(rng.normal(0, noise)),
            names.COND_SPEARMAN: _true_spearman(n, arm) + rng.normal(0, 0.02),
            names.COND_KENDALL: 0.8 * _true_spearman(n, arm) + rng.normal(0, 0.02),
        }
        if accuracy_gain is not None:
            gain = accuracy_gain if arm == names.ARM_DISPERSION else 0.0
            finals[EVAL_MEAN_ACC] = 0.3 + 0.02 * math.log10(n / 1e6) + gain + rng.normal(0, noise)
        finals.update(metric_overrides or {})
        now = int(time.time() * 1000)
        metrics = []
        for step in range(1, steps + 1):
            warm = 1.0 + 0.5 * (steps - step) / steps  # earlier steps: higher loss
            metrics += [
                Metric(names.TRAIN_CE_LOSS, finals[names.VAL_LOSS] * warm, now, step),
                Metric(names.TRAIN_LR, 1e-3, now, step),
                Metric(names.VAL_LOSS, finals[names.VAL_LOSS] * (warm if step < steps else 1.0), now, step),
            ]
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
            # Step 0 depends on (rung, seed) only: paired arms share their initialisation.
            init = np.random.default_rng([int(n), run_seed])
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


def fill_observation_study(tracking_uri: str, study: str = "observe", *, artifact_root: str | None = None) -> list[str]:
    """kind=observe runs: two families, one source, Spearman falling with size."""
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
            client.log_batch(run.info.run_id, metrics=[Metric(names.COND_SPEARMAN, rho, int(time.time() * 1000), 0)])
            client.set_terminated(run.info.run_id, "FINISHED")
            made.append(run.info.run_id)
    return made


if __name__ == "__main__":
    uri = sys.argv[1] if len(sys.argv) > 1 else "sqlite:///mlflow.db"
    made = fill_synthetic_study(uri, sys.argv[2] if len(sys.argv) > 2 else "synthetic")
    print(f"wrote study {made.study!r}: {len(made.finished_run_ids)} finished, {len(made.failed_run_ids)} failed runs -> {uri}")
