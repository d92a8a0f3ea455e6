"""Names of downstream-evaluation results: metric keys, presets, artifacts.

Pure Python on purpose (like `scaling.names`): `analysis/` reads these keys from MLflow on
a machine without torch, Ray or lm-eval.

A metric key is `eval/<task>/<metric>`: `<task>` is the lm-eval task or group name as
configured (`arc_easy`, `mmlu`, `bundled_cloze_val`), `<metric>` lm-eval's metric name
without its filter suffix when the filter is `none` (`acc`, `acc_norm`, `acc_stderr`,
`word_perplexity`); any other filter is kept after an underscore
(`exact_match_strict-match`). `eval/mean_acc` is the mean of `acc` over the configured
tasks that report it (the paper's score for the `paper10` preset), leaving out the
selection tasks; `eval/selection_mean_acc` is the mean over the selection tasks
(validation data, allowed to choose checkpoints and to drive sweeps).
"""

from __future__ import annotations

import re

EVAL_PREFIX = "eval"
EVAL_MEAN_ACC = "eval/mean_acc"
"""Mean `acc` over the configured tasks except the selection tasks; logged only when none of them failed."""
EVAL_SELECTION_MEAN_ACC = "eval/selection_mean_acc"
"""Mean `acc` over the selection tasks (validation data); logged only when none of them failed."""
EVAL_NUM_FAILED = "eval/num_failed_tasks"
"""How many configured tasks could not be evaluated (0 when all gave results)."""
EVAL_SECONDS = "eval/seconds"
"""Wall time of one evaluation (loading the model and tasks included)."""
ARTIFACT_EVAL_JSON = "eval_results.json"
"""One evaluation's record: flat metrics, failures, settings and lm-eval's own results."""

# --- the paper's evaluation (arXiv 2602.00217) -------------------------------------------
PAPER10_TASKS = ("anli_r2", "lambada_openai", "openbookqa", "piqa", "truthfulqa_mc2", "winogrande",
                 "arc_easy", "arc_challenge", "medmcqa", "mmlu")
"""The paper's ten accuracy tasks (metric `acc`); their mean is the paper's score."""
PAPER_PERPLEXITY_TASK = "paloma_wikitext_103"
"""Reported next to the ten (word perplexity), never averaged with them."""
PRESETS = {"paper10": PAPER10_TASKS + (PAPER_PERPLEXITY_TASK,)}
"""Preset name -> lm-eval task names, usable as an entry of `eval.tasks`."""
PAPER_FEWSHOT_TASKS = ("arc_easy", "arc_challenge", "mmlu", "medmcqa")
"""Evaluated few-shot in the paper (1-shot for GPT-2, 5-shot for Qwen3); the rest zero-shot."""
PAPER_FEWSHOT_SHOTS = {"gpt2": 1, "qwen3": 5}
PAPER_LIMITS = {"gpt2": 500, "qwen3": 200}
"""Samples per task in the paper's evaluations."""

_KEY = re.compile(r"eval/(?P<task>[^/]+)/(?P<metric>[^/]+)")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]")  # MLflow keys allow these (and "/")


def eval_metric_key(task: str, metric: str) -> str:
    """`eval/<task>/<metric>`, e.g. eval_metric_key("arc_easy", "acc") == "eval/arc_easy/acc"."""
    return f"{EVAL_PREFIX}/{task}/{metric}"


def metric_name(lm_eval_key: str) -> str:
    """lm-eval's `"<metric>,<filter>"` -> our metric name: "acc,none" -> "acc",
    "acc_stderr,none" -> "acc_stderr", "exact_match,strict-match" -> "exact_match_strict-match"."""
    metric, _, filter_name = lm_eval_key.partition(",")
    name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
    return _UNSAFE.sub("_", name)


def parse_eval_metric_key(key: str) -> tuple[str, str] | None:
    """(task, metric) of an `eval/<task>/<metric>` key; None for any other key (eval/mean_acc, ...)."""
    match = _KEY.fullmatch(key)
    return (match["task"], match["metric"]) if match else None


def eval_artifact_path(step: int) -> str:
    """Where one evaluation's JSON goes in a run's artifacts: `eval/step_000120/eval_results.json`."""
    return f"{EVAL_PREFIX}/step_{step:06d}/{ARTIFACT_EVAL_JSON}"
