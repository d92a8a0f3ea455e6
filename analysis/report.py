"""Turn analysis results into tables (Polars), a markdown report and its self-contained
HTML twin. No fitting, no I/O beyond reading the figures it embeds."""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from analysis.downstream import (
    DELTA_MEAN_ACC,
    MEAN_ACC,
    RULE_LAST,
    RULE_SELECTION_ACC,
    RULE_VAL_LOSS,
    SELECTION_LABELS,
    SELECTION_MEAN_ACC,
    TEST,
    DownstreamAccuracy,
    table_columns,
)
from analysis.claims import CONTRADICTED, NO_EFFECT, NOT_TESTABLE, NOT_TESTED, SUPPORTED, ClaimCheck
from analysis.effects import EVAL_MEAN_ACC, BestLambda, DifferenceTrend, Multiplier, RungDifference
from analysis.fit import CurveResult, FitOptions, Interval, Trend
from analysis.goodput import BAR_PHASES, TimeAccount, study_totals
from scaling import names, timing
from scaling.console import format_count


MIN_RUNGS_FOR_LAW = FitOptions.min_rungs
FEW_LAYERS = 8
"""With this many hidden states or fewer, Spearman/Kendall over layers take few values and saturate."""


@dataclass(frozen=True)
class StudyBudget:
    """What a study's training runs rest on: the report states it before any claim."""

    rungs: tuple[tuple[str, float], ...]
    """(rung, N) of the rungs with finished training runs, small to large."""
    arms: tuple[str, ...]
    seeds: tuple[int, int]
    """Fewest and most finished seeds of any (rung, arm)."""
    tokens: tuple[int, int] | None
    """Fewest and most training tokens of a run (None when not recorded)."""
    steps: tuple[int, int] | None
    tokens_per_param: tuple[float, float] | None
    probe_steps: tuple[int, ...]
    """Steps at which the condensation probe ran (any run)."""
    hidden_states: tuple[int, int] | None
    """Fewest and most hidden states (layers + embedding output) in a final profile."""
    caveats: tuple[str, ...]
    val_loss_se: tuple[float, float] | None = None
    """Smallest and largest standard error of a run's final val/loss over its validation blocks."""


def _span(values: list) -> tuple | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return (min(values), max(values)) if values else None


def compute_budget(train_runs: pl.DataFrame, metrics: pl.DataFrame, profiles: pl.DataFrame, *, size_column: str = "n_params",
                   saturated: tuple[str, ...] = (), pretrained: str | None = None) -> StudyBudget:
    """The budget of finished training runs and the caveats it implies for the claims
    (`saturated`: rank-correlation metrics found pinned at +-1; `pretrained`: what the runs
    started from, when not from random weights)."""
    runs = train_runs.with_columns(pl.col(size_column).cast(pl.Float64).alias("n"))
    rungs = tuple((str(r), float(n) if n is not None else math.nan) for r, n in runs.select("rung", "n").unique().sort("n").iter_rows())
    arms = tuple(sorted(runs["arm"].drop_nulls().unique().to_list()))
    per_cell = runs.group_by("rung", "arm").agg(pl.col("seed").n_unique().alias("k"))["k"].to_list()
    seeds = (min(per_cell), max(per_cell)) if per_cell else (0, 0)
    tokens = _span(runs["tokens"].to_list())
    steps = _span(runs["steps"].to_list()) if "steps" in runs.columns else None
    ratio = _span((runs["tokens"].cast(pl.Float64) / runs["n"]).to_list()) if runs.height else None
    ids = runs["run_id"].implode()
    probed = metrics.filter(pl.col("run_id").is_in(ids) & (pl.col("metric") == names.COND_SPEARMAN))
    probe_steps = tuple(sorted(probed["step"].unique().to_list()))
    depth = profiles.filter(pl.col("run_id").is_in(ids)).group_by("run_id").len()["len"].to_list()
    hidden = _span(depth)
    caveats = []
    if len(rungs) < 2:
        caveats.append(f"{len(rungs)} rung: no claim about model size (d, e) can be tested; add rungs")
    elif len(rungs) < MIN_RUNGS_FOR_LAW:
        caveats.append(f"{len(rungs)} rungs: no power law is fitted (a 3-parameter law needs >= {MIN_RUNGS_FOR_LAW}); "
                       f"size claims (d, e) rest on a {len(rungs)}-point trend")
    if seeds[0] < 3:
        caveats.append(f"{seeds[0]} seed{'s' if seeds[0] != 1 else ''} for some (rung, arm): per-rung differences are shown as their pairs, "
                       "without an interval (one needs >= 3 seeds); pooled claims rest on the rung means")
    if saturated:
        depth = f" over {hidden[0]} hidden states" if hidden is not None and hidden[0] <= FEW_LAYERS else ""
        caveats.append(f"{' and '.join(m.removeprefix('condensation/') for m in saturated)} saturated at ±1{depth}: "
                       "a rank correlation over so few layers cannot separate arms or sizes; read the mean cosines")
    if pretrained:
        caveats.append(f"the runs start from pretrained weights ({pretrained}): claim (a), about random initialisation, is not tested")
    elif ratio is not None and ratio[1] < 1.0:
        caveats.append(f"{ratio[1]:.2g} training tokens per parameter at most (compute-optimal is ~20): the models are far "
                       "from trained, so final-state claims describe early training")
    if probe_steps and probe_steps[0] != 0 and not pretrained:
        caveats.append(f"no step-0 probe recorded (first probe at step {probe_steps[0]}): claim (a) is not tested")
    se = metrics.filter(pl.col("run_id").is_in(ids) & (pl.col("metric") == names.VAL_LOSS_SE)).sort("step").group_by("run_id").agg(pl.col("value").last())
    return StudyBudget(rungs, arms, seeds, tokens, steps, ratio, probe_steps, hidden, tuple(caveats), _span(se["value"].to_list()))


