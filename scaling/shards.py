"""Token shards, as a study uses them: tokenize a text source once, on the cluster, read blocks anywhere.

The work is split by concern:

- `scaling.shard_sources`: a source spec resolved to its files and a fingerprint, cut into pieces;
- `scaling.shard_tasks`: the Ray Data task that tokenizes one piece and writes its token parts;
- `scaling.shard_build`: `ShardSpec`, the plan (key) and the Ray Data job (`build_token_shards`);
- `scaling.shard_store`: the layout on storage, atomic publishing and the readers (`TokenShards`,
  `TokenBlocks`: lazily memory-mapped, picklable views a Ray Train worker indexes like an array).

This module is what the study driver calls: `build_study_blocks` (shards built or reused, the
train/validation views and the probe ids) and the dry run's corpus and budget lines.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

from scaling import storage
from scaling.console import say
from scaling.errors import DataError
from scaling.shard_build import ShardSpec, build_token_shards, find_token_shards, plan_shards
from scaling.shard_store import TokenBlocks, TokenShards, read_published

@dataclass(frozen=True)
class StudyBlocks:
    """Everything the old `prepare_data` returned, with views of the shards instead of arrays."""

    train: TokenBlocks
    """Training blocks; a worker indexes it with `DataOrder.batch(step)` as before."""
    val: TokenBlocks
    """Validation blocks: the source's own validation split, or blocks held out of the training stream."""
    probe_ids: list
    """Token ids (int64 arrays) of the condensation probe texts."""
    vocab_size: int
    """Tokens in the tokenizer (`len(tokenizer)`)."""
    fingerprint: str
    """Identifies the data in run hashes: shards, seq_len, split and probes."""
    shards: TokenShards
    """The shards themselves (manifest, token counts)."""

    @property
    def pad_id(self) -> int | None:
        """The padding token (else EOS) of the shards' tokenizer; EOS for shards written before it was recorded."""
        tokenizer = self.shards.manifest["tokenizer"]
        return tokenizer.get("pad_id", tokenizer.get("eos_id"))


def build_study_blocks(spec: ShardSpec, root: str, *, seq_len: int, val_fraction: float, probe_texts: int,
                       probe_max_length: int, progress: Callable = say, split_seed: int = 0) -> StudyBlocks:
    """Shards built or reused, then the train/val views and the probe ids: the driver-side replacement of
    `scaling.study.prepare_data` (validation does not depend on a run's seed: `split_seed` is the study's)."""
    shards = build_token_shards(spec, root, seq_len=seq_len, progress=progress)
    train = shards.blocks(seq_len, "train", val_fraction=val_fraction, seed=split_seed)
    val = shards.blocks(seq_len, "val", val_fraction=val_fraction, seed=split_seed)
    probe_ids = shards.probe_ids(probe_texts, probe_max_length)
    digest = hashlib.sha256(f"{train.fingerprint}|{val.fingerprint}".encode())
    for ids in probe_ids:
        digest.update(ids.tobytes())
    return StudyBlocks(train, val, probe_ids, int(shards.manifest["tokenizer"]["vocab_size"]),
                       digest.hexdigest()[:16], shards)


# --- budget checks (dry run) -------------------------------------------------------------------------


def describe_corpus(spec: ShardSpec, root: str) -> str:
    """One line for a dry run: the corpus's token count from its manifest, or "not tokenized yet"."""
    plan = plan_shards(spec)
    shards = read_published(root, plan.directory)
    if shards is None:
        return f"{spec.source}: not tokenized yet (token shards {plan.key} will be written to " \
               f"{storage.join(root, plan.directory)})"
    return f"{spec.source}: {shards.describe()}"


def corpus_tokens(spec: ShardSpec, root: str) -> int | None:
    """Training-stream tokens of the published shards for `spec`, or None when not tokenized yet."""
    shards = find_token_shards(spec, root)
    return None if shards is None else shards.tokens("train")


def epochs_for_budget(budget_tokens: float, corpus_tokens: int) -> float:
    """How many passes over the training tokens a token budget takes."""
    if corpus_tokens <= 0:
        raise DataError(f"corpus_tokens={corpus_tokens}: the corpus has no tokens")
    return budget_tokens / corpus_tokens


def budget_warning(budget_tokens: float, corpus_tokens: int, *, what: str = "the budget") -> str | None:
    """None when the budget fits in one pass over the corpus, else a warning with the repetitions."""
    epochs = epochs_for_budget(budget_tokens, corpus_tokens)
    if epochs <= 1.0:
        return None
    return (f"{what} of {budget_tokens:,.0f} tokens is {epochs:.2f} epochs of the {corpus_tokens:,}-token corpus: "
            f"the data repeats {math.ceil(epochs)} times")
