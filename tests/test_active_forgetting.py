"""Active forgetting under real DeepSpeed (gloo, one process): after a forgetting step the weights the
next forward uses are the fresh initialisation, whatever float32 master copy DeepSpeed keeps, and the
embeddings' optimizer state starts over. ZeRO 0-2, bf16 mixed precision and float32."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


import pytest
from deepspeed_single import PREAMBLE

from scaling.train import fresh_embeddings

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
        fresh = fresh_embeddings(tuple(weight.shape), seed=3, step=2, padding_idx=5)
        forget_input_embeddings(engine, seed=3, step=2, pad_token_id=5)  # GPT-2's wte has no padding_idx
        used = fresh.to(weight.dtype).float()
        assert float(weight.detach()[5].abs().max()) == 0 and float(weight.detach()[4].abs().max()) > 0, "pad row"
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
    # The embeddings follow the reference's schedule: after 2 of T = 10 steps, forgetting every K = 2, the
    # index is ((2 + 1) x floor(10 / 2)) mod 10 = 5 on a linear warmup (floor(0.8) = 0 steps) and decay:
    # (10 - 5) / 10 of the 5e-5 peak.
    assert all(line.split()[-1] == f"{5e-5 * 0.5:.3g}" for line in lines), lines


def test_fresh_embeddings_depend_on_seed_and_step_and_zero_the_padding_row():
    from scaling.train import fresh_embeddings

    a = fresh_embeddings((10, 4), seed=1, step=1000, padding_idx=3)
    assert float(a[3].abs().max()) == 0 and abs(float(a.std()) - 0.02) < 0.01
    assert (a == fresh_embeddings((10, 4), seed=1, step=1000, padding_idx=3)).all()
    assert not (a == fresh_embeddings((10, 4), seed=1, step=2000, padding_idx=3)).all()
    assert not (a == fresh_embeddings((10, 4), seed=2, step=1000, padding_idx=3)).all()


def test_the_embedding_schedule_index_is_the_references():
    from scaling.train import forgetting_embedding_lr_at, linear_lr_at

    # T = 10, K = 3: floor(T / K) = 3, index ((s + 1) x 3) mod 10 = 3 6 9 2 5 8 1 4 7 0; warmup floor(10 x 0.2) = 2
    # steps (i / 2), then (10 - i) / 8.
    by_hand = [7 / 8, 4 / 8, 1 / 8, 1.0, 5 / 8, 2 / 8, 0.5, 6 / 8, 3 / 8, 0.0]
    got = [forgetting_embedding_lr_at(s, peak=1.0, warmup_fraction=0.2, total_steps=10, forget_every=3)
           for s in range(10)]
    assert got == pytest.approx(by_hand)
    # T < 2K (the paper: 1526 steps, K = 1000): the index is s + 1, the plain schedule one step ahead, and the last
    # step wraps to 0
    paper = [forgetting_embedding_lr_at(s, peak=5e-5, warmup_fraction=0.08, total_steps=1526, forget_every=1000)
             for s in range(1526)]
    assert paper[:1525] == [linear_lr_at(s + 1, peak=5e-5, warmup_steps=122, total_steps=1526) for s in range(1525)]
    assert paper[0] == pytest.approx(5e-5 / 122) and paper[-1] == 0.0
    # T < K: floor(T / K) = 0, the index stays 0 and the embeddings never move, as in the reference
    assert {forgetting_embedding_lr_at(s, peak=1.0, warmup_fraction=0.08, total_steps=50, forget_every=100)
            for s in range(50)} == {0.0}


def test_the_zeroed_row_is_padding_idx_else_the_pad_token():
    import torch

    from scaling.train import zeroed_row

    assert zeroed_row(torch.nn.Embedding(10, 4), 7) == 7  # GPT-2's wte: no padding_idx, the pad (EOS) token
    assert zeroed_row(torch.nn.Embedding(10, 4, padding_idx=2), 7) == 2
    assert zeroed_row(torch.nn.Embedding(10, 4), None) is None
    out_of_range = fresh_embeddings((10, 4), seed=1, step=1, padding_idx=50)  # a pad id beyond the table
    assert (out_of_range == fresh_embeddings((10, 4), seed=1, step=1, padding_idx=None)).all()
