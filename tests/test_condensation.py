"""The condensation metric: invariants, mergeability, unequal lengths, and the reference
protocol on a tiny GPT-2 against a straightforward implementation written here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scaling import names
from scaling.condensation import (
    HISTOGRAM_BINS,
    CondensationAccumulator,
    CondensationResult,
    compute_rank_correlations,
    measure_condensation,
    merge_accumulators,
)
from scaling.errors import ConfigError, DataError, ModelError

LAYERS, WIDTH = 4, 16


def random_hidden(length: int, seed: int, layers: int = LAYERS, width: int = WIDTH) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(layers, length, width, generator=generator)


def condensing_hidden(length: int, seed: int, layers: int = 6, width: int = 32) -> torch.Tensor:
    """Tokens = shared direction * a_l + noise, with a_l growing with depth: similarity rises."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(width, generator=generator)
    noise = torch.randn(layers, length, width, generator=generator)
    strength = torch.linspace(0.0, 3.0, layers)[:, None, None]
    return strength * shared + noise


def straightforward_average(hidden_list: list[torch.Tensor]) -> np.ndarray:
    """Independent implementation: per text cosine matrices, each entry averaged over the texts
    that contain it, by explicit masks on a padded stack."""
    longest = max(h.shape[1] for h in hidden_list)
    layers = hidden_list[0].shape[0]
    stack = np.zeros((len(hidden_list), layers, longest, longest))
    present = np.zeros((len(hidden_list), 1, longest, longest))
    for r, hidden in enumerate(hidden_list):
        x = torch.nn.functional.normalize(hidden.double(), dim=-1, eps=1e-3)
        n = hidden.shape[1]
        stack[r, :, :n, :n] = (x @ x.transpose(1, 2)).clamp(-1, 1).numpy()
        present[r, :, :n, :n] = 1.0
    return stack.sum(0) / present.sum(0)


def accumulate(hidden_list, **kwargs) -> CondensationAccumulator:
    accumulator = CondensationAccumulator(**kwargs)
    for hidden in hidden_list:
        accumulator.update(hidden)
    return accumulator


# --- invariants -------------------------------------------------------------------------------


def test_identical_tokens_give_cosine_one_everywhere():
    direction = torch.randn(LAYERS, 1, WIDTH)
    hidden = direction.expand(LAYERS, 10, WIDTH) * torch.rand(1, 10, 1).add(0.5)  # same direction, any norm
    result = accumulate([hidden, hidden]).finalize()
    np.testing.assert_allclose(result.mean_cosine, 1.0, atol=1e-6)
    np.testing.assert_allclose(result.mean_cosine_offdiag, 1.0, atol=1e-6)
    assert np.all(result.histograms[:, -1] == HISTOGRAM_BINS / 2)  # all mass in the top bin
    np.testing.assert_allclose(result.effective_rank, 1.0, atol=1e-3)


def test_orthonormal_tokens_have_zero_offdiagonal_and_full_rank():
    hidden = torch.eye(WIDTH)[:8].expand(LAYERS, 8, WIDTH) * 3.0
    result = accumulate([hidden]).finalize()
    np.testing.assert_allclose(result.mean_cosine_offdiag, 0.0, atol=1e-7)
    np.testing.assert_allclose(result.mean_cosine, 1 / 8, atol=1e-7)
    np.testing.assert_allclose(result.effective_rank, 8.0, rtol=1e-4)


