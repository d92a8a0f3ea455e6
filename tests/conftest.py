"""Shared fixtures: a locally trained tokenizer, tiny GPT-2 models saved to disk, one Ray.

Everything is offline: the tokenizer is trained on the bundled corpus, models are built
from config with random weights.
"""

from __future__ import annotations

import os

import pytest

# Before Ray or Ray Train is imported anywhere (docs/stack.md): no token auth for the local
# test cluster, and a fast controller poll so each ray.train.report does not block ~2 s.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def bundled_rows():
    from scaling.data import parse_text_source, read_rows

    return read_rows(parse_text_source("bundled"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, bundled_rows):
    """A byte-level BPE (vocab 1024) trained on the bundled corpus, saved to a folder."""
    from scaling.data import build_tokenizer

    tokenizer = build_tokenizer(None, rows=bundled_rows, vocab_size=1024,
                                cache_dir=tmp_path_factory.mktemp("tokenizer-cache"))
    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    """A tiny random GPT-2 (3 blocks, d=32) with its tokenizer in one folder."""
    from scaling.model import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), tokenizer)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting one costs ~7 s)."""
    import ray

    if not ray.is_initialized():
        # address="local": a private Ray, even when another cluster runs on this machine.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
    yield ray
    ray.shutdown()


def tiny_train_study(tmp_path, name, **overrides):
    """A study of the tiny ladder's smallest rung (4 steps, 2 workers, ZeRO-3, temp storage and MLflow);
    a dict in `overrides` updates that section, anything else replaces the key."""
    from scaling.config import study_from_dict

    raw = {
        "study": name,
        "ladder": "tiny",
        "rungs": ["tiny-165K"],
        "arms": ["baseline", {"name": "dispersion", "lambda": 0.1, "layers": "all"}],
        "seeds": [0],
        "data": {"source": "bundled", "max_rows": 600},
        "training": {"seq_len": 32, "batch_size": 4, "micro_batch_size": 2, "max_steps": 4, "lr": 3e-3},
        "probes": {"every_steps": 2, "texts": 2, "max_length": 32, "val_batches": 1},
        "resources": {"num_workers": 2, "zero_stage": 3},
        "checkpoint": {"every_steps": 2, "num_to_keep": 1, "max_failures": 1},
        "storage_path": str(tmp_path / "runs"),
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return study_from_dict(raw)
