"""`python -m analysis.scaling_curves`: fit size-versus-condensation scaling curves of a study.

Reads a study's runs from MLflow, fits per arm metric(N) = a * N^-alpha + c (validation
loss, last-layer and late-half mean cosine) or, where a power law is not supported, the
trend of the metric with log N (always for Spearman/Kendall), computes paired effects of
each arm against the baseline, checks the paper's claims (verdicts read off confidence
intervals), tabulates downstream accuracy at checkpoints chosen on validation data
(`analysis.downstream`), and writes plots, tables, a markdown + HTML report and (unless --no-log) an
MLflow run of kind=analysis in the study's experiment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import polars as pl

from analysis import load, plots
from analysis.goodput import BAR_PHASES, study_totals, time_account
from analysis.downstream import (
    VALIDATION,
    DownstreamAccuracy,
    analyse_downstream,
    build_choice_table,
    chosen_items,
    paired_item_bootstrap,
    selection_tasks_from_params,
    with_selected_accuracy,
)
from analysis.observe import build_observation_accuracy, build_observation_table, compare_with_paper, compute_observation_trends
from analysis.claims import CLAIM_KEYS, check_paper_claims
from analysis.effects import (
    EVAL_MEAN_ACC,
    compute_best_lambdas,
    compute_difference_trend,
    compute_paired_differences,
    compute_parameter_multipliers,
    difference_range,
    pair_arms,
)
from analysis.fit import CurveResult, FitOptions, fit_scaling_curve
from analysis.waves import read_course
from analysis.report import (
    StudyAnalysis,
    build_claims_table,
    build_difference_table,
    build_difference_trend_table,
    build_fit_table,
    build_lambda_table,
    build_multiplier_table,
    claim_figure_name,
    compute_budget,
    render_html,
    render_markdown,
)
from scaling import names
from scaling.console import check_writable_dir, quiet_libraries, run_cli, significant
from scaling.errors import ConfigError, DataError
from scaling.provenance import git_commit, resolve_tracking_uri, run_page, ui_link

DEFAULT_METRICS = (
    names.VAL_LOSS,
    names.COND_SPEARMAN,
    names.COND_LAST_LAYER_MEAN_COS,
    names.COND_LATE_HALF_MEAN_COS,
    names.COND_KENDALL,
)
OPTIONAL_METRICS = (EVAL_MEAN_ACC,)
SIZE_COLUMNS = {"total": "n_params", "non_embedding": "n_params_non_embedding"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.scaling_curves",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Outputs in --out: report.md and report.html (the same report, figures embedded: it renders in "
            "MLflow's artifact viewer), plots/*.png (final condensation heatmaps per rung and arm, the profile "
            "over training, paired differences vs N with CI bands, metric vs N with fits where supported, "
            "per-layer profiles), tables/*.csv and *.parquet (claims: the paper's claims with CI verdicts; tidy "
            "metrics, runs, fits, paired differences, multipliers, lambda rule; when runs were evaluated on downstream "
            "tasks: accuracy (the paper's table per rung: initial, validation-selected and test-selected rows), "
            "checkpoints (each run's chosen step and why), accuracy_by_run, with plots/accuracy_vs_n.png and "
            "accuracy_difference_<arm>.png), provenance.json. "
            "Only runs with status=finished enter fits; failed runs are listed in the report. "
            "Exit status 2 with a one-line message on bad input."
        ),
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    parser.add_argument("--study", "--experiment", dest="study", default=None, help="study (= experiment) name (default: the most recently created study)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: outputs/analysis/<study>)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), help="final-value metrics to analyse (default: %(default)s)")
    parser.add_argument("--size", choices=sorted(SIZE_COLUMNS), default="non_embedding", help="size axis N: non-embedding parameters (as the dry run and the token budgets; observation runs fall back to their total) or total (default: %(default)s)")
    parser.add_argument("--control-arm", default=names.ARM_BASELINE, help="arm the paired differences are taken against (default: %(default)s)")
    parser.add_argument("--bootstrap", type=int, default=FitOptions.n_bootstrap, help="bootstrap replicates for every interval (default: %(default)s)")
    parser.add_argument("--confidence", type=float, default=FitOptions.confidence, help="interval level (default: %(default)s)")
    parser.add_argument("--huber-delta", type=float, default=FitOptions.huber_delta, help="Huber threshold on log residuals (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
    parser.add_argument("--smallest-effect", action="append", default=[], metavar="CLAIM=DELTA",
                        help="smallest effect of interest of a claim, for its 'no effect' verdict (TOST), e.g. f=0.02; "
                             f"claims {', '.join(CLAIM_KEYS)} (defaults in analysis/claims.py SMALLEST_EFFECTS)")
    parser.add_argument("--no-log", action="store_true", help="do not log an analysis run to MLflow")
    parser.add_argument("--no-cache", action="store_true", help="re-read every metric history instead of reusing <out>/cache")
    return parser


# --- analysis steps ---------------------------------------------------------------------------


def _finals_with_size(records: load.StudyRecords, size_column: str) -> pl.DataFrame:
    finished_ids = records.finished(kind=None)["run_id"]
    final = load.compute_final_values(records.metrics.filter(pl.col("run_id").is_in(finished_ids.implode())))
    size = pl.col(size_column)
    if size_column != "n_params":
        size = size.fill_null(pl.col("n_params"))  # observation runs only carry n_params
    return final.with_columns(size.cast(pl.Float64).alias("n"))


def _train_at_steps(records: load.StudyRecords, size_column: str) -> pl.DataFrame:
    """Every logged point of finished training runs, with the size column as `n`."""
    ids = records.finished(kind=names.KIND_TRAIN)["run_id"].implode()
    return records.metrics.filter(pl.col("run_id").is_in(ids)).with_columns(pl.col(size_column).cast(pl.Float64).alias("n"))


def _downstream(records: load.StudyRecords, size_column: str) -> DownstreamAccuracy:
    """Checkpoint choices and the paper's accuracy table of finished training runs."""
    return analyse_downstream(_train_at_steps(records, size_column), selection_tasks=selection_tasks_from_params(records.study_params))


