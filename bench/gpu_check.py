"""One prepared command for one GPU: the numbers issue 16 asks of the CUDA / NCCL / bf16 path.

    python bench/gpu_check.py              # one CUDA GPU; sized to finish in under 8 minutes on an H200
    python bench/gpu_check.py --smoke      # the same code on CPU with tiny shapes (a few minutes)

Prints one table. Every row runs the project's real code: training goes through
`scaling.config.study_from_dict` + `scaling.study.run_study` (Ray Train + DeepSpeed, a temp
MLflow store and storage folder), condensation through `python -m scaling.condense`.

- bf16 matmul peak: a timed large bf16 matmul on the same GPU in the same run (a subprocess,
  so the driver never holds a CUDA context); MFU is quoted against it, not a datasheet.
- GPT-2 small from scratch at 1024 tokens, ZeRO-2, bf16, 1 worker (Ray Train picks NCCL for a
  GPU worker group): tokens/s (median of the in-loop rate over the steps after `--skip`), MFU
  = tokens/s x `scaling.ladder.compute_flops_per_token` / measured peak (goal >= 40%), peak GPU
  memory (nvidia-smi, the whole device: CUDA context and allocator reserve included).
- the same run with the dispersion arm (angular_spread, lambda 0.1, all layers): its tokens/s
  and overhead = baseline tokens/s / dispersion tokens/s - 1 (goal <= 5%).
- `condense` of a random GPT-2-small-shaped model (12 x 768), R = 100 bundled-corpus texts of
  T = 512 tokens: wall time of the whole command (goal < 10 s) and of the measurement alone,
  with RankMe (the default: 13 x 100 eigen-decompositions of 512 x 512 float64 matrices) and
  without it (`--no-effective-rank`).
- an evaluation of the bundled lm-eval task (`scaling.evaluate`, when this checkout has it;
  otherwise the row says it was skipped).
- ZeRO-3 correctness: the baseline again with ZeRO-3; its cross-entropy at step `--compare-step`
  must equal ZeRO-2's within bf16 noise (relative difference <= 2%; fp32 in --smoke: <= 0.1%).
- start-up: run start to the first logged step, minus that step (Ray worker group, model build,
  `deepspeed.initialize`).
- where each training run's slot went: its goodput (optimizer-step seconds / slot seconds) and the
  largest phases of its `time/*` split (docs/goodput.md).

What could not be measured (no GPU, no nvidia-smi, no `scaling.evaluate`) is said in its row.
--smoke: the tiny ladder's smallest rung, fp32 on CPU, a float32 matmul, a 3-block condense model;
the goals are GPU goals and are not judged there. Exit status 0 when every row ran, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Before Ray is imported anywhere: a private local Ray without token auth, fast controller polls.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT))

from scaling import timing  # noqa: E402  (pure: no torch, no Ray)


@dataclass(frozen=True)
class Profile:
    """The shapes one mode measures."""

    ladder: str
    rung: str
    seq_len: int
    batch_size: int
    micro_batch_size: int
    steps: int
    precision: str
    use_gpu: bool
    cpus_per_worker: float
    condense_shape: tuple[int, int, int]
    """(n_layer, n_embd, n_head) of the condense model."""
    condense_texts: int
    condense_tokens: int
    matmul_size: int
    matmul_dtype: str
    zero3_tolerance: float
    """Largest relative difference of ZeRO-3's cross-entropy from ZeRO-2's at the compared step."""


GPU = Profile(ladder="gpt2", rung="gpt2-small", seq_len=1024, batch_size=32, micro_batch_size=16, steps=40,
              precision="bf16", use_gpu=True, cpus_per_worker=4, condense_shape=(12, 768, 12), condense_texts=100,
              condense_tokens=512, matmul_size=8192, matmul_dtype="bfloat16", zero3_tolerance=0.02)
SMOKE = Profile(ladder="tiny", rung="tiny-165K", seq_len=32, batch_size=8, micro_batch_size=4, steps=24,
                precision="fp32", use_gpu=False, cpus_per_worker=1, condense_shape=(3, 64, 2), condense_texts=10,
                condense_tokens=64, matmul_size=1024, matmul_dtype="float32", zero3_tolerance=1e-3)

MATMUL = """
import sys, time, torch
size, dtype, device = int(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3]
a = torch.randn(size, size, dtype=dtype, device=device)
b = torch.randn(size, size, dtype=dtype, device=device)
def sync():
    if device == "cuda":
        torch.cuda.synchronize()
