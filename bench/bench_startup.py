"""Where a training run's start-up goes: a timeline of one real run, driver and workers (issue 16).

Runs the real `scaling.study.run_study` on a tiny study (the `tiny` ladder's smallest rung,
2 workers, ZeRO-2, a few steps; probe and checkpoint only at the end) in a private local Ray.
Nothing in `scaling/` is changed: timestamps come from wrappers installed around the
functions the run calls, in the driver (MLflow run creation, `fit`) and, through Ray's
`worker_process_setup_hook`, in every worker process (torch import, process group, the
loop's own steps: MLflow logger, model build, DeepSpeed import and `initialize`, data, first
step, final probe and checkpoint). The wrappers only read the clock. Between a worker
process being up and the loop starting, Ray Train imports torch and ray.train, sets up the
worker and the torch process group: that segment is reported as one.

    python bench/bench_startup.py                     # baseline + dispersion arm, 2 workers, 2 CPUs
    python bench/bench_startup.py --workers 1 --arms baseline

Prints, per run, each phase's start (seconds after the driver began the run) and duration,
for the driver and for every worker rank. The baseline, measured in the same Ray after the
study: Ray Train's own floor, a TorchTrainer with the same workers whose loop does nothing (run
twice, the second one counts): how long `fit()` takes to reach the loop and to return. What a run
spends beyond that floor is the project's own start-up (model, DeepSpeed, data, MLflow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))

LOG_ENV = "BENCH_STARTUP_LOG"

# Functions of scaling.train that the loop calls by their module-level name, and what they do.
LOOP_PHASES = {
    "_rank0_logger": "MLflow: import + client + run (rank 0)",
    "_initial_model": "model build (imports transformers)",
    "_state_hash": "initial-weights hash",
    "_install_arm_hooks": "arm hooks",
    "skip_cpu_shm_build": "import deepspeed",
    "split_weight_decay": "optimizer groups",
    "_resolve": "data from the object store",
    "_probe": "final probe (val loss + condensation)",
    "_save_and_report": "checkpoint save + report",
}


def _record(event: str, start: float, end: float, **extra) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        line = json.dumps({"pid": os.getpid(), "event": event, "start": start, "end": end, **extra})
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def _timed(function, event: str):
    def wrapper(*args, **kwargs):
        start = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            _record(event, start, time.time())

    wrapper.__wrapped__ = function
    return wrapper


def instrument_worker() -> None:
    """Ray's worker_process_setup_hook: runs first in every worker process of the job."""
    if not os.environ.get(LOG_ENV):
        return
    ready = time.time()
    _record("worker process ready", ready, ready)
    # Nothing heavy here (this runs in every Ray process, the Train controller's too): scaling.train
    # imports only numpy and the light scaling modules at its top.
    start = time.time()
    import scaling.train as train

    _record("import scaling.train", start, time.time())
    train.train_loop_per_worker = _timed(train.train_loop_per_worker, "training loop (whole)")
    for name, label in LOOP_PHASES.items():
        setattr(train, name, _timed(getattr(train, name), label))

    shm = train.skip_cpu_shm_build

    def skip_and_wrap_initialize():
        shm()
        import deepspeed

        if not hasattr(deepspeed.initialize, "__wrapped__"):
            deepspeed.initialize = _timed(deepspeed.initialize, "deepspeed.initialize")

    train.skip_cpu_shm_build = skip_and_wrap_initialize
    after_step = train._ArmHooks.after_step
    seen = []

    def first_step(self, step, engine):
        if not seen:
            seen.append(step)
            now = time.time()
            _record("first optimizer step done", now, now)
        return after_step(self, step, engine)

    train._ArmHooks.after_step = first_step


def instrument_driver() -> None:
    import scaling.runs as runs
    import scaling.tracking as tracking

    tracking.Tracker.child_run = _timed(tracking.Tracker.child_run, "driver: MLflow child run")
    runs.fit = _timed(runs.fit, "driver: fit (Ray Train run)")
    train_run = runs.train_run

    def timed_train_run(*args, **kwargs):
        start = time.time()
        _record("driver: run begins", start, start)
        try:
            return train_run(*args, **kwargs)
        finally:
            _record("driver: run ends", start, time.time())

    import scaling.study as study

    study.train_run = timed_train_run


def _empty_loop(config):
    now = time.time()
    _record("empty loop entered", now, now)


