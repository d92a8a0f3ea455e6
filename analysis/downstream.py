"""Downstream accuracy (lm-eval-harness) of a study: which checkpoint to report, and the paper's table.

Pure functions over the tidy metric points of finished training runs (columns run_id, step,
metric, value and the run's rung, n, arm, seed, as `analysis.load` reads them): nothing reads
MLflow or writes files.

Selection without peeking (the headline). A run is evaluated at several steps (step 0 before
training when `eval.at_start`, every k steps, always the last); its reported checkpoint is
chosen among the evaluations after step 0 on validation data only:

1. by `eval/selection_mean_acc` (highest), when the run logged it (validation-split tasks);
2. else by `val/loss` (lowest), each evaluation step judged by the validation loss at the
   nearest probe step at or before it (an evaluation with no probe at or before it cannot be
   judged and is not a candidate);
3. else (no validation signal at all) the last evaluation.

Ties go to the evaluation nearest its probe, then to the later step (more training). Step 0 is
never a candidate: it is the "initial" row every arm is compared with. The paper's choice, the
evaluation with the highest `eval/mean_acc` on the test tasks themselves, is computed next to
it and always labelled "test-selected (the paper's choice; optimistic)": taking a maximum over
noisy test scores biases them upward. Like the authors' per-seed maximum over checkpoints, it
includes step 0: in a mid-training study the paper's row can be the pretrained model itself.

Item level (`paired_item_bootstrap`): with per-item results logged (`eval.log_samples`, read by
`analysis.load.read_item_results`), an accuracy difference between two arms gets an interval
that resamples both the documents and the seeds.
"""

from __future__ import annotations

import ast
import itertools
import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from analysis.fit import Interval
from scaling import names

RULE_SELECTION_ACC = names.EVAL_SELECTION_MEAN_ACC
RULE_VAL_LOSS = names.VAL_LOSS
RULE_LAST = "last evaluation"
INITIAL, VALIDATION, TEST = "initial", "validation", "test"
SELECTION_LABELS = {
    INITIAL: "initial (step 0)",
    VALIDATION: "validation-selected",
    TEST: "test-selected (the paper's choice; optimistic)",
}
"""How each kind of row is named in tables and the report."""
ACC = "acc"
WORD_PERPLEXITY = "word_perplexity"
MEAN_ACC = names.EVAL_MEAN_ACC.removeprefix(f"{names.EVAL_PREFIX}/")
SELECTION_MEAN_ACC = names.EVAL_SELECTION_MEAN_ACC.removeprefix(f"{names.EVAL_PREFIX}/")
DELTA_MEAN_ACC = "delta_mean_acc"
"""Table column: the arm's mean accuracy minus the initial one of the same (rung, seed)."""
SELECTION_TASKS_PARAM = "eval.selection_tasks"
"""The study run's param naming the validation-split tasks (a list, as the study file has it)."""
MAX_TASKS_TO_INFER = 16
_EVAL = f"{names.EVAL_PREFIX}/"
_TOLERANCE = 1e-6
_RESULT_METRIC = r"^eval/([^/]+/[^/]+|mean_acc|selection_mean_acc)$"
"""A task's result (`names.parse_eval_metric_key`, vectorised) or a mean of them: an evaluation happened."""


@dataclass(frozen=True)
class CheckpointChoice:
    """Which evaluation of one training run is reported, and why."""

    run_id: str
    rule: str
    """What chose `step`: RULE_SELECTION_ACC (highest), RULE_VAL_LOSS (lowest, at the nearest probe at
    or before the evaluation) or RULE_LAST (no validation signal logged)."""
    step: int | None
    """The validation-selected evaluation step (None: no evaluation after step 0)."""
    criterion: float
    """The rule's value at the chosen checkpoint (NaN for RULE_LAST)."""
    criterion_step: int | None
    """Where that value was logged: the evaluation step itself, or the val/loss probe step used."""
    test_step: int | None
    """The paper's choice: the evaluation with the highest eval/mean_acc, step 0 included as in the authors'
    per-seed maximum (None: never logged)."""
    last_step: int | None
    """The run's last evaluation (the final model)."""
    eval_steps: tuple[int, ...]
    """Every step with downstream results, step 0 included."""

    @property
    def has_initial(self) -> bool:
        return 0 in self.eval_steps