@dataclass(frozen=True)
class StudyAnalysis:
    """Everything the analysis computed for one study, ready to be written."""

    study: str
    size_column: str
    treatment_arms: tuple[str, ...]
    control_arm: str
    curves: dict[tuple[str, str], CurveResult]
    """(metric, arm) -> result."""
    differences: dict[tuple[str, str], list[RungDifference]]
    """(metric, treatment arm) -> per-rung differences."""
    difference_trends: dict[tuple[str, str], DifferenceTrend]
    multipliers: dict[str, list[Multiplier]]
    """treatment arm -> per-rung effective-parameter multipliers (validation loss)."""
    best_lambdas: tuple[BestLambda, ...]
    """Sweeps: the best lambda per rung as found (no fitted rule)."""
    observation_trends: pl.DataFrame | None
    runs_summary: pl.DataFrame
    failed_runs: pl.DataFrame
    notes: tuple[str, ...]
    options: FitOptions
    provenance: dict = field(default_factory=dict)
    paper_comparison: pl.DataFrame = field(default_factory=pl.DataFrame)
    """Observation studies holding the paper's models: measured vs published Spearman (wikitext)."""
    claims: tuple[ClaimCheck, ...] = ()
    """The paper's claims tested on this study's training runs (empty for observation studies)."""
    budget: StudyBudget | None = None
    saturated: tuple[str, ...] = ()
    """Rank-correlation metrics at +-1 in every finished training run (left out of difference plots)."""
    downstream: DownstreamAccuracy | None = None
    """Downstream accuracy at the chosen checkpoints (None: no finished training run)."""
    observation_accuracy: pl.DataFrame = field(default_factory=pl.DataFrame)
    """Observation studies whose models were evaluated: accuracy next to Spearman per model."""
    item_differences: tuple = ()
    """(treatment arm, rung, N, `analysis.downstream.PairedDifference`): accuracy differences with an
    items x seeds interval, from per-item results (empty when the runs logged none)."""
    time_account: TimeAccount | None = None
    """Where the runs' worker-slot seconds went (`analysis.goodput`; None or empty before time accounting)."""
    course: tuple = ()
    """A deciding study's looks (`analysis.waves.WaveRecord`, in wave order; empty: an ordinary study)."""


def _ci_columns(prefix: str, interval: Interval | None) -> dict[str, float]:
    if interval is None:
        return {prefix: math.nan, f"{prefix}_low": math.nan, f"{prefix}_high": math.nan}
    return {prefix: interval.estimate, f"{prefix}_low": interval.low, f"{prefix}_high": interval.high}


def _trend_columns(trend: Trend | None) -> dict[str, float]:
    return _ci_columns("trend_spearman", trend.spearman if trend else None)


def build_fit_table(curves: dict[tuple[str, str], CurveResult]) -> pl.DataFrame:
    """One row per (metric, arm): power-law parameters with CIs, trend, holdout check."""
    rows = []
    for (metric, arm), result in curves.items():
        fit = result.fit
        row = {"metric": metric, "arm": arm, "power_law": result.supported, "reason": result.reason}
        row.update(_ci_columns("a", fit.a if fit else None))
        row.update(_ci_columns("alpha", fit.alpha if fit else None))
        row.update(_ci_columns("c", fit.offset if fit else None))
        row.update({"n_ref": fit.law.n_ref if fit else math.nan, "scale_at_n_ref": fit.law.scale if fit else math.nan})
        row.update({"bootstrap": fit.bootstrap if fit else "", "n_points": fit.n_points if fit else (result.trend.n_points if result.trend else 0)})
        row.update(_trend_columns(result.trend))
        h = result.holdout
        row.update(
            {
                "holdout_n": h.n_heldout if h else math.nan,
                "holdout_observed": h.observed if h else math.nan,
                "holdout_predicted": h.predicted if h else math.nan,
                "holdout_relative_error": h.relative_error if h else math.nan,
                "holdout_pi_low": h.prediction_low if h else math.nan,
                "holdout_pi_high": h.prediction_high if h else math.nan,
                "holdout_inside": h.inside if h else None,
            }
        )
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def build_difference_table(differences: dict[tuple[str, str], list[RungDifference]], control: str) -> pl.DataFrame:
    rows = [
        {"metric": metric, "treatment": arm, "control": control, "rung": d.rung, "n": d.n, "n_pairs": d.n_pairs, **_ci_columns("difference", d.difference),
         "pair_sd": d.spread, "pairs": ", ".join(f"{v:+.4g}" for v in d.pairs)}
        for (metric, arm), diffs in differences.items()
        for d in diffs
    ]
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def build_difference_trend_table(trends: dict[tuple[str, str], DifferenceTrend]) -> pl.DataFrame:
    rows = [
        {"metric": metric, "treatment": arm, **_ci_columns("slope_per_decade", t.slope_per_decade), "note": t.note}
        for (metric, arm), t in trends.items()
    ]
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def build_multiplier_table(multipliers: dict[str, list[Multiplier]]) -> pl.DataFrame:
    rows = [
        {"treatment": arm, "rung": m.rung, "n": m.n, "treatment_value": m.treatment_value, **_ci_columns("multiplier", m.multiplier), "note": m.note}
        for arm, items in multipliers.items()
        for m in items
    ]
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def build_lambda_table(best: tuple[BestLambda, ...]) -> pl.DataFrame:
    if not best:
        return pl.DataFrame()
    return pl.DataFrame([{"rung": b.rung, "n": b.n, "best_lambda": b.best_lambda, "val_loss": b.val_loss, "lambda_tried_low": b.tried[0],
                          "lambda_tried_high": b.tried[1], "at_search_bound": b.at_bound} for b in best], infer_schema_length=None)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _fmt_ci(interval: Interval | None, digits: int = 3, *, percent: bool = False, signed: bool = False) -> str:
    """'est [low, high]', or 'est (no CI: why)': an estimate without bounds always says why."""
    if interval is None:
        return "–"
    if percent:
        fmt = lambda v: "–" if math.isnan(v) else f"{v:+.{max(1, digits - 1)}%}"  # noqa: E731
    elif signed:
        fmt = lambda v: _fmt(v, digits) if math.isnan(v) or math.isinf(v) else f"{v:+.{digits}g}"  # noqa: E731
    else:
        fmt = lambda v: _fmt(v, digits)  # noqa: E731
    if not interval.has_bounds:
        return f"{fmt(interval.estimate)} (no CI: {interval.why or 'no bootstrap'})"
    return f"{fmt(interval.estimate)} [{fmt(interval.low)}, {fmt(interval.high)}]"