def ray_train_floor(args, workdir: Path, repeats: int = 2) -> list[dict]:
    """`fit()` of a TorchTrainer with the study's workers and an empty loop: Ray Train's own cost of a run
    (controller, worker group, torch process group, teardown), nothing of ours."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    results = []
    for attempt in range(repeats):
        trainer = TorchTrainer(_empty_loop, scaling_config=ScalingConfig(
            num_workers=args.workers, resources_per_worker={"CPU": 1}, placement_strategy="PACK"),
            run_config=RunConfig(name=f"empty-{attempt}", storage_path=str(workdir / "runs")))
        start = time.time()
        trainer.fit()
        results.append({"start": start, "end": time.time()})
    return results


def floor_figures(events: list[dict], fits: list[dict]) -> tuple[float, float]:
    """(seconds to the empty loop, seconds of the whole fit) of the last empty run."""
    last = fits[-1]
    entered = [e["start"] for e in events if e["event"] == "empty loop entered" and last["start"] <= e["start"] <= last["end"]]
    return max(entered) - last["start"], last["end"] - last["start"]


def compare_with_floor(events: list[dict], fits: list[dict]) -> None:
    to_loop, whole = floor_figures(events, fits)
    runs = sorted((e for e in events if e["event"] == "driver: run ends"), key=lambda e: e["start"])
    print(f"\nRay Train floor (empty loop, warm Ray, {len(fits)} fits, the last counted): loop entered {to_loop:.1f} s "
          f"after fit() began, fit() {whole:.1f} s")
    print("| run | first optimizer step at s | run s | run / floor | beyond the floor s |")
    print("|---|---|---|---|---|")
    print(f"| floor: empty Ray Train run | {to_loop:.1f} (loop entered) | {whole:.1f} | 1.00x | 0.0 |")
    for number, run in enumerate(runs, 1):
        first = min((e["start"] for e in events if e["event"] == "first optimizer step done"
                     and run["start"] <= e["start"] <= run["end"]), default=None)
        length = run["end"] - run["start"]
        print(f"| run {number}{' (first after ray.init)' if number == 1 else ''} | "
              + (f"{first - run['start']:.1f}" if first else "-")
              + f" | {length:.1f} | {length / whole:.2f}x | {length - whole:.1f} |")


def build_study(args, workdir: Path):
    from scaling.config import study_from_dict

    arms = [arm if arm == "baseline" else {"name": "dispersion", "lambda": 0.1, "layers": "all"}
            for arm in args.arms.split(",")]
    return study_from_dict({
        "study": "bench-startup", "ladder": "tiny", "rungs": [args.rung], "arms": arms, "seeds": [0],
        "data": {"source": "bundled", "max_rows": 600},
        "training": {"seq_len": 32, "batch_size": 8, "micro_batch_size": 4, "max_steps": args.steps, "lr": 3e-3},
        "probes": {"every_steps": 0, "texts": 2, "max_length": 32, "val_batches": 1},
        "resources": {"num_workers": args.workers, "zero_stage": args.zero_stage},
        "checkpoint": {"every_steps": 0, "num_to_keep": 1, "max_failures": 0},
        "storage_path": str(workdir / "runs"),
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
    })


def report(events: list[dict]) -> None:
    """One table per run: phases of the driver and of each worker process, in time order."""
    runs = sorted((e for e in events if e["event"] == "driver: run ends"), key=lambda e: e["start"])
    for number, run in enumerate(runs, 1):
        begin, end = run["start"], run["end"]
        inside = [e for e in events if begin <= e["start"] <= end and e is not run]
        loop_pids = sorted({e["pid"] for e in inside if e["event"] == "training loop (whole)"})
        rank0 = {e["pid"] for e in inside if e["event"] == LOOP_PHASES["_rank0_logger"]}
        workers = {pid: "rank 0" if pid in rank0 else f"rank {n}" for n, pid in
                   enumerate(sorted(loop_pids, key=lambda pid: pid not in rank0))}
        first = min((e["start"] for e in inside if e["event"] == "first optimizer step done"), default=None)
        print(f"\nrun {number}: {end - begin:.1f} s from the driver's start to its end; first optimizer step done at "
              + (f"{first - begin:.1f} s" if first else "-"))
        print("| who | phase | starts at s | takes s |")
        print("|---|---|---|---|")
        for e in sorted(inside, key=lambda e: e["start"]):
            if e["pid"] in workers:
                who = workers[e["pid"]]
            elif e["event"].startswith("driver"):
                who = "driver"
            else:
                continue  # other Ray processes (the Train controller, idle workers)
            name = e["event"].removeprefix("driver: ")
            print(f"| {who} | {name} | {e['start'] - begin:.2f} | {e['end'] - e['start']:.2f} |")
        starts = [min(e["start"] for e in inside if e["pid"] == pid) for pid in workers]
        if starts:
            fit = next((e for e in inside if e["event"] == "driver: fit (Ray Train run)"), None)
            tail = (f"; fit() began at {fit['start'] - begin:.2f} s and returned {end - fit['end']:.2f} s "
                    "before the run ended") if fit else ""
            print(f"worker processes ready {min(starts) - begin:.2f}-{max(starts) - begin:.2f} s after the run "
                  f"began{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rung", default="tiny-165K")
    parser.add_argument("--arms", default="baseline,dispersion", help="comma list: baseline, dispersion")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the private Ray")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import ray

    from scaling.study import run_study

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    log = workdir / "timeline.jsonl"
    log.unlink(missing_ok=True)
    os.environ[LOG_ENV] = str(log)
    instrument_driver()
    study = build_study(args, workdir)
    print(f"{args.rung}, arms {args.arms}, {args.workers} worker(s), ZeRO-{args.zero_stage}, {args.steps} steps; "
          f"Ray with {args.cpus} CPUs on {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}", flush=True)
    started = time.time()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", LOG_ENV: str(log),
                                       "PYTHONPATH": str(ROOT)},
                          "worker_process_setup_hook": instrument_worker})
    _record("driver: ray.init", started, time.time())
    try:
        outcomes = run_study(study, "study: bench-startup\n", progress=lambda *_: None)
        fits = ray_train_floor(args, workdir)
    finally:
        ray.shutdown()
    for outcome in outcomes:
        print(f"{outcome.rung} {outcome.arm}: {outcome.status} in {outcome.seconds:.1f} s {outcome.detail}")
    events = [json.loads(line) for line in log.read_text().splitlines()]
    init = next(e for e in events if e["event"] == "driver: ray.init")
    print(f"ray.init: {init['end'] - init['start']:.1f} s (once per driver)")
    report(events)
    compare_with_floor(events, fits)
    print(f"\nload at end {os.getloadavg()[0]:.1f}; timeline in {log}")


if __name__ == "__main__":
    main()