@dataclass(frozen=True)
class EvalTasks:
    """The tasks a study evaluated, split by role."""

    test: tuple[str, ...]
    """Tasks reporting `acc` whose mean is eval/mean_acc (the paper's score)."""
    selection: tuple[str, ...]
    """Validation-split tasks reporting `acc` (their mean is eval/selection_mean_acc)."""
    perplexity: tuple[str, ...]
    """Tasks reporting word perplexity and no `acc` (paloma_wikitext_103): shown apart from the mean."""
    source: str = ""
    """How the selection tasks were found: the study's param, inferred from the means, or '' (none)."""


@dataclass(frozen=True)
class DownstreamAccuracy:
    """A study's downstream results at the chosen checkpoints, ready for tables and figures."""

    choices: tuple[CheckpointChoice, ...]
    tasks: EvalTasks
    values: pl.DataFrame
    """Per run: rung, n, arm, seed, selection (initial / validation / test), step, metric, value."""
    table: pl.DataFrame
    """The paper's table: `build_accuracy_table`."""
    notes: tuple[str, ...] = ()

    @property
    def evaluated(self) -> bool:
        return bool(self.choices)


def _eval_steps_by_run(points: pl.DataFrame) -> dict[str, list[int]]:
    """Steps at which a run logged at least one task result (`eval/<task>/<metric>`) or mean accuracy."""
    rows = points.filter(pl.col("metric").str.contains(_RESULT_METRIC))
    grouped = rows.group_by("run_id").agg(pl.col("step").unique().sort())
    return {run_id: [int(s) for s in steps] for run_id, steps in grouped.iter_rows()}


def _series(points: pl.DataFrame, metric: str) -> dict[str, dict[int, float]]:
    rows = points.filter((pl.col("metric") == metric) & pl.col("value").is_finite())
    out: dict[str, dict[int, float]] = {}
    for run_id, step, value in rows.select("run_id", "step", "value").iter_rows():
        out.setdefault(run_id, {})[int(step)] = float(value)
    return out


def _best(candidates: list[tuple[int, float, int]], *, highest: bool) -> tuple[int, float, int]:
    """(step, value, where logged) with the best value; ties: nearest its probe, then the later step."""
    sign = -1.0 if highest else 1.0
    return min(candidates, key=lambda c: (sign * c[1], c[0] - c[2], -c[0]))


def _choose(run_id: str, steps: list[int], selection: dict[int, float], loss: dict[int, float],
            test: dict[int, float]) -> CheckpointChoice:
    later = [s for s in steps if s > 0]
    last = later[-1] if later else None
    on_test = [(s, test[s], s) for s in steps if s in test]  # step 0 too: the authors' max includes it
    test_step = _best(on_test, highest=True)[0] if on_test else None
    scored = [(s, selection[s], s) for s in later if s in selection]
    if scored:
        step, value, where = _best(scored, highest=True)
        return CheckpointChoice(run_id, RULE_SELECTION_ACC, step, value, where, test_step, last, tuple(steps))
    probes = sorted(loss)
    judged = []
    for s in later:
        before = [p for p in probes if p <= s]
        if before:
            judged.append((s, loss[before[-1]], before[-1]))
    if judged:
        step, value, where = _best(judged, highest=False)
        return CheckpointChoice(run_id, RULE_VAL_LOSS, step, value, where, test_step, last, tuple(steps))
    return CheckpointChoice(run_id, RULE_LAST, last, math.nan, last, test_step, last, tuple(steps))


