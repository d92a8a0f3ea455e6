"""Token shards (`scaling.shards` and its `shard_*` modules): tokenized once with Ray Data on the session's real local Ray,
published atomically, reused, and read back as the same blocks the old driver path packed."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from old_data_path import pack_blocks, split_train_val

from scaling.data import sample_texts
from scaling.errors import DataError, DispersionScalingError
from scaling.shards import (
    ShardSpec,
    TokenShards,
    budget_warning,
    build_study_blocks,
    build_token_shards,
    describe_corpus,
    epochs_for_budget,
    find_token_shards,
)

ROWS = ["The quick brown fox jumps over the lazy dog.", "", "  Indented line with spaces  ",
        "Second paragraph: numbers 1, 2, 3 and symbols ()[]{}.", "\t", "A last line without end"]


def old_stream(tokenizer, rows, eos=True):
    """The old path's token stream: stripped non-empty rows, each followed by EOS."""
    rows = [r.strip() for r in rows if r.strip()]
    ids = tokenizer(rows, add_special_tokens=False)["input_ids"]
    return np.array([t for row in ids for t in (*row, *([tokenizer.eos_token_id] if eos else []))], dtype=np.int64)


def attempts(shards) -> list[str]:
    return sorted(p.name for p in Path(shards.uri).iterdir() if p.name.startswith("attempt-"))


@pytest.fixture(scope="module")
def bundled(ray_session, tokenizer_dir, tmp_path_factory):
    """Shards of the whole bundled text, built once for the module, and the build's progress lines."""
    root = tmp_path_factory.mktemp("shards")
    lines = []
    shards = build_token_shards(ShardSpec("bundled", str(tokenizer_dir)), str(root), seq_len=64,
                                progress=lines.append)
    return shards, root, lines


