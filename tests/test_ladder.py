"""Ladders: analytic parameter counts against built models, seeded builds, run plans, errors."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers import GPT2LMHeadModel, Qwen3ForCausalLM

from scaling.errors import ConfigError
from scaling.ladder import (
    LADDERS,
    NOMINAL_TOLERANCE,
    PARAM_GROUPS,
    PEAK_BF16_FLOPS,
    QWEN3_PAPER_RUNG,
    REFERENCE_BATCH_TOKENS,
    REFERENCE_LR,
    REFERENCE_PARAMS,
    Ladder,
    ParamCount,
    Rung,
    RunConfigurator,
    build_model,
    build_model_config,
    classify_parameter,
    compute_batch_tokens,
    compute_lr,
    count_params,
    format_ladder_table,
    get_ladder,
    with_vocab_size,
)

ALL_RUNGS = [rung for ladder in LADDERS.values() for rung in ladder.rungs]
# Small enough to build for real on CPU in well under a second each.
BUILDABLE = [*LADDERS["tiny"].rungs, *LADDERS["tiny-qwen3"].rungs,
             LADDERS["gpt2"].rung("gpt2-1.7M"), LADDERS["qwen3"].rung("qwen3-9.8M")]


def group_sums(model: torch.nn.Module) -> dict[str, int]:
    """A live model's parameters per group (shared tensors counted once, as parameters() does)."""
    sums = dict.fromkeys(PARAM_GROUPS, 0)
    for name, param in model.named_parameters():
        sums[classify_parameter(name)] += param.numel()
    return sums


def tiny_rung(**changes) -> Rung:
    base = LADDERS["tiny"].rungs[0]
    return dataclasses.replace(base, **changes)


# --- parameter counts ------------------------------------------------------------------
@pytest.mark.parametrize("rung", BUILDABLE, ids=lambda r: r.name)
def test_analytic_count_equals_built_model(rung):
    model = build_model(rung, seed=0)
    count = count_params(rung)
    assert sum(p.numel() for p in model.parameters()) == count.total
    assert count.embedding + count.non_embedding == count.total
    assert group_sums(model) == dict(count.groups)
    if rung.tie_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("rung", ALL_RUNGS, ids=lambda r: r.name)
def test_analytic_groups_match_the_transformers_layout_of_every_rung(rung):
    """Built on the meta device (shapes only, no memory), so GPT-2 xl costs nothing."""
    model_class = GPT2LMHeadModel if rung.family == "gpt2" else Qwen3ForCausalLM
    with torch.device("meta"):
        model = model_class(build_model_config(rung))
    assert group_sums(model) == dict(count_params(rung).groups)


@pytest.mark.parametrize(("rung_name", "published"), [
    ("gpt2-small", 124_439_808), ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200),
])
def test_gpt2_counts_match_the_published_checkpoints(rung_name, published):
    assert count_params(get_ladder("gpt2").rung(rung_name)).total == published


def test_qwen3_06b_matches_the_released_shape():
    count = count_params(get_ladder("qwen3").rung("qwen3-0.6B"))
    assert count.total == 596_049_920  # Qwen3-0.6B's safetensors, tied head counted once
    assert count.non_embedding == 440_467_456  # the model card's "0.44B non-embedding"
    assert count.embedding == 151_936 * 1024


def test_paper_qwen3_shape():
    rung = get_ladder("qwen3").rung(QWEN3_PAPER_RUNG)
    assert (rung.d_model, rung.n_layers, rung.d_ff, rung.vocab_size) == (256, 28, 768, 151_936)
    # The authors' torchtitan config: 2 query heads and 2 key/value heads of width 128.
    assert (rung.n_heads, rung.kv_heads, rung.attention_head_dim) == (2, 2, 128)


@pytest.mark.parametrize("name, non_embedding_billions", [("qwen3-1.7B", 1.4), ("qwen3-4B", 3.6), ("qwen3-8B", 6.95)])
def test_released_qwen3_shapes_match_their_model_cards(name, non_embedding_billions):
    count = count_params(get_ladder("qwen3").rung(name))
    assert abs(count.non_embedding / 1e9 - non_embedding_billions) < 0.01 * non_embedding_billions + 0.005


