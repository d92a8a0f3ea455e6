"""Data path at scale (issue 14): the driver's peak memory, old path vs token shards; tokenization
throughput of the Ray Data pipeline with 1 vs 2 CPUs.

Generates two local text corpora (default 4 MB and 40 MB: lines of 5-120 words drawn with a seeded
generator from the bundled text's vocabulary) and a byte-level BPE (vocab 1024, trained on the
bundled text), then, each in its own subprocess so that one measurement's memory cannot leak into
the next:

* rss-old: what `scaling.study.prepare_data` does on the driver today, plus the `ray.put` of the
  arrays that `run_study` ships to the workers: read every row, tokenize them in the driver, pack
  with `pack_blocks`, `split_train_val`, draw and tokenize the probe texts;
* rss-new: `scaling.shards.build_token_shards` into an empty folder (the tokenizing run, the
  heavier case), then what the driver still does: the train/val views and the probe token ids;
* tput-N: a private Ray with N logical CPUs; one small warm-up build (starts and warms the Ray
  workers), then the big corpus into an empty folder, timed by the build itself (rows/s, tokens/s
  and MB/s of text); the N=1 child also tokenizes the corpus in-process with the same code on one
  thread first, as the per-core reference without Ray;
* read: microseconds per batch of random blocks (what a worker does per micro-batch) from the
  memory-mapped shards vs from the old in-memory array, at two block lengths.

Peak memory is the driver process's own high-water mark (`VmHWM` in /proc/self/status, and
`ru_maxrss`); Ray's raylet, object store and workers are other processes and are not counted.
Goals: new path 40 MB / 4 MB peak <= 1.25x; 2 CPUs / 1 CPU tokens/s >= 1.6x (wall clock: needs a quiet
machine; the load average is printed next to every figure). Tokens per CPU-second (CPU time of the
tasks, `time.process_time`) is the per-core throughput that stays meaningful on a busy machine: use
it to size a cluster.

    python bench/bench_data.py                       # 4 and 40 MB, 1 and 2 CPUs
    python bench/bench_data.py --sizes-mb 2,20 --cpus 1,2 --workdir /tmp/bench-data
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))


def load() -> float:
    return os.getloadavg()[0]


def peak_mb() -> dict:
    status = Path("/proc/self/status").read_text()
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return {"vmhwm_mb": hwm / 1024, "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    import numpy as np

    from scaling.data import parse_text_source, read_rows

    words = np.array(" ".join(read_rows(parse_text_source("bundled"))).split())
    rng = np.random.default_rng(seed)
    target = int(megabytes * (1 << 20))
    with open(path, "w", encoding="utf-8") as out:
        while out.tell() < target:
            lengths = rng.integers(5, 120, size=1000)
            out.write("\n".join(" ".join(words[rng.integers(0, len(words), n)]) for n in lengths) + "\n")


def start_ray(cpus: int):
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return ray


# --- children (one measurement each) -----------------------------------------------------------------


def child_rss_old(args) -> dict:
    import hashlib

    import numpy as np

    from old_data_path import pack_blocks, split_train_val  # tests/: the path the shards replaced

    from scaling.data import build_tokenizer, parse_text_source, read_rows, sample_texts

    ray = start_ray(2)
    started = time.perf_counter()
    rows = read_rows(parse_text_source(args.corpus))
    tokenizer = build_tokenizer(args.tokenizer)
    token_rows = tokenizer(rows, add_special_tokens=False)["input_ids"]
    blocks = pack_blocks(token_rows, args.seq_len, tokenizer.eos_token_id)
    train, val = split_train_val(blocks, 0.1, seed=0)
    probe_ids = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"][:args.seq_len], dtype=np.int64)
                 for t in sample_texts(rows, args.probes)]
    digest = hashlib.sha256(blocks.tobytes()).hexdigest()
    refs = (ray.put(train), ray.put(val), ray.put(probe_ids))
    seconds = time.perf_counter() - started
    del refs, digest
    return {"seconds": seconds, "tokens": int(blocks.size), "train_blocks": len(train), **peak_mb()}


def child_rss_new(args) -> dict:
    from scaling.shards import ShardSpec, build_token_shards

    start_ray(2)
    started = time.perf_counter()
    shards = build_token_shards(ShardSpec(args.corpus, args.tokenizer), args.root, seq_len=args.seq_len,
                                progress=lambda line: print(line, file=sys.stderr))
    train, val = shards.blocks(args.seq_len, "train"), shards.blocks(args.seq_len, "val")
    probe_ids = shards.probe_ids(args.probes, args.seq_len)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": shards.total_tokens, "train_blocks": len(train), "val_blocks": len(val),
            "probes": len(probe_ids), **peak_mb()}


def child_throughput(args) -> dict:
    from scaling.shards import ShardSpec, build_token_shards

    result = {}
    if args.inprocess:
        result["inprocess"] = inprocess_throughput(args)
    start_ray(int(args.cpus))
    build_token_shards(ShardSpec(args.warmup, args.tokenizer), args.root + "-warmup",
                       progress=lambda line: None)
    load_before = load()
    shards = build_token_shards(ShardSpec(args.corpus, args.tokenizer), args.root,
                                progress=lambda line: print(line, file=sys.stderr))
    build = shards.manifest["build"]
    size = os.path.getsize(args.corpus)
    result["ray"] = {**build, "mb_per_s": size / (1 << 20) / build["seconds"], "tokens": shards.total_tokens,
                     "load": [load_before, load()]}
    return result


def inprocess_throughput(args) -> dict:
    """The same encoding code on one thread in this process, no Ray: the per-core reference."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    from scaling.data import build_tokenizer
    from scaling.shard_tasks import ENCODE_ROWS, encode_rows, row_text

    tokenizer = Tokenizer.from_str(build_tokenizer(args.tokenizer).backend_tokenizer.to_str())
    eos = build_tokenizer(args.tokenizer).eos_token_id
    load_before, started, cpu, rows, tokens, pending = load(), time.perf_counter(), time.process_time(), 0, 0, []
    with open(args.corpus, encoding="utf-8") as lines:
        for line in lines:
            text = row_text(line, "eos")
            if text is None:
                continue
            pending.append(text)
            if len(pending) >= ENCODE_ROWS:
                flat, _ = encode_rows(tokenizer, pending, eos)
                rows, tokens, pending = rows + len(pending), tokens + len(flat), []
    if pending:
        flat, _ = encode_rows(tokenizer, pending, eos)
        rows, tokens = rows + len(pending), tokens + len(flat)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    size = os.path.getsize(args.corpus)
    return {"seconds": seconds, "rows_per_s": rows / seconds, "tokens_per_s": tokens / seconds,
            "cpu_seconds": cpu, "tokens_per_cpu_s": tokens / cpu,
            "mb_per_s": size / (1 << 20) / seconds, "tokens": tokens, "load": [load_before, load()]}