def _claim_n(check: ClaimCheck) -> str:
    if not check.n_units:
        return "–"
    if check.unit == "initial states":
        return f"{check.n_units} initial states"
    return f"{check.n_units} {check.unit}, {check.n_rungs} rung{'s' if check.n_rungs != 1 else ''}, {check.seeds_per_rung} seed{'s' if check.seeds_per_rung != 1 else ''}/rung"


def build_claims_table(claims: tuple[ClaimCheck, ...]) -> pl.DataFrame:
    """`tables/claims.csv`: one row per claim; the verdict reads the Holm-adjusted p-values."""
    rows = []
    for c in claims:
        row = {"key": c.key, "claim": c.claim, "metric": c.metric, "estimate": c.estimate.estimate, "ci_low": c.estimate.low,
               "ci_high": c.estimate.high, "verdict": c.verdict, "p_value": c.p_value, "p_holm": c.p_adjusted,
               "p_no_effect": c.p_equivalence, "p_no_effect_holm": c.p_equivalence_adjusted,
               "smallest_effect": math.nan if c.smallest_effect is None else c.smallest_effect, "mde": c.mde, "n": _claim_n(c),
               "n_units": c.n_units, "unit": c.unit, "n_rungs": c.n_rungs, "seeds_per_rung": c.seeds_per_rung, "method": c.method,
               "statistic": c.statistic, "rule": c.rule, "paper": c.paper, "contradicts_paper": c.contradicts_paper, "note": c.note}
        row.update(_ci_columns("effect_size", c.effect_size))
        rows.append(row)
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines + [""]


_KEY_FIGURES = ("claim_", "difference_", "profile_over_training")
"""Figure stems shown right under the claims, in this order; the rest go under 'More figures'."""


def _budget_lines(budget: StudyBudget) -> list[str]:
    def span(pair, fmt=str) -> str:
        return "not recorded" if pair is None else (fmt(pair[0]) if pair[0] == pair[1] else f"{fmt(pair[0])}–{fmt(pair[1])}")

    rungs = ", ".join(f"{r} (N={format_count(n)})" for r, n in budget.rungs) or "none"
    lines = ["## What this rests on", ""]
    lines += [
        f"- **Rungs**: {len(budget.rungs)} — {rungs}",
        f"- **Arms**: {', '.join(budget.arms) or 'none'}; **seeds** per (rung, arm): {span(budget.seeds)}",
        f"- **Training per run**: {span(budget.steps)} steps, {span(budget.tokens, lambda v: format_count(float(v)))} tokens "
        f"({span(budget.tokens_per_param, lambda v: f'{v:.2g}')} tokens per parameter)",
        f"- **Condensation probes** at steps {', '.join(str(s) for s in budget.probe_steps) or 'none'}; "
        f"{span(budget.hidden_states)} hidden states per run (layers + embedding output)",
        "- **Validation loss**: " + ("over each run's validation blocks; its standard error over the blocks "
                                     f"{span(budget.val_loss_se, lambda v: f'{v:.2g}')} per run (`val/loss_se`)"
                                     if budget.val_loss_se is not None else "no standard error logged (`val/loss_se`)"),
        "",
    ]
    if budget.caveats:
        lines += ["**Caveats — too small to support some claims:**", ""] + [f"- {c}" for c in budget.caveats] + [""]
    return lines


def figure_caption(stem: str, analysis: StudyAnalysis) -> str:
    """What a figure shows, in words, with the seeds behind it (the file name stays in the link)."""
    seeds = analysis.budget.seeds if analysis.budget is not None else None
    per = "" if seeds is None else f" ({seeds[0]}{'' if seeds[0] == seeds[1] else '–' + str(seeds[1])} seed{'s' if seeds[1] != 1 else ''} per rung and arm)"
    for check in analysis.claims:
        if stem == claim_figure_name(check.key):
            return f"Claim ({check.key}): {check.claim}. {_claim_n(check)}; {check.verdict}. File {stem}.png"
    fixed = {
        "profile_over_training": f"Per-layer mean cosine at every probe step, per rung (rows) and arm (columns); dashed = step 0{per}",
        "condensation_heatmaps": f"Final density of pairwise token cosine per layer, per rung and arm, mean over seeds{per}",
        "layer_profiles": f"Final per-layer mean cosine per rung and arm{per}",
        "accuracy_vs_n": f"Downstream accuracy vs N at the validation-selected checkpoint, with step 0 and the paper's test-selected choice{per}",
    }
    if stem in fixed:
        return fixed[stem]
    for prefix, text in (("heatmaps_over_training_", "Density of pairwise token cosine per layer at every probe step, rung {}"),
                         ("accuracy_difference_", "Mean downstream accuracy, {} − baseline, per seed pair and rung"),
                         ("difference_", "Paired differences, {} − baseline, per seed pair and rung, with the slope per decade of N"),
                         ("curve_", "{} vs N: every run, rung means and the power law with its band where one is supported")):
        if stem.startswith(prefix):
            return text.format(stem.removeprefix(prefix)) + (per if prefix != "heatmaps_over_training_" else "")
    return stem


def _fmt_p(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "–"
    return "< 1e-4" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.2f}"


def claim_figure_name(key: str) -> str:
    """File stem of a claim's figure (`plots/claim_<key>.png`)."""
    return f"claim_{key.replace('-', '_')}"


def _claim_estimate(c: ClaimCheck) -> str:
    if c.verdict == NOT_TESTED or (c.verdict == NOT_TESTABLE and not c.n_units):
        return "–"
    text = _fmt_ci(c.estimate, percent=c.key == "c", signed=True)
    if c.effect_size is not None:
        text += f"; mean cosine rises by {_fmt_ci(c.effect_size, signed=True)} from the embedding output to the last hidden state"
    return text


