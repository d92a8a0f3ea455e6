"""Training throughput reading blocks from token shards vs from an in-memory array (issue 14).

The same tiny study (tiny-429K, 1 worker, ZeRO-0, probes and checkpoints only at the end) trains twice
in one Ray session through the real `scaling.runs.train_run`: once with the workers reading their
blocks from the memory-mapped token shards (what studies do now), once with the same blocks
materialised into numpy arrays shipped through the object store (the old path). Arms are
interleaved (shards, array, shards, array) so that drifting machine load hits both; the figure is
the median in-loop `train/tokens_per_s` over the steps after the first `--skip`. Goal: shards /
array >= 0.95x.

    python bench/bench_data_train.py
    python bench/bench_data_train.py --steps 200 --repeats 3
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--skip", type=int, default=10, help="first steps left out of the median (warm-up)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per data path")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import numpy as np
    import ray
    from mlflow.tracking import MlflowClient

    from scaling import names
    from scaling.config import plan_runs, study_from_dict
    from scaling.console import say
    from scaling.runs import DataRefs, train_run
    from scaling.study import prepare_data
    from scaling.tracking import Tracker

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-train-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    figures: dict[str, list[float]] = {"shards": [], "array": []}
    for repeat in range(args.repeats):
        for path in ("shards", "array"):
            study = study_from_dict({
                "study": "bench-data-train", "ladder": "tiny", "rungs": ["tiny-429K"], "arms": ["baseline"],
                "seeds": [repeat * 2 + (path == "array")],  # a new run each time (seeds differ; data order too)
                "training": {"seq_len": 64, "batch_size": 8, "micro_batch_size": 8, "max_steps": args.steps,
                             "lr": 3e-3}, "probes": {"every_steps": 0, "texts": 2, "max_length": 64},
                "resources": {"num_workers": 1, "zero_stage": 0}, "checkpoint": {"every_steps": 0},
                "storage_path": str(workdir / "runs"), "tracking_uri": uri})
            (plan,) = plan_runs(study)
            data = prepare_data(study, vocab_size=plan.rung.vocab_size, progress=lambda *_: None)
            if path == "shards":
                refs = DataRefs(data.train, data.val, data.probe_ids, data.fingerprint)
            else:
                refs = DataRefs(ray.put(np.asarray(data.train)), ray.put(np.asarray(data.val)), ray.put(data.probe_ids),
                                data.fingerprint)
            tracker = Tracker(uri, study.study)
            parent = tracker.study_run_id({})
            outcome = train_run(study, plan, study.arms[0], study.seeds[0], refs, tracker, parent, say)
            history = MlflowClient(uri).get_metric_history(outcome.run_id, names.TRAIN_TOKENS_PER_S)
            rates = [m.value for m in sorted(history, key=lambda m: m.step) if m.step > args.skip]
            figures[path].append(statistics.median(rates))
            print(f"{path:6s} repeat {repeat}: median {figures[path][-1]:,.0f} tokens/s over {len(rates)} steps "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    shards, array = statistics.median(figures["shards"]), statistics.median(figures["array"])
    print(f"\ntokens/s reading token shards {shards:,.0f} vs in-memory array {array:,.0f}: {shards / array:.3f}x "
          f"(goal >= 0.95x; load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
