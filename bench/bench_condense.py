"""`python -m scaling.condense` end to end vs the per-text forward-pass floor vs the reference.

The case of issue 16: a random GPT-2 (12 blocks, d_model 128, 512-token context), 16 texts of
the bundled corpus written to a .txt file and cycled to R = 100, T = 512. Three programs, each
a fresh process timed from its start to its exit, with its own peak RSS (`os.wait4`):

- floor:     start Python, import transformers, load the model and tokenizer, run the same R
             forward passes one text at a time (`output_hidden_states=True`), compute nothing;
- condense:  `python -m scaling.condense --texts FILE` (batched; writes json + heatmap);
- reference: the authors' `embedding-condensation` 2.0 on the same texts (`texts=`, the same
             cycling), heatmap on; only with `--reference-python` (a separate venv that has it
             installed: it is never a dependency of this project).

The programs run interleaved, `--repeats` times each, and the medians are compared. The
per-layer mean cosines of `condense` are checked against the reference's (and against
`--batch-size 1`, one text per forward pass, when `--check-unbatched`).

    python bench/bench_condense.py
    python bench/bench_condense.py --reference-python /tmp/refvenv/bin/python --repeats 3
    python bench/bench_condense.py --d-model 768 --n-heads 12     # GPT-2 small's width

Threads are not pinned: every program gets the machine's cores, as a user's run would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOOR = """
import sys, time
from pathlib import Path
model_dir, texts_file, repetitions, max_length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
texts = [line for line in Path(texts_file).read_text().splitlines() if line.strip()]
with torch.inference_mode():
    for r in range(repetitions):
        ids = tokenizer(texts[r % len(texts)], return_tensors="pt", truncation=True, max_length=max_length)
        model.base_model(**ids, output_hidden_states=True, use_cache=False)
