"""The time ledger: every slot second in one phase or in `other`, parts inside their parent."""

import pytest

from scaling import timing


class FakeClock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def test_phases_other_and_goodput_add_up_to_the_slot():
    clock = FakeClock(110.0)
    ledger = timing.TimeLedger(slot_start=100.0, clock=clock)
    ledger.since_slot_start("startup")  # 10 s before the first step
    with ledger.phase("step"):
        clock.now += 6.0
        ledger.add("dispersion", 1.5)
    clock.now += 1.0  # unclaimed
    with ledger.phase("probe"):
        clock.now += 3.0
    ledger.add("evaluation", 40.0)  # on its own actor: not in the slot
    m = ledger.close()
    assert m[timing.SLOT] == 20.0
    assert m["time/startup_s"] == 10.0 and m["time/step_s"] == 6.0 and m["time/probe_s"] == 3.0
    assert m[timing.OTHER] == 1.0
    assert m["time/dispersion_s"] == 1.5 and m["time/evaluation_s"] == 40.0
    assert m[timing.GOODPUT] == pytest.approx(0.3)
    in_slot = sum(m[timing.seconds_key(p)] for p in timing.PHASES) + m[timing.OTHER]
    assert in_slot == pytest.approx(m[timing.SLOT])


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="unknown time phase"):
        timing.TimeLedger(0.0).add("naps", 1.0)
