"""The sequential decision of a study's stated claims, wave by wave (pure: frames and claim checks in,
a `WaveRecord` out; nothing reads MLflow here except `decide_wave`, through `analysis.load`'s records).

After wave k the driver (`scaling.study`) runs the claims on the finished runs of waves 1..k at the
look's spent alpha (`scaling.sequential.plan_waves`): Holm over the stated claims at alpha_k, the same
for the "no effect" (TOST) family. A claim decided at a look keeps that verdict; the others are
inconclusive, and for each the rule asks whether more seeds can still decide it within the budget:

- the variance of a rung mean is sigma_rung^2 + sigma_within^2 / S (S seeds per rung): seeds shrink
  only the second part. sigma_within^2 is the pooled spread of the units within rungs, sigma_rung^2
  what the rung means scatter beyond it (their residual variance about the mean, or about the line in
  log N for a slope, less sigma_within^2 / S, floored at 0);
- at the largest study (S_max seeds) the claim would be decided with chance p if its measured effect
  is the truth when (t_{1-a/2m} + t_p) x SE(S_max) <= |effect - threshold| (or, for "no effect",
  (t_{1-a/m} + t_p) x SE(S_max) <= delta - |effect - threshold|), with a the last look's alpha, m the
  claims still open and the test's own df (R - 1 rung means, R - 2 for a slope); claim (a)'s units
  are the initial states (R more per seed), its statistic their mean Spearman;
- more seeds are spent while that chance is at least FUTILITY_POWER (20%); the seeds a fixed design
  would need are quoted at the study's alpha and stated power;
- if it would: "more seeds"; if only more seeds than the budget allows would: "budget too small";
  if no number of seeds would (the rung-to-rung spread alone is too large): "more rungs needed".

The study goes on while some stated claim is "more seeds" and a planned wave is left; the next wave's
seeds are the plan's (fixed in advance: stopping is the only thing the data choose, which keeps the
union bound over looks valid). Every decision is a function of the recorded runs (claim (a)'s
permutation draws are seeded), so a resumed study decides each wave as it did before.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from analysis.claims import (CONTRADICTED, NO_EFFECT, PAPER_CLAIMS, SUPPORTED, UNTESTED, ClaimCheck, check_paper_claims,
                             rank_profile)
from analysis.fit import rung_means
from scaling import names
from scaling.sequential import SLOPE_CLAIMS, DecideConfig, WavePlan

DECIDED = (SUPPORTED, CONTRADICTED, NO_EFFECT)
MORE_SEEDS, MORE_RUNGS, OVER_BUDGET, UNDECIDED = "more seeds", "more rungs needed", "budget too small", "undecided"
"""States of a claim that no look has decided: more seeds are being spent on it; no number of seeds can decide
it (the rung-to-rung spread dominates); only more seeds than the budget allows could; the budget is spent."""
FUTILITY_POWER = 0.2
"""More seeds are spent on a claim while the largest study would decide it with at least this chance at the
effect measured so far (conditional power; a lenient bar, because the early estimates are noisy and stopping
for futility costs power, never error control)."""
MAX_SEEDS_QUOTED = 10_000
"""Seeds per rung beyond which a fixed design is reported as needing more rungs instead."""
_SPECS = {spec.key: spec for spec in PAPER_CLAIMS}


@dataclass(frozen=True)
class ClaimState:
    """One stated claim after a look."""

    key: str
    state: str
    """supported / contradicted / no effect (decided), more seeds, more rungs needed, budget too small,
    undecided, not tested, not testable."""
    decided_at: int | None
    """Wave at which the verdict was reached (None: not decided)."""
    estimate: float
    low: float
    high: float
    """The look's repeated confidence interval, at 1 - alpha_k (valid together over all looks)."""
    p_adjusted: float
    fixed_seeds: int | None
    """Seeds per rung a fixed (one-look) design would need to decide the claim at alpha and the stated
    power, from the measured variance (None: decided, untestable, or more rungs needed)."""
    why: str