"""

REFERENCE = """
import json, sys
from pathlib import Path
model_dir, texts_file, repetitions, max_length, out = sys.argv[1:6]
from transformers import AutoModel, AutoTokenizer
from embedding_condensation import measure_embedding_condensation
model = AutoModel.from_pretrained(model_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
texts = [line for line in Path(texts_file).read_text().splitlines() if line.strip()]
result = measure_embedding_condensation(model, tokenizer, texts=texts, repetitions=int(repetitions),
                                        max_length=int(max_length), plot=True, show_progress=False,
                                        save_path=str(Path(out) / "heatmap.png"))
means = result.cossim_by_layer.reshape(result.cossim_by_layer.shape[0], -1).mean(axis=1)
(Path(out) / "means.json").write_text(json.dumps([float(m) for m in means]))
"""


def build_case(directory: Path, *, n_layers: int, d_model: int, n_heads: int, context: int, n_texts: int) -> None:
    """The model (random GPT-2 with a locally trained tokenizer) and the texts file."""
    from scaling.data import build_tokenizer, parse_text_source, read_rows, sample_texts
    from scaling.model import save_tiny_gpt2

    rows = read_rows(parse_text_source("bundled"))
    tokenizer = build_tokenizer(None, rows=rows, vocab_size=4096)
    save_tiny_gpt2(directory / "model", tokenizer, n_layer=n_layers, n_embd=d_model, n_head=n_heads,
                   n_positions=context)
    texts = [" ".join(text.split()) for text in sample_texts(rows, n_texts)]  # one document per line
    (directory / "texts.txt").write_text("\n".join(texts) + "\n")


def timed(command: list[str], env: dict[str, str]) -> dict:
    """Wall seconds from start to exit and the child's peak RSS (MB)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    stdout, stderr = process.stdout.read(), process.stderr.read()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({process.returncode}):\n{stderr[-3000:]}")
    return {"seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stdout": stdout}


def load_average() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=100, help="R")
    parser.add_argument("--max-length", type=int, default=512, help="T")
    parser.add_argument("--texts", type=int, default=16, help="distinct texts, cycled to R")
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-heads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each program (interleaved)")
    parser.add_argument("--reference-python", default=None,
                        help="a python whose environment has embedding-condensation 2.0 installed")
    parser.add_argument("--batch-size", default=None, help="passed to condense (default: automatic)")
    parser.add_argument("--check-unbatched", action="store_true",
                        help="also run condense with --batch-size 1 and compare its numbers")
    parser.add_argument("--workdir", default=None, help="keep the model, texts and outputs here")
    args = parser.parse_args()

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.workdir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "model" / "config.json").exists():
            build_case(work, n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
                       context=max(512, args.max_length), n_texts=args.texts)
        model, texts = str(work / "model"), str(work / "texts.txt")
        common = [model, texts, str(args.repetitions), str(args.max_length)]
        condense = [sys.executable, "-m", "scaling.condense", "--model", model, "--texts", texts,
                    "--repetitions", str(args.repetitions), "--max-length", str(args.max_length), "--no-progress"]
        programs = {
            "floor": [sys.executable, "-c", FLOOR, *common],
            "condense": condense + ["--out", str(work / "out-condense")]
                        + (["--batch-size", args.batch_size] if args.batch_size else []),
        }
        if args.check_unbatched:
            programs["condense --batch-size 1"] = condense + ["--out", str(work / "out-unbatched"), "--batch-size", "1"]
        if args.reference_python:
            (work / "out-reference").mkdir(exist_ok=True)
            programs["reference"] = [args.reference_python, "-c", REFERENCE, *common, str(work / "out-reference")]

        print(f"GPT-2 {args.n_layers} blocks, d_model {args.d_model}, {args.n_heads} heads; {args.texts} texts "
              f"cycled to R={args.repetitions}, T={args.max_length}; {os.cpu_count()} CPU(s); "
              f"load {load_average()} at start", flush=True)
        runs: dict[str, list[dict]] = {name: [] for name in programs}
        for repeat in range(args.repeats):
            for name, command in programs.items():
                load = load_average()
                runs[name].append(timed(command, env))
                run = runs[name][-1]
                print(f"  run {repeat + 1} {name:<24} {run['seconds']:7.2f} s wall {run['cpu_s']:7.2f} s CPU  "
                      f"peak RSS {run['peak_rss_mb']:7.0f} MB  (load {load})", flush=True)

        def median(name: str, key: str) -> float:
            return statistics.median(run[key] for run in runs[name])

        floor = median("floor", "seconds")
        floor_cpu = median("floor", "cpu_s")
        print(f"\n| program | wall s (median of {args.repeats}) | vs floor | CPU s | vs floor | peak RSS MB "
              "| reference / this (wall) |")
        print("|---|---|---|---|---|---|---|")
        for name in programs:
            seconds, cpu = median(name, "seconds"), median(name, "cpu_s")
            versus = (f"{median('reference', 'seconds') / seconds:.2f}x" if "reference" in programs else "")
            print(f"| {name} | {seconds:.2f} | {seconds / floor:.2f}x | {cpu:.2f} | {cpu / floor_cpu:.2f}x | "
                  f"{median(name, 'peak_rss_mb'):.0f} | {versus} |")
        print(f"load at end {load_average()}; goals: condense <= 1.3x floor, reference / condense >= 3x")

        ours = json.loads((work / "out-condense" / "condensation.json").read_text())
        ours_means = [layer["mean_cosine"] for layer in ours["layers"]]
        if args.check_unbatched:
            one = json.loads((work / "out-unbatched" / "condensation.json").read_text())
            diff = max(abs(a["mean_cosine"] - b["mean_cosine"]) for a, b in zip(ours["layers"], one["layers"]))
            print(f"max |mean cosine| difference, batched vs one text per pass: {diff:.1e}")
        if "reference" in programs:
            theirs = json.loads((work / "out-reference" / "means.json").read_text())
            diff = max(abs(a - b) for a, b in zip(ours_means, theirs))
            print(f"max |mean cosine| difference vs the reference: {diff:.1e}")


if __name__ == "__main__":
    main()
