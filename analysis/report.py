"""Turn analysis results into tables (Polars) and a markdown report. No fitting, no I/O
beyond writing the files it is asked to write."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from analysis.effects import DifferenceTrend, LambdaRule, Multiplier, RungDifference
from analysis.fit import CurveResult, FitOptions, Interval, Trend


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
    lambda_rule: LambdaRule | None
    observation_trends: pl.DataFrame | None
    runs_summary: pl.DataFrame
    failed_runs: pl.DataFrame
    notes: tuple[str, ...]
    options: FitOptions
    provenance: dict = field(default_factory=dict)
    paper_comparison: pl.DataFrame = field(default_factory=pl.DataFrame)
    """Observation studies holding the paper's models: measured vs published Spearman (wikitext)."""


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
        {"metric": metric, "treatment": arm, "control": control, "rung": d.rung, "n": d.n, "n_pairs": d.n_pairs, **_ci_columns("difference", d.difference)}
        for (metric, arm), diffs in differences.items()
        for d in diffs
    ]
    return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()


def build_difference_trend_table(trends: dict[tuple[str, str], DifferenceTrend]) -> pl.DataFrame:
    rows = [
        {"metric": metric, "treatment": arm, **_ci_columns("slope_per_decade", t.slope_per_decade), **_ci_columns("spearman", t.spearman), "note": t.note}
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


def build_lambda_table(rule: LambdaRule | None) -> pl.DataFrame:
    if rule is None:
        return pl.DataFrame()
    return pl.DataFrame(
        [{"rung": r, "n": n, "best_lambda": lam, "val_loss": loss} for r, n, lam, loss in rule.best], infer_schema_length=None
    )


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def _fmt_ci(interval: Interval | None, digits: int = 3) -> str:
    if interval is None:
        return "–"
    if math.isnan(interval.low):
        return f"{_fmt(interval.estimate, digits)} (no CI)"
    return f"{_fmt(interval.estimate, digits)} [{_fmt(interval.low, digits)}, {_fmt(interval.high, digits)}]"


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines + [""]


def render_markdown(analysis: StudyAnalysis, plots: list[Path], out_dir: Path) -> str:
    """The report: what was fitted, with which intervals, and what could not be."""
    level = f"{analysis.options.confidence:.0%}"
    lines = [f"# Scaling analysis of study `{analysis.study}`", ""]
    lines += [
        f"Size axis: `{analysis.size_column}`. Intervals: {level} bootstrap ({analysis.options.n_bootstrap} replicates, runs resampled within rungs). "
        f"Power law: y = a·N^(−α) + c, Huber (δ={analysis.options.huber_delta}) in log space, L-BFGS-B from a grid of starts. "
        "Rank correlations (Spearman/Kendall) are signed and bounded, so they get a trend (Spearman of metric vs log N), never a power law.",
        "",
    ]
    if analysis.notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in analysis.notes] + [""]
    lines += ["## Runs", ""]
    summary = analysis.runs_summary
    lines += _markdown_table(list(summary.columns), [[str(v) for v in row] for row in summary.iter_rows()]) if summary.height else ["(none)", ""]
    if analysis.curves:
        lines += ["## Scaling curves", ""]
        rows = []
        for (metric, arm), r in analysis.curves.items():
            fit, h = r.fit, r.holdout
            holdout = "–" if h is None else f"pred {_fmt(h.predicted)} vs obs {_fmt(h.observed)} ({h.relative_error:+.1%}; {'inside' if h.inside else 'OUTSIDE'} PI)"
            rows.append(
                [
                    metric,
                    arm,
                    _fmt_ci(fit.a) if fit else "–",
                    _fmt_ci(fit.alpha) if fit else "–",
                    _fmt_ci(fit.offset) if fit else "–",
                    _fmt_ci(r.trend.spearman) if r.trend else "–",
                    holdout,
                    r.reason or "",
                ]
            )
        lines += _markdown_table(["metric", "arm", "a", "α", "c", "trend ρ(metric, log N)", "leave-largest-out", "notes"], rows)
    if analysis.differences:
        lines += [f"## Paired differences (treatment − {analysis.control_arm}, paired by rung and seed)", ""]
        rows = [[metric, arm, d.rung, _fmt(d.n), str(d.n_pairs), _fmt_ci(d.difference)] for (metric, arm), diffs in analysis.differences.items() for d in diffs]
        lines += _markdown_table(["metric", "treatment", "rung", "N", "pairs", "difference"], rows)
    if analysis.difference_trends:
        lines += ["### Does the difference shrink or grow with scale?", ""]
        rows = [[m, a, _fmt_ci(t.slope_per_decade), _fmt_ci(t.spearman), t.note] for (m, a), t in analysis.difference_trends.items()]
        lines += _markdown_table(["metric", "treatment", "slope per decade of N", "Spearman vs log N", "notes"], rows)
    if analysis.multipliers:
        lines += ["## Effective-parameter multiplier (validation loss)", "", "N at which the baseline's fitted loss curve reaches the treatment's loss, divided by the rung's N; >1 = the treatment is worth that many times more parameters.", ""]
        rows = [[arm, m.rung, _fmt(m.n), _fmt(m.treatment_value), _fmt_ci(m.multiplier), m.note] for arm, items in analysis.multipliers.items() for m in items]
        lines += _markdown_table(["treatment", "rung", "N", "loss", "multiplier", "notes"], rows)
    if analysis.lambda_rule is not None:
        rule = analysis.lambda_rule
        lines += ["## Best dispersion λ per rung (sweeps)", ""]
        lines += _markdown_table(["rung", "N", "best λ", "val/loss"], [[r, _fmt(n), _fmt(lam), _fmt(loss)] for r, n, lam, loss in rule.best])
        lines += [f"Rule: λ*(N) = {_fmt(rule.coefficient)} · N^{_fmt(rule.exponent)}; exponent {_fmt_ci(rule.exponent_interval)}. {rule.note}", ""]
    if analysis.observation_trends is not None and analysis.observation_trends.height:
        obs = analysis.observation_trends
        lines += ["## Observation study: condensation trend with size per family and source", "",
                  "Per (family, source, metric): Spearman of the metric with log N (bootstrap CI over models) and the fitted "
                  "slope of metric = a + b·log10 N (change per decade of N, case-bootstrap CI). Negative: larger models condense less.", ""]
        lines += _markdown_table(list(obs.columns), [[_fmt(v) if isinstance(v, float) else str(v) for v in row] for row in obs.iter_rows()])
    if analysis.paper_comparison.height:
        paper = analysis.paper_comparison
        lines += ["### Measured vs the paper (Spearman of mean cosine vs depth, wikitext; paper figures ±0.05)", ""]
        lines += _markdown_table(list(paper.columns), [[_fmt(v, 3) if isinstance(v, float) else str(v) for v in row] for row in paper.iter_rows()])
    if analysis.failed_runs.height:
        lines += ["## Failed runs (excluded from every fit)", ""]
        lines += _markdown_table(list(analysis.failed_runs.columns), [[str(v) for v in row] for row in analysis.failed_runs.iter_rows()])
    if plots:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots] + [""]
    prov = analysis.provenance
    if prov:
        lines += ["## Provenance", "", f"- git commit: `{prov.get('git_commit')}`", f"- tracking URI: `{prov.get('tracking_uri')}`", f"- input runs: {len(prov.get('input_run_ids', []))} (ids in `provenance.json`)", ""]
    return "\n".join(lines)
