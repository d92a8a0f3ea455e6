"""A training run's start-up: one worker group per run (the baseline) vs runs chained in one worker group
(what a study does when its runs queue for the cluster), with a timeline of where the time goes (issue 16).

Runs the real `scaling.runs.train_chain` on a tiny study (the `tiny` ladder's smallest rung, 2 workers,
ZeRO-2, a few steps; probe and checkpoint only at the end; `--runs` seeds of the baseline arm) in a
private local Ray, twice in the same Ray: first each run in its own worker group (one `train_chain` per
run, as every run was trained before chaining, and as a study still trains runs that fit side by side),
then all of them chained in one group (one `train_chain` for all). Nothing in `scaling/` is changed:
timestamps come from wrappers installed around the functions the runs call, in the driver and, through
Ray's `worker_process_setup_hook`, in every worker process (MLflow logger, model build, DeepSpeed import
and `initialize`, data, first step, final probe and checkpoint). The wrappers only read the clock.

    python bench/bench_startup.py                     # 4 runs, 2 workers, 2 CPUs
    python bench/bench_startup.py --workers 1 --runs 3

A run's start-up is the time from when it could begin (its own `train_chain` call in the baseline; the
end of the run before it in a chain, or the chain's call for the first) to its first optimizer step
done. Prints that per run for both ways, their means without the first run of each (the first after
`ray.init` pays for cold caches), the ratio, and the phases of one warm run of each. Also measured in
the same Ray: Ray Train's own floor, a TorchTrainer with the same workers whose loop does nothing.
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

# Functions that scaling.run_loop calls by their module-level name (RunLoop's methods for the last two), and
# what they do.
LOOP_PHASES = {
    "_rank0_logger": "MLflow: import + client + run (rank 0)",
    "initial_model": "model build (imports transformers)",
    "state_hash": "initial-weights hash",
    "install_arm_hooks": "arm hooks",
    "skip_cpu_shm_build": "import deepspeed",
    "split_weight_decay": "optimizer groups",
    "resolve": "data from the object store",
    "probe": "final probe (val loss + condensation)",
    "checkpoint": "checkpoint save + report",
}
TRAIN_MODULE = ("split_weight_decay",)
"""Called inside scaling.train, so wrapped there."""
METHODS = ("probe", "checkpoint")
"""RunLoop's methods, wrapped on the class."""


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
    # Nothing heavy here (this runs in every Ray process, the Train controller's too): scaling.run_loop
    # imports only numpy and the light scaling modules at its top.
    start = time.time()
    import scaling.run_loop as loop
    import scaling.train as train

    _record("import scaling.run_loop", start, time.time())
    loop.train_loop_per_worker = _timed(loop.train_loop_per_worker, "training loop (whole)")
    timed_run = _timed(loop.train_run, "run (whole)")
    seen = []  # whether this process's current run has done its first step

    def run_and_forget_first_step(*args, **kwargs):
        seen.clear()
        return timed_run(*args, **kwargs)

    loop.train_run = run_and_forget_first_step
    for name, label in LOOP_PHASES.items():
        owner = train if name in TRAIN_MODULE else loop.RunLoop if name in METHODS else loop
        setattr(owner, name, _timed(getattr(owner, name), label))

    shm = loop.skip_cpu_shm_build

    def skip_and_wrap_initialize():
        shm()
        import deepspeed

        if not hasattr(deepspeed.initialize, "__wrapped__"):
            deepspeed.initialize = _timed(deepspeed.initialize, "deepspeed.initialize")

    loop.skip_cpu_shm_build = skip_and_wrap_initialize
    after_step = train._ArmHooks.after_step

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


def run_startups(events: list[dict], chain: dict) -> list[tuple[float, float]]:
    """(start-up, whole) seconds of each run of one `train_chain` call, in order: start-up from when the run
    could begin (the call, or the end of the run before it in the group) to its first optimizer step."""
    inside = [e for e in events if chain["start"] <= e["start"] <= chain["end"]]
    rank0 = {e["pid"] for e in inside if e["event"] == LOOP_PHASES["_rank0_logger"]}
    runs = sorted((e for e in inside if e["event"] == "run (whole)" and e["pid"] in rank0), key=lambda e: e["start"])
    firsts = sorted(e["start"] for e in inside if e["event"] == "first optimizer step done" and e["pid"] in rank0)
    figures, ready = [], chain["start"]
    for run in runs:
        first = min((t for t in firsts if run["start"] <= t <= run["end"]), default=None)
        figures.append((first - ready if first else float("nan"), run["end"] - ready))
        ready = run["end"]
    return figures


def compare(events: list[dict], separate: list[dict], chained: dict, fits: list[dict]) -> None:
    baseline = [figure for call in separate for figure in run_startups(events, call)]
    reused = run_startups(events, chained)
    to_loop, whole = floor_figures(events, fits)
    print("\n| run | own worker group: start-up s | run s | chained: start-up s | run s |")
    print("|---|---|---|---|---|")
    for number, (own, chain) in enumerate(zip(baseline, reused), 1):
        print(f"| {number} | {own[0]:.1f} | {own[1]:.1f} | {chain[0]:.1f} | {chain[1]:.1f} |")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    own_start, chain_start = mean([f[0] for f in baseline[1:]]), mean([f[0] for f in reused[1:]])
    own_run, chain_run = mean([f[1] for f in baseline[1:]]), mean([f[1] for f in reused[1:]])
    print(f"mean of runs 2-{len(reused)}: start-up {own_start:.1f} s (own group) vs {chain_start:.1f} s (chained), "
          f"{own_start / chain_start:.1f}x less; whole run {own_run:.1f} vs {chain_run:.1f} s, "
          f"{own_run / chain_run:.2f}x faster")
    print(f"all {len(reused)} runs end to end: {sum(c['end'] - c['start'] for c in separate):.1f} s (own groups) vs "
          f"{chained['end'] - chained['start']:.1f} s (chained)")
    print(f"Ray Train floor (empty loop, warm Ray, {len(fits)} fits, the last counted): loop entered {to_loop:.1f} s "
          f"after fit() began, fit() {whole:.1f} s")


