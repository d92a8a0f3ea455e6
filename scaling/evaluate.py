"""Downstream evaluation of a causal LM with lm-eval-harness.

    python -m scaling.evaluate --model ./runs/.../hf --tasks bundled_cloze --limit 100
    python -m scaling.evaluate --model gpt2 --tasks paper10 --num-fewshot paper_gpt2 --limit 500

Scoring is lm-eval's own (`simple_evaluate` on an `HFLM`); this module chooses tasks, few-shot
counts and seeds, keeps one broken task from sinking the others, and turns lm-eval's results into
flat metrics `eval/<task>/<metric>` (with each multiple-choice task's chance level), one JSON
record and per-document results (`scaling.names`).

Three costs are kept out of the way:
- lm-eval's import (~2 s) happens inside the functions, so the CLI's --help and a study's
  config loading stay fast;
- indexing every built-in task YAML takes 10-30 s, so a task is loaded from an index of
  only the folders that define the requested tasks; the map name -> folder is built once
  per lm-eval version and machine and cached (`~/.cache/dispersion-scaling/lm_eval/`);
- the batch size is given to `HFLM` itself: `simple_evaluate(batch_size=...)` is ignored
  for an `HFLM` built beforehand, the usual reason the Python path runs slower than
  lm-eval's CLI (lm-evaluation-harness issue #3207).

`evaluate_model` takes plain, picklable arguments and returns a picklable `EvalResult`,
so it can run as a Ray task on its own CPUs/GPUs (`EvalConfig.num_cpus`, `num_gpus`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scaling import cadence
from scaling import names as keys
from scaling.console import check_writable_dir, run_cli
from scaling.errors import ConfigError, ModelError, one_line
from scaling.names import PAPER_FEWSHOT_SHOTS, PAPER_FEWSHOT_TASKS, PRESETS

DTYPES = ("auto", "float32", "bfloat16", "float16")
RUN_SEED = "run"
"""`eval.fewshot_seed` value meaning the evaluated run's own seed."""
LM_EVAL_FEWSHOT_SEED = 1234
"""lm-eval's default few-shot seed: what `run` means for a model evaluated outside a study."""
FEWSHOT_PRESETS = tuple(f"paper_{family}" for family in PAPER_FEWSHOT_SHOTS)
"""String values of `eval.num_fewshot` that mean the paper's rule for a model family."""


def paper_num_fewshot(family: str) -> dict[str, int]:
    """The paper's few-shot counts: arc_easy, arc_challenge, mmlu and medmcqa 1-shot for
    GPT-2 (`gpt2`) and 5-shot for Qwen3 (`qwen3`); every other task zero-shot."""
    if family not in PAPER_FEWSHOT_SHOTS:
        raise ConfigError(f"model family {family!r} has no few-shot rule in the paper; use one of "
                          f"{list(PAPER_FEWSHOT_SHOTS)}")
    return {task: PAPER_FEWSHOT_SHOTS[family] for task in PAPER_FEWSHOT_TASKS}


