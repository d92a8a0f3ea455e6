"""Goodput, efficiency and schedule of the README's demo study, before and after (issue 25).

Runs the real driver (`scaling/run.py search_spaces/demo.yaml`, each configuration in its own process,
its own private local Ray, MLflow store and run folders) and reads what the runs and the study run
logged (`scaling.timing`: every run's `time/*` split, the study's goodput, makespan and time outside
the runs). Configurations, in this order (the first pays the cold caches):

- `alone`: every (rung, arm) of the demo once (seed 0), in ONE chain with no evaluation beside it (a local
  Ray of 1 CPU fits one run at a time): each run's step seconds with nothing beside it;
- `baseline`: the demo as it was before issue 25 (`resources.chain_order=plan`: runs dealt to the chains
  in turn; `resources.finish_records=in_slot`: every run holds its worker group until its last
  evaluations are recorded);
- `improved`: the demo as it is now (defaults: on CPUs `finish_records: auto` is `in_slot`); its
  efficiency is logged on its study run (`time/efficiency`, so its report shows it), then the README's
  analysis call runs, timed;
- `beside`: the defaults with `resources.finish_records=beside_next` (what `auto` does on GPUs): a run with
  a successor gives the worker group to it at its last step and finishes its records beside it.

Every configuration trains one wave (`decide=null`: the demo's 2 seeds, 16 runs), so the figures are about
the schedule, not about how many waves the claims needed.

Prints, per configuration: wall time, training makespan, the ideal schedule and their ratio, time outside
the runs, summed slot seconds, goodput, **efficiency** (the runs' alone step seconds over their slot
seconds, alone measured by `alone`),
the phase shares, and per (rung, arm) the in-study step seconds over alone (the interference). Then the
improved/baseline ratios. The machine's load is printed with each configuration: a busy machine shifts
both sides, but not equally; run it on a quiet one.

CPU: the machine's busy core-seconds (/proc/stat, sampled every 0.5 s) during the training window (first
chain submitted to last run ended). With k chains side by side on C cores for the whole window, the slot
seconds are about k x makespan and the makespan at least busy / C, so efficiency cannot exceed about
(alone step seconds) x C / (k x busy core-seconds): the **efficiency ceiling** of that much CPU work.

    python bench/bench_goodput.py                     # ~20 min on 2 cores
    python bench/bench_goodput.py --quick             # 2 rungs, 40 steps, no evaluations (~3 min)
    python bench/bench_goodput.py --configs baseline,improved --workdir /tmp/goodput
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scaling import names, timing  # noqa: E402  (pure modules: no torch, no Ray)

DEMO = ROOT / "search_spaces" / "demo.yaml"
QUICK = ["training.max_steps=40", "rungs=[tiny-165K, tiny-429K]", "probes.every_steps=20", "eval=null"]
BASE = ["decide=null"]  # one wave of the demo's 16 runs: the schedule is the question here, not the waves
CONFIGS = {
    "alone": ["seeds=[0]", "eval=null"],
    "baseline": ["resources.chain_order=plan", "resources.finish_records=in_slot"],
    "improved": [],
    "beside": ["resources.finish_records=beside_next"],
}
ALONE_CPUS = 1  # a run without evaluations needs 1 CPU: a 1-CPU Ray fits one run at a time (2 CPUs fit two)

# One configuration, in a fresh process: `alone` starts Ray with ALONE_CPUS before the driver joins it.
DRIVER = """
import sys
from scaling.cluster import connect_ray
if sys.argv[1] == "alone":
    connect_ray(num_cpus={cpus})
