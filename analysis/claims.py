"""The paper's claims as hypothesis tests whose error rates are measured, not assumed.

Pure functions over numpy arrays and Polars frames; nothing reads MLflow or writes files.
`bench/bench_calibration.py` runs synthetic studies through this module and prints, per claim,
the wrong-verdict rate under no effect, the power at the paper's effect sizes and the coverage
of the intervals (docs/statistics.md has its table).

The rules, and why:

- **Units are what is independent.** Paired arms share seed, data order and initial weights, so a
  (rung, seed) pair is one unit of a paired difference; the step-0 probe of paired arms is one
  initial state, and in a study that starts from one pretrained checkpoint it is the same state
  for every seed (one unit per rung, which replicates nothing: claim (a) is then not tested).
  A statistic whose units are all identical is *not testable*, never a zero-width interval.
- **The rung is a random effect.** The claims are about model size in general, not about the
  four sizes a study happened to train, so pooled effects and slopes are computed on the rung
  means: a one-sample t over R rung means (R - 1 df) or a regression of the rung means on
  log10 N (R - 2 df). The rung means' spread holds the seed-to-seed noise and the rung-to-rung
  variation alike (the summary-statistics approach to a mixed model; exact for balanced designs
  under normality). With one rung, the seeds of that rung are the units (noted).
- **A rank correlation at its bound is decided by its exact null distribution.** Claim (a) asks
  whether mean cosine rises with depth at initialisation. Under "no trend with depth" each
  initial state's layer order is a random permutation, so its Spearman has the permutation
  distribution (+1 with probability 1/k! over k hidden states). The test statistic is the mean
  Spearman over initial states; its null is exact at the bound (every unit at +1: p = prod 1/k!)
  and Monte Carlo elsewhere. Beside it the row gives the size: how much the mean cosine rises
  from the embedding output to the last hidden state, so "monotone" and "condensed" differ.
- **Multiplicity.** Every tested claim gives a two-sided p-value against its threshold; Holm's
  step-down (Holm 1979) over the claims of a study keeps the chance of any wrong directional
  verdict at or below alpha when there is no effect. A claim with a smallest effect of interest
  delta can also be decided as *no effect* (|effect| < delta) by two one-sided tests (TOST,
  Schuirmann 1987), Holm-adjusted across claims as their own family.
- **Intervals stay inside the statistic's range**: a t interval is clipped to what the statistic
  can take (a difference of two rank correlations lies in [-2, 2]); clipping only removes
  impossible values, so coverage is unchanged.
- **Minimum detectable effect**: (t_{1-alpha/2} + t_{power}) x SE with the same df, the effect
  this many seeds and rungs would detect 80% of the time before any multiplicity adjustment.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import polars as pl
from scipy import stats

from analysis.effects import difference_range, pair_arms, slope_range
from analysis.fit import RANK_METRICS, Interval, is_constant, rung_means, rung_slope, t_interval
from scaling import names
from scaling.errors import ConfigError
from scaling.sequential import SMALLEST_EFFECTS  # shared with the `decide:` section (defaults, docstring there)

SUPPORTED, CONTRADICTED, NO_EFFECT = "supported", "contradicted", "no effect"
INCONCLUSIVE, NOT_TESTED, NOT_TESTABLE = "inconclusive", "not tested", "not testable"
UNTESTED = (NOT_TESTED, NOT_TESTABLE)

MDE_POWER = 0.8
"""Power at which the minimum detectable effect is quoted."""
PERMUTATION_DRAWS = 20_000
"""Monte Carlo draws of the permutation null of claim (a) away from its bound (p resolution 5e-5)."""
MAX_LOSS_COST = 0.01
"""Claim (c)'s non-inferiority margin: dispersion may cost at most 1% validation loss."""

_LAYER_MEAN_COS = r"^condensation/layer_(\d+)/mean_cos$"


# --- one test --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimStatistic:
    """One claim's statistic: estimate with its interval, p-values, and what it rests on."""

    estimate: Interval
    p_value: float
    """Two-sided, against 'the effect equals the threshold'."""
    p_equivalence: float
    """TOST against '|effect - threshold| >= smallest effect' (NaN without a smallest effect)."""
    mde: float
    """Minimum detectable |effect - threshold| at 80% power and unadjusted alpha (NaN for exact tests)."""
    n_units: int
    unit: str
    n_rungs: int
    seeds_per_rung: int
    method: str
    note: str = ""
    effect_size: Interval | None = None
    """Claim (a): rise of mean cosine from the embedding output to the last hidden state."""