@dataclass(frozen=True)
class EvalConfig:
    """Downstream evaluation of a study's runs (the study file's optional `eval:` section)."""

    tasks: tuple[str, ...]
    """lm-eval task, group or tag names, or a preset (`paper10`: the paper's ten tasks and paloma_wikitext_103)."""
    selection_tasks: tuple[str, ...] = ()
    """Tasks among `tasks` on validation data (e.g. bundled_cloze_val), whose mean may pick checkpoints."""
    num_fewshot: dict[str, int] | int | str = 0
    """Few-shot examples: one count for all tasks, a task -> count mapping (others 0), or paper_gpt2 / paper_qwen3."""
    limit: int | None = None
    """Documents per task (per subtask of a group); null = all. The paper: 500 for GPT-2, 200 for Qwen3."""
    batch_size: int = 16
    """Sequences per forward pass of the evaluated model."""
    every_steps: int | None = None
    """Evaluate every this many optimizer steps, and at the last step; null (default) = the paper's
    floor(steps / 5) + 1; 0 = only the last step (`scaling.cadence`, the same rule as probes and checkpoint)."""
    at_start: bool = False
    """Also evaluate at step 0, before any training (the 'pretrained' row of the paper's tables)."""
    include_path: str | None = None
    """A folder of your own lm-eval task YAMLs; the project's bundled tasks (bundled_cloze, ...) are always found."""
    dtype: str = "auto"
    """Weights' dtype for evaluation: auto (as saved), float32, bfloat16 or float16 (GPU only)."""
    num_cpus: float = 1.0
    """CPUs reserved by each evaluation (a Ray task beside training)."""
    num_gpus: float = 0.0
    """GPUs reserved by each evaluation; > 0 evaluates on CUDA."""
    fewshot_seed: int | str = RUN_SEED
    """Seed of the few-shot sampling (and lm-eval's python/numpy/torch seeds, as its `--seed N`): `run` = the
    evaluated run's seed, as the authors (outside a study: lm-eval's default, 1234); or a fixed integer."""
    log_samples: bool = True
    """Keep each document's result (doc id, correctness, per-choice log-likelihood): one artifact per task and
    evaluation step (`scaling.names.eval_samples_path`), for item-level intervals and the tasks' chance level."""

    def __post_init__(self):
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks)
        object.__setattr__(self, "tasks", tasks)
        if not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
            raise ConfigError(f"eval.tasks={list(tasks)!r}: list one or more lm-eval task names, e.g. "
                              "[bundled_cloze] or [paper10]")
        names = self.task_names()
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ConfigError(f"eval.tasks: {twice} listed twice (presets included); list each task once")
        selection = (self.selection_tasks,) if isinstance(self.selection_tasks, str) else tuple(self.selection_tasks)
        object.__setattr__(self, "selection_tasks", selection)
        for task in selection:
            if task not in names:
                raise ConfigError(f"eval.selection_tasks: {task!r} is not among eval.tasks {list(names)}; add it "
                                  "there too (a selection task is evaluated like the others)")
        self._check_fewshot(names)
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ConfigError(f"eval.limit={self.limit!r}: must be an integer >= 1 or null (all documents)")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size!r}: must be an integer >= 1")
        cadence.check_every_steps("eval.every_steps", self.every_steps)
        if self.include_path is not None and not (isinstance(self.include_path, str) and self.include_path.strip()):
            raise ConfigError(f"eval.include_path={self.include_path!r}: give a folder of lm-eval task YAMLs or null")
        if self.dtype not in DTYPES:
            raise ConfigError(f"eval.dtype={self.dtype!r}: use one of {list(DTYPES)}")
        if not (isinstance(self.num_cpus, (int, float)) and math.isfinite(self.num_cpus) and self.num_cpus > 0):
            raise ConfigError(f"eval.num_cpus={self.num_cpus!r}: must be > 0 (Ray resources of one evaluation)")
        if not (isinstance(self.num_gpus, (int, float)) and math.isfinite(self.num_gpus) and self.num_gpus >= 0):
            raise ConfigError(f"eval.num_gpus={self.num_gpus!r}: must be >= 0")
        if not (self.fewshot_seed == RUN_SEED or (isinstance(self.fewshot_seed, int)
                                                  and not isinstance(self.fewshot_seed, bool) and self.fewshot_seed >= 0)):
            raise ConfigError(f"eval.fewshot_seed={self.fewshot_seed!r}: use {RUN_SEED!r} (each run's seed) or an "
                              "integer >= 0")
        if not isinstance(self.log_samples, bool):
            raise ConfigError(f"eval.log_samples={self.log_samples!r}: use true or false")
        if self.num_gpus == 0 and self.dtype == "float16":
            raise ConfigError("eval.dtype=float16 needs a GPU (CPU half kernels are slow or missing); "
                              "set eval.num_gpus or use float32/bfloat16")

    def _check_fewshot(self, names: tuple[str, ...]) -> None:
        value = self.num_fewshot
        if isinstance(value, str):
            if value not in FEWSHOT_PRESETS:
                raise ConfigError(f"eval.num_fewshot={value!r}: use an integer, a task -> count mapping, or one "
                                  f"of {list(FEWSHOT_PRESETS)}")
            return
        if isinstance(value, dict):
            for task, shots in value.items():
                if task not in names:
                    raise ConfigError(f"eval.num_fewshot.{task}: {task!r} is not among eval.tasks {list(names)}; "
                                      "fix the name or add the task")
                if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
                    raise ConfigError(f"eval.num_fewshot.{task}={shots!r}: must be an integer >= 0")
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"eval.num_fewshot={value!r}: use an integer >= 0, a task -> count mapping, or one "
                              f"of {list(FEWSHOT_PRESETS)}")

    def __hash__(self):  # num_fewshot may be a dict
        fewshot = tuple(sorted(self.num_fewshot.items())) if isinstance(self.num_fewshot, dict) else self.num_fewshot
        return hash((self.tasks, self.selection_tasks, fewshot, self.limit, self.batch_size, self.every_steps,
                     self.at_start, self.include_path, self.dtype, self.num_cpus, self.num_gpus, self.fewshot_seed,
                     self.log_samples))

    def task_names(self) -> tuple[str, ...]:
        """The configured tasks with presets expanded, in order."""
        return tuple(name for entry in self.tasks for name in PRESETS.get(entry, (entry,)))

    def fewshot_for(self, task: str) -> int:
        """Few-shot examples for one configured task."""
        value = self.num_fewshot
        if isinstance(value, str):
            return paper_num_fewshot(value.removeprefix("paper_")).get(task, 0)
        if isinstance(value, dict):
            return value.get(task, 0)
        return value

    def resolve_every_steps(self, total_steps: int) -> int:
        """Steps between evaluations for a run of `total_steps` (`scaling.cadence.interval`)."""
        return cadence.interval(self.every_steps, total_steps)

    def eval_steps(self, total_steps: int) -> tuple[int, ...]:
        """The optimizer steps at which a run of `total_steps` is evaluated: 0 (if at_start), every
        resolve_every_steps() steps, and always the last step (the final model)."""
        return cadence.due_steps(self.every_steps, total_steps, self.at_start)

    def resolve_fewshot_seed(self, run_seed: int | None) -> int:
        """The few-shot seed of one evaluation: the fixed eval.fewshot_seed, else the run's seed (None: lm-eval's default)."""
        if self.fewshot_seed != RUN_SEED:
            return int(self.fewshot_seed)
        return LM_EVAL_FEWSHOT_SEED if run_seed is None else int(run_seed)

    def device(self) -> str:
        """Where an evaluation runs: cuda when the evaluation has GPUs, else cpu."""
        return "cuda" if self.num_gpus > 0 else "cpu"

    def ray_options(self) -> dict[str, float]:
        """Resources of one evaluation as Ray task options: `remote_fn.options(**config.ray_options())`."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def include_paths(self) -> tuple[str, ...]:
        """Folders lm-eval searches for task YAMLs: the project's bundled tasks, then include_path."""
        from scaling.eval_tasks import TASKS_DIR

        paths = [str(TASKS_DIR)]
        if self.include_path is not None:
            paths.append(str(Path(self.include_path).expanduser().resolve()))
        return tuple(dict.fromkeys(paths))

    def with_absolute_paths(self) -> EvalConfig:
        """A copy whose include_path no longer depends on the working directory (resolve on the
        driver before sending the config to a Ray task, whose working directory differs)."""
        if self.include_path is None:
            return self
        return dataclasses.replace(self, include_path=str(Path(self.include_path).expanduser().resolve()))


