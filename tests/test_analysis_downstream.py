"""Downstream accuracy in the analysis: checkpoints chosen on validation data, the paper's
table, accuracy versus N and claim (f), on synthetic studies whose truth places the best
validation signal (step 4) and the best test accuracy (step 2) apart from the last step (6)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest
from analysis_store import EVAL_PERPLEXITY_TASK, EVAL_SELECTION_TASK, EVAL_TEST_TASKS, fill_observation_study, fill_synthetic_study

from analysis import load
from analysis.downstream import (
    INITIAL,
    RULE_LAST,
    RULE_SELECTION_ACC,
    RULE_VAL_LOSS,
    SELECTION_LABELS,
    TEST,
    VALIDATION,
    discover_tasks,
    select_checkpoints,
    selection_tasks_from_params,
)
from analysis.fit import FitOptions
from analysis.report import StudyAnalysis, render_markdown
from analysis.scaling_curves import analyse_study, main
from scaling import names

FAST = FitOptions(n_bootstrap=60)
RUNGS = {"tiny-1M": 1e6, "small-4M": 4e6, "base-16M": 1.6e7}
VAL_BEST, TEST_BEST, LAST = 4, 2, 6


@dataclass(frozen=True)
class Studies:
    uri: str
    records: dict[str, load.StudyRecords]
    analyses: dict[str, StudyAnalysis]


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Studies:
    root = tmp_path_factory.mktemp("downstream")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = {"seeds": (0, 1), "failed": 0, "with_artifacts": False, "steps": LAST, "accuracy_gain": 0.03,
              "val_best_step": VAL_BEST, "test_best_step": TEST_BEST}
    # Validation-split task logged, evaluations at 0 (before training), 2, 4, 6.
    fill_synthetic_study(uri, "evals", rungs=RUNGS, eval_steps=(0, 2, 4, LAST), **common)
    # No validation-split task and no step 0; val/loss probes at 3 and 6 only, between the evaluations.
    fill_synthetic_study(uri, "by-loss", rungs=dict(list(RUNGS.items())[:2]), eval_steps=(2, 4, LAST), selection_task=False,
                         val_every=3, study_params=False, **common)
    fill_synthetic_study(uri, "no-eval", rungs=dict(list(RUNGS.items())[:2]), seeds=(0, 1), failed=0, with_artifacts=False, steps=2)
    fill_observation_study(uri, "observe", with_eval=True)
    records = {name: load.read_study(uri, name) for name in ("evals", "by-loss", "no-eval", "observe")}
    analyses = {name: analyse_study(r, metrics=[names.VAL_LOSS], size_column="n_params", control_arm=names.ARM_BASELINE, options=FAST)
                for name, r in records.items()}
    return Studies(uri, records, analyses)


def _at(records: load.StudyRecords, run_id: str, metric: str, step: int) -> float:
    hit = records.metrics.filter((pl.col("run_id") == run_id) & (pl.col("metric") == metric) & (pl.col("step") == step))
    assert hit.height == 1, (run_id, metric, step)
    return float(hit["value"][0])


# --- the selection rule on hand-made points ------------------------------------------------------------


def _points(rows: list[tuple[str, int, str, float]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"run_id": pl.String, "step": pl.Int64, "metric": pl.String, "value": pl.Float64}, orient="row")


def test_selection_rule_on_hand_made_runs():
    acc, sel, loss = names.eval_metric_key("t", "acc"), names.EVAL_SELECTION_MEAN_ACC, names.VAL_LOSS
    points = _points([
        # a: the validation accuracy ties at 2 and 4 (the later wins); step 0 scores best but is never a
        # validation candidate. On the test mean it wins the paper's choice, as in the authors' per-seed maximum.
        *[("a", s, sel, v) for s, v in ((0, 0.9), (2, 0.5), (4, 0.5), (6, 0.4))],
        *[("a", s, names.EVAL_MEAN_ACC, v) for s, v in ((0, 0.9), (2, 0.3), (4, 0.2), (6, 0.6))],
        # b: no selection task; val/loss at probes 3 and 6: evaluation 2 cannot be judged, 4 reads probe 3.
        *[("b", s, acc, 0.3) for s in (2, 4, 6)],
        *[("b", s, loss, v) for s, v in ((3, 1.0), (6, 1.5))],
        ("b", 2, loss + "_other", 0.0),
        # c: no validation signal at all: its last evaluation, flagged.
        *[("c", s, acc, 0.3) for s in (0, 5, 10)],
        # d: no downstream results: left out.
        ("d", 1, loss, 1.0),
    ])
    choices = {c.run_id: c for c in select_checkpoints(points)}
    assert set(choices) == {"a", "b", "c"}
    a, b, c = choices["a"], choices["b"], choices["c"]
    assert (a.rule, a.step, a.criterion, a.test_step, a.last_step, a.has_initial) == (RULE_SELECTION_ACC, 4, 0.5, 0, 6, True)
    assert (b.rule, b.step, b.criterion, b.criterion_step, b.test_step, b.has_initial) == (RULE_VAL_LOSS, 4, 1.0, 3, None, False)
    assert (c.rule, c.step, c.last_step, c.eval_steps) == (RULE_LAST, 10, 10, (0, 5, 10)) and np.isnan(c.criterion)
    # A tie with step 0 goes to the trained checkpoint (the later step), as every tie does.
    tie = select_checkpoints(_points([*[("t", s, names.EVAL_MEAN_ACC, v) for s, v in ((0, 0.5), (2, 0.5), (4, 0.4))]]))
    assert tie[0].test_step == 2
    # Two evaluations read the same probe: the one nearest it wins, not merely the later one.
    shared = select_checkpoints(_points([*[("e", s, acc, 0.3) for s in (3, 5)], ("e", 3, loss, 1.0)]))
    assert shared[0].step == 3 and shared[0].criterion_step == 3
    assert select_checkpoints(_points([])) == ()


def test_selection_tasks_come_from_the_study_param_or_the_means(studies):
    assert studies.records["evals"].study_params["eval.selection_tasks"] == f"['{EVAL_SELECTION_TASK}']"
    assert selection_tasks_from_params(studies.records["evals"].study_params) == (EVAL_SELECTION_TASK,)
    assert selection_tasks_from_params({"eval.selection_tasks": "[]"}) == ()
    assert selection_tasks_from_params({}) is None
    # Without the param, the subset whose mean is eval/selection_mean_acc (and the rest's eval/mean_acc).
    tasks, notes = discover_tasks(studies.records["evals"].metrics, None)
    assert tasks.selection == (EVAL_SELECTION_TASK,) and set(tasks.test) == set(EVAL_TEST_TASKS) and notes == []
    assert tasks.perplexity == (EVAL_PERPLEXITY_TASK,) and tasks.source.startswith("inferred")
    no_selection, _ = discover_tasks(studies.records["by-loss"].metrics, None)
    assert no_selection.selection == () and set(no_selection.test) == set(EVAL_TEST_TASKS)


# --- whole studies ---------------------------------------------------------------------------------------


def test_validation_selection_picks_the_validation_best_step_and_the_paper_the_test_best(studies):
    downstream = studies.analyses["evals"].downstream
    records = studies.records["evals"]
    assert downstream is not None and len(downstream.choices) == len(records.finished())
    for choice in downstream.choices:
        assert (choice.rule, choice.step, choice.test_step, choice.last_step, choice.eval_steps) == (
            RULE_SELECTION_ACC, VAL_BEST, TEST_BEST, LAST, (0, TEST_BEST, VAL_BEST, LAST))
        assert choice.criterion == _at(records, choice.run_id, names.EVAL_SELECTION_MEAN_ACC, VAL_BEST)
        # The paper's choice maximises the very score it reports: never below the honest one.
        assert _at(records, choice.run_id, names.EVAL_MEAN_ACC, TEST_BEST) >= _at(records, choice.run_id, names.EVAL_MEAN_ACC, VAL_BEST)
    assert studies.analyses["evals"].downstream.tasks.source == "the study's eval.selection_tasks"


def test_without_a_selection_task_val_loss_at_the_probe_before_chooses(studies):
    downstream = studies.analyses["by-loss"].downstream
    records = studies.records["by-loss"]
    for choice in downstream.choices:
        assert (choice.rule, choice.step, choice.criterion_step, choice.test_step) == (RULE_VAL_LOSS, VAL_BEST, 3, TEST_BEST)
        assert choice.criterion == _at(records, choice.run_id, names.VAL_LOSS, 3)
    assert any("no step-0 evaluation" in note for note in studies.analyses["by-loss"].notes)
    assert set(downstream.table["row"]) == {names.ARM_BASELINE, names.ARM_DISPERSION}  # no initial row


def test_accuracy_table_rows_columns_and_mean_std_over_seeds(studies):
    records, table = studies.records["evals"], studies.analyses["evals"].downstream.table
    arms = (names.ARM_BASELINE, names.ARM_DISPERSION)
    expected_rows = [("initial", SELECTION_LABELS[INITIAL])] + [(arm, SELECTION_LABELS[k]) for arm in arms for k in (VALIDATION, TEST)]
    for rung in RUNGS:
        assert list(table.filter(pl.col("rung") == rung).select("row", "selection").iter_rows()) == expected_rows
    assert table["rung"].unique(maintain_order=True).to_list() == list(RUNGS)  # small to large
    for column in [*(f"{t}/acc" for t in EVAL_TEST_TASKS), "mean_acc", f"{EVAL_SELECTION_TASK}/acc", "selection_mean_acc",
                   f"{EVAL_PERPLEXITY_TASK}/word_perplexity", "delta_mean_acc"]:
        assert {column, f"{column}_std", f"{column}_n"} <= set(table.columns), column
    assert not any(c.endswith("acc_stderr") for c in table.columns)
    # Every cell: mean and sample std over the seeds of the value at the chosen step, read back from MLflow.
    runs = records.finished()
    for rung in RUNGS:
        for arm in arms:
            ids = runs.filter((pl.col("rung") == rung) & (pl.col("arm") == arm)).sort("seed")["run_id"].to_list()
            for kind, step in ((VALIDATION, VAL_BEST), (TEST, TEST_BEST)):
                row = table.filter((pl.col("rung") == rung) & (pl.col("row") == arm) & (pl.col("selection") == SELECTION_LABELS[kind])).row(0, named=True)
                assert row["seeds"] == 2 and row["steps"] == str(step)
                for task in EVAL_TEST_TASKS:
                    values = [_at(records, i, names.eval_metric_key(task, "acc"), step) for i in ids]
                    assert row[f"{task}/acc"] == pytest.approx(np.mean(values)) and row[f"{task}/acc_std"] == pytest.approx(np.std(values, ddof=1))
                    assert row[f"{task}/acc_n"] == 2
                delta = [_at(records, i, names.EVAL_MEAN_ACC, step) - _at(records, i, names.EVAL_MEAN_ACC, 0) for i in ids]
                assert row["delta_mean_acc"] == pytest.approx(np.mean(delta)) and row["delta_mean_acc_std"] == pytest.approx(np.std(delta, ddof=1))
        # The initial row: one value per (rung, seed), shared by the paired arms.
        initial = table.filter((pl.col("rung") == rung) & (pl.col("row") == "initial")).row(0, named=True)
        first = runs.filter((pl.col("rung") == rung) & (pl.col("arm") == arms[0])).sort("seed")["run_id"].to_list()
        values = [_at(records, i, names.EVAL_MEAN_ACC, 0) for i in first]
        assert initial["seeds"] == 2 and initial["mean_acc_n"] == 2 and initial["mean_acc"] == pytest.approx(np.mean(values))


def test_claim_f_and_the_paired_differences_read_the_validation_selected_checkpoint(studies):
    analysis, records = studies.analyses["evals"], studies.records["evals"]
    runs = records.finished()

    def per_rung(step: int) -> list[float]:
        means = []
        for rung in RUNGS:
            diffs = []
            for seed in (0, 1):
                ids = {arm: runs.filter((pl.col("rung") == rung) & (pl.col("arm") == arm) & (pl.col("seed") == seed))["run_id"][0]
                       for arm in (names.ARM_BASELINE, names.ARM_DISPERSION)}
                diffs.append(_at(records, ids[names.ARM_DISPERSION], names.EVAL_MEAN_ACC, step) - _at(records, ids[names.ARM_BASELINE], names.EVAL_MEAN_ACC, step))
            means.append(float(np.mean(diffs)))
        return means

    claim = {c.key: c for c in analysis.claims}["f"]
    assert claim.estimate.estimate == pytest.approx(np.mean(per_rung(VAL_BEST)), rel=1e-9)
    assert claim.estimate.estimate != pytest.approx(np.mean(per_rung(LAST)), rel=1e-9)  # not the last evaluation
    assert claim.verdict == "supported" and "validation-selected" in claim.statistic
    differences = analysis.differences[(names.EVAL_MEAN_ACC, names.ARM_DISPERSION)]
    # 2 seeds per rung: the pairs themselves, no t(1) interval.
    assert [d.rung for d in differences] == list(RUNGS) and all(not d.difference.has_bounds and len(d.pairs) == 2 for d in differences)
    assert [d.difference.estimate for d in differences] == pytest.approx(per_rung(VAL_BEST), rel=1e-9)


def test_cli_writes_the_table_the_figures_and_the_report_section(studies, tmp_path):
    out = tmp_path / "out"
    assert main(["--tracking-uri", studies.uri, "--study", "evals", "--out", str(out), "--no-log", "--bootstrap", "40"]) == 0
    for name in ("tables/accuracy.csv", "tables/accuracy.parquet", "tables/checkpoints.csv", "tables/accuracy_by_run.parquet",
                 "plots/accuracy_vs_n.png", "plots/accuracy_difference_dispersion.png", "plots/difference_dispersion.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "plots/accuracy_vs_n.png").stat().st_size > 20_000
    assert not (out / "plots/curve_eval_mean_acc.png").exists()  # accuracy_vs_n.png shows it
    assert pl.read_csv(out / "tables/accuracy.csv").height == 5 * len(RUNGS)
    checkpoints = pl.read_csv(out / "tables/checkpoints.csv")
    assert (checkpoints["selected_step"] == VAL_BEST).all() and (checkpoints["test_selected_step"] == TEST_BEST).all()
    report = (out / "report.md").read_text()
    section = report[report.index("## Downstream accuracy"):report.index("## Method")]
    for text in ("### Largest rung: base-16M", "### Mean accuracy per rung", "initial (step 0)", "test-selected (the paper's choice; optimistic)",
                 "word perplexity (not in the mean)", "](plots/accuracy_vs_n.png)", "eval/selection_mean_acc` in 12 runs"):
        assert text in section, text
    assert "accuracy_vs_n" not in report[report.index("## Method"):]  # shown once, in its section
    assert "Downstream accuracy</h2>" in (out / "report.html").read_text()


def test_a_study_without_evaluations_says_so(studies, tmp_path):
    analysis = studies.analyses["no-eval"]
    assert analysis.downstream is not None and not analysis.downstream.evaluated
    report = render_markdown(analysis, [], tmp_path)
    assert "## Downstream accuracy" in report and "The study evaluated no downstream tasks" in report
    assert {c.key: c for c in analysis.claims}["f"].verdict == "not tested"


def test_observed_models_show_accuracy_next_to_condensation(studies, tmp_path):
    analysis = studies.analyses["observe"]
    table = analysis.observation_accuracy
    assert table.height == 7 and {"family", "model", "n", names.EVAL_MEAN_ACC, "spearman (wikitext)"} <= set(table.columns)
    assert table.columns.index(names.EVAL_MEAN_ACC) < table.columns.index(names.eval_metric_key("arc_easy", "acc"))
    gpt2 = table.filter(pl.col("family") == "gpt2").sort("n")
    assert (gpt2[names.EVAL_MEAN_ACC].diff().drop_nulls() > 0).all() and (gpt2["spearman (wikitext)"].diff().drop_nulls() < 0).all()
    report = render_markdown(analysis, [], tmp_path)
    assert "### Downstream accuracy next to condensation (per pretrained model)" in report and "## Downstream accuracy\n" not in report


# --- item-level paired bootstrap (pure) ---------------------------------------------------------------------


def _items(rng, *, seeds=(0, 1, 2), docs=200, tasks=("arc_easy", "piqa"), effect=0.0, seed_sd=0.0) -> pl.DataFrame:
    """Per-item results of paired runs: each document has a difficulty shared by every run (paired items),
    each seed a shift shared by both arms, the treatment `effect` more probability of a right answer."""
    rows = []
    for task in tasks:
        difficulty = rng.uniform(0.2, 0.8, docs)
        for seed in seeds:
            shift = rng.normal(0, seed_sd)
            for arm, extra in ((names.ARM_BASELINE, 0.0), (names.ARM_DISPERSION, effect)):
                p = np.clip(difficulty + shift + extra, 0, 1)
                correct = (rng.random(docs) < p).astype(float)
                rows += [{"arm": arm, "seed": seed, "task": task, "leaf": task, "doc_id": i, "acc": c}
                         for i, c in enumerate(correct)]
    return pl.DataFrame(rows)


def test_item_bootstrap_finds_a_real_difference_and_covers_the_truth():
    from analysis.downstream import PairedDifference, paired_item_bootstrap
    from analysis.fit import Interval

    rng = np.random.default_rng(0)
    found = paired_item_bootstrap(_items(rng, effect=0.1, docs=400), treatment=names.ARM_DISPERSION,
                                  control=names.ARM_BASELINE, n_bootstrap=1000)
    assert isinstance(found, Interval) and isinstance(found, PairedDifference)
    assert found.has_bounds and found.low > 0 and found.contains(0.1) and found.why == ""
    assert (found.seeds, found.items, found.tasks) == (3, 800, ("arc_easy", "piqa"))
    assert -1 <= found.low < found.estimate < found.high <= 1
    # Under no effect, the 95% interval covers 0 in about 95% of studies (items and seeds both vary).
    covered = [paired_item_bootstrap(_items(rng, docs=100, seed_sd=0.03), treatment=names.ARM_DISPERSION,
                                     control=names.ARM_BASELINE, n_bootstrap=400, seed=k).contains(0.0) for k in range(40)]
    assert sum(covered) >= 34


def test_item_bootstrap_pairs_only_what_both_arms_have_and_says_when_it_cannot():
    from analysis.downstream import paired_item_bootstrap

    rng = np.random.default_rng(1)
    items = _items(rng, effect=0.05, docs=50)
    args = {"treatment": names.ARM_DISPERSION, "control": names.ARM_BASELINE, "n_bootstrap": 200}
    # A seed with one arm only, and documents one run lacks, are left out of the pairs.
    uneven = pl.concat([items.filter(~((pl.col("seed") == 2) & (pl.col("arm") == names.ARM_BASELINE))),
                        items.filter(pl.col("seed") == 2).with_columns(pl.lit(99, dtype=pl.Int64).alias("seed")).filter(pl.col("arm") == names.ARM_DISPERSION)])
    uneven = uneven.filter(~((pl.col("seed") == 0) & (pl.col("task") == "piqa") & (pl.col("doc_id") == 3)
                             & (pl.col("arm") == names.ARM_BASELINE)))
    result = paired_item_bootstrap(uneven, **args)
    assert result.seeds == 2 and result.items == 2 * 50 - 1
    same = items.with_columns(pl.lit(1.0).alias("acc"))
    flat = paired_item_bootstrap(same, **args)
    assert flat.estimate == 0 and not flat.has_bounds and "varies" in flat.why
    none = paired_item_bootstrap(items.filter(pl.col("arm") == names.ARM_BASELINE), **args)
    assert not none.has_bounds and "no seed has both" in none.why
    with pytest.raises(ValueError, match="several rungs"):
        paired_item_bootstrap(items.with_columns(pl.Series("rung", ["a", "b"] * (items.height // 2))), **args)
