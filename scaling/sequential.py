"""A study that runs until its claims are decided: the `decide:` section and its wave plan (pure Python).

The driver trains a first wave (the study's `seeds`), tests the stated claims on what MLflow holds, and
adds seeds in further waves only while a stated claim is undecided and more seeds can still decide it
within the budget. Looking after every wave would inflate false verdicts, so each look k tests at its
own share alpha_k of alpha, from a pre-planned alpha-spending function of the planned fraction of runs
(Lan & DeMets 1983), and the looks are joined by a union (Bonferroni) bound: the chance of any wrong
verdict over all looks is at most sum_k alpha_k = alpha whatever the correlation between looks, and
whenever the study stops (stopping can only remove later chances to err). Within a look, Holm's
procedure over the stated claims runs at alpha_k; the "no effect" (TOST) verdicts are spent the same
way. docs/statistics.md has the argument, its references and the measured error rates.

This module holds what both the driver (`scaling.study`) and the analysis (`analysis.waves`) need and
nothing heavier than the standard library: the claim keys and their default smallest effects, the
config section, the spending functions and the plan of looks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

from scaling.errors import ConfigError

CLAIM_KEYS = ("a", "b", "b-rho", "c", "d", "d-rho", "e", "e-rho", "f")
"""The paper's claims as `analysis.claims.PAPER_CLAIMS` tests them (same order)."""
SMALLEST_EFFECTS = {"b": 0.02, "b-rho": 0.1, "d": 0.02, "d-rho": 0.1, "e": 0.02, "e-rho": 0.1, "f": 0.01}
"""Default smallest effects of interest: 0.02 mean cosine (about a tenth of the late-layer
cosine the paper's dispersion removes in GPT-2), 0.1 of a rank correlation, one accuracy point;
slopes per decade of N. `--smallest-effect KEY=VALUE` (analysis) or `decide.smallest_effects` change them."""
PAIRED_CLAIMS = frozenset({"b", "b-rho", "c", "e", "e-rho", "f"})
"""Claims on paired differences: they need the baseline and the dispersion arm."""
SLOPE_CLAIMS = frozenset({"d", "d-rho", "e", "e-rho"})
"""Claims on a slope over log N: they need at least 3 rungs."""

SPENDING = ("obrien_fleming", "pocock")
MAX_SEEDS = 1000
"""No study grows past this many seeds per rung and arm (a larger budget is a typo)."""


def compute_spent_alpha(fraction: float, alpha: float, spending: str) -> float:
    """Alpha spent by the time `fraction` (0..1) of the planned runs is in (Lan & DeMets 1983):
    O'Brien-Fleming-like 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)) keeps most of alpha for the last look;
    Pocock-like alpha ln(1 + (e - 1) t) spreads it evenly. Both are alpha at t = 1."""
    t = min(max(fraction, 0.0), 1.0)
    if t == 0.0:
        return 0.0
    if spending == "obrien_fleming":
        normal = NormalDist()
        return min(alpha, 2.0 - 2.0 * normal.cdf(normal.inv_cdf(1.0 - alpha / 2.0) / math.sqrt(t)))
    if spending == "pocock":
        return min(alpha, alpha * math.log(1.0 + (math.e - 1.0) * t))
    raise ConfigError(f"decide.spending={spending!r}: use one of {list(SPENDING)}")