def t_statistics(estimate: float, se: float, df: float, *, threshold: float, delta: float | None, confidence: float,
                 bounds: tuple[float, float]) -> tuple[Interval, float, float, float]:
    """(interval, two-sided p, TOST p, MDE) of an estimate with a t-distributed error."""
    interval = t_interval(estimate, se, df, confidence, bounds)
    t_crit = float(stats.t.ppf(0.5 + confidence / 2, df))
    score = (estimate - threshold) / se
    p = float(2 * stats.t.sf(abs(score), df))
    p_eq = math.nan
    if delta is not None and delta > 0:
        p_eq = float(max(stats.t.sf((estimate - threshold + delta) / se, df), stats.t.cdf((estimate - threshold - delta) / se, df)))
    mde = (t_crit + float(stats.t.ppf(MDE_POWER, df))) * se
    return interval, p, p_eq, mde


def _untestable(why: str, *, n_units: int = 0, unit: str = "", n_rungs: int = 0, seeds: int = 0) -> ClaimStatistic:
    return ClaimStatistic(Interval(math.nan, math.nan, math.nan, why), math.nan, math.nan, math.nan, n_units, unit, n_rungs, seeds, "", why)


def compute_pooled_effect(n: np.ndarray, values: np.ndarray, *, threshold: float, delta: float | None, confidence: float,
                          bounds: tuple[float, float], unit: str) -> ClaimStatistic:
    """Mean of the rung means, tested against `threshold` with the rung as a random effect: t over
    the R rung means (R - 1 df), whose spread holds the rung-to-rung and the seed-to-seed
    variation; one rung: t over its units (k - 1 df). (Taking the error from the rung means'
    scatter about a trend in log N instead had less power: 2 df instead of 3 with 4 rungs.)"""
    n, values = np.asarray(n, dtype=float), np.asarray(values, dtype=float)
    if values.size == 0:
        return _untestable(f"no {unit}s")
    sizes, means, counts = rung_means(n, values)
    seeds = int(counts.min())
    if is_constant(values):
        return _untestable(f"every {unit} is identical ({values[0]:+.4g}): the units replicate nothing", n_units=values.size, unit=f"{unit}s",
                           n_rungs=sizes.size, seeds=seeds)
    note = ""
    if sizes.size >= 2:
        sample, method = means, f"t over {sizes.size} rung means ({sizes.size - 1} df; rung as a random effect)"
    elif values.size >= 2:
        sample, method, note = values, f"t over {values.size} {unit}s of one rung ({values.size - 1} df)", "one rung: the estimate is about this size only"
    else:
        return _untestable(f"one {unit}: no spread to test against", n_units=1, unit=unit, n_rungs=1, seeds=1)
    estimate, se, df = float(sample.mean()), float(sample.std(ddof=1)) / math.sqrt(sample.size), sample.size - 1
    if not se > 0:
        return _untestable(f"every rung mean is identical ({estimate:+.4g}): no error estimate", n_units=values.size, unit=f"{unit}s",
                           n_rungs=sizes.size, seeds=seeds)
    interval, p, p_eq, mde = t_statistics(estimate, se, df, threshold=threshold, delta=delta, confidence=confidence, bounds=bounds)
    return ClaimStatistic(interval, p, p_eq, mde, int(values.size), f"{unit}s", int(sizes.size), seeds, method, note)


def compute_slope_effect(n: np.ndarray, values: np.ndarray, *, delta: float | None, confidence: float, bounds: tuple[float, float], unit: str) -> ClaimStatistic:
    """Slope of the rung means per decade of N against 0, the rung as a random effect (R - 2 df)."""
    n, values = np.asarray(n, dtype=float), np.asarray(values, dtype=float)
    sizes = np.unique(n)
    seeds = int(min(np.sum(n == s) for s in sizes)) if sizes.size else 0
    if sizes.size < 3:
        return _untestable(f"{sizes.size} rung(s): a slope through fewer than 3 rung means has no error estimate; add rungs",
                           n_units=values.size, unit=f"{unit}s", n_rungs=sizes.size, seeds=seeds)
    if is_constant(values):
        return _untestable(f"every {unit} is identical ({values[0]:+.4g}): nothing varies with N", n_units=values.size, unit=f"{unit}s",
                           n_rungs=sizes.size, seeds=seeds)
    slope, _, se, rungs = rung_slope(n, values)
    if not se > 0:
        return _untestable("the rung means lie exactly on a line: no error estimate", n_units=values.size, unit=f"{unit}s", n_rungs=rungs, seeds=seeds)
    interval, p, p_eq, mde = t_statistics(slope, se, rungs - 2, threshold=0.0, delta=delta, confidence=confidence, bounds=bounds)
    return ClaimStatistic(interval, p, p_eq, mde, int(values.size), f"{unit}s", rungs, seeds,
                      f"slope of {rungs} rung means on log10 N ({rungs - 2} df; rung as a random effect)")