def _train_finals(final: pl.DataFrame, downstream: DownstreamAccuracy) -> pl.DataFrame:
    """Final values of training runs, eval/mean_acc at the validation-selected checkpoint."""
    train = final.filter(pl.col("kind") == names.KIND_TRAIN)
    return with_selected_accuracy(train, downstream.values) if downstream.evaluated else train


def _first_probe_step(train_points: pl.DataFrame) -> int | None:
    steps = train_points.filter(pl.col("metric") == names.COND_SPEARMAN)["step"]
    return int(steps.min()) if steps.len() else None


_LAYER_MEAN_COS = r"^condensation/layer_(\d+)/mean_cos$"


def _layer_history(train_points: pl.DataFrame) -> pl.DataFrame:
    """Per-layer mean cosine at every probe step: columns rung, n, arm, seed, step, layer, value."""
    return (
        train_points.filter(pl.col("metric").str.contains(_LAYER_MEAN_COS))
        .with_columns(pl.col("metric").str.extract(_LAYER_MEAN_COS, 1).cast(pl.Int64).alias("layer"))
        .select("rung", "n", "arm", "seed", "step", "layer", "value")
    )


_RANK_METRICS = (names.COND_SPEARMAN, names.COND_KENDALL)


def _saturation_notes(train: pl.DataFrame, profiles: pl.DataFrame) -> dict[str, str]:
    """Rank correlations pinned at +-1: what that means, per metric (empty when not saturated).

    With few layers a rank correlation over depth takes few values, and any monotone profile
    gives exactly +1: then arms and sizes cannot differ in it, and a zero paired difference or
    a constant trend is the metric's bound, not a logging error."""
    depth = profiles.filter(pl.col("run_id").is_in(train["run_id"].implode())).group_by("run_id").len()["len"]
    layers = f" with {depth.min()}–{depth.max()} hidden states per run" if depth.len() and depth.min() != depth.max() else (
        f" with {depth.min()} hidden states per run" if depth.len() else "")
    out = {}
    for metric in _RANK_METRICS:
        values = train.filter((pl.col("metric") == metric) & pl.col("value").is_finite())["value"]
        if values.len() == 0:
            continue
        at_bound = int(((values.abs() - 1.0).abs() < 1e-9).sum())
        if at_bound == values.len():
            out[metric] = (f"{metric}: every finished run is at {values[0]:+.3f}{layers}: the rank correlation is saturated (any monotone "
                           "profile gives exactly ±1), so arms and sizes cannot differ in it; read the mean cosines instead")
        elif at_bound * 2 >= values.len():
            out[metric] = (f"{metric}: {at_bound} of {values.len()} finished runs at ±1{layers}: the rank correlation is mostly saturated; "
                           "differences in it are coarse")
    return out