def select_checkpoints(points: pl.DataFrame) -> tuple[CheckpointChoice, ...]:
    """One `CheckpointChoice` per run that logged downstream results (the rule: module docstring).

    `points`: tidy metrics of training runs (run_id, step, metric, value); runs without any
    `eval/<task>/<metric>` or mean accuracy are left out."""
    if points.is_empty():
        return ()
    wanted = points.filter(pl.col("metric").str.starts_with(_EVAL) | (pl.col("metric") == names.VAL_LOSS))
    steps = _eval_steps_by_run(wanted)
    selection = _series(wanted, names.EVAL_SELECTION_MEAN_ACC)
    loss = _series(wanted, names.VAL_LOSS)
    test = _series(wanted, names.EVAL_MEAN_ACC)
    return tuple(_choose(run_id, steps[run_id], selection.get(run_id, {}), loss.get(run_id, {}), test.get(run_id, {}))
                 for run_id in sorted(steps))


# --- tasks -----------------------------------------------------------------------------------------


def selection_tasks_from_params(params: dict[str, str]) -> tuple[str, ...] | None:
    """The study run's `eval.selection_tasks` param (logged as a list's text) as names; None when absent."""
    text = params.get(SELECTION_TASKS_PARAM)
    if text is None:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = [part.strip(" '\"") for part in text.strip("[]()").split(",")]
    if isinstance(value, str):
        value = [value]
    return tuple(str(v) for v in value if str(v).strip()) if isinstance(value, (list, tuple)) else None


def infer_selection_tasks(points: pl.DataFrame, acc_tasks: tuple[str, ...]) -> tuple[str, ...] | None:
    """The subset of `acc_tasks` whose mean `acc` is eval/selection_mean_acc (and the rest's
    eval/mean_acc) at every evaluation; () when no selection mean was logged, None when no subset
    (or more than one) fits or there are too many tasks to try."""
    acc_keys = {names.eval_metric_key(t, ACC): t for t in acc_tasks}
    rows = points.filter(pl.col("metric").is_in([*acc_keys, names.EVAL_SELECTION_MEAN_ACC, names.EVAL_MEAN_ACC]))
    if rows.filter(pl.col("metric") == names.EVAL_SELECTION_MEAN_ACC).is_empty():
        return ()
    if len(acc_tasks) > MAX_TASKS_TO_INFER:
        return None
    wide = rows.pivot(on="metric", index=["run_id", "step"], values="value", aggregate_function="first")
    wide = wide.filter(pl.col(names.EVAL_SELECTION_MEAN_ACC).is_not_null())
    table = {t: wide[k].to_numpy().astype(float) if k in wide.columns else np.full(wide.height, np.nan) for k, t in acc_keys.items()}
    sel = wide[names.EVAL_SELECTION_MEAN_ACC].to_numpy().astype(float)
    test = wide[names.EVAL_MEAN_ACC].to_numpy().astype(float) if names.EVAL_MEAN_ACC in wide.columns else np.full(wide.height, np.nan)

    def fits(subset: tuple[str, ...]) -> bool:
        rest = [t for t in acc_tasks if t not in subset]
        mean_sel = np.mean([table[t] for t in subset], axis=0)
        ok = np.isnan(mean_sel) | (np.abs(mean_sel - sel) < _TOLERANCE)
        if rest:
            mean_rest = np.mean([table[t] for t in rest], axis=0)
            ok &= np.isnan(mean_rest) | np.isnan(test) | (np.abs(mean_rest - test) < _TOLERANCE)
        return bool(ok.all()) and not np.isnan(mean_sel).all()

    found = [subset for size in range(1, len(acc_tasks) + 1) for subset in itertools.combinations(acc_tasks, size) if fits(subset)]
    return found[0] if len(found) == 1 else None