# --- parent -----------------------------------------------------------------------------------------


def run_child(kind: str, **options) -> dict:
    command = [sys.executable, __file__, "--child", kind]
    for key, value in options.items():
        if value is True:
            command.append(f"--{key.replace('_', '-')}")
        elif value is not None and value is not False:
            command += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    before = load()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"child {kind} failed ({done.returncode})")
    result = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    result["load"] = result.get("load", [before, load()])
    return result


def main() -> None:
    args = parse_args()
    if args.child:
        handlers = {"rss-old": child_rss_old, "rss-new": child_rss_new, "tput": child_throughput}
        print(json.dumps(handlers[args.child](args)))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    from scaling.data import build_tokenizer, parse_text_source, read_rows

    tokenizer_dir = workdir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        build_tokenizer(None, rows=read_rows(parse_text_source("bundled")), vocab_size=1024,
                        cache_dir=workdir / "tokenizer-cache").save_pretrained(tokenizer_dir)
    sizes = [float(s) for s in args.sizes_mb.split(",")]
    corpora = {}
    for size in sizes:
        corpora[size] = workdir / f"corpus-{size:g}mb.txt"
        if not corpora[size].is_file():
            generate_corpus(corpora[size], size)
    listing = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.1f} MB" for p in corpora.values())
    print(f"workdir {workdir}; corpora {listing}; load {load():.1f}; {os.cpu_count()} cores")

    rss = {}
    for size in sizes if args.only in ("all", "rss") else ():
        for path in (["old"] if not args.skip_old else []) + ["new"]:
            root = workdir / f"shards-rss-{path}-{size:g}-{time.time_ns()}"
            result = run_child(f"rss-{path}", corpus=corpora[size], tokenizer=tokenizer_dir, root=root,
                               seq_len=args.seq_len, probes=args.probes)
            rss[(path, size)] = result
            print(f"rss-{path} {size:g} MB: peak {result['vmhwm_mb']:.0f} MB (ru_maxrss {result['ru_maxrss_mb']:.0f}), "
                  f"{result['tokens']:,} tokens, {result['seconds']:.1f} s, load {result['load'][0]:.1f} -> "
                  f"{result['load'][1]:.1f}", flush=True)

    tput = {}
    big = corpora[max(sizes)]
    for cpus in [int(c) for c in args.cpus.split(",")] if args.only in ("all", "tput") else ():
        root = workdir / f"shards-tput-{cpus}-{time.time_ns()}"
        tput[cpus] = run_child("tput", corpus=big, tokenizer=tokenizer_dir, root=root, cpus=cpus,
                               warmup=corpora[min(sizes)], inprocess=cpus == 1)
        ray_result = tput[cpus]["ray"]
        if "inprocess" in tput[cpus]:
            ref = tput[cpus]["inprocess"]
            print(f"in-process, 1 thread: {ref['rows_per_s']:,.0f} rows/s, {ref['tokens_per_s']:,.0f} tokens/s, "
                  f"{ref['mb_per_s']:.2f} MB/s; {ref['tokens_per_cpu_s']:,.0f} tokens per CPU-second "
                  f"({ref['seconds']:.1f} s, load {ref['load'][0]:.1f} -> {ref['load'][1]:.1f})", flush=True)
        print(f"ray data, {cpus} CPU(s): {ray_result['rows_per_s']:,.0f} rows/s, {ray_result['tokens_per_s']:,.0f} "
              f"tokens/s, {ray_result['mb_per_s']:.2f} MB/s; {ray_result['tokens_per_cpu_s']:,.0f} tokens per "
              f"CPU-second; the tasks got {ray_result['cpu_seconds'] / ray_result['seconds']:.2f} CPUs on average "
              f"({ray_result['seconds']:.1f} s, {ray_result['pieces']} "
              f"pieces, load {ray_result['load'][0]:.1f} -> {ray_result['load'][1]:.1f})", flush=True)

    reads = {}
    if args.only in ("all", "read"):
        reads = read_cost(corpora[max(sizes)], tokenizer_dir, workdir, args)

    print("\n| measurement | value | goal |\n|---|---|---|")
    small, large = min(sizes), max(sizes)
    for path in ("old", "new"):
        if (path, small) in rss and (path, large) in rss:
            a, b = rss[(path, small)]["vmhwm_mb"], rss[(path, large)]["vmhwm_mb"]
            print(f"| driver peak RSS, {path} path: {small:g} MB -> {large:g} MB corpus | {a:.0f} -> {b:.0f} MB "
                  f"({b / a:.2f}x) | {'<= 1.25x' if path == 'new' else ''} |")
    if ("old", large) in rss:
        ratio = rss[("new", large)]["vmhwm_mb"] / rss[("old", large)]["vmhwm_mb"]
        print(f"| driver peak RSS at {large:g} MB, new / old | {ratio:.2f}x | |")
    if 1 in tput and 2 in tput:
        ratio = tput[2]["ray"]["tokens_per_s"] / tput[1]["ray"]["tokens_per_s"]
        share = (tput[2]["ray"]["cpu_seconds"] / tput[2]["ray"]["seconds"]) / (
            tput[1]["ray"]["cpu_seconds"] / tput[1]["ray"]["seconds"])
        print(f"| tokens/s, 2 CPUs / 1 CPU | {ratio:.2f}x | >= 1.6x |")
        print(f"| CPU time the tasks got per wall second, 2 CPUs / 1 CPU (what the ratio above can be) | "
              f"{share:.2f}x | |")
    if 1 in tput:
        ray1, ref = tput[1]["ray"], tput[1].get("inprocess")
        if ref:
            print(f"| Ray Data 1 CPU / in-process 1 thread, tokens/s (wall) | "
                  f"{ray1['tokens_per_s'] / ref['tokens_per_s']:.2f}x | |")
            print(f"| Ray Data / in-process, tokens per CPU-second | "
                  f"{ray1['tokens_per_cpu_s'] / ref['tokens_per_cpu_s']:.2f}x | |")
    for cpus, result in sorted(tput.items()):
        print(f"| tokens per CPU-second in the tasks, {cpus} CPU(s) | {result['ray']['tokens_per_cpu_s']:,.0f} | |")
    for seq_len, (shard_us, memory_us) in reads.items():
        print(f"| one batch of {args.batch} random blocks of {seq_len}, shards / in-memory array | "
              f"{shard_us:.0f} / {memory_us:.0f} us | |")
    print(f"\nload at the end {load():.1f}")


