"""Where a run's worker-slot seconds go: a ledger of named phases on the worker's own clock.

Pure Python (no torch, no Ray): the trainer fills a `TimeLedger` per run, the driver and `analysis/`
read the `time/*` metrics it produces. A run's **slot** is the time its worker group was given to it:
from the moment it could start (its chain was submitted, or the run before it in the same worker group
ended) to its outcome. Every second of the slot is in exactly one phase of `PHASES` or in `other`
(what no phase claimed: gaps between phases, the chain's barrier, Python between steps).
`dispersion` is a part of `step`, not a phase beside it (shown as a slice of the step bar).

**Goodput** = step seconds / slot seconds: the share of the slot spent in optimizer steps (forward,
backward and update of every micro-batch, the dispersion term included).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

PHASES = ("startup", "data", "step", "probe", "eval_export", "eval_wait", "checkpoint", "logging")
"""The slot's phases, in the order a run meets them. startup: worker processes, imports, process group,
model build, DeepSpeed init, checkpoint restore (the first run of a worker group pays the processes and
imports); data: resolving the token shards and assembling batches; step: optimizer steps; probe:
condensation probes and validation loss; eval_export: writing the model for an evaluation (the evaluation
itself runs on its own resources: `time/evaluation_s`, outside the slot); eval_wait: the run's end waiting
for its last evaluations, whose results its record must hold (the slot is held meanwhile: only for the
last run of a chain or a sweep's trial; the others wait outside their slot, `time/finishing_s`); checkpoint:
save and upload; logging: MLflow writes and their flush."""
PARTS = {"dispersion": "step"}
"""Sub-phases: counted inside their parent, reported on their own."""
OUTSIDE_SLOT = ("queued", "evaluation", "finishing")
"""Measured, but not the run's slot: waiting for a worker group, the evaluation on its own actor, and
finishing the run's records after its slot (a run with a successor in its chain gives the worker group
to it at its last step, and waits for its last evaluations and MLflow writes on a thread beside it)."""

PREFIX = "time/"
SLOT = "time/slot_s"
OTHER = "time/other_s"
GOODPUT = "time/goodput"


def seconds_key(phase: str) -> str:
    return f"{PREFIX}{phase}_s"


def share_key(phase: str) -> str:
    return f"{PREFIX}{phase}_share"


class TimeLedger:
    """Seconds per phase for one run, from `slot_start` (epoch seconds, `time.time()` on any process of
    the same host or a clock-synced one) to `close()`. Phases do not nest, except a `PARTS` entry inside
    its parent; re-entering a phase adds to it."""

    def __init__(self, slot_start: float, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.slot_start = slot_start
        self.seconds: dict[str, float] = {}
        self.slot_end: float | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            self.add(name, self.clock() - started)

    def add(self, name: str, seconds: float) -> None:
        if name not in PHASES and name not in PARTS and name not in OUTSIDE_SLOT:
            raise ValueError(f"unknown time phase {name!r}; known: {PHASES + tuple(PARTS) + OUTSIDE_SLOT}")
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, float(seconds))

    def since_slot_start(self, name: str) -> None:
        """Everything from the slot's start to now is `name` (start-up: the clock starts before the
        process exists, so nothing earlier in this process could have claimed it)."""
        self.add(name, self.clock() - self.slot_start - sum(self.seconds.get(p, 0.0) for p in PHASES))

    def close(self) -> dict[str, float]:
        self.slot_end = self.clock()
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        """`time/<phase>_s` and `time/<phase>_share` for every phase and part, `time/other_s`, the slot's
        seconds and the run's goodput (4 significant digits: these are timings, not results)."""
        end = self.slot_end if self.slot_end is not None else self.clock()
        slot = max(end - self.slot_start, 1e-9)
        out = {SLOT: slot}
        for name in PHASES + tuple(PARTS):
            seconds = self.seconds.get(name, 0.0)
            out[seconds_key(name)] = seconds
            out[share_key(name)] = seconds / slot
        for name in OUTSIDE_SLOT:
            if name in self.seconds:
                out[seconds_key(name)] = self.seconds[name]
        claimed = sum(self.seconds.get(p, 0.0) for p in PHASES)
        out[OTHER] = max(0.0, slot - claimed)
        out[share_key("other")] = out[OTHER] / slot
        out[GOODPUT] = self.seconds.get("step", 0.0) / slot
        return {key: float(f"{value:.4g}") for key, value in out.items()}


# --- a study's seconds ----------------------------------------------------------------------------