def rank_profile(profile: np.ndarray) -> float:
    """Spearman of a per-layer profile with depth (NaN for a flat one)."""
    depth = np.arange(profile.size, dtype=float)
    return float(stats.spearmanr(depth, profile).statistic) if np.ptp(profile) > 0 else math.nan


def _null_mean_spearman(profiles: list[np.ndarray], draws: int, rng: np.random.Generator) -> np.ndarray:
    """Mean Spearman over units when each unit's layer order is a random permutation."""
    total = np.zeros(draws)
    for profile in profiles:
        ranks = stats.rankdata(profile)
        depth = np.arange(profile.size, dtype=float) - (profile.size - 1) / 2.0
        centred = ranks - ranks.mean()
        shuffled = rng.permuted(np.tile(centred, (draws, 1)), axis=1)
        total += shuffled @ depth / math.sqrt(float(np.dot(centred, centred)) * float(np.dot(depth, depth)))
    return total / len(profiles)


def compute_depth_trend(profiles: list[np.ndarray], *, confidence: float, seed: int = 0, draws: int = PERMUTATION_DRAWS) -> ClaimStatistic:
    """Claim (a): does mean cosine rise with depth in the initial states? `profiles`: one per
    distinct initial state, mean cosine of every hidden state (embedding output first).

    Statistic: mean Spearman(depth, profile) over units; p from the permutation null (exact
    when every unit sits at a bound). The interval of the mean Spearman is a t interval over
    units clipped to [-1, 1], absent when every unit has the same value (no spread)."""
    profiles = [np.asarray(p, dtype=float) for p in profiles if np.size(p) >= 3 and np.ptp(p) > 0]
    if not profiles:
        return _untestable("no initial state with >= 3 distinct hidden-state values")
    rho = np.array([rank_profile(p) for p in profiles])
    observed = float(rho.mean())
    rng = np.random.default_rng(seed)
    null = _null_mean_spearman(profiles, draws, rng)
    p_high = (1.0 + float(np.sum(null >= observed - 1e-12))) / (1.0 + draws)
    p_low = (1.0 + float(np.sum(null <= observed + 1e-12))) / (1.0 + draws)
    distinct = all(np.unique(p).size == p.size for p in profiles)
    if distinct and np.all(np.abs(rho - 1.0) < 1e-9):
        p_high = float(np.prod([1.0 / math.factorial(p.size) for p in profiles]))
    if distinct and np.all(np.abs(rho + 1.0) < 1e-9):
        p_low = float(np.prod([1.0 / math.factorial(p.size) for p in profiles]))
    p = min(1.0, 2.0 * min(p_high, p_low))
    k = sorted({p.size for p in profiles})
    depth = f"{k[0]}" if len(k) == 1 else f"{k[0]}-{k[-1]}"
    method = f"permutation test of the mean Spearman over {len(profiles)} initial states ({depth} hidden states each)"
    interval = _mean_interval(rho, confidence, "every initial state at {:+.3f}: no spread for an interval; decided by the exact permutation test")
    effect = _mean_interval(np.array([p[-1] - p[0] for p in profiles]), confidence,
                            "every initial state's mean cosine rises by {:+.3g}: no spread for an interval")
    return ClaimStatistic(interval, p, math.nan, math.nan, len(profiles), "initial states", 0, 0, method, "", effect)


