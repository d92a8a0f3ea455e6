"""When a run probes, evaluates and checkpoints: one rule for every "every N steps" key.

`probes.every_steps`, `eval.every_steps` and `checkpoint.every_steps` all read the same way:

- N >= 1: at steps N, 2N, 3N, ... and always at the run's last step;
- 0: only at the last step;
- null: the paper's schedule, every floor(steps / 5) + 1 steps (five times a run), and the last step.

`at_start` (probes and evaluations) adds step 0, before the first optimizer step (the initial or
pretrained state); it is off unless a study turns it on, and a run that resumed past step 0 does not
repeat it. A checkpoint at step 0 would only hold the seeded initial weights, so checkpoints have none.
"""

from __future__ import annotations

from scaling.errors import ConfigError

RULE = "a number of steps >= 1, 0 (only at the last step) or null (every floor(steps / 5) + 1 steps)"
"""What an every_steps key accepts: the tail of its error message."""


def check_every_steps(key: str, value) -> None:
    """One line naming the key, the bad value and what it accepts."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key}={value!r}: use {RULE}")


def interval(every_steps: int | None, total_steps: int) -> int:
    """Steps between two events in a run of `total_steps` (the run's length for 0: only its last step)."""
    if total_steps < 1:
        raise ConfigError(f"a run of {total_steps} steps has no step to probe, evaluate or checkpoint at")
    if every_steps is None:
        return total_steps // 5 + 1
    return every_steps or total_steps


def is_due(step: int, every_steps: int | None, total_steps: int, at_start: bool = False) -> bool:
    """Whether step `step` (0 = before the first optimizer step) has the event."""
    if step == 0:
        return at_start
    return step == total_steps or step % interval(every_steps, total_steps) == 0


def due_steps(every_steps: int | None, total_steps: int, at_start: bool = False) -> tuple[int, ...]:
    """Every step of a run of `total_steps` with the event, in order."""
    every = interval(every_steps, total_steps)
    steps = {0} if at_start else set()
    steps.update(range(every, total_steps, every))
    steps.add(total_steps)
    return tuple(sorted(steps))
