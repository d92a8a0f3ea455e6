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
