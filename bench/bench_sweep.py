"""Optuna + ASHA sweep vs an exhaustive grid over the same lambda x layers space (issue 4b).

On one rung of the `tiny` ladder (1 Ray Train worker, ZeRO-0, a few steps, validation
probes every `--probe-every` steps), all into one temp MLflow store:

* sweep: `scaling.study.run_study` on a study with a `search` section (Ray Tune + Optuna TPE,
  the paper's default tried first, ASHA on `val/loss`), `--samples` trials over
  lambda log-uniform in `--lambda-range` and the `--layers` choices. The baseline arm the
  sweep requires runs too; its steps are counted apart.
* grid: one study per cell (a single fixed dispersion arm) for every lambda of `--grid-lambdas`
  x every layer selection of `--layers`, each trained to the end.

Steps spent = the number of `train/ce_loss` points in MLflow of every run (so steps an
early-stopped trial never ran are not counted). Best = the lowest final `val/loss`
(the sweep's best trial is the one `scaling.sweep` tagged `best_trial`, chosen on validation
loss among trials that ran to the end). Goal: the sweep's best within 10% of the grid's best
with at most a third of the grid's steps. Timings are reported but not the point (other
jobs share these cores).

    python bench/bench_sweep.py                          # tiny-165K, 8 steps, 5 trials vs a 4 x 4 grid
    python bench/bench_sweep.py --samples 4 --grid-lambdas 0.01,0.1,1 --layers all,last
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaling import names  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rung", default="tiny-165K")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--probe-every", type=int, default=2)
    parser.add_argument("--samples", type=int, default=5, help="Optuna trials")
    parser.add_argument("--lambda-range", default="0.003,3.0", help="log-uniform range of the search")
    parser.add_argument("--grid-lambdas", default="0.003,0.03,0.3,3.0", help="the grid's lambdas")
    parser.add_argument("--layers", default="all,last,early_half,late_half", help="layer selections (both)")
    parser.add_argument("--grace-period", type=int, default=1)
    parser.add_argument("--reduction-factor", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--max-rows", type=int, default=800)
    parser.add_argument("--grid-parallel", type=int, default=4,
                        help="grid cells trained side by side (on a shared machine more processes get more CPU)")
    parser.add_argument("--skip-grid", action="store_true", help="only the sweep")
    parser.add_argument("--compare-reuse", action="store_true",
                        help="first run the same sweep with a worker group per trial (search.reuse_worker_groups: "
                             "false, the way trials ran before groups were kept) and compare end-to-end times")
    parser.add_argument("--skip-sweep", action="store_true",
                        help="only the grid (e.g. in a second process on the same --workdir); a later run "
                             "without either flag finds both finished (runs are skipped) and prints the comparison")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: read the sweep and grid of --workdir's MLflow store and compare")
    parser.add_argument("--workdir", default=None, help="keep the MLflow store and Ray folders here")
    return parser.parse_args()


def base_study(args, workdir: Path, name: str, arms: list, search: dict | None = None):
    from scaling.config import study_from_dict

    raw = {
        "study": name,
        "ladder": "tiny",
        "rungs": [args.rung],
        "arms": arms,
        "seeds": [0],
        "data": {"source": "bundled", "max_rows": args.max_rows},
        "training": {"seq_len": args.seq_len, "batch_size": args.batch_size,
                     "micro_batch_size": args.micro_batch_size, "max_steps": args.steps, "lr": 3e-3},
        "probes": {"every_steps": args.probe_every, "texts": 2, "max_length": 32, "val_batches": 1},
        "resources": {"num_workers": 1, "zero_stage": 0},
        "checkpoint": {"every_steps": 0, "num_to_keep": 1, "max_failures": 0},
        "storage_path": str(workdir / "runs"),
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
    }
    if search:
        raw["search"] = search
    return study_from_dict(raw)


def read_runs(tracking_uri: str, study_name: str, kind: str) -> list[dict]:
    """Per run of that kind in the study's experiment: settings, steps run, final val/loss, state."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(study_name)
    rows = []
    for run in client.search_runs([experiment.experiment_id], filter_string=f"tags.{names.TAG_KIND} = '{kind}'"):
        steps = len(client.get_metric_history(run.info.run_id, names.TRAIN_CE_LOSS))
        rows.append({"lambda": float(run.data.params.get(names.PARAM_LAMBDA, 0.0)),
                     "layers": run.data.params.get(names.PARAM_LAYERS, "-"), "steps": steps,
                     "val_loss": run.data.metrics.get(names.VAL_LOSS),
                     "state": run.data.tags.get(names.TAG_TRIAL_STATE, run.data.tags.get(names.TAG_STATUS, "")),
                     "best": run.data.tags.get(names.TAG_BEST_TRIAL) == "true"})
    return rows


