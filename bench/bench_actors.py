"""Actor-sharded condensation: 1 vs 2 reducer actors, and the object-store cost per MB (issue 4a).

On precomputed hidden states of a realistic size (default 20 texts x 13 layers x 512
tokens x 768 features, float32: GPT-2 small's hidden states, 20 MB a text), times, in
one run and interleaved so machine noise hits every arm alike:

* in-process: one `CondensationAccumulator` in this process (the single-process result,
  also used to check that every pool gives the same numbers);
* pool[n]: `scaling.actors.CondensationPool(n)` fed text by text, then `result()`;
  with the actors' torch left at its default thread count, and with
  `torch.set_num_threads(1)` called in each actor first (`--actor-threads`), to see
  whether thread oversubscription of the 2 cores costs anything.

Actors are created and warmed up (torch imported, one tiny shard reduced) before the
clock starts; start-up is reported apart. Prints seconds, the speed-up of n actors over 1
actor (goal >= 1.7x for 2 actors on 2 cores) and over in-process, and the share of the
wall time the driver spends inside `update`: cutting shards, putting them in the object
store, and waiting when more than `max_inflight` shards are queued (back-pressure), so a
high share means either a busy driver or actors that cannot keep up.

Transfer cost: `ray.put` of an array of each `--transfer-mb` size, then a no-op actor
call that reads one float per 4 KiB page of it (so every page is mapped), in ms per MB;
minus the same call on a 1-element array (the fixed per-call cost).

    python bench/bench_actors.py                            # 20 texts, 1 and 2 actors
    python bench/bench_actors.py --texts 8 --no-effective-rank --actors 1,2,4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=20)
    parser.add_argument("--layers", type=int, default=13, help="hidden states per text (L+1)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--features", type=int, default=768)
    parser.add_argument("--actors", default="1,2", help="comma list of pool sizes")
    parser.add_argument("--actor-threads", default="default,1",
                        help="comma list: torch threads set in each actor before timing ('default' = leave it)")
    parser.add_argument("--effective-rank", action=argparse.BooleanOptionalAction, default=True,
                        help="also compute RankMe per layer and text (the library's default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--transfer-mb", default="1,4,16,64", help="comma list of array sizes for the put cost")
    parser.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the private Ray")
    return parser.parse_args()


def _set_threads(actor_self, threads: int | None) -> int:
    """Runs inside an actor (via `__ray_call__`): import torch, optionally pin its threads."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class Toucher:
    """A no-op actor that maps every page of the array it is handed."""

    def touch(self, array: np.ndarray) -> float:
        return float(array.reshape(-1)[::1024].sum())  # 1024 float32 = one 4 KiB page


def build_hidden_states(args) -> list[np.ndarray]:
    """Per text [layers, tokens, features], with a shared direction that grows with depth (like a
    condensing model), so the statistics are not those of pure noise."""
    rng = np.random.default_rng(0)
    common = rng.standard_normal(args.features).astype(np.float32)
    depth = np.linspace(0.0, 2.0, args.layers, dtype=np.float32)[:, None, None]
    return [rng.standard_normal((args.layers, args.tokens, args.features), dtype=np.float32) + depth * common
            for _ in range(args.texts)]


def time_in_process(texts, effective_rank: bool):
    import torch

    from scaling.condensation import CondensationAccumulator

    CondensationAccumulator(effective_rank=effective_rank).update(torch.ones(1, 4, 8))  # warm-up, untimed
    started = time.perf_counter()
    accumulator = CondensationAccumulator(effective_rank=effective_rank)
    for hidden in texts:
        accumulator.update(torch.from_numpy(hidden))
    result = accumulator.finalize()
    return time.perf_counter() - started, result


def time_pool(texts, num_actors: int, threads: int | None, effective_rank: bool):
    """(seconds, seconds inside update, start-up seconds, actor threads, result) of one pooled measurement."""
    import ray

    from scaling.actors import CondensationPool

    started = time.perf_counter()
    pool = CondensationPool(num_actors, effective_rank=effective_rank, num_cpus=1)
    try:
        actor_threads = ray.get([a.__ray_call__.remote(_set_threads, threads) for a in pool.actors])
        warm = np.zeros((1, 4, 8), dtype=np.float32) + 1.0
        ray.get([a.add.remote(-1, warm) for a in pool.actors])  # first update: torch kernels, allocator
        ray.get([a.__ray_call__.remote(lambda self: self.parts.clear()) for a in pool.actors])
        startup = time.perf_counter() - started
        started = time.perf_counter()
        in_update = 0.0
        for hidden in texts:
            t0 = time.perf_counter()
            pool.update(hidden)
            in_update += time.perf_counter() - t0
        result = pool.result().finalize()
        return time.perf_counter() - started, in_update, startup, actor_threads, result
    finally:
        pool.close()