@dataclass(frozen=True)
class DecideConfig:
    """What a study must decide and what it may spend: claims, error rates and budget."""

    claims: tuple[str, ...] = ()
    """The claims to decide (keys of analysis.claims.PAPER_CLAIMS: a, b, b-rho, c, d, d-rho, e, e-rho, f)."""
    smallest_effects: dict[str, float] = field(default_factory=dict)
    """Smallest effect of interest per claim, for its 'no effect' verdict (defaults: SMALLEST_EFFECTS)."""
    alpha: float = 0.05
    """Chance of any wrong verdict over all looks and stated claims."""
    power: float = 0.8
    """Power at which the report quotes, for a claim left undecided, the seeds per rung a fixed design would need
    (from the measured variance)."""
    max_seeds: int | None = None
    """Budget: seeds per rung and arm the study may grow to, the first wave's included."""
    max_runs: int | None = None
    """Budget: training runs in all (rungs x arms x seeds); with max_seeds the smaller bound holds."""
    wave_seeds: int = 1
    """Seeds added per rung and arm in each later wave."""
    spending: str = "obrien_fleming"
    """Alpha-spending function over the planned looks: obrien_fleming (little alpha early) or pocock (even)."""
    futility: bool = True
    """Stop when more seeds within the budget have less than a 20% chance (at the effects measured so far) to
    decide any open claim (false: spend the budget until every claim is decided)."""

    def __post_init__(self):
        if not self.claims:
            raise ConfigError(f"decide.claims is empty; name the claims to decide, e.g. [b, c, f] (of {', '.join(CLAIM_KEYS)})")
        unknown = [c for c in self.claims if c not in CLAIM_KEYS]
        if unknown:
            raise ConfigError(f"decide.claims: {unknown[0]!r} is not a claim; use keys of {', '.join(CLAIM_KEYS)}")
        for key, delta in self.smallest_effects.items():
            if key not in self.claims:
                raise ConfigError(f"decide.smallest_effects.{key}: {key!r} is not among decide.claims {list(self.claims)}; "
                                  "add it there or drop the entry")
            if key not in SMALLEST_EFFECTS:
                raise ConfigError(f"decide.smallest_effects.{key}={delta}: claim {key} has no 'no effect' verdict "
                                  f"(only {', '.join(SMALLEST_EFFECTS)} do); drop the entry")
            if not delta > 0:
                raise ConfigError(f"decide.smallest_effects.{key}={delta}: must be > 0, e.g. {SMALLEST_EFFECTS[key]}")
        if not 0 < self.alpha <= 0.5:
            raise ConfigError(f"decide.alpha={self.alpha}: must be in (0, 0.5], e.g. 0.05")
        if not 0.5 <= self.power < 1:
            raise ConfigError(f"decide.power={self.power}: must be in [0.5, 1), e.g. 0.8")
        if self.max_seeds is None and self.max_runs is None:
            raise ConfigError("decide: no budget; give max_seeds (seeds per rung and arm) and/or max_runs (runs in all), "
                              "e.g. max_seeds: 5")
        if self.max_seeds is not None and not 1 <= self.max_seeds <= MAX_SEEDS:
            raise ConfigError(f"decide.max_seeds={self.max_seeds}: must be in 1..{MAX_SEEDS}, e.g. 5")
        if self.max_runs is not None and self.max_runs < 1:
            raise ConfigError(f"decide.max_runs={self.max_runs}: must be >= 1")
        if not 1 <= self.wave_seeds <= MAX_SEEDS:
            raise ConfigError(f"decide.wave_seeds={self.wave_seeds}: must be in 1..{MAX_SEEDS}, e.g. 1")
        if self.spending not in SPENDING:
            raise ConfigError(f"decide.spending={self.spending!r}: use one of {', '.join(SPENDING)}")

    def deltas(self) -> dict[str, float]:
        """Smallest effect of every claim that has one: the defaults, then this study's."""
        return {**SMALLEST_EFFECTS, **self.smallest_effects}


@dataclass(frozen=True)
class Look:
    """One planned look: after wave `wave`, with `seeds` per rung and arm, testing at `alpha`."""

    wave: int
    seeds: int
    runs: int
    alpha: float
    """Alpha spent at this look (Holm over the stated claims runs at this level)."""
    spent: float
    """Alpha spent up to and including this look."""


