"""Token shards on shared storage: tokenize a text source once, on the cluster, read blocks anywhere.

`build_token_shards` runs one Ray Data job over "pieces" of the source (byte ranges of a
.txt/.jsonl file cut at line ends, row groups of parquet files, shards of a streamed Hugging
Face dataset, row ranges of the bundled text). Each task reads its piece, tokenizes it with
the study's tokenizer and writes the tokens straight to storage, so the driver only ever
holds file names and counts. Rows are tokenized one by one and each piece is cut at a row
boundary, so the token stream does not depend on how the source was cut into pieces or on
how many CPUs ran them: the concatenation of the parts, in piece order, is the stream the
old driver-side path built (`scaling.data.pack_blocks` before its cut into blocks).

Layout under a root (a local folder, a shared filesystem, or an s3:// URI):

    <root>/<label>-<key>/manifest.json                 written last: the only file a reader trusts
    <root>/<label>-<key>/attempt-<unix>-<id>/tokenizer.json
    <root>/<label>-<key>/attempt-<unix>-<id>/train/000007.000.tokens.npy  flat uint16/uint32 tokens
    <root>/<label>-<key>/attempt-<unix>-<id>/train/000007.000.rows.npy    uint32 end of each row
    <root>/<label>-<key>/attempt-<unix>-<id>/val/...   the source's own validation split, if any

The key hashes what determines the tokens (source identity, tokenizer, packing, row cap,
validation source, format version) and not the block length: blocks of any `seq_len` are cut
from the flat stream when read, so studies with other block lengths reuse the same shards.
Every writer fills its own attempt folder; publishing is one atomic step (a hard link of
the manifest on local filesystems, one object PUT on object stores). A folder without a
manifest naming it is unfinished and never read.

`TokenShards.blocks(seq_len, split)` gives a picklable, lazily memory-mapped view that a Ray
Train worker indexes like the old in-memory array (`blocks[indices] -> [k, seq_len] int64`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from scaling import storage
from scaling.console import say
from scaling.data import json_text
from scaling.errors import DataError

FORMAT_VERSION = 1
PACKINGS = ("eos", "raw")
MANIFEST = "manifest.json"
DEFAULT_CACHE = Path.home() / ".cache" / "dispersion-scaling" / "token-shards"
PART_TOKENS = 1 << 24
"""A task writes a new part file after this many tokens (32 MB as uint16), bounding its memory."""
ENCODE_ROWS = 1024
"""Rows handed to the tokenizer at once inside a task."""
MIN_PIECE_BYTES, MAX_PIECE_BYTES = 1 << 20, 64 << 20
PIECES_PER_CPU = 4  # several pieces per CPU, so one slow piece does not leave the others idle
STALE_AFTER_S = 2 * 86400
"""An attempt folder no manifest names is removed by the next publisher once it is this old."""
CHECK_BYTES = 1 << 16  # how much of a text file is read up front to reject binary or empty input
SOURCE_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class ShardSpec:
    """What a set of token shards is made of. Same spec and same source files -> same shards."""

    source: str
    """bundled, a reference name (wikitext, ...), hf:NAME[/CONFIG]:SPLIT:FIELD, or .txt/.jsonl/.parquet (path/URI)."""
    tokenizer: str
    """Tokenizer name or local folder (e.g. the folder `scaling.data.build_tokenizer` caches a trained BPE in)."""
    packing: str = "eos"
    """eos: EOS after every row (the old driver path); raw: rows with their newline, no separator (the authors')."""
    field: str = "text"
    """Column (parquet) or JSON key (jsonl) holding the text; hf: sources name their own field."""
    max_rows: int | None = None
    """Use only the first this many non-empty rows of the source (quick runs)."""
    validation: str = "auto"
    """auto: the source's own validation split if it has one, else held-out blocks; none: held-out; or a source."""

    def __post_init__(self):
        if self.packing not in PACKINGS:
            raise DataError(f"packing={self.packing!r}: use one of {list(PACKINGS)}")
        if self.max_rows is not None and self.max_rows < 1:
            raise DataError(f"max_rows={self.max_rows}: must be >= 1 or None")
        if not self.source or not self.tokenizer:
            raise DataError("a token-shard spec needs a source and a tokenizer (name or folder)")


# --- sources -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A text source resolved to the files (or dataset) that make it up."""

    kind: str  # bundled | lines | parquet | hf_stream
    label: str
    fingerprint: dict
    files: tuple = ()  # (path, size) for lines/parquet
    field: str = "text"
    jsonl: bool = False
    hf: tuple = ()  # (name, config, split) for hf_stream
    validation: "_Source | None" = None  # the source's own validation split (hf), when there is one


def _label(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-.")[:40] or "source"






def resolve_source(spec: str, field: str = "text", validation: str = "auto") -> _Source:
    """A source spec resolved to its files and a fingerprint (stat only: no text is read here)."""
    from scaling.data import REFERENCE_SOURCES, TRAINING_SOURCES, parse_hf_spec

    spec = spec.strip()
    if spec == "bundled":
        rows = _bundled_rows()  # ~0.5 MB that ships with Python: its content is its identity
        digest = hashlib.sha256("\n\x00".join(rows).encode()).hexdigest()[:16]
        return _Source("bundled", "bundled", {"kind": "bundled", "sha256": digest, "rows": len(rows)})
    named = {**REFERENCE_SOURCES, **TRAINING_SOURCES}  # shards are training data: wikitext is the raw version
    if spec in named:
        return _resolve_hf(*named[spec], validation)
    if spec.startswith("hf:"):
        return _resolve_hf(*parse_hf_spec(spec), validation)
    return _resolve_files(spec, field)


def _resolve_files(spec: str, field: str) -> _Source:
    from pyarrow import fs

    from scaling.data import local_text_files

    if "://" not in spec:  # a local source is accepted or refused as the config and the dry run do
        local_text_files(spec)

    try:
        filesystem, path = storage.filesystem(spec)
        info = filesystem.get_file_info(path)
    except Exception as exc:  # noqa: BLE001 -- a bad URI or missing credentials: the user's to fix
        raise DataError(f"text source {spec!r} cannot be opened ({type(exc).__name__}: {exc}); "
                        "check the path") from None
    if info.type == fs.FileType.NotFound:
        raise DataError(f"text source {spec!r}: file not found; check the path")
    if info.type == fs.FileType.Directory:
        entries = filesystem.get_file_info(fs.FileSelector(path, recursive=False))
        files = sorted((e for e in entries if e.type == fs.FileType.File and e.path.endswith(SOURCE_SUFFIXES)),
                       key=lambda e: e.path)
        if not files:
            raise DataError(f"text source {spec!r}: a folder without .txt/.jsonl/.parquet files; "
                            "point at a file or a folder of them")
        kinds = {Path(e.path).suffix for e in files}
        if len(kinds) > 1:
            raise DataError(f"text source {spec!r}: mixes {sorted(kinds)} files; keep one kind per folder")
    else:
        files = [info]
        if not info.path.endswith(SOURCE_SUFFIXES):
            raise DataError(f"text source {spec!r}: expected a .txt, .jsonl or .parquet file (or a folder of them)")
    suffix = Path(files[0].path).suffix
    uri_prefix = spec.split("://", 1)[0] + "://" if "://" in spec else ""
    entries = tuple((uri_prefix + e.path, int(e.size)) for e in files)
    for file_path, size in entries:
        if size == 0:
            raise DataError(f"text source {file_path!r} is empty; give a file with text")
    fingerprint = {"kind": "files", "field": field if suffix != ".txt" else None,
                   "files": [[p, s, int(e.mtime_ns or 0)] for (p, s), e in zip(entries, files)]}
    label = Path(spec.rstrip("/")).stem
    if suffix == ".parquet":
        for file_path, _ in entries[:1] + entries[-1:]:
            _check_parquet(file_path, field)
        return _Source("parquet", _label(label), fingerprint, entries, field)
    for file_path, size in entries[:1] + entries[-1:]:
        _check_text_head(file_path, size, field if suffix == ".jsonl" else None)
    return _Source("lines", _label(label), fingerprint, entries, field, jsonl=suffix == ".jsonl")


def _check_text_head(path: str, size: int, field: str | None) -> None:
    """Reject a binary, non-UTF-8 or blank file (and, for jsonl, a bad first record) before any work."""
    import codecs

    filesystem, local = storage.filesystem(path)
    with filesystem.open_input_file(local) as stream:
        head = stream.read(min(size, CHECK_BYTES))
    if b"\x00" in head:
        raise DataError(f"text source {path!r} looks binary (NUL bytes); give UTF-8 text (.txt/.jsonl) or .parquet")
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=size <= CHECK_BYTES)
    except UnicodeDecodeError as exc:
        raise DataError(f"text source {path!r} is not UTF-8 text (byte {exc.start}); "
                        "convert it to UTF-8 or give a .parquet file") from None
    if size <= CHECK_BYTES and not text.strip():
        raise DataError(f"text source {path!r} has no text (only whitespace); give a file with text")
    if field is not None:
        first = next((line for line in text.splitlines() if line.strip()), None)
        if first is not None and (len(first) < len(text) or size <= CHECK_BYTES):
            json_text(first, field, f"{path} (first record)")


def _check_parquet(path: str, field: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, local = storage.filesystem(path)
    try:
        with filesystem.open_input_file(local) as stream:
            schema = pq.ParquetFile(stream).schema_arrow
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises several kinds for a bad file
        raise DataError(f"text source {path!r} is not a readable parquet file ({type(exc).__name__}); "
                        "check the file") from None
    if field not in schema.names:
        raise DataError(f"text source {path!r} has no column {field!r}; columns: {schema.names}; set the field name")
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"text source {path!r}: column {field!r} is {kind}, not text; set the field name")


def _resolve_hf(name: str, config: str | None, split: str, field: str, validation: str) -> _Source:
    """A Hugging Face dataset: its parquet files when it has them (read by row groups, in parallel),
    else its streaming shards."""
    import datasets

    try:
        builder = datasets.load_dataset_builder(name, config)
    except Exception as exc:  # noqa: BLE001 -- datasets raises many kinds; all mean "cannot resolve"
        raise DataError(
            f"cannot resolve dataset {name!r} (config {config!r}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. It needs the Hugging Face hub (or a local "
            "copy); offline, use 'bundled' or local .txt/.jsonl/.parquet files") from None
    data_files = {str(k): [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
    splits = list(data_files) or list((builder.info.splits or {}).keys())
    if splits and split not in splits:
        raise DataError(f"dataset {name!r} has no split {split!r}; splits: {splits}")

    def one(split_name: str) -> _Source:
        label = _label(f"{name.rstrip('/').split('/')[-1]}-{config or ''}-{split_name}")
        files = data_files.get(split_name, [])
        base = {"kind": "hf", "name": name, "config": config, "split": split_name, "field": field}
        if files and all(f.endswith(".parquet") for f in files):
            infos, stamp = [], []
            for file_path in files:
                filesystem, local = storage.filesystem(file_path)
                info = filesystem.get_file_info(local)
                infos.append((file_path, int(info.size or 0)))
                # hub URLs carry the dataset revision; local files get their size and time: both change with the data
                stamp.append([file_path, int(info.size or 0)]
                             + ([] if "://" in file_path else [int(info.mtime_ns or 0)]))
            _check_parquet(files[0], field)
            return _Source("parquet", label, {**base, "files": stamp}, tuple(infos), field)
        return _Source("hf_stream", label, {**base, "files": files}, field=field,
                       hf=(name, config, split_name))

    resolved = one(split)
    if validation == "auto" and split == "train" and "validation" in splits:
        resolved = _with_validation(resolved, one("validation"))
    return resolved


def _with_validation(source: _Source, validation: _Source | None) -> _Source:
    from dataclasses import replace

    return replace(source, validation=validation)


def _bundled_rows() -> list[str]:
    from scaling.data import _read_bundled_rows

    return _read_bundled_rows()


# --- pieces: what one task reads -------------------------------------------------------------------


def plan_pieces(source: _Source, split: str, cpus: int, piece_bytes: int | None = None) -> list[dict]:
    """Cut a source into pieces at row boundaries, in source order (piece i before piece i + 1)."""
    if source.kind == "bundled":
        n = len(_bundled_rows())
        count = max(1, min(n, cpus * PIECES_PER_CPU))
        bounds = np.linspace(0, n, count + 1).astype(int)
        pieces = [{"kind": "bundled", "start": int(a), "stop": int(b)}
                  for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    elif source.kind == "lines":
        total = sum(size for _, size in source.files)
        target = piece_bytes or int(min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, total / (cpus * PIECES_PER_CPU))))
        pieces = []
        for path, size in source.files:
            for start, end in _line_ranges(path, size, target):
                pieces.append({"kind": "lines", "path": path, "start": start, "end": end,
                               "jsonl": source.jsonl, "field": source.field})
    elif source.kind == "parquet":
        pieces = _parquet_pieces(source, cpus, piece_bytes)
    elif source.kind == "hf_stream":
        import datasets

        name, config, hf_split = source.hf
        try:
            shards = datasets.load_dataset(name, config, split=hf_split, streaming=True).n_shards
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"cannot stream dataset {name!r} split {hf_split!r}: {type(exc).__name__}: {exc}") from None
        pieces = [{"kind": "hf_stream", "name": name, "config": config, "split": hf_split, "shards": shards,
                   "index": i, "field": source.field} for i in range(shards)]
    else:
        raise DataError(f"source kind {source.kind!r} is unknown")
    return [{**piece, "piece": i, "stream": split} for i, piece in enumerate(pieces)]


def _line_ranges(path: str, size: int, target: int) -> list[tuple[int, int]]:
    """Byte ranges of about `target` bytes, each ending just after a newline (or at the end of file)."""
    if size <= target:
        return [(0, size)]
    filesystem, local = storage.filesystem(path)
    cuts = [0]
    with filesystem.open_input_file(local) as stream:
        for approx in range(target, size, target):
            position = max(approx, cuts[-1])
            stream.seek(position)
            while position < size:  # a line longer than the window: keep looking
                window = stream.read(min(1 << 20, size - position))
                newline = window.find(b"\n")
                if newline >= 0:
                    position += newline + 1
                    break
                position += len(window)
            if cuts[-1] < position < size:
                cuts.append(position)
    cuts.append(size)
    return list(zip(cuts[:-1], cuts[1:]))


def _parquet_pieces(source: _Source, cpus: int, piece_bytes: int | None) -> list[dict]:
    """Runs of consecutive row groups of about `piece_bytes` of (uncompressed) data each."""
    import pyarrow.parquet as pq

    groups = []  # (path, row group, bytes)
    for path, _ in source.files:
        filesystem, local = storage.filesystem(path)
        with filesystem.open_input_file(local) as stream:
            meta = pq.ParquetFile(stream).metadata
        groups.extend((path, g, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups))
    total = sum(size for *_, size in groups)
    target = piece_bytes or int(min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, total / (cpus * PIECES_PER_CPU))))
    pieces, current, current_bytes = [], None, 0
    for path, group, size in groups:
        if current is None or current["path"] != path or current_bytes >= target:
            current, current_bytes = {"kind": "parquet", "path": path, "row_groups": [], "field": source.field}, 0
            pieces.append(current)
        current["row_groups"].append(group)
        current_bytes += size
    return pieces


