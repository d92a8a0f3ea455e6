"""Step throughput of the Ray Train + DeepSpeed path vs a plain single-process torch loop (issue 3).

Runs the real `scaling.study.run_study` on a tiny study (baseline + dispersion arms, one
rung of the `tiny` ladder) once per ZeRO stage asked, into a temp MLflow store, and reads
back per step:

* in-loop step time: `train/tokens_per_s` (logged every step; the worker's own window,
  which excludes MLflow logging) -> seconds per step;
* wall step time: the gap between consecutive `train/ce_loss` timestamps (includes the
  rank-0 MLflow write, so it is what a run actually pays per step);
* start-up: MLflow run start -> first step logged, minus that step (Ray Train worker group,
  model build, `deepspeed.initialize`); reported apart, never mixed into step times.

The baseline is a plain torch loop written here: the same rung built by
`scaling.ladder.build_model` with the same seed, the same training blocks in the same
order (`scaling.train.DataOrder`), the same batch / micro-batch (gradient accumulation),
AdamW (0.9, 0.95) with the same decay groups, clipping 1.0, cosine LR; with and without
the dispersion term. It runs with `--threads` torch threads (default 1: a Ray Train worker
gets 1 CPU, so Ray pins it to one thread). It is measured before and between the Ray
studies, so machine noise (other jobs share these cores) hits both alike; the median of
its measurements is the baseline. The first `--skip` steps of every loop are dropped.

Every step time is shown as a median and a 10th percentile (other jobs only ever add time,
so the low percentile is the noise-robust figure on a shared machine).

Goals: DeepSpeed path per worker >= 0.9x the plain loop; dispersion arm <= 1.10x the
baseline arm's step time.

    python bench/bench_train.py                         # tiny-429K, 1 worker, ZeRO-0 and ZeRO-2
    python bench/bench_train.py --rung tiny-754K --steps 60 --zero-stages 2 --workers 2
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before Ray is imported anywhere: a private local Ray without token auth, fast controller polls.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scaling import names  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rung", default="tiny-429K", help="a rung of the `tiny` ladder")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="first steps dropped from the step-time medians")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers per run")
    parser.add_argument("--zero-stages", default="0,2", help="comma list of DeepSpeed ZeRO stages")
    parser.add_argument("--lam", type=float, default=0.1, help="dispersion lambda (angular_spread, all layers)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the plain loop")
    parser.add_argument("--max-rows", type=int, default=2000, help="rows of the bundled corpus to tokenize")
    parser.add_argument("--workdir", default=None, help="keep the MLflow store and Ray Train folders here")
    args = parser.parse_args()
    if args.steps <= args.skip + 2:
        parser.error(f"--steps={args.steps} must exceed --skip={args.skip} by at least 3")
    return args


def build_study(args, workdir: Path, zero_stage: int):
    from scaling.config import study_from_dict

    return study_from_dict({
        "study": f"bench-train-z{zero_stage}-w{args.workers}",
        "ladder": "tiny",
        "rungs": [args.rung],
        "arms": ["baseline", {"name": "dispersion", "variant": "angular_spread", "lambda": args.lam,
                              "layers": "all"}],
        "seeds": [0],
        "data": {"source": "bundled", "max_rows": args.max_rows},
        "training": {"seq_len": args.seq_len, "batch_size": args.batch_size,
                     "micro_batch_size": args.micro_batch_size, "max_steps": args.steps, "lr": 3e-3,
                     "log_every": 1},
        # Probe and checkpoint only at the end, so no step window holds a probe or a save.
        "probes": {"every_steps": 0, "texts": 2, "max_length": 32, "val_batches": 1},
        "resources": {"num_workers": args.workers, "zero_stage": zero_stage},
        "checkpoint": {"every_steps": 0, "num_to_keep": 1, "max_failures": 0},
        "storage_path": str(workdir / "runs"),
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
    })


# --- the plain torch loop -----------------------------------------------------------------------


def plain_loop_step_times(study, train_blocks, *, dispersion: bool, lam: float) -> list[float]:
    """Seconds per optimizer step of a plain single-process loop doing the same work as a run."""
    import torch

    from scaling.dispersion import dispersion_over_layers
    from scaling.dispersion_spec import resolve_layers
    from scaling.ladder import build_model
    from scaling.config import plan_runs
    from scaling.train import DataOrder, lr_at

    (plan,) = plan_runs(study)
    training = study.training
    model = build_model(plan.rung, seed=0).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "wpe" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "wpe" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": training.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=plan.lr, betas=tuple(training.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(
        s, peak=1.0, warmup_steps=plan.warmup_steps, total_steps=plan.steps, min_ratio=training.min_lr_ratio))
    order = DataOrder(train_blocks.shape[0], training.batch_size, seed=0)
    layers = resolve_layers("all", plan.rung.n_layers) if dispersion else None
    generator = torch.Generator().manual_seed(0)
    micro = training.micro_batch_size
    accumulation = training.batch_size // micro
    times = []
    for step in range(plan.steps):
        started = time.perf_counter()
        indices = order.batch(step)
        for start in range(0, training.batch_size, micro):
            batch = torch.as_tensor(train_blocks[indices[start:start + micro]])
            outputs = model(input_ids=batch, labels=batch, output_hidden_states=dispersion)
            loss = outputs.loss
            if dispersion:
                loss = loss + lam * dispersion_over_layers(outputs.hidden_states, layers, "angular_spread",
                                                           tau=1.0, clamp_threshold=0.1, generator=generator)
            (loss / accumulation).backward()  # DeepSpeed scales by 1/accumulation the same way
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"plain loop: non-finite loss at step {step}")
        times.append(time.perf_counter() - started)
    return times


def percentile(values, q: float) -> float:
    """A low percentile: on a shared machine other jobs only ever add time, so it is the
    noise-robust companion of the median."""
    import numpy as np

    return float(np.percentile(values, q))


# --- reading the runs back -------------------------------------------------------------------------


def read_run_timings(tracking_uri: str, run_id: str, tokens_per_step: int, skip: int) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    rates = sorted(client.get_metric_history(run_id, names.TRAIN_TOKENS_PER_S), key=lambda m: m.step)
    ce = sorted(client.get_metric_history(run_id, names.TRAIN_CE_LOSS), key=lambda m: m.step)
    in_loop = [tokens_per_step / m.value for m in rates]
    wall = [(b.timestamp - a.timestamp) / 1e3 for a, b in zip(ce, ce[1:])]  # gap before step b
    return {
        "steps": len(ce),
        "in_loop_s": statistics.median(in_loop[skip:]),
        "in_loop_p10_s": percentile(in_loop[skip:], 10),
        "wall_s": statistics.median(wall[skip:]),
        "startup_s": (ce[0].timestamp - run.info.start_time) / 1e3 - in_loop[0],
        "first_step_s": in_loop[0],
    }


def main() -> None:
    args = parse_args()
    import ray
    import torch

    from scaling.config import plan_runs
    from scaling.study import prepare_data, run_study

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-train-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # anything a study writes relative to the working directory lands here
    stages = [int(s) for s in args.zero_stages.split(",")]
    studies = {stage: build_study(args, workdir, stage) for stage in stages}
    first = studies[stages[0]]
    (plan,) = plan_runs(first)
    # Before the data, which tokenizes with Ray Data (it would start a Ray of its own). Exactly one run's workers
    # fit at a time, so runs go one after the other, never side by side.
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    data = prepare_data(first, vocab_size=plan.rung.vocab_size)
    tokens_per_step = args.batch_size * args.seq_len
    print(f"rung {plan.rung.name} ({plan.params.total / 1e3:.0f}K params), {args.steps} steps of "
          f"{args.batch_size} x {args.seq_len} tokens (micro-batch {args.micro_batch_size}), "
          f"{args.workers} worker(s), medians over steps > {args.skip}; plain loop: {args.threads} thread(s); "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; workdir {workdir}", flush=True)

    plain = {"baseline": [], "dispersion": []}
    plain_p10 = {"baseline": [], "dispersion": []}

    def measure_plain():
        for arm in plain:
            times = plain_loop_step_times(first, data.train, dispersion=arm == "dispersion", lam=args.lam)
            plain[arm].append(statistics.median(times[args.skip:]))
            plain_p10[arm].append(percentile(times[args.skip:], 10))

    results = {}
    try:
        for stage in stages:
            measure_plain()
            study = studies[stage]
            started = time.perf_counter()
            outcomes = run_study(study, f"study: {study.study}\n", progress=lambda *_: None)
            print(f"ZeRO-{stage}: study ran in {time.perf_counter() - started:.0f} s: "
                  + ", ".join(f"{o.arm} {o.status} {o.seconds:.0f} s" for o in outcomes), flush=True)
            for outcome in outcomes:
                if outcome.status != names.STATUS_FINISHED:
                    raise SystemExit(f"ZeRO-{stage} {outcome.arm}: {outcome.status} {outcome.detail}")
                results[(stage, outcome.arm)] = read_run_timings(study.tracking_uri, outcome.run_id,
                                                                 tokens_per_step, args.skip)
                results[(stage, outcome.arm)]["fit_s"] = outcome.seconds
        measure_plain()
    finally:
        ray.shutdown()

    base_plain = {arm: statistics.median(values) for arm, values in plain.items()}
    base_p10 = {arm: min(values) for arm, values in plain_p10.items()}
    print(f"\nplain torch loop, step time (median of {len(plain['baseline'])} measurements): "
          f"baseline {base_plain['baseline'] * 1e3:.1f} ms "
          f"({', '.join(f'{v * 1e3:.1f}' for v in plain['baseline'])}), "
          f"dispersion {base_plain['dispersion'] * 1e3:.1f} ms "
          f"({', '.join(f'{v * 1e3:.1f}' for v in plain['dispersion'])}); "
          f"dispersion/baseline = {base_plain['dispersion'] / base_plain['baseline']:.2f}x; "
          f"p10: baseline {base_p10['baseline'] * 1e3:.1f} ms, dispersion {base_p10['dispersion'] * 1e3:.1f} ms")
    header = (f"{'path':<22} {'in-loop ms':>10} {'p10 ms':>7} {'wall ms':>8} {'per-worker vs plain':>20} "
              f"{'(p10)':>6} {'(wall)':>7} {'start-up s':>10} {'fit s':>6}")
    print(header)
    print("-" * len(header))
    for (stage, arm), r in results.items():
        # tokens/s per worker of the DeepSpeed path / tokens/s of the plain loop (same arm)
        per_worker = base_plain[arm] / (r["in_loop_s"] * args.workers)
        per_worker_p10 = base_p10[arm] / (r["in_loop_p10_s"] * args.workers)
        per_worker_wall = base_plain[arm] / (r["wall_s"] * args.workers)
        print(f"{f'ZeRO-{stage} {arm}':<22} {r['in_loop_s'] * 1e3:>10.1f} {r['in_loop_p10_s'] * 1e3:>7.1f} "
              f"{r['wall_s'] * 1e3:>8.1f} {per_worker:>19.2f}x {per_worker_p10:>5.2f}x {per_worker_wall:>6.2f}x "
              f"{r['startup_s']:>10.1f} {r['fit_s']:>6.0f}")
    for stage in stages:
        base, disp = results[(stage, "baseline")], results[(stage, "dispersion")]
        print(f"ZeRO-{stage}: dispersion/baseline step time = {disp['in_loop_s'] / base['in_loop_s']:.2f}x "
              f"in-loop median, {disp['in_loop_p10_s'] / base['in_loop_p10_s']:.2f}x p10, "
              f"{disp['wall_s'] / base['wall_s']:.2f}x wall (goal <= 1.10x)")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