@dataclass(frozen=True)
class WaveRecord:
    """A look's decisions: what the driver logs on the study run after each wave."""

    wave: int
    seeds: tuple[int, ...]
    """Seed numbers of waves 1..wave."""
    runs: int
    """Finished training runs the look used."""
    alpha: float
    spent: float
    claims: tuple[ClaimState, ...]
    added: tuple[int, ...]
    """Seeds the next wave adds (empty: the study stops here)."""
    stop: str
    """Why the study stops after this wave ("" when it goes on)."""
    planned_looks: int = 0
    max_runs: int = 0
    """The budget: the largest study's runs."""
    alpha_total: float = 0.0
    spending: str = ""

    def state(self, key: str) -> ClaimState:
        return next(c for c in self.claims if c.key == key)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> WaveRecord:
        raw = json.loads(text)
        claims = tuple(ClaimState(**c) for c in raw.pop("claims"))
        return cls(**{**raw, "claims": claims, "seeds": tuple(raw["seeds"]), "added": tuple(raw["added"])})


# --- how far seeds can go ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Variance:
    """A claim's error split into its rung-to-rung and within-rung parts, and how its SE falls with seeds."""

    rung_var: float
    within_var: float
    rungs: int
    scale: float
    """SE(S)^2 = (rung_var + within_var / S) / scale (scale = R for a mean, Sxx of log10 N for a slope)."""
    df: int
    one_rung: bool
    """The units themselves are the sample (one rung, or claim (a)'s initial states): SE = sd / sqrt(units)."""
    units_per_seed: int = 1
    """Units one more seed adds: 1 for one rung, R initial states for claim (a)."""

    def se(self, seeds: float) -> float:
        if self.one_rung:
            return math.sqrt(self.within_var / (seeds * self.units_per_seed))
        return math.sqrt((self.rung_var + self.within_var / seeds) / self.scale)

    def df_at(self, seeds: int) -> int:
        return seeds * self.units_per_seed - 1 if self.one_rung else self.df


def compute_variance(n: np.ndarray, values: np.ndarray, *, slope: bool) -> Variance | None:
    """The parts of a pooled effect's (slope=False) or a slope's variance, from the units (N, value);
    None when the within-rung spread cannot be measured (one unit per rung)."""
    n, values = np.asarray(n, dtype=float), np.asarray(values, dtype=float)
    sizes, means, counts = rung_means(n, values)
    df_within = int((counts - 1).sum())
    if df_within < 1:
        return None
    within = float(sum(((values[n == s] - m) ** 2).sum() for s, m in zip(sizes, means))) / df_within
    if sizes.size == 1:
        return Variance(0.0, within, 1, 1.0, int(counts[0]) - 1, True)
    if slope:
        x = np.log10(sizes)
        sxx = float(((x - x.mean()) ** 2).sum())
        fit = np.polyval(np.polyfit(x, means, 1), x)
        df, resid, scale = sizes.size - 2, means - fit, sxx
    else:
        df, resid, scale = sizes.size - 1, means - means.mean(), float(sizes.size)
    if df < 1:
        return None
    spread = float((resid ** 2).sum()) / df
    harmonic = counts.size / float((1.0 / counts).sum())
    return Variance(max(0.0, spread - within / harmonic), within, int(sizes.size), scale, df, False)


def _decidable(var: Variance, seeds: float, gap: float, room: float, alpha: float, power: float, m: int) -> bool:
    """Would S seeds per rung decide the claim with `power` at the measured effect: a directional verdict
    (`gap` = |effect - threshold|) or 'no effect' (`room` = delta - gap, NaN without a delta)?"""
    df = var.df_at(int(seeds)) if math.isfinite(seeds) else var.df
    if df < 1:
        return False
    se = var.se(seeds)
    push = float(stats.t.ppf(power, df))
    two_sided = float(stats.t.ppf(1 - alpha / (2 * m), df)) + push
    one_sided = float(stats.t.ppf(1 - alpha / m, df)) + push
    return two_sided * se <= gap or (math.isfinite(room) and room > 0 and one_sided * se <= room)


