"""Active forgetting under real DeepSpeed (gloo, one process): after a forgetting step the weights the
next forward uses are the fresh initialisation, whatever float32 master copy DeepSpeed keeps, and the
embeddings' optimizer state starts over. ZeRO 0-2, bf16 mixed precision and float32."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


from deepspeed_single import PREAMBLE

REPO = Path(__file__).resolve().parent.parent

SCRIPT = PREAMBLE + r'''
from deepspeed.utils import safe_get_full_fp32_param
from scaling.config import ArmConfig, ProbeConfig, ResourcesConfig, TrainingConfig
from scaling.ladder import build_model, get_ladder
from scaling.train import (EMBEDDING_GROUP, RunTask, build_lr_lambdas, build_param_groups, forget_input_embeddings,
                           fresh_embeddings)

rung = get_ladder("tiny").rungs[0]
for bf16 in (True, False):
    for stage in (0, 1, 2):
        arm = ArmConfig(name="active_forgetting", forget_every=2, embedding_lr=5e-5).for_family("gpt2")
        task = RunTask(run_name="t", run_id="x", tracking_uri="", folder="", rung=rung, arm=arm, seed=3, steps=10, lr=1e-3,
                       warmup_steps=1, training=TrainingConfig(), probes=ProbeConfig(), resources=ResourcesConfig(),
                       checkpoint_every=0, checkpoints_to_keep=1, train_blocks=None, val_blocks=None, probe_ids=None)
        model = build_model(rung, seed=0)
        optimizer = torch.optim.AdamW(build_param_groups(model, task), lr=task.lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, build_lr_lambdas(task))
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
                  "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "steps_per_print": 10**9}
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=config)
        ids = torch.randint(0, rung.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(2):
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()
        embedding_lrs = [group["lr"] for group in engine.optimizer.param_groups][EMBEDDING_GROUP]
        weight = engine.module.get_input_embeddings().weight
        fresh = fresh_embeddings(tuple(weight.shape), seed=3, step=2, padding_idx=None)
        forget_input_embeddings(engine, seed=3, step=2)
        used = fresh.to(weight.dtype).float()
        assert torch.equal(weight.detach().float(), used), "module weight"
        master = safe_get_full_fp32_param(weight)
        assert master is None or torch.equal(master, fresh), "float32 master copy"
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        state = [v for p in inner.param_groups[EMBEDDING_GROUP]["params"] for v in inner.state[p].values()]
        assert state and all(float(v.abs().max()) == 0 for v in state if torch.is_tensor(v)), "optimizer state"
        # A step that changes nothing (lr 0) must leave the fresh weights in place: a stale master copy
        # would write the old ones back.
        engine.lr_scheduler = None
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        for group in engine.optimizer.param_groups:
            group["lr"] = 0.0
        engine.step()
        assert torch.equal(weight.detach().float(), used), "after the next step"
        print("ok", bf16, stage, type(engine.optimizer).__name__, f"{embedding_lrs:.3g}", flush=True)
'''


def test_forgetting_resets_weights_master_copies_and_state_under_zero_0_to_2():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=600)
    lines = [line for line in result.stdout.splitlines() if line.startswith("ok")]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert len(lines) == 6, lines
    # The embeddings follow their own schedule: 5e-5 peak, 8% warmup of 10 steps (1 step), linear decay.
    assert all(line.split()[-1] == f"{5e-5 * 8 / 9:.3g}" for line in lines), lines


def test_fresh_embeddings_depend_on_seed_and_step_and_zero_the_padding_row():
    from scaling.train import fresh_embeddings

    a = fresh_embeddings((10, 4), seed=1, step=1000, padding_idx=3)
    assert float(a[3].abs().max()) == 0 and abs(float(a.std()) - 0.02) < 0.01
    assert (a == fresh_embeddings((10, 4), seed=1, step=1000, padding_idx=3)).all()
    assert not (a == fresh_embeddings((10, 4), seed=1, step=2000, padding_idx=3)).all()
    assert not (a == fresh_embeddings((10, 4), seed=2, step=1000, padding_idx=3)).all()
