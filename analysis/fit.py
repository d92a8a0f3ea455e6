"""Pure scaling-curve mechanics: power law with an offset, trends, bootstrap intervals.

Everything here takes numpy arrays and returns typed, immutable results; nothing reads
MLflow or writes files. The recipe follows Hoffmann et al. 2022 (Chinchilla, approach 3)
and Besiroglu et al. 2024: fit `y = a * N^(-alpha) + c` by minimising a Huber loss of the
residuals in log space with L-BFGS-B from a grid of starting points, and get intervals by
bootstrapping runs within rungs.

Which metrics may be fitted as a power law: only strictly positive ones whose natural floor
is zero or a positive irreducible value -- losses and mean cosine similarities (the mean of
a cosine matrix with its diagonal is ||sum x||^2 / T^2 >= 0). Rank correlations (Spearman,
Kendall) live in [-1, 1], are negative for models that resist condensation, and saturate at
-1 rather than at an offset above zero, so a log-space power law is undefined for them; they
get the trend (Spearman of metric vs log N) only. See `POWER_LAW_METRICS`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize, stats

from scaling import names
from scaling.errors import ConfigError, DataError

# Metrics for which `a * N^-alpha + c` with a, c >= 0 is meaningful (strictly positive,
# decreasing towards a floor). Everything else gets a trend only (module docstring).
POWER_LAW_METRICS = frozenset(
    {
        names.VAL_LOSS,
        names.TRAIN_CE_LOSS,
        names.TRAIN_LOSS,
        names.COND_LAST_LAYER_MEAN_COS,
        names.COND_LATE_HALF_MEAN_COS,
    }
)

_N_PARAMS_OF_LAW = 3
RANK_METRICS = frozenset({names.COND_SPEARMAN, names.COND_KENDALL})
"""Signed, bounded in [-1, 1]: trends only, never a power law."""


def _single_threaded_blas(func):
    """Run `func` with BLAS limited to one thread.

    L-BFGS-B on three parameters calls BLAS on tiny vectors thousands of times; with
    OpenBLAS threads on a busy 2-core machine each call paid ~1.5 ms of thread hand-off
    (a 60-replicate bootstrap took 2.3 s instead of 0.15 s). threadpoolctl ships with
    scikit-learn (an MLflow dependency); without it the fit is just slower.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - only without scikit-learn
            limits = contextlib.nullcontext()
        else:
            limits = threadpool_limits(limits=1, user_api="blas")
        with limits:
            return func(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class FitOptions:
    """How power laws and trends are fitted. Defaults are the recipe; tests shrink them."""

    huber_delta: float = 1e-2
    """Huber threshold on log-space residuals (Hoffmann et al. used 1e-3 for loss; 1e-2 is
    less L1-like and gave nominal coverage on our synthetic ladders)."""
    n_bootstrap: int = 200
    """Bootstrap replicates for every interval."""
    confidence: float = 0.95
    """Two-sided level of every interval."""
    alpha_bounds: tuple[float, float] = (1e-3, 3.0)
    """Bounds of the exponent."""
    alpha_starts: tuple[float, ...] = (0.05, 0.2, 0.5, 1.0, 2.0)
    """Grid of starting exponents."""
    offset_starts: tuple[float, ...] = (0.0, 0.5, 0.9)
    """Grid of starting offsets, as fractions of the smallest observation."""
    min_rungs: int = 4
    """Fewest distinct sizes for a power law: it has three parameters, so three rungs fit it
    exactly (no residual left to judge it by); four is the least that can disagree with it."""
    min_rank_correlation: float = 0.8
    """Rung means must decrease with N at least this strongly (Spearman <= -value)."""
    seed: int = 0
    """Seed of every bootstrap."""

    def __post_init__(self) -> None:
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence={self.confidence!r} must lie in (0, 1); use e.g. 0.95")
        if self.n_bootstrap < 0:
            raise ConfigError(f"n_bootstrap={self.n_bootstrap!r} must be >= 0; use e.g. 400 (0 = no intervals)")
        if self.huber_delta <= 0:
            raise ConfigError(f"huber_delta={self.huber_delta!r} must be > 0; use e.g. 1e-2")
        lo, hi = self.alpha_bounds
        if not 0 <= lo < hi:
            raise ConfigError(f"alpha_bounds={self.alpha_bounds!r} must satisfy 0 <= low < high; use e.g. (1e-3, 3.0)")
        if self.min_rungs <= _N_PARAMS_OF_LAW:
            raise ConfigError(
                f"min_rungs={self.min_rungs!r} must be >= 4: a power law with offset has 3 parameters and passes exactly "
                "through 3 rungs, which tests nothing; use 4 or more"
            )
        if not self.alpha_starts or not self.offset_starts:
            raise ConfigError("alpha_starts and offset_starts must be non-empty grids of starting points")


@dataclass(frozen=True)
class PowerLaw:
    """`y = a * N^(-alpha) + c`, with `a = A * n_ref^alpha` kept in scaled form for stability."""

    scale: float
    """A: the curve's excess over c at N = n_ref."""
    alpha: float
    offset: float
    """c: the value the curve tends to as N grows."""
    n_ref: float
    """Reference size the scale is quoted at (geometric mean of the fitted sizes)."""

    @property
    def a(self) -> float:
        """The coefficient in `a * N^(-alpha)`, unscaled."""
        return self.scale * self.n_ref**self.alpha

    def predict(self, n: np.ndarray | float) -> np.ndarray:
        return self.scale * (np.asarray(n, dtype=float) / self.n_ref) ** (-self.alpha) + self.offset

    def size_reaching(self, value: float) -> float:
        """N at which the curve equals `value`; inf when `value` is at or below the offset."""
        excess = value - self.offset
        if excess <= 0 or self.scale <= 0:
            return math.inf
        return float(self.n_ref * (excess / self.scale) ** (-1.0 / self.alpha))


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided bootstrap interval (NaN bounds when unavailable)."""

    estimate: float
    low: float
    high: float
    why: str = ""
    """Why there are no bounds (e.g. "1 seed"), empty when there are."""

    @property
    def has_bounds(self) -> bool:
        return bool(math.isfinite(self.low) and math.isfinite(self.high))

    def contains(self, value: float) -> bool:
        return bool(self.low <= value <= self.high)


@dataclass(frozen=True)
class PowerLawFit:
    """A fitted power law with bootstrap intervals of every parameter and of the curve."""

    law: PowerLaw
    a: Interval
    alpha: Interval
    offset: Interval
    huber_loss: float
    n_points: int
    n_rungs: int
    bootstrap: str
    """'cases-within-rungs', 'residuals' or 'none' (why: see `note`)."""
    curve_n: np.ndarray = field(repr=False)
    curve_low: np.ndarray = field(repr=False)
    curve_high: np.ndarray = field(repr=False)
    boot_laws: tuple[PowerLaw, ...] = field(repr=False, default=())
    log_residuals: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    note: str = ""


@dataclass(frozen=True)
class Trend:
    """How a metric moves with size when no power law is fitted (or beside one): the
    Spearman correlation with log N and the least-squares slope per decade of N, both with
    bootstrap CIs from the same resamples."""

    spearman: Interval
    n_points: int
    n_rungs: int
    note: str = ""
    slope_per_decade: Interval | None = None
    """OLS slope of the metric on log10 N: change per tenfold size (an effect size, unlike rho)."""
    runs_per_rung: int = 0
    """Fewest runs (seeds) at any rung: below 2, intervals come from resampling across sizes or are absent."""


@dataclass(frozen=True)
class HoldoutCheck:
    """Leave-largest-rung-out: fit the smaller rungs, predict the largest rung's mean."""

    n_heldout: float
    observed: float
    predicted: float
    relative_error: float
    prediction_low: float
    prediction_high: float
    inside: bool


@dataclass(frozen=True)
class CurveResult:
    """What a metric's scaling looks like: a power law when supported, always a trend."""

    metric: str
    trend: Trend | None
    fit: PowerLawFit | None
    holdout: HoldoutCheck | None
    supported: bool
    reason: str
    """Why no power law (empty when supported), or why the holdout check is missing."""


# --- validation -------------------------------------------------------------------------


def _as_clean_arrays(n: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    n = np.asarray(n, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if n.shape != y.shape:
        raise DataError(f"{what}: sizes ({n.size}) and values ({y.size}) differ in length; pass one value per run")
    if n.size == 0:
        raise DataError(f"{what}: no observations; check that the study has finished runs that logged it")
    if not np.all(np.isfinite(n)) or np.any(n <= 0):
        raise DataError(f"{what}: parameter counts must be finite and > 0, got {n[~(np.isfinite(n) & (n > 0))][:3]}; check the n_params tags")
    bad = ~np.isfinite(y)
    if np.any(bad):
        raise DataError(
            f"{what}: {int(bad.sum())} of {y.size} values are NaN or infinite (at N={sorted(set(n[bad].tolist()))[:3]}); "
            "drop or re-run those runs (a diverged run should be marked failed)"
        )
    return n, y


def is_constant(y: np.ndarray) -> bool:
    y = np.asarray(y, dtype=float)
    return bool(np.ptp(y) <= 1e-12 * max(1.0, float(np.abs(y).max())))


def constant_reason(y: np.ndarray) -> str:
    """Why a constant metric has no fit or trend, in words (a rank correlation pinned at
    +-1 is saturated: with few layers every run orders them the same way)."""
    value = float(np.asarray(y, dtype=float).ravel()[0])
    if abs(abs(value) - 1.0) < 1e-9:
        return f"saturated: every run at {value:+.3f}, the bound of a rank correlation"
    return f"constant at {value:.6g} in every run: nothing varies with N"


def _check_fittable(n: np.ndarray, y: np.ndarray, what: str, min_rungs: int) -> None:
    rungs = np.unique(n)
    if rungs.size < min_rungs:
        raise DataError(f"{what}: {rungs.size} distinct size(s) {rungs.tolist()}; a power law with offset needs >= {min_rungs}; add rungs")
    if np.any(y <= 0):
        raise DataError(f"{what}: values must be > 0 for a log-space fit, got min {y.min():.4g}; use the trend instead")
    if is_constant(y):
        raise DataError(f"{what}: {constant_reason(y)}; nothing to fit")


# --- power law --------------------------------------------------------------------------


def _huber_objective(theta: np.ndarray, log_x: np.ndarray, log_y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of log-space residuals and its gradient; theta = (log A, alpha, log c)."""
    log_scale, alpha, log_offset = theta
    u = np.exp(log_scale - alpha * log_x)
    v = math.exp(log_offset)
    pred = u + v
    r = np.log(pred) - log_y
    small = np.abs(r) <= delta
    loss = float(np.sum(np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))))
    psi = np.where(small, r, delta * np.sign(r)) / pred
    grad = np.array([np.sum(psi * u), np.sum(psi * -log_x * u), np.sum(psi * v)])
    return loss, grad


def _fit_law_once(n: np.ndarray, y: np.ndarray, options: FitOptions, starts: list[np.ndarray] | None = None) -> tuple[PowerLaw, float]:
    n_ref = float(np.exp(np.mean(np.log(np.unique(n)))))
    log_x = np.log(n / n_ref)
    log_y = np.log(y)
    y_min, y_max = float(y.min()), float(y.max())
    # log c down to ~1e-9 of the data is "no offset"; above max(y) the law cannot decrease to the data.
    bounds = [
        (math.log(y_max) - 25.0, math.log(y_max) + 10.0),
        options.alpha_bounds,
        (math.log(y_min) - 20.0, math.log(y_max)),
    ]
    if starts is None:
        starts = []
        mean_y = float(np.mean(y))
        for alpha0 in options.alpha_starts:
            for frac in options.offset_starts:
                c0 = max(frac * y_min, y_min * 1e-8)
                scale0 = max(mean_y - c0, y_min * 1e-6)
                starts.append(np.array([math.log(scale0), alpha0, math.log(c0)]))
    best_theta, best_loss = None, math.inf
    for start in starts:
        start = np.clip(start, [b[0] for b in bounds], [b[1] for b in bounds])
        res = optimize.minimize(
            _huber_objective, start, args=(log_x, log_y, options.huber_delta), jac=True, method="L-BFGS-B", bounds=bounds
        )
        if np.isfinite(res.fun) and res.fun < best_loss:
            best_theta, best_loss = res.x, float(res.fun)
    if best_theta is None:
        raise DataError("power-law fit: no starting point converged to a finite loss; the data may not follow a power law")
    law = PowerLaw(scale=float(math.exp(best_theta[0])), alpha=float(best_theta[1]), offset=float(math.exp(best_theta[2])), n_ref=n_ref)
    return law, best_loss


def _law_start(law: PowerLaw, n_ref: float) -> np.ndarray:
    """Starting point for a refit on resampled data, rescaled to that data's n_ref."""
    scale = law.scale * (n_ref / law.n_ref) ** (-law.alpha)
    return np.array([math.log(max(scale, 1e-300)), law.alpha, math.log(max(law.offset, 1e-300))])


def group_indices(n: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(n == value) for value in np.unique(n)]


def resample_within_groups(n: np.ndarray, y: np.ndarray, groups: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resample runs with replacement inside each rung, widening each draw's spread about
    the rung mean by sqrt(k / (k - 1)): with k = 2..5 seeds the plain percentile bootstrap
    underestimates the variance of a rung mean by the factor (k - 1) / k."""
    n_parts, y_parts = [], []
    for g in groups:
        draw = y[rng.choice(g, size=g.size, replace=True)]
        centre = float(np.mean(y[g]))
        widen = math.sqrt(g.size / (g.size - 1)) if g.size > 1 else 1.0
        widened = centre + widen * (draw - centre)
        # Keep values positive for log-space fits (only matters for extreme relative noise).
        y_parts.append(np.where(widened > 0, widened, draw))
        n_parts.append(n[g])
    return np.concatenate(n_parts), np.concatenate(y_parts)


def rung_residuals(n: np.ndarray, y: np.ndarray, law: PowerLaw) -> tuple[list[np.ndarray], np.ndarray, float]:
    """(rung groups, each rung's mean log residual, the scale that undoes the fit's use of
    3 of the R rung means' degrees of freedom: sqrt(R / (R - 3)))."""
    groups = group_indices(n)
    log_resid = np.log(y) - np.log(law.predict(n))
    means = np.array([log_resid[g].mean() for g in groups])
    scale = math.sqrt(len(groups) / max(len(groups) - _N_PARAMS_OF_LAW, 1))
    return groups, means, scale


def _bootstrap_laws(n: np.ndarray, y: np.ndarray, law: PowerLaw, options: FitOptions) -> tuple[list[PowerLaw], str, str]:
    """Refit on data resampled at both levels of a ladder: each rung's deviation from the curve
    (its mean log residual, rescaled for the 3 fitted parameters) is replaced by one drawn from
    all rungs, and runs are resampled within each rung that has >= 2. Rung deviations are what a
    within-rung bootstrap misses: with 2 seeds its 95% intervals of the exponent held the truth
    about 60% of the time in `bench/bench_calibration.py`."""
    if options.n_bootstrap == 0:
        return [], "none", "bootstrap disabled (n_bootstrap=0)"
    rng = np.random.default_rng(options.seed)
    groups, rung_resid, scale = rung_residuals(n, y, law)
    within = all(g.size >= 2 for g in groups)
    mode = "rungs and runs" if within else "rungs"
    note = "" if within else "some rung has a single run: only rung deviations are resampled"
    rung_of = np.empty(n.size, dtype=int)
    for i, g in enumerate(groups):
        rung_of[g] = i
    laws = []
    for _ in range(options.n_bootstrap):
        shift = rng.choice(rung_resid, size=len(groups), replace=True) * scale - rung_resid
        if within:
            n_b, y_b = resample_within_groups(n, y, groups, rng)
            order = np.concatenate(groups)  # resample_within_groups returns rungs in `groups` order
            y_b = y_b * np.exp(shift[rung_of[order]])
        else:
            n_b, y_b = n, y * np.exp(shift[rung_of])
        if np.ptp(y_b) <= 0:
            continue
        n_ref = float(np.exp(np.mean(np.log(np.unique(n_b)))))
        # A warm start from the full-data fit keeps the bootstrap cheap (~15x fewer starts).
        starts = [_law_start(law, n_ref)]
        try:
            fitted, _ = _fit_law_once(n_b, y_b, options, starts)
        except DataError:
            continue
        laws.append(fitted)
    return laws, mode, note


def interval_from_samples(estimate: float, samples: np.ndarray, confidence: float, *, why: str = "no bootstrap sample") -> Interval:
    """Percentile interval of the finite samples; without >= 2 of them, no bounds and `why`."""
    samples = samples[np.isfinite(samples)]
    if samples.size < 2:
        return Interval(float(estimate), math.nan, math.nan, why)
    if is_constant(samples):
        return Interval(float(estimate), math.nan, math.nan, "every resample gives the same value: nothing varies to build an interval from")
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return Interval(float(estimate), float(low), float(high))


@_single_threaded_blas
def fit_power_law(n: np.ndarray, y: np.ndarray, options: FitOptions = FitOptions(), *, what: str = "power-law fit", curve_n: np.ndarray | None = None) -> PowerLawFit:
    """Fit `y = a * N^(-alpha) + c` (a, c >= 0) to one value per run, with bootstrap CIs.

    Raises `DataError` with the reason when the data cannot support the fit (NaN, fewer
    than `options.min_rungs` sizes, non-positive or constant values).
    """
    n, y = _as_clean_arrays(n, y, what)
    _check_fittable(n, y, what, options.min_rungs)
    law, loss = _fit_law_once(n, y, options)
    laws, mode, note = _bootstrap_laws(n, y, law, options)
    if curve_n is None:
        curve_n = np.geomspace(n.min(), n.max(), 64)
    curve_n = np.asarray(curve_n, dtype=float)
    if laws:
        curves = np.stack([b.predict(curve_n) for b in laws])
        tail = 50.0 * (1.0 - options.confidence)
        curve_low, curve_high = np.percentile(curves, [tail, 100.0 - tail], axis=0)
    else:
        curve_low = curve_high = np.full(curve_n.shape, math.nan)
    return PowerLawFit(
        law=law,
        a=interval_from_samples(law.a, np.array([b.a for b in laws]), options.confidence, why=note or "no bootstrap fit converged"),
        alpha=interval_from_samples(law.alpha, np.array([b.alpha for b in laws]), options.confidence, why=note or "no bootstrap fit converged"),
        offset=interval_from_samples(law.offset, np.array([b.offset for b in laws]), options.confidence, why=note or "no bootstrap fit converged"),
        huber_loss=loss,
        n_points=int(n.size),
        n_rungs=int(np.unique(n).size),
        bootstrap=mode,
        curve_n=curve_n,
        curve_low=np.asarray(curve_low),
        curve_high=np.asarray(curve_high),
        boot_laws=tuple(laws),
        log_residuals=np.log(y) - np.log(law.predict(n)),
        note=note,
    )


# --- trend --------------------------------------------------------------------------------


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    # Pearson of average ranks (= Spearman with ties); ~20x cheaper than stats.spearmanr.
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    return float(np.dot(rx, ry) / math.sqrt(float(np.dot(rx, rx)) * float(np.dot(ry, ry))))


def rung_means(n: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sizes, the mean of `values` at each, how many values each has), small size first."""
    n, values = np.asarray(n, dtype=float), np.asarray(values, dtype=float)
    sizes = np.unique(n)
    return sizes, np.array([values[n == s].mean() for s in sizes]), np.array([int(np.sum(n == s)) for s in sizes])


def rung_slope(n: np.ndarray, values: np.ndarray) -> tuple[float, float, float, int]:
    """OLS of the rung means on log10 N: (slope, intercept, SE of the slope, rungs); SE NaN below 3 rungs."""
    sizes, means, _ = rung_means(n, values)
    x = np.log10(sizes)
    xc = x - x.mean()
    slope = float(np.dot(xc, means - means.mean()) / np.dot(xc, xc))
    intercept = float(means.mean() - slope * x.mean())
    if sizes.size < 3:
        return slope, intercept, math.nan, int(sizes.size)
    resid = means - (intercept + slope * x)
    se = math.sqrt(float(np.sum(resid**2)) / (sizes.size - 2) / float(np.dot(xc, xc)))
    if se <= 1e-12 * max(1.0, abs(slope)):
        se = 0.0  # rung means exactly on a line: round-off, not an error estimate
    return slope, intercept, se, int(sizes.size)


def clip_interval(interval: Interval, bounds: tuple[float, float]) -> Interval:
    """The interval without the values the statistic cannot take (coverage is unchanged)."""
    low, high = bounds
    return Interval(interval.estimate, max(interval.low, low), min(interval.high, high), interval.why)


def t_interval(estimate: float, se: float, df: float, confidence: float,
               bounds: tuple[float, float] = (-math.inf, math.inf)) -> Interval:
    """estimate +- t(df) x se at `confidence`, clipped to `bounds` (what the statistic can take)."""
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return clip_interval(Interval(estimate, estimate - half, estimate + half), bounds)


def _slope(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0:
        return math.nan
    xc = x - x.mean()
    return float(np.dot(xc, y - y.mean()) / np.dot(xc, xc))


def compute_trend(n: np.ndarray, y: np.ndarray, options: FitOptions = FitOptions(), *, what: str = "trend") -> Trend:
    """Spearman of y with log N over runs, and the slope of the rung means per decade of N.

    The slope's interval is a t interval with R - 2 df from the rung means' scatter about the
    line (the rung as a random effect; none below 3 sizes). Spearman gets a case-bootstrap
    interval only with one run per size (>= 4 sizes, e.g. released models); with seeds it is
    descriptive, since resampling seeds within rungs would ignore rung-to-rung variation.
    Needs >= 2 sizes and a non-constant metric (else `DataError`).
    """
    n, y = _as_clean_arrays(n, y, what)
    groups = group_indices(n)
    if len(groups) < 2:
        raise DataError(f"{what}: only one size (N={n[0]:.4g}); a trend with N needs >= 2 rungs; add rungs")
    if is_constant(y):
        raise DataError(f"{what}: {constant_reason(y)}; no trend to report")
    log_n = np.log(n)
    rho = _spearman(log_n, y)
    note = ""
    why = "bootstrap disabled (n_bootstrap=0)" if options.n_bootstrap == 0 else "every resample was degenerate"
    runs_per_rung = min(g.size for g in groups)
    if runs_per_rung >= 2:
        interval = Interval(rho, math.nan, math.nan, "descriptive: seeds resampled within rungs would ignore rung-to-rung variation")
    elif n.size >= 4:
        # One run per size (an observation study of released models, or a one-seed ladder):
        # resample the points themselves, the ordinary case bootstrap of a correlation.
        note = "one run at some size (1 seed): points resampled across sizes"
        rng = np.random.default_rng(options.seed)
        samples = [_spearman(log_n[idx], y[idx]) for idx in (rng.integers(0, n.size, n.size) for _ in range(options.n_bootstrap))]
        interval = interval_from_samples(rho, np.array(samples, dtype=float), options.confidence, why=why)
        if interval.has_bounds:
            # A rank statistic's bootstrap distribution is discrete and shifted by the ties that
            # resampling creates; widen the percentile interval so it always holds the estimate.
            interval = Interval(rho, min(interval.low, rho), max(interval.high, rho))
    else:
        interval = Interval(rho, math.nan, math.nan, f"1 seed, {n.size} points")
    slope, _, se, rungs = rung_slope(n, y)
    if math.isfinite(se) and se > 0:
        slope_interval = t_interval(slope, se, rungs - 2, options.confidence)
    else:
        slope_interval = Interval(slope, math.nan, math.nan, f"{rungs} sizes: a slope through fewer than 3 has no error estimate")
    return Trend(interval, int(n.size), len(groups), note, slope_interval, runs_per_rung)


# --- holdout and the top-level recipe ------------------------------------------------------


@_single_threaded_blas
def check_leave_largest_out(n: np.ndarray, y: np.ndarray, options: FitOptions = FitOptions(), *, what: str = "leave-largest-out") -> HoldoutCheck:
    """Fit on all rungs but the largest, predict the largest rung's mean.

    The prediction interval combines the bootstrap spread of the curve with a rung-level
    deviation drawn from the fitted rungs' mean log residuals (rescaled for the 3 parameters).
    """
    n, y = _as_clean_arrays(n, y, what)
    largest = float(n.max())
    keep = n < largest
    if np.unique(n[keep]).size < options.min_rungs:
        raise DataError(f"{what}: needs >= {options.min_rungs + 1} rungs (fit on >= {options.min_rungs}, hold out the largest); got {np.unique(n).size}")
    fit = fit_power_law(n[keep], y[keep], options, what=what, curve_n=np.array([largest]))
    observed = float(np.mean(y[~keep]))
    predicted = float(fit.law.predict(largest))
    # The held-out rung deviates from the curve as a rung does: a rung-level residual of the fit.
    _, rung_resid, scale = rung_residuals(n[keep], y[keep], fit.law)
    rng = np.random.default_rng(options.seed + 1)
    laws = fit.boot_laws or (fit.law,)
    draws = []
    for i in range(max(options.n_bootstrap, 1)):
        law = laws[i % len(laws)]
        noise = float(rng.choice(rung_resid)) * scale if rung_resid.size else 0.0
        draws.append(float(law.predict(largest)) * math.exp(noise))
    tail = 50.0 * (1.0 - options.confidence)
    low, high = np.percentile(np.array(draws), [tail, 100.0 - tail])
    return HoldoutCheck(
        n_heldout=largest,
        observed=observed,
        predicted=predicted,
        relative_error=(predicted - observed) / abs(observed),
        prediction_low=float(low),
        prediction_high=float(high),
        inside=bool(low <= observed <= high),
    )


def _power_law_unsupported_reason(metric: str, n: np.ndarray, y: np.ndarray, options: FitOptions) -> str:
    """Empty when a power law may be fitted, else the reason in words."""
    if metric in RANK_METRICS:
        return "rank correlation in [-1, 1]: trend only"
    if metric not in POWER_LAW_METRICS:
        return "not a loss or mean cosine (no floor a power law could fall to): trend only"
    sizes = np.unique(n)
    if sizes.size < options.min_rungs:
        return f"{sizes.size} rung(s): a 3-parameter power law needs >= {options.min_rungs} (3 points fit it exactly); trend only"
    if np.any(y <= 0):
        return f"non-positive values (min {y.min():.4g}); a log-space fit is undefined"
    if is_constant(y):
        return constant_reason(y)
    means = np.array([np.mean(y[n == s]) for s in sizes])
    rho = _spearman(np.log(sizes), means)
    if not rho <= -options.min_rank_correlation:
        shape = "increases with N" if rho > 0 else "is not monotone in N"
        return f"rung means {shape} (Spearman {rho:+.2f} > -{options.min_rank_correlation}); a decreasing power law does not describe it"
    return ""


@_single_threaded_blas
def fit_scaling_curve(metric: str, n: np.ndarray, y: np.ndarray, options: FitOptions = FitOptions()) -> CurveResult:
    """The recipe: trend always (when >= 2 rungs); power law only when the data support one;
    leave-largest-out when there are enough rungs. Never raises for unsupported data: the
    reason is in the result. Raises `DataError` for NaN values or no observations."""
    n, y = _as_clean_arrays(n, y, metric)
    trend, reason = None, ""
    try:
        trend = compute_trend(n, y, options, what=metric)
    except DataError as err:
        reason = str(err)
    why_not = _power_law_unsupported_reason(metric, n, y, options)
    if why_not:
        return CurveResult(metric, trend, None, None, False, why_not if trend is not None or not reason else f"{why_not}; {reason.removeprefix(metric + ': ')}")
    fit = fit_power_law(n, y, options, what=metric)
    lo, hi = options.alpha_bounds
    ends = [fit.law.alpha] + ([fit.alpha.low, fit.alpha.high] if fit.alpha.has_bounds else [])
    if any(not lo * 1.01 < value < hi * 0.99 for value in ends):  # alpha (or its CI) on a bound: not identified
        return CurveResult(metric, trend, None, None, False,
                           f"the exponent alpha = {fit.law.alpha:.3g} [{fit.alpha.low:.3g}, {fit.alpha.high:.3g}] reaches its "
                           f"bound [{lo:g}, {hi:g}]: {np.unique(n).size} rungs do not pin down a power law; trend only")
    holdout = None
    if np.unique(n).size > options.min_rungs:
        holdout = check_leave_largest_out(n, y, options, what=metric)
    else:
        reason = f"no leave-largest-out check: it needs >= {options.min_rungs + 1} rungs (fit >= {options.min_rungs}, hold out 1)"
    return CurveResult(metric, trend, fit, holdout, True, reason)