def build_study(args, workdir: Path, name: str):
    from scaling.config import study_from_dict

    return study_from_dict({
        "study": name, "ladder": "tiny", "rungs": [args.rung], "arms": ["baseline"],
        "seeds": list(range(args.runs)), "data": {"source": "bundled", "max_rows": 600},
        "training": {"seq_len": 32, "batch_size": 8, "micro_batch_size": 4, "max_steps": args.steps, "lr": 3e-3},
        "probes": {"every_steps": 0, "texts": 2, "max_length": 32, "val_batches": 1},
        "resources": {"num_workers": args.workers, "zero_stage": args.zero_stage},
        "checkpoint": {"every_steps": 0, "num_to_keep": 1, "max_failures": 0},
        "storage_path": str(workdir / "runs"),
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
    })


def train_both_ways(args, workdir: Path) -> tuple[list[dict], dict]:
    """The runs once with a worker group each, then (a second study, so nothing is skipped) chained."""
    from scaling.config import plan_runs
    from scaling.runs import train_chain
    from scaling.study import data_refs, prepare_data
    from scaling.tracking import Tracker

    calls = []
    for name in ("own-groups", "chained"):
        study = build_study(args, workdir, name)
        (plan,) = plan_runs(study)
        refs = data_refs(study, prepare_data(study, plan.rung.vocab_size, progress=lambda *_: None))
        tracker = Tracker(study.tracking_uri, study.study)
        parent = tracker.study_run_id(study.record_params())
        jobs = [(plan, study.arms[0], seed) for seed in study.seeds]
        for chain in ([[job] for job in jobs] if name == "own-groups" else [jobs]):
            start = time.time()
            outcomes = train_chain(study, chain, refs, tracker, parent, lambda *_: None)
            calls.append({"start": start, "end": time.time(), "name": name})
            bad = [o for o in outcomes if o.status != "finished"]
            if bad:
                raise SystemExit(f"{name}: a run did not finish: {bad}")
    return [c for c in calls if c["name"] == "own-groups"], next(c for c in calls if c["name"] == "chained")


def phases(events: list[dict], title: str, call: dict, number: int) -> None:
    """The phases of run `number` (1-based) of one `train_chain` call, per worker rank, in time order."""
    inside = [e for e in events if call["start"] <= e["start"] <= call["end"]]
    rank0 = {e["pid"] for e in inside if e["event"] == LOOP_PHASES["_rank0_logger"]}
    runs = sorted((e for e in inside if e["event"] == "run (whole)"), key=lambda e: e["start"])
    pids = sorted({e["pid"] for e in runs}, key=lambda pid: pid not in rank0)
    ours = [run for run in runs if run["pid"] in rank0]
    if len(ours) < number:
        return
    begin = call["start"] if number == 1 else ours[number - 2]["end"]
    end = ours[number - 1]["end"]
    print(f"\n{title}: phases from when it could begin (s)")
    print("| who | phase | starts at s | takes s |")
    print("|---|---|---|---|")
    for e in sorted((e for e in inside if begin <= e["start"] <= end), key=lambda e: e["start"]):
        if e["pid"] in pids:
            who = f"rank {pids.index(e['pid'])}"
        elif e["event"].startswith("driver"):
            who = "driver"
        else:
            continue  # other Ray processes (the Train controller, idle workers)
        print(f"| {who} | {e['event'].removeprefix('driver: ')} | {e['start'] - begin:.2f} | {e['end'] - e['start']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rung", default="tiny-165K")
    parser.add_argument("--runs", type=int, default=4, help="runs (seeds of the baseline arm) each way")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the private Ray")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be >= 2: the first run after ray.init is left out of the means")

    import ray

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    log = workdir / "timeline.jsonl"
    log.unlink(missing_ok=True)
    os.environ[LOG_ENV] = str(log)
    instrument_driver()
    print(f"{args.rung}, {args.runs} runs, {args.workers} worker(s), ZeRO-{args.zero_stage}, {args.steps} steps; "
          f"Ray with {args.cpus} CPUs on {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}", flush=True)
    started = time.time()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", LOG_ENV: str(log),
                                       "PYTHONPATH": str(ROOT)},
                          "worker_process_setup_hook": instrument_worker})
    _record("driver: ray.init", started, time.time())
    try:
        separate, chained = train_both_ways(args, workdir)
        fits = ray_train_floor(args, workdir)
    finally:
        ray.shutdown()
    events = [json.loads(line) for line in log.read_text().splitlines()]
    init = next(e for e in events if e["event"] == "driver: ray.init")
    print(f"ray.init: {init['end'] - init['start']:.1f} s (once per driver)")
    compare(events, separate, chained, fits)
    phases(events, "run 2 in its own worker group", separate[1], 1)
    phases(events, "run 2 chained after run 1", chained, 2)
    print(f"\nload at end {os.getloadavg()[0]:.1f}; timeline in {log}")


if __name__ == "__main__":
    main()
