"""lm-eval tasks shipped with the project, usable offline.

This folder is an lm-eval `include_path`: pass `TASKS_DIR` to `scaling.evaluate` (or
`--include_path` to lm-eval's own CLI) and the tasks below resolve by name.

- `bundled_cloze`: pick the true next word among 4 (chance 25%), from paragraphs of the bundled
  corpus that the `bundled` training source leaves out (`scaling.data.bundled_heldout`), test split;
- `bundled_cloze_val`: the same task on its validation split, for choosing checkpoints or
  sweep settings without looking at the test split.

Both read `bundled_cloze.jsonl` next to this file (through `cloze_data.py`), so they work
from any working directory. `python -m scaling.eval_tasks.build` regenerates the data.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""The folder to pass as lm-eval's include_path."""
BUNDLED_CLOZE = "bundled_cloze"
BUNDLED_CLOZE_VAL = "bundled_cloze_val"
