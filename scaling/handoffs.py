"""What the driver side hands a worker group, and what travels between a sweep's trials and its groups.

Small frozen dataclasses (they pickle to Ray actors and workers as they are), so each side matches on a
type instead of a dict key, a sentinel string or a tuple's first element:

- a worker group's work (`TrainerConfig.work`): `ChainWork` (train these runs in turn) or `TrialService`
  (train what the sweep's `scaling.sweep.TrialQueue` hands out);
- the queue to a group: `Handout` (a trial and its run) or `Closed` (the sweep is over);
- the queue to a trial: `Report` (a report of its run), `Preempted` (its group was lost, it is queued
  again) or `Done` (its run ended: why it failed, or None).

`scaling.run_loop` trains what these describe; the tasks themselves are `scaling.train.RunTask`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from ray.actor import ActorHandle

    from scaling.train import RunTask

WORK_KEY = "work"
"""Ray Train's `train_loop_config` is a dict: the work rides in it under this key."""


@dataclass(frozen=True)
class ChainWork:
    """Train these runs in turn in one worker group (each task's `queued_since` is when the chain was submitted)."""

    tasks: tuple[RunTask, ...]
    finish_beside_next: bool = False  # resources.finishes_beside_next


@dataclass(frozen=True)
class TrialService:
    """Serve a sweep: train the trials `queue` hands to the group `pool` until it closes (or one trial, when
    worker groups are not kept across trials). `submitted`: when the group was asked for (epoch s), the
    start of its first trial's slot."""

    queue: ActorHandle  # the sweep's scaling.sweep.TrialQueue actor
    pool: str
    one_trial: bool = False
    submitted: float = 0.0


Work = Union[ChainWork, TrialService]


def trainer_config(work: Work) -> dict[str, Work]:
    return {WORK_KEY: work}


@dataclass(frozen=True)
class Handout:
    """A trial for a group: its id, its run, and since when it waited for a group (epoch s)."""

    trial_id: str
    task: RunTask
    submitted: float = 0.0


@dataclass(frozen=True)
class Closed:
    """The sweep is over: the group leaves."""


@dataclass(frozen=True)
class Report:
    """One report of the trial's run (what Tune gets)."""

    metrics: dict[str, Any]


@dataclass(frozen=True)
class Preempted:
    """The trial's group was lost; the trial is queued again (retry `count`)."""

    count: int
    reason: str


@dataclass(frozen=True)
class Done:
    """The trial's run ended: `failure` says why its group failed it; None: its outcome is in its folder."""

    failure: str | None = None


TrialEvent = Union[Report, Preempted, Done]
