"""Building token shards: a spec planned into a key (checked before any work), then one Ray Data job.

`build_token_shards` runs one Ray Data job over the pieces of the source (`scaling.shard_sources`);
each task tokenizes its piece and writes its parts to a fresh attempt folder (`scaling.shard_tasks`);
the driver checks that every part is visible, writes the manifest and publishes it
(`scaling.shard_store`). The key hashes what determines the tokens (source identity, tokenizer,
packing, row cap, validation source, format version) and not the block length, so studies with other
block lengths reuse the same shards. The token stream is the one the old driver-side path built
(`tests/old_data_path.py`, before its cut into blocks).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from scaling import storage
from scaling.console import quiet_ray_data_console, say
from scaling.data import PACKINGS, build_tokenizer
from scaling.errors import DataError, ModelError
from scaling.shard_sources import ResolvedSource, plan_pieces, resolve_source, with_validation
from scaling.shard_store import (FORMAT_VERSION, TokenShards, check_written, load_npy, publish, read_published,
                                 remove_stale, validate_seq_len)
from scaling.shard_tasks import PART_TOKENS, tokenize_pieces


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


def shard_key(fingerprint: dict) -> str:
    """16 hex digits of the SHA-256 of the canonical JSON of everything that determines the tokens."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardPlan:
    """A build decided before any text is read: the resolved source, the tokenizer, the key and folder."""

    spec: ShardSpec
    source: ResolvedSource
    tokenizer: Any  # a transformers fast tokenizer (driver side)
    tokenizer_json: str
    tokenizer_sha: str
    key: str
    directory: str  # "<label>-<key>"
    fingerprint: dict


def plan_shards(spec: ShardSpec) -> ShardPlan:
    """Everything about a build that can be checked without reading the corpus (raises DataError/ModelError)."""
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
        source = with_validation(source, resolve_source(validation, spec.field, "none"))
    fingerprint = {"format": FORMAT_VERSION, "source": source.fingerprint,
                   "validation": source.validation.fingerprint if source.validation else None,
                   "tokenizer_sha256": tokenizer_sha,
                   "eos_id": tokenizer.eos_token_id if spec.packing == "eos" else None,
                   "packing": spec.packing, "max_rows": spec.max_rows}
    key = shard_key(fingerprint)
    return ShardPlan(spec, source, tokenizer, tokenizer_json, tokenizer_sha, key, f"{source.label}-{key}", fingerprint)


def find_token_shards(spec: ShardSpec, root: str) -> TokenShards | None:
    """The published shards for this spec under `root`, or None (never built, or only partly)."""
    plan = plan_shards(spec)
    return read_published(root, plan.directory)


def build_token_shards(spec: ShardSpec, root: str, *, seq_len: int | None = None, progress: Callable = say,
                       piece_bytes: int | None = None, part_tokens: int = PART_TOKENS,
                       progress_every_s: float = 10.0) -> TokenShards:
    """Tokenize `spec`'s source into shards under `root` with Ray Data, or reuse the published ones.

    Every input is checked first (source readable and text, tokenizer loadable, packing, seq_len);
    nothing is written before that. Returns the published shards (possibly another writer's, when
    two build the same key at once: theirs and ours are identical)."""
    validate_seq_len(seq_len)
    plan = plan_shards(spec)
    published = read_published(root, plan.directory)
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
        check_written(attempt_uri, streams)
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
        winner = publish(root, plan.directory, attempt, manifest)
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
    remove_stale(root, plan.directory, keep=winner["attempt"])
    return TokenShards(root, winner).check_seq_len(seq_len)


def _dtype(plan: ShardPlan) -> str:
    return "uint16" if len(plan.tokenizer) <= 1 << 16 else "uint32"


def _run_stream(plan: ShardPlan, source: ResolvedSource, stream: str, attempt_uri: str, cpus: int, piece_bytes,
                part_tokens, progress, progress_every_s) -> dict:
    """Tokenize one stream (train or val) piece by piece; with a row cap, in waves that stop once the cap is met."""
    import ray
    import ray.data

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
            results = dataset.map_batches(tokenize_pieces, batch_size=1, num_cpus=1, fn_kwargs=kwargs,
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
            ends = load_npy(filesystem, storage.join(base, p["rows_file"]))
            p = {**p, "rows": limit - rows, "tokens": int(ends[limit - rows - 1])}
        kept.append(p)
        rows += p["rows"]
    return kept


def _pad_id(tokenizer) -> int | None:
    """The tokenizer's padding token, else its EOS (how the authors' scripts pad GPT-2: active forgetting
    zeroes this row)."""
    return tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else tokenizer.eos_token_id