def _mean_interval(values: np.ndarray, confidence: float, same: str) -> Interval:
    """Mean of `values` (in [-1, 1]) with its t interval over them; none, with `same` (formatted with the
    value) as the reason, when they all agree, or with one value."""
    if values.size < 2:
        return Interval(float(values.mean()), math.nan, math.nan, "one initial state")
    if is_constant(values):
        return Interval(float(values.mean()), math.nan, math.nan, same.format(float(values.mean())))
    return t_interval(float(values.mean()), float(values.std(ddof=1)) / math.sqrt(values.size), values.size - 1, confidence, (-1.0, 1.0))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count)."""
    finite = [(p, i) for i, p in enumerate(p_values) if math.isfinite(p)]
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(finite)):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


# --- the paper's claims ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimSpec:
    """A claim's fixed wording, metric and decision rule."""

    key: str
    claim: str
    metric: str
    statistic: str
    side: str
    """'below' or 'above' `threshold` is the claimed side; 'nonzero': either side supports it."""
    threshold: float
    smallest_effect: float | None
    """delta of 'no effect larger than delta' (None: the claim cannot be decided as 'no effect')."""
    paper: str
    paper_claims_it: bool
    """The paper makes this claim: a contradicted (or 'no effect') verdict goes against it."""

    def __post_init__(self) -> None:
        if self.side not in ("below", "above", "nonzero"):
            raise ConfigError(f"claim ({self.key}) side={self.side!r}: use 'below', 'above' or 'nonzero'")

    def describe(self) -> str:
        where = {"below": f"below {self.threshold:g}", "above": f"above {self.threshold:g}", "nonzero": "away from 0 (either sign)"}[self.side]
        rule = f"supported when the effect lies {where} (Holm-adjusted two-sided p < alpha)"
        if self.side != "nonzero":
            rule += "; contradicted when it lies significantly on the other side"
        if self.smallest_effect is not None:
            rule += f"; no effect when TOST shows |effect| < {self.smallest_effect:g} (Holm-adjusted)"
        return rule + "; else inconclusive"



PAPER_CLAIMS = (
    ClaimSpec("a", "models are condensed at initialisation", names.COND_SPEARMAN,
              "mean Spearman(depth, mean cosine) over distinct initial states (step 0)", "above", 0.0, None,
              "random initialisation: Spearman close to +1", True),
    ClaimSpec("b", "the dispersion loss lowers late-layer mean cosine", names.COND_LATE_HALF_MEAN_COS,
              "mean paired difference dispersion − baseline (final)", "below", 0.0, SMALLEST_EFFECTS["b"],
              "dispersion counteracts condensation", True),
    ClaimSpec("b-rho", "the dispersion loss lowers the depth trend (Spearman)", names.COND_SPEARMAN,
              "mean paired difference of Spearman(depth, mean cosine), dispersion − baseline (final)", "below", 0.0, SMALLEST_EFFECTS["b-rho"],
              "dispersion counteracts condensation", True),
    ClaimSpec("c", "the dispersion loss costs at most 1% in-domain validation loss (non-inferiority)", names.VAL_LOSS,
              "mean paired relative difference (dispersion − baseline) / baseline (final)", "below", MAX_LOSS_COST, None,
              "no claim on in-domain loss (its generalisation claim is (f)); this tool's guard that condensation is not bought with loss",
              False),
    ClaimSpec("d", "smaller models condense more (baseline late-half mean cosine falls with N)", names.COND_LATE_HALF_MEAN_COS,
              "slope of the baseline's final value per decade of N", "below", 0.0, SMALLEST_EFFECTS["d"],
              "small models condense more than large ones", True),
    ClaimSpec("d-rho", "smaller models condense more (baseline Spearman falls with N)", names.COND_SPEARMAN,
              "slope of the baseline's final Spearman per decade of N", "below", 0.0, SMALLEST_EFFECTS["d-rho"],
              "small models condense more than large ones", True),
    ClaimSpec("e", "the dispersion effect on late-half mean cosine changes with N", names.COND_LATE_HALF_MEAN_COS,
              "slope of the paired difference (dispersion − baseline) per decade of N", "nonzero", 0.0, SMALLEST_EFFECTS["e"],
              "no direct claim (its framing: small models need it most)", False),
    ClaimSpec("e-rho", "the dispersion effect on Spearman changes with N", names.COND_SPEARMAN,
              "slope of the paired Spearman difference per decade of N", "nonzero", 0.0, SMALLEST_EFFECTS["e-rho"],
              "no direct claim (its framing: small models need it most)", False),
    ClaimSpec("f", "the dispersion loss improves downstream accuracy", names.EVAL_MEAN_ACC,
              "mean paired difference dispersion − baseline (validation-selected checkpoint)", "above", 0.0, SMALLEST_EFFECTS["f"],
              "dispersion improves downstream accuracy (generalisation)", True),
)
CLAIM_KEYS = tuple(spec.key for spec in PAPER_CLAIMS)
STATED = "not among the claims the study decides"