def _claim_effects(c: ClaimCheck) -> str:
    fmt = (lambda v: f"{v:.2%}") if c.key == "c" else (lambda v: f"{v:.3g}")  # noqa: E731
    parts = []
    if c.smallest_effect is not None:
        parts.append(f"δ {fmt(c.smallest_effect)}")
    if math.isfinite(c.mde):
        parts.append(f"MDE {fmt(c.mde)}")
    return "; ".join(parts) or "–"


def _claims_lines(analysis: StudyAnalysis, plots: list[Path], out_dir: Path) -> list[str]:
    level = f"{analysis.options.confidence:.0%}"
    alpha = 1.0 - analysis.options.confidence
    tested = [c for c in analysis.claims if math.isfinite(c.p_adjusted)]
    lines = ["## Paper claims", "",
             f"Each claim of arXiv 2602.00217 that a training study can test, as a hypothesis test on independent units: seed pairs "
             "(paired arms share seed, data order and initial weights), distinct initial states for (a). Pooled effects and slopes "
             "are computed on the rung means, so rung-to-rung variation counts as well as seed-to-seed noise. Verdicts read p-values "
             f"adjusted by Holm's step-down across the {len(tested)} claims tested here (family-wise error <= {alpha:.0%}): "
             "**supported** when the effect lies significantly on the claimed side, **contradicted** when on the other, "
             "**no effect** when two one-sided tests put it within ± δ (the smallest effect of interest), *inconclusive* otherwise; "
             "*not tested* when the study did not record what the claim needs or its design does not test it, *not testable* when "
             f"its units replicate nothing or the statistic is saturated. Intervals: {level}, before the multiplicity adjustment, "
             "clipped to what the statistic can take. MDE: the effect these units detect 80% of the time (unadjusted). The error "
             "rates of these rules are measured by `bench/bench_calibration.py` (docs/statistics.md). Table: `tables/claims.csv`.", ""]
    figures = {p.stem: p for p in plots}
    rows = []
    for c in analysis.claims:
        verdict = f"**{c.verdict}**" if c.verdict in (SUPPORTED, CONTRADICTED, NO_EFFECT) else f"*{c.verdict}*"
        figure = figures.get(claim_figure_name(c.key))
        link = f"[figure]({figure.relative_to(out_dir).as_posix()})" if figure is not None else "–"
        rows.append([f"({c.key}) {c.claim}", c.statistic, _claim_estimate(c), _fmt_p(c.p_adjusted), _claim_effects(c), _claim_n(c),
                     verdict, link, c.paper])
    lines += _markdown_table(["claim", "statistic", f"estimate [{level} CI]", "p (Holm)", "δ; MDE", "n", "verdict", "figure", "the paper"], rows)
    against = [c for c in analysis.claims if c.contradicts_paper]
    for c in against:
        how = "lies on the other side" if c.verdict == CONTRADICTED else f"is within ± {c.smallest_effect:g} of no effect"
        lines.append(f"- **Contradicts the paper — ({c.key})**: the paper says \"{c.paper}\"; this study's estimate "
                     f"{_fmt_ci(c.estimate, percent=c.key == 'c', signed=True)} {how} (Holm p = {_fmt_p(c.p_adjusted if c.verdict == CONTRADICTED else c.p_equivalence_adjusted)}).")
    if not against:
        lines += ["- No verdict contradicts the paper." if tested else "- No claim could be tested."]
    lines += [f"- ({c.key}) {c.method}{': ' if c.method and c.note else ''}{c.note}" for c in analysis.claims if c.note or c.method]
    lines += ["", "Verdict rules:", ""] + [f"- ({c.key}) {c.rule}" for c in analysis.claims] + [""]
    return lines


def _course_lines(course: tuple) -> list[str]:
    """A deciding study's course: its waves, what each decided, the final states with their repeated intervals,
    what was spent against the budget and, for claims left open, what a fixed design would need."""
    last = course[-1]
    spending = last.spending.replace("_", "-")
    lines = ["## How the study decided (waves)", "",
             f"This study stated its claims and a budget (`decide:`): it trained a first wave, tested the stated claims on what "
             f"was recorded, and added seeds only while a claim was open and more seeds could still decide it. Each look k tests "
             f"at its own share alpha_k of alpha = {last.alpha_total:g} ({spending} alpha spending over the {last.planned_looks} "
             "planned looks; Holm across the stated claims within a look, the 'no effect' tests spent the same way), and a "
             "union bound over looks keeps the chance of any wrong verdict at or below alpha however the looks are correlated "
             "and wherever the study stopped (docs/statistics.md). A verdict's interval is the look's repeated confidence "
             "interval (level 1 - alpha_k).", "",
             f"Spent: {last.runs} of at most {last.max_runs} runs, {last.wave} of at most {last.planned_looks} waves, alpha "
             f"{last.spent:.3g} of {last.alpha_total:g}. Stopped: {last.stop or 'not yet (the study is still running)'}.", ""]
    rows, previous = [], ()
    for record in course:
        added = [s for s in record.seeds if s not in previous]
        decided = [f"({c.key}) {c.state}" for c in record.claims if c.decided_at == record.wave]
        then = f"add seeds {list(record.added)}" if record.added else f"stop: {record.stop}"
        rows.append([str(record.wave), ", ".join(str(s) for s in added), str(record.runs), f"{record.alpha:.3g}",
                     ", ".join(decided) or "–", then])
        previous = record.seeds
    lines += _markdown_table(["wave", "seeds added", "runs (total)", "alpha at this look", "decided here", "then"], rows)
    lines += [""]
    rows = []
    for c in last.claims:
        interval = (f"{_fmt(c.estimate)} [{_fmt(c.low)}, {_fmt(c.high)}]" if math.isfinite(c.low) and math.isfinite(c.high)
                    else _fmt(c.estimate) if math.isfinite(c.estimate) else "–")
        state = f"**{c.state}**" if c.state in (SUPPORTED, CONTRADICTED, NO_EFFECT) else f"*{c.state}*"
        fixed = str(c.fixed_seeds) if c.fixed_seeds is not None else ("more rungs needed" if c.state == "more rungs needed" else "–")
        rows.append([f"({c.key})", state, str(c.decided_at or "–"), interval, _fmt_p(c.p_adjusted), fixed, c.why])
    lines += _markdown_table(["claim", "state", "decided at wave", "estimate [repeated CI]", "p (Holm, at the look)",
                              "seeds per rung a fixed design needs", "why"], rows)
    lines += ["", "The *Paper claims* table below tests every recorded run once at the report's level, as if no look had "
              "been taken: after a sequential course it describes, the verdicts of this study are the ones above.", ""]
    return lines


