"""What a probe averages: `val/loss` over the whole validation split by default, or an evenly spread
sample, with the standard error over its blocks; each checked against a hand computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scaling.config import ProbeConfig
from scaling.errors import ConfigError
from scaling.train import block_losses, mean_and_standard_error, validation_indices


def test_the_whole_split_by_default_or_an_even_sample():
    assert ProbeConfig().val_batches is None
    assert list(validation_indices(173, 8, 1, None)) == list(range(173))
    assert list(validation_indices(10, 2, 2, 4)) == list(range(10))  # asking for more than there is: all
    assert list(validation_indices(100, 2, 1, 2)) == [0, 33, 66, 99]  # 2 batches x 2 blocks x 1 worker, spread
    with pytest.raises(ConfigError, match="probes.val_batches=0"):
        ProbeConfig(val_batches=0)


def test_mean_and_standard_error_by_hand():
    values = [2.0, 4.0, 6.0]
    mean, se = mean_and_standard_error(sum(values), sum(v * v for v in values), len(values))
    assert mean == 4.0 and se == pytest.approx(2.0 / math.sqrt(3))  # sample sd 2, n 3
    assert mean_and_standard_error(5.0, 25.0, 1) == (5.0, 0.0)


def test_block_losses_average_to_hugging_faces_loss():
    from scaling.ladder import build_model, get_ladder

    rung = get_ladder("tiny").rungs[0]
    model = build_model(rung, seed=0).eval()
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, rung.vocab_size, (3, 16)))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
        losses = block_losses(out.logits, ids)
        one = model(input_ids=ids[1:2], labels=ids[1:2]).loss
    assert losses.shape == (3,)
    assert float(losses.mean()) == pytest.approx(float(out.loss), rel=1e-5)
    assert float(losses[1]) == pytest.approx(float(one), rel=1e-5)


# --- probe texts: the authors' sampler ------------------------------------------------------------------


def test_the_authors_sampler_by_hand():
    from scaling.data import sample_reference_texts

    # rows as a wikitext split has them: headings, paragraphs with their own spaces and newlines, empty rows
    rows = ["", " = A = \n", "", " one two three \n", " four five \n", "", " six seven eight nine \n"] * 3
    count = lambda text: len(text.split())  # noqa: E731 -- a counter easy to follow by hand
    texts = sample_reference_texts(rows, 3, min_words=4, count_words=count)
    for r, text in enumerate(texts):
        start = int(np.random.default_rng(r).integers(0, int(len(rows) * 0.95)))  # 0.95 x 21 rows -> below 19
        expected, index = "", start
        while count(expected) < 4 and index < len(rows):
            expected += rows[index]  # as they are: no separator, empty rows kept
            index += 1
        assert text == expected
    # the rows run out: the text ends with the last row
    assert sample_reference_texts(["a\n", "b\n"], 1, min_words=100, count_words=count) == ["a\nb\n"]  # start 0


def test_words_are_counted_as_nltk_counts_them():
    from scaling.data import word_counter

    count = word_counter()
    assert count("Hello, world. It works.") == 7  # Hello , world . It works .
    assert count("") == 0


def test_probe_source_is_checked_when_the_study_loads():
    with pytest.raises(ConfigError, match="probes.source='hf:nope'"):
        ProbeConfig(source="hf:nope")
    assert ProbeConfig(source="wikitext").source == "wikitext"


def test_probe_ids_come_from_the_source_with_the_studys_tokenizer(tmp_path):
    from types import SimpleNamespace

    from scaling.data import build_tokenizer, sample_reference_texts, word_counter
    from scaling.shards import StudyBlocks
    from scaling.study import with_probe_source

    rows = [f"Paragraph {i}: " + " ".join(f"word{i}x{j}" for j in range(60)) for i in range(200)]
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(rows), encoding="utf-8")
    tokenizer = build_tokenizer(None, rows=rows, vocab_size=512, cache_dir=tmp_path).backend_tokenizer
    blocks = StudyBlocks(train=None, val=None, probe_ids=[], vocab_size=512, fingerprint="abc",
                         shards=SimpleNamespace(_tokenizer=lambda: tokenizer))
    lines = []
    probed = with_probe_source(blocks, ProbeConfig(source=str(source), texts=4, max_length=64), lines.append)
    texts = sample_reference_texts(rows, 4, count_words=word_counter())
    assert [list(ids) for ids in probed.probe_ids] == [tokenizer.encode(t, add_special_tokens=False).ids[:64]
                                                       for t in texts]
    assert all(len(ids) == 64 for ids in probed.probe_ids) and probed.fingerprint != "abc"
    assert lines == [f"probes: 4 texts from {source} (200 rows, the authors' sampler), 64 tokens each"]
