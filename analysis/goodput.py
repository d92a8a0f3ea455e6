"""Where a study's worker-slot seconds went, read back from MLflow: each run's `time/*` split (written by
the trainer's `scaling.timing.TimeLedger`) and the study run's totals (goodput, efficiency, makespan
against the ideal schedule, time outside the runs). Pure Polars; the vocabulary is `scaling.timing`'s."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from scaling import names, timing

BAR_PHASES = ("startup", "data", "step_without_dispersion", "dispersion", "probe", "eval_export", "eval_wait",
              "checkpoint", "logging", "other")
"""The stacked bar's slices, in the order a run meets them; the step is split into its dispersion term
and the rest."""


@dataclass(frozen=True)
class TimeAccount:
    runs: pl.DataFrame
    """One row per timed run (smallest rung first): run_id, rung, arm, seed, kind, one column per `BAR_PHASES` (seconds), slot_s,
    goodput, finishing_s (its records finished after its slot, beside its chain's next run; 0 when in it)."""
    study: dict[str, float] = field(default_factory=dict)
    """The study run's `time/*` (its last invocation; empty for a study trained before time accounting)."""

    @property
    def empty(self) -> bool:
        return self.runs.height == 0


def time_account(metrics: pl.DataFrame, study_metrics: dict[str, float]) -> TimeAccount:
    """The split of every run that logged one (latest value per run and key)."""
    rows = (metrics.filter(pl.col("metric").str.starts_with(timing.PREFIX) & pl.col("kind").is_in(
                [names.KIND_TRAIN, names.KIND_TRIAL]))
            .sort("step").group_by("run_id", "metric", maintain_order=True).last()
            .pivot(on="metric", index=["run_id", "rung", "n_params", "arm", "seed", "kind"], values="value")
            if metrics.height else pl.DataFrame())
    if not rows.height or timing.SLOT not in rows.columns:
        return TimeAccount(pl.DataFrame(), dict(study_metrics))
    rows = rows.filter(pl.col(timing.SLOT).is_not_null())

    def seconds(phase: str) -> pl.Expr:
        key = timing.seconds_key(phase)
        return pl.col(key).fill_null(0.0) if key in rows.columns else pl.lit(0.0)

    table = rows.sort("n_params", "seed", "arm").select(
        "run_id", "rung", "arm", "seed", "kind",
        *[seconds(p).alias(p) for p in ("startup", "data", "probe", "eval_export", "eval_wait", "checkpoint", "logging",
                                         "dispersion")],
        (seconds("step") - seconds("dispersion")).clip(lower_bound=0.0).alias("step_without_dispersion"),
        seconds("other").alias("other"),
        pl.col(timing.SLOT).alias("slot_s"),
        (seconds("step") / pl.col(timing.SLOT)).alias("goodput"),
        seconds("finishing").alias("finishing_s"),
    ).select("run_id", "rung", "arm", "seed", "kind", *BAR_PHASES, "slot_s", "goodput", "finishing_s")
    return TimeAccount(table, dict(study_metrics))


def study_totals(account: TimeAccount) -> dict[str, float]:
    """Shares of the summed slot time per bar slice (from the runs, so a study resumed over several
    invocations is counted whole)."""
    slot = float(account.runs["slot_s"].sum())
    return {phase: float(account.runs[phase].sum()) / slot for phase in BAR_PHASES} if slot > 0 else {}