@dataclass(frozen=True)
class EvalResult:
    """One evaluation of one model: flat metrics, per-task failures and lm-eval's own results."""

    model: str
    """The model evaluated (folder or hub name)."""
    metrics: dict[str, float]
    """`eval/<task>/<metric>`, `eval/mean_acc` and `eval/selection_mean_acc` (each only when none of its tasks
    failed), `eval/num_failed_tasks`, `eval/seconds`."""
    failures: dict[str, str]
    """Configured task -> one line saying why it gave no result."""
    lm_eval: dict[str, Any] = field(repr=False)
    """lm-eval's results (`results`, `configs`, `n-shot`, `n-samples`, versions ...), JSON-safe; {} if nothing ran."""
    settings: dict[str, Any] = field(default_factory=dict)
    """The EvalConfig, device, dtype and few-shot seed used."""
    samples: dict[str, list[dict]] = field(default_factory=dict, repr=False)
    """Configured task -> one `compact_sample` per document of each of its leaf tasks (named in `task`);
    empty unless eval.log_samples. Not in `to_json`: `samples_jsonl` writes them."""

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "metrics": self.metrics, "failures": self.failures,
                "settings": self.settings, "lm_eval": self.lm_eval}

    def to_json(self) -> str:
        """The record to store as an artifact (`scaling.names.ARTIFACT_EVAL_JSON`)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str, allow_nan=True)

    def samples_jsonl(self) -> dict[str, str]:
        """Configured task -> its per-item results as JSONL text (`scaling.names.eval_samples_path`)."""
        return {task: "".join(json.dumps(r, sort_keys=True, allow_nan=True) + "\n" for r in records)
                for task, records in self.samples.items() if records}


# --- task names ------------------------------------------------------------------------------

def _lm_eval_tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def builtin_task_folders() -> dict[str, str]:
    """lm-eval's built-in task, group and tag names -> the top folder under lm_eval/tasks that
    defines them ("" when only the full index can load it). Indexing every built-in YAML takes
    10-30 s, so the map is cached per lm-eval version on this machine."""
    import lm_eval

    from scaling.data import DEFAULT_CACHE

    cache = DEFAULT_CACHE / "lm_eval" / f"task_folders-{lm_eval.__version__}.json"
    try:
        return json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    from lm_eval.tasks import TaskManager

    root = _lm_eval_tasks_root()
    folders = {}
    for name, entry in TaskManager(include_defaults=True).task_index.items():
        parts = Path(entry.yaml_path).resolve().relative_to(root).parts if entry.yaml_path else ()
        folders[name] = parts[0] if len(parts) > 1 else ""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(folders, sort_keys=True), encoding="utf-8")
        tmp.replace(cache)  # atomic: evaluations on one node may build it at the same time
    except OSError:
        pass  # a read-only home only costs the indexing again next time
    return folders


def _local_task_names(include_paths: tuple[str, ...]) -> list[str]:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False, include_path=list(include_paths)).all_tasks


def check_include_path(config: EvalConfig) -> None:
    if config.include_path is not None and not Path(config.include_path).expanduser().is_dir():
        raise ConfigError(f"eval.include_path={config.include_path!r}: folder not found; give a folder of "
                          "lm-eval task YAMLs (relative paths start at the working directory)")


def broken_task_yamls(include_paths: tuple[str, ...]) -> list[str]:
    """'PATH does not parse (line N: problem)' for each task YAML under the include paths that is not YAML
    (lm-eval's own tags, such as !function, are fine)."""
    import yaml

    from scaling.schema import yaml_problem

    class TaskLoader(yaml.SafeLoader):
        pass

    TaskLoader.add_multi_constructor("!", lambda loader, suffix, node: None)
    broken = []
    for folder in include_paths:
        for path in sorted(Path(folder).expanduser().rglob("*.yaml")):
            try:
                yaml.load(path.read_text(encoding="utf-8"), Loader=TaskLoader)  # noqa: S506 -- a SafeLoader
            except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
                problem = yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else type(exc).__name__
                broken.append(f"{path} does not parse ({problem})")
    return broken


def check_tasks(config: EvalConfig) -> None:
    """Fail (ConfigError) if a task name is unknown to lm-eval, naming close matches; call it before
    any training. Needs no model and no data: names come from the task YAMLs' index."""
    check_include_path(config)
    local = set(_local_task_names(config.include_paths()))
    wanted = [n for n in config.task_names() if n not in local]
    if not wanted:
        return
    builtin = builtin_task_folders()
    unknown = [n for n in wanted if n not in builtin]
    if unknown:
        known = sorted(local | set(builtin))
        name = unknown[0]
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(close)}" if close else "no close match"
        broken = broken_task_yamls(config.include_paths())  # lm-eval skips a YAML it cannot parse without a word
        if broken:
            raise ConfigError(f"eval.tasks: {name!r} is not an lm-eval task, and {broken[0]}: fix that YAML")
        raise ConfigError(f"eval.tasks: {name!r} is not an lm-eval task ({hint}); list them with "
                          "`lm_eval ls tasks`, or put its YAML in eval.include_path")


