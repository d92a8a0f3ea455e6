"""Training throughput of one tiny study under two conditions, interleaved (issues 14 and 11).

    --compare data: workers read their blocks from the memory-mapped token shards (what studies do)
                    vs the same blocks materialised into numpy arrays shipped through the object store
                    (the old path). Goal: shards / array >= 0.95x.
    --compare eval: downstream evaluations (lm-eval-harness on the bundled cloze task, each a Ray task
                    on its own CPU) running beside training every `--eval-every` steps vs no
                    evaluation. Goal: with / without >= 0.9x.

The study (tiny-429K, 1 worker, ZeRO-0, probes and checkpoints only at the end) trains through the
real `scaling.runs.train_chain` (one run each) in one Ray session; conditions alternate (A, B, A, B) so that drifting
machine load hits both. The figure is the median in-loop `train/tokens_per_s` over the steps after
the first `--skip`.

    python bench/bench_train_ab.py --compare data
    python bench/bench_train_ab.py --compare eval --steps 200 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONDITIONS = {"data": ("shards", "array"), "eval": ("with evals", "without")}
GOALS = {"data": 0.95, "eval": 0.9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=sorted(CONDITIONS), required=True)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the median (warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per condition")
    parser.add_argument("--eval-every", type=int, default=30, help="with --compare eval: steps between evaluations")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import numpy as np
    import ray
    from mlflow.tracking import MlflowClient

    from scaling import names
    from scaling.config import plan_runs, study_from_dict
    from scaling.console import say
    from scaling.runs import DataRefs, train_chain
    from scaling.study import data_refs, prepare_data
    from scaling.tracking import Tracker

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=f"bench-train-{args.compare}-"))
    # One CPU trains; with evaluations, another evaluates beside it.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    first, second = CONDITIONS[args.compare]
    figures: dict[str, list[float]] = {first: [], second: []}
    for repeat in range(args.repeats):
        for condition in (first, second):
            raw = {
                "study": f"bench-train-{args.compare}", "ladder": "tiny", "rungs": ["tiny-429K"], "arms": ["baseline"],
                "seeds": [repeat * 2 + (condition == second)],  # a new run each time (seeds differ; data order too)
                "training": {"seq_len": 64, "batch_size": 8, "micro_batch_size": 8, "max_steps": args.steps,
                             "lr": 3e-3}, "probes": {"every_steps": 0, "texts": 2, "max_length": 64},
                "resources": {"num_workers": 1, "zero_stage": 0}, "checkpoint": {"every_steps": 0},
                "storage_path": str(workdir / "runs"), "tracking_uri": uri}
            if condition == "with evals":
                raw["eval"] = {"tasks": ["bundled_cloze"], "every_steps": args.eval_every, "at_start": True,
                               "num_cpus": 1}
            study = study_from_dict(raw)
            (plan,) = plan_runs(study)
            data = prepare_data(study, vocab_size=plan.rung.vocab_size, progress=lambda *_: None)
            if condition == "array":
                refs = DataRefs(ray.put(np.asarray(data.train)), ray.put(np.asarray(data.val)), ray.put(data.probe_ids),
                                data.fingerprint)
            else:
                refs = data_refs(study, data)  # with evaluations: the tokenizer published for the exported models
            tracker = Tracker(uri, study.study)
            parent = tracker.study_run_id({})
            (outcome,) = train_chain(study, [(plan, study.arms[0], study.seeds[0])], refs, tracker, parent, say)
            client = MlflowClient(uri)
            history = client.get_metric_history(outcome.run_id, names.TRAIN_TOKENS_PER_S)
            rates = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > args.skip]
            figures[condition].append(statistics.median(rates))
            evaluated = sorted({m.step for m in client.get_metric_history(outcome.run_id, names.EVAL_MEAN_ACC)})
            print(f"{condition:10s} repeat {repeat}: median {figures[condition][-1]:,.0f} tokens/s over {len(rates)} "
                  f"steps{f', evaluated at steps {evaluated}' if evaluated else ''} "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    a, b = statistics.median(figures[first]), statistics.median(figures[second])
    print(f"\ntokens/s {first} {a:,.0f} vs {second} {b:,.0f}: {a / b:.3f}x "
          f"(goal >= {GOALS[args.compare]}x; load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
