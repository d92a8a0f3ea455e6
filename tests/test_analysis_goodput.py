"""The time accounting read back from a real MLflow store: per-run splits, the study's totals, the
report's section and figure (the trainer's side is tested with real training in test_train_study)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from analysis import load
from analysis.goodput import BAR_PHASES, study_totals, time_account
from analysis.scaling_curves import main
from analysis_store import fill_synthetic_study
from scaling import timing


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _ledger_metrics(step_s: float, probe_s: float, dispersion_s: float, slot_s: float,
                    finishing_s: float = 0.0) -> dict[str, float]:
    clock = Clock()
    ledger = timing.TimeLedger(0.0, clock=clock)
    ledger.add("startup", 5.0)
    ledger.add("step", step_s)
    ledger.add("dispersion", dispersion_s)
    ledger.add("probe", probe_s)
    clock.now = slot_s
    ledger.close()
    if finishing_s:  # records finished after the slot, beside the chain's next run
        clock.now += finishing_s
        ledger.add("finishing", finishing_s)
    return ledger.metrics()


@pytest.fixture(scope="module")
def timed_store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('goodput') / 'mlflow.db'}"
    study = fill_synthetic_study(uri, "timed", seeds=(0, 1), failed=0)
    client = MlflowClient(uri)
    runs = []
    for index, run_id in enumerate(study.finished_run_ids):
        metrics = _ledger_metrics(step_s=60.0 + index, probe_s=10.0, dispersion_s=4.0, slot_s=100.0,
                                  finishing_s=7.0 if index == 0 else 0.0)
        runs.append(metrics)
        for key, value in metrics.items():
            client.log_metric(run_id, key, value, step=3)
    study_time = timing.study_accounting(runs, slots=2, makespan_s=450.0, wall_s=500.0)
    for key, value in study_time.items():
        client.log_metric(study.parent_run_id, key, value)
    client.log_metric(study.parent_run_id, timing.EFFICIENCY, 0.55)  # as bench/bench_goodput.py logs it
    return uri, study, runs, study_time


def test_every_timed_run_gets_its_split_and_the_study_its_totals(timed_store):
    uri, study, runs, study_time = timed_store
    records = load.read_study(uri, "timed")
    account = time_account(records.metrics, records.study_metrics)
    assert account.runs.height == len(study.finished_run_ids)
    row = account.runs.filter(account.runs["run_id"] == study.finished_run_ids[0]).row(0, named=True)
    assert row["step_without_dispersion"] == pytest.approx(56.0) and row["dispersion"] == pytest.approx(4.0)
    assert row["goodput"] == pytest.approx(0.6) and row["slot_s"] == pytest.approx(100.0)
    assert row["finishing_s"] == pytest.approx(7.0)  # outside the slot: no bar slice holds it
    # every slot second is in one slice
    assert sum(row[p] for p in BAR_PHASES) == pytest.approx(row["slot_s"], rel=1e-3)
    totals = study_totals(account)
    assert sum(totals.values()) == pytest.approx(1.0, rel=1e-3)
    assert account.study[timing.GOODPUT] == study_time[timing.GOODPUT]
    assert account.study[timing.MAKESPAN_OVER_IDEAL] == pytest.approx(450.0 / max(sum(r[timing.SLOT] for r in runs) / 2, 100.0),
                                                                    rel=1e-3)


def test_the_report_shows_where_the_time_went(timed_store, tmp_path):
    uri, _, runs, study_time = timed_store
    out = tmp_path / "analysis"
    assert main(["--tracking-uri", uri, "--study", "timed", "--out", str(out), "--no-log", "--bootstrap", "40"]) == 0
    report = (out / "report.md").read_text()
    section = report[report.index("## Where the time went"):]
    goodput = sum(r["time/step_s"] for r in runs) / sum(r[timing.SLOT] for r in runs)
    assert f"goodput {goodput:.2f}" in section and "ideal schedule" in section
    assert "**Efficiency 0.55**" in section and "finished their records beside it (7 s outside" in section
    assert "![Where each run's slot time went" in section
    assert (out / "plots" / "time_split.png").stat().st_size > 10_000
    assert (out / "tables" / "time_split.csv").exists()


def test_a_study_without_time_accounting_has_no_section(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fill_synthetic_study(uri, "untimed", seeds=(0, 1), failed=0)
    records = load.read_study(uri, "untimed")
    assert time_account(records.metrics, records.study_metrics).empty