@dataclass(frozen=True)
class ClaimCheck:
    """One claim tested on a study: statistic, interval, p-values, verdict and what it rests on."""

    key: str
    claim: str
    metric: str
    statistic: str
    estimate: Interval
    verdict: str
    rule: str
    n_units: int
    unit: str
    n_rungs: int
    seeds_per_rung: int
    paper: str
    contradicts_paper: bool
    note: str = ""
    p_value: float = math.nan
    p_adjusted: float = math.nan
    """Holm-adjusted over the study's tested claims: the verdict reads this."""
    p_equivalence: float = math.nan
    p_equivalence_adjusted: float = math.nan
    smallest_effect: float | None = None
    mde: float = math.nan
    method: str = ""
    effect_size: Interval | None = None
    points: tuple[tuple[float, float], ...] = field(default=(), repr=False)
    """(N, value) of every unit, for the claim's figure (initial states: (layer fraction, mean cosine) is in `profiles`)."""
    profiles: tuple[tuple[float, ...], ...] = field(default=(), repr=False)
    """Claim (a): the initial states' mean-cosine profiles."""
    line: tuple[float, float] | None = None
    """Slope claims: (intercept, slope per decade) of the rung means."""


def _check(spec: ClaimSpec, result: ClaimStatistic, points=(), *, line=None, profiles=()) -> ClaimCheck:
    verdict = NOT_TESTABLE if not math.isfinite(result.p_value) else INCONCLUSIVE
    return ClaimCheck(spec.key, spec.claim, spec.metric, spec.statistic, result.estimate, verdict, spec.describe(), result.n_units,
                      result.unit, result.n_rungs, result.seeds_per_rung, spec.paper, False, result.note, result.p_value, math.nan,
                      result.p_equivalence, math.nan, spec.smallest_effect, result.mde, result.method, result.effect_size,
                      tuple(points), tuple(profiles), line)


def _untested(spec: ClaimSpec, reason: str, verdict: str = NOT_TESTED) -> ClaimCheck:
    return ClaimCheck(spec.key, spec.claim, spec.metric, spec.statistic, Interval(math.nan, math.nan, math.nan, reason), verdict,
                      spec.describe(), 0, "", 0, 0, spec.paper, False, reason, smallest_effect=spec.smallest_effect)


def _all_at_bound(values: np.ndarray) -> bool:
    return values.size > 0 and bool(np.all(np.abs(np.abs(values) - 1.0) < 1e-9))


def _saturated(spec: ClaimSpec, values: np.ndarray) -> str:
    if spec.metric in RANK_METRICS and _all_at_bound(values):
        return f"{spec.metric} is at {values[0]:+.0f} in every run (saturated over few hidden states): it cannot separate arms or sizes"
    return ""


def _initial_profiles(initial: pl.DataFrame) -> list[np.ndarray]:
    """One mean-cosine profile per distinct initial state (by `init_hash` when recorded, else
    (rung, seed): paired arms share it)."""
    layers = (initial.filter(pl.col("metric").str.contains(_LAYER_MEAN_COS) & pl.col("value").is_finite())
              .with_columns(pl.col("metric").str.extract(_LAYER_MEAN_COS, 1).cast(pl.Int64).alias("layer")))
    if layers.is_empty():
        return []
    has_hash = "init_hash" in layers.columns and layers["init_hash"].null_count() < layers.height
    unit = pl.col("init_hash") if has_hash else pl.concat_str(pl.col("rung"), pl.col("seed").cast(pl.String), separator="/")
    table = layers.with_columns(unit.alias("unit")).group_by("unit", "layer").agg(pl.col("value").mean()).sort("unit", "layer")
    return [group["value"].to_numpy() for _, group in table.group_by("unit", maintain_order=True)]