def build_task_manager(config: EvalConfig):
    """An lm-eval TaskManager that can load the configured tasks, indexing only the folders that
    define them (the bundled tasks, include_path, and the built-in folders named by the tasks)."""
    from lm_eval.tasks import TaskManager

    include = list(config.include_paths())
    local = set(_local_task_names(config.include_paths()))
    wanted = [n for n in config.task_names() if n not in local]
    if not wanted:
        return TaskManager(include_defaults=False, include_path=include)
    builtin = builtin_task_folders()
    folders = {builtin.get(n) for n in wanted}
    if None in folders or "" in folders:  # unknown here or defined at the top: index everything
        return TaskManager(include_defaults=True, include_path=include)
    root = _lm_eval_tasks_root()
    # Built-in folders first, include paths last: on a name clash the user's YAML wins, as in lm-eval.
    manager = TaskManager(include_defaults=False, include_path=[str(root / f) for f in sorted(folders)] + include)
    if all(_members_indexed(manager.task_index, name, set()) for name in wanted):
        return manager
    return TaskManager(include_defaults=True, include_path=include)  # a group reaches into other folders


def _members_indexed(index: dict, name: str, seen: set) -> bool:
    """Whether a task or group and, recursively, every member a group names is in `index`."""
    if name in seen:
        return True
    seen.add(name)
    entry = index.get(name)
    if entry is None:
        return False
    members = (entry.cfg or {}).get("task") if entry.cfg else None
    if not isinstance(members, list):  # a task (its `task` is its own name)
        return True
    for member in members:
        if isinstance(member, dict):
            member = member.get("group", member.get("task"))
        if isinstance(member, str) and not _members_indexed(index, member, seen):
            return False
    return True