from scaling.run import main
sys.exit(main(sys.argv[2:]))
"""


def run_config(name: str, overrides: list[str], workdir: Path) -> dict:
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    sets = [f"tracking_uri={uri}", f"storage_path={folder / 'runs'}", *overrides]
    argv = [str(DEMO)] + [arg for item in sets for arg in ("--set", item)]
    load = os.getloadavg()[0]
    started = time.time()
    with CpuSampler() as cpu:
        done = subprocess.run([sys.executable, "-c", DRIVER.format(cpus=ALONE_CPUS), name, *argv], cwd=ROOT,
                              env=driver_env(), capture_output=True, text=True)
    wall = time.time() - started
    (folder / "driver.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"{name}: the driver failed (rc {done.returncode}); see {folder / 'driver.log'}")
    result = {"name": name, "uri": uri, "folder": str(folder), "wall_s": wall, "load": load, **read_store(uri)}
    result["busy_core_s"] = cpu.busy_between(*result.pop("window"))
    return result


def driver_env() -> dict:
    return {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT)}


def analyse(result: dict) -> None:
    """The README's analysis call on the configuration's store, timed."""
    started = time.time()
    subprocess.run([sys.executable, "-m", "analysis.scaling_curves", "--tracking-uri", result["uri"], "--study", "demo",
                    "--out", str(Path(result["folder"]) / "analysis")], cwd=ROOT, env=driver_env(), check=True,
                   capture_output=True)
    result["analysis_s"] = time.time() - started


def read_store(uri: str) -> dict:
    """The study run's and every training run's `time/*`, and the training window (epoch s): from the first
    chain's submission (a run's MLflow start less its `time/queued_s`) to the last run's end."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    study = next(r for r in runs if r.data.tags.get(names.TAG_KIND) == names.KIND_STUDY)
    trained_runs = [r for r in runs if r.data.tags.get(names.TAG_KIND) == names.KIND_TRAIN]
    trained = [{"rung": r.data.tags.get(names.TAG_RUNG), "arm": r.data.tags.get(names.TAG_ARM),
                "seed": r.data.tags.get(names.TAG_SEED), **{k: v for k, v in r.data.metrics.items()
                                                             if k.startswith(timing.PREFIX)}}
               for r in trained_runs]
    window = (min(r.info.start_time / 1000 - r.data.metrics.get(names.TIME_QUEUED_S, 0.0) for r in trained_runs),
              max(r.info.end_time / 1000 for r in trained_runs))
    return {"study_run_id": study.info.run_id, "window": window, "runs": trained,
            "study": {k: v for k, v in study.data.metrics.items() if k.startswith(timing.PREFIX)}}


def log_efficiency(result: dict, value: float) -> None:
    """The measured efficiency on the configuration's study run, so its report states it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result["uri"])
    client.log_metric(result["study_run_id"], timing.EFFICIENCY, float(f"{value:.4g}"))
    client.set_tag(result["study_run_id"], timing.EFFICIENCY_SOURCE, "bench/bench_goodput.py (every rung and arm "
                   "also trained alone, one run at a time, no evaluations)")
    result["study"][timing.EFFICIENCY] = value


def busy_core_seconds() -> float:
    """Every core's non-idle seconds since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Busy core-seconds sampled every `every_s` on a thread, to integrate over any window of the block."""

    def __init__(self, every_s: float = 0.5):
        import threading

        self.every_s, self.samples = every_s, [(time.time(), busy_core_seconds())]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append((time.time(), busy_core_seconds()))

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.time(), busy_core_seconds()))

    def busy_between(self, start: float, end: float) -> float:
        """Busy core-seconds from `start` to `end` (linear between samples)."""
        import numpy as np

        times, busy = (np.array(column) for column in zip(*self.samples))
        return float(np.interp(end, times, busy) - np.interp(start, times, busy))


def cpu_lines(result: dict, alone: dict | None) -> list[str]:
    """The training window's CPU work and, with the alone reference, the efficiency ceiling it sets."""
    s, cores = result["study"], os.cpu_count() or 1
    makespan, busy = s.get(timing.MAKESPAN, 0.0), result.get("busy_core_s")
    if not makespan or busy is None:
        return []
    line = (f"CPU in the training window: {busy:.0f} busy core-s = {busy / (cores * makespan):.0%} of {cores} cores x "
            f"{makespan:.0f} s")
    per_run = alone_step_seconds(alone) if alone is not None else {}
    timed = [r for r in result["runs"] if r.get(timing.SLOT)]
    if per_run and timed and all((r["rung"], r["arm"]) in per_run for r in timed):
        needed = sum(per_run[(r["rung"], r["arm"])] for r in timed)
        chains = s.get(timing.SLOTS) or round(s.get(timing.SLOT, 0.0) / makespan)
        line += f"; the runs' steps at alone speed need {needed:.0f} core-s ({needed / busy:.0%} of that work)"
        if chains >= cores:  # every core has a chain: slot-s ~ chains x makespan, makespan >= busy / cores
            line += (f": efficiency ceiling ~ {needed * cores / (chains * busy):.2f} with {chains:g} chains on "
                     f"{cores} cores")
    return [line]


def alone_step_seconds(alone: dict) -> dict[tuple[str, str], float]:
    """(rung, arm) -> its step seconds trained alone."""
    return {(r["rung"], r["arm"]): r["time/step_s"] for r in alone["runs"] if r.get("time/step_s")}


