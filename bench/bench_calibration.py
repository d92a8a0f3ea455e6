"""Calibration of the claims table: how often does it say something wrong?

Simulates whole studies (4 rungs by default, 2/3/5 seeds, paired arms) from a model with
seed-to-seed noise *and* rung-to-rung variation, runs each through the analysis' own claims
code (`analysis.claims.check_paper_claims`, the function `analysis.scaling_curves` calls), and
prints per claim:

- under **no effect** (every claim at its null at once): the rate of wrong verdicts
  (supported or contradicted) per claim and for the whole table (family-wise), which Holm's
  procedure should keep <= alpha;
- under effects **at the smallest effect of interest** delta: the rate of wrong "no effect"
  verdicts (TOST), <= alpha;
- under **the paper's effects**: the power (supported) and wrong verdicts;
- the **coverage** of the claims' 95% intervals (truth: the population effect), and, with
  `--fits N`, of the power-law exponent, the curve band at the largest rung and the
  leave-largest-out prediction interval (bootstrap percentile intervals of `analysis.fit`).

`--mlflow-check K` also writes K studies per seed count to a real MLflow SQLite store and
runs them through `load.read_study` + `analyse_study` (the full CLI path), checking that
every verdict equals the in-memory one.

    python bench/bench_calibration.py                       # 400 studies per (scenario, seeds), ~5 min
    python bench/bench_calibration.py --sims 100 --fits 40 --mlflow-check 3
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.claims import (  # noqa: E402
    CLAIM_KEYS,
    CONTRADICTED,
    MAX_LOSS_COST,
    NO_EFFECT,
    SMALLEST_EFFECTS,
    SUPPORTED,
    check_paper_claims,
)
from analysis.fit import FitOptions, check_leave_largest_out, fit_power_law  # noqa: E402
from scaling import names  # noqa: E402

BASELINE, DISPERSION = names.ARM_BASELINE, names.ARM_DISPERSION
LADDER = (165e3, 429e3, 1.1e6, 2.9e6, 7.5e6, 2e7, 5e7, 1.3e8)
"""Sizes growing 2.6x a rung from the demo's smallest (its 4 rungs span 1.2 decades); more rungs with --rungs."""
HIDDEN_STATES = (3, 4, 5, 5, 6, 7, 9, 13)
"""Hidden states per rung (layers + embedding output), the demo's depths first."""


@dataclass(frozen=True)
class Truth:
    """Population effects of one scenario (the rung random effects scatter around them)."""

    depth_rise: float
    """Claim (a): rise of mean cosine per hidden state at step 0 (0 = no trend with depth)."""
    cos_effect: float
    """(b) dispersion - baseline late-half mean cosine, at the ladder's centre."""
    cos_effect_slope: float
    """(e) change of that effect per decade of N."""
    rho_effect: float
    """(b-rho) dispersion - baseline Spearman."""
    rho_effect_slope: float
    """(e-rho)."""
    loss_cost: float
    """(c) relative val-loss difference."""
    cos_slope: float
    """(d) baseline late-half mean cosine per decade of N."""
    rho_slope: float
    """(d-rho) baseline Spearman per decade of N."""
    acc_effect: float
    """(f) accuracy difference."""


NOISE = {
    "cos_seed": 0.02, "cos_rung": 0.03,       # late-half mean cosine: seed sd, rung random effect sd
    "dcos_pair": 0.03, "dcos_rung": 0.02,     # its paired difference
    "rho_seed": 0.08, "drho_pair": 0.1, "drho_rung": 0.05,
    "loss_pair": 0.012, "loss_rung": 0.01,    # relative val-loss difference
    "acc_pair": 0.01, "acc_rung": 0.02,       # accuracy difference
    "profile": 0.01,                          # per-hidden-state noise of the step-0 profile
}
"""Noise model: spreads of the order the demo shows (2 seeds, 300 steps, tiny ladder): paired
late-half cosine differences -0.09..+0.005 within and across rungs, relative val-loss
differences -3.7%..-8.6%, accuracy differences varying more across rungs than across seeds."""

SCENARIOS = {
    "null": Truth(0.0, 0.0, 0.0, 0.0, 0.0, MAX_LOSS_COST, 0.0, 0.0, 0.0),
    "at delta": Truth(0.0, SMALLEST_EFFECTS["b"], SMALLEST_EFFECTS["e"], SMALLEST_EFFECTS["b-rho"], SMALLEST_EFFECTS["e-rho"],
                      MAX_LOSS_COST, SMALLEST_EFFECTS["d"], SMALLEST_EFFECTS["d-rho"], SMALLEST_EFFECTS["f"]),
    "paper": Truth(0.03, -0.05, 0.03, -0.3, 0.15, -0.02, -0.06, -0.25, 0.02),
}
"""'paper': effects of the size the paper reports for GPT-2-scale models (dispersion removes a
large share of late-layer cosine; +1-2 accuracy points; smaller models more condensed)."""