def test_monotone_profile_gives_spearman_and_kendall_one():
    assert compute_rank_correlations(np.array([0.1, 0.2, 0.25, 0.9])) == pytest.approx((1.0, 1.0))
    assert compute_rank_correlations(np.array([0.9, 0.5, 0.2])) == pytest.approx((-1.0, -1.0))
    result = accumulate([condensing_hidden(32, seed) for seed in range(4)]).finalize()
    assert np.all(np.diff(result.mean_cosine) > 0)
    assert result.spearman == pytest.approx(1.0) and result.kendall == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_rank_correlations_equal_scipys_with_and_without_ties(seed):
    from scipy import stats

    generator = np.random.default_rng(seed)
    values = generator.normal(size=4 + 5 * seed)
    if seed % 2:
        values = np.round(values, 0)  # ties
    index = np.arange(values.size)
    expected = (stats.spearmanr(index, values).statistic, stats.kendalltau(index, values).statistic)
    assert compute_rank_correlations(values) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_histograms_integrate_to_one():
    result = accumulate([random_hidden(12, 0), random_hidden(7, 1)]).finalize()
    width = 2.0 / HISTOGRAM_BINS
    np.testing.assert_allclose(result.histograms.sum(axis=1) * width, 1.0, rtol=1e-12)
    assert result.histogram_edges[0] == -1.0 and result.histogram_edges[-1] == 1.0


def test_mean_equals_norm_of_summed_unit_rows_for_equal_lengths():
    """mean(X^ X^T) = ||sum_i x^_i||^2 / T^2 per text, so m_l is the mean of that over texts."""
    hidden_list = [random_hidden(20, seed) for seed in range(5)]
    result = accumulate(hidden_list).finalize()
    expected = np.mean([
        (torch.nn.functional.normalize(h.double(), dim=-1).sum(dim=1).norm(dim=-1) ** 2 / 20**2).numpy()
        for h in hidden_list
    ], axis=0)
    np.testing.assert_allclose(result.mean_cosine, expected, atol=1e-6)


def test_equal_lengths_match_a_stack_and_average():
    hidden_list = [random_hidden(9, seed) for seed in range(6)]
    accumulator = accumulate(hidden_list)
    np.testing.assert_allclose(accumulator.averaged_matrices(), straightforward_average(hidden_list), atol=1e-6)


# --- unequal lengths, batches ---------------------------------------------------------------------


def test_unequal_lengths_average_each_entry_over_the_texts_that_contain_it():
    hidden_list = [random_hidden(n, seed) for seed, n in enumerate([5, 12, 8, 12, 3])]
    accumulator = accumulate(hidden_list)
    expected = straightforward_average(hidden_list)
    np.testing.assert_allclose(accumulator.averaged_matrices(), expected, atol=1e-6)
    result = accumulator.finalize()
    np.testing.assert_allclose(result.mean_cosine, expected.reshape(LAYERS, -1).mean(1), atol=1e-6)
    assert (result.min_length, result.max_length, result.mean_length) == (3, 12, pytest.approx(8.0))


def test_padded_batch_update_equals_one_update_per_text():
    lengths = [6, 10, 4]
    hidden_list = [random_hidden(n, seed) for seed, n in enumerate(lengths)]
    batch = torch.zeros(LAYERS, len(lengths), 10, WIDTH)
    mask = torch.zeros(len(lengths), 10, dtype=torch.long)
    for b, (hidden, n) in enumerate(zip(hidden_list, lengths)):
        batch[:, b, :n] = hidden
        batch[:, b, n:] = 7.0  # padding content must not matter
        mask[b, :n] = 1
    batched = CondensationAccumulator()
    batched.update(tuple(batch.unbind(0)), attention_mask=mask)  # HF's tuple of [B, T, d]
    one_by_one = accumulate(hidden_list)
    np.testing.assert_allclose(batched.averaged_matrices(), one_by_one.averaged_matrices(), atol=1e-6)
    np.testing.assert_allclose(batched.finalize().effective_rank, one_by_one.finalize().effective_rank, rtol=1e-4)


def test_left_padding_is_refused():
    mask = torch.tensor([[0, 1, 1]])
    with pytest.raises(DataError, match="right-padded"):
        CondensationAccumulator().update(random_hidden(3, 0).unsqueeze(1), attention_mask=mask)


# --- merging, serialisation, memory ------------------------------------------------------------------


def test_merge_of_partial_states_equals_one_pass():
    hidden_list = [random_hidden(n, seed) for seed, n in enumerate([7, 4, 11, 9, 2, 11])]
    one_pass = accumulate(hidden_list)
    first, second = accumulate(hidden_list[:2]), accumulate(hidden_list[2:])  # second has the longer grid
    merged = merge_accumulators([first, second])
    for key, value in one_pass.to_arrays().items():
        np.testing.assert_allclose(merged.to_arrays()[key], value, rtol=1e-12, atol=1e-12)
    assert merged.num_sequences == 6
    assert merged.finalize().spearman == pytest.approx(one_pass.finalize().spearman)