def _runs_summary(records: load.StudyRecords) -> pl.DataFrame:
    runs = records.runs
    if runs.is_empty():
        return pl.DataFrame()
    return (
        runs.group_by("kind", "rung", "arm", "status")
        .agg(pl.len().alias("runs"), pl.col("n_params").first(), pl.col("seed").sort().cast(pl.String).str.join(",").alias("seeds"))
        .sort("kind", "n_params", "arm", "status", nulls_last=True)
    )


def _fit_curves(train: pl.DataFrame, metrics: list[str], options: FitOptions, notes: list[str]) -> dict[tuple[str, str], CurveResult]:
    curves = {}
    for metric in metrics:
        rows = train.filter(pl.col("metric") == metric)
        if rows.is_empty():
            notes.append(f"metric {metric!r} was not logged by any finished training run; skipped")
            continue
        for arm in sorted(rows["arm"].drop_nulls().unique().to_list()):
            arm_rows = rows.filter(pl.col("arm") == arm).drop_nulls("n")
            bad = arm_rows.filter(~pl.col("value").is_finite())
            if bad.height:
                # Keep the finished work that is usable; name what was dropped.
                notes.append(
                    f"{metric} / {arm}: {bad.height} of {arm_rows.height} final values are NaN or infinite "
                    f"(runs {', '.join(bad['run_id'].head(3).to_list())}{', ...' if bad.height > 3 else ''}); left out of the fit"
                )
                arm_rows = arm_rows.filter(pl.col("value").is_finite())
                if arm_rows.is_empty():
                    curves[(metric, arm)] = CurveResult(metric, None, None, None, False, "every value is NaN or infinite")
                    continue
            n, y = arm_rows["n"].to_numpy(), arm_rows["value"].to_numpy()
            try:
                curves[(metric, arm)] = fit_scaling_curve(metric, n, y, options)
            except DataError as err:
                curves[(metric, arm)] = CurveResult(metric, None, None, None, False, str(err))
                notes.append(f"{metric} / {arm}: {err}")
    return curves


def _paired_effects(train: pl.DataFrame, curves, metrics, control: str, options: FitOptions, notes: list[str], saturated: dict[str, str]):
    arms = sorted(set(train["arm"].drop_nulls().unique().to_list()) - {control})
    differences, trends, multipliers = {}, {}, {}
    if control not in set(train["arm"].drop_nulls().to_list()):
        if arms:
            notes.append(f"no finished runs of the control arm {control!r}: no paired differences (use --control-arm)")
        return arms, differences, trends, multipliers
    for arm in arms:
        for metric in metrics:
            paired = pair_arms(train.filter(pl.col("metric") == metric), treatment=arm, control=control)
            if paired.is_empty():
                continue
            differences[(metric, arm)] = compute_paired_differences(paired, options, bounds=difference_range(metric))
            if paired["n"].n_unique() >= 2:
                try:
                    trends[(metric, arm)] = compute_difference_trend(paired, options, bounds=difference_range(metric))
                except DataError as err:
                    if metric in saturated:
                        notes.append(f"difference trend {metric} / {arm}: none; the metric is saturated (see its note)")
                    else:
                        notes.append(f"difference trend {metric} / {arm}: {err}")
            baseline = curves.get((metric, control))
            if metric == names.VAL_LOSS and baseline is not None and baseline.fit is not None:
                multipliers[arm] = compute_parameter_multipliers(baseline.fit, paired, options)
        if (names.VAL_LOSS, arm) in differences and arm not in multipliers:
            notes.append(f"no effective-parameter multiplier for {arm}: the {control} val/loss has no supported power law")
    return arms, differences, trends, multipliers


