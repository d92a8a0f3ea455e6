"""Faults injected on purpose, so tests can prove the recovery paths: a worker process killed
at a step, a loss turned NaN, a worker killed while it finishes a run's records.

A test installs faults in its own process (`with install(Fault(...)):`); every run built
there carries them to its workers (`RunTask.faults`), and a sweep carries them into its trial
processes, which install them again. The training loop asks `due(...)` at each step. Nothing
else in the code knows about tests, and nothing is written to disk to remember a fault.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

KILL_WORKER = "kill_worker"
"""The worker process exits at once, as a preempted node's would (Ray Train restarts the group)."""
NAN_LOSS = "nan_loss"
"""The loss of the step is NaN (the run must be recorded as failed, the study must go on)."""
KILL_WHILE_FINISHING = "kill_while_finishing"
"""The worker process exits while a run's records are being finished beside the chain's next run (its
last evaluations not yet recorded, no outcome written): `step` is the run's last step."""
KINDS = (KILL_WORKER, NAN_LOSS, KILL_WHILE_FINISHING)


@dataclass(frozen=True)
class Fault:
    """One fault: what happens, at which optimizer step, on which rank, in which runs."""

    kind: str
    """One of `KINDS`."""
    step: int
    """The optimizer step (1-based) at which it happens."""
    rank: int | None = None
    """Only this worker rank (None: every rank)."""
    run: str | None = None
    """Only runs whose name contains this text (None: every run)."""
    resumed_too: bool = False
    """Also in a run that resumed from a checkpoint (False: the fault happens once per run)."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r}: use one of {KINDS}")


_installed: list[Fault] = []


@contextlib.contextmanager
def install(*faults: Fault):
    """Faults that runs built in this process carry, until the block ends."""
    _installed.extend(faults)
    try:
        yield
    finally:
        for fault in faults:
            _installed.remove(fault)


def installed() -> tuple[Fault, ...]:
    return tuple(_installed)


def due(faults: tuple[Fault, ...], kind: str, *, step: int, rank: int, run_name: str, resumed: bool) -> bool:
    """True when one of `faults` of this kind hits this step, rank and run."""
    return any(f.kind == kind and f.step == step and (f.rank is None or f.rank == rank)
               and (f.run is None or f.run in run_name) and (f.resumed_too or not resumed) for f in faults)