_ACCURACY_FIGURES = ("accuracy_vs_n", "accuracy_difference_")
"""Figure stems shown in the downstream section."""


def _mean_std(row: dict, column: str, *, signed: bool = False, general: bool = False) -> str:
    """'mean ± std' over seeds (accuracies to 3 decimals; `general`: 4 significant digits, for
    perplexities); '(n=k)' when fewer seeds than the row has gave a value."""
    mean, std, n = row.get(column), row.get(f"{column}_std"), row.get(f"{column}_n") or 0
    if not n or mean is None or math.isnan(mean):
        return "–"
    value = f"{mean:+.3f}" if signed else (f"{mean:.4g}" if general else f"{mean:.3f}")
    if std is not None and not math.isnan(std):
        value += f" ± {std:.2g}" if general else f" ± {std:.3f}"
    return value + (f" (n={n})" if n != row["seeds"] else "")


def _rule_counts(downstream: DownstreamAccuracy) -> str:
    counts: dict[str, int] = {}
    for choice in downstream.choices:
        counts[choice.rule] = counts.get(choice.rule, 0) + 1
    return ", ".join(f"`{rule}` in {k} run{'s' if k != 1 else ''}" for rule, k in counts.items())


def _chance_line(downstream: DownstreamAccuracy) -> str:
    """The mean accuracy a uniform guess would score on the same documents (logged by the trainer
    for multiple-choice tasks scored by their likeliest choice)."""
    chance = downstream.values.filter((pl.col("metric") == names.EVAL_CHANCE_MEAN_ACC) & pl.col("value").is_finite())["value"]
    if chance.len() == 0:
        return ("Chance level of the mean accuracy: not logged (a task of the mean failed, or is not scored by picking the "
                "likeliest of its choices, e.g. lambada's open answers or truthfulqa_mc2's probability mass).\n")
    return f"**Chance level** of the mean accuracy (a uniform guess over each document's choices): **{chance.mean():.3f}**.\n"