def test_bundled_eos_gives_the_old_blocks_split_order_and_probes(bundled, tokenizer, bundled_rows, ray_session):
    from scaling.train import DataOrder

    shards, _, lines = bundled
    old = pack_blocks(tokenizer(bundled_rows, add_special_tokens=False)["input_ids"], 64, tokenizer.eos_token_id)
    old_train, old_val = split_train_val(old, 0.1, seed=0)
    train, val = shards.blocks(64, "train"), shards.blocks(64, "val")
    assert train.shape == old_train.shape and val.shape == old_val.shape
    assert np.array_equal(train[np.arange(len(train))], old_train)
    assert np.array_equal(np.asarray(val), old_val)
    assert shards.manifest["splits"]["train"]["pieces"] > 1  # several tasks, yet one stream
    order = DataOrder(len(train), 8, seed=3)  # what a worker asks for, step by step
    for step in (0, 1, len(train) // 8 + 2):
        assert np.array_equal(train[order.batch(step)], old_train[order.batch(step)])
    assert np.array_equal(val[5], old_val[5]) and np.array_equal(val[-1], old_val[-1])
    assert np.array_equal(np.asarray(val[1::3]), old_val[1::3])
    assert shards.probe_texts(3) == sample_texts(bundled_rows, 3)
    expected = [np.asarray(tokenizer(t, add_special_tokens=False)["input_ids"][:32])
                for t in sample_texts(bundled_rows, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(shards.probe_ids(2, 32), expected))
    assert any("tokens/s" in line and "rows/s" in line for line in lines)

    # A worker gets a small picklable view and reads its own blocks from the shards.
    assert len(pickle.dumps(train)) < 20_000
    indices = order.batch(1)
    remote = ray_session.remote(num_cpus=0)(lambda blocks, idx: blocks[idx])
    assert np.array_equal(ray_session.get(remote.remote(train, indices)), old_train[indices])


def test_second_build_reuses_the_shards(bundled, tokenizer_dir):
    shards, root, _ = bundled
    lines = []
    again = build_token_shards(ShardSpec("bundled", str(tokenizer_dir)), str(root), seq_len=128, progress=lines.append)
    assert lines == [f"reusing token shards {shards.key} ({shards.total_tokens:,} tokens) in {shards.uri}"]
    assert again.manifest["created_unix"] == shards.manifest["created_unix"]
    assert attempts(again) == [shards.manifest["attempt"]]
    found = find_token_shards(ShardSpec("bundled", str(tokenizer_dir)), str(root))
    assert found is not None and found.key == shards.key
    assert f"{shards.total_tokens:,} tokens" in describe_corpus(ShardSpec("bundled", str(tokenizer_dir)), str(root))
    assert "not tokenized yet" in describe_corpus(ShardSpec("bundled", str(tokenizer_dir), packing="raw"), str(root))


def test_study_blocks_replace_prepare_data(bundled, tokenizer, tokenizer_dir, bundled_rows):
    _, root, _ = bundled
    lines = []
    data = build_study_blocks(ShardSpec("bundled", str(tokenizer_dir)), str(root), seq_len=64, val_fraction=0.1,
                              probe_texts=2, probe_max_length=32, progress=lines.append)
    assert lines[0].startswith("reusing token shards")
    old = pack_blocks(tokenizer(bundled_rows, add_special_tokens=False)["input_ids"], 64, tokenizer.eos_token_id)
    old_train, old_val = split_train_val(old, 0.1, seed=0)
    assert np.array_equal(np.asarray(data.train), old_train) and np.array_equal(np.asarray(data.val), old_val)
    assert data.vocab_size == len(tokenizer) and len(data.probe_ids) == 2
    other = build_study_blocks(ShardSpec("bundled", str(tokenizer_dir)), str(root), seq_len=32, val_fraction=0.1,
                               probe_texts=2, probe_max_length=32, progress=lines.append)
    assert other.fingerprint != data.fingerprint  # same shards, other blocks


def test_row_cap_matches_the_old_path(ray_session, tokenizer, tokenizer_dir, bundled_rows, tmp_path):
    shards = build_token_shards(ShardSpec("bundled", str(tokenizer_dir), max_rows=600), str(tmp_path), seq_len=32,
                                progress=lambda _: None)
    old = pack_blocks(tokenizer(bundled_rows[:600], add_special_tokens=False)["input_ids"], 32, tokenizer.eos_token_id)
    old_train, old_val = split_train_val(old, 0.1, seed=0)
    assert shards.manifest["rows"] == 600
    assert np.array_equal(np.asarray(shards.blocks(32, "train")), old_train)
    assert np.array_equal(np.asarray(shards.blocks(32, "val")), old_val)
    assert shards.probe_texts(2) == sample_texts(bundled_rows[:600], 2)


def test_raw_packing_keeps_newlines_and_adds_no_eos(ray_session, tokenizer, tokenizer_dir, tmp_path):
    source = tmp_path / "tiny.txt"
    source.write_text("\n".join(ROWS) + "\n", encoding="utf-8")
    raw = build_token_shards(ShardSpec(str(source), str(tokenizer_dir), packing="raw"), str(tmp_path / "s"),
                             progress=lambda _: None)
    texts = ["The quick brown fox jumps over the lazy dog.\n", "  Indented line with spaces  \n",
             "Second paragraph: numbers 1, 2, 3 and symbols ()[]{}.\n", "A last line without end\n"]
    expected = np.array([t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]])
    assert tokenizer.eos_token_id not in expected
    assert np.array_equal(raw.read_tokens(), expected)
    assert raw.manifest["rows"] == 4 and raw.manifest["packing"] == "raw"
    eos = build_token_shards(ShardSpec(str(source), str(tokenizer_dir)), str(tmp_path / "s"), progress=lambda _: None)
    assert eos.key != raw.key
    assert np.array_equal(eos.read_tokens(), old_stream(tokenizer, ROWS))
    n = len(expected) // 4  # blocks are cut across the flat stream, the tail dropped, then split
    grid = expected[: n * 4].reshape(n, 4)
    train, val = raw.blocks(4, "train", val_fraction=0.25), raw.blocks(4, "val", val_fraction=0.25)
    assert len(val) == round(0.25 * n) and len(train) + len(val) == n
    assert np.array_equal(np.asarray(train), grid[train.global_index(np.arange(len(train)))])
    used = [*train.global_index(np.arange(len(train))), *val.global_index(np.arange(len(val)))]
    assert sorted(used) == list(range(n))


def test_txt_jsonl_parquet_and_folders_give_one_stream(ray_session, tokenizer, tokenizer_dir, bundled_rows, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.replace("\n", " ") for r in bundled_rows[:400]]
    (tmp_path / "c.txt").write_text("\n".join(rows), encoding="utf-8")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": r}) + "\n" for r in rows), encoding="utf-8")
    pq.write_table(pa.table({"body": rows, "n": list(range(len(rows)))}), tmp_path / "c.parquet", row_group_size=50)
    (tmp_path / "parts").mkdir()
    for i, chunk in enumerate((rows[:150], rows[150:])):
        (tmp_path / "parts" / f"{i}.jsonl").write_text("".join(json.dumps({"body": r}) + "\n" for r in chunk))
    expected = old_stream(tokenizer, rows)
    for name in ("c.txt", "c.jsonl", "c.parquet", "parts"):
        shards = build_token_shards(ShardSpec(str(tmp_path / name), str(tokenizer_dir), field="body"),
                                    str(tmp_path / "shards"), piece_bytes=8_000, progress=lambda _: None)
        assert shards.manifest["splits"]["train"]["pieces"] > 2, name  # small pieces: many tasks
        assert np.array_equal(shards.read_tokens(), expected), name
        assert shards.manifest["rows"] == len(rows)


def test_separate_validation_source_and_cached_copies(ray_session, tokenizer, tokenizer_dir, bundled_rows, tmp_path):
    train_rows, val_rows = bundled_rows[:300], bundled_rows[300:400]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in train_rows))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in val_rows))
    shards = build_token_shards(ShardSpec(str(tmp_path / "train.jsonl"), str(tokenizer_dir),
                                          validation=str(tmp_path / "val.jsonl")), str(tmp_path / "s"),
                                progress=lambda _: None)
    assert shards.has_validation_split
    old_train = pack_blocks(tokenizer(train_rows, add_special_tokens=False)["input_ids"], 16, tokenizer.eos_token_id)
    old_val = pack_blocks(tokenizer(val_rows, add_special_tokens=False)["input_ids"], 16, tokenizer.eos_token_id)
    assert np.array_equal(np.asarray(shards.blocks(16, "train")), old_train)  # every train block, no hold-out
    assert np.array_equal(np.asarray(shards.blocks(16, "val")), old_val)
    # Storage that is not a local filesystem is read through a node-local cache; forced here with cache_dir.
    cached = TokenShards(shards.root, shards.manifest, cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(np.asarray(cached.blocks(16, "val")), old_val)
    assert list((tmp_path / "cache").rglob("*.tokens.npy"))


def test_partial_writes_are_never_reused(ray_session, tokenizer, tokenizer_dir, tmp_path):
    source = tmp_path / "c.txt"
    source.write_text("\n".join(ROWS * 20), encoding="utf-8")
    spec, root = ShardSpec(str(source), str(tokenizer_dir)), str(tmp_path / "s")
    first = build_token_shards(spec, root, progress=lambda _: None)
    base = Path(first.uri)
    stale = base / "attempt-1000-deadbeef"  # a writer that crashed long ago: removed at the next publish
    fresh = base / f"attempt-{int(time.time())}-0badf00d"  # one that may still be running: left alone
    for leftover in (stale, fresh):
        (leftover / "train").mkdir(parents=True)
        (leftover / "train" / "000000.000.tokens.npy").write_bytes(b"junk")

    (base / "manifest.json").unlink()  # a missing manifest: the folder is not finished
    assert find_token_shards(spec, root) is None
    second = build_token_shards(spec, root, progress=lambda _: None)
    assert second.manifest["attempt"] not in (first.manifest["attempt"], fresh.name)
    assert not stale.exists() and fresh.exists()
    assert np.array_equal(second.read_tokens(), old_stream(tokenizer, ROWS * 20))

    part = base / second.manifest["attempt"] / second.manifest["splits"]["train"]["parts"][0]["file"]
    part.write_bytes(part.read_bytes()[:-2])  # a truncated shard under a manifest: not trusted either
    lines = []
    third = build_token_shards(spec, root, progress=lines.append)
    assert not any("reusing" in line for line in lines)
    assert third.manifest["attempt"] != second.manifest["attempt"]
    assert np.array_equal(third.read_tokens(), old_stream(tokenizer, ROWS * 20))


def test_concurrent_writers_of_one_key_agree(ray_session, tokenizer, tokenizer_dir, bundled_rows, tmp_path):
    source = tmp_path / "c.txt"
    source.write_text("\n".join(r.replace("\n", " ") for r in bundled_rows[:500]), encoding="utf-8")
    spec, root = ShardSpec(str(source), str(tokenizer_dir)), str(tmp_path / "s")
    results, errors = [], []

    def build():
        try:
            results.append(build_token_shards(spec, root, piece_bytes=10_000, progress=lambda _: None))
        except Exception as exc:  # noqa: BLE001 -- surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2
    assert results[0].manifest == results[1].manifest
    assert attempts(results[0]) == [results[0].manifest["attempt"]]  # the loser removed its own folder
    assert not [p for p in Path(results[0].uri).iterdir() if p.name.endswith(".manifest.json")]
    rows = [r.replace("\n", " ") for r in bundled_rows[:500]]
    assert np.array_equal(results[0].read_tokens(), old_stream(tokenizer, rows))


def test_local_hf_dataset_folders(ray_session, tokenizer, tokenizer_dir, bundled_rows, tmp_path):
    """`hf:` sources resolved by `datasets` offline from local folders: parquet files are read by row
    groups (with the dataset's own validation split), other files through streaming shards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.replace("\n", " ") for r in bundled_rows[:300]]
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": rows[:200]}), tmp_path / "pq" / "train-00000.parquet", row_group_size=40)
    pq.write_table(pa.table({"text": rows[200:]}), tmp_path / "pq" / "validation-00000.parquet")
    shards = build_token_shards(ShardSpec(f"hf:{tmp_path / 'pq'}:train:text", str(tokenizer_dir)),
                                str(tmp_path / "s"), piece_bytes=5_000, progress=lambda _: None)
    assert shards.manifest["splits"]["train"]["pieces"] > 1 and shards.has_validation_split
    assert np.array_equal(shards.read_tokens(), old_stream(tokenizer, rows[:200]))
    assert np.array_equal(shards.read_tokens(split="val"), old_stream(tokenizer, rows[200:]))

    (tmp_path / "js").mkdir()
    for i, chunk in enumerate((rows[:120], rows[120:])):
        (tmp_path / "js" / f"train_{i}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in chunk))
    streamed = build_token_shards(ShardSpec(f"hf:{tmp_path / 'js'}:train:text", str(tokenizer_dir)),
                                  str(tmp_path / "s"), progress=lambda _: None)
    assert streamed.manifest["splits"]["train"]["pieces"] == 2 and not streamed.has_validation_split
    assert np.array_equal(streamed.read_tokens(), old_stream(tokenizer, rows))


def test_bad_inputs_fail_in_one_line_before_anything_is_written(tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("  \n\n\t\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"title": "no text field"}\n{"text": "ok"}\n')
    (tmp_path / "other.csv").write_text("a,b\n")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    (tmp_path / "good.txt").write_text("some text\n")
    root = tmp_path / "never-written"
    cases = {
        "empty.txt": "is empty", "blank.txt": "no text", "binary.txt": "binary", "latin1.txt": "not UTF-8",
        "bad.jsonl": "string field 'text'", "other.csv": ".txt, .jsonl or .parquet",
        "nocol.parquet": "no column 'text'",
        "missing.txt": "no such file",
    }
    for name, message in cases.items():
        with pytest.raises(DataError, match=message) as info:
            build_token_shards(ShardSpec(str(tmp_path / name), str(tokenizer_dir)), str(root))
        assert "\n" not in str(info.value), name
    for seq_len in (1, 0):
        with pytest.raises(DataError, match="seq_len"):
            build_token_shards(ShardSpec(str(tmp_path / "good.txt"), str(tokenizer_dir)), str(root), seq_len=seq_len)
    with pytest.raises(DataError, match="packing"):
        ShardSpec(str(tmp_path / "good.txt"), str(tokenizer_dir), packing="concat")
    with pytest.raises(DataError, match="max_rows"):
        ShardSpec(str(tmp_path / "good.txt"), str(tokenizer_dir), max_rows=0)
    with pytest.raises(DispersionScalingError, match="cannot load tokenizer"):
        build_token_shards(ShardSpec(str(tmp_path / "good.txt"), str(tmp_path / "no-tokenizer")), str(root))
    assert not root.exists()


def test_budget_helpers():
    assert epochs_for_budget(3_000, 1_000) == 3.0
    assert budget_warning(900, 1_000) is None
    warning = budget_warning(2_500, 1_000, what="rung tiny-165K's budget")
    assert warning == ("rung tiny-165K's budget of 2,500 tokens is 2.50 epochs of the 1,000-token corpus: "
                       "the data repeats 3 times")
    with pytest.raises(DataError, match="no tokens"):
        epochs_for_budget(10, 0)


@pytest.mark.slow
def test_tens_of_megabytes_tokenized_once(ray_session, tokenizer, tokenizer_dir, bundled_rows, tmp_path):
    """A generated ~24 MB corpus: several pieces, every row accounted for, rows at both ends exact, reused."""
    rng = np.random.default_rng(0)
    words = np.array(" ".join(bundled_rows).split())
    source = tmp_path / "big.txt"
    with open(source, "w", encoding="utf-8") as out:
        while out.tell() < 24 << 20:
            lengths = rng.integers(5, 120, 2000)
            out.write("\n".join(" ".join(words[rng.integers(0, len(words), n)]) for n in lengths) + "\n")
    lines = source.read_text(encoding="utf-8").splitlines()
    spec, root = ShardSpec(str(source), str(tokenizer_dir)), str(tmp_path / "s")
    progress = []
    shards = build_token_shards(spec, root, seq_len=512, progress=progress.append, piece_bytes=3 << 20)
    assert shards.manifest["splits"]["train"]["pieces"] >= 8
    assert shards.manifest["rows"] == len(lines)
    from scaling.shard_store import TokenStream

    stream = TokenStream(shards.root, shards.manifest, "train", None)
    for index in [*range(50), *range(len(lines) - 50, len(lines)), *rng.integers(0, len(lines), 50)]:
        expected = tokenizer(lines[index].strip(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert stream.row(int(index)).tolist() == expected
    train = shards.blocks(512)
    assert len(train) + len(shards.blocks(512, "val")) == shards.total_tokens // 512
    started = time.perf_counter()
    again = build_token_shards(spec, root, seq_len=512, progress=progress.append)
    assert time.perf_counter() - started < 5 and again.manifest == shards.manifest
    assert progress[-1].startswith(f"reusing token shards {shards.key}")
    assert os.path.getsize(source) > 20 << 20
