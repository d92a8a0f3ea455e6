"""Actor-sharded condensation equals the single-process result (real local Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scaling.actors import CondensationPool, split_layers, stack_layer_groups
from scaling.condensation import CondensationAccumulator


def random_texts(num_texts=5, num_layers=4, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = [12, 9, 12, 5, 11][:num_texts]  # unequal lengths on purpose
    return [torch.randn(num_layers, n, dim, generator=generator) for n in lengths]


def single_process(texts):
    accumulator = CondensationAccumulator()
    for hidden in texts:
        accumulator.update(hidden)
    return accumulator.finalize()


def assert_same(result, expected):
    np.testing.assert_allclose(result.mean_cosine, expected.mean_cosine, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.mean_cosine_offdiag, expected.mean_cosine_offdiag, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.effective_rank, expected.effective_rank, rtol=1e-10)
    np.testing.assert_allclose(result.histograms, expected.histograms, rtol=0, atol=1e-9)
    assert result.spearman == pytest.approx(expected.spearman)
    assert result.kendall == pytest.approx(expected.kendall)


def test_split_layers_covers_every_layer_once():
    assert split_layers(13, 4) == [(0, 3), (3, 6), (6, 10), (10, 13)]
    assert split_layers(2, 4) == [(0, 1), (1, 2)]


def test_stacking_layer_groups_equals_one_accumulator():
    texts = random_texts()
    groups = [CondensationAccumulator(), CondensationAccumulator()]
    for hidden in texts:
        groups[0].update(hidden[:1])
        groups[1].update(hidden[1:])
    assert_same(stack_layer_groups(groups).finalize(), single_process(texts))


@pytest.mark.parametrize("num_actors", [1, 2, 4])
def test_sharded_equals_single_process(ray_session, num_actors):
    texts = random_texts()
    pool = CondensationPool(num_actors, num_cpus=0.5)
    try:
        for hidden in texts:
            pool.update(hidden)
        result = pool.result().finalize()
    finally:
        pool.close()
    assert_same(result, single_process(texts))


def test_sharded_measurement_of_a_model_equals_single_process(ray_session, tiny_gpt2_dir, bundled_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from scaling.actors import measure_condensation_sharded
    from scaling.condensation import measure_condensation
    from scaling.data import sample_texts

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    texts = sample_texts(bundled_rows, 3)
    expected = measure_condensation(model, tokenizer, texts, 64, progress=False).finalize()
    result = measure_condensation_sharded(model, tokenizer, texts, 64, num_actors=2, progress=False,
                                          num_cpus=0.5).finalize()
    assert_same(result, expected)


def test_condense_cli_with_actors_writes_the_single_process_numbers(ray_session, tiny_gpt2_dir, tmp_path):
    import json

    from scaling.condense import main

    common = ["--model", str(tiny_gpt2_dir), "--dataset", "bundled", "--repetitions", "3", "--max-length", "48",
              "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "one")]) == 0
    assert main(common + ["--out", str(tmp_path / "actors"), "--num-actors", "2"]) == 0
    one = json.loads((tmp_path / "one" / "condensation.json").read_text())
    actors = json.loads((tmp_path / "actors" / "condensation.json").read_text())
    for a, b in zip(one["layers"], actors["layers"]):
        assert a["mean_cosine"] == pytest.approx(b["mean_cosine"], abs=1e-12)
        assert a["histogram"] == pytest.approx(b["histogram"], abs=1e-9)
    assert one["spearman"] == pytest.approx(actors["spearman"])