def _downstream_lines(analysis: StudyAnalysis, figures: list[Path], out_dir: Path) -> list[str]:
    lines = ["## Downstream accuracy", ""]
    downstream = analysis.downstream
    if downstream is None or not downstream.evaluated:
        return lines + ["The study evaluated no downstream tasks (no finished training run logged an `eval/<task>/<metric>`): "
                        "add an `eval:` section to the study to measure accuracy; claim (f) is then tested.", ""]
    tasks, table = downstream.tasks, downstream.table
    selection = (f"`{RULE_SELECTION_ACC}` (validation-split tasks: {', '.join(tasks.selection)}; {tasks.source})"
                 if tasks.selection else f"`{RULE_SELECTION_ACC}` (validation-split tasks; this study has none)")
    steps = sorted({s for c in downstream.choices for s in c.eval_steps})
    lines += [
        "**Selection without peeking.** Each run's checkpoint is chosen on validation data only: the evaluation with the highest "
        f"{selection} when the run logged it, else the lowest `{RULE_VAL_LOSS}` at the nearest probe step at or before each "
        f"evaluation, else ({RULE_LAST}) the run's last evaluation; ties go to the evaluation nearest its probe, then the later step; step 0 is never a candidate (it is "
        f"the initial row). Used here: {_rule_counts(downstream)}. The paper's choice, the evaluation with the best mean accuracy on "
        f"the test tasks themselves, is shown next to it as *{SELECTION_LABELS[TEST]}*: a maximum over noisy test scores is biased upward "
        "(like the authors' per-seed maximum it includes step 0, so in a mid-training study it can be the pretrained model).",
        "",
        _chance_line(downstream),
        f"Evaluations at steps {', '.join(map(str, steps))}. Cells: mean ± sample standard deviation over seeds (n = seeds in the row, "
        "marked where fewer gave a value); Δ = the arm's mean accuracy minus step 0's, paired by seed; word perplexity is never "
        "averaged with the accuracies. Tables: `tables/accuracy.csv` "
        "(every rung, both selections), `tables/checkpoints.csv` (each run's rule and steps), `tables/accuracy_by_run.csv`.",
        "",
    ]
    test_columns, _, perplexity = table_columns(tasks)
    rungs = table.select("rung", "n").unique().sort("n")
    rung, n = rungs.row(rungs.height - 1)
    label = "Largest rung" if rungs.height > 1 else "Rung"
    has_initial = table.filter(pl.col("row") == "initial").height > 0
    header = (["row", "n", "steps"] + [c.removesuffix("/acc") for c in test_columns[:-1]] + ["**mean acc**"] + (["Δ mean vs step 0"] if has_initial else [])
              + ([f"{SELECTION_MEAN_ACC} (validation)"] if tasks.selection else [])
              + [f"mean acc, {SELECTION_LABELS[TEST]}"] + [f"{c.replace('/word_perplexity', ' word perplexity')} (not in the mean)" for c in perplexity])
    rows = []
    cell = table.filter(pl.col("rung") == rung)
    test_means = {r["row"]: r for r in cell.filter(pl.col("selection") == SELECTION_LABELS[TEST]).iter_rows(named=True)}
    for row in cell.filter(pl.col("selection") != SELECTION_LABELS[TEST]).iter_rows(named=True):
        initial = row["row"] == "initial"
        paper = test_means.get(row["row"])
        rows.append([SELECTION_LABELS["initial"] if initial else row["row"], str(row["seeds"]), row["steps"]]
                    + [_mean_std(row, c) for c in test_columns[:-1]] + [f"**{_mean_std(row, MEAN_ACC)}**"]
                    + (["–" if initial else _mean_std(row, DELTA_MEAN_ACC, signed=True)] if has_initial else [])
                    + ([_mean_std(row, SELECTION_MEAN_ACC)] if tasks.selection else [])
                    + ["–" if paper is None else _mean_std(paper, MEAN_ACC)] + [_mean_std(row, c, general=True) for c in perplexity])
    lines += [f"### {label}: {rung} (N={format_count(n)}), validation-selected", ""] + _markdown_table(header, rows)
    if rungs.height > 1:
        lines += ["### Mean accuracy per rung", ""]
        rows = []
        for row in table.iter_rows(named=True):
            if row["selection"] == SELECTION_LABELS[TEST]:
                continue
            paper = table.filter((pl.col("rung") == row["rung"]) & (pl.col("row") == row["row"]) & (pl.col("selection") == SELECTION_LABELS[TEST]))
            rows.append([row["rung"], format_count(row["n"]), row["row"], row["steps"], _mean_std(row, MEAN_ACC)]
                        + (["–" if row["row"] == "initial" else _mean_std(row, DELTA_MEAN_ACC, signed=True)] if has_initial else [])
                        + [_mean_std(paper.row(0, named=True), MEAN_ACC) if paper.height else "–"])
        lines += _markdown_table(["rung", "N", "row", "steps", "mean acc (validation-selected)"] + (["Δ vs step 0"] if has_initial else [])
                                 + [f"mean acc, {SELECTION_LABELS[TEST]}"], rows)
    level = f"{analysis.options.confidence:.0%}"
    diffs = [(arm, d) for (metric, arm), items in analysis.differences.items() if metric == EVAL_MEAN_ACC for d in items]
    if diffs:
        lines += [f"### Mean accuracy, treatment − {analysis.control_arm} (validation-selected, paired by rung and seed)", ""]
        lines += _markdown_table(["treatment", "rung", "N", "pairs", f"difference [{level} CI]"],
                                 [[arm, d.rung, format_count(d.n), str(d.n_pairs), _fmt_ci(d.difference, signed=True)] for arm, d in diffs])
        for (metric, arm), trend in analysis.difference_trends.items():
            if metric == EVAL_MEAN_ACC:
                lines += [f"- {arm}: slope of the difference per decade of N {_fmt_ci(trend.slope_per_decade, signed=True)}. {trend.note}".rstrip(), ""]
        lines += ["Claim (f) in *Paper claims* pools these pairs.", ""]
    if analysis.item_differences:
        lines += [f"### Mean accuracy, treatment − {analysis.control_arm}, with document-level uncertainty", "",
                  "The same validation-selected difference, its interval from a bootstrap that resamples the documents of each task "
                  "and the seeds (both are samples): how much of the difference a different draw of test items could move.", ""]
        lines += _markdown_table(["treatment", "rung", "seeds", "test documents", f"difference [{level} CI, items × seeds]"],
                                 [[arm, rung, str(d.seeds), str(d.items), _fmt_ci(d, signed=True)]
                                  for arm, rung, _, d in analysis.item_differences])
    for p in figures:
        if any(p.stem == stem or (stem.endswith("_") and p.stem.startswith(stem)) for stem in _ACCURACY_FIGURES):
            lines += [f"![{figure_caption(p.stem, analysis)}]({p.relative_to(out_dir).as_posix()})", ""]
    return lines


def _time_lines(account: TimeAccount, figures: list[Path], out_dir: Path) -> list[str]:
    """Where the study's worker-slot seconds went: the study's goodput, efficiency and schedule, the share
    of each phase, and the per-run bars."""
    runs, study = account.runs, account.study
    slot = float(runs["slot_s"].sum())
    step = float((runs["step_without_dispersion"] + runs["dispersion"]).sum())
    lines = ["## Where the time went", "",
             f"{runs.height} run(s) logged their time split: {slot:,.0f} worker-slot seconds, of which {step:,.0f} in "
             f"optimizer steps: **goodput {step / slot:.2f}** (docs/goodput.md says what each figure measures)."]
    if timing.EFFICIENCY in study:
        lines[-1] += (f" **Efficiency {study[timing.EFFICIENCY]:.2f}**: the runs' step time had each trained alone "
                      "(measured by `bench/bench_goodput.py`), over slot time.")
    else:
        lines[-1] += (" Efficiency (the runs' step time had each trained alone, over slot time) needs runs trained "
                      "alone: `bench/bench_goodput.py` measures it for the demo.")
    beside = runs.filter(pl.col("finishing_s") > 0)
    if beside.height:
        lines[-1] += (f" {beside.height} run(s) gave their worker group to the next run of their chain at their last "
                      f"step and finished their records beside it ({float(beside['finishing_s'].sum()):,.0f} s outside "
                      "their slots: the last evaluations and MLflow writes).")
    if timing.MAKESPAN in study and timing.IDEAL_MAKESPAN in study:
        lines[-1] += (f" Its training took {study[timing.MAKESPAN]:,.0f} s against an ideal schedule of "
                      f"{study[timing.IDEAL_MAKESPAN]:,.0f} s ({study[timing.MAKESPAN_OVER_IDEAL]:.2f}x)")
        if timing.WALL in study:
            lines[-1] += (f"; {study[timing.OUTSIDE_RUNS]:,.0f} s of its {study[timing.WALL]:,.0f} s wall time were "
                          "outside the runs (Ray start, tokenization, planning)")
        lines[-1] += "."
    totals = study_totals(account)
    lines += ["", *_markdown_table(["phase", "seconds", "share of slot time"],
                                   [[phase.replace("_", " "), f"{float(runs[phase].sum()):,.1f}", f"{totals[phase]:.1%}"]
                                    for phase in BAR_PHASES])]
    for p in figures:
        if p.stem == "time_split":
            lines += [f"![Where each run's slot time went, and the study's total]({p.relative_to(out_dir).as_posix()})", ""]
    return lines


