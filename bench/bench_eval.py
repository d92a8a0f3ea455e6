"""Evaluation through the project vs lm-eval's own CLI, on the same model and task.

    python bench/bench_eval.py                        # 4-block d=128 GPT-2, bundled_cloze (211 test docs), batch 16
    python bench/bench_eval.py --limit 100 --repeats 1
    python bench/bench_eval.py --paper10-estimate     # also: what paper10 costs for GPT-2 small
    python bench/bench_eval.py --protocol             # only: the paper studies' batch 1 / float32 vs batch 16 / bf16

End to end (each a fresh interpreter, as a user runs it):
- `lm_eval --model hf ... --include_path scaling/eval_tasks` (the baseline);
- `python -m scaling.evaluate ...` (goal: <= 1.1x the baseline).
In one warm process (imports done, as in a Ray task that evaluated before):
- `evaluate_model` (the project's path);
- lm-eval's Python API on a model name, `simple_evaluate(model="hf", batch_size=B)`;
- the slow pattern of lm-evaluation-harness #3207, `simple_evaluate(model=HFLM(pretrained=...), batch_size=B)`:
  the HFLM keeps its default batch size 1, the batch_size argument is ignored;
- two tasks in one `simple_evaluate` call vs one call per task (the cost of isolating tasks
  by evaluating them separately).
Arms are interleaved over --repeats; the best time of each is reported, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaling.eval_tasks import BUNDLED_CLOZE, BUNDLED_CLOZE_VAL, TASKS_DIR  # noqa: E402

# The paper's evaluation of GPT-2 at limit 500 (1-shot arc_easy, arc_challenge, mmlu, medmcqa): per task,
# documents evaluated, answer choices per document, forward passes per document, and a typical prompt
# length in GPT-2 tokens. lm-eval runs one forward pass per distinct context + continuation[:-1], so
# choices of one token (mmlu/medmcqa "A".."D", anli "True/Neither/False") share one pass per document,
# and longer choices take one pass each. Document counts are the public split sizes, capped at 500
# (mmlu: --limit applies per subject; 5 of its 57 subjects have more than 500 questions, which leaves
# 12,173 of 14,042). truthfulqa_mc2 has a variable number of answers (about 7 on average); prompt
# lengths are rough. paloma_wikitext_103 is a rolling loglikelihood over whole articles, counted as
# 1024-token windows of about 0.3M tokens.
PAPER10_PLAN = {  # task: (documents, choices, forward passes per document, tokens per pass)
    "mmlu": (12173, 4, 1, 400), "truthfulqa_mc2": (500, 7, 7, 180), "arc_easy": (500, 4, 4, 110),
    "arc_challenge": (500, 4, 4, 120), "openbookqa": (500, 4, 4, 40), "piqa": (500, 2, 2, 60),
    "winogrande": (500, 2, 2, 30), "anli_r2": (500, 3, 1, 110), "medmcqa": (500, 4, 1, 250),
    "lambada_openai": (500, 1, 1, 90), "paloma_wikitext_103": (300, 1, 1, 1024),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--limit", type=int, default=211, help="documents (bundled_cloze's test split has 211)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="keep the model and outputs here (default: a temp folder)")
    parser.add_argument("--paper10-estimate", action="store_true",
                        help="also time GPT-2-small-shaped forward passes and scale them to paper10's")
    parser.add_argument("--protocol", action="store_true",
                        help="only time evaluate_model under the scoring protocols (batch 16 / bf16 export, batch 16 / "
                             "float32, batch 1 / float32: the paper studies'), and how far their scores differ")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (--protocol)")
    return parser.parse_args()


def build_model(workdir: Path, n_layer: int, n_embd: int, *, vocab_size: int | None = None) -> Path:
    from transformers import AutoTokenizer

    from scaling.data import build_tokenizer, parse_text_source, read_rows
    from scaling.model import save_tiny_gpt2

    folder = workdir / f"gpt2-{n_layer}x{n_embd}"
    if (folder / "config.json").is_file():
        return folder
    tokenizer_dir = workdir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        rows = read_rows(parse_text_source("bundled"))
        tokenizer = build_tokenizer(None, rows=rows, vocab_size=1024, cache_dir=workdir / "tokenizer-cache")
        tokenizer.save_pretrained(tokenizer_dir)
    return save_tiny_gpt2(folder, AutoTokenizer.from_pretrained(tokenizer_dir), n_layer=n_layer, n_embd=n_embd,
                          n_head=max(1, n_embd // 64), n_positions=1024, vocab_size=vocab_size)


def run_quiet(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode not in (0, 1):
        raise SystemExit(f"{command[:4]} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def lm_eval_cli(model: Path, args, out: Path) -> list[str]:
    return [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model}",
            "--tasks", BUNDLED_CLOZE, "--include_path", str(TASKS_DIR), "--device", "cpu",
            "--limit", str(args.limit), "--batch_size", str(args.batch_size), "--output_path", str(out)]


def project_cli(model: Path, args, out: Path) -> list[str]:
    return [sys.executable, "-m", "scaling.evaluate", "--model", str(model), "--tasks", BUNDLED_CLOZE,
            "--device", "cpu", "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--out", str(out)]


def read_cli_acc(out: Path) -> float:
    [path] = sorted(out.rglob("results_*.json"))[-1:]
    return json.loads(path.read_text())["results"][BUNDLED_CLOZE]["acc,none"]


def in_process_arms(model: Path, args) -> dict:
    """Warm-process timings: each arm's function, run after one untimed warm-up of everything."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from scaling.evaluate import EvalConfig, evaluate_model

    config = EvalConfig(tasks=(BUNDLED_CLOZE,), limit=args.limit, batch_size=args.batch_size)
    manager = TaskManager(include_defaults=False, include_path=str(TASKS_DIR))

    def project():
        return evaluate_model(model, config, device="cpu").metrics[f"eval/{BUNDLED_CLOZE}/acc"]

    def api_model_name():
        raw = simple_evaluate(model="hf", model_args={"pretrained": str(model)}, tasks=[BUNDLED_CLOZE],
                              batch_size=args.batch_size, device="cpu", limit=args.limit, task_manager=manager,
                              log_samples=False)
        return raw["results"][BUNDLED_CLOZE]["acc,none"]

    def api_prebuilt_hflm():  # lm-evaluation-harness #3207
        raw = simple_evaluate(model=HFLM(pretrained=str(model), device="cpu"), tasks=[BUNDLED_CLOZE],
                              batch_size=args.batch_size, limit=args.limit, task_manager=manager, log_samples=False)
        return raw["results"][BUNDLED_CLOZE]["acc,none"]

    lm = HFLM(pretrained=str(model), device="cpu", batch_size=args.batch_size)

    def two_tasks_one_call():
        simple_evaluate(model=lm, tasks=[BUNDLED_CLOZE, BUNDLED_CLOZE_VAL], limit=args.limit, task_manager=manager,
                        log_samples=False)

    def two_tasks_two_calls():
        for task in (BUNDLED_CLOZE, BUNDLED_CLOZE_VAL):
            simple_evaluate(model=lm, tasks=[task], limit=args.limit, task_manager=manager, log_samples=False)

    arms = {"evaluate_model": project, "simple_evaluate(model='hf')": api_model_name,
            "simple_evaluate(HFLM default batch) #3207": api_prebuilt_hflm,
            "2 tasks, 1 simple_evaluate call": two_tasks_one_call, "2 tasks, 2 calls": two_tasks_two_calls}
    best, values = {}, {}
    for fn in arms.values():
        fn()  # warm-up: imports, dataset building, caches
    for _ in range(args.repeats):
        for name, fn in arms.items():
            started = time.perf_counter()
            values[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    return {"best": best, "values": values}


def protocol_arms(model: Path, args) -> None:
    """evaluate_model on the same model under each scoring protocol, interleaved over --repeats (best time
    each), with accuracies and the largest per-choice log-likelihood difference from batch 1 / float32."""
    import dataclasses

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scaling.evaluate import EvalConfig, evaluate_model

    bf16 = model.with_name(model.name + "-bf16")  # what a bf16 training run exported before
    if not (bf16 / "config.json").is_file():
        AutoModelForCausalLM.from_pretrained(model).to(torch.bfloat16).save_pretrained(bf16)
        AutoTokenizer.from_pretrained(model).save_pretrained(bf16)
    base = EvalConfig(tasks=(BUNDLED_CLOZE,), limit=args.limit, batch_size=16)
    arms = {"batch 16, bf16 export (auto)": (bf16, base),
            "batch 16, float32": (model, dataclasses.replace(base, dtype="float32")),
            "batch 1, float32 (paper studies)": (model, dataclasses.replace(base, dtype="float32", batch_size=1)),
            "batch 1, bf16 export (auto)": (bf16, dataclasses.replace(base, batch_size=1))}
    best, results = {}, {}
    for folder, config in arms.values():
        evaluate_model(folder, dataclasses.replace(config, limit=8), device=args.device)  # warm-up: imports, caches
    for _ in range(args.repeats):
        for name, (folder, config) in arms.items():
            started = time.perf_counter()
            results[name] = evaluate_model(folder, config, device=args.device)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - started)
    reference = "batch 1, float32 (paper studies)"
    ref = [r["loglik"] for r in results[reference].samples[BUNDLED_CLOZE]]
    print(f"\n{'protocol (' + args.device + ')':<36} {'best s':>8} {'vs batch 16 bf16':>17} {'acc':>7} {'max |dloglik|':>14}")
    for name, seconds in best.items():
        logliks = [r["loglik"] for r in results[name].samples[BUNDLED_CLOZE]]
        diff = max(abs(a - b) for x, y in zip(logliks, ref) for a, b in zip(x, y))
        print(f"{name:<36} {seconds:>8.2f} {seconds / best['batch 16, bf16 export (auto)']:>16.2f}x "
              f"{results[name].metrics[f'eval/{BUNDLED_CLOZE}/acc']:>7.4f} {diff:>14.4f}")