TRUE_VALUE = {  # claim -> the population value its interval should cover, per scenario
    "b": lambda t: t.cos_effect, "b-rho": lambda t: t.rho_effect, "c": lambda t: t.loss_cost, "d": lambda t: t.cos_slope,
    "d-rho": lambda t: t.rho_slope, "e": lambda t: t.cos_effect_slope, "e-rho": lambda t: t.rho_effect_slope, "f": lambda t: t.acc_effect,
}


def simulate_study(truth: Truth, seeds: int, rungs: int, rng: np.random.Generator) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(final, initial) frames as `analysis.scaling_curves` hands them to the claims."""
    sizes = np.array(LADDER[:rungs])
    x = np.log10(sizes) - np.log10(sizes).mean()
    final, initial = [], []
    for r, n in enumerate(sizes):
        rung = f"r{r}"
        cos_base = 0.25 + truth.cos_slope * x[r] + rng.normal(0, NOISE["cos_rung"])
        rho_base = 0.4 + truth.rho_slope * x[r] + rng.normal(0, NOISE["cos_rung"] * 5)
        dcos = truth.cos_effect + truth.cos_effect_slope * x[r] + rng.normal(0, NOISE["dcos_rung"])
        drho = truth.rho_effect + truth.rho_effect_slope * x[r] + rng.normal(0, NOISE["drho_rung"])
        dloss = truth.loss_cost + rng.normal(0, NOISE["loss_rung"])
        dacc = truth.acc_effect + rng.normal(0, NOISE["acc_rung"])
        for seed in range(seeds):
            base = {
                names.COND_LATE_HALF_MEAN_COS: cos_base + rng.normal(0, NOISE["cos_seed"]),
                names.COND_SPEARMAN: float(np.clip(rho_base + rng.normal(0, NOISE["rho_seed"]), -1, 1)),
                names.VAL_LOSS: 5.0 * math.exp(rng.normal(0, 0.01)),
                names.EVAL_MEAN_ACC: 0.3 + rng.normal(0, 0.01),
            }
            disp = {
                names.COND_LATE_HALF_MEAN_COS: base[names.COND_LATE_HALF_MEAN_COS] + dcos + rng.normal(0, NOISE["dcos_pair"]),
                names.COND_SPEARMAN: float(np.clip(base[names.COND_SPEARMAN] + drho + rng.normal(0, NOISE["drho_pair"]), -1, 1)),
                names.VAL_LOSS: base[names.VAL_LOSS] * (1 + dloss + rng.normal(0, NOISE["loss_pair"])),
                names.EVAL_MEAN_ACC: base[names.EVAL_MEAN_ACC] + dacc + rng.normal(0, NOISE["acc_pair"]),
            }
            for arm, values in ((BASELINE, base), (DISPERSION, disp)):
                final += [{"rung": rung, "n": float(n), "arm": arm, "seed": seed, "metric": m, "value": float(v)} for m, v in values.items()]
            k = HIDDEN_STATES[r]
            profile = 0.05 + truth.depth_rise * np.arange(k) + rng.normal(0, NOISE["profile"], k)
            for arm in (BASELINE, DISPERSION):  # paired arms share the initial state
                initial += [{"rung": rung, "n": float(n), "arm": arm, "seed": seed, "metric": names.layer_metric(layer), "value": float(v)}
                            for layer, v in enumerate(profile)]
    return pl.DataFrame(final), pl.DataFrame(initial)


def wrong(key: str, verdict: str, scenario: str) -> bool:
    """Is this verdict wrong under the scenario's truth?"""
    if scenario == "null":
        if key in ("e", "e-rho"):
            return verdict == SUPPORTED
        return verdict in (SUPPORTED, CONTRADICTED)  # (c) sits exactly at its margin: either side is wrong
    if scenario == "at delta":  # |effect| = delta: 'no effect' is wrong; (c) sits at its margin again
        return verdict == NO_EFFECT or (key == "c" and verdict in (SUPPORTED, CONTRADICTED))
    return verdict in (CONTRADICTED, NO_EFFECT)