def test_gpt2_ffn_ladder_changes_only_the_mlp_width():
    small = get_ladder("gpt2").rung("gpt2-small")
    ladder = get_ladder("gpt2-ffn")
    assert [r.d_ff for r in ladder.rungs] == [64, 256, 1024, 4096]
    for rung in ladder.rungs:
        assert dataclasses.replace(rung, name=small.name, d_ff=small.d_ff,
                                   nominal_params=small.nominal_params) == small
        # Only the MLP group moves: 12 blocks x (2 x 768 x d_ff + d_ff + 768).
        assert count_params(rung).group("mlp") == 12 * (2 * 768 * rung.d_ff + rung.d_ff + 768)


@pytest.mark.parametrize("rung", ALL_RUNGS, ids=lambda r: r.name)
def test_every_rung_is_within_tolerance_of_its_nominal_size(rung):
    assert abs(count_params(rung).total / rung.nominal_params - 1) <= NOMINAL_TOLERANCE


def test_ladders_ascend_and_names_are_unique():
    for ladder in LADDERS.values():
        totals = [count_params(r).total for r in ladder.rungs]
        assert totals == sorted(totals) and len(set(ladder.rung_names)) == len(ladder.rungs)
    tiny = get_ladder("tiny")
    assert all(r.vocab_size == 4096 and r.max_seq_len <= 256 for r in tiny.rungs)


def test_param_count_rejects_parts_that_do_not_add_up():
    with pytest.raises(ValueError, match="total"):
        ParamCount(total=10, embedding=3, non_embedding=6)


def test_with_vocab_size_keeps_the_count_honest():
    rung = get_ladder("tiny").rungs[1]
    resized = with_vocab_size(rung, 1024)
    assert resized.vocab_size == 1024 and resized.d_model == rung.d_model
    assert count_params(resized).total == count_params(rung).total - (4096 - 1024) * rung.d_model
    assert sum(p.numel() for p in build_model(resized, seed=0).parameters()) == count_params(resized).total


# --- building --------------------------------------------------------------------------
@pytest.mark.parametrize("ladder_name", ["tiny", "tiny-qwen3"])
def test_same_seed_gives_identical_weights_and_leaves_global_rng_alone(ladder_name):
    rung = get_ladder(ladder_name).rungs[0]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(rung, seed=7)
    assert torch.equal(torch.rand(3), expected_next)  # initialisation ran in a forked RNG
    b = build_model(rung, seed=7)
    c = build_model(rung, seed=8)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


@pytest.mark.parametrize("ladder_name", ["tiny", "tiny-qwen3"])
def test_built_model_runs_and_returns_every_hidden_state(ladder_name):
    rung = get_ladder(ladder_name).rungs[0]
    model = build_model(rung, seed=0)
    ids = torch.randint(0, rung.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, output_hidden_states=True)
    assert len(out.hidden_states) == rung.n_layers + 1
    assert out.hidden_states[-1].shape == (2, 16, rung.d_model)
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 16, rung.vocab_size)


def test_configs_have_dropout_off_and_the_rung_shape():
    gpt2 = build_model_config(get_ladder("gpt2").rung("gpt2-small"))
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.n_head, gpt2.n_inner, gpt2.n_positions) == (12, 768, 12, 3072, 1024)
    assert gpt2.resid_pdrop == gpt2.embd_pdrop == gpt2.attn_pdrop == 0.0
    qwen = build_model_config(get_ladder("qwen3").rung("qwen3-0.6B"))
    assert (qwen.num_hidden_layers, qwen.hidden_size, qwen.num_attention_heads, qwen.num_key_value_heads,
            qwen.head_dim, qwen.intermediate_size, qwen.vocab_size) == (28, 1024, 16, 8, 128, 3072, 151936)
    assert qwen.tie_word_embeddings and qwen.attention_dropout == 0.0


def test_token_ids_default_into_a_small_vocabulary_and_are_checked():
    config = build_model_config(get_ladder("tiny").rungs[0])
    assert config.bos_token_id == config.eos_token_id == 0
    assert build_model_config(get_ladder("tiny").rungs[0], eos_token_id=5).eos_token_id == 5
    with pytest.raises(ConfigError, match=r"eos_token_id=5000 .*vocab_size=4096"):
        build_model_config(get_ladder("tiny").rungs[0], eos_token_id=5000)


# --- errors ------------------------------------------------------------------------------
def test_heads_must_divide_d_model():
    with pytest.raises(ConfigError, match=r"n_heads=3 does not divide d_model=32; pick n_heads among"):
        tiny_rung(n_heads=3)


def test_nominal_mismatch_names_the_exact_count():
    with pytest.raises(ConfigError, match=r"nominal_params=1,000,000 .*164,736 parameters.*set nominal_params"):
        tiny_rung(nominal_params=1e6)


