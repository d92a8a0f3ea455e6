"""One rule for every "every N steps" key: probes, evaluations and checkpoints read N, 0 and null alike."""

import pytest

from scaling import cadence
from scaling.errors import ConfigError


def test_n_zero_and_null_mean_the_same_for_every_key():
    assert cadence.due_steps(10, 25) == (10, 20, 25)  # N: every N steps and the last
    assert cadence.due_steps(0, 25) == (25,)  # 0: only the last
    assert cadence.due_steps(None, 1526) == (306, 612, 918, 1224, 1526)  # null: the paper's floor(steps / 5) + 1
    assert cadence.due_steps(10, 20, at_start=True) == (0, 10, 20)
    due = [step for step in range(0, 26) if cadence.is_due(step, 10, 25)]
    assert due == [10, 20, 25] and cadence.is_due(0, 10, 25, at_start=True)
    with pytest.raises(ConfigError, match=r"^probes[.]every_steps=-1: use a number of steps >= 1, 0 \(only at the last"):
        cadence.check_every_steps("probes.every_steps", -1)


@pytest.mark.parametrize("section", ["probes", "checkpoint", "eval"])
def test_the_three_keys_accept_and_refuse_the_same_values(tmp_path, section):
    from conftest import tiny_train_study

    extra = {"tasks": ["bundled_cloze"]} if section == "eval" else {}
    for value, steps in ((0, (4,)), (None, (1, 2, 3, 4)), (3, (3, 4))):
        study = tiny_train_study(tmp_path, "cadence", **{section: {**extra, "every_steps": value}})
        assert cadence.due_steps(getattr(study, section).every_steps, 4) == steps
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match=rf"^{section}[.]every_steps={bad!r}: "):
            tiny_train_study(tmp_path, "cadence", **{section: {**extra, "every_steps": bad}})