def check_same(result, expected, label: str) -> None:
    if not np.allclose(result.mean_cosine, expected.mean_cosine, rtol=0, atol=1e-10):
        raise SystemExit(f"{label}: the pooled mean cosine differs from the in-process one")


def measure_transfer(sizes_mb: list[float], repeats: int) -> list[tuple[float, float, float]]:
    """(MB, put ms/MB, put+touch ms/MB net of the fixed call cost) per size; medians of `repeats`."""
    import ray

    toucher = ray.remote(num_cpus=1)(Toucher).remote()
    tiny = np.zeros(1, dtype=np.float32)
    ray.get(toucher.touch.remote(tiny))  # actor started
    fixed = statistics.median(_timed(lambda: ray.get(toucher.touch.remote(ray.put(tiny)))) for _ in range(20))
    rows = []
    for mb in sizes_mb:
        array = np.random.default_rng(0).standard_normal(int(mb * 2**20 / 4), dtype=np.float32)
        puts, totals = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref = ray.put(array)
            t1 = time.perf_counter()
            ray.get(toucher.touch.remote(ref))
            t2 = time.perf_counter()
            puts.append(t1 - t0)
            totals.append(t2 - t0)
            del ref
        rows.append((mb, statistics.median(puts) * 1e3 / mb, (statistics.median(totals) - fixed) * 1e3 / mb))
    ray.kill(toucher)
    return rows, fixed


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    args = parse_args()
    import ray
    import torch

    sizes = [int(n) for n in args.actors.split(",")]
    thread_modes = [None if t.strip() == "default" else int(t) for t in args.actor_threads.split(",")]
    texts = build_hidden_states(args)
    mb_per_text = texts[0].nbytes / 2**20
    print(f"{args.texts} texts x [{args.layers}, {args.tokens}, {args.features}] float32 "
          f"({mb_per_text:.0f} MB a text, {mb_per_text * args.texts:.0f} MB in all), "
          f"effective_rank={args.effective_rank}, repeats={args.repeats}; driver torch threads "
          f"{torch.get_num_threads()}; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    times: dict[str, list[float]] = {}
    update_share: dict[str, list[float]] = {}
    startups: dict[str, list[float]] = {}
    actor_threads: dict[str, list[int]] = {}
    expected = None
    try:
        for _ in range(args.repeats):  # interleaved: every arm once per round
            seconds, expected = time_in_process(texts, args.effective_rank)
            times.setdefault("in-process", []).append(seconds)
            for threads in thread_modes:
                for n in sizes:
                    label = f"pool[{n}] threads={threads or 'default'}"
                    seconds, in_update, startup, used, result = time_pool(texts, n, threads, args.effective_rank)
                    check_same(result, expected, label)
                    times.setdefault(label, []).append(seconds)
                    update_share.setdefault(label, []).append(in_update / seconds)
                    startups.setdefault(label, []).append(startup)
                    actor_threads[label] = used
            print("  round done: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()), flush=True)
        transfer, fixed = measure_transfer([float(s) for s in args.transfer_mb.split(",")], max(3, args.repeats))
    finally:
        ray.shutdown()

    best = {label: min(values) for label, values in times.items()}  # other jobs only add time
    print(f"\n{'arm':<26} {'best s':>7} {'median s':>9} {'vs 1 actor':>10} {'vs in-proc':>10} "
          f"{'in update':>9} {'start-up s':>10} {'actor threads':>13}")
    for label, values in times.items():
        one = best.get(f"pool[1] threads={label.split('threads=')[1]}") if "threads=" in label else None
        vs_one = f"{one / best[label]:.2f}x" if one else "-"
        share = f"{statistics.median(update_share[label]):.0%}" if label in update_share else "-"
        startup = f"{statistics.median(startups[label]):.1f}" if label in startups else "-"
        threads = ",".join(str(t) for t in actor_threads.get(label, [])) or "-"
        print(f"{label:<26} {best[label]:>7.2f} {statistics.median(values):>9.2f} {vs_one:>10} "
              f"{best['in-process'] / best[label]:>9.2f}x {share:>9} {startup:>10} {threads:>13}")
    print(f"\nobject store (fixed cost of a no-op call with a 1-element array: {fixed * 1e3:.2f} ms)")
    print(f"{'MB':>6} {'ray.put ms/MB':>14} {'put + touch ms/MB':>18}")
    for mb, put, total in transfer:
        print(f"{mb:>6.0f} {put:>14.3f} {total:>18.3f}")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