def _piece_rows(piece: dict) -> Iterator[str]:
    """The rows of one piece with text in them, unstripped, in source order."""
    kind = piece["kind"]
    if kind == "bundled":
        yield from _bundled_rows()[piece["start"]:piece["stop"]]
    elif kind == "lines":
        filesystem, local = storage.filesystem(piece["path"])
        with filesystem.open_input_file(local) as stream:
            stream.seek(piece["start"])
            data = stream.read(piece["end"] - piece["start"])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"text source {piece['path']!r} is not UTF-8 text (byte {piece['start'] + exc.start}); "
                            "convert it to UTF-8 or give a .parquet file") from None
        del data
        if not piece["jsonl"]:
            yield from text.splitlines()
            return
        offset = piece["start"]
        for line in text.splitlines():
            if line.strip():
                yield json_text(line, piece["field"], f"{piece['path']} (record near byte {offset})")
            offset += len(line.encode("utf-8")) + 1
    elif kind == "parquet":
        import pyarrow.parquet as pq

        filesystem, local = storage.filesystem(piece["path"])
        with filesystem.open_input_file(local) as stream:
            parquet = pq.ParquetFile(stream)
            for group in piece["row_groups"]:
                yield from (row for row in parquet.read_row_group(group, columns=[piece["field"]]).column(0).to_pylist()
                            if row is not None)
    elif kind == "hf_stream":
        import datasets

        stream = datasets.load_dataset(piece["name"], piece["config"], split=piece["split"], streaming=True)
        for record in stream.shard(piece["shards"], piece["index"], contiguous=True):
            value = record.get(piece["field"])
            if isinstance(value, str):
                yield value


