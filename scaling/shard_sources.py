"""What a token-shard build reads: a text source resolved to its files and a fingerprint, cut into
pieces at row boundaries, and the rows of one piece.

A spec is parsed by `scaling.data.parse_text_source`, the one parser of text sources (the study's
config, its dry run, `condense` and the shard builder accept and refuse the same specs). Resolving
then reads only a stat and a few bytes of each file (binary, non-UTF-8, blank or column-less input is
refused before any work); the fingerprint is what the shards' key hashes. A piece is a byte range of
a .txt/.jsonl file cut at a line end, a run of parquet row groups, a shard of a streamed Hugging Face
dataset or a row range of the bundled text: a Ray Data task reads one (`piece_rows`), and the pieces
in order give the source's rows in order.
"""

from __future__ import annotations

import codecs
import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from scaling import storage
from scaling.data import bundled_rows, json_text, parse_text_source, pick_text_files
from scaling.errors import DataError

MIN_PIECE_BYTES, MAX_PIECE_BYTES = 1 << 20, 64 << 20
PIECES_PER_CPU = 4  # several pieces per CPU, so one slow piece does not leave the others idle
CHECK_BYTES = 1 << 16  # how much of a text file is read up front to reject binary or empty input


@dataclass(frozen=True)
class ResolvedSource:
    """A text source resolved to the files (or dataset) that make it up."""

    kind: str  # bundled | lines | parquet | hf_stream
    label: str
    fingerprint: dict
    files: tuple = ()  # (path, size) for lines/parquet
    field: str = "text"
    jsonl: bool = False
    hf: tuple = ()  # (name, config, split) for hf_stream
    validation: "ResolvedSource | None" = None  # the source's own validation split (hf), when there is one


def _label(text: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-.")[:40] or "source"


def resolve_source(spec: str, field: str = "text", validation: str = "auto") -> ResolvedSource:
    """A source spec, as `scaling.data.parse_text_source` reads it (the one parser: shards are training data,
    so `wikitext` is the raw version), resolved to its files and a fingerprint (stat and a few bytes only:
    no text is read here)."""
    parsed = parse_text_source(spec, training=True)
    if parsed.kind == "bundled":
        rows = bundled_rows()  # ~0.5 MB that ships with Python: its content is its identity
        digest = hashlib.sha256("\n\x00".join(rows).encode()).hexdigest()[:16]
        return ResolvedSource("bundled", "bundled", {"kind": "bundled", "sha256": digest, "rows": len(rows)})
    if parsed.kind == "hf":
        return _resolve_hf(parsed.name, parsed.config, parsed.split, parsed.field, validation)
    return _resolve_files(spec.strip(), field)  # the spec as written: it names the shards' folder


def _resolve_files(spec: str, field: str) -> ResolvedSource:
    from pyarrow import fs

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
        files = pick_text_files(spec, [e for e in entries if e.type == fs.FileType.File], lambda e: e.path,
                                folder=True)
    else:
        files = pick_text_files(spec, [info], lambda e: e.path, folder=False)
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
        return ResolvedSource("parquet", _label(label), fingerprint, entries, field)
    for file_path, size in entries[:1] + entries[-1:]:
        _check_text_head(file_path, size, field if suffix == ".jsonl" else None)
    return ResolvedSource("lines", _label(label), fingerprint, entries, field, jsonl=suffix == ".jsonl")


def _check_text_head(path: str, size: int, field: str | None) -> None:
    """Reject a binary, non-UTF-8 or blank file (and, for jsonl, a bad first record) before any work."""
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


def _resolve_hf(name: str, config: str | None, split: str, field: str, validation: str) -> ResolvedSource:
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

    def one(split_name: str) -> ResolvedSource:
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
            return ResolvedSource("parquet", label, {**base, "files": stamp}, tuple(infos), field)
        return ResolvedSource("hf_stream", label, {**base, "files": files}, field=field,
                       hf=(name, config, split_name))

    resolved = one(split)
    if validation == "auto" and split == "train" and "validation" in splits:
        resolved = with_validation(resolved, one("validation"))
    return resolved


def with_validation(source: ResolvedSource, validation: ResolvedSource | None) -> ResolvedSource:
    return replace(source, validation=validation)


def plan_pieces(source: ResolvedSource, split: str, cpus: int, piece_bytes: int | None = None) -> list[dict]:
    """Cut a source into pieces at row boundaries, in source order (piece i before piece i + 1)."""
    if source.kind == "bundled":
        n = len(bundled_rows())
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


def _parquet_pieces(source: ResolvedSource, cpus: int, piece_bytes: int | None) -> list[dict]:
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


def piece_rows(piece: dict) -> Iterator[str]:
    """The rows of one piece with text in them, unstripped, in source order."""
    kind = piece["kind"]
    if kind == "bundled":
        yield from bundled_rows()[piece["start"]:piece["stop"]]
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