def efficiency(result: dict, alone: dict | None) -> float | None:
    """The runs' alone step seconds (per rung and arm, from `alone`) over their summed slot seconds, through the
    study's own accounting (`scaling.timing.study_accounting`)."""
    if alone is None:
        return None
    per_run = alone_step_seconds(alone)
    timed = [r for r in result["runs"] if r.get(timing.SLOT)]
    if not timed or any((r["rung"], r["arm"]) not in per_run for r in timed):
        return None
    study = timing.study_accounting(timed, slots=1, makespan_s=0.0,
                                    alone_step_s=[per_run[(r["rung"], r["arm"])] for r in timed])
    return study.get(timing.EFFICIENCY)


def interference(result: dict, alone: dict) -> dict[tuple[str, str], float]:
    """In-study step seconds over alone, mean over the (rung, arm)'s runs."""
    per_run = alone_step_seconds(alone)
    ratios: dict[tuple[str, str], list[float]] = {}
    for r in result["runs"]:
        key = (r["rung"], r["arm"])
        if key in per_run and r.get("time/step_s"):
            ratios.setdefault(key, []).append(r["time/step_s"] / per_run[key])
    return {key: sum(v) / len(v) for key, v in sorted(ratios.items())}


def describe(result: dict, alone: dict | None) -> list[str]:
    s = result["study"]
    eff = efficiency(result, alone)
    lines = [f"== {result['name']} (load {result['load']:.1f} at start)",
             f"wall {result['wall_s']:.0f} s (driver process); training makespan {s.get(timing.MAKESPAN, 0):.0f} s, "
             f"ideal {s.get(timing.IDEAL_MAKESPAN, 0):.0f} s -> {s.get(timing.MAKESPAN_OVER_IDEAL, float('nan')):.2f}x; "
             f"outside runs {s.get(timing.OUTSIDE_RUNS, 0):.0f} s ({100 * s.get('time/outside_runs_share', 0):.0f}% "
             "of the driver's wall)",
             f"{len(result['runs'])} runs, {s.get(timing.SLOT, 0):.0f} slot-s: goodput {s.get(timing.GOODPUT, float('nan')):.3f}, "
             f"efficiency {eff:.3f} (alone measured)" if eff is not None else
             f"{len(result['runs'])} runs, {s.get(timing.SLOT, 0):.0f} slot-s: goodput {s.get(timing.GOODPUT, float('nan')):.3f}"]
    shares = ", ".join(f"{p} {100 * s.get(timing.share_key(p), 0):.1f}%" for p in timing.PHASES + ("other",))
    lines.append(f"shares of slot time: {shares}; dispersion term {100 * s.get(timing.share_key('dispersion'), 0):.1f}%")
    lines += cpu_lines(result, alone)
    if "analysis_s" in result:
        lines.append(f"analysis call: {result['analysis_s']:.0f} s")
    if alone is not None and result is not alone:
        lines.append("step seconds in the study / alone: " + ", ".join(
            f"{rung} {arm} {ratio:.2f}" for (rung, arm), ratio in interference(result, alone).items()))
    return lines


def compare(before: dict, after: dict, alone: dict | None) -> list[str]:
    """`after` against `before`, figure by figure (both from the same bench run)."""
    lines = [f"== {after['name']} / {before['name']} (same bench run)"]
    for key in (timing.MAKESPAN, timing.MAKESPAN_OVER_IDEAL, timing.GOODPUT, timing.SLOT, timing.OUTSIDE_RUNS):
        if before["study"].get(key) and after["study"].get(key) is not None:
            lines.append(f"{key}: {before['study'][key]:.4g} -> {after['study'][key]:.4g} "
                         f"({after['study'][key] / before['study'][key]:.2f}x)")
    effs = [efficiency(result, alone) for result in (before, after)]
    if None not in effs:
        lines.append(f"time/efficiency: {effs[0]:.3f} -> {effs[1]:.3f}")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="alone,baseline,improved,beside", help="comma-separated, of " + ", ".join(CONFIGS))
    parser.add_argument("--quick", action="store_true", help="2 rungs, 40 steps, no evaluations: a smoke run")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the stores and logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="a --json file of an earlier run: its configurations are read, not run again")
    args = parser.parse_args(argv)
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; choose from {list(CONFIGS)}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_goodput_"))
    results = json.loads(args.reuse.read_text()) if args.reuse else {}
    for name in chosen:
        overrides = BASE + (QUICK if args.quick else []) + CONFIGS[name]
        results[name] = run_config(name, overrides, workdir)
    if "improved" in chosen:
        measured = efficiency(results["improved"], results.get("alone"))
        if measured is not None:
            log_efficiency(results["improved"], measured)
        analyse(results["improved"])
    for name in results:
        print("\n".join(describe(results[name], results.get("alone"))), flush=True)
    for name in ("improved", "beside"):
        if "baseline" in results and name in results:
            print("\n".join(compare(results["baseline"], results[name], results.get("alone"))))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"stores and driver logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
