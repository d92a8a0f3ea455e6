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
from typing import Callable, Iterator

PHASES = ("startup", "data", "step", "probe", "eval_export", "eval_wait", "checkpoint", "logging")
"""The slot's phases, in the order a run meets them. startup: worker processes, imports, process group,
model build, DeepSpeed init, checkpoint restore (the first run of a worker group pays the processes and
imports); data: resolving the token shards and assembling batches; step: optimizer steps; probe:
condensation probes and validation loss; eval_export: writing the model for an evaluation (the evaluation
itself runs on its own resources: `time/evaluation_s`, outside the slot); eval_wait: the run's end waiting
for its last evaluations, whose results its record must hold (the slot is held meanwhile); checkpoint:
save and upload; logging: MLflow writes and their flush."""
PARTS = {"dispersion": "step"}
"""Sub-phases: counted inside their parent, reported on their own."""
OUTSIDE_SLOT = ("queued", "evaluation")
"""Measured, but not the run's slot: waiting for a worker group, and the evaluation on its own actor."""

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