# --- evaluation ------------------------------------------------------------------------------

class _DropCustomDatasetHint:
    """lm-eval warns on every load of a `custom_dataset` task (the bundled ones) about passing
    kwargs via --metadata; that hint does not apply here and would flood a study's logs."""

    def filter(self, record) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def _quiet_lm_eval() -> None:
    import logging

    logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetHint())


def _load_task(manager, name: str, shots: int) -> list:
    """The Task/Group objects for one configured name, with its few-shot count set on every leaf task."""
    loaded = manager.load([name])
    objects = [loaded["groups"][name]] if name in loaded.get("groups", {}) else list(loaded["tasks"].values())
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") == 0 and shots:
            continue  # the task's YAML pins zero-shot; lm-eval's own CLI keeps it too
        task.set_config(key="num_fewshot", value=shots)
    return objects


def _json_safe(results: dict) -> dict:
    from lm_eval.utils import handle_non_serializable

    results = {k: v for k, v in results.items() if k != "samples"}
    return json.loads(json.dumps(results, default=handle_non_serializable))


def _merge(parts: list[dict]) -> dict:
    """Results of several simple_evaluate calls as one (per-task sections merged)."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "config":
                merged[key] = {**merged[key], **value}
            else:
                merged.setdefault(key, value)
    return merged


def flatten_results(results: dict, names: list[str], leaves: dict[str, list[str]],
                    selection: tuple[str, ...] = ()) -> dict[str, float]:
    """lm-eval results -> `eval/<task>/<metric>` for the configured names (a tag: its tasks), with
    `eval/mean_acc` over the names outside `selection` that report `acc`, and `eval/selection_mean_acc`
    over those in `selection`."""
    per_task = results.get("results", {})
    metrics: dict[str, float] = {}
    accuracies: dict[bool, list[float]] = {False: [], True: []}
    for name in names:
        for reported in ([name] if name in per_task else leaves.get(name, [])):
            for key, value in per_task.get(reported, {}).items():
                if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue  # alias, sample_len, "N/A" stderrs
                metrics[keys.eval_metric_key(reported, keys.metric_name(key))] = float(value)
            acc = per_task.get(reported, {}).get("acc,none")
            if isinstance(acc, (int, float)) and not isinstance(acc, bool):
                accuracies[name in selection].append(float(acc))
    for is_selection, key in ((False, keys.EVAL_MEAN_ACC), (True, keys.EVAL_SELECTION_MEAN_ACC)):
        if accuracies[is_selection]:
            metrics[key] = sum(accuracies[is_selection]) / len(accuracies[is_selection])
    return metrics


def compact_sample(sample: dict) -> dict:
    """One document's result from lm-eval's logged sample, small enough to keep for every item of every
    evaluation: doc_id, doc_hash (16 hex), target (an index, for multiple choice), each metric's value
    (acc, acc_norm: 1.0 correct, 0.0 not) and, for multiple choice, each choice's log-likelihood."""
    record: dict[str, Any] = {"doc_id": int(sample["doc_id"]), "doc_hash": str(sample.get("doc_hash", ""))[:16]}
    if isinstance(sample.get("target"), int) and not isinstance(sample["target"], bool):
        record["target"] = sample["target"]
    for metric in sample.get("metrics", ()):
        value = sample.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            record[metric] = float(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            record[metric] = [float(v) for v in value]  # e.g. word_perplexity's (loglikelihood, words)
    responses = sample.get("filtered_resps") or []
    if len(responses) > 1 and all(isinstance(r, (list, tuple)) and r and isinstance(r[0], (int, float))
                                  for r in responses):
        record["loglik"] = [round(float(r[0]), 4) for r in responses]  # one (loglik, is_greedy) per choice
    return record


def chance_levels(samples: dict[str, list[dict]], configs: dict[str, dict]) -> dict[str, float]:
    """Leaf task -> the accuracy of a uniform guess over the documents evaluated (mean of 1 / choices), for
    multiple-choice tasks scored by lm-eval's own rule (pick the likeliest choice). A task with its own
    `process_results` (truthfulqa_mc2 scores probability mass) or open answers (lambada) has none."""
    out = {}
    for task, records in samples.items():
        config = configs.get(task) or {}
        standard = config.get("output_type") == "multiple_choice" and not config.get("process_results")
        if standard and records and all("loglik" in r for r in records):
            out[task] = sum(1.0 / len(r["loglik"]) for r in records) / len(records)
    return out


def chance_metrics(chance: dict[str, float], samples: dict[str, list[dict]], results: dict, names: list[str],
                   leaves: dict[str, list[str]], selection: tuple[str, ...], metrics: dict[str, float]) -> dict[str, float]:
    """`eval/<task>/chance_acc` beside each reported `eval/<task>/acc` (a group: over all its documents), and
    the chance levels of eval/mean_acc and eval/selection_mean_acc: the same mean as `flatten_results` takes,
    of chance levels instead of accuracies; each only when every task in it has one."""
    per_task = results.get("results", {})

    def level(reported: str, name: str) -> float | None:
        parts = [reported] if reported in chance else (leaves.get(name, []) if reported == name else [])
        if not parts or not all(p in chance for p in parts):
            return None
        return sum(chance[p] * len(samples[p]) for p in parts) / sum(len(samples[p]) for p in parts)

    out: dict[str, float] = {}
    levels: dict[bool, list[float]] = {False: [], True: []}
    complete = {False: True, True: True}
    for name in names:
        for reported in ([name] if name in per_task else leaves.get(name, [])):
            value = level(reported, name)
            if value is not None:
                out[keys.eval_metric_key(reported, keys.EVAL_CHANCE_ACC)] = value
            acc = per_task.get(reported, {}).get("acc,none")
            if isinstance(acc, (int, float)) and not isinstance(acc, bool):
                if value is None:
                    complete[name in selection] = False
                else:
                    levels[name in selection].append(value)
    for is_selection, mean_key, chance_key in ((False, keys.EVAL_MEAN_ACC, keys.EVAL_CHANCE_MEAN_ACC),
                                               (True, keys.EVAL_SELECTION_MEAN_ACC, keys.EVAL_CHANCE_SELECTION_MEAN_ACC)):
        if mean_key in metrics and complete[is_selection] and levels[is_selection]:
            out[chance_key] = sum(levels[is_selection]) / len(levels[is_selection])
    return out


def evaluate_model(model: str | os.PathLike, config: EvalConfig, *, device: str | None = None,
                   tokenizer: str | None = None, seed: int | None = None) -> EvalResult:
    """Evaluate a Hugging Face causal LM (folder or hub name) on the configured tasks with lm-eval.

    A task that cannot be loaded (missing data, no network for a hub dataset) or that fails while
    evaluated is recorded in `failures` and the other tasks still give results; a model that
    cannot be loaded raises ModelError. `device`: None = config.device(), or auto/cpu/cuda/cuda:N.
    `seed`: the evaluated run's seed, which seeds the few-shot sampling when eval.fewshot_seed is `run`.
    """
    from lm_eval import simple_evaluate

    from scaling.model import check_model_reference

    _quiet_lm_eval()
    started = time.perf_counter()
    model = str(model)
    check_model_reference(model)
    device = _resolve_device(device or config.device())
    names = list(config.task_names())
    manager = build_task_manager(config)

    failures: dict[str, str] = {}
    leaves: dict[str, list[str]] = {}

    def load(name: str) -> list:
        try:
            objects = _load_task(manager, name, config.fewshot_for(name))
        except Exception as exc:  # noqa: BLE001 - any loading error fails this task only
            failures[name] = f"could not load: {one_line(exc)}"
            return []
        leaves[name] = [t.task_name for o in objects
                        for t in (o.get_all_tasks() if hasattr(o, "get_all_tasks") else [o])]
        return objects

    loaded = {name: objects for name in names if (objects := load(name))}
    lm = _build_lm(model, config, device, tokenizer) if loaded else None
    fewshot_seed = config.resolve_fewshot_seed(seed)
    samples: dict[str, list[dict]] = {}

    def run(objects: list) -> dict:
        # One seed for python, numpy, torch and the few-shot sampler, as lm-eval's `--seed N`. Samples are
        # always logged (small for these tasks): they give the chance level; eval.log_samples keeps them.
        raw = simple_evaluate(model=lm, tasks=objects, num_fewshot=None, batch_size=config.batch_size,
                              device=device, limit=config.limit, task_manager=manager, log_samples=True,
                              random_seed=fewshot_seed, numpy_random_seed=fewshot_seed,
                              torch_random_seed=fewshot_seed, fewshot_random_seed=fewshot_seed)
        for task, logged in (raw.get("samples") or {}).items():
            samples[task] = [compact_sample(sample) for sample in logged]
        return _json_safe(raw)

    parts = []
    if loaded:
        try:
            parts.append(run([o for objects in loaded.values() for o in objects]))
        except Exception:  # noqa: BLE001 - find the failing task(s): each alone, on fresh Task objects
            for name in list(loaded):
                objects = load(name)
                if not objects:
                    continue
                try:
                    parts.append(run(objects))
                except Exception as exc:  # noqa: BLE001
                    failures[name] = f"evaluation failed: {one_line(exc)}"
    if lm is not None:
        lm = None  # the last reference (`run` reads this variable): free the weights now
        _free_memory()

    results = _merge(parts) if parts else {}
    metrics = flatten_results(results, [n for n in names if n not in failures], leaves, config.selection_tasks)
    # A mean over fewer tasks is another score: drop it rather than log it under the same name.
    if any(n not in config.selection_tasks for n in failures):
        metrics.pop(keys.EVAL_MEAN_ACC, None)
    if any(n in config.selection_tasks for n in failures):
        metrics.pop(keys.EVAL_SELECTION_MEAN_ACC, None)
    chance = chance_levels(samples, results.get("configs", {}))
    metrics.update(chance_metrics(chance, samples, results, [n for n in names if n not in failures], leaves,
                                  config.selection_tasks, metrics))
    metrics[keys.EVAL_NUM_FAILED] = float(len(failures))
    metrics[keys.EVAL_SECONDS] = time.perf_counter() - started
    settings = {**dataclasses.asdict(config), "device": device, "task_names": names, "fewshot_seed_used": fewshot_seed}
    kept = {}
    if config.log_samples:  # one file per configured task; a group's or tag's leaves are named in each record
        for name in names:
            records = [{"task": leaf, **r} for leaf in leaves.get(name, []) if name not in failures
                       for r in samples.get(leaf, [])]
            if records:
                kept[name] = records
    return EvalResult(model=model, metrics=metrics, failures={n: failures[n] for n in names if n in failures},
                      lm_eval=results, settings=settings, samples=kept)


def _resolve_device(device: str) -> str:
    from scaling.model import resolve_device

    return str(resolve_device(device))


def _build_lm(model: str, config: EvalConfig, device: str, tokenizer: str | None):
    from lm_eval.models.huggingface import HFLM

    try:
        # batch_size goes to HFLM itself: simple_evaluate ignores its own for a prebuilt model.
        return HFLM(pretrained=model, tokenizer=tokenizer, device=device, dtype=config.dtype,
                    batch_size=config.batch_size)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model {model!r} could not be loaded for evaluation: {one_line(exc)}") from exc


def _free_memory() -> None:
    """Return an evaluated model's memory now: Ray reuses a worker process for later tasks."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def save_model_for_eval(model, directory: str | os.PathLike, *, tokenizer=None, state_dict=None) -> Path:
    """Write a Hugging Face folder (`save_pretrained` + tokenizer) that evaluate_model, lm-eval's CLI
    and AutoModelForCausalLM can load. Written next to `directory` and renamed into place, so an
    evaluation started on it never sees a half-written folder; an existing folder is replaced.
    Under ZeRO-3 pass the gathered full `state_dict` (rank 0 only writes)."""
    import shutil

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)
    return directory


# --- command line ----------------------------------------------------------------------------

_CLI_FLAGS = {"eval.tasks": "--tasks", "eval.num_fewshot": "--num-fewshot", "eval.limit": "--limit",
              "eval.batch_size": "--batch-size", "eval.include_path": "--include-path", "eval.dtype": "--dtype",
              "eval.fewshot_seed": "--fewshot-seed"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scaling.evaluate",
        description="Evaluate a causal LM on lm-eval-harness tasks; writes eval_results.json and prints a table.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face model folder or hub name")
    parser.add_argument("--tasks", required=True, nargs="+",
                        help="lm-eval task names (space or comma separated), or the preset paper10")
    parser.add_argument("--include-path", default=None, help="folder of your own lm-eval task YAMLs")
    parser.add_argument("--num-fewshot", default="0",
                        help="N for every task, TASK=N[,TASK=N] (others 0), or paper_gpt2 / paper_qwen3")
    parser.add_argument("--limit", default=None, help="documents per task (default: all)")
    parser.add_argument("--batch-size", default="16", help="sequences per forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (as saved), float32, bfloat16 or float16")
    parser.add_argument("--fewshot-seed", default=str(LM_EVAL_FEWSHOT_SEED),
                        help=f"seed of the few-shot sampling (and lm-eval's other seeds; default {LM_EVAL_FEWSHOT_SEED})")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or name (default: the model's)")
    parser.add_argument("--out", default=None, help="output folder (default: evaluations/<model name>)")
    return parser


def _integer(flag: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected an integer") from None


def _parse_fewshot(text: str) -> dict[str, int] | int | str:
    text = text.strip()
    if text in FEWSHOT_PRESETS:
        return text
    if "=" not in text:
        return _integer("--num-fewshot", text)
    mapping = {}
    for item in text.split(","):
        task, sep, shots = item.partition("=")
        if not sep or not task.strip():
            raise ConfigError(f"--num-fewshot {text!r}: expected N, TASK=N[,TASK=N] or one of {list(FEWSHOT_PRESETS)}")
        mapping[task.strip()] = _integer("--num-fewshot", shots.strip())
    return mapping


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """The EvalConfig of a command line; errors name the flag, not the study key."""
    tasks = tuple(t for entry in args.tasks for t in entry.split(",") if t)
    try:
        return EvalConfig(tasks=tasks, num_fewshot=_parse_fewshot(args.num_fewshot),
                          limit=_integer("--limit", args.limit), batch_size=_integer("--batch-size", args.batch_size),
                          include_path=args.include_path, dtype=args.dtype,
                          fewshot_seed=_integer("--fewshot-seed", args.fewshot_seed))
    except ConfigError as exc:
        message = str(exc)
        for key, flag in _CLI_FLAGS.items():
            message = message.replace(key, flag)
        raise ConfigError(message) from None


def format_table(result: EvalResult) -> str:
    lines = [f"{'task':<28} {'metric':<20} {'value':>10} {'stderr':>8}"]
    for key, value in result.metrics.items():
        parsed = keys.parse_eval_metric_key(key)
        if parsed is None or parsed[1].endswith("_stderr"):
            continue
        task, metric = parsed
        stderr = result.metrics.get(keys.eval_metric_key(task, f"{metric}_stderr"))
        lines.append(f"{task:<28} {metric:<20} {value:>10.4f} {'' if stderr is None else f'{stderr:8.4f}':>8}")
    for key, label in ((keys.EVAL_MEAN_ACC, "mean acc"), (keys.EVAL_CHANCE_MEAN_ACC, "chance level of mean acc"),
                       (keys.EVAL_SELECTION_MEAN_ACC, "selection mean acc"),
                       (keys.EVAL_CHANCE_SELECTION_MEAN_ACC, "chance level of selection")):
        if key in result.metrics:
            lines.append(f"{label:<28} {'acc':<20} {result.metrics[key]:>10.4f}")
    for task, reason in result.failures.items():
        lines.append(f"{task:<28} FAILED: {reason}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> EvalResult:
    """parse -> validate everything (no model loaded, nothing written) -> evaluate -> write -> print."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    from scaling.model import check_model_reference

    check_model_reference(args.model)
    out = Path(args.out) if args.out else Path("evaluations") / Path(args.model.rstrip("/")).name
    check_writable_dir(out, "--out")
    device = _resolve_device(args.device)
    check_tasks(config)
    result = evaluate_model(args.model, config, device=device, tokenizer=args.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    path = out / keys.ARTIFACT_EVAL_JSON
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(result.to_json() + "\n", encoding="utf-8")
    tmp.replace(path)
    for task, text in result.samples_jsonl().items():  # per-item results beside the record
        (out / "samples").mkdir(exist_ok=True)
        (out / "samples" / Path(keys.eval_samples_path(0, task)).name).write_text(text, encoding="utf-8")
    print(f"{args.model} on {', '.join(config.task_names())} ({device}, limit {config.limit}, "
          f"{result.metrics[keys.EVAL_SECONDS]:.1f} s)")
    print(format_table(result))
    print(f"wrote {path}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one line on stderr and return 2; a failed task returns 1."""
    return run_cli(lambda: 0 if run(argv).ok else 1, "evaluate")


if __name__ == "__main__":
    sys.exit(main())