def compute_seeds_needed(var: Variance, gap: float, room: float, alpha: float, power: float, m: int) -> int | None:
    """Fewest seeds per rung deciding the claim at `alpha` (None: no number of seeds does)."""
    if not _decidable(var, math.inf if not var.one_rung else MAX_SEEDS_QUOTED, gap, room, alpha, power, m):
        return None
    low, high = 2, MAX_SEEDS_QUOTED
    while low < high:
        mid = (low + high) // 2
        if _decidable(var, mid, gap, room, alpha, power, m):
            high = mid
        else:
            low = mid + 1
    return low


def _gaps(check: ClaimCheck) -> tuple[float, float]:
    spec = _SPECS[check.key]
    gap = abs(check.estimate.estimate - spec.threshold)
    delta = check.smallest_effect
    return gap, (delta - gap) if delta is not None else math.nan


# --- one look ---------------------------------------------------------------------------------------


def decide_look(checks: tuple[ClaimCheck, ...], plan: WavePlan, decide: DecideConfig, wave: int, seeds: tuple[int, ...],
                runs: int, earlier: WaveRecord | None = None) -> WaveRecord:
    """The decisions after wave `wave` from its claim checks (`check_paper_claims` at the look's alpha over
    the stated claims), the plan and the previous look's record."""
    look = plan.looks[wave - 1]
    last = plan.looks[-1]
    last_wave = wave == len(plan.looks)
    # Holm's first step over the claims still open: the decided ones are rejected first at later looks.
    m = max(1, sum(1 for key in decide.claims if earlier is None or earlier.state(key).state not in DECIDED))
    by_key = {c.key: c for c in checks}
    states = []
    for key in decide.claims:
        before = earlier.state(key) if earlier is not None else None
        if before is not None and before.state in DECIDED:
            states.append(before)
            continue
        check = by_key[key]
        est = check.estimate
        common = dict(key=key, estimate=est.estimate, low=est.low, high=est.high, p_adjusted=check.p_adjusted)
        if check.verdict in DECIDED:
            states.append(ClaimState(state=check.verdict, decided_at=wave, fixed_seeds=None,
                                     why=f"decided at wave {wave} (alpha {look.alpha:.3g})", **common))
            continue
        if check.verdict in UNTESTED:
            states.append(ClaimState(state=check.verdict, decided_at=None, fixed_seeds=None, why=check.note, **common))
            continue
        state, fixed, why = _undecided(check, plan, decide, last.alpha, m, last_wave)
        states.append(ClaimState(state=state, decided_at=None, fixed_seeds=fixed, why=why, **common))
    going = [s.key for s in states if s.state == MORE_SEEDS]
    if going and not last_wave:
        added = tuple(s for s in plan.seeds_at(wave + 1) if s not in plan.seeds_at(wave))
        stop = ""
    else:
        added = ()
        open_claims = [s for s in states if s.state not in DECIDED]
        stop = ("every stated claim is decided" if not open_claims else
                "the budget is spent" if last_wave and going else
                "more seeds cannot decide the open claims within the budget")
    return WaveRecord(wave, tuple(seeds), runs, look.alpha, look.spent, tuple(states), added, stop, len(plan.looks), last.runs,
                      decide.alpha, decide.spending)