def _check_initial(spec: ClaimSpec, initial: pl.DataFrame, *, first_probe_step: int | None, pretrained: str | None,
                   confidence: float, seed: int) -> ClaimCheck:
    if pretrained:
        return _untested(spec, f"the study starts from pretrained weights ({pretrained}): its step 0 is a trained checkpoint, the same for "
                               "every seed, and the claim is about random initialisation")
    profiles = _initial_profiles(initial)
    if not profiles:
        later = f" (the first probe is at step {first_probe_step})" if first_probe_step is not None else ""
        return _untested(spec, f"no step-0 probe recorded{later}")
    if len(profiles) < 2:
        return _untested(spec, "one initial state: nothing replicates it", NOT_TESTABLE)
    result = compute_depth_trend(profiles, confidence=confidence, seed=seed)
    n_states = {p.size for p in profiles}
    depth = n_states.pop() if len(n_states) == 1 else None
    notes = [result.note]
    rho = np.array([rank_profile(p) for p in profiles])
    if depth is not None and _all_at_bound(rho):
        notes.append(f"every initial state at {rho[0]:+.0f} over {depth} hidden states (chance 1 in {math.factorial(depth)} each)")
    result = dataclasses.replace(result, note="; ".join(x for x in notes if x))
    return _check(spec, result, profiles=[tuple(p.tolist()) for p in profiles])


def _check_paired(spec: ClaimSpec, final: pl.DataFrame, treatment: str, control: str, confidence: float, delta: float | None,
                  *, relative: bool = False) -> ClaimCheck:
    rows = final.filter(pl.col("metric") == spec.metric)
    if rows.is_empty():
        if spec.metric == names.EVAL_MEAN_ACC:
            return _untested(spec, f"the study evaluated no downstream tasks (no {names.EVAL_MEAN_ACC} logged)")
        return _untested(spec, f"{spec.metric} was not logged by any finished training run")
    saturated = _saturated(spec, rows["value"].drop_nans().to_numpy())
    if saturated:
        return _untested(spec, saturated, NOT_TESTABLE)
    paired = pair_arms(rows, treatment=treatment, control=control, relative=relative)
    if paired.is_empty():
        return _untested(spec, f"no finished ({treatment}, {control}) pair with the same rung and seed")
    n, diff = paired["n"].to_numpy(), paired["diff"].to_numpy()
    result = compute_pooled_effect(n, diff, threshold=spec.threshold, delta=delta, confidence=confidence,
                              bounds=difference_range(spec.metric, relative=relative), unit="pair")
    return _check(spec, result, zip(n.tolist(), diff.tolist()))


def _check_slope(spec: ClaimSpec, n: np.ndarray, y: np.ndarray, confidence: float, delta: float | None, *, unit: str,
                 difference: bool) -> ClaimCheck:
    if n.size == 0:
        return _untested(spec, f"no finished run logged {spec.metric}")
    saturated = _saturated(spec, y)
    if saturated:
        return _untested(spec, saturated, NOT_TESTABLE)
    result = compute_slope_effect(n, y, delta=delta, confidence=confidence, bounds=slope_range(spec.metric, n, difference=difference), unit=unit)
    line = None
    if np.unique(n).size >= 2:
        slope, intercept, _, _ = rung_slope(n, y)
        line = (intercept, slope)
    return _check(spec, result, zip(n.tolist(), y.tolist()), line=line)


def _decide(checks: list[ClaimCheck], specs: dict[str, ClaimSpec], alpha: float) -> list[ClaimCheck]:
    """Holm across the tested claims, then each verdict from its adjusted p-values."""
    adjusted = holm([c.p_value if c.verdict not in UNTESTED else math.nan for c in checks])
    adjusted_eq = holm([c.p_equivalence if c.verdict not in UNTESTED else math.nan for c in checks])
    out = []
    for check, p_adj, p_eq_adj in zip(checks, adjusted, adjusted_eq):
        if check.verdict in UNTESTED:
            out.append(check)
            continue
        spec = specs[check.key]
        verdict = INCONCLUSIVE
        if p_adj < alpha:
            side = "below" if check.estimate.estimate < spec.threshold else "above"
            verdict = SUPPORTED if spec.side in ("nonzero", side) else CONTRADICTED
        elif p_eq_adj < alpha:
            verdict = NO_EFFECT
        against = spec.paper_claims_it and verdict in (CONTRADICTED, NO_EFFECT)
        out.append(dataclasses.replace(check, verdict=verdict, p_adjusted=p_adj, p_equivalence_adjusted=p_eq_adj, contradicts_paper=against))
    return out