def test_state_round_trips_through_safetensors(tmp_path):
    from safetensors.numpy import load_file, save_file

    accumulator = accumulate([random_hidden(6, 0), random_hidden(4, 1)])
    save_file(accumulator.to_arrays(), tmp_path / "state.safetensors")
    restored = CondensationAccumulator.from_arrays(load_file(tmp_path / "state.safetensors"))
    restored.update(random_hidden(8, 2))
    accumulator.update(random_hidden(8, 2))
    np.testing.assert_allclose(restored.averaged_matrices(), accumulator.averaged_matrices(), rtol=1e-12)
    with pytest.raises(DataError, match="lacks arrays"):
        CondensationAccumulator.from_arrays({"cos_sum": np.zeros((1, 2, 2))})


def test_state_size_does_not_grow_with_repetitions():
    accumulator = CondensationAccumulator()
    for seed in range(2):
        accumulator.update(random_hidden(16, seed))
    size_after_two = accumulator.state_nbytes
    for seed in range(2, 40):
        accumulator.update(random_hidden(16, seed))
    assert accumulator.state_nbytes == size_after_two == LAYERS * 16 * 16 * 8 + 16 * 8 + LAYERS * 8


def test_merge_refuses_different_models_and_skipped_rank_propagates():
    with pytest.raises(ModelError, match="layers"):
        accumulate([random_hidden(4, 0, layers=3)]).merge(accumulate([random_hidden(4, 1, layers=5)]))
    merged = accumulate([random_hidden(4, 0)]).merge(accumulate([random_hidden(4, 1)], effective_rank=False))
    assert np.all(np.isnan(merged.finalize().effective_rank))


def test_empty_and_malformed_inputs_are_refused():
    with pytest.raises(DataError, match="empty"):
        CondensationAccumulator().finalize()
    with pytest.raises(DataError, match="shape"):
        CondensationAccumulator().update(torch.zeros(3, 4))


# --- the result ------------------------------------------------------------------------------------


def test_summaries_and_json_record():
    result = accumulate([condensing_hidden(16, seed, layers=7) for seed in range(3)]).finalize()
    m = result.mean_cosine
    assert result.mean_last(2) == pytest.approx(m[-2:].mean())
    assert result.late_half_mean == pytest.approx(m[4:].mean())  # 6 blocks: late half = blocks 4..6
    with pytest.raises(ConfigError, match="last_n=8"):
        result.mean_last(8)
    record = json.loads(result.to_json(last_n=3, extra={"model": "x"}))
    assert record["model"] == "x" and record["last_n_mean_cosine"] == pytest.approx(m[-3:].mean())
    layer = record["layers"][0]
    assert set(layer) >= {"layer", "mean_cosine", "mean_cosine_offdiag", "histogram", "effective_rank"}
    assert len(layer["histogram"]) == HISTOGRAM_BINS and len(record["layers"]) == 7
    assert {"spearman", "kendall"} <= set(record)
    metrics = result.to_metrics()
    assert metrics[names.COND_SPEARMAN] == result.spearman
    assert metrics[names.layer_metric(6, "mean_cos")] == pytest.approx(m[6])


def test_nan_is_written_as_null():
    result = accumulate([torch.ones(3, 4, 2)]).finalize()  # constant profile: no trend
    record = json.loads(result.to_json())
    assert record["spearman"] is None and record["kendall"] is None
    with pytest.raises(ValueError):
        result.mean_cosine[0] = 0.0  # results are read-only


def test_result_validates_its_arrays():
    with pytest.raises(DataError, match="layers"):
        CondensationResult(mean_cosine=np.zeros(3), mean_cosine_offdiag=np.zeros(2), histograms=np.zeros((3, 128)),
                           effective_rank=np.zeros(3), spearman=0.0, kendall=0.0, num_sequences=1,
                           min_length=1, max_length=1, mean_length=1.0)