EFFICIENCY = "time/efficiency"
EFFICIENCY_SOURCE = "time/efficiency_source"  # a tag: who measured the runs' alone step times
SLOTS = "time/slots"  # worker groups side by side
MAKESPAN = "time/makespan_s"
IDEAL_MAKESPAN = "time/ideal_makespan_s"
MAKESPAN_OVER_IDEAL = "time/makespan_over_ideal"
WALL = "time/wall_s"
OUTSIDE_RUNS = "time/outside_runs_s"


def ideal_makespan(slot_seconds: Sequence[float], slots: int) -> float:
    """The shortest a schedule of these runs on `slots` side-by-side worker groups can take: the work spread
    evenly, but never less than the longest run (a run is not split)."""
    if not slot_seconds:
        return 0.0
    return max(sum(slot_seconds) / max(slots, 1), max(slot_seconds))


def study_accounting(runs: Sequence[Mapping[str, float]], *, slots: int, makespan_s: float,
                     wall_s: float | None = None, alone_step_s: Sequence[float] | None = None) -> dict[str, float]:
    """The study run's `time/*`: every run's phase seconds summed, the shares of the summed slot time,
    goodput (step seconds / slot seconds), efficiency (the runs' alone step seconds / slot seconds, when
    given), the training makespan against the ideal schedule, and the study's wall time outside the runs
    (Ray start, tokenization, planning: `wall_s - makespan_s`). `runs`: each run's TimeLedger metrics."""
    timed = [run for run in runs if run.get(SLOT)]
    slot = sum(run[SLOT] for run in timed)
    out: dict[str, float] = {"time/runs": float(len(timed)), SLOTS: float(slots), SLOT: slot, MAKESPAN: makespan_s}
    if slot > 0:
        for name in PHASES + tuple(PARTS) + ("other",):
            seconds = sum(run.get(seconds_key(name), 0.0) for run in timed)
            out[seconds_key(name)] = seconds
            out[share_key(name)] = seconds / slot
        out[GOODPUT] = out[seconds_key("step")] / slot
        if alone_step_s is not None and len(alone_step_s) == len(timed):
            out[EFFICIENCY] = sum(alone_step_s) / slot
        ideal = ideal_makespan([run[SLOT] for run in timed], slots)
        out[IDEAL_MAKESPAN] = ideal
        out[MAKESPAN_OVER_IDEAL] = makespan_s / ideal if ideal > 0 else float("nan")
    for name in OUTSIDE_SLOT:
        seconds = [run[seconds_key(name)] for run in timed if seconds_key(name) in run]
        if seconds:
            out[seconds_key(name)] = sum(seconds)
    if wall_s is not None:
        out[WALL] = wall_s
        out[OUTSIDE_RUNS] = max(0.0, wall_s - makespan_s)
        out[share_key("outside_runs")] = out[OUTSIDE_RUNS] / wall_s if wall_s > 0 else float("nan")
    return {key: float(f"{value:.4g}") for key, value in out.items()}


def describe_accounting(study_time: Mapping[str, float]) -> str:
    """The driver's closing line about time, e.g. 'time: goodput 0.81 (398 of 490 slot-s in steps), ...'."""
    if not study_time.get(SLOT):
        return "time: no run of this invocation recorded its time split"
    parts = [f"goodput {study_time[GOODPUT]:.2f} ({study_time[seconds_key('step')]:.0f} of "
             f"{study_time[SLOT]:.0f} slot-s in optimizer steps)"]
    if EFFICIENCY in study_time:
        parts.append(f"efficiency {study_time[EFFICIENCY]:.2f}")
    parts.append(f"makespan {study_time[MAKESPAN]:.0f} s = {study_time[MAKESPAN_OVER_IDEAL]:.2f}x the ideal "
                 f"{study_time[IDEAL_MAKESPAN]:.0f} s")
    if study_time.get(seconds_key("finishing")):
        parts.append(f"{study_time[seconds_key('finishing')]:.0f} s of records finished beside the chains' next runs")
    if WALL in study_time:
        parts.append(f"outside the runs {study_time[OUTSIDE_RUNS]:.0f} s "
                     f"({100 * study_time[share_key('outside_runs')]:.0f}% of {study_time[WALL]:.0f} s)")
    biggest = sorted(((study_time.get(share_key(p), 0.0), p) for p in PHASES + ("other",) if p != "step"),
                     reverse=True)[:2]
    parts.append("largest besides steps: " + ", ".join(f"{p} {100 * share:.0f}%" for share, p in biggest))
    return "time: " + "; ".join(parts)