def _best_lambdas(final: pl.DataFrame, notes: list[str]):
    trials = final.filter((pl.col("kind") == names.KIND_TRIAL) & (pl.col("metric") == names.VAL_LOSS))
    if trials.is_empty():
        return ()
    try:
        best = compute_best_lambdas(trials)
    except DataError as err:
        notes.append(str(err))
        return ()
    edge = [b.rung for b in best if b.at_bound]
    if edge:
        notes.append(f"best lambda at the edge of the searched range at {', '.join(edge)}: the optimum may lie outside it; widen search.lambda_range")
    return best


def _item_differences(records: load.StudyRecords, downstream: DownstreamAccuracy, arms: list[str], control: str,
                      options: FitOptions) -> tuple:
    """Per (arm, rung): accuracy difference against `control` at the validation-selected
    checkpoints with an items x seeds bootstrap interval, from the per-item results the trainer
    logs with `eval.log_samples` (empty when none were logged)."""
    if not downstream.evaluated or not arms:
        return ()
    items = load.read_item_results(records)
    if items.is_empty():
        return ()
    # The tasks of eval/mean_acc only: the validation-split tasks chose the checkpoint, they are not the score.
    chosen = chosen_items(items, downstream.choices, VALIDATION).filter(pl.col("task").is_in(list(downstream.tasks.test)))
    if chosen.is_empty():
        return ()
    out = []
    for (rung, n), cell in chosen.group_by("rung", "n_params", maintain_order=True):
        for arm in arms:
            diff = paired_item_bootstrap(cell, treatment=arm, control=control, level=options.confidence, seed=options.seed)
            out.append((arm, str(rung), float(n), diff))
    return tuple(sorted(out, key=lambda item: (item[0], item[2])))


def pretrained_start(train_runs: pl.DataFrame) -> str | None:
    """What the study's training runs started from when not from random weights (None: random)."""
    sources = sorted(train_runs["init_from"].drop_nulls().unique().to_list()) if "init_from" in train_runs.columns else []
    if not sources:
        return None
    return f"training.init_from = {sources[0]}" + (f" and {len(sources) - 1} more" if len(sources) > 1 else "")


def claim_inputs(records: load.StudyRecords, size_column: str) -> tuple[pl.DataFrame, pl.DataFrame, int | None, str | None]:
    """What `check_paper_claims` takes from a study's records: (final values of finished training runs with
    eval/mean_acc at the validation-selected checkpoint, their step-0 points, the first probe step, the
    pretrained start). The report's claims and a deciding study's looks (`analysis.waves`) both use it."""
    final = _finals_with_size(records, size_column)
    train = _train_finals(final, _downstream(records, size_column))
    points = _train_at_steps(records, size_column)
    return train, points.filter(pl.col("step") == 0), _first_probe_step(points), pretrained_start(records.finished(kind=names.KIND_TRAIN))


