"""The driver-side data path that token shards replaced, kept as the oracle the shards are checked
against (`tests/test_shards.py`) and measured against (`bench/bench_data.py`): tokenized rows packed
into one array of blocks, then a seeded shuffle holds out the validation blocks."""

from __future__ import annotations

import numpy as np

from scaling.errors import DataError


def pack_blocks(token_rows: list[list[int]], block_size: int, eos_id: int | None) -> np.ndarray:
    """Concatenate tokenized rows (each followed by EOS; with `eos_id` None, nothing between them:
    `raw` packing) and cut into [n, block_size] blocks; the tail that does not fill a block is dropped."""
    if block_size < 2:
        raise DataError(f"block_size={block_size}: must be at least 2")
    separator = () if eos_id is None else (eos_id,)
    stream = np.fromiter(
        (t for row in token_rows for t in (*row, *separator)), dtype=np.int64
    )
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataError(
            f"the text has {len(stream)} tokens, fewer than one block of {block_size}; "
            "use more text or a smaller block size"
        )
    return stream[: n_blocks * block_size].reshape(n_blocks, block_size)


def split_train_val(blocks: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle blocks deterministically by seed, then hold out a validation fraction."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}: must be in (0, 1)")
    order = np.random.default_rng(seed).permutation(len(blocks))
    n_val = max(1, int(round(val_fraction * len(blocks))))
    if n_val >= len(blocks):
        raise DataError(f"only {len(blocks)} blocks: too few to hold out validation; use more text")
    return blocks[order[n_val:]], blocks[order[:n_val]]
