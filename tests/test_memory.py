"""The memory plan (scaling/memory.py): model states against DeepSpeed's own estimators, the arithmetic by
hand on a small shape, and the refusal of a placement that cannot fit, in the dry run and on a cluster."""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scaling.config import load_study, plan_runs
from scaling.errors import ConfigError
from scaling.ladder import build_model, count_params, get_ladder
from scaling.memory import (GIB, MemorySettings, activation_bytes_per_token, check_study_memory,
                            gpu_from_accelerator_type, largest_layer_params, model_state_bytes, plan_memory,
                            resolve_gpu_memory)
from scaling.placement import NodeType

REPO = Path(__file__).resolve().parent.parent


def _deepspeed_printed_gpu_gib(function, model, gpus: int) -> float:
    """The per-GPU figure DeepSpeed's `*_all_live` estimator prints for offload off (its last row)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        function(model, num_gpus_per_node=gpus, num_nodes=1)
    last = out.getvalue().strip().splitlines()[-1]
    assert "offload_optimizer=none" in last or "offload_param=none" in last, out.getvalue()
    return float(re.findall(r"([\d.]+)GB", last)[1])


@pytest.mark.parametrize("gpus", [1, 4])
def test_model_states_agree_with_deepspeeds_estimators(gpus):
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_live, model_to_params)
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_live)

    rung = get_ladder("qwen3").rung("qwen3-20M")  # big enough for the estimators' 2-decimal GiB rows
    model = build_model(rung, seed=0)
    total, largest = model_to_params(model)
    assert total == count_params(rung).total and largest == largest_layer_params(rung)
    for stage, live, exact in ((2, estimate_zero2_model_states_mem_needs_all_live,
                                lambda: estimate_zero2_model_states_mem_needs(total, gpus, 1, cpu_offload=False)[1]),
                               (3, estimate_zero3_model_states_mem_needs_all_live,
                                lambda: estimate_zero3_model_states_mem_needs(total, largest, gpus, 1,
                                                                              cpu_offload=False)[1])):
        ours = sum(model_state_bytes(total, largest, num_gpus=gpus, zero_stage=stage, mixed_precision=True))
        assert abs(ours / exact() - 1) < 0.10, (stage, gpus, ours, exact())
        printed = _deepspeed_printed_gpu_gib(live, model, gpus)
        assert abs(ours / GIB / printed - 1) < 0.10, (stage, gpus, ours / GIB, printed)


def test_model_states_by_hand():
    p, largest = 1000, 100
    assert model_state_bytes(p, largest, num_gpus=1, zero_stage=0, mixed_precision=True) == (2000, 6000, 12000)
    assert sum(model_state_bytes(p, largest, num_gpus=4, zero_stage=1, mixed_precision=True)) == 4 * p + 16 * p // 4
    assert sum(model_state_bytes(p, largest, num_gpus=4, zero_stage=2, mixed_precision=True)) == 2 * p + 18 * p // 4
    assert sum(model_state_bytes(p, largest, num_gpus=4, zero_stage=3, mixed_precision=True)) == 18 * p // 4 + 400
    assert sum(model_state_bytes(p, largest, num_gpus=1, zero_stage=0, mixed_precision=False)) == 16 * p


def test_activations_by_hand():
    # GPT-2 with d_ff = 4h at 2 bytes: Korthikanti et al.'s 34 h per token and layer (no score matrix)
    rung = get_ladder("gpt2").rung("gpt2-small")
    saved, layer_input = activation_bytes_per_token(rung, 2)
    assert (saved, layer_input) == (34 * 768, 2 * 768)
    tokens = 4 * 1024
    full = plan_memory(rung, MemorySettings(micro_batch_size=4, seq_len=1024))
    recomputed = plan_memory(rung, MemorySettings(micro_batch_size=4, seq_len=1024, gradient_checkpointing=True))
    ends = tokens * 2 * 768 * 2  # embedding output and final norm
    assert full.activations == tokens * 12 * 34 * 768 + ends
    assert recomputed.activations == tokens * (12 * 2 * 768 + 34 * 768) + ends
    assert full.logits == tokens * 50257 * 12


def test_named_gpus():
    assert resolve_gpu_memory("H100-80GB") == pytest.approx(79.6, abs=0.1)
    assert resolve_gpu_memory("A100-40GB") == 40 and resolve_gpu_memory("24") == 24
    with pytest.raises(ConfigError, match="GPU memory 'B200'"):
        resolve_gpu_memory("B200")
    assert gpu_from_accelerator_type({"GPU": 8, "accelerator_type:A100-80G": 1}) == "A100-80GB"
    assert gpu_from_accelerator_type({"GPU": 8, "accelerator_type:H100": 1}) == "H100"
    assert gpu_from_accelerator_type({"GPU": 1, "accelerator_type:B200": 1}) is None


def test_infeasible_placement_is_refused_with_the_smallest_change():
    study = load_study(REPO / "search_spaces" / "paper_midtrain_qwen3.yaml",
                       ["resources.num_workers=1", "resources.zero_stage=0"])
    plans = plan_runs(study)
    with pytest.raises(ConfigError) as refused:
        check_study_memory(study, plans, resolve_gpu_memory("H100-80GB"), "H100-80GB")
    message = str(refused.value)
    assert "\n" not in message and "qwen3-4B, qwen3-8B" in message
    assert float(re.search(r"rung qwen3-8B needs ~([\d.]+) GiB", message).group(1)) > 150  # 20 bytes a parameter
    # active forgetting rules out ZeRO-3: the fix spreads ZeRO-2 over more GPUs, and it does fit
    assert "--set resources.zero_stage=2 --set resources.num_workers=8" in message
    fixed = load_study(REPO / "search_spaces" / "paper_midtrain_qwen3.yaml",
                       ["resources.num_workers=8", "resources.zero_stage=2"])
    check_study_memory(fixed, plan_runs(fixed), resolve_gpu_memory("H100-80GB"), "H100-80GB")


def test_cluster_preflight_checks_the_nodes_gpus():
    from scaling.cluster import check_study_memory_on_cluster

    study = load_study(REPO / "search_spaces" / "paper_midtrain_qwen3.yaml")  # as shipped: 8 x H100 per run
    plans = plan_runs(study)
    h100 = [NodeType("p5", {"CPU": 192, "GPU": 8, "accelerator_type:H100": 1}, 2)]
    a100 = [NodeType("p4d", {"CPU": 96, "GPU": 8, "accelerator_type:A100-40G": 1}, 2)]
    assert check_study_memory_on_cluster(study, plans, node_types=h100) is None
    with pytest.raises(ConfigError, match="rung qwen3-8B .* the cluster's A100-40GB has 40.0 GiB"):
        check_study_memory_on_cluster(study, plans, node_types=a100)
    unnamed = [NodeType("gpu", {"CPU": 96, "GPU": 8}, 2)]
    warning = check_study_memory_on_cluster(study, plans, (79.6, "H100"), node_types=unnamed)
    assert "do not name their GPU type" in warning


def test_dry_run_refuses_what_cannot_fit():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "scaling/run.py", "search_spaces/paper_midtrain_gpt2.yaml", "--dry-run",
                             "--gpu", "A100-40GB"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "GiB/GPU(A100-40GB)" in result.stdout and " NO " in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert "A100-40GB has 40.0 GiB" in line and "smallest change that fits every rung: --set" in line