def parse_smallest_effects(items: list[str]) -> dict[str, float]:
    """`--smallest-effect f=0.02` items -> {claim: delta}; one line naming the item on bad input."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            delta = float(value)
        except ValueError:
            delta = math.nan
        if not sep or key not in CLAIM_KEYS or not (math.isfinite(delta) and delta > 0):
            raise ConfigError(f"--smallest-effect {item!r}: use CLAIM=DELTA with CLAIM one of {', '.join(CLAIM_KEYS)} and DELTA a "
                              "finite number > 0, e.g. f=0.02")
        out[key] = delta
    return out


def analyse_study(records: load.StudyRecords, *, metrics: list[str], size_column: str, control_arm: str, options: FitOptions,
                  smallest_effects: dict[str, float] | None = None) -> StudyAnalysis:
    """Every number of the report, from loaded records. Raises `DataError` only when there is
    nothing at all to analyse; everything else becomes a note."""
    finished = records.finished(kind=None)
    if finished.is_empty():
        counts = records.runs.group_by("status").len().sort("status").iter_rows() if records.runs.height else []
        seen = ", ".join(f"{n} {s}" for s, n in counts) or "no runs at all"
        raise DataError(f"study {records.study!r} has no finished runs ({seen}); wait for the runs to finish or fix the failures listed by the trainer")
    notes: list[str] = []
    final = _finals_with_size(records, size_column)
    downstream = _downstream(records, size_column)
    notes.extend(downstream.notes)
    train = _train_finals(final, downstream)
    # Logged only by studies that evaluate tasks: analysed when there, never a "missing" note.
    metrics = metrics + [m for m in OPTIONAL_METRICS if m not in metrics and train.filter(pl.col("metric") == m).height]
    sizes = sorted(train["n"].drop_nulls().unique().to_list())
    if train.height and len(sizes) == 1:
        notes.append(f"only one rung ({train['rung'][0]}, N={sizes[0]:.4g}) has finished runs: no scaling curve or trend with N; per-rung differences and figures only")
    saturated = _saturation_notes(train, records.profiles) if train.height else {}
    notes.extend(saturated.values())
    curves = _fit_curves(train, metrics, options, notes) if train.height else {}
    arms, differences, trends, multipliers = _paired_effects(train, curves, metrics, control_arm, options, notes, saturated) if train.height else ([], {}, {}, {})
    failed = records.failed().select("run_id", "kind", "rung", "arm", "seed", "failure") if records.failed().height else pl.DataFrame()
    claims, budget = (), None
    train_runs = records.finished(kind=names.KIND_TRAIN)
    if train_runs.height:
        points = _train_at_steps(records, size_column)
        pretrained = pretrained_start(train_runs)
        claims = check_paper_claims(train, points.filter(pl.col("step") == 0), control=control_arm,
                                    first_probe_step=_first_probe_step(points), pretrained=pretrained, confidence=options.confidence,
                                    smallest_effects=smallest_effects, seed=options.seed)
        budget = compute_budget(train_runs, records.metrics, records.profiles, size_column=size_column, saturated=tuple(saturated),
                                pretrained=pretrained)
    return StudyAnalysis(
        study=records.study,
        size_column=size_column,
        treatment_arms=tuple(arms),
        control_arm=control_arm,
        curves=curves,
        differences=differences,
        difference_trends=trends,
        multipliers=multipliers,
        best_lambdas=_best_lambdas(final, notes),
        item_differences=_item_differences(records, downstream, arms, control_arm, options) if train_runs.height else (),
        observation_trends=compute_observation_trends(final.filter(pl.col("kind") == names.KIND_OBSERVE), options),
        observation_accuracy=build_observation_accuracy(final.filter(pl.col("kind") == names.KIND_OBSERVE)),
        downstream=downstream if train_runs.height else None,
        paper_comparison=compare_with_paper(final.filter(pl.col("kind") == names.KIND_OBSERVE)),
        runs_summary=_runs_summary(records),
        failed_runs=failed,
        notes=tuple(notes),
        options=options,
        claims=claims,
        budget=budget,
        saturated=tuple(saturated),
        time_account=time_account(records.metrics, records.study_metrics),
        course=read_course(records.study_tags),
    )


# --- outputs -----------------------------------------------------------------------------------


def _write_table(frame: pl.DataFrame, tables: Path, name: str) -> list[Path]:
    if frame.is_empty():
        return []
    parquet, csv = tables / f"{name}.parquet", tables / f"{name}.csv"
    frame.write_parquet(parquet)
    flat = frame.select([c for c, dtype in frame.schema.items() if not isinstance(dtype, (pl.List, pl.Array, pl.Struct))])
    flat.write_csv(csv)
    return [csv, parquet]


def _write_plots(records: load.StudyRecords, analysis: StudyAnalysis, final: pl.DataFrame, out: Path) -> list[Path]:
    made = []
    plot_dir = out / "plots"
    label = "parameters N (non-embedding)" if analysis.size_column == "n_params_non_embedding" else "parameters N (total)"
    for check in analysis.claims:
        figure = plots.plot_claim(plot_dir / f"{claim_figure_name(check.key)}.png", check, size_label=label)
        if figure is not None:
            made.append(figure)
    downstream = analysis.downstream
    train = _train_finals(final, downstream) if downstream is not None else final.filter(pl.col("kind") == names.KIND_TRAIN)
    for metric in dict.fromkeys(m for m, _ in analysis.curves):
        if metric == EVAL_MEAN_ACC and downstream is not None and downstream.evaluated:
            continue  # accuracy_vs_n.png shows it with the tasks and the initial row
        rows = train.filter(pl.col("metric") == metric)
        arm_curves = {arm: r for (m, arm), r in analysis.curves.items() if m == metric}
        made.append(plots.plot_metric_curves(plot_dir / f"curve_{metric.replace('/', '_')}.png", metric, rows, arm_curves, size_label=label))
    runs = records.runs.select("run_id", "rung", "arm", "kind", pl.col(analysis.size_column).cast(pl.Float64).alias("n"))
    profiles = records.profiles.join(runs, on="run_id").filter(pl.col("kind") == names.KIND_TRAIN)
    if profiles.height:
        made.append(plots.plot_heatmap_grid(plot_dir / "condensation_heatmaps.png", profiles))
    history = _layer_history(_train_at_steps(records, analysis.size_column))
    if history.height:
        made.append(plots.plot_profile_over_training(plot_dir / "profile_over_training.png", history))
    probes = records.probe_profiles.join(records.runs.select("run_id", "rung", "arm", "seed", "kind",
                                                             pl.col(analysis.size_column).cast(pl.Float64).alias("n")),
                                         on="run_id").filter(pl.col("kind") == names.KIND_TRAIN)
    for rung in probes.sort("n")["rung"].unique(maintain_order=True).to_list():
        cell = probes.filter(pl.col("rung") == rung)
        made.append(plots.plot_heatmaps_over_training(plot_dir / f"heatmaps_over_training_{rung}.png", cell,
                                                      rung=rung, n=cell["n"][0]))
    for arm in analysis.treatment_arms:
        # A saturated rank correlation differs by 0 in every pair by construction: no panel.
        # Mean accuracy gets its own figure in the downstream section (accuracy_difference_<arm>.png).
        diffs = {m: d for (m, a), d in analysis.differences.items() if a == arm and m not in analysis.saturated
                 and not (m == EVAL_MEAN_ACC and downstream is not None and downstream.evaluated)}
        if diffs:
            pairs = {m: pair_arms(train.filter(pl.col("metric") == m), treatment=arm, control=analysis.control_arm) for m in diffs}
            arm_trends = {m: t for (m, a), t in analysis.difference_trends.items() if a == arm}
            made.append(plots.plot_paired_differences(plot_dir / f"difference_{arm}.png", diffs, treatment=arm, control=analysis.control_arm,
                                                      size_label=label, pairs=pairs, trends=arm_trends))
    if downstream is not None and downstream.evaluated:
        made.append(plots.plot_accuracy_curves(plot_dir / "accuracy_vs_n.png", downstream.values, downstream.tasks, size_label=label))
        for arm in analysis.treatment_arms:
            diffs = analysis.differences.get((EVAL_MEAN_ACC, arm))
            if diffs:
                key = f"{EVAL_MEAN_ACC} (validation-selected checkpoint)"
                pairs = pair_arms(train.filter(pl.col("metric") == EVAL_MEAN_ACC), treatment=arm, control=analysis.control_arm)
                trend = analysis.difference_trends.get((EVAL_MEAN_ACC, arm))
                made.append(plots.plot_paired_differences(plot_dir / f"accuracy_difference_{arm}.png", {key: diffs}, treatment=arm,
                                                          control=analysis.control_arm, size_label=label, pairs={key: pairs},
                                                          trends={key: trend} if trend is not None else None))
    if profiles.height:
        made.append(plots.plot_layer_profiles(plot_dir / "layer_profiles.png", profiles))
    account = analysis.time_account
    if account is not None and not account.empty:
        made.append(plots.plot_time_split(plot_dir / "time_split.png", account.runs, BAR_PHASES, study_totals(account)))
    observe = final.filter((pl.col("kind") == names.KIND_OBSERVE) & (pl.col("metric") == names.COND_SPEARMAN))
    if observe.height:
        made.append(plots.plot_observation_trends(plot_dir / "observation_spearman.png", observe, metric=names.COND_SPEARMAN))
    observe_all = final.filter(pl.col("kind") == names.KIND_OBSERVE)
    trends = analysis.observation_trends
    for family in sorted(observe_all["family"].drop_nulls().unique().to_list()):
        # The paper's figure: metric vs log N, one line per source, with the fitted trend.
        rows = observe_all.filter(pl.col("family") == family)
        family_trends = trends.filter(pl.col("family") == family) if trends is not None else None
        made.append(plots.plot_observation_family(plot_dir / f"observation_{family}.png", rows, family_trends, family=family))
        obs_profiles = records.profiles.join(records.runs.select("run_id", "kind", "family", "model", "source", pl.col("n_params").cast(pl.Float64).alias("n")), on="run_id")
        cell = obs_profiles.filter((pl.col("kind") == names.KIND_OBSERVE) & (pl.col("family") == family))
        if cell.height:
            made.append(plots.plot_observation_heatmaps(plot_dir / f"observation_heatmaps_{family}.png", cell, family=family))
    return made


def write_outputs(records: load.StudyRecords, analysis: StudyAnalysis, out: Path) -> list[Path]:
    """Every file of the analysis under `out` (except the cache); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    tables = out / "tables"
    tables.mkdir(exist_ok=True)
    final = _finals_with_size(records, analysis.size_column)
    files: list[Path] = []
    files += _write_table(records.metrics, tables, "tidy_metrics")
    files += _write_table(records.runs, tables, "runs")
    files += _write_table(records.profiles, tables, "layer_profiles")
    files += _write_table(final, tables, "final_values")
    files += _write_table(build_fit_table(analysis.curves), tables, "fits")
    files += _write_table(build_difference_table(analysis.differences, analysis.control_arm), tables, "paired_differences")
    files += _write_table(build_difference_trend_table(analysis.difference_trends), tables, "difference_trends")
    files += _write_table(build_multiplier_table(analysis.multipliers), tables, "multipliers")
    files += _write_table(build_lambda_table(analysis.best_lambdas), tables, "best_lambda")
    files += _write_table(build_claims_table(analysis.claims), tables, "claims")
    if analysis.time_account is not None and not analysis.time_account.empty:
        files += _write_table(analysis.time_account.runs, tables, "time_split")
    if analysis.downstream is not None and analysis.downstream.evaluated:
        files += _write_table(analysis.downstream.table, tables, "accuracy")
        files += _write_table(analysis.downstream.values, tables, "accuracy_by_run")
        files += _write_table(build_choice_table(analysis.downstream.choices, records.runs), tables, "checkpoints")
    if analysis.observation_trends is not None:
        files += _write_table(analysis.observation_trends, tables, "observation_trends")
        observe = final.filter(pl.col("kind") == names.KIND_OBSERVE)
        files += _write_table(build_observation_table(observe), tables, "observation_models")
    files += _write_table(analysis.paper_comparison, tables, "observation_vs_paper")
    figures = _write_plots(records, analysis, final, out)
    files += figures
    provenance = out / "provenance.json"
    provenance.write_text(json.dumps(analysis.provenance, indent=2, default=str) + "\n")
    markdown = render_markdown(analysis, figures, out) + "\n"
    report = out / "report.md"
    report.write_text(markdown)
    page = out / "report.html"
    page.write_text(render_html(markdown, out, title=f"analysis of {analysis.study}"))
    return files + [provenance, report, page]


