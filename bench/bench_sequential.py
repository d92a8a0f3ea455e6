"""Calibration of a study that decides its claims in waves (`decide:`, `analysis.waves`).

Simulates whole studies with the calibration bench's model (`bench_calibration.simulate_study`: seed
noise and a rung random effect at the demo's spreads) up to the largest study the budget allows, then
runs the driver's own decision rule (`analysis.waves.run_look`, the function `decide_wave` calls on
MLflow records) on the seeds of waves 1, 2, ... until it stops, and compares, on the same simulated
studies:

- **sequential** designs with O'Brien-Fleming-like and Pocock-like alpha spending (the shipped rule);
- the **fixed** design that trains the worst-case budget at once and tests once at alpha, and the
  fixed design of the first wave alone (what a study without `decide:` trains);
- a **naive** sequential design that tests every look at the full alpha (what looking without
  accounting for it does), to show the inflation the spending prevents.

Printed per design and scenario: the rate of wrong verdicts per claim and for the whole table (no
effect: supported/contradicted; at the smallest effect: "no effect"), the power at the paper's
effects, and the runs spent (mean, and the share of studies that stopped before the budget).

    python bench/bench_sequential.py            # the demo's plan (2 looks), 200 studies per scenario, ~4-5 min on 2 cores
    python bench/bench_sequential.py --wave-seeds 1   # 4 looks of one more seed each
    python bench/bench_sequential.py --noise seeds   # where seed noise dominates and seeds buy power
    python bench/bench_sequential.py --quick    # a smoke test (tests/test_waves.py runs it)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from analysis.claims import CONTRADICTED, NO_EFFECT, SUPPORTED, check_paper_claims  # noqa: E402
from analysis import waves  # noqa: E402
from analysis.waves import DECIDED, run_look  # noqa: E402
import bench_calibration  # noqa: E402
from bench_calibration import SCENARIOS, simulate_study, wrong  # noqa: E402
from scaling.sequential import CLAIM_KEYS, DecideConfig, plan_waves  # noqa: E402

ARMS = 2
SEED_NOISE = {**{k: v * 0.2 for k, v in bench_calibration.NOISE.items() if k.endswith("_rung")},
              **{k: v * 2 for k, v in bench_calibration.NOISE.items() if k.endswith("_pair") or k.endswith("_seed")}}
"""`--noise seeds`: the rung random effects at a fifth of the demo's, the seed-to-seed noise doubled: a study
where more seeds do buy power (the demo's spreads are the default: there they barely do)."""


def naive(plan, alpha: float):
    """The same looks, each at the full alpha: looking without paying for it."""
    return dataclasses.replace(plan, looks=tuple(dataclasses.replace(look, alpha=alpha, spent=alpha) for look in plan.looks))


def run_sequential(final: pl.DataFrame, initial: pl.DataFrame, plan, decide: DecideConfig, seed: int) -> tuple[dict[str, str], int]:
    """Final verdict per stated claim and the runs spent, looking after every wave until the rule stops."""
    earlier = None
    for wave in range(1, len(plan.looks) + 1):
        seeds = plan.seeds_at(wave)
        record = run_look(final.filter(pl.col("seed").is_in(seeds)), initial.filter(pl.col("seed").is_in(seeds)), plan, decide,
                          wave, earlier, seed=seed)
        earlier = record
        if not record.added:
            break
    verdicts = {c.key: c.state if c.state in DECIDED else "inconclusive" for c in earlier.claims}
    return verdicts, plan.looks[earlier.wave - 1].runs


def simulate(args) -> pl.DataFrame:
    decide = DecideConfig(claims=tuple(args.claims), alpha=args.alpha, power=args.power, max_seeds=args.max_seeds,
                          wave_seeds=args.wave_seeds)
    first = tuple(range(args.first_seeds))
    designs = {
        "sequential, O'Brien-Fleming": (plan_waves(decide, first, args.rungs, ARMS), decide),
        "sequential, Pocock": (plan_waves(dataclasses.replace(decide, spending="pocock"), first, args.rungs, ARMS),
                               dataclasses.replace(decide, spending="pocock")),
    }
    designs["naive (alpha at every look)"] = (naive(designs["sequential, O'Brien-Fleming"][0], args.alpha), decide)
    largest = designs["sequential, O'Brien-Fleming"][0].looks[-1]
    rows = []
    for scenario, truth in SCENARIOS.items():
        rng = np.random.default_rng([args.seed, len(scenario)])
        started = time.perf_counter()
        for sim in range(args.sims):
            final, initial = simulate_study(truth, largest.seeds, args.rungs, rng)
            fixed = check_paper_claims(final, initial, confidence=1 - args.alpha, smallest_effects=decide.deltas(), seed=sim,
                                       claims=decide.claims)
            outcomes = {"fixed (the budget at once)": ({c.key: c.verdict for c in fixed if c.key in decide.claims}, largest.runs)}
            few = final.filter(pl.col("seed") < args.first_seeds), initial.filter(pl.col("seed") < args.first_seeds)
            first_only = check_paper_claims(*few, confidence=1 - args.alpha, smallest_effects=decide.deltas(), seed=sim, claims=decide.claims)
            outcomes["fixed (the first wave only)"] = ({c.key: c.verdict for c in first_only if c.key in decide.claims},
                                                       designs["sequential, O'Brien-Fleming"][0].looks[0].runs)
            for name, (plan, rule) in designs.items():
                outcomes[name] = run_sequential(final, initial, plan, rule, sim)
            for name, (verdicts, runs) in outcomes.items():
                for key, verdict in verdicts.items():
                    rows.append({"scenario": scenario, "design": name, "sim": sim, "key": key, "verdict": verdict,
                                 "wrong": wrong(key, verdict, scenario), "runs": runs})
        print(f"  {scenario:>8}: {args.sims} studies x {len(designs) + 2} designs in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    return pl.DataFrame(rows)


def summarise(table: pl.DataFrame, args, largest_runs: int) -> None:
    keys = [k for k in CLAIM_KEYS if k in args.claims]
    for scenario, title in (("null", "wrong verdicts (supported/contradicted) under no effect"),
                            ("at delta", "wrong 'no effect' at |effect| = delta"),
                            ("paper", "power: supported under the paper's effects")):
        print(f"### {title}\n")
        print("| design | " + " | ".join(keys) + " | any wrong (FWER) | runs spent (mean) | stopped early |")
        print("|---|" + "---|" * (len(keys) + 3))
        part = table.filter(pl.col("scenario") == scenario)
        for design in part["design"].unique(maintain_order=True).to_list():
            cell = part.filter(pl.col("design") == design)
            cells = []
            for key in keys:
                rows = cell.filter(pl.col("key") == key)
                rate = ((rows["verdict"] == SUPPORTED).mean() if scenario == "paper" else
                        (rows["verdict"] == NO_EFFECT).mean() if scenario == "at delta" else rows["wrong"].mean())
                cells.append(f"{rate:.3f}")
            per_sim = cell.group_by("sim").agg(pl.col("wrong").any(), pl.col("runs").first())
            early = (per_sim["runs"] < largest_runs).mean()
            print(f"| {design} | " + " | ".join(cells) + f" | {per_sim['wrong'].mean():.3f} | {per_sim['runs'].mean():.1f} | {early:.0%} |")
        print()
    contradicted = table.filter((pl.col("scenario") == "paper") & (pl.col("verdict") == CONTRADICTED)).height
    print(f"(contradicted verdicts under the paper's effects, all designs: {contradicted})\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sims", type=int, default=200, help="studies per scenario (default: %(default)s)")
    parser.add_argument("--rungs", type=int, default=4, help="rungs per study (default: %(default)s, the demo's)")
    parser.add_argument("--first-seeds", type=int, default=2, help="seeds of the first wave (default: %(default)s)")
    parser.add_argument("--max-seeds", type=int, default=5, help="budget: seeds per rung and arm (default: %(default)s)")
    parser.add_argument("--wave-seeds", type=int, default=3, help="seeds added per wave (default: %(default)s: the demo's 2 looks)")
    parser.add_argument("--claims", default="a,b,c,d,e,f", help="stated claims (default: %(default)s, the demo's)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--power", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise", choices=("demo", "seeds"), default="demo",
                        help="demo: the calibration bench's spreads (rung-to-rung variation dominates); seeds: seed noise "
                             "dominates (default: %(default)s)")
    parser.add_argument("--futility-power", type=float, default=waves.FUTILITY_POWER,
                        help="conditional power below which seeds stop being spent (default: %(default)s, the shipped rule)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 6 studies per scenario")
    args = parser.parse_args(argv)
    waves.FUTILITY_POWER = args.futility_power
    if args.noise == "seeds":
        bench_calibration.NOISE.update(SEED_NOISE)
    args.claims = [c for c in args.claims.split(",") if c]
    if args.quick:
        args.sims = 6
    plan = plan_waves(DecideConfig(claims=tuple(args.claims), max_seeds=args.max_seeds, wave_seeds=args.wave_seeds),
                      tuple(range(args.first_seeds)), args.rungs, ARMS)
    print(f"# Sequential decisions: {args.rungs} rungs, first wave {args.first_seeds} seeds, +{args.wave_seeds} per wave up to "
          f"{args.max_seeds} ({len(plan.looks)} looks, {plan.looks[0].runs}..{plan.looks[-1].runs} runs), claims "
          f"{', '.join(args.claims)}, alpha {args.alpha}, {args.noise} noise, futility below {args.futility_power:g} conditional power, "
          f"{args.sims} studies per scenario\n")
    started = time.perf_counter()
    table = simulate(args)
    summarise(table, args, plan.looks[-1].runs)
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
