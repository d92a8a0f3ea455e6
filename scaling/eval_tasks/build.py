"""Build the bundled cloze task's data from the bundled corpus, deterministically.

    python -m scaling.eval_tasks.build            # rewrite bundled_cloze.jsonl + manifest
    python -m scaling.eval_tasks.build --check    # exit 1 if the shipped files differ

Each document is a passage of prose from the corpus cut just before a lowercase word; the
model must pick that word among 4 choices. The 3 distractors are corpus words of about the
same frequency (within +-BAND frequency ranks), so a model that only knows word frequencies
scores about 25% and a higher score needs the context. Every choice (target position,
distractors, order of choices, split) comes from a SHA-256 of fixed strings, not from a
random generator, so the data is the same on every machine and Python whose
`pydoc_data.topics` is the same; the manifest records the corpus' fingerprint so a check
can tell "the corpus changed" from "the generator changed".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from collections import Counter
from pathlib import Path

from scaling.eval_tasks import TASKS_DIR

GENERATOR_VERSION = 2
DATA_FILE = "bundled_cloze.jsonl"
MANIFEST_FILE = "bundled_cloze.manifest.json"
SPLIT_SIZES = {"train": 40, "validation": 160, "test": 320}
"""Documents per split; `train` only feeds few-shot examples."""
NUM_CHOICES = 4
MIN_CONTEXT_WORDS = 12
MAX_CONTEXT_WORDS = 32
MIN_COUNT = 3
"""A word must occur this often in the corpus to be a target or a distractor."""
BAND = 40
"""Distractors come from the words within this many frequency ranks of the target."""
MIN_PROSE_SHARE = 0.8
"""Share of a paragraph's tokens that must look like words (keeps code listings out)."""

_CANDIDATE = re.compile(r"[a-z]{3,}")
_WORDLIKE = re.compile(r"[\"'(]?[A-Za-z][a-z'-]*[\"')]?[,.;:]?")


def _hash(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def corpus_fingerprint(rows: list[str]) -> str:
    """SHA-256 of the corpus rows, to tell whether a regeneration can match the shipped data."""
    return hashlib.sha256("\n\n".join(rows).encode("utf-8")).hexdigest()


def _is_prose(words: list[str]) -> bool:
    if len(words) < MIN_CONTEXT_WORDS + 4:
        return False
    return sum(bool(_WORDLIKE.fullmatch(w)) for w in words) >= MIN_PROSE_SHARE * len(words)


def build_cloze_docs(rows: list[str]) -> dict[str, list[dict]]:
    """Split name -> documents `{"context", "choices", "gold"}`, in corpus order within a split."""
    token_rows = [row.split() for row in rows]
    counts = Counter(w for words in token_rows for w in words if _CANDIDATE.fullmatch(w))
    vocab = sorted((w for w, c in counts.items() if c >= MIN_COUNT), key=lambda w: (-counts[w], w))
    rank = {w: i for i, w in enumerate(vocab)}

    docs = []  # (row index, doc)
    seen = set()  # the corpus repeats paragraphs across topics: one document per distinct text
    for index, words in enumerate(token_rows):
        if not _is_prose(words) or " ".join(words) in seen:
            continue
        seen.add(" ".join(words))
        positions = [i for i in range(MIN_CONTEXT_WORDS, len(words)) if words[i] in rank]
        if not positions:
            continue
        at = min(positions, key=lambda i: _hash("position", index, i))
        target = words[at]
        low = max(0, rank[target] - BAND)
        band = [w for w in vocab[low:rank[target] + BAND + 1] if w != target]
        distractors = sorted(band, key=lambda w: _hash("distractor", index, w))[:NUM_CHOICES - 1]
        choices = sorted([target, *distractors], key=lambda w: _hash("order", index, w))
        context = " ".join(words[max(0, at - MAX_CONTEXT_WORDS):at])
        if context in seen:
            continue
        seen.add(context)
        docs.append((index, {"context": context, "choices": choices, "gold": choices.index(target)}))

    needed = sum(SPLIT_SIZES.values())
    if len(docs) < needed:
        raise ValueError(f"the corpus gives only {len(docs)} cloze documents; {needed} are needed")
    shuffled = sorted(docs, key=lambda item: _hash("split", item[0]))
    splits, start = {}, 0
    for name, size in SPLIT_SIZES.items():
        chosen = sorted(shuffled[start:start + size], key=lambda item: item[0])
        splits[name] = [doc for _, doc in chosen]
        start += size
    return splits


def render_data(splits: dict[str, list[dict]]) -> str:
    """The JSONL text: one document per line with its split, splits in SPLIT_SIZES order."""
    lines = [json.dumps({"split": name, **doc}, ensure_ascii=True, sort_keys=True)
             for name in SPLIT_SIZES for doc in splits[name]]
    return "\n".join(lines) + "\n"


def render_manifest(rows: list[str], data: str) -> str:
    manifest = {
        "generator": "scaling.eval_tasks.build",
        "generator_version": GENERATOR_VERSION,
        "corpus": "pydoc_data.topics (scaling.data bundled rows)",
        "python": ".".join(map(str, sys.version_info[:3])),
        "corpus_sha256": corpus_fingerprint(rows),
        "data_sha256": hashlib.sha256(data.encode("utf-8")).hexdigest(),
        "docs": dict(SPLIT_SIZES),
    }
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def regenerate(rows: list[str] | None = None) -> tuple[str, str]:
    """(data, manifest) texts built from `rows` (default: the bundled corpus)."""
    if rows is None:
        from scaling.data import parse_text_source, read_rows

        rows = read_rows(parse_text_source("bundled"))
    data = render_data(build_cloze_docs(rows))
    return data, render_manifest(rows, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scaling.eval_tasks.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    parser.add_argument("--out", default=str(TASKS_DIR), help="folder to write to (default: the package's)")
    args = parser.parse_args(argv)
    data, manifest = regenerate()
    out = Path(args.out)
    if args.check:
        same = (out / DATA_FILE).read_text(encoding="utf-8") == data
        print(f"{out / DATA_FILE}: {'matches' if same else 'DIFFERS FROM'} a regeneration")
        return 0 if same else 1
    out.mkdir(parents=True, exist_ok=True)
    (out / DATA_FILE).write_text(data, encoding="utf-8")
    (out / MANIFEST_FILE).write_text(manifest, encoding="utf-8")
    print(f"wrote {out / DATA_FILE} ({len(data.encode()):,} bytes) and {out / MANIFEST_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