# --- the protocol on a tiny GPT-2 ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()


@pytest.fixture(scope="module")
def protocol_texts(bundled_rows):
    from scaling.data import sample_texts

    return sample_texts(bundled_rows, 5)


def test_protocol_on_tiny_gpt2_matches_a_straightforward_implementation(tiny_lm, tokenizer, protocol_texts):
    max_length = 64
    stacked = []
    with torch.no_grad():
        for text in protocol_texts:  # the reference algorithm: full LM, every rep's matrices stacked
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            hidden = tiny_lm(**ids, output_hidden_states=True).hidden_states
            x = torch.nn.functional.normalize(torch.stack([h[0] for h in hidden]).double(), dim=-1, eps=1e-3)
            stacked.append((x @ x.transpose(1, 2)).clamp(-1, 1).numpy())
    averaged = np.stack(stacked).mean(axis=0)
    expected_mean = averaged.reshape(len(averaged), -1).mean(1)

    result = measure_condensation(tiny_lm, tokenizer, protocol_texts, max_length, progress=False).finalize()
    assert result.num_layers == tiny_lm.config.n_layer + 1 and result.min_length == max_length
    np.testing.assert_allclose(result.mean_cosine, expected_mean, atol=1e-6)
    off = (averaged.sum((1, 2)) - np.trace(averaged, axis1=1, axis2=2)) / (max_length**2 - max_length)
    np.testing.assert_allclose(result.mean_cosine_offdiag, off, atol=1e-6)
    expected_hist = np.stack([np.histogram(m, bins=128, range=(-1, 1), density=True)[0] for m in averaged])
    # float32 vs float64 may move an entry sitting on a bin edge: allow a couple of entries.
    assert np.abs(result.histograms - expected_hist).sum() * (2 / 128) <= 4 / max_length**2
    from scipy import stats

    assert result.spearman == pytest.approx(stats.spearmanr(np.arange(len(expected_mean)), expected_mean).statistic)


def test_measurement_accepts_texts_of_different_lengths(tiny_lm, tokenizer, protocol_texts):
    texts = ["A short text.", protocol_texts[0], "Another short one, a little longer."]
    result = measure_condensation(tiny_lm, tokenizer, texts, 32, progress=False).finalize()
    assert result.max_length == 32 and result.min_length < 10 and result.num_sequences == 3


def test_measurement_refuses_bad_inputs(tiny_lm, tokenizer):
    with pytest.raises(ModelError, match="--max-length 256"):
        measure_condensation(tiny_lm, tokenizer, ["text"], 1000, progress=False)
    with pytest.raises(DataError, match="no texts"):
        measure_condensation(tiny_lm, tokenizer, [], 16, progress=False)
    with pytest.raises(DataError, match="text 1 tokenizes to no tokens"):
        measure_condensation(tiny_lm, tokenizer, ["fine", ""], 16, progress=False)


# --- batched measurement equals one text per forward pass ------------------------------------------


def one_text_per_pass(model, tokenizer, texts, max_length):
    """The reference loop: each text alone through the base model, one update per text."""
    accumulator = CondensationAccumulator()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            hidden = model.base_model(**ids, output_hidden_states=True, use_cache=False).hidden_states
            accumulator.update(torch.stack([h[0] for h in hidden]))
    return accumulator