def test_qwen3_kv_heads_must_divide_heads_and_gpt2_rejects_qwen3_fields():
    rung = get_ladder("tiny-qwen3").rungs[1]
    with pytest.raises(ConfigError, match=r"n_kv_heads=3 must divide n_heads=4"):
        dataclasses.replace(rung, n_kv_heads=3)
    with pytest.raises(ConfigError, match=r"head_dim=8 are Qwen3 fields"):
        tiny_rung(head_dim=8)
    with pytest.raises(ConfigError, match=r"family='llama'"):
        tiny_rung(family="llama")
    with pytest.raises(ConfigError, match=r"d_model=0 must be a positive integer"):
        tiny_rung(d_model=0)


def test_unknown_ladder_and_rung_list_the_valid_names():
    with pytest.raises(ConfigError, match=r"ladder='gpt3' is unknown; use one of \[.*'gpt2-ffn'"):
        get_ladder("gpt3")
    with pytest.raises(ConfigError, match=r"rung='gpt2-xxl' is not in ladder 'gpt2'; use one of \[.*'gpt2-xl'\]"):
        get_ladder("gpt2").rung("gpt2-xxl")


def test_ladder_validation():
    small, big = get_ladder("tiny").rungs[:2]
    with pytest.raises(ConfigError, match="order rungs from smallest to largest"):
        Ladder("bad", (big, small), "")
    with pytest.raises(ConfigError, match="appear more than once"):
        Ladder("bad", (small, small), "")
    with pytest.raises(ConfigError, match="empty"):
        Ladder("bad", (), "")