def discover_tasks(points: pl.DataFrame, selection: tuple[str, ...] | None = None) -> tuple[EvalTasks, list[str]]:
    """The evaluated tasks by role, and notes. `selection`: the study's selection tasks when known
    (its param); otherwise they are inferred from the logged means."""
    metrics = points.filter(pl.col("metric").str.starts_with(_EVAL))["metric"].unique().sort().to_list()
    parsed = [p for p in map(names.parse_eval_metric_key, metrics) if p is not None]
    acc_tasks = tuple(sorted({task for task, metric in parsed if metric == ACC}))
    perplexity = tuple(sorted({task for task, metric in parsed if metric == WORD_PERPLEXITY} - set(acc_tasks)))
    notes, source = [], ""
    if selection is not None:
        source = "the study's eval.selection_tasks"
        selection = tuple(t for t in selection if t in acc_tasks)
    else:
        selection = infer_selection_tasks(points, acc_tasks)
        if selection is None:
            notes.append("could not tell which tasks are validation-split tasks (no subset of tasks averages to "
                         f"{names.EVAL_SELECTION_MEAN_ACC}); every task is shown as a test task")
            selection = ()
        elif selection:
            source = f"inferred: their mean is {names.EVAL_SELECTION_MEAN_ACC}"
    test = tuple(t for t in acc_tasks if t not in selection)
    return EvalTasks(test, selection, perplexity, source), notes


# --- values at the chosen checkpoints and the paper's table ------------------------------------------


def _choice_frame(choices: tuple[CheckpointChoice, ...]) -> pl.DataFrame:
    rows = []
    for c in choices:
        if c.has_initial:
            rows.append({"run_id": c.run_id, "selection": INITIAL, "step": 0})
        if c.step is not None:
            rows.append({"run_id": c.run_id, "selection": VALIDATION, "step": c.step})
        if c.test_step is not None:
            rows.append({"run_id": c.run_id, "selection": TEST, "step": c.test_step})
    return pl.DataFrame(rows, schema={"run_id": pl.String, "selection": pl.String, "step": pl.Int64})


def compute_checkpoint_values(points: pl.DataFrame, choices: tuple[CheckpointChoice, ...]) -> pl.DataFrame:
    """Every `eval/` metric of each run at its initial, validation-selected and test-selected step:
    columns run_id, rung, n, arm, seed, selection, step, metric, value."""
    keys = ["run_id", "rung", "n", "arm", "seed"]
    evals = points.filter(pl.col("metric").str.starts_with(_EVAL)).select(*keys, "step", "metric", "value")
    return (_choice_frame(choices).join(evals, on=["run_id", "step"], how="inner")
            .select(*keys, "selection", "step", "metric", "value").sort("n", "arm", "seed", "selection", "metric"))


def table_columns(tasks: EvalTasks) -> tuple[list[str], list[str], list[str]]:
    """Column names (metric keys without `eval/`) of the test accuracies + mean, the selection
    accuracies + their mean, and the perplexities."""
    test = [f"{t}/{ACC}" for t in tasks.test] + [MEAN_ACC]
    selection = [f"{t}/{ACC}" for t in tasks.selection] + ([SELECTION_MEAN_ACC] if tasks.selection else [])
    perplexity = [f"{t}/{WORD_PERPLEXITY}" for t in tasks.perplexity]
    return test, selection, perplexity


def _aggregate(frame: pl.DataFrame, column: str) -> dict[str, float | int]:
    values = frame[column].drop_nulls().to_numpy().astype(float) if column in frame.columns else np.array([])
    values = values[np.isfinite(values)]
    return {column: float(np.mean(values)) if values.size else math.nan,
            f"{column}_std": float(np.std(values, ddof=1)) if values.size > 1 else math.nan,
            f"{column}_n": int(values.size)}