for _ in range(5):
    a @ b
sync()
repeats, started = 0, time.perf_counter()
while repeats < 10 or time.perf_counter() - started < 2.0:
    a @ b
    repeats += 1
sync()
rate = 2.0 * size ** 3 * repeats / (time.perf_counter() - started)
name = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
print(f"{rate} {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
"""


# --- pieces -----------------------------------------------------------------------------------------


def measure_matmul_peak(profile: Profile) -> tuple[float, str]:
    """FLOP/s of a large square matmul (bf16 on the GPU) and what ran it, in a subprocess (the
    driver never holds a CUDA context, which would count in the GPU memory figures)."""
    device = "cuda" if profile.use_gpu else "cpu"
    done = subprocess.run([sys.executable, "-c", MATMUL, str(profile.matmul_size), profile.matmul_dtype, device],
                          capture_output=True, text=True, check=True)
    rate, where = done.stdout.strip().splitlines()[-1].split(" ", 1)
    return float(rate), where


class GpuMemorySampler:
    """Peak `memory.used` of GPU 0 (nvidia-smi every 0.2 s) while in the `with` block, and the
    value when it began (`idle_mib`); None when nvidia-smi is missing."""

    def __init__(self):
        self.peak_mib: float | None = None
        self.idle_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> float | None:
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                   "--id=0"], capture_output=True, text=True, timeout=10, check=True)
            return float(done.stdout.strip().splitlines()[0])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            return None

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            value = self._read()
            if value is not None:
                self.peak_mib = value if self.peak_mib is None else max(self.peak_mib, value)

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.idle_mib = self._read()
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)


def build_study(profile: Profile, workdir: Path, name: str, arm, zero_stage: int):
    from scaling.config import study_from_dict

    return study_from_dict({
        "study": name,
        "ladder": profile.ladder,
        "rungs": [profile.rung],
        "arms": [arm],
        "seeds": [0],
        "data": {"source": "bundled"},
        "training": {"seq_len": profile.seq_len, "batch_size": profile.batch_size,
                     "micro_batch_size": profile.micro_batch_size, "max_steps": profile.steps, "log_every": 1},
        # Probe and checkpoint only at the end: no step window holds a probe or a save.
        "probes": {"every_steps": 0, "texts": 4, "max_length": min(512, profile.seq_len), "val_batches": 2},
        "resources": {"num_workers": 1, "use_gpu": profile.use_gpu, "cpus_per_worker": profile.cpus_per_worker,
                      "zero_stage": zero_stage, "precision": profile.precision},
        "checkpoint": {"every_steps": 0, "num_to_keep": 1, "max_failures": 0},
        "storage_path": str(workdir / "runs"),
        "tracking_uri": f"sqlite:///{workdir / 'mlflow.db'}",
    })


def train(profile: Profile, workdir: Path, name: str, arm, zero_stage: int, skip: int) -> dict:
    """One run through run_study; its per-step figures read back from MLflow."""
    from mlflow.tracking import MlflowClient

    from scaling import names
    from scaling.config import plan_runs
    from scaling.ladder import compute_flops_per_token
    from scaling.study import run_study

    study = build_study(profile, workdir, name, arm, zero_stage)
    (plan,) = plan_runs(study)
    started = time.perf_counter()
    with GpuMemorySampler() as memory:
        (outcome,) = run_study(study, f"study: {name}\n", progress=lambda *_: None)
    if outcome.status != names.STATUS_FINISHED:
        return {"failed": f"{outcome.status}: {outcome.detail}"}
    client = MlflowClient(tracking_uri=study.tracking_uri)
    run = client.get_run(outcome.run_id)
    rates = sorted(client.get_metric_history(outcome.run_id, names.TRAIN_TOKENS_PER_S), key=lambda m: m.step)
    losses = sorted(client.get_metric_history(outcome.run_id, names.TRAIN_CE_LOSS), key=lambda m: m.step)
    tokens_per_step = profile.batch_size * profile.seq_len
    first_step_s = tokens_per_step / rates[0].value
    return {
        "tokens_per_s": statistics.median(m.value for m in rates[skip:]),
        "flops_per_token": compute_flops_per_token(plan.rung, plan.params, profile.seq_len),
        "params": plan.params.total,
        "ce": {m.step: m.value for m in losses},
        "peak_mib": memory.peak_mib,
        "idle_mib": memory.idle_mib,
        "device": run.data.tags.get(names.TAG_DEVICE, "?"),
        "startup_s": (losses[0].timestamp - run.info.start_time) / 1e3 - first_step_s,
        "wall_s": time.perf_counter() - started,
        "time": {key: value for key, value in run.data.metrics.items() if key.startswith(timing.PREFIX)},
    }


def time_split(run: dict) -> str:
    """The run's goodput and its slot's largest phases, from the trainer's `time/*` (scaling.timing)."""
    split = run.get("time", {})
    if timing.SLOT not in split:
        return ""
    shares = sorted(((split.get(timing.share_key(p), 0.0), p) for p in timing.PHASES + ("other",)), reverse=True)
    return (f"goodput {split[timing.GOODPUT]:.2f} of a {split[timing.SLOT]:.0f} s slot; "
            + ", ".join(f"{p} {share:.0%}" for share, p in shares if share >= 0.01))


def build_condense_model(profile: Profile, directory: Path) -> None:
    """A random GPT-2 of the profile's shape with a tokenizer trained on the bundled corpus."""
    from scaling.data import build_tokenizer, parse_text_source, read_rows
    from scaling.model import save_tiny_gpt2

    n_layer, n_embd, n_head = profile.condense_shape
    tokenizer = build_tokenizer(None, rows=read_rows(parse_text_source("bundled")), vocab_size=8192)
    save_tiny_gpt2(directory, tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                   n_positions=max(1024, profile.condense_tokens))


def condense(profile: Profile, model_dir: Path, out: Path, *extra: str) -> dict:
    """`python -m scaling.condense` on the bundled corpus, timed from start to exit."""
    command = [sys.executable, "-m", "scaling.condense", "--model", str(model_dir), "--dataset", "bundled",
               "--repetitions", str(profile.condense_texts), "--max-length", str(profile.condense_tokens),
               "--device", "cuda" if profile.use_gpu else "cpu", "--out", str(out), "--no-progress", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"failed": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    record = json.loads((out / "condensation.json").read_text())
    return {"wall_s": wall, "measure_s": record["seconds"], "spearman": record["spearman"],
            "device": record["device"], "texts": record["num_sequences"]}


def evaluate(profile: Profile, model_dir: Path) -> dict:
    """The bundled lm-eval task through `scaling.evaluate`, when this checkout has it."""
    try:
        from scaling.evaluate import EvalConfig, evaluate_model
    except ImportError as exc:
        return {"skipped": f"scaling.evaluate could not be imported ({exc}); this row runs once the "
                           "evaluation module is in this checkout"}
    try:
        config = EvalConfig(tasks=("bundled_cloze",), batch_size=64 if profile.use_gpu else 8,
                            limit=None if profile.use_gpu else 20, num_gpus=1.0 if profile.use_gpu else 0.0)
        started = time.perf_counter()
        result = evaluate_model(str(model_dir), config, device="cuda" if profile.use_gpu else "cpu")
        wall = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 -- a row that could not run says why; the others still run
        return {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
    if not result.ok:
        return {"failed": "; ".join(f"{k}: {v}" for k, v in result.failures.items())[:200]}
    accuracy = next((v for k, v in result.metrics.items() if k.endswith("/acc")), float("nan"))
    return {"wall_s": wall, "acc": accuracy}


# --- the table ---------------------------------------------------------------------------------------


class Table:
    def __init__(self, judged: bool):
        self.rows: list[tuple[str, str, str, str]] = []
        self.judged = judged
        self.failed = False

    def add(self, check: str, value: str, goal: str = "", met: bool | None = None) -> None:
        if met is None or not goal:
            status = ""
        elif not self.judged:
            status = "not judged (CPU smoke)"
        else:
            status = "met" if met else "NOT MET"
        self.rows.append((check, value, goal, status))

    def missing(self, check: str, why: str) -> None:
        self.rows.append((check, f"not measured: {why}", "", ""))

    def failure(self, check: str, why: str) -> None:
        self.failed = True
        self.rows.append((check, f"FAILED: {why}", "", ""))

    def print(self) -> None:
        print("\n| check | result | goal | status |")
        print("|---|---|---|---|")
        for row in self.rows:
            print("| " + " | ".join(row) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (tests this script)")
    parser.add_argument("--skip", type=int, default=None, help="first steps left out of tokens/s (default: a quarter)")
    parser.add_argument("--compare-step", type=int, default=20, help="step at which ZeRO-3's loss is compared")
    parser.add_argument("--workdir", default=None, help="keep the MLflow store, runs and models here")
    args = parser.parse_args()
    profile = SMOKE if args.smoke else GPU
    skip = profile.steps // 4 if args.skip is None else args.skip
    if not 1 <= args.compare_step <= profile.steps:
        parser.error(f"--compare-step must be between 1 and {profile.steps}")

    import torch

    from scaling.console import quiet_libraries

    quiet_libraries()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    table = Table(judged=not args.smoke)
    where = "CPU (smoke)" if args.smoke else "GPU"
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: nothing was measured. Run this on a machine with one GPU, or use --smoke on CPU.")
        for check in ("bf16 matmul peak", "GPT-2 small ZeRO-2 bf16", "dispersion arm", "condense", "evaluation",
                      "ZeRO-3 vs ZeRO-2"):
            table.missing(check, "no CUDA device")
        table.print()
        return 1
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # anything a study writes relative to the working directory lands here
    started = time.perf_counter()

    peak, device_name = measure_matmul_peak(profile)
    print(f"gpu_check on {where}: {device_name}; {os.cpu_count()} CPU(s); load {os.getloadavg()[0]:.1f}",
          flush=True)
    table.add(f"{profile.matmul_dtype} matmul peak ({profile.matmul_size}^3, measured)", f"{peak / 1e12:.1f} TFLOP/s")

    import ray

    ray.init(address="local", num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    dispersion = {"name": "dispersion", "variant": "angular_spread", "lambda": 0.1, "layers": "all"}
    label = f"{profile.rung} at {profile.seq_len} tokens, {profile.precision}, 1 worker"
    try:
        runs = {}
        for key, arm, stage in (("z2-baseline", "baseline", 2), ("z2-dispersion", dispersion, 2),
                                ("z3-baseline", "baseline", 3)):
            print(f"training {key} ({label}) ...", flush=True)
            runs[key] = train(profile, workdir, f"gpu-check-{key}", arm, stage, skip)
    finally:
        ray.shutdown()

    def memory(run) -> str:
        if run["peak_mib"] is None:
            return "not measured: no nvidia-smi" if profile.use_gpu else "not measured on CPU"
        return f"{run['peak_mib'] / 1024:.1f} GiB (whole device; {run['idle_mib'] / 1024:.1f} GiB before the run)"

    base, disp = runs["z2-baseline"], runs["z2-dispersion"]
    if "failed" in base:
        table.failure(f"ZeRO-2 baseline ({label})", base["failed"])
    else:
        mfu = base["tokens_per_s"] * base["flops_per_token"] / peak
        table.add(f"ZeRO-2 baseline ({label}): tokens/s", f"{base['tokens_per_s']:,.0f} (device {base['device']})")
        table.add("ZeRO-2 baseline: MFU vs the measured peak",
                  f"{mfu:.1%} ({base['flops_per_token']:.3g} FLOP/token)", ">= 40%", mfu >= 0.40)
        table.add("ZeRO-2 baseline: peak GPU memory", memory(base))
        table.add("ZeRO-2 baseline: run start-up (run start -> first step)", f"{base['startup_s']:.1f} s")
        if time_split(base):
            table.add("ZeRO-2 baseline: where its slot went (time/*)", time_split(base))
    if "failed" in disp:
        table.failure("ZeRO-2 dispersion arm", disp["failed"])
    elif "failed" not in base:
        overhead = base["tokens_per_s"] / disp["tokens_per_s"] - 1.0
        table.add("ZeRO-2 dispersion arm (lambda 0.1, all layers): tokens/s", f"{disp['tokens_per_s']:,.0f}")
        table.add("dispersion overhead (baseline / dispersion tokens/s - 1)", f"{overhead:+.1%}", "<= 5%",
                  overhead <= 0.05)
        table.add("ZeRO-2 dispersion: peak GPU memory", memory(disp))
        if time_split(disp):
            table.add("ZeRO-2 dispersion: where its slot went (time/*)", time_split(disp))

    model_dir = workdir / "condense-model"
    if not (model_dir / "config.json").exists():
        build_condense_model(profile, model_dir)
    shape = "x".join(str(v) for v in profile.condense_shape[:2])
    for rank, extra in (("on", ()), ("off", ("--no-effective-rank",))):
        done = condense(profile, model_dir, workdir / f"condense-rank-{rank}", *extra)
        check = f"condense GPT-2 {shape}, R={profile.condense_texts}, T={profile.condense_tokens}, RankMe {rank}"
        if "failed" in done:
            table.failure(check, done["failed"])
        else:
            table.add(f"{check}: whole command", f"{done['wall_s']:.1f} s (measurement {done['measure_s']:.1f} s, "
                      f"{done['texts']} texts on {done['device']})", "< 10 s", done["wall_s"] < 10.0)

    evaluated = evaluate(profile, model_dir)
    if "skipped" in evaluated:
        table.missing("evaluation of bundled_cloze", evaluated["skipped"])
    elif "failed" in evaluated:
        table.failure("evaluation of bundled_cloze", evaluated["failed"])
    else:
        table.add("evaluation of bundled_cloze (random model)", f"{evaluated['wall_s']:.1f} s, acc "
                  f"{evaluated['acc']:.3f}")

    zero3 = runs["z3-baseline"]
    step = args.compare_step
    if "failed" in zero3:
        table.failure("ZeRO-3 baseline", zero3["failed"])
    elif "failed" not in base:
        a, b = base["ce"].get(step), zero3["ce"].get(step)
        if a is None or b is None:
            table.failure("ZeRO-3 vs ZeRO-2", f"no train/ce_loss at step {step}")
        else:
            relative = abs(b - a) / abs(a)
            worst = max(abs(zero3["ce"][s] - base["ce"][s]) / abs(base["ce"][s])
                        for s in base["ce"] if s <= step and s in zero3["ce"])
            # Correctness, not speed: judged in --smoke too (fp32 there, so a tighter bound).
            table.rows.append((f"ZeRO-3 vs ZeRO-2 cross-entropy at step {step}",
                               f"{b:.4f} vs {a:.4f} (relative {relative:.2e}; worst up to step {step}: {worst:.2e})",
                               f"<= {profile.zero3_tolerance:g} relative",
                               "met" if relative <= profile.zero3_tolerance else "NOT MET"))
            table.failed |= relative > profile.zero3_tolerance

    table.rows.append(("total wall time of this check", f"{time.perf_counter() - started:.0f} s",
                       "< 8 min on one H200" if not args.smoke else "< 5 min on CPU", ""))
    table.print()
    print(f"load at end {os.getloadavg()[0]:.1f}; workdir {workdir}")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
