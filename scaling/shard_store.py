"""Token shards on storage: their layout, publishing them atomically, and reading them back.

Layout under a root (a local folder, a shared filesystem, or an s3:// URI):

    <root>/<label>-<key>/manifest.json                 written last: the only file a reader trusts
    <root>/<label>-<key>/attempt-<unix>-<id>/tokenizer.json
    <root>/<label>-<key>/attempt-<unix>-<id>/train/000007.000.tokens.npy  flat uint16/uint32 tokens
    <root>/<label>-<key>/attempt-<unix>-<id>/train/000007.000.rows.npy    uint32 end of each row
    <root>/<label>-<key>/attempt-<unix>-<id>/val/...   the source's own validation split, if any

Every writer fills its own attempt folder; publishing is one atomic step (a hard link of the
manifest on local filesystems, one object PUT on object stores). A folder without a manifest
naming it is unfinished and never read; the next publisher removes it once it is stale.

`TokenShards.blocks(seq_len, split)` gives a picklable, lazily memory-mapped view that a Ray Train
worker indexes like the old in-memory array (`blocks[indices] -> [k, seq_len] int64`): blocks of any
length are cut from the flat stream when read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
import uuid
from pathlib import Path

import numpy as np

from scaling import storage
from scaling.data import DEFAULT_MIN_WORDS, sample_texts
from scaling.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_CACHE = Path.home() / ".cache" / "dispersion-scaling" / "token-shards"
STALE_AFTER_S = 2 * 86400
"""An attempt folder no manifest names is removed by the next publisher once it is this old."""


def validate_seq_len(seq_len: int | None) -> None:
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 2):
        raise DataError(f"seq_len={seq_len!r}: must be an integer >= 2 (tokens per training block)")


def check_written(attempt_uri: str, streams: dict) -> None:
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


def publish(root: str, directory: str, attempt: str, manifest: dict) -> dict:
    """Make `manifest` the published one unless a valid one is there already; return the one in force."""
    from pyarrow import fs

    filesystem, base = storage.filesystem(storage.join(root, directory))
    final = storage.join(base, MANIFEST)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    existing = read_published(root, directory)
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
    winner = read_published(root, directory)
    if winner is None:
        raise DataError(f"token shards in {storage.join(root, directory)} could not be published (the manifest did not "
                        "read back); check that the storage is writable and consistent")
    return winner.manifest


def remove_stale(root: str, directory: str, keep: str) -> None:
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


def load_npy(filesystem, path: str) -> np.ndarray:
    with filesystem.open_input_stream(path) as stream:
        return np.load(io.BytesIO(stream.read()), allow_pickle=False)


def read_published(root: str, directory: str) -> "TokenShards | None":
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
        validate_seq_len(seq_len)
        if seq_len is not None and self.tokens("train") // seq_len < 2:
            raise DataError(f"the text has {self.tokens('train'):,} tokens, fewer than two blocks of {seq_len}; "
                            "use more text or a smaller seq_len")
        return self

    def blocks(self, seq_len: int, split: str = "train", *, val_fraction: float = 0.1, seed: int = 0) -> "TokenBlocks":
        """Training or validation blocks of `seq_len` tokens. With the source's own validation split,
        "train" is every block of the training stream and "val" every block of the validation stream;
        otherwise both come from the training stream, split as the old in-memory path did
        (`tests/old_data_path.py`: a permutation seeded by `seed`, the first round(val_fraction * n) blocks held out)."""
        validate_seq_len(seq_len)
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
        stream = TokenStream(self.root, self.manifest, split, self.cache_dir)
        stop = stream.tokens if stop is None else min(stop, stream.tokens)
        out = np.empty(max(0, stop - start), dtype=np.int64)
        stream.read(start, len(out), out)
        return out

    def probe_texts(self, repetitions: int, min_words: int | None = None) -> list[str]:
        """The reference protocol's texts (`scaling.data.sample_texts`) drawn from the shards: the
        start row from numpy default_rng(r) below 95% of the rows, then rows until >= min_words
        words. Only those rows are read and detokenized; with a lossless tokenizer (byte-level BPE)
        the texts equal the ones the old path drew from the rows in memory."""
        return sample_texts(_DecodedRows(TokenStream(self.root, self.manifest, "train", self.cache_dir), self._tokenizer(),
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


class TokenStream:
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

    def __init__(self, stream: TokenStream, tokenizer, eos: bool):
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
        self._stream: TokenStream | None = None
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
            self._stream = TokenStream(self.root, self.manifest, self.stream, self.cache_dir)
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