@dataclass(frozen=True)
class WavePlan:
    """The planned looks of a study (the largest it can grow to is the last one)."""

    looks: tuple[Look, ...]
    first_seeds: tuple[int, ...]
    rungs: int
    arms: int
    max_seeds: int
    """Seeds per rung and arm the budget allows."""
    bound: str
    """Which budget key binds (and how)."""

    def seeds_at(self, wave: int) -> tuple[int, ...]:
        """The seed numbers of waves 1..`wave`: the study's seeds, then the next unused integers, in order
        (deterministic, so a resumed study trains the same runs)."""
        count = self.looks[min(wave, len(self.looks)) - 1].seeds
        seeds = list(self.first_seeds)
        nxt = max(self.first_seeds) + 1
        while len(seeds) < count:
            seeds.append(nxt)
            nxt += 1
        return tuple(seeds)


def plan_waves(decide: DecideConfig, first_seeds: tuple[int, ...], rungs: int, arms: int) -> WavePlan:
    """Waves of `wave_seeds` more seeds per rung and arm from the first wave up to the budget; each look
    spends alpha by the fraction of the largest study's runs it has seen."""
    first = len(first_seeds)
    per_seed = rungs * arms
    limits = []
    if decide.max_seeds is not None:
        limits.append((decide.max_seeds, f"max_seeds {decide.max_seeds}"))
    if decide.max_runs is not None:
        limits.append((decide.max_runs // per_seed, f"max_runs {decide.max_runs} ({decide.max_runs // per_seed} seeds x "
                                                    f"{rungs} rung(s) x {arms} arm(s))"))
    most, bound = min(limits)
    if most > MAX_SEEDS:
        raise ConfigError(f"decide.max_runs={decide.max_runs}: allows {most} seeds per rung and arm, more than {MAX_SEEDS}; "
                          f"give at most {MAX_SEEDS * per_seed} runs or a max_seeds")
    if most < first:
        raise ConfigError(f"decide: the budget ({bound}) is smaller than the first wave ({first} seed(s) x {rungs} rung(s) x "
                          f"{arms} arm(s) = {first * per_seed} runs); raise the budget or list fewer seeds")
    if max(first_seeds) + (most - first) > 2**32 - 1:
        raise ConfigError(f"seeds={list(first_seeds)[:8]}: the seeds added after them would pass 2**32-1; start lower")
    counts = [first]
    while counts[-1] < most:
        counts.append(min(most, counts[-1] + decide.wave_seeds))
    largest = counts[-1] * per_seed
    looks, spent = [], 0.0
    for wave, seeds in enumerate(counts, start=1):
        total = compute_spent_alpha(seeds * per_seed / largest, decide.alpha, decide.spending)
        looks.append(Look(wave, seeds, seeds * per_seed, total - spent, total))
        spent = total
    return WavePlan(tuple(looks), tuple(first_seeds), rungs, arms, most, bound)


def describe_plan(plan: WavePlan, decide: DecideConfig) -> list[str]:
    """The dry run's lines: first wave, the largest study, the budget bound, alpha per look."""
    first, last = plan.looks[0], plan.looks[-1]
    lines = [f"decide: claims {', '.join(decide.claims)} at alpha {decide.alpha:g} (any wrong verdict over all looks), "
             f"power {decide.power:g}; {decide.spending.replace('_', '-')} alpha spending over {len(plan.looks)} look(s), "
             "Bonferroni across looks, Holm across claims",
             f"decide: first wave {first.runs} runs ({first.seeds} seed(s) x {plan.rungs} rung(s) x {plan.arms} arm(s)); "
             f"at most {len(plan.looks)} wave(s) growing to {last.runs} runs ({last.seeds} seeds per rung and arm); budget "
             f"bound: {plan.bound}",
             "decide: alpha per look " + ", ".join(f"{look.wave}: {look.alpha:.3g} ({look.runs} runs)" for look in plan.looks)]
    if len(plan.looks) == 1:
        lines.append("decide: the budget allows no wave beyond the first: this is a fixed design")
    return lines