def render_markdown(analysis: StudyAnalysis, plots: list[Path], out_dir: Path) -> str:
    """The report: what the study rests on, the paper's claims with verdicts, the figures a
    researcher reads first, then the fits, differences and everything that could not be done."""
    level = f"{analysis.options.confidence:.0%}"
    lines = [f"# Scaling analysis of study `{analysis.study}`", ""]
    if analysis.budget is not None and analysis.budget.rungs:
        lines += _budget_lines(analysis.budget)
    if analysis.course:
        lines += _course_lines(analysis.course)
    if analysis.claims:
        lines += _claims_lines(analysis, plots, out_dir)
    key = [p for stem in _KEY_FIGURES for p in plots if p.stem == stem or (stem.endswith("_") and p.stem.startswith(stem))]
    if key:
        lines += ["## Figures behind the claims", ""]
        for p in key:
            lines += [f"![{figure_caption(p.stem, analysis)}]({p.relative_to(out_dir).as_posix()})", ""]
    accuracy = [p for p in plots if any(p.stem == s or (s.endswith("_") and p.stem.startswith(s)) for s in _ACCURACY_FIGURES)]
    if analysis.downstream is not None:
        lines += _downstream_lines(analysis, accuracy, out_dir)
    lines += [
        "## Method",
        "",
        f"Size axis: `{analysis.size_column}`. Claims, per-rung differences and slopes of differences: t intervals ({level}) on "
        "independent units, the rung as a random effect for anything pooled over rungs (see *Paper claims*), clipped to the "
        "statistic's range. Power-law parameters, curve bands, multipliers and the leave-largest-out prediction: "
        f"{analysis.options.n_bootstrap} bootstrap refits (runs resampled within rungs, or log residuals with one seed), "
        "percentile intervals whose coverage `bench/bench_calibration.py` measures (docs/statistics.md: with 2 seeds they "
        "cover less than their level, so they describe the fit, they decide nothing). "
        f"Power law: y = a·N^(−α) + c, Huber (δ={analysis.options.huber_delta}) in log space, L-BFGS-B from a grid of starts, "
        f"fitted only to >= {analysis.options.min_rungs} rungs (three parameters pass exactly through three points) and only to metrics that fall with N; "
        "elsewhere a trend: Spearman of the metric with log N and the slope per decade of N. "
        "Rank correlations (Spearman/Kendall) are signed and bounded, so they only ever get a trend.",
        "",
    ]
    if analysis.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in analysis.notes] + [""]
    if analysis.curves:
        lines += ["## Scaling curves", ""]
        rows = []
        for (metric, arm), r in analysis.curves.items():
            fit, h = r.fit, r.holdout
            holdout = "–" if h is None else f"pred {_fmt(h.predicted)} vs obs {_fmt(h.observed)} ({h.relative_error:+.1%}; {'inside' if h.inside else 'OUTSIDE'} PI)"
            trend = r.trend
            rows.append(
                [
                    metric,
                    arm,
                    _fmt_ci(fit.a) if fit else "–",
                    _fmt_ci(fit.alpha) if fit else "–",
                    _fmt_ci(fit.offset) if fit else "–",
                    _fmt_ci(trend.spearman) if trend else "–",
                    _fmt_ci(trend.slope_per_decade) if trend and trend.slope_per_decade else "–",
                    holdout,
                    "; ".join(x for x in (r.reason, fit.note if fit else "", trend.note if trend else "") if x),
                ]
            )
        lines += _markdown_table(["metric", "arm", "a", "α", "c", "trend ρ(metric, log N)", "slope per decade of N", "leave-largest-out", "notes"], rows)
    if analysis.differences:
        lines += [f"## Paired differences (treatment − {analysis.control_arm}, paired by rung and seed)", ""]
        lines += [f"Per rung: the mean over seed pairs with a {level} t interval from 3 pairs on; with fewer, the pairs themselves "
                  "(a t interval with 1 df multiplies the standard error by 12.7).", ""]
        rows = [[metric, arm, d.rung, format_count(d.n), str(d.n_pairs), _fmt_ci(d.difference), ", ".join(f"{v:+.3g}" for v in d.pairs)]
                for (metric, arm), diffs in analysis.differences.items() for d in diffs]
        lines += _markdown_table(["metric", "treatment", "rung", "N", "pairs", "difference", "each pair"], rows)
    if analysis.difference_trends:
        lines += ["### Does the difference shrink or grow with scale?", ""]
        rows = [[m, a, _fmt_ci(t.slope_per_decade), t.note] for (m, a), t in analysis.difference_trends.items()]
        lines += _markdown_table(["metric", "treatment", "slope of the rung means per decade of N", "notes"], rows)
    if analysis.multipliers:
        lines += ["## Effective-parameter multiplier (validation loss)", "", "N at which the baseline's fitted loss curve reaches the treatment's loss, divided by the rung's N; >1 = the treatment is worth that many times more parameters.", ""]
        rows = [[arm, m.rung, _fmt(m.n), _fmt(m.treatment_value), _fmt_ci(m.multiplier), m.note] for arm, items in analysis.multipliers.items() for m in items]
        lines += _markdown_table(["treatment", "rung", "N", "loss", "multiplier", "notes"], rows)
    if analysis.best_lambdas:
        lines += ["## Best dispersion λ per rung (sweeps)", "",
                  "The best trial per rung, as found: each trial is one seed, so these have no interval, and no rule λ*(N) is fitted "
                  "through them (it would rest on 3-4 single-seed argmins and predict nothing it was tested on). A best λ at the edge "
                  "of the searched range may lie outside it.", ""]
        lines += _markdown_table(["rung", "N", "best λ", "val/loss", "λ tried", "at a search bound"],
                                 [[b.rung, format_count(b.n), _fmt(b.best_lambda), _fmt(b.val_loss), f"{_fmt(b.tried[0])}–{_fmt(b.tried[1])}",
                                   "**yes**" if b.at_bound else "no"] for b in analysis.best_lambdas])
    if analysis.observation_trends is not None and analysis.observation_trends.height:
        obs = analysis.observation_trends
        lines += ["## Observation study: condensation trend with size per family and source", "",
                  "Per (family, source, metric): Spearman of the metric with log N (bootstrap CI over models) and the fitted "
                  "slope of metric = a + b·log10 N (change per decade of N, case-bootstrap CI). Negative: larger models condense less.", ""]
        lines += _markdown_table(list(obs.columns), [[_fmt(v) if isinstance(v, float) else str(v) for v in row] for row in obs.iter_rows()])
    if analysis.observation_accuracy.height:
        acc = analysis.observation_accuracy
        lines += ["### Downstream accuracy next to condensation (per pretrained model)", "",
                  "Each model's downstream results (one evaluation, before any training) and its Spearman of mean cosine "
                  "with depth per text source. Table: `tables/observation_models.csv`.", ""]
        header = [c.removeprefix("eval/") for c in acc.columns]
        lines += _markdown_table(header, [[format_count(v) if c == "n" else (_fmt(v, 3) if isinstance(v, float) else str(v))
                                           for c, v in zip(acc.columns, row)] for row in acc.iter_rows()])
    if analysis.paper_comparison.height:
        paper = analysis.paper_comparison
        lines += ["### Measured vs the paper (Spearman of mean cosine vs depth, wikitext; paper figures ±0.05)", ""]
        lines += _markdown_table(list(paper.columns), [[_fmt(v, 3) if isinstance(v, float) else str(v) for v in row] for row in paper.iter_rows()])
    lines += ["## Runs", ""]
    summary = analysis.runs_summary
    lines += _markdown_table(list(summary.columns), [[str(v) for v in row] for row in summary.iter_rows()]) if summary.height else ["(none)", ""]
    if analysis.failed_runs.height:
        lines += ["## Failed runs (excluded from every fit)", ""]
        lines += _markdown_table(list(analysis.failed_runs.columns), [[str(v) for v in row] for row in analysis.failed_runs.iter_rows()])
    timed = [p for p in plots if p.stem == "time_split"]
    if analysis.time_account is not None and not analysis.time_account.empty:
        lines += _time_lines(analysis.time_account, timed, out_dir)
    rest = [p for p in plots if p not in key and p not in accuracy and p not in timed]
    if rest:
        lines += ["## More figures" if key else "## Figures", ""]
        for p in rest:
            lines += [f"![{figure_caption(p.stem, analysis)}]({p.relative_to(out_dir).as_posix()})", ""]
    prov = analysis.provenance
    if prov:
        lines += ["## Provenance", "", f"- git commit: `{prov.get('git_commit')}`", f"- tracking URI: `{prov.get('tracking_uri')}`", f"- input runs: {len(prov.get('input_run_ids', []))} (ids in `provenance.json`)", ""]
    return "\n".join(lines)