def build_accuracy_table(values: pl.DataFrame, tasks: EvalTasks) -> pl.DataFrame:
    """The paper's table, per rung: an "initial (step 0)" row, then for each arm a validation-selected
    and a test-selected row; per column (a task's `acc`, the mean, the selection tasks, the word
    perplexities, the paired change of the mean versus step 0) the mean over seeds with `_std`
    (sample standard deviation, ddof 1) and `_n` (seeds with a value). Paired arms share their
    initialisation, so the initial row has one value per (rung, seed)."""
    test, selection, perplexity = table_columns(tasks)
    columns = test + selection + perplexity
    if values.is_empty():
        return pl.DataFrame()
    wide = (values.with_columns(pl.col("metric").str.strip_prefix(_EVAL))
            .pivot(on="metric", index=["rung", "n", "arm", "seed", "selection", "step"], values="value", aggregate_function="first"))
    for column in columns:
        if column not in wide.columns:
            wide = wide.with_columns(pl.lit(None, dtype=pl.Float64).alias(column))
    initial = (wide.filter(pl.col("selection") == INITIAL).group_by("rung", "n", "seed")
               .agg(*[pl.col(c).mean() for c in columns], pl.col("step").first()))
    base = initial.select("rung", "seed", pl.col(MEAN_ACC).alias("_initial"))
    trained = wide.filter(pl.col("selection") != INITIAL).join(base, on=["rung", "seed"], how="left").with_columns(
        (pl.col(MEAN_ACC) - pl.col("_initial")).alias(DELTA_MEAN_ACC))
    rows = []
    for rung, n in wide.select("rung", "n").unique().sort("n").iter_rows():
        cell = initial.filter(pl.col("rung") == rung)
        if cell.height:
            rows.append(_row(rung, n, INITIAL, INITIAL, cell, columns + [DELTA_MEAN_ACC]))
        for arm in sorted(trained.filter(pl.col("rung") == rung)["arm"].drop_nulls().unique().to_list()):
            for kind in (VALIDATION, TEST):
                cell = trained.filter((pl.col("rung") == rung) & (pl.col("arm") == arm) & (pl.col("selection") == kind))
                if cell.height:
                    rows.append(_row(rung, n, arm, kind, cell, columns + [DELTA_MEAN_ACC]))
    return pl.DataFrame(rows, infer_schema_length=None)


def _row(rung: str, n: float, arm: str, kind: str, cell: pl.DataFrame, columns: list[str]) -> dict:
    row = {"rung": rung, "n": n, "row": "initial" if kind == INITIAL else arm, "selection": SELECTION_LABELS[kind],
           "seeds": int(cell["seed"].n_unique()), "steps": ",".join(str(s) for s in sorted(set(cell["step"].to_list())))}
    for column in columns:
        row.update(_aggregate(cell, column))
    return row


def with_selected_accuracy(final: pl.DataFrame, values: pl.DataFrame) -> pl.DataFrame:
    """`final` (one row per run and metric) with eval/mean_acc replaced by its value at the
    validation-selected checkpoint (runs without one lose the row), so fits, paired differences
    and claim (f) all read the headline checkpoint rather than the last evaluation."""
    chosen = (values.filter((pl.col("selection") == VALIDATION) & (pl.col("metric") == names.EVAL_MEAN_ACC))
              .select("run_id", pl.col("value").alias("_chosen"), pl.col("step").alias("_chosen_step")))
    accuracy = (final.filter(pl.col("metric") == names.EVAL_MEAN_ACC).join(chosen, on="run_id", how="inner")
                .with_columns(pl.col("_chosen").alias("value"), pl.col("_chosen_step").cast(final.schema["step"]).alias("step"))
                .drop("_chosen", "_chosen_step").select(final.columns))
    return pl.concat([final.filter(pl.col("metric") != names.EVAL_MEAN_ACC), accuracy], how="vertical_relaxed")