def check_paper_claims(final: pl.DataFrame, initial: pl.DataFrame, *, treatment: str = names.ARM_DISPERSION,
                       control: str = names.ARM_BASELINE, first_probe_step: int | None = None, pretrained: str | None = None,
                       confidence: float = 0.95, smallest_effects: dict[str, float] | None = None, seed: int = 0,
                       claims: tuple[str, ...] | None = None) -> tuple[ClaimCheck, ...]:
    """Test `PAPER_CLAIMS` on a study.

    `final`: final values of finished training runs (columns rung, n, arm, seed, metric, value),
    eval/mean_acc at each run's validation-selected checkpoint; `initial`: the same columns at
    step 0 (optionally `init_hash`); `pretrained`: what the runs started from when they did not
    start from random weights (claim (a) is then not tested); `claims`: test only these (a study's
    stated claims, `decide.claims`): Holm's family is then those claims alone. Never raises for
    missing data: an untestable claim says why.
    """
    deltas = dict(SMALLEST_EFFECTS)
    unknown = sorted(set(smallest_effects or {}) - set(CLAIM_KEYS))
    if unknown:
        raise ConfigError(f"smallest effect for unknown claim(s) {unknown}; use keys of {list(CLAIM_KEYS)}")
    deltas.update(smallest_effects or {})
    specs = {spec.key: dataclasses.replace(spec, smallest_effect=deltas.get(spec.key)) for spec in PAPER_CLAIMS}
    arms = set(final["arm"].drop_nulls().to_list()) if final.height else set()
    missing = [arm for arm in (treatment, control) if arm not in arms]
    absent = f"no finished runs of arm(s) {', '.join(missing)}"
    checks = [_check_initial(specs["a"], initial, first_probe_step=first_probe_step, pretrained=pretrained, confidence=confidence, seed=seed)]
    for key in ("b", "b-rho", "c"):
        checks.append(_untested(specs[key], absent) if missing else
                      _check_paired(specs[key], final, treatment, control, confidence, specs[key].smallest_effect, relative=key == "c"))
    for key in ("d", "d-rho"):
        base = final.filter((pl.col("arm") == control) & (pl.col("metric") == specs[key].metric) & pl.col("value").is_finite()).drop_nulls("n")
        checks.append(_check_slope(specs[key], base["n"].to_numpy(), base["value"].to_numpy(), confidence, specs[key].smallest_effect,
                                   unit="run", difference=False) if base.height else
                      _untested(specs[key], f"no finished {control} run logged {specs[key].metric}"))
    for key in ("e", "e-rho"):
        rows = final.filter(pl.col("metric") == specs[key].metric)
        paired = pair_arms(rows, treatment=treatment, control=control) if not missing else pl.DataFrame()
        if missing or paired.is_empty():
            checks.append(_untested(specs[key], absent if missing else "no paired runs"))
            continue
        saturated = _saturated(specs[key], rows["value"].drop_nans().to_numpy())
        checks.append(_untested(specs[key], saturated, NOT_TESTABLE) if saturated else
                      _check_slope(specs[key], paired["n"].to_numpy(), paired["diff"].to_numpy(), confidence, specs[key].smallest_effect,
                                   unit="pair", difference=True))
    checks.append(_untested(specs["f"], absent) if missing else _check_paired(specs["f"], final, treatment, control, confidence,
                                                                              specs["f"].smallest_effect))
    if claims is not None:
        checks = [c if c.key in claims else _untested(specs[c.key], STATED) for c in checks]
    decided = _decide(checks, specs, 1.0 - confidence)
    return tuple(_with_direction_note(c, final, treatment, control) for c in decided)


def _with_direction_note(check: ClaimCheck, final: pl.DataFrame, treatment: str, control: str) -> ClaimCheck:
    """Claims (e): say whether a supported change makes the effect grow or shrink with N."""
    if not check.key.startswith("e") or check.verdict != SUPPORTED:
        return check
    paired = pair_arms(final.filter(pl.col("metric") == check.metric), treatment=treatment, control=control)
    grows = (check.estimate.estimate > 0) == (float(paired["diff"].mean()) > 0)
    return dataclasses.replace(check, note="; ".join(x for x in (f"the effect {'grows' if grows else 'shrinks'} with N", check.note) if x))