def row_text(row: str, packing: str) -> str | None:
    """What of a row gets tokenized: eos packing strips it (as `scaling.data.read_rows` does), raw
    packing keeps it and ends it with one newline; None for a row without text."""
    if not row.strip():
        return None
    if packing == "eos":
        return row.strip()
    return row if row.endswith("\n") else row + "\n"


# --- the Ray Data job ------------------------------------------------------------------------------

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


def _tokenize_pieces(batch: dict, *, tokenizer_box: list, tokenizer_sha: str, packing: str, eos_id: int | None,
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
            for row in _piece_rows(piece):
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


# --- build and publish -----------------------------------------------------------------------------


def shard_key(fingerprint: dict) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of everything that determines the tokens."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class _Plan:
    spec: ShardSpec
    source: _Source
    tokenizer: Any  # a transformers fast tokenizer (driver side)
    tokenizer_json: str
    tokenizer_sha: str
    key: str
    directory: str  # "<label>-<key>"
    fingerprint: dict


def _plan(spec: ShardSpec) -> _Plan:
    """Everything about a build that can be checked without reading the corpus (raises DataError/ModelError)."""
    from scaling.data import build_tokenizer
    from scaling.errors import ModelError

    tokenizer = build_tokenizer(spec.tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"tokenizer {spec.tokenizer!r} is not a fast (Rust) tokenizer; give one with a tokenizer.json")
    if spec.packing == "eos" and tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {spec.tokenizer!r} has no EOS token, which packing='eos' puts after every row; "
                        "use packing='raw' or a tokenizer with an EOS token")
    tokenizer_json = backend.to_str()
    tokenizer_sha = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    validation = spec.validation.strip()
    source = resolve_source(spec.source, spec.field, validation if validation in ("auto", "none") else "none")
    if validation not in ("auto", "none"):
        source = _with_validation(source, resolve_source(validation, spec.field, "none"))
    fingerprint = {"format": FORMAT_VERSION, "source": source.fingerprint,
                   "validation": source.validation.fingerprint if source.validation else None,
                   "tokenizer_sha256": tokenizer_sha,
                   "eos_id": tokenizer.eos_token_id if spec.packing == "eos" else None,
                   "packing": spec.packing, "max_rows": spec.max_rows}
    key = shard_key(fingerprint)
    return _Plan(spec, source, tokenizer, tokenizer_json, tokenizer_sha, key, f"{source.label}-{key}", fingerprint)