def analyse_downstream(points: pl.DataFrame, *, selection_tasks: tuple[str, ...] | None = None) -> DownstreamAccuracy:
    """Checkpoint choices, values and the paper's table of finished training runs' points
    (run_id, step, metric, value, rung, n, arm, seed). Empty (`evaluated` False) when no run
    logged downstream results."""
    choices = select_checkpoints(points)
    if not choices:
        return DownstreamAccuracy((), EvalTasks((), (), ()), pl.DataFrame(), pl.DataFrame())
    tasks, notes = discover_tasks(points, selection_tasks)
    values = compute_checkpoint_values(points, choices)
    rules = {}
    for c in choices:
        rules[c.rule] = rules.get(c.rule, 0) + 1
    if RULE_LAST in rules:
        notes.append(f"{rules[RULE_LAST]} run(s) logged neither {names.EVAL_SELECTION_MEAN_ACC} nor {names.VAL_LOSS} at or before an "
                     "evaluation: their last evaluation is reported (no validation-based choice)")
    if not any(c.has_initial for c in choices):
        notes.append("no step-0 evaluation (eval.at_start off): no initial row and no change versus step 0")
    scored = set(values.filter((pl.col("selection") == VALIDATION) & (pl.col("metric") == names.EVAL_MEAN_ACC))["run_id"].to_list())
    missing = [c.run_id for c in choices if c.step is not None and c.run_id not in scored]
    if missing:
        notes.append(f"{len(missing)} run(s) have no {names.EVAL_MEAN_ACC} at their validation-selected step (a test task failed there): "
                     "left out of the mean column and of claim (f)")
    return DownstreamAccuracy(choices, tasks, values, build_accuracy_table(values, tasks), tuple(notes))


def build_choice_table(choices: tuple[CheckpointChoice, ...], runs: pl.DataFrame) -> pl.DataFrame:
    """`tables/checkpoints.csv`: per run, the rule, the validation-selected, test-selected and last steps."""
    if not choices:
        return pl.DataFrame()
    frame = pl.DataFrame([{"run_id": c.run_id, "rule": c.rule, "selected_step": c.step, "criterion": c.criterion,
                           "criterion_step": c.criterion_step, "test_selected_step": c.test_step, "last_step": c.last_step,
                           "eval_steps": ",".join(map(str, c.eval_steps))} for c in choices], infer_schema_length=None)
    info = runs.select("run_id", "rung", "n_params", "arm", "seed")
    return info.join(frame, on="run_id", how="inner").sort("n_params", "arm", "seed").drop("n_params")


# --- item-level uncertainty -------------------------------------------------------------------------------

ITEM_KEYS = ("task", "leaf", "doc_id")
"""What identifies one document across runs in `analysis.load.read_item_results`."""
_ITEM_CHUNK = 250
"""Bootstrap replicates drawn at a time (bounds memory at replicates x documents)."""


@dataclass(frozen=True)
class PairedDifference(Interval):
    """An arm-minus-arm accuracy difference on the same documents, with its item x seed bootstrap interval."""

    seeds: int = 0
    """Seeds with both arms (the pairs)."""
    items: int = 0
    """Documents every one of those runs was scored on (all tasks together)."""
    tasks: tuple[str, ...] = ()


def chosen_items(items: pl.DataFrame, choices: tuple[CheckpointChoice, ...], selection: str = VALIDATION) -> pl.DataFrame:
    """Each run's per-item results at one of its chosen checkpoints: `selection` VALIDATION (the headline),
    TEST (the paper's choice) or INITIAL (step 0). `items`: `analysis.load.read_item_results`."""
    if selection not in SELECTION_LABELS:
        raise ValueError(f"selection={selection!r}: use one of {list(SELECTION_LABELS)}")
    step_of = {VALIDATION: lambda c: c.step, TEST: lambda c: c.test_step, INITIAL: lambda c: 0 if c.has_initial else None}
    wanted = pl.DataFrame([{"run_id": c.run_id, "step": step_of[selection](c)} for c in choices
                           if step_of[selection](c) is not None], schema={"run_id": pl.String, "step": pl.Int64})
    return items.join(wanted, on=["run_id", "step"], how="inner")


