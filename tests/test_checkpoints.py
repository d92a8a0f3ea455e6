"""Resuming from checkpoints under real DeepSpeed (gloo, one process): a truncated or tampered latest
checkpoint falls back to the previous good one with a note, nothing but DeepSpeed's own classes is
unpickled, and with no readable checkpoint the run fails instead of silently restarting at step 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deepspeed_single import PREAMBLE

REPO = Path(__file__).resolve().parent.parent

SCRIPT = PREAMBLE + r'''
import pickle, sys, tempfile
from pathlib import Path
from ray.train import Checkpoint
from scaling.train import restore_checkpoint
from scaling.errors import TrainingFailure
from scaling.ladder import build_model, get_ladder

rung = get_ladder("tiny").rungs[0]
root = Path(tempfile.mkdtemp()) / "run"
marker = Path(tempfile.mkdtemp()) / "pwned"


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {marker}",))


for stage in (0, 2, 3):
    model = build_model(rung, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": True}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    ids = torch.randint(0, rung.vocab_size, (2, 16))
    folders = []
    for step in (2, 4, 6):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        folder = root / f"stage{stage}" / f"checkpoint_2026-01-01_00-00-0{step}"
        engine.save_checkpoint(str(folder), tag=f"step_{step:07d}", client_state={"step": step, "tokens_seen": step,
                                                                              "order_hash": str(step)})
        folders.append(folder)
    # Step 6: truncated model states. Step 4: a pickle that would run a command if unpickled.
    (states6,) = folders[2].glob("step_*/*model_states.pt")
    states6.write_bytes(states6.read_bytes()[:200])
    (states4,) = folders[1].glob("step_*/*model_states.pt")
    states4.write_bytes(pickle.dumps({"module": Evil()}, protocol=2))  # the protocol torch.save writes
    state, skipped = restore_checkpoint(engine, Checkpoint(str(folders[2])), torch.device("cpu"))
    assert state["step"] == 2, state
    assert len(skipped) == 2 and "checkpoint_2026-01-01_00-00-06" in skipped[0], skipped
    assert not marker.exists(), "the tampered checkpoint ran code"
    # Nothing readable: a clear failure, never a silent restart from step 0.
    (states2,) = folders[0].glob("step_*/*model_states.pt")
    states2.write_bytes(b"")
    try:
        restore_checkpoint(engine, Checkpoint(str(folders[2])), torch.device("cpu"))
    except TrainingFailure as exc:
        assert "no readable checkpoint" in str(exc) and "not restarted from step 0" in str(exc), exc
    else:
        raise AssertionError("restored from an unreadable checkpoint")
    print("ok", stage, skipped[1][:120], flush=True)
'''


def test_resume_falls_back_to_the_previous_good_checkpoint_and_never_unpickles_foreign_code():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == 3, result.stdout[-2000:]
    assert all("unsupported GLOBAL posix.system" in line for line in lines), lines  # refused, and named