def test_seq_len_above_the_context_is_refused():
    with pytest.raises(ConfigError, match=r"seq_len=512 exceeds rung 'tiny-165K'.s max_seq_len=256"):
        RunConfigurator(seq_len=512).plan(get_ladder("tiny").rungs[0])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(tokens_per_param=0), r"tokens_per_param=0"),
    (dict(param_basis="embedding"), r"param_basis='embedding'"),
    (dict(batch_tokens=1000, seq_len=128), r"batch_tokens=1000 is not a multiple of seq_len=128; use e.g. 1024"),
    (dict(batch_tokens=1024, batch_size=8), r"both set"),
    (dict(warmup_fraction=1.0), r"warmup_fraction=1.0"),
    (dict(lr=-1.0), r"lr=-1.0"),
    (dict(max_steps=0), r"max_steps=0"),
])
def test_run_configurator_validates_its_fields(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RunConfigurator(**kwargs)


def test_plan_errors_name_the_fix():
    rung = get_ladder("tiny").rungs[0]
    with pytest.raises(ConfigError, match=r"does not split over num_workers=2; use a multiple of 2"):
        RunConfigurator(seq_len=128, batch_size=3).plan(rung, num_workers=2)
    with pytest.raises(ConfigError, match=r"max_tokens=100 is less than one optimizer step \(1024 tokens\)"):
        RunConfigurator(seq_len=128, batch_size=8, max_tokens=100).plan(rung)
    plan = RunConfigurator(seq_len=128).plan(rung)
    with pytest.raises(ConfigError, match=r"--gpu 'V100': use one of .*'H100'.* e\.g\. --gpu 312e12"):
        plan.gpu_hours("V100")
    assert plan.gpu_hours("312e12") == pytest.approx(plan.gpu_hours("A100"))  # a peak FLOP/s number works too


# --- run configurator -------------------------------------------------------------------
def test_rules_hit_their_reference_point_and_move_the_right_way():
    assert compute_batch_tokens(REFERENCE_PARAMS) == REFERENCE_BATCH_TOKENS
    assert compute_lr(REFERENCE_PARAMS) == pytest.approx(REFERENCE_LR)
    assert compute_batch_tokens(1e9) > compute_batch_tokens(1e8) > compute_batch_tokens(1e7)
    assert compute_lr(1e9) < compute_lr(1e8) < compute_lr(1e7)
    assert compute_lr(1e3) == compute_lr(5e6)  # not extrapolated below the fitted range


@pytest.mark.parametrize("num_workers", [1, 2, 8])
@pytest.mark.parametrize("ladder_name", sorted(LADDERS))
def test_plans_are_consistent(ladder_name, num_workers):
    seq_len = 128 if ladder_name.startswith("tiny") else 1024
    for rung in get_ladder(ladder_name).rungs:
        plan = RunConfigurator(seq_len=seq_len).plan(rung, num_workers=num_workers)
        assert plan.n_params == plan.params.non_embedding
        assert plan.tokens == plan.steps * plan.batch_size * seq_len
        assert plan.batch_size % num_workers == 0
        # The budget is a floor: whole steps round up, so at most one step more than 20 N.
        assert 0 <= plan.tokens - 20 * plan.n_params < plan.tokens_per_step or plan.steps == 1
        assert plan.warmup_steps == math.ceil(0.2 * plan.steps - 1e-9)
        assert plan.flops_6nd == 6 * plan.n_params * plan.tokens
        assert plan.flops > plan.flops_6nd  # adds the output projection and attention


def test_explicit_settings_and_caps():
    rung = get_ladder("tiny").rungs[2]
    plan = RunConfigurator(seq_len=128, batch_tokens=2048, lr=1e-3, max_tokens=20_000,
                           warmup_steps=100).plan(rung, num_workers=2)
    assert (plan.batch_size, plan.lr, plan.steps, plan.tokens) == (16, 1e-3, 9, 9 * 2048)
    assert plan.warmup_steps == 9  # capped at the step count
    assert RunConfigurator(seq_len=128, batch_size=4, max_steps=3).plan(rung).steps == 3
    total = RunConfigurator(seq_len=128, batch_size=4, param_basis="total").plan(rung)
    assert total.n_params == count_params(rung).total
    fixed = RunConfigurator(seq_len=128, batch_size=4, tokens=51_200).plan(rung)
    assert fixed.tokens == 51_200 and fixed.steps == 100


def test_plan_to_dict_is_flat_and_json_ready():
    import json

    plan = RunConfigurator(seq_len=128).plan(get_ladder("tiny-qwen3").rungs[1], num_workers=2)
    flat = plan.to_dict()
    assert json.loads(json.dumps(flat)) == flat
    assert (flat["n_kv_heads"], flat["head_dim"], flat["steps"]) == (2, 16, plan.steps)
    assert flat["n_params_embedding"] + flat["n_params_non_embedding"] == flat["n_params_total"]


def test_paper_mid_training_settings_reproduce_1526_steps():
    # docs/protocols.md: 200M tokens at 131,072 tokens per step (128 x 1024) -> 1526 steps.
    plan = RunConfigurator(tokens=200_000_000, seq_len=1024, batch_tokens=131_072,
                           lr=5e-5).plan(get_ladder("gpt2").rung("gpt2-small"), num_workers=8)
    # Steps and the 20% warmup round up: 1525.9 -> 1526 steps, 305.2 -> 306 warmup steps.
    assert (plan.steps, plan.batch_size, plan.warmup_steps) == (1526, 128, 306)
    assert plan.lr == 5e-5
    scaled = RunConfigurator(tokens=200_000_000, seq_len=1024, batch_tokens=131_072, lr=5e-5,
                             lr_scaling="sqrt_world_size").plan(get_ladder("gpt2").rung("gpt2-small"), num_workers=4)
    assert scaled.lr == pytest.approx(1e-4)  # 5e-5 x sqrt(4)
    smoke = RunConfigurator(seq_len=64, batch_size=8, warmup_fraction=0.1, max_steps=30).plan(
        get_ladder("tiny").rungs[0], num_workers=2)
    assert smoke.warmup_steps == 3  # 0.1 x 30 is 3.0000000000000004 in floats: still 3


def test_gpu_hours_follow_the_peak_table():
    plan = RunConfigurator().plan(get_ladder("gpt2").rung("gpt2-small"))
    h100, a100 = plan.gpu_hours("H100"), plan.gpu_hours("A100")
    assert a100 / h100 == pytest.approx(PEAK_BF16_FLOPS["H100"] / PEAK_BF16_FLOPS["A100"])
    assert plan.gpu_hours("H100", mfu=0.2) == pytest.approx(2 * h100)
    assert plan.gpu_hours(peak_flops=1e15, mfu=1.0) == pytest.approx(plan.flops / 1e15 / 3600)
    assert math.isfinite(h100) and 0.1 < h100 < 10  # 124M at 20 tokens/N-emb param: about an hour


def test_ladder_table_lists_every_rung():
    plans = [RunConfigurator().plan(r) for r in get_ladder("gpt2").rungs]
    table = format_ladder_table(plans, gpu="H200")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["rung", "family", "shape"] and "H200-h@40%" in lines[0]
    assert len(lines) == 2 + len(plans) + 1
    for plan in plans:
        assert plan.rung.name in table
    assert "124M" in table and "L48 H25 d1600 ff6400" in table