def paired_item_bootstrap(items: pl.DataFrame, *, treatment: str, control: str, metric: str = ACC,
                          n_bootstrap: int = 2000, level: float = 0.95, seed: int = 0) -> PairedDifference:
    """Mean accuracy of `treatment` minus `control`, paired by seed, on the documents both were scored on,
    with a percentile interval from a two-way bootstrap that resamples the seeds and, independently
    within each task, the documents (items x seeds: both are samples, so both vary; resampling both is
    slightly conservative).

    `items`: one row per (run, document) at one checkpoint per run, e.g. `chosen_items(...)` of one
    rung: columns arm, seed, task, leaf, doc_id and `metric` (1.0 correct, 0.0 not). The estimate is
    the mean over tasks of each task's accuracy difference (eval/mean_acc's mean), averaged over seeds.
    Bounds are NaN, with the reason in `why`, when no seed has both arms or nothing varies.
    With 1 seed the interval reflects the documents only (`seeds` says so)."""
    if not 0 < level < 1:
        raise ValueError(f"level={level!r}: must be in (0, 1)")
    columns = {"arm", "seed", *ITEM_KEYS, metric}
    if missing := columns - set(items.columns):
        raise ValueError(f"items lack columns {sorted(missing)}; read them with analysis.load.read_item_results")
    if "rung" in items.columns and items["rung"].n_unique() > 1:
        raise ValueError("items of several rungs: pass one rung's items (a document is paired within a rung)")
    rows = items.filter(pl.col("arm").is_in([treatment, control]) & pl.col(metric).is_not_null())
    seeds = sorted(set(rows.filter(pl.col("arm") == treatment)["seed"].to_list())
                   & set(rows.filter(pl.col("arm") == control)["seed"].to_list()))
    if not seeds:
        return PairedDifference(math.nan, math.nan, math.nan, f"no seed has both {treatment} and {control} item results")
    rows = rows.filter(pl.col("seed").is_in(seeds))
    # A document counts when every paired run has it (runs scored on other limits share only some).
    runs = rows.select("arm", "seed").unique().height
    common = (rows.group_by(*ITEM_KEYS).agg(pl.struct("arm", "seed").n_unique().alias("_runs"))
              .filter(pl.col("_runs") == runs).drop("_runs"))
    rows = rows.join(common, on=list(ITEM_KEYS), how="inner")
    if rows.is_empty():
        return PairedDifference(math.nan, math.nan, math.nan, "the paired runs share no scored document", len(seeds))
    wide = (rows.group_by("seed", *ITEM_KEYS, "arm").agg(pl.col(metric).mean())
            .pivot(on="arm", index=["seed", *ITEM_KEYS], values=metric)
            .with_columns((pl.col(treatment) - pl.col(control)).alias("_d")).sort("task", "leaf", "doc_id", "seed"))
    tasks = tuple(sorted(set(wide["task"].to_list())))
    blocks = []  # per task: [seeds, documents] of differences
    for task in tasks:
        cell = wide.filter(pl.col("task") == task)
        blocks.append(cell["_d"].to_numpy().astype(float).reshape(-1, len(seeds)).T)
    estimate = float(np.mean([block.mean() for block in blocks]))
    n_items = int(sum(block.shape[1] for block in blocks))
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, n_bootstrap, _ITEM_CHUNK):
        size = min(_ITEM_CHUNK, n_bootstrap - start)
        seed_weights = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=size) / len(seeds)
        per_seed = np.zeros((size, len(seeds)))
        for block in blocks:
            n = block.shape[1]
            item_weights = rng.multinomial(n, np.full(n, 1 / n), size=size) / n  # [size, documents]
            per_seed += item_weights @ block.T / len(blocks)
        stats.append((per_seed * seed_weights).sum(axis=1))
    stats = np.concatenate(stats)
    low, high = (float(v) for v in np.quantile(stats, [(1 - level) / 2, (1 + level) / 2]))
    if high - low <= 1e-12:
        return PairedDifference(estimate, math.nan, math.nan, f"no document or seed varies: every resample gives {estimate:+.4f}",
                                len(seeds), n_items, tasks)
    return PairedDifference(estimate, low, high, "", len(seeds), n_items, tasks)
