"""The learning-rate schedule and the weight-decay groups, as Hugging Face's Trainer forms them (the authors'
scripts run on it): checked against transformers' own functions and a hand computation."""

from __future__ import annotations

import math

import pytest

from scaling.ladder import build_model, get_ladder, split_weight_decay
from scaling.train import lr_at


def test_warmup_is_s_over_w_and_the_first_update_runs_at_zero():
    lr = [lr_at(s, peak=1.0, warmup_steps=4, total_steps=10, min_ratio=0.0) for s in range(11)]
    # by hand: 0, 1/4, 2/4, 3/4, then 0.5 (1 + cos(pi (s - 4) / 6))
    assert lr[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lr[7] == pytest.approx(0.5) and lr[10] == pytest.approx(0.0)
    assert lr_at(7, peak=1.0, warmup_steps=4, total_steps=10, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)


def test_the_schedule_is_hugging_faces_cosine_with_warmup():
    import torch
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=306, num_training_steps=1526)
    theirs = [scheduler.lr_lambdas[0](s) for s in range(1526)]
    ours = [lr_at(s, peak=1.0, warmup_steps=306, total_steps=1526, min_ratio=0.0) for s in range(1526)]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-12
    assert not math.isclose(ours[0], 1 / 306)  # the old (s + 1) / W


@pytest.mark.parametrize("ladder", ["tiny", "tiny-qwen3"])
def test_weight_decay_groups_are_the_trainers(ladder):
    from transformers import Trainer

    model = build_model(get_ladder(ladder).rungs[0], seed=0)
    decayed, _ = split_weight_decay(model.named_parameters())
    ours = {name for name, p in model.named_parameters() if any(p is d for d in decayed)}
    theirs = set(Trainer.get_decay_parameter_names(None, model)) & {name for name, _ in model.named_parameters()}
    assert ours == theirs
    if ladder == "tiny":
        assert "transformer.wpe.weight" in ours  # the position table is decayed, as the Trainer does
