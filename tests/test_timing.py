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


def run_metrics(slot, step, probe=0.0, startup=0.0, finishing=0.0):
    ledger = timing.TimeLedger(slot_start=0.0, clock=FakeClock(0.0))
    ledger.add("step", step)
    ledger.add("probe", probe)
    ledger.add("startup", startup)
    ledger.slot_end = slot
    if finishing:
        ledger.add("finishing", finishing)  # after the slot: beside the chain's next run
    return ledger.metrics()


def test_study_accounting_sums_runs_and_compares_the_schedule_with_the_ideal():
    runs = [run_metrics(100, 80, probe=10, finishing=3), run_metrics(60, 50, startup=5, finishing=4), run_metrics(40, 30)]
    study = timing.study_accounting(runs, slots=2, makespan_s=110.0, wall_s=125.0, alone_step_s=[70, 45, 25])
    assert study[timing.SLOT] == 200 and study["time/step_s"] == 160 and study[timing.GOODPUT] == 0.8
    assert study[timing.EFFICIENCY] == 0.7
    assert study[timing.IDEAL_MAKESPAN] == 100  # 200 slot-s over 2 slots, and the longest run is 100
    assert study[timing.MAKESPAN_OVER_IDEAL] == 1.1
    assert study[timing.OUTSIDE_RUNS] == 15 and study["time/outside_runs_share"] == 0.12
    assert study["time/other_s"] == 200 - 160 - 10 - 5  # finishing is outside the slots: not in other
    assert study[timing.seconds_key("finishing")] == 7 and study[timing.SLOTS] == 2
    # the longest run is the floor: one 100 s run and three short ones on 4 slots cannot end before 100 s
    assert timing.ideal_makespan([100, 10, 10, 10], slots=4) == 100
    line = timing.describe_accounting(study)
    assert "goodput 0.80" in line and "1.10x the ideal 100 s" in line and "efficiency 0.70" in line
    assert "7 s of records finished beside the chains' next runs" in line


def test_a_study_without_timed_runs_says_so():
    study = timing.study_accounting([{"val/loss": 3.0}], slots=2, makespan_s=10.0)
    assert timing.GOODPUT not in study
    assert "no run" in timing.describe_accounting(study)