def read_grid(tracking_uri: str, num_cells: int) -> list[dict]:
    """The finished grid cells already in the store (missing ones are reported and left out)."""
    rows = []
    for i in range(num_cells):
        try:
            cell = [r for r in read_runs(tracking_uri, f"bench-grid-{i:02d}", names.KIND_TRAIN)
                    if r["val_loss"] is not None]
        except AttributeError:  # no such experiment yet
            cell = []
        if not cell:
            print(f"  grid cell {i + 1}: not finished, left out")
        rows.extend(cell)
    return rows


def main() -> None:
    args = parse_args()
    import ray

    from scaling.study import run_study

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the sweep summary goes to outputs/ under the working directory
    layers = [s.strip() for s in args.layers.split(",")]
    low, high = (float(v) for v in args.lambda_range.split(","))
    grid_lambdas = [float(v) for v in args.grid_lambdas.split(",")]
    search = {"num_samples": args.samples, "metric": names.VAL_LOSS, "mode": "min", "seed": 0,
              "lambda": [low, high], "layers": layers, "grace_period": args.grace_period,
              "reduction_factor": args.reduction_factor, "max_concurrent": 1}
    print(f"rung {args.rung}, {args.steps} steps, val probe every {args.probe_every}; sweep: {args.samples} "
          f"trials, lambda in [{low}, {high}], layers {layers}; grid: {len(grid_lambdas)} lambdas x "
          f"{len(layers)} layer sets = {len(grid_lambdas) * len(layers)} runs; load {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores; workdir {workdir}", flush=True)

    sweep_study = base_study(args, workdir, "bench-sweep", ["baseline"], search)
    sweep_seconds = grid_seconds = 0.0
    if args.report_only:
        grid = read_grid(sweep_study.tracking_uri, len(grid_lambdas) * len(layers))
    else:
        ray.init(address="local", num_cpus=max(4, args.grid_parallel), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
        quiet = lambda *_: None  # noqa: E731
        try:
            per_trial_seconds = None
            if args.compare_reuse and not args.skip_sweep:
                from scaling.config import plan_runs
                from scaling.study import prepare_data

                # Tokenizer and token shards built before either clock starts: both sweeps then reuse them.
                prepare_data(sweep_study, plan_runs(sweep_study)[0].rung.vocab_size, progress=quiet)
                started = time.perf_counter()
                run_study(base_study(args, workdir, "bench-sweep-per-trial", ["baseline"],
                                     {**search, "reuse_worker_groups": False}), "study: bench-sweep-per-trial\n",
                          progress=quiet)
                per_trial_seconds = time.perf_counter() - started
                print(f"sweep with a worker group per trial done in {per_trial_seconds:.0f} s", flush=True)
            started = time.perf_counter()
            if not args.skip_sweep:
                run_study(sweep_study, "study: bench-sweep\n", progress=quiet)
            sweep_seconds = time.perf_counter() - started
            print(f"sweep done in {sweep_seconds:.0f} s", flush=True)
            if per_trial_seconds:
                trials_of = {name: sorted((round(t["lambda"], 6), t["layers"], t["steps"], t["state"]) for t in read_runs(
                    sweep_study.tracking_uri, name, names.KIND_TRIAL)) for name in ("bench-sweep-per-trial", "bench-sweep")}
                print("the two sweeps ran " + ("the same trials to the same states" if len(set(map(tuple, trials_of.values())))
                                               == 1 else f"different trials: {trials_of}"), flush=True)
                print(f"end to end (with the baseline run): a worker group per trial {per_trial_seconds:.0f} s vs "
                      f"groups kept across trials {sweep_seconds:.0f} s: {per_trial_seconds / sweep_seconds:.2f}x "
                      f"faster (goal >= 1.5x)", flush=True)
            grid_seconds, grid = 0.0, []
            if not args.skip_grid:
                from concurrent.futures import ThreadPoolExecutor

                started = time.perf_counter()
                cells = [(lam, layer) for lam in grid_lambdas for layer in layers]

                def train_cell(i: int) -> list[dict]:
                    lam, layer = cells[i]
                    name = f"bench-grid-{i:02d}"
                    arm = {"name": "dispersion", "variant": "angular_spread", "lambda": lam, "layers": layer}
                    try:
                        run_study(base_study(args, workdir, name, [arm]), f"study: {name}\n", progress=quiet)
                    except Exception as exc:  # noqa: BLE001 -- retried one at a time below
                        from scaling.errors import one_line

                        print(f"  grid cell {i + 1}: {one_line(exc)}", flush=True)
                        return []
                    rows = read_runs(sweep_study.tracking_uri, name, names.KIND_TRAIN)
                    print(f"  grid cell {i + 1}/{len(cells)}: lambda={lam:g} layers={layer} "
                          f"val/loss {rows[0]['val_loss']}", flush=True)
                    return rows

                # transformers' lazy imports are not thread-safe: resolve the one data.py needs here first.
                from transformers import AutoTokenizer  # noqa: F401

                # Each cell is its own study (one fixed dispersion arm); finished cells are skipped on a rerun.
                with ThreadPoolExecutor(max_workers=max(1, args.grid_parallel)) as pool:
                    results = list(pool.map(train_cell, range(len(cells))))
                for i, rows in enumerate(results):
                    grid.extend(rows or train_cell(i))  # a cell that failed side by side, once more alone
                grid_seconds = time.perf_counter() - started
        finally:
            ray.shutdown()

    if args.skip_sweep:
        print(f"grid done in {grid_seconds:.0f} s; rerun without --skip-sweep on --workdir {workdir} to compare")
        return
    trials = read_runs(sweep_study.tracking_uri, "bench-sweep", names.KIND_TRIAL)
    baseline = read_runs(sweep_study.tracking_uri, "bench-sweep", names.KIND_TRAIN)
    print(f"\nsweep trials ({sweep_seconds:.0f} s with the baseline run):")
    for t in sorted(trials, key=lambda r: r["val_loss"] if r["val_loss"] is not None else 1e9):
        print(f"  lambda={t['lambda']:<9.4g} layers={t['layers']:<11} steps={t['steps']:>3} "
              f"val/loss={t['val_loss'] if t['val_loss'] is None else round(t['val_loss'], 4)} "
              f"{t['state']}{'  <- best' if t['best'] else ''}")
    for b in baseline:
        print(f"  baseline arm: steps={b['steps']} val/loss={b['val_loss']:.4f}")
    sweep_steps = sum(t["steps"] for t in trials)
    best = [t for t in trials if t["best"]] or sorted(  # an unfinished sweep has no tag yet: same rule
        (t for t in trials if t["state"] == names.TRIAL_FINISHED and t["val_loss"] is not None),
        key=lambda t: t["val_loss"])[:1]
    sweep_best = best[0]["val_loss"] if best else None
    if not grid:
        print(f"sweep: {sweep_steps} trial steps, best val/loss {sweep_best}")
        return
    grid_steps = sum(g["steps"] for g in grid)
    grid_best = min(grid, key=lambda g: g["val_loss"])
    print(f"grid ({grid_seconds:.0f} s): best val/loss {grid_best['val_loss']:.4f} at lambda="
          f"{grid_best['lambda']:g} layers={grid_best['layers']}; worst "
          f"{max(g['val_loss'] for g in grid):.4f}")
    base_steps = sum(b["steps"] for b in baseline)
    print(f"\nsteps: sweep trials {sweep_steps} (+{base_steps} baseline) vs grid {grid_steps}: "
          f"{sweep_steps / grid_steps:.2f}x ({(sweep_steps + base_steps) / grid_steps:.2f}x with the baseline) "
          f"(goal <= 0.33x)")
    if sweep_best is None:
        print("sweep: no trial finished, so no best")
    else:
        rank = 1 + sum(g["val_loss"] < sweep_best for g in grid)
        print(f"best val/loss: sweep {sweep_best:.4f} vs grid {grid_best['val_loss']:.4f}: "
              f"{sweep_best / grid_best['val_loss']:.3f}x (goal <= 1.10x); the sweep's best would rank "
              f"{rank} of {len(grid) + 1} among the grid's cells")
    print(f"wall: sweep {sweep_seconds:.0f} s vs grid {grid_seconds:.0f} s; load after {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