def paper10_estimate(workdir: Path, repeats: int) -> None:
    """Forward time of a GPT-2-small-shaped model (12 x 768, vocab 50257) on this CPU at each task's
    prompt length and batch 16, times the forward passes of PAPER10_PLAN."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)).eval()
    per_sequence = {}
    with torch.inference_mode():
        for length in sorted({plan[3] for plan in PAPER10_PLAN.values()}):
            ids = torch.randint(0, 50257, (16, length))
            model(input_ids=ids[:2])  # warm-up
            best = float("inf")
            for _ in range(repeats):
                started = time.perf_counter()
                model(input_ids=ids)
                best = min(best, time.perf_counter() - started)
            per_sequence[length] = best / 16
    print(f"\npaper10 estimate (GPT-2 small, limit 500): {'task':<20} {'docs':>6} {'passes':>7} {'tokens':>6} "
          f"{'CPU s':>8}")
    total_passes = total_tokens = total_s = 0.0
    for task, (docs, _, passes, tokens) in PAPER10_PLAN.items():
        seconds = docs * passes * per_sequence[tokens]
        total_passes, total_tokens, total_s = total_passes + docs * passes, total_tokens + docs * passes * tokens, \
            total_s + seconds
        print(f"{'':<43}{task:<20} {docs:>6} {docs * passes:>7} {tokens:>6} {seconds:>8.0f}")
    print(f"{'':<43}{'total':<20} {'':>6} {total_passes:>7.0f} {total_tokens / 1e6:>5.1f}M {total_s:>8.0f}"
          f"  ({total_s / 3600:.1f} h of forward passes on this CPU, "
          f"{', '.join(f'{n} tok {1000 * t:.0f} ms/seq' for n, t in per_sequence.items())})")
    print(f"{'':<43}forward FLOPs ~ 2 x 124M x {total_tokens / 1e6:.1f}M tokens = "
          f"{2 * 124e6 * total_tokens:.1e}")


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model = build_model(workdir, args.n_layer, args.n_embd)
        load_start = os.getloadavg()[0]
        print(f"model {model.name}, task {BUNDLED_CLOZE}, limit {args.limit}, batch {args.batch_size}, "
              f"{args.repeats} repeats; load {load_start:.1f} on {os.cpu_count()} cores", flush=True)
        if args.protocol:
            protocol_arms(model, args)
            print(f"load {load_start:.1f} -> {os.getloadavg()[0]:.1f}")
            return
        arms = {"lm_eval CLI": (lm_eval_cli, "lm_eval"), "python -m scaling.evaluate": (project_cli, "project")}
        cli_best = dict.fromkeys(arms, float("inf"))
        for repeat in range(args.repeats):
            for name, (command, folder) in arms.items():
                seconds = run_quiet(command(model, args, workdir / f"out-{repeat}" / folder), workdir)
                cli_best[name] = min(cli_best[name], seconds)
        cli_acc = read_cli_acc(workdir / "out-0" / "lm_eval")
        project_acc = json.loads((workdir / "out-0" / "project" / "eval_results.json").read_text())["metrics"][
            f"eval/{BUNDLED_CLOZE}/acc"]
        warm = in_process_arms(model, args)

        base = cli_best["lm_eval CLI"]
        print(f"\n{'path':<44} {'best s':>8} {'vs lm_eval CLI':>15}")
        for name, seconds in cli_best.items():
            print(f"{name:<44} {seconds:>8.2f} {seconds / base:>14.2f}x")
        api = warm["best"]["simple_evaluate(model='hf')"]
        print(f"\n{'warm process':<44} {'best s':>8} {'vs lm-eval API':>15}")
        for name, seconds in warm["best"].items():
            print(f"{name:<44} {seconds:>8.2f} {seconds / api:>14.2f}x")
        one, two = warm["best"]["2 tasks, 1 simple_evaluate call"], warm["best"]["2 tasks, 2 calls"]
        api_acc = warm["values"]["simple_evaluate(model='hf')"]
        print(f"\nacc: lm_eval CLI {cli_acc:.4f}, project CLI {project_acc:.4f}, "
              f"evaluate_model {warm['values']['evaluate_model']:.4f}, lm-eval API {api_acc:.4f}")
        print(f"one call per task costs {two - one:+.2f} s for 2 tasks ({(two - one) / 2:+.2f} s per extra call)")
        if args.paper10_estimate:
            paper10_estimate(workdir, args.repeats)
        print(f"load {load_start:.1f} -> {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
