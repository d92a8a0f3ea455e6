"""Checkpoints in a run's folder under real DeepSpeed (gloo, one process): a save without its COMPLETE
marker is never read (and is removed by the next save), a truncated or tampered checkpoint falls back to
the previous good one with a note, nothing but DeepSpeed's own classes is unpickled, with no readable
checkpoint the run fails instead of silently restarting at step 0, and only the newest `keep` are kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from deepspeed_single import PREAMBLE

REPO = Path(__file__).resolve().parent.parent

SCRIPT = PREAMBLE + r'''
import pickle, sys, tempfile
from pathlib import Path
from scaling.run_folder import COMPLETE, complete_checkpoints, restore_checkpoint, save_checkpoint
from scaling.errors import TrainingFailure
from scaling.ladder import build_model, get_ladder

rung = get_ladder("tiny").rungs[0]
root = Path(tempfile.mkdtemp())
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
    folder = str(root / f"stage{stage}")
    assert restore_checkpoint(engine, folder, torch.device("cpu")) == (None, [])  # a new run: nothing to resume
    ids = torch.randint(0, rung.vocab_size, (2, 16))
    for step in (2, 4, 6, 8, 10):
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        save_checkpoint(engine, folder, step, {"step": step, "tokens_seen": step, "order_hash": str(step)}, keep=4)
    saved = [Path(path) for path in complete_checkpoints(folder)]
    assert [path.name for path in saved] == ["step_0000010", "step_0000008", "step_0000006", "step_0000004"], saved
    # Step 10: a save interrupted before its COMPLETE marker (never read). Step 8: truncated model states.
    # Step 6: a pickle that would run a command if unpickled. Step 4: good.
    (saved[0] / COMPLETE).unlink()
    (states8,) = saved[1].glob("*model_states.pt")
    states8.write_bytes(states8.read_bytes()[:200])
    (states6,) = saved[2].glob("*model_states.pt")
    states6.write_bytes(pickle.dumps({"module": Evil()}, protocol=2))  # the protocol torch.save writes
    state, skipped = restore_checkpoint(engine, folder, torch.device("cpu"))
    assert state["step"] == 4, state
    assert len(skipped) == 2 and skipped[0].startswith("step_0000008"), skipped
    assert not marker.exists(), "the tampered checkpoint ran code"
    # Nothing readable: a clear failure, never a silent restart from step 0.
    (states4,) = saved[3].glob("*model_states.pt")
    states4.write_bytes(b"")
    try:
        restore_checkpoint(engine, folder, torch.device("cpu"))
    except TrainingFailure as exc:
        assert "no readable checkpoint" in str(exc) and "not restarted from step 0" in str(exc), exc
    else:
        raise AssertionError("restored from an unreadable checkpoint")
    # The next good save removes the interrupted one and keeps the newest 4 complete ones.
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    save_checkpoint(engine, folder, 12, {"step": 12, "tokens_seen": 12, "order_hash": "12"}, keep=4)
    assert not saved[0].exists(), "an interrupted save was left behind"
    assert [Path(p).name for p in complete_checkpoints(folder)][:1] == ["step_0000012"]
    assert restore_checkpoint(engine, folder, torch.device("cpu"))[0]["step"] == 12
    # A checkpoint Ray Train kept for the run before runs had their own folders is resumed from too.
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    engine.save_checkpoint(f"{folder}/checkpoint_2026-01-01_00-00-00", tag="step_0000014",
                           client_state={"step": 14, "tokens_seen": 14, "order_hash": "14"})
    assert restore_checkpoint(engine, folder, torch.device("cpu"))[0]["step"] == 14
    print("ok", stage, skipped[1][:120], flush=True)
'''


def test_resume_falls_back_to_the_previous_good_checkpoint_and_never_unpickles_foreign_code():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    assert len(lines) == 3, result.stdout[-2000:]
    assert all("unsupported GLOBAL posix.system" in line for line in lines), lines  # refused, and named