def _check_seq_len(seq_len: int | None) -> None:
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 2):
        raise DataError(f"seq_len={seq_len!r}: must be an integer >= 2 (tokens per training block)")


def find_token_shards(spec: ShardSpec, root: str) -> "TokenShards | None":
    """The published shards for this spec under `root`, or None (never built, or only partly)."""
    plan = _plan(spec)
    return _read_published(root, plan.directory)


def build_token_shards(spec: ShardSpec, root: str, *, seq_len: int | None = None, progress: Callable = say,
                       piece_bytes: int | None = None, part_tokens: int = PART_TOKENS,
                       progress_every_s: float = 10.0) -> "TokenShards":
    """Tokenize `spec`'s source into shards under `root` with Ray Data, or reuse the published ones.

    Every input is checked first (source readable and text, tokenizer loadable, packing, seq_len);
    nothing is written before that. Returns the published shards (possibly another writer's, when
    two build the same key at once: theirs and ours are identical)."""
    _check_seq_len(seq_len)
    plan = _plan(spec)
    published = _read_published(root, plan.directory)
    if published is not None:
        progress(f"reusing token shards {plan.key} ({published.total_tokens:,} tokens) "
                 f"in {storage.join(root, plan.directory)}")
        return published.check_seq_len(seq_len)

    import ray

    if not ray.is_initialized():
        ray.init()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    attempt = f"attempt-{int(time.time())}-{uuid.uuid4().hex[:8]}"
    attempt_uri = storage.join(root, plan.directory, attempt)
    started = time.perf_counter()
    try:
        streams = {"train": _run_stream(plan, plan.source, "train", attempt_uri, cpus, piece_bytes, part_tokens,
                                        progress, progress_every_s)}
        if plan.source.validation is not None:
            streams["val"] = _run_stream(plan, plan.source.validation, "val", attempt_uri, cpus, piece_bytes,
                                         part_tokens, progress, progress_every_s)
        _check_written(attempt_uri, streams)
        seconds = time.perf_counter() - started
        rows = sum(s["rows"] for s in streams.values())
        tokens = sum(s["tokens"] for s in streams.values())
        cpu_seconds = sum(s.pop("cpu_seconds") for s in streams.values())
        manifest = {
            "version": FORMAT_VERSION, "key": plan.key, "directory": plan.directory, "attempt": attempt,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "created_unix": time.time(),
            "spec": {"source": spec.source, "tokenizer": spec.tokenizer, "packing": spec.packing, "field": spec.field,
                     "max_rows": spec.max_rows, "validation": spec.validation},
            "source": plan.fingerprint["source"], "validation_source": plan.fingerprint["validation"],
            "tokenizer": {"name_or_path": spec.tokenizer, "sha256": plan.tokenizer_sha, "file": "tokenizer.json",
                          "vocab_size": len(plan.tokenizer), "eos_id": plan.tokenizer.eos_token_id,
                          "pad_id": _pad_id(plan.tokenizer)},
            "packing": spec.packing, "max_rows": spec.max_rows, "dtype": _dtype(plan),
            "rows": rows, "tokens": tokens, "splits": streams,
            "build": {"seconds": round(seconds, 3), "cpus": cpus, "rows_per_s": round(rows / seconds, 1),
                      "tokens_per_s": round(tokens / seconds, 1), "cpu_seconds": round(cpu_seconds, 3),
                      "tokens_per_cpu_s": round(tokens / max(cpu_seconds, 1e-9), 1),
                      "pieces": sum(s["pieces"] for s in streams.values())},
        }
        storage.write_text(storage.join(attempt_uri, "tokenizer.json"), plan.tokenizer_json)
        winner = _publish(root, plan.directory, attempt, manifest)
    except BaseException:
        storage.remove_tree(attempt_uri)
        raise
    if winner["attempt"] != attempt:
        storage.remove_tree(attempt_uri)  # another writer published first; nobody can have read ours
        progress(f"another writer published token shards {plan.key} first; using theirs")
    else:
        progress(f"token shards {plan.key}: {rows:,} rows, {tokens:,} tokens in {seconds:.1f} s "
                 f"({rows / seconds:,.0f} rows/s, {tokens / seconds:,.0f} tokens/s on {cpus} CPUs; "
                 f"{tokens / max(cpu_seconds, 1e-9):,.0f} tokens per CPU-second) -> {storage.join(root, plan.directory)}")
    _remove_stale(root, plan.directory, keep=winner["attempt"])
    return TokenShards(root, winner).check_seq_len(seq_len)