def claim_lines(claims) -> list[str]:
    """One console line per claim: verdict, estimate with interval (4 significant digits), Holm p."""
    lines = []
    for c in claims:
        est = c.estimate
        if est.has_bounds:
            value = f"{significant(est.estimate)} [{significant(est.low)}, {significant(est.high)}]"
        elif math.isfinite(est.estimate):
            value = f"{significant(est.estimate)} (no interval: {est.why})" if est.why else significant(est.estimate)
        else:
            value = ""
        p = f", Holm p {c.p_adjusted:.2g}" if math.isfinite(c.p_adjusted) else ""
        if c.effect_size is not None and math.isfinite(c.effect_size.estimate):
            p += f", mean cosine rises {significant(c.effect_size.estimate)} with depth"
        why = f" ({c.note})" if c.verdict in ("not tested", "not testable") and c.note else ""
        lines.append(f"claim ({c.key}) {c.verdict.upper()}: {c.claim}{': ' + value if value else ''}{p}{why}"[:300])
    return lines


def check_arguments(args: argparse.Namespace) -> None:
    """Numbers the fit can use, refused before any reading or writing (a NaN Huber delta would make every power
    law "not supported"; a negative seed fails numpy once the cache is written)."""
    if not 0 <= args.bootstrap <= 100_000:
        raise ConfigError(f"--bootstrap {args.bootstrap}: must be in 0..100000 (0 = no intervals); use e.g. 400")
    if not 0 <= args.seed <= 2**32 - 1:
        raise ConfigError(f"--seed {args.seed}: must be in 0..{2**32 - 1} (numpy seeds the bootstrap with it)")
    if not (math.isfinite(args.huber_delta) and args.huber_delta > 0):
        raise ConfigError(f"--huber-delta {args.huber_delta}: must be a finite number > 0; use e.g. 1e-2")
    if not (math.isfinite(args.confidence) and 0 < args.confidence < 1):
        raise ConfigError(f"--confidence {args.confidence}: must be in (0, 1); use e.g. 0.95")