# --- HTML ------------------------------------------------------------------------------------------
# The MLflow artifact viewer shows a markdown file as raw text, so the report also goes out as
# one HTML file with its figures inlined. The report only uses headings, paragraphs, bullets,
# pipe tables, images, `code`, **bold** and *italics*: a converter for that subset is a few
# lines and adds no dependency.

_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45;color:#222}"
    "table{border-collapse:collapse;margin:0.6em 0 1.2em;font-size:0.88em;display:block;overflow-x:auto}"
    "th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}th{background:#f3f3f3}"
    "img{max-width:100%;border:1px solid #eee;margin:0.4em 0}code{background:#f5f5f5;padding:0 3px;border-radius:3px}"
    "h1{font-size:1.6em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.6em}h3{font-size:1.1em}"
)
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)]+)\)$")


_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def _link(match: re.Match) -> str:
    """A link to a figure file points at the figure embedded in the page (the HTML has no files beside it)."""
    text, target = match.groups()
    if Path(target).suffix.lower() in (".png", ".svg"):
        return f'<a href="#fig-{Path(target).stem}">{text}</a>'
    return f'<a href="{target}">{text}</a>'


def _inline(text: str) -> str:
    """Escape, then `code`, **bold**, *italic* (code spans are left alone inside)."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        part = html.escape(part, quote=False)
        part = _LINK.sub(_link, part)
        part = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", part)
        part = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", part)
        out.append(part)
    return "".join(out)


def _table_cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def _data_uri(src: str, base: Path) -> str:
    path = (base / src).resolve()
    kind = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}.get(path.suffix.lower())
    if kind is None or not path.is_file():
        return ""
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def render_html(markdown: str, base: Path, *, title: str = "analysis report") -> str:
    """The report as one HTML page; every image is embedded as a base64 data URI (read from
    `base`), so the page shows its figures wherever it is opened. A missing image becomes a
    visible note, never an external link."""
    body: list[str] = []
    paragraph: list[str] = []
    lines = markdown.splitlines()

    def flush() -> None:
        if paragraph:
            body.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        heading = re.match(r"^(#{1,6}) (.*)$", line)
        image = _IMAGE.match(line.strip())
        if not line.strip():
            flush()
        elif heading:
            flush()
            level = len(heading.group(1))
            body.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif image:
            flush()
            alt, src = image.groups()
            uri = _data_uri(src, base)
            body.append(f'<figure id="fig-{html.escape(Path(src).stem)}"><img alt="{html.escape(alt)}" src="{uri}">'
                        f'<figcaption>{html.escape(alt)}</figcaption></figure>' if uri
                        else f"<p><em>figure {html.escape(alt)} missing</em></p>")
        elif line.startswith("- "):
            flush()
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|(\s*:?-+:?\s*\|)+$", lines[i + 1].strip()):
            flush()
            header = "".join(f"<th>{_inline(c)}</th>" for c in _table_cells(line))
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _table_cells(lines[i])) + "</tr>")
                i += 1
            body.append(f"<table><thead><tr>{header}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
            continue
        else:
            paragraph.append(line.strip())
        i += 1
    flush()
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