def tiny_qwen3(vocab_size):
    """A Qwen3-style model (rotary positions, RMSNorm, grouped-query attention) from config."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module", params=["gpt2", "qwen3"])
def causal_lm(request, tiny_lm, tokenizer):
    return tiny_lm if request.param == "gpt2" else tiny_qwen3(len(tokenizer))


@pytest.mark.parametrize("lengths", ["equal", "unequal"])
def test_batched_measurement_equals_one_text_per_pass(causal_lm, tokenizer, protocol_texts, lengths):
    if lengths == "equal":  # all truncated to 48 tokens; repeats run once and count twice
        texts = protocol_texts + protocol_texts[:2]
    else:
        texts = [protocol_texts[0], "A short text.", protocol_texts[1], "Another short one, a bit longer than that.",
                 "A short text.", protocol_texts[2][:200]]
    expected = one_text_per_pass(causal_lm, tokenizer, texts, 48)
    for batch_size in (1, 3, 8):
        batched = measure_condensation(causal_lm, tokenizer, texts, 48, progress=False, batch_size=batch_size)
        assert batched.num_sequences == len(texts)
        np.testing.assert_array_equal(batched.coverage.numpy(), expected.coverage.numpy())
        np.testing.assert_allclose(batched.averaged_matrices(), expected.averaged_matrices(), rtol=0, atol=2e-6)
        np.testing.assert_allclose(batched.finalize().effective_rank, expected.finalize().effective_rank, rtol=1e-5)


def test_right_padding_leaves_every_real_token_unchanged(causal_lm, tokenizer):
    """The premise of batching: in a causal model, padding after a text changes none of its
    hidden states when the attention mask marks it (GPT-2 absolute, Qwen3 rotary positions)."""
    from scaling.condensation import plan_batches, tokenize_texts

    sequences = tokenize_texts(tokenizer, ["one two three four five six seven eight", "nine ten"], 32)
    (batch,) = plan_batches(sequences, 2)
    assert batch.attention_mask is not None and batch.attention_mask[1].sum() < batch.attention_mask.shape[1]
    with torch.no_grad():
        together = causal_lm.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                        output_hidden_states=True, use_cache=False).hidden_states
        for row, ids in enumerate(sequences):
            alone = causal_lm.base_model(input_ids=ids[None], output_hidden_states=True, use_cache=False).hidden_states
            for layer_alone, layer_together in zip(alone, together):
                torch.testing.assert_close(layer_together[row, :ids.numel()], layer_alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [16, 4])  # T x T Gram (tokens <= width) and d x d Gram (tokens > width)
def test_zero_padding_rows_leave_rankme_unchanged(width):
    lengths = [6, 10, 3]
    hidden_list = [random_hidden(n, seed, width=width) for seed, n in enumerate(lengths)]
    batch = torch.zeros(LAYERS, len(lengths), max(lengths), width)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for b, (hidden, n) in enumerate(zip(hidden_list, lengths)):
        batch[:, b, :n], mask[b, :n] = hidden, 1
    batched = CondensationAccumulator()
    batched.update(batch, attention_mask=mask)
    one_by_one = accumulate(hidden_list)
    # Far tighter than RankMe's eps (1e-7 added to each normalised singular value): padding's
    # zero eigenvalues are left out, so only float round-off differs.
    np.testing.assert_allclose(batched.finalize().effective_rank, one_by_one.finalize().effective_rank, rtol=1e-12)


def test_weights_count_a_text_as_often_as_it_occurs():
    first, second = random_hidden(7, 0), random_hidden(7, 1)
    weighted = CondensationAccumulator()
    weighted.update(torch.stack([first, second], dim=1), weights=[3, 1])
    repeated = accumulate([first, first, second, first])
    assert weighted.num_sequences == 4
    for key, value in repeated.to_arrays().items():
        np.testing.assert_allclose(weighted.to_arrays()[key], value, rtol=1e-12, atol=1e-12)
    with pytest.raises(DataError, match="positive integers"):
        CondensationAccumulator().update(torch.stack([first, second], dim=1), weights=[1, 0])


def test_plan_batches_runs_each_distinct_text_once_longest_first():
    from scaling.condensation import plan_batches

    a, b, c = torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10, 11, 12])
    batches = plan_batches([a, b, a, c, a], batch_size=2, pad_id=0)
    assert [bt.input_ids.tolist() for bt in batches] == [[[9, 10, 11, 12], [5, 6, 7, 0]], [[8]]]
    assert batches[0].attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batches[1].attention_mask is None  # one text: nothing to pad
    assert [bt.weights.tolist() for bt in batches] == [[1, 3], [1]]
    with pytest.raises(ConfigError, match="batch_size=0"):
        plan_batches([a], batch_size=0)