def run(args: argparse.Namespace) -> Path:
    """The main path: read -> analyse -> write -> log. Returns the output directory."""
    check_arguments(args)
    options = FitOptions(n_bootstrap=args.bootstrap, confidence=args.confidence, huber_delta=args.huber_delta, seed=args.seed)
    smallest_effects = parse_smallest_effects(args.smallest_effect)
    uri = resolve_tracking_uri(args.tracking_uri)
    study = load.find_study_name(uri, args.study)
    out = args.out if args.out is not None else Path("outputs") / "analysis" / study
    check_writable_dir(out, "--out")  # before reading every run's history
    records = load.read_study(uri, study, cache_dir=None if args.no_cache else out / "cache")
    analysis = analyse_study(records, metrics=list(dict.fromkeys(args.metrics)), size_column=SIZE_COLUMNS[args.size], control_arm=args.control_arm,
                             options=options, smallest_effects=smallest_effects)
    fit_options = {
        "bootstrap": options.n_bootstrap,
        "confidence": options.confidence,
        "huber_delta": options.huber_delta,
        "alpha_bounds": list(options.alpha_bounds),
        "seed": options.seed,
        "size": args.size,
        "metrics": list(args.metrics),
        "control_arm": args.control_arm,
        "smallest_effects": json.dumps(smallest_effects, sort_keys=True),
    }
    provenance = {
        "study": records.study,
        "experiment_id": records.experiment_id,
        "tracking_uri": uri,
        "git_commit": git_commit(Path.cwd()),
        "fit_options": fit_options,
        "input_run_ids": records.finished(kind=None)["run_id"].to_list(),
        "failed_run_ids": records.failed()["run_id"].to_list(),
        "study_run_id": records.parent_run_id,
    }
    analysis = dataclasses.replace(analysis, provenance=provenance)
    files = write_outputs(records, analysis, out)
    for note in analysis.notes:
        print(f"note: {note}", file=sys.stderr)
    if analysis.course:  # a deciding study: its verdicts are the course's (the claims below ignore the looks)
        last = analysis.course[-1]
        print(f"decided in {last.wave} wave(s), {last.runs} of at most {last.max_runs} runs: "
              + "; ".join(f"({c.key}) {c.state}" for c in last.claims) + (f"; stopped: {last.stop}" if last.stop else ""))
    for line in claim_lines(analysis.claims):
        print(line)
    if not args.no_log:
        run_id = load.log_analysis_run(
            records,
            out,
            files,
            params={f"analysis.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in fit_options.items()},
            tags={names.TAG_GIT_COMMIT: provenance["git_commit"],
                  names.TAG_INPUT_RUNS: str(len(provenance["input_run_ids"]))},
            claims=[(c.key, c.estimate.estimate, c.estimate.low, c.estimate.high, c.verdict) for c in analysis.claims],
        )
        print(f"logged analysis run {run_id} in experiment {records.study!r}: "
              f"{ui_link(uri, run_page(records.experiment_id, run_id))}")
    print(f"report: {out / 'report.html'} (also report.md; {len(files)} files in {out})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        quiet_libraries()
        run(args)
        return 0

    return run_cli(body, "analysis.scaling_curves")


if __name__ == "__main__":
    sys.exit(main())
