"""The bundled cloze data as a `datasets.DatasetDict`, for lm-eval's `custom_dataset`.

lm-eval imports this file by its path (`!function cloze_data.load` in the task YAMLs),
so it must stay self-contained: it finds the data next to itself, whatever the working
directory, and builds the splits in memory (no Hugging Face cache, no network).
"""

import json
from pathlib import Path

DATA_PATH = Path(__file__).resolve().parent / "bundled_cloze.jsonl"


def load(**_task_metadata):
    """Split name -> Dataset of {context, choices, gold}; lm-eval passes its task metadata, unused."""
    import datasets

    rows = {}
    with DATA_PATH.open(encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            rows.setdefault(doc.pop("split"), []).append(doc)
    return datasets.DatasetDict({name: datasets.Dataset.from_list(docs) for name, docs in rows.items()})
