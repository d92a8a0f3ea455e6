"""The Ray Data task of a token-shard build: read a piece, tokenize its rows, write the tokens.

Each task reads its piece (`scaling.shard_sources.piece_rows`), tokenizes the rows one by one with
the study's tokenizer (rebuilt once per worker from the object store) and writes flat token parts
straight to the attempt folder, so the driver only ever holds file names and counts. Rows are
tokenized alone and pieces end at row boundaries, so the concatenated parts do not depend on how the
source was cut or on how many CPUs ran them.
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import numpy as np

from scaling import storage
from scaling.errors import DataError
from scaling.shard_sources import piece_rows

PART_TOKENS = 1 << 24
"""A task writes a new part file after this many tokens (32 MB as uint16), bounding its memory."""
ENCODE_ROWS = 1024
"""Rows handed to the tokenizer at once inside a task."""


def row_text(row: str, packing: str) -> str | None:
    """What of a row gets tokenized: eos packing strips it (as `scaling.data.read_rows` does), raw
    packing keeps it and ends it with one newline; None for a row without text."""
    if not row.strip():
        return None
    if packing == "eos":
        return row.strip()
    return row if row.endswith("\n") else row + "\n"


_WORKER_TOKENIZERS: dict[str, Any] = {}


def _worker_tokenizer(ref_box: list, digest: str):
    """The tokenizer, rebuilt once per worker process from its serialised form in the object store."""
    if digest not in _WORKER_TOKENIZERS:
        import ray
        from tokenizers import Tokenizer

        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one task, one CPU: Ray runs the others
        _WORKER_TOKENIZERS[digest] = Tokenizer.from_str(ray.get(ref_box[0]))
    return _WORKER_TOKENIZERS[digest]


def encode_rows(tokenizer, texts: list[str], eos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of rows concatenated (each followed by `eos_id` unless None), and each row's length."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # _fast (no offsets) since 0.20
    encodings = encode(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    if eos_id is not None:
        for row in ids:
            row.append(eos_id)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for row in ids for t in row), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def tokenize_pieces(batch: dict, *, tokenizer_box: list, tokenizer_sha: str, packing: str, eos_id: int | None,
                     dtype: str, attempt_uri: str, max_rows: int | None, part_tokens: int) -> dict:
    """Ray Data UDF: read, tokenize and write each piece of the batch; return one row per part written
    (a piece without text returns a row with part -1; a bad input returns a row with its error)."""
    out: dict[str, list] = {k: [] for k in ("stream", "piece", "part", "file", "rows_file", "rows", "tokens",
                                            "bytes", "rows_bytes", "error", "cpu_seconds")}
    clock = [time.process_time()]  # CPU time of this worker: throughput per core even on a busy machine

    def emit(stream, piece, part=-1, file="", rows_file="", rows=0, tokens=0, size=0, rows_size=0, error=""):
        now = time.process_time()
        for key, value in zip(out, (stream, piece, part, file, rows_file, rows, tokens, size, rows_size, error,
                                    now - clock[0])):
            out[key].append(value)
        clock[0] = now

    tokenizer = _worker_tokenizer(tokenizer_box, tokenizer_sha)
    for desc in batch["piece_json"]:
        piece = json.loads(str(desc))
        stream, index = piece["stream"], piece["piece"]
        separator = eos_id if packing == "eos" else None
        chunks, lengths, buffered, part, rows_seen = [], [], 0, 0, 0

        def flush():
            nonlocal chunks, lengths, buffered, part
            tokens = np.concatenate(chunks).astype(dtype)
            ends = np.cumsum(np.concatenate(lengths)).astype(np.uint32)
            name = f"{stream}/{index:06d}.{part:03d}"
            size = _write_npy(attempt_uri, f"{name}.tokens.npy", tokens)
            rows_size = _write_npy(attempt_uri, f"{name}.rows.npy", ends)
            emit(stream, index, part, f"{name}.tokens.npy", f"{name}.rows.npy", len(ends), len(tokens), size,
                 rows_size)
            chunks, lengths, buffered, part = [], [], 0, part + 1

        try:
            pending: list[str] = []
            limit = max_rows if stream == "train" else None
            for row in piece_rows(piece):
                text = row_text(row, packing)
                if text is None:
                    continue
                pending.append(text)
                rows_seen += 1
                last = limit is not None and rows_seen >= limit
                if len(pending) >= ENCODE_ROWS or last:
                    flat, row_lengths = encode_rows(tokenizer, pending, separator)
                    chunks.append(flat), lengths.append(row_lengths)
                    buffered, pending = buffered + len(flat), []
                    if buffered >= part_tokens:
                        flush()
                if last:  # a piece never needs more rows than the whole cap
                    break
            if pending:
                flat, row_lengths = encode_rows(tokenizer, pending, separator)
                chunks.append(flat), lengths.append(row_lengths)
            if chunks:
                flush()
            elif part == 0:
                emit(stream, index)
        except DataError as exc:  # reported to the driver as data, not as a crashed task
            emit(stream, index, error=str(exc))
    return out


def _write_npy(attempt_uri: str, relative: str, array: np.ndarray) -> int:
    filesystem, base = storage.filesystem(attempt_uri)
    path = storage.join(base, relative)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    with filesystem.open_output_stream(path) as out:
        out.write(buffer.getbuffer())
    return buffer.getbuffer().nbytes