def _undecided(check: ClaimCheck, plan: WavePlan, decide: DecideConfig, alpha_last: float, m: int,
               last_wave: bool) -> tuple[str, int | None, str]:
    """(state, fixed-design seeds, why) of an inconclusive claim."""
    gap, room = _gaps(check)
    if check.key == "a":  # initial states are the units, R more per seed; their mean Spearman, t-approximated
        rho = np.array([rank_profile(np.asarray(p, dtype=float)) for p in check.profiles])
        rho = rho[np.isfinite(rho)]
        var = Variance(0.0, float(rho.var(ddof=1)), 1, 1.0, rho.size - 1, True, max(1, plan.rungs)) if rho.size > 1 else None
    else:
        n = np.array([p[0] for p in check.points], dtype=float)
        y = np.array([p[1] for p in check.points], dtype=float)
        var = compute_variance(n, y, slope=check.key in SLOPE_CLAIMS)
    if var is None:
        return (UNDECIDED, None, "the budget is spent") if last_wave else (
            MORE_SEEDS, None, "one unit per rung: the seed-to-seed spread is not measured yet")
    fixed = compute_seeds_needed(var, gap, room, decide.alpha, decide.power, m)
    share = var.rung_var / (var.rung_var + var.within_var / max(1, check.seeds_per_rung)) if not var.one_rung else 0.0
    spread = f"the rung-to-rung spread is {share:.0%} of a rung mean's variance"
    if fixed is None:
        return MORE_RUNGS, None, f"no number of seeds decides it at the measured effect ({spread}): add rungs"
    if last_wave:
        return UNDECIDED, fixed, f"the budget is spent; a fixed design would need about {fixed} seeds per rung ({spread})"
    if not decide.futility or _decidable(var, plan.max_seeds, gap, room, alpha_last, FUTILITY_POWER, m):
        return MORE_SEEDS, fixed, f"{plan.max_seeds} seeds per rung may decide it at the last look ({spread})"
    needed = compute_seeds_needed(var, gap, room, alpha_last, FUTILITY_POWER, m)
    if needed is None:
        return MORE_RUNGS, fixed, (f"no number of seeds decides it at the last look's alpha {alpha_last:.3g} ({spread}): add rungs "
                                   f"(a fixed design at alpha {decide.alpha:g} would need about {fixed} seeds per rung)")
    return OVER_BUDGET, fixed, (f"the last look (alpha {alpha_last:.3g}) would need about {needed} seeds per rung, the budget "
                                f"allows {plan.max_seeds} ({spread})")


def run_look(final, initial, plan: WavePlan, decide: DecideConfig, wave: int, earlier: WaveRecord | None = None, *,
             pretrained: str | None = None, first_probe_step: int | None = None, seed: int = 0) -> WaveRecord:
    """One look on (final, initial) frames of the seeds of waves 1..`wave` (the columns
    `check_paper_claims` takes): the claims at the look's alpha, then `decide_look`."""
    look = plan.looks[wave - 1]
    checks = check_paper_claims(final, initial, first_probe_step=first_probe_step, pretrained=pretrained,
                                confidence=1.0 - look.alpha, smallest_effects=decide.deltas(), seed=seed, claims=decide.claims)
    train = final.filter(pl.col("metric") == names.VAL_LOSS) if final.height else final
    runs = train.select("rung", "arm", "seed").unique().height if train.height else 0
    return decide_look(checks, plan, decide, wave, plan.seeds_at(wave), runs, earlier)


def read_course(tags: dict[str, str]) -> tuple[WaveRecord, ...]:
    """The logged looks of a deciding study from its study run's tags (none: an ordinary study)."""
    return tuple(WaveRecord.from_json(tags[k]) for k in sorted(k for k in tags if k.startswith(names.TAG_WAVE_PREFIX)))


def decide_wave(records, plan: WavePlan, decide: DecideConfig, wave: int, earlier: WaveRecord | None = None, *,
                size_column: str = "n_params_non_embedding") -> WaveRecord:
    """`run_look` on a study's loaded records (`analysis.load.read_study`), only the runs of waves 1..`wave`."""
    from analysis.scaling_curves import claim_inputs  # the report's own path to the claims' inputs (imports this module)

    seeds = [str(s) for s in plan.seeds_at(wave)]
    runs = records.runs.filter(pl.col("seed").cast(pl.String).is_in(seeds))
    ids = runs["run_id"].implode()
    records = dataclasses.replace(records, runs=runs, metrics=records.metrics.filter(pl.col("run_id").is_in(ids)),
                                  profiles=records.profiles.filter(pl.col("run_id").is_in(ids)),
                                  probe_profiles=records.probe_profiles.filter(pl.col("run_id").is_in(ids)))
    final, initial, first_probe_step, pretrained = claim_inputs(records, size_column)
    return run_look(final, initial, plan, decide, wave, earlier, pretrained=pretrained, first_probe_step=first_probe_step)
