"""Streaming condensation metric vs the reference algorithm (stack every repetition's
matrices, re-concatenating each time, average at the end).

Same model (a random GPT-2: 12 blocks, so 13 hidden states of T x T matrices, as GPT-2
small), same texts (bundled corpus, reference protocol), T = 512, at two R values. Each
(method, R) runs in its own subprocess so that its peak RSS is its own; a forward-only run
gives the shared baseline. Two views are printed:
- metric only: time spent in the metric (everything after the forward pass), and peak RSS
  above the forward-only run;
- end to end: wall time including the forward passes (the same for both methods).

    python bench/bench_condensation.py                 # R = 25 and 100, d_model 256
    python bench/bench_condensation.py --d-model 768   # GPT-2 small's width (slower forward)

Threads are pinned (default 1) so that both methods get the same CPU on a shared machine.
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

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("forward", "reference", "streaming", "streaming+rank")


# --- one measurement (runs in a subprocess) ---------------------------------------------------


class ReferenceStyle:
    """A straightforward implementation of the reference algorithm, written for this bench:
    numpy float32 per repetition, stacked by concatenation, mean over repetitions at the end."""

    def __init__(self):
        self.stacked = None

    def add(self, hidden) -> None:
        import numpy as np

        matrices = []
        for layer in hidden:
            x = layer[0].float().cpu().numpy()
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-3)
            matrices.append(np.clip(x @ x.T, -1, 1)[None])
        if self.stacked is None:
            self.stacked = matrices
        else:
            self.stacked = [np.concatenate((s, m)) for s, m in zip(self.stacked, matrices)]

    def finish(self):
        import numpy as np

        averaged = np.stack([s.mean(axis=0) for s in self.stacked])
        return averaged.reshape(len(averaged), -1).mean(axis=1)


def measure_one(method: str, model_dir: str, repetitions: int, max_length: int) -> dict:
    import scipy.stats  # noqa: F401 -- a one-off import cost, not the metric's
    import torch

    from scaling.condensation import CondensationAccumulator, tokenize_for_measurement
    from scaling.data import build_tokenizer, parse_text_source, read_rows, sample_texts
    from scaling.model import build_causal_lm

    loaded = build_causal_lm(model_dir, device="cpu", dtype="float32")
    tokenizer = build_tokenizer(model_dir)
    texts = sample_texts(read_rows(parse_text_source("bundled")), repetitions)
    metric_s = 0.0
    accumulator = CondensationAccumulator(effective_rank=method == "streaming+rank")
    reference = ReferenceStyle()
    started = time.perf_counter()
    with torch.inference_mode():
        for text in texts:
            tokens = tokenize_for_measurement(tokenizer, text, max_length)
            if tokens["input_ids"].shape[-1] != max_length:
                raise SystemExit(f"a text has fewer than {max_length} tokens; the reference cannot handle that")
            hidden = loaded.base_model(**tokens, output_hidden_states=True, use_cache=False).hidden_states
            tick = time.perf_counter()
            if method == "reference":
                reference.add(hidden)
            elif method.startswith("streaming"):
                accumulator.update(torch.stack([h[0] for h in hidden]))
            metric_s += time.perf_counter() - tick
            del hidden
        tick = time.perf_counter()
        if method == "reference":
            means = reference.finish()
        elif method.startswith("streaming"):
            means = accumulator.finalize().mean_cosine
        else:
            means = None
        metric_s += time.perf_counter() - tick
    return {
        "method": method,
        "repetitions": repetitions,
        "total_s": time.perf_counter() - started,
        "metric_s": metric_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "means": None if means is None else [float(v) for v in means],
    }


# --- orchestration ------------------------------------------------------------------------------


def build_model(directory: Path, d_model: int, n_layers: int, max_length: int) -> None:
    from scaling.data import build_tokenizer, parse_text_source, read_rows
    from scaling.model import save_tiny_gpt2

    tokenizer = build_tokenizer(None, rows=read_rows(parse_text_source("bundled")), vocab_size=4096)
    save_tiny_gpt2(directory, tokenizer, n_layer=n_layers, n_embd=d_model, n_head=max(1, d_model // 64),
                   n_positions=max(1024, max_length))


def run_subprocess(method: str, model_dir: Path, repetitions: int, max_length: int, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    command = [sys.executable, __file__, "--one", method, "--model-dir", str(model_dir),
               "--repetitions", str(repetitions), "--max-length", str(max_length)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{method} R={repetitions} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(measure_one(args.one, args.model_dir, args.repetitions[0], args.max_length)))
        return

    import numpy as np

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch) / "model"
        build_model(model_dir, args.d_model, args.n_layers, args.max_length)
        print(f"GPT-2 config: {args.n_layers} blocks, d_model {args.d_model}, T = {args.max_length}, "
              f"{args.threads} thread(s); bundled corpus, reference protocol texts")
        rows = {}
        for repetitions in args.repetitions:
            for method in METHODS:
                rows[method, repetitions] = run_subprocess(method, model_dir, repetitions, args.max_length,
                                                           args.threads)
                row = rows[method, repetitions]
                print(f"  R={repetitions:<4} {method:<15} total {row['total_s']:8.2f} s   metric "
                      f"{row['metric_s']:8.2f} s   peak RSS {row['peak_rss_mb']:8.0f} MB", flush=True)

    print("\nsummary (ratios = reference / streaming; RSS above the forward-only run)")
    for repetitions in args.repetitions:
        base, ref = rows["forward", repetitions], rows["reference", repetitions]
        for method in ("streaming", "streaming+rank"):
            ours = rows[method, repetitions]
            diff = np.abs(np.array(ours["means"]) - np.array(ref["means"])).max()
            print(f"  R={repetitions:<4} {method:<15} metric time {ref['metric_s'] / ours['metric_s']:7.1f}x faster  "
                  f"end-to-end {ref['total_s'] / ours['total_s']:5.2f}x  "
                  f"extra RSS ref {ref['peak_rss_mb'] - base['peak_rss_mb']:7.0f} MB vs ours "
                  f"{ours['peak_rss_mb'] - base['peak_rss_mb']:5.0f} MB  max|mean diff| {diff:.1e}")


if __name__ == "__main__":
    main()