def run_claims(seed_counts, rungs: int, sims: int, seed: int) -> pl.DataFrame:
    rows = []
    for scenario, truth in SCENARIOS.items():
        for seeds in seed_counts:
            rng = np.random.default_rng([seed, seeds, len(scenario)])
            started = time.perf_counter()
            for sim in range(sims):
                final, initial = simulate_study(truth, seeds, rungs, rng)
                checks = check_paper_claims(final, initial, seed=sim)
                for c in checks:
                    truth_value = TRUE_VALUE[c.key](truth) if c.key in TRUE_VALUE else math.nan
                    covered = c.estimate.has_bounds and c.estimate.low <= truth_value <= c.estimate.high if math.isfinite(truth_value) else None
                    rows.append({"scenario": scenario, "seeds": seeds, "sim": sim, "key": c.key, "verdict": c.verdict,
                                 "wrong": wrong(c.key, c.verdict, scenario), "covered": covered, "has_ci": c.estimate.has_bounds})
            print(f"  {scenario:>8} x {seeds} seeds: {sims} studies in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return pl.DataFrame(rows)


def summarise(table: pl.DataFrame) -> None:
    keys = list(CLAIM_KEYS)
    print("\n## Wrong verdicts under no effect (null), per claim, and any wrong verdict in the study (FWER)\n")
    for scenario, title in (("null", "wrong (supported/contradicted) under no effect"), ("at delta", "wrong 'no effect' at |effect| = delta"),
                            ("paper", "power: supported under the paper's effects")):
        print(f"### {title}\n")
        print("| seeds | " + " | ".join(keys) + " | any wrong (FWER) |")
        print("|---|" + "---|" * (len(keys) + 1))
        part = table.filter(pl.col("scenario") == scenario)
        for seeds in sorted(part["seeds"].unique().to_list()):
            cell = part.filter(pl.col("seeds") == seeds)
            cells = []
            for key in keys:
                rows = cell.filter(pl.col("key") == key)
                if scenario == "paper":
                    rate = (rows["verdict"] == SUPPORTED).mean()
                elif scenario == "at delta":
                    rate = (rows["verdict"] == NO_EFFECT).mean()
                else:
                    rate = rows["wrong"].mean()
                cells.append(f"{rate:.3f}")
            fwer = cell.group_by("sim").agg(pl.col("wrong").any())["wrong"].mean()
            print(f"| {seeds} | " + " | ".join(cells) + f" | {fwer:.3f} |")
        print()
    print("### Coverage of the claims' 95% intervals (all scenarios; share of studies with an interval)\n")
    print("| seeds | " + " | ".join(k for k in keys if k in TRUE_VALUE) + " |")
    print("|---|" + "---|" * len(TRUE_VALUE))
    for seeds in sorted(table["seeds"].unique().to_list()):
        cell = table.filter((pl.col("seeds") == seeds) & pl.col("covered").is_not_null())
        cells = []
        for key in keys:
            if key not in TRUE_VALUE:
                continue
            rows = cell.filter(pl.col("key") == key)
            with_ci = rows.filter(pl.col("has_ci"))
            cells.append(f"{with_ci['covered'].mean():.3f} ({with_ci.height / max(rows.height, 1):.0%})" if with_ci.height else "–")
        print(f"| {seeds} | " + " | ".join(cells) + " |")
    print()


def run_fits(seed_counts, fits: int, seed: int) -> None:
    """Coverage of the power-law exponent, the curve band at the largest rung (4 rungs) and the
    leave-largest-out prediction interval (5 rungs): bootstrap percentile intervals."""
    a, alpha, c = 1.0, 0.35, 2.0
    print("### Coverage of the fit intervals (val/loss = a·N^-α + c, 1% seed noise, 0.5% rung effect)\n")
    print("| seeds | α interval | curve band at the largest rung | leave-largest-out PI holds the observed mean | fits |")
    print("|---|---|---|---|---|")
    options = FitOptions(n_bootstrap=100)
    for seeds in seed_counts:
        rng = np.random.default_rng([seed, seeds, 99])
        hits = {"alpha": 0, "band": 0, "holdout": 0}
        done = 0
        started = time.perf_counter()
        for _ in range(fits):
            sizes = np.array(LADDER[:5])  # fit on 4 rungs; the 5th is held out
            rung_effect = rng.normal(0, 0.005, sizes.size)
            n = np.repeat(sizes, seeds)
            truth = a * (n / 1e6) ** -alpha + c
            y = truth * np.exp(np.repeat(rung_effect, seeds) + rng.normal(0, 0.01, n.size))
            keep = n < sizes[4]
            fit = fit_power_law(n[keep], y[keep], options, curve_n=np.array([sizes[3]]))
            hits["alpha"] += fit.alpha.has_bounds and fit.alpha.low <= alpha <= fit.alpha.high
            true_at = a * (sizes[3] / 1e6) ** -alpha + c
            hits["band"] += bool(fit.curve_low[0] <= true_at <= fit.curve_high[0])
            hold = check_leave_largest_out(n, y, options)
            hits["holdout"] += hold.inside
            done += 1
        print(f"| {seeds} | {hits['alpha'] / done:.3f} | {hits['band'] / done:.3f} | {hits['holdout'] / done:.3f} | {done} "
              f"({time.perf_counter() - started:.0f} s) |")
    print()


def mlflow_check(seed_counts, rungs: int, studies: int, seed: int) -> None:
    """The full path: a real MLflow store, `load.read_study`, `analyse_study`: same verdicts."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    from analysis import load
    from analysis.scaling_curves import analyse_study

    with tempfile.TemporaryDirectory() as root:
        uri = f"sqlite:///{root}/mlflow.db"
        client = MlflowClient(uri)
        mismatches, total = 0, 0
        started = time.perf_counter()
        for seeds in seed_counts:
            rng = np.random.default_rng([seed, seeds, 7])
            for i in range(studies):
                scenario = list(SCENARIOS)[i % len(SCENARIOS)]
                final, initial = simulate_study(SCENARIOS[scenario], seeds, rungs, rng)
                study = f"calib-{seeds}-{i}"
                experiment = client.create_experiment(study, artifact_location=f"{root}/artifacts/{study}")
                parent = client.create_run(experiment, tags={names.TAG_KIND: names.KIND_STUDY, names.TAG_STUDY: study})
                for (rung, n, arm, s), rows in final.group_by("rung", "n", "arm", "seed"):
                    tags = {names.TAG_KIND: names.KIND_TRAIN, names.TAG_STUDY: study, names.TAG_RUNG: rung, names.TAG_ARM: arm,
                            names.TAG_SEED: str(s), names.TAG_N_PARAMS: str(int(n)), names.TAG_N_PARAMS_NON_EMBEDDING: str(int(n)),
                            names.TAG_STATUS: names.STATUS_FINISHED, names.TAG_INIT_HASH: f"{rung}-{s}", "mlflow.parentRunId": parent.info.run_id}
                    run = client.create_run(experiment, tags=tags)
                    start = initial.filter((pl.col("rung") == rung) & (pl.col("arm") == arm) & (pl.col("seed") == s))
                    metrics = [Metric(m, v, 0, 10) for m, v in rows.select("metric", "value").iter_rows()]
                    metrics += [Metric(m, v, 0, 0) for m, v in start.select("metric", "value").iter_rows()]
                    client.log_batch(run.info.run_id, metrics=metrics, params=[Param("steps", "10")], tags=[RunTag("bench", "calibration")])
                    client.set_terminated(run.info.run_id, "FINISHED")
                client.set_terminated(parent.info.run_id, "FINISHED")
                analysis = analyse_study(load.read_study(uri, study), metrics=[names.VAL_LOSS, names.COND_LATE_HALF_MEAN_COS, names.COND_SPEARMAN],
                                         size_column="n_params_non_embedding", control_arm=BASELINE, options=FitOptions(n_bootstrap=20))
                expected = {c.key: c.verdict for c in check_paper_claims(final, initial)}
                got = {c.key: c.verdict for c in analysis.claims}
                mismatches += sum(expected[k] != got[k] for k in expected)
                total += len(expected)
        print(f"### Through MLflow: {total} verdicts of {studies * len(seed_counts)} studies written to a SQLite store and read back by "
              f"`analyse_study`: {mismatches} differ from the in-memory path ({time.perf_counter() - started:.0f} s)\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sims", type=int, default=400, help="studies per (scenario, seed count) (default: %(default)s)")
    parser.add_argument("--seeds", default="2,3,5", help="seed counts (default: %(default)s)")
    parser.add_argument("--rungs", type=int, default=4, help="rungs per study, at most 5 (default: %(default)s)")
    parser.add_argument("--fits", type=int, default=60, help="power-law fits per seed count for the fit coverage (0 = skip; default: %(default)s)")
    parser.add_argument("--mlflow-check", type=int, default=3, help="studies per seed count run through a real MLflow store (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    seed_counts = [int(s) for s in args.seeds.split(",")]
    if not 3 <= args.rungs <= len(LADDER):
        parser.error(f"--rungs must lie in 2..{len(LADDER)}")
    print(f"# Calibration of the claims: {args.rungs} rungs, seeds {seed_counts}, {args.sims} studies per cell, alpha = 0.05 (Holm)\n")
    table = run_claims(seed_counts, args.rungs, args.sims, args.seed)
    summarise(table)
    if args.fits:
        run_fits(seed_counts, args.fits, args.seed)
    if args.mlflow_check:
        mlflow_check(seed_counts, args.rungs, args.mlflow_check, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
