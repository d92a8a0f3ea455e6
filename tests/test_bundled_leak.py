"""The bundled evaluation is leak-free: the demo's token shards, built as the demo builds them (its
study file, its tokenizer, the real shard path), decoded token by token, hold no validation or test
passage of the bundled cloze task, whatever the validation fraction (validation blocks are cut
from the same stream). The few-shot passages, cut from training paragraphs, are found: the check
can see a passage when one is there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def test_no_validation_or_test_passage_in_the_demos_token_shards(ray_session, tmp_path):
    from scaling.config import load_study_file
    from scaling.eval_tasks import TASKS_DIR
    from scaling.study import prepare_data

    study = load_study_file(REPO / "search_spaces" / "demo.yaml", [f"storage_path={tmp_path}"])
    blocks = prepare_data(study, vocab_size=min(r.vocab_size for r in study.selected_rungs()), progress=lambda _: None)
    shards = blocks.shards
    assert not shards.has_validation_split  # validation blocks come out of the same stream as training ones
    stream = shards.read_tokens(0, None, "train")
    assert stream.size == shards.total_tokens
    in_blocks = np.concatenate([blocks.train[np.arange(len(blocks.train))].ravel(),
                                blocks.val[np.arange(len(blocks.val))].ravel()])
    assert in_blocks.size <= stream.size and np.isin(np.unique(in_blocks), stream).all()

    # Decoded with the tokenizer stored beside the shards (the one that made them), row by row at each EOS.
    tokenizer, eos = shards._tokenizer(), int(shards.manifest["tokenizer"]["eos_id"])
    rows = np.split(stream, np.flatnonzero(stream == eos) + 1)
    text = "\n".join(" ".join(tokenizer.decode(row[row != eos].tolist(), skip_special_tokens=False).split())
                     for row in rows)

    docs = [json.loads(line) for line in (TASKS_DIR / "bundled_cloze.jsonl").read_text(encoding="utf-8").splitlines()]
    evaluated = [d["context"] for d in docs if d["split"] in ("validation", "test")]
    few_shot = [d["context"] for d in docs if d["split"] == "train"]
    assert len(evaluated) >= 180 and len(few_shot) == 40
    leaked = [c for c in evaluated if c in text]
    assert not leaked, f"{len(leaked)} of {len(evaluated)} evaluation passages are in the training tokens: {leaked[:2]}"
    assert all(c in text for c in few_shot)  # the same check finds passages that are there

