"""The paper's experiments as study files: each dry-runs offline (no hub), with the paper's arithmetic,
the family defaults stated, and warnings where a budget is too small."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.config import load_study, plan_runs

REPO = Path(__file__).resolve().parent.parent
PAPER_STUDIES = ("paper_midtrain_gpt2", "paper_midtrain_qwen3", "paper_ffn_controlled", "paper_qwen3_pretrain")


def dry_run(name: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "scaling/run.py", f"search_spaces/{name}.yaml", "--dry-run"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("name", PAPER_STUDIES)
def test_paper_studies_dry_run_offline(name):
    out = dry_run(name)
    assert "runs:" in out and "GPU-hours in all" in out and "warning" not in out


def test_mid_training_arithmetic_and_family_defaults():
    gpt2 = dry_run("paper_midtrain_gpt2")
    assert " 1526 " in gpt2 and " 306 " in gpt2 and "5.00e-05" in gpt2
    assert "48 runs" in gpt2 and "gpt2 clamp 0.1 (family default)" in gpt2 and "gpt2 alpha 1 (family default)" in gpt2
    qwen = dry_run("paper_midtrain_qwen3")
    assert "qwen3 clamp 0.25 (family default)" in qwen and "qwen3 alpha 5 (family default)" in qwen
    assert "32x4096" in qwen


def test_controlled_ladder_changes_only_the_width():
    study = load_study(REPO / "search_spaces" / "paper_ffn_controlled.yaml")
    plans = plan_runs(study)
    assert [p.rung.d_ff for p in plans] == [64, 256, 1024, 4096]
    assert len({(p.tokens, p.steps, p.lr, p.warmup_steps, p.batch_size) for p in plans}) == 1  # one budget, lr, schedule
    assert study.training.dropout == 0.1


def test_qwen3_pretrain_has_the_torchtitan_shape_and_schedule():
    study = load_study(REPO / "search_spaces" / "paper_qwen3_pretrain.yaml")
    (plan,) = plan_runs(study)
    rung = plan.rung
    assert (rung.d_model, rung.n_layers, rung.d_ff, rung.n_heads, rung.kv_heads, rung.attention_head_dim) == (
        256, 28, 768, 2, 2, 128)
    assert (plan.steps, plan.batch_size, plan.seq_len, plan.warmup_steps, plan.lr) == (2480, 128, 4096, 100, 3e-4)
    assert study.training.min_lr_ratio == 0.1
    dispersion = study.arm("dispersion")
    assert dispersion.lam == 1.0 and dispersion.layers == "all" and dispersion.last_block_output == "raw"
    # untied, as the fork's run was (tying failed under FSDP): 62,772,480 + 151,936 x 256 head parameters
    assert rung.tie_embeddings is False and plan.params.total == 101_668_096 == 62_772_480 + 151_936 * 256
    from scaling.ladder import build_model

    model = build_model(rung, seed=0)
    assert sum(p.numel() for p in model.parameters()) == 101_668_096
    assert model.lm_head.weight is not model.get_input_embeddings().weight


def test_tie_embeddings_keeps_the_ladders_default_and_refuses_a_pretrained_model():
    from scaling.errors import ConfigError

    tied = load_study(REPO / "search_spaces" / "paper_qwen3_pretrain.yaml", ["tie_embeddings=null"])
    assert plan_runs(tied)[0].params.total == 62_772_480
    with pytest.raises(ConfigError, match="tie_embeddings=False: a pretrained model"):
        load_study(REPO / "search_spaces" / "paper_midtrain_gpt2.yaml", ["tie_embeddings=false"])


def test_dry_run_warns_about_rungs_with_too_few_steps():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "scaling/run.py", "search_spaces/gpt2_ladder.yaml", "--dry-run",
                          "--set", "rungs=[gpt2-1.7M, gpt2-small]"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120).stdout
    assert "warning: rung gpt2-1.7M trains only 4 steps" in out and "gpt2-small trains" not in out