def _dtype(plan: _Plan) -> str:
    return "uint16" if len(plan.tokenizer) <= 1 << 16 else "uint32"


def _run_stream(plan: _Plan, source: _Source, stream: str, attempt_uri: str, cpus: int, piece_bytes, part_tokens,
                progress, progress_every_s) -> dict:
    """Tokenize one stream (train or val) piece by piece; with a row cap, in waves that stop once the cap is met."""
    import ray
    import ray.data

    from scaling.console import quiet_ray_data_console

    quiet_ray_data_console()
    pieces = plan_pieces(source, stream, cpus, piece_bytes)
    limit = plan.spec.max_rows if stream == "train" else None
    wave = len(pieces) if limit is None else max(4, 2 * cpus)
    box = [ray.put(plan.tokenizer_json)]  # in a list, so Ray Data hands the task the reference, not 2-10 MB per call
    kwargs = {"tokenizer_box": box, "tokenizer_sha": plan.tokenizer_sha, "packing": plan.spec.packing,
              "eos_id": plan.tokenizer.eos_token_id, "dtype": _dtype(plan), "attempt_uri": attempt_uri,
              "max_rows": limit, "part_tokens": part_tokens}
    context = ray.data.DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False  # our own progress lines instead
    parts: list[dict] = []
    started, last_print, done, rows, tokens, cpu = time.perf_counter(), time.perf_counter(), 0, 0, 0, 0.0
    progress(f"tokenizing {stream} split of {source.label}: {len(pieces)} piece(s) on {cpus} CPUs "
             f"({plan.spec.packing} packing)")
    try:
        for first in range(0, len(pieces), wave):
            chunk = pieces[first:first + wave]
            dataset = ray.data.from_items([{"piece_json": json.dumps(p)} for p in chunk],
                                          override_num_blocks=len(chunk))
            results = dataset.map_batches(_tokenize_pieces, batch_size=1, num_cpus=1, fn_kwargs=kwargs,
                                          batch_format="numpy")
            for row in results.iter_rows():
                if row["error"]:
                    raise DataError(str(row["error"]))
                cpu += float(row["cpu_seconds"])
                if int(row["part"]) >= 0:
                    parts.append({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
                    rows, tokens = rows + int(row["rows"]), tokens + int(row["tokens"])
                else:
                    done += 1
                if int(row["part"]) == 0:
                    done += 1
                now = time.perf_counter()
                if now - last_print >= progress_every_s:
                    last_print, elapsed = now, now - started
                    progress(f"{stream}: {done}/{len(pieces)} pieces, {rows:,} rows, {tokens:,} tokens "
                             f"({rows / elapsed:,.0f} rows/s, {tokens / elapsed:,.0f} tokens/s)")
            if limit is not None and rows >= limit:
                break
    finally:
        context.enable_progress_bars = bars
    parts.sort(key=lambda p: (p["piece"], p["part"]))
    if limit is not None:
        parts = _truncate_rows(parts, limit, attempt_uri)
    if not parts:
        raise DataError(f"text source {source.label!r} ({stream}) has no non-empty text; check its field/contents")
    offset = 0
    entries = []
    for p in parts:
        entries.append({"file": p["file"], "rows_file": p["rows_file"], "rows": int(p["rows"]),
                        "tokens": int(p["tokens"]), "offset": offset, "bytes": int(p["bytes"]),
                        "rows_bytes": int(p["rows_bytes"])})
        offset += int(p["tokens"])
    return {"rows": sum(e["rows"] for e in entries), "tokens": offset, "pieces": len({p["piece"] for p in parts}),
            "cpu_seconds": round(cpu, 3), "parts": entries}


def _truncate_rows(parts: list[dict], limit: int, attempt_uri: str) -> list[dict]:
    """Keep the first `limit` rows: later parts are deleted, the part holding the last row is used in part."""
    kept, rows = [], 0
    filesystem, base = storage.filesystem(attempt_uri)
    for p in parts:
        if rows >= limit:
            for name in (p["file"], p["rows_file"]):
                filesystem.delete_file(storage.join(base, name))
            continue
        if rows + p["rows"] > limit:
            ends = _load_npy(filesystem, storage.join(base, p["rows_file"]))
            p = {**p, "rows": limit - rows, "tokens": int(ends[limit - rows - 1])}
        kept.append(p)
        rows += p["rows"]
    return kept


def _check_written(attempt_uri: str, streams: dict) -> None:
    """Every part the tasks reported is where the driver can see it, with its size (shared storage)."""
    from pyarrow import fs

    filesystem, base = storage.filesystem(attempt_uri)
    found = {info.path[len(base) + 1:]: info.size for info in
             filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
             if info.type == fs.FileType.File}
    for stream in streams.values():
        for part in stream["parts"]:
            for name, size in ((part["file"], part["bytes"]), (part["rows_file"], part["rows_bytes"])):
                if found.get(name) != size:
                    raise DataError(
                        f"token shard {name} written by a Ray task is "
                        f"{'missing' if name not in found else 'truncated'} "
                        f"under {attempt_uri}: the storage is not shared between the nodes; use s3://... or a shared "
                        "filesystem mounted at the same path on every node")


def _publish(root: str, directory: str, attempt: str, manifest: dict) -> dict:
    """Make `manifest` the published one unless a valid one is there already; return the one in force."""
    from pyarrow import fs

    filesystem, base = storage.filesystem(storage.join(root, directory))
    final = storage.join(base, MANIFEST)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    existing = _read_published(root, directory)
    if existing is not None:
        return existing.manifest
    if isinstance(filesystem, fs.LocalFileSystem):
        staged = storage.join(base, f".{attempt}.manifest.json")
        Path(staged).write_text(text, encoding="utf-8")
        try:
            if Path(final).exists():  # an invalid manifest (older format, files gone): replace it
                os.replace(staged, final)
            else:
                os.link(staged, final)  # atomic, and fails when another writer published meanwhile
        except FileExistsError:
            pass
        finally:
            Path(staged).unlink(missing_ok=True)
    else:  # object stores: a PUT is atomic, readers see the old object or the new one
        with filesystem.open_output_stream(final) as out:
            out.write(text.encode())
    winner = _read_published(root, directory)
    if winner is None:
        raise DataError(f"token shards in {storage.join(root, directory)} could not be published (the manifest did not "
                        "read back); check that the storage is writable and consistent")
    return winner.manifest


def _remove_stale(root: str, directory: str, keep: str) -> None:
    """Delete attempt folders no manifest names once they are older than STALE_AFTER_S (a crashed writer's)."""
    from pyarrow import fs

    filesystem, base = storage.filesystem(storage.join(root, directory))
    try:
        entries = filesystem.get_file_info(fs.FileSelector(base, recursive=False))
    except Exception:  # noqa: BLE001 -- cleanup only
        return
    now = time.time()
    for entry in entries:
        name = entry.path.rsplit("/", 1)[-1]
        match = re.fullmatch(r"attempt-(\d+)-[0-9a-f]+", name)
        if match and name != keep and now - int(match.group(1)) > STALE_AFTER_S:
            storage.remove_tree(storage.join(root, directory, name))








def _load_npy(filesystem, path: str) -> np.ndarray:
    with filesystem.open_input_stream(path) as stream:
        return np.load(io.BytesIO(stream.read()), allow_pickle=False)


def _read_published(root: str, directory: str) -> "TokenShards | None":
    """The shards whose manifest is complete and whose files are all there with their sizes, else None."""
    from pyarrow import fs

    text = storage.read_text(storage.join(root, directory, MANIFEST))
    if text is None:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        return None
    if manifest.get("version") != FORMAT_VERSION or manifest.get("directory") != directory:
        return None
    filesystem, base = storage.filesystem(storage.join(root, directory, manifest["attempt"]))
    found = {info.path[len(base) + 1:]: info.size for info in
             filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
             if info.type == fs.FileType.File}
    for stream in manifest["splits"].values():
        for part in stream["parts"]:
            if found.get(part["file"]) != part["bytes"] or found.get(part["rows_file"]) != part["rows_bytes"]:
                return None
    if "tokenizer.json" not in found:
        return None
    return TokenShards(root, manifest)


# --- reading -------------------------------------------------------------------------------------


class TokenShards:
    """A published set of token shards: its manifest, blocks of any length, probe texts."""

    def __init__(self, root: str, manifest: dict, *, cache_dir: str | None = None):
        self.root, self.manifest, self.cache_dir = root, manifest, cache_dir

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def uri(self) -> str:
        """The folder holding the manifest."""
        return storage.join(self.root, self.manifest["directory"])

    @property
    def total_tokens(self) -> int:
        return int(self.manifest["tokens"])

    def tokens(self, split: str = "train") -> int:
        """Tokens of one stream ("train", or "val" when the source has its own validation split)."""
        return int(self.manifest["splits"][split]["tokens"]) if split in self.manifest["splits"] else 0

    @property
    def has_validation_split(self) -> bool:
        return "val" in self.manifest["splits"]

    def check_seq_len(self, seq_len: int | None) -> "TokenShards":
        """Self, or DataError when the training stream does not fill two blocks of seq_len."""
        _check_seq_len(seq_len)
        if seq_len is not None and self.tokens("train") // seq_len < 2:
            raise DataError(f"the text has {self.tokens('train'):,} tokens, fewer than two blocks of {seq_len}; "
                            "use more text or a smaller seq_len")
        return self

    def blocks(self, seq_len: int, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0) -> "TokenBlocks":
        """Training or validation blocks of `seq_len` tokens. With the source's own validation split,
        "train" is every block of the training stream and "val" every block of the validation stream;
        otherwise both come from the training stream, split like `scaling.data.split_train_val`
        (a permutation seeded by `seed`, the first round(val_fraction * n) blocks held out)."""
        _check_seq_len(seq_len)
        if split not in ("train", "val"):
            raise DataError(f"split={split!r}: use 'train' or 'val'")
        if self.has_validation_split:
            return TokenBlocks(self.root, self.manifest, split, seq_len, None, self.cache_dir)
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction={val_fraction}: must be in (0, 1)")
        return TokenBlocks(self.root, self.manifest, "train", seq_len, (split, float(val_fraction), int(seed)),
                           self.cache_dir)

    def read_tokens(self, start: int = 0, stop: int | None = None, split: str = "train") -> np.ndarray:
        """Tokens [start, stop) of a stream as int64 (inspection and tests; blocks are what training reads)."""
        stream = _Stream(self.root, self.manifest, split, self.cache_dir)
        stop = stream.tokens if stop is None else min(stop, stream.tokens)
        out = np.empty(max(0, stop - start), dtype=np.int64)
        stream.read(start, len(out), out)
        return out

    def probe_texts(self, repetitions: int, min_words: int | None = None) -> list[str]:
        """The reference protocol's texts (`scaling.data.sample_texts`) drawn from the shards: the
        start row from numpy default_rng(r) below 95% of the rows, then rows until >= min_words
        words. Only those rows are read and detokenized; with a lossless tokenizer (byte-level BPE)
        the texts equal the ones the old path drew from the rows in memory."""
        from scaling.data import DEFAULT_MIN_WORDS, sample_texts

        return sample_texts(_DecodedRows(_Stream(self.root, self.manifest, "train", self.cache_dir), self._tokenizer(),
                                         eos=self.manifest["packing"] == "eos"),
                            repetitions, DEFAULT_MIN_WORDS if min_words is None else min_words)

    def probe_ids(self, repetitions: int, max_length: int, min_words: int | None = None) -> list[np.ndarray]:
        """`probe_texts` tokenized again (no special tokens) and cut to `max_length`, as the old path did."""
        tokenizer = self._tokenizer()
        return [np.asarray(tokenizer.encode(text, add_special_tokens=False).ids[:max_length], dtype=np.int64)
                for text in self.probe_texts(repetitions, min_words)]

    def _tokenizer(self):
        from tokenizers import Tokenizer

        text = storage.read_text(storage.join(self.uri, self.manifest["attempt"], self.manifest["tokenizer"]["file"]))
        return Tokenizer.from_str(text)

    def describe(self) -> str:
        splits = ", ".join(f"{name} {s['tokens']:,} tokens / {s['rows']:,} rows"
                           for name, s in self.manifest["splits"].items())
        return f"token shards {self.key} ({self.manifest['packing']} packing, {self.manifest['dtype']}): {splits}"


class _Stream:
    """One token stream (the parts of a split, in order), memory-mapped part by part on first use."""

    def __init__(self, root: str, manifest: dict, split: str, cache_dir: str | None):
        self.base = storage.join(root, manifest["directory"], manifest["attempt"])
        self.parts = manifest["splits"][split]["parts"]
        self.key = manifest["key"]
        self.offsets = np.array([p["offset"] for p in self.parts] + [manifest["splits"][split]["tokens"]], np.int64)
        self.row_starts = np.cumsum([0] + [p["rows"] for p in self.parts])
        self.rows = int(self.row_starts[-1])
        self.tokens = int(self.offsets[-1])
        self.cache_dir = cache_dir
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def _array(self, index: int, which: str) -> np.ndarray:
        cached = self._maps.get((index, which))
        if cached is None:
            name = self.parts[index][which]
            cached = np.load(_local_copy(self.base, name, self.key, self.cache_dir), mmap_mode="r")
            self._maps[(index, which)] = cached
        return cached

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Tokens [start, start + length) of the stream into `out`, across part boundaries."""
        part = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while filled < length:
            begin = start + filled - self.offsets[part]
            take = int(min(length - filled, self.offsets[part + 1] - start - filled))
            if take > 0:
                out[filled:filled + take] = self._array(part, "file")[begin:begin + take]
                filled += take
            part += 1

    def row(self, index: int) -> np.ndarray:
        """Tokens of row `index` (with its EOS in eos packing)."""
        part = int(np.searchsorted(self.row_starts, index, side="right")) - 1
        local = index - int(self.row_starts[part])
        ends = self._array(part, "rows_file")
        begin = int(ends[local - 1]) if local else 0
        return np.asarray(self._array(part, "file")[begin:int(ends[local])], dtype=np.int64)


class _DecodedRows:
    """A stream's rows as text, decoded only when indexed (`scaling.data.sample_texts` reads a few)."""

    def __init__(self, stream: _Stream, tokenizer, eos: bool):
        self.stream, self.tokenizer, self.eos = stream, tokenizer, eos

    def __len__(self) -> int:
        return self.stream.rows

    def __getitem__(self, index: int) -> str:
        ids = self.stream.row(index)
        return self.tokenizer.decode((ids[:-1] if self.eos else ids).tolist(), skip_special_tokens=False).strip()


def _local_copy(base: str, name: str, key: str, cache_dir: str | None) -> str:
    """A local path for a shard file: the file itself on a local/shared filesystem, else (or when a
    cache folder is given) a copy in the node-local cache, fetched once and renamed into place."""
    from pyarrow import fs

    filesystem, path = storage.filesystem(storage.join(base, name))
    if cache_dir is None and isinstance(filesystem, fs.LocalFileSystem):
        return path
    target = Path(cache_dir or DEFAULT_CACHE) / key / base.rstrip("/").rsplit("/", 1)[-1] / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staged = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        with filesystem.open_input_stream(path) as stream, open(staged, "wb") as out:
            while chunk := stream.read(16 << 20):
                out.write(chunk)
        os.replace(staged, target)  # workers on one node fetching the same file: last rename wins, same bytes
    return str(target)


class TokenBlocks:
    """Blocks of `seq_len` tokens of one split, indexed like the old in-memory [n, seq_len] array:
    `blocks[int]` -> [seq_len], `blocks[int array or list]` -> [k, seq_len] int64 (read from the
    memory-mapped shards), `blocks[slice]` -> a lazy sub-view, `len`, `.shape`. Pickling keeps only
    where the shards are and which blocks are meant (the manifest travels, the tokens do not); the
    files are opened on first use in the process that reads."""

    def __init__(self, root: str, manifest: dict, stream: str, seq_len: int, heldout: tuple | None,
                 cache_dir: str | None = None, view: tuple[int, int, int] | None = None):
        self.root, self.manifest, self.stream, self.seq_len = root, manifest, stream, seq_len
        self.heldout, self.cache_dir = heldout, cache_dir
        n_global = int(manifest["splits"][stream]["tokens"]) // seq_len
        if n_global == 0:
            raise DataError(f"the text has {manifest['splits'][stream]['tokens']:,} tokens, fewer than one block "
                            f"of {seq_len}; use more text or a smaller seq_len")
        if heldout is not None:
            which, fraction, _ = heldout
            n_val = max(1, int(round(fraction * n_global)))
            if n_val >= n_global:
                raise DataError(f"only {n_global} blocks: too few to hold out validation; use more text")
            self._range = (n_val, n_global) if which == "train" else (0, n_val)
        else:
            self._range = (0, n_global)
        self.n_global = n_global
        self._view = view or (0, self._range[1] - self._range[0], 1)  # start, stop, step within the split
        self._stream: _Stream | None = None
        self._order: np.ndarray | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_stream"], state["_order"] = None, None
        return state

    def __len__(self) -> int:
        return len(range(*self._view))

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.seq_len)

    @property
    def dtype(self):
        return np.dtype(np.int64)

    @property
    def fingerprint(self) -> str:
        """Identifies these blocks (shards, seq_len, split rule and view) for run hashes."""
        text = json.dumps([self.manifest["key"], self.stream, self.seq_len, self.heldout, self._view])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def global_index(self, indices) -> np.ndarray:
        """Block numbers in the stream (before the train/val split) of these positions."""
        positions = np.asarray(indices, dtype=np.int64)
        n = len(self)
        if positions.size and (positions.min() < -n or positions.max() >= n):
            raise IndexError(f"block index out of range for {n} blocks")
        positions = np.where(positions < 0, positions + n, positions)
        start, _, step = self._view
        within = self._range[0] + start + positions * step
        if self.heldout is None:
            return within
        if self._order is None:
            self._order = np.random.default_rng(self.heldout[2]).permutation(self.n_global)
        return self._order[within]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            base_start, _, base_step = self._view
            sub = range(base_start, base_start + len(self) * base_step, base_step)[start:stop:step]
            view = TokenBlocks.__new__(TokenBlocks)
            view.__dict__.update(self.__getstate__())
            view._view = (sub.start, sub.stop, sub.step) if len(sub) else (0, 0, 1)
            return view
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        return self.read(self.global_index(key).reshape(-1))

    def read(self, global_blocks: np.ndarray) -> np.ndarray:
        """[k, seq_len] int64 of these global block numbers."""
        if self._stream is None:
            self._stream = _Stream(self.root, self.manifest, self.stream, self.cache_dir)
        stream, length = self._stream, self.seq_len
        out = np.empty((len(global_blocks), length), dtype=np.int64)
        starts = np.asarray(global_blocks, dtype=np.int64) * length
        parts = np.searchsorted(stream.offsets, starts, side="right") - 1
        inside = starts + length <= stream.offsets[parts + 1]
        for row, (start, part, whole) in enumerate(zip(starts.tolist(), parts.tolist(), inside.tolist())):
            if whole:  # the usual case: the block lies in one part
                begin = start - int(stream.offsets[part])
                out[row] = stream._array(part, "file")[begin:begin + length]
            else:
                stream.read(start, length, out[row])
        return out

    def __repr__(self) -> str:
        return (f"TokenBlocks({self.manifest['key']}, {self.stream}, seq_len={self.seq_len}, "
                f"heldout={self.heldout}, {len(self)} blocks)")

    def __array__(self, dtype=None, copy=None):
        array = self[np.arange(len(self))]
        return array if dtype is None else array.astype(dtype)


# --- what a study hands its workers -------------------------------------------------------------------


def _pad_id(tokenizer) -> int | None:
    """The tokenizer's padding token, else its EOS (how the authors' scripts pad GPT-2: active forgetting
    zeroes this row)."""
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else tokenizer.eos_token_id


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
    plan = _plan(spec)
    shards = _read_published(root, plan.directory)
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
    import math

    epochs = epochs_for_budget(budget_tokens, corpus_tokens)
    if epochs <= 1.0:
        return None
    return (f"{what} of {budget_tokens:,.0f} tokens is {epochs:.2f} epochs of the {corpus_tokens:,}-token corpus: "
            f"the data repeats {math.ceil(epochs)} times")