def read_cost(corpus: Path, tokenizer_dir: Path, workdir: Path, args) -> dict:
    """Microseconds per batch of random blocks: memory-mapped shards vs the old in-memory array (no Ray:
    the shards of the big corpus are built once, or found, in this process's own private Ray)."""
    import numpy as np

    from scaling.shards import ShardSpec, build_token_shards

    start_ray(2)
    shards = build_token_shards(ShardSpec(str(corpus), str(tokenizer_dir)), str(workdir / "shards-read"),
                                progress=lambda line: None)
    result = {}
    for seq_len in (128, 1024):
        view = shards.blocks(seq_len, "train")
        memory = np.asarray(view)
        rng = np.random.default_rng(0)
        batches = [rng.integers(0, len(view), args.batch) for _ in range(args.reads)]
        timings = []
        for source in (view, memory):
            source[batches[0]]  # first touch (page cache, permutation) outside the clock
            started = time.perf_counter()
            for indices in batches:
                source[indices]
            timings.append((time.perf_counter() - started) / len(batches) * 1e6)
        result[seq_len] = tuple(timings)
        print(f"read seq_len {seq_len}: shards {timings[0]:.0f} us, in-memory {timings[1]:.0f} us per batch of "
              f"{args.batch} (load {load():.1f})", flush=True)
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="4,40", help="corpus sizes (the smallest and largest are compared)")
    parser.add_argument("--cpus", default="1,2", help="logical CPUs of the private Ray for the throughput runs")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--probes", type=int, default=8, help="probe texts drawn by the driver")
    parser.add_argument("--workdir", default=None, help="keep corpora, tokenizer and shards here")
    parser.add_argument("--skip-old", action="store_true", help="do not measure the old driver path")
    parser.add_argument("--only", choices=("all", "rss", "tput", "read"), default="all", help="run only one part")
    parser.add_argument("--batch", type=int, default=8, help="blocks per batch in the read-cost part")
    parser.add_argument("--reads", type=int, default=2000, help="batches timed in the read-cost part")
    # children only
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--inprocess", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
