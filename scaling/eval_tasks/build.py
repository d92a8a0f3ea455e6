"""Build the bundled cloze task's data from the bundled corpus, deterministically.

    python -m scaling.eval_tasks.build            # rewrite bundled_cloze.jsonl + manifest
    python -m scaling.eval_tasks.build --check    # exit 1 if the shipped files differ

Each document is a passage of prose from the corpus cut just before a lowercase word; the
model must pick that word among 4 choices (chance: 25%). The 3 distractors are corpus words of
about the same frequency (within +-BAND frequency ranks), so a model that only knows word
frequencies scores about 25% and a higher score needs the context.

No leak into training: the validation and test passages come only from the paragraphs that
`scaling.data.bundled_heldout` holds out of the `bundled` training source (one rule, read by
both sides), and a passage whose context also occurs in a training paragraph (the corpus repeats
sentences across topics) is dropped. The few-shot `train` split comes from training paragraphs:
a model may have seen its examples, as with any task's training split.

Every choice (target position, distractors, order of choices, split) comes from a SHA-256 of
fixed strings, not from a random generator, so the data is the same on every machine and Python
whose `pydoc_data.topics` is the same; the manifest records the corpus' fingerprint so a check
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

GENERATOR_VERSION = 3
DATA_FILE = "bundled_cloze.jsonl"
MANIFEST_FILE = "bundled_cloze.manifest.json"
SPLITS = ("train", "validation", "test")
TRAIN_DOCS = 40
"""Few-shot examples (`train` split), from training paragraphs."""
VALIDATION_EVERY = 3
"""One held-out passage in this many goes to the validation split, the others to test."""
NUM_CHOICES = 4
CHANCE = 1 / NUM_CHOICES
"""Expected accuracy of a guess (every document has NUM_CHOICES choices)."""
MIN_CONTEXT_WORDS = 12
MAX_CONTEXT_WORDS = 32
MIN_COUNT = 3
"""A word must occur this often in the corpus to be a target or a distractor."""
BAND = 40
"""Distractors come from the words within this many frequency ranks of the target."""
MIN_EVAL_DOCS = {"validation": 60, "test": 120}
"""Fewer documents than this from the held-out paragraphs means the corpus changed too much."""

_CANDIDATE = re.compile(r"[a-z]{3,}")


def _hash(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def corpus_rows() -> list[str]:
    """The whole bundled corpus (held-out paragraphs included), stripped and non-empty as read_rows gives them."""
    from scaling.data import bundled_corpus_rows

    return [r for r in (row.strip() for row in bundled_corpus_rows()) if r]


def corpus_fingerprint(rows: list[str]) -> str:
    """SHA-256 of the corpus rows, to tell whether a regeneration can match the shipped data."""
    return hashlib.sha256("\n\n".join(rows).encode("utf-8")).hexdigest()


def _cloze_doc(index: int, words: list[str], rank: dict[str, int], vocab: list[str]) -> dict | None:
    positions = [i for i in range(MIN_CONTEXT_WORDS, len(words)) if words[i] in rank]
    if not positions:
        return None
    at = min(positions, key=lambda i: _hash("position", index, i))
    target = words[at]
    low = max(0, rank[target] - BAND)
    band = [w for w in vocab[low:rank[target] + BAND + 1] if w != target]
    distractors = sorted(band, key=lambda w: _hash("distractor", index, w))[:NUM_CHOICES - 1]
    choices = sorted([target, *distractors], key=lambda w: _hash("order", index, w))
    context = " ".join(words[max(0, at - MAX_CONTEXT_WORDS):at])
    return {"context": context, "choices": choices, "gold": choices.index(target)}


def build_cloze_docs(rows: list[str]) -> tuple[dict[str, list[dict]], dict]:
    """(split name -> documents `{"context", "choices", "gold"}` in corpus order, statistics of the
    held-out text) from the whole corpus `rows` (`corpus_rows()`)."""
    from scaling.data import bundled_heldout, is_prose

    token_rows = [row.split() for row in rows]
    counts = Counter(w for words in token_rows for w in words if _CANDIDATE.fullmatch(w))
    vocab = sorted((w for w, c in counts.items() if c >= MIN_COUNT), key=lambda w: (-counts[w], w))
    rank = {w: i for i, w in enumerate(vocab)}
    heldout = [bundled_heldout(row) for row in rows]
    training_text = "\n".join(" ".join(words) for words, out in zip(token_rows, heldout) if not out)

    pools: dict[bool, list[tuple[int, dict]]] = {False: [], True: []}
    seen = set()  # the corpus repeats paragraphs across topics: one document per distinct text
    in_training = 0
    for index, words in enumerate(token_rows):
        text = " ".join(words)
        if not is_prose(words) or text in seen:
            continue
        seen.add(text)
        doc = _cloze_doc(index, words, rank, vocab)
        if doc is None or doc["context"] in seen:
            continue
        seen.add(doc["context"])
        if heldout[index] and doc["context"] in training_text:
            in_training += 1  # the same sentences also stand in a training paragraph
            continue
        pools[heldout[index]].append((index, doc))

    evaluation = {"validation": [], "test": []}
    for index, doc in pools[True]:
        split = "validation" if _hash("split", doc["context"]) % VALIDATION_EVERY == 0 else "test"
        evaluation[split].append(doc)
    for split, needed in MIN_EVAL_DOCS.items():
        if len(evaluation[split]) < needed:
            raise ValueError(f"the held-out paragraphs give only {len(evaluation[split])} {split} documents; "
                             f"{needed} are needed (raise scaling.data.BUNDLED_HELDOUT_SHARE)")
    if len(pools[False]) < TRAIN_DOCS:
        raise ValueError(f"the training paragraphs give only {len(pools[False])} cloze documents; {TRAIN_DOCS} are needed")
    chosen = sorted(sorted(pools[False], key=lambda item: _hash("train", item[0]))[:TRAIN_DOCS], key=lambda item: item[0])
    splits = {"train": [doc for _, doc in chosen], **evaluation}

    held_rows = [words for words, out in zip(token_rows, heldout) if out]
    stats = {"rule": "scaling.data.bundled_heldout", "corpus_rows": len(rows),
             "corpus_words": sum(map(len, token_rows)), "heldout_rows": len(held_rows),
             "heldout_paragraphs": len({" ".join(words) for words in held_rows}),
             "heldout_words": sum(map(len, held_rows)), "dropped_also_in_training": in_training}
    return splits, stats


def render_data(splits: dict[str, list[dict]]) -> str:
    """The JSONL text: one document per line with its split, splits in SPLITS order."""
    lines = [json.dumps({"split": name, **doc}, ensure_ascii=True, sort_keys=True)
             for name in SPLITS for doc in splits[name]]
    return "\n".join(lines) + "\n"


def render_manifest(rows: list[str], data: str, splits: dict[str, list[dict]], heldout: dict) -> str:
    from scaling.data import BUNDLED_HELDOUT_SHARE

    manifest = {
        "generator": "scaling.eval_tasks.build",
        "generator_version": GENERATOR_VERSION,
        "corpus": "pydoc_data.topics (scaling.data.bundled_corpus_rows)",
        "python": ".".join(map(str, sys.version_info[:3])),
        "corpus_sha256": corpus_fingerprint(rows),
        "data_sha256": hashlib.sha256(data.encode("utf-8")).hexdigest(),
        "docs": {name: len(splits[name]) for name in SPLITS},
        "chance_acc": CHANCE,
        "heldout": {**heldout, "share": BUNDLED_HELDOUT_SHARE},
    }
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def regenerate(rows: list[str] | None = None) -> tuple[str, str]:
    """(data, manifest) texts built from `rows` (default: the whole bundled corpus, `corpus_rows()`)."""
    rows = corpus_rows() if rows is None else rows
    splits, heldout = build_cloze_docs(rows)
    data = render_data(splits)
    return data, render_manifest(rows, data, splits, heldout)


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
