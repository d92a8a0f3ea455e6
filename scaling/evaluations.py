"""Downstream evaluations beside a training run: export the model, evaluate it on its own
resources while training goes on, record the results at the step they belong to.

At each evaluation step (`EvalConfig.eval_steps`: step 0 when `at_start`, every k steps, always the
last) every rank takes part in gathering the weights (a collective under bf16 or ZeRO-3); rank 0
writes a Hugging Face folder (`save_pretrained` plus the study's tokenizer) to the run's storage
folder (`RunFolder.export`: `<run folder>/hf/step_0000120`), and submits `scaling.evaluate.evaluate_model` as a Ray
task with the evaluation's own CPUs/GPUs. Finished evaluations are picked up without waiting; only
the end of the run waits for the rest, so a run is not FINISHED before its evaluations are recorded
(a run with a successor in its chain waits on a thread, while the next run trains: `scaling.run_loop`).
A run resumed after its last step evaluates again the exports its record lacks.
A task whose data cannot be loaded is a failed evaluation of that task; an evaluation that fails
as a whole is recorded too; neither stops the run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from scaling import names, storage
from scaling.errors import one_line
from scaling.run_folder import RunFolder


def evaluate_remote(model_uri: str, config, seed: int | None = None) -> Any:
    """The Ray task: evaluate the exported folder (copied to local disk first when it is on object
    storage) with lm-eval; `seed` is the run's (few-shot sampling, `EvalConfig.fewshot_seed`)."""
    from scaling.evaluate import evaluate_model

    if storage.is_local(model_uri):
        return evaluate_model(model_uri, config, seed=seed)
    local = Path(tempfile.mkdtemp(prefix="eval-model-"))
    try:
        storage.copy_tree(model_uri, str(local))
        return evaluate_model(str(local), config, seed=seed)
    finally:
        shutil.rmtree(local, ignore_errors=True)


class RunEvaluations:
    """The evaluations of one training run (every rank holds one; only rank 0 submits and records)."""

    def __init__(self, config, *, total_steps: int, rank: int, logger, tokenizer_uri: str | None,
                 run_folder: str | RunFolder | None, precision_dtype, seed: int | None = None):
        self.config = config
        self.steps = set(config.eval_steps(total_steps))
        self.rank, self.logger, self.seed = rank, logger, seed
        if config.dtype != "auto":  # export what is scored: float32 comes from the fp32 master weights, not a bf16 copy
            import torch

            precision_dtype = getattr(torch, config.dtype)
        self.tokenizer_uri, self.precision_dtype = tokenizer_uri, precision_dtype
        self.folder = RunFolder.at(run_folder) if run_folder else None
        self.pending: dict[Any, int] = {}
        self.exported: dict[int, str] = {}
        self.seconds = 0.0  # the recorded evaluations' own seconds (`eval/seconds`), on their own resources
        self._tokenizer = None

    def due(self, step: int) -> bool:
        return step in self.steps

    def export_and_submit(self, model, step: int) -> None:
        """Rank 0: write `model` (every rank gathered it: `scaling.train.full_model`) to the run's folder
        and start its evaluation."""
        if self.rank != 0:
            return
        if self.folder is None:
            self.logger.set_tags({f"{names.TAG_EVAL_FAILED_PREFIX}{step}": "no run folder on the storage to export to"})
            return
        target = self.folder.export(step)
        try:
            self._write(model, target)
        except Exception as exc:  # noqa: BLE001 -- a failed export is a failed evaluation, not a failed run
            self.logger.set_tags({f"{names.TAG_EVAL_FAILED_PREFIX}{step}": f"export: {one_line(exc)}"})
            return
        self._submit(target, step)

    def submit_unrecorded(self, recorded: set[int], upto: int) -> list[int]:
        """Rank 0 of a run resumed after its last step: evaluate again each export up to `upto` whose
        results its record lacks (`recorded`: the steps it has), as an earlier life may have died before
        it recorded them (its last evaluations are finished beside the chain's next run). The steps."""
        if self.rank != 0 or self.folder is None:
            return []
        again = [step for step in sorted(self.steps) if step <= upto and step not in recorded
                 and storage.exists(storage.join(self.folder.export(step), "config.json"))]
        for step in again:
            self._submit(self.folder.export(step), step)
        return again

    def _submit(self, target: str, step: int) -> None:
        import ray

        remote = ray.remote(evaluate_remote).options(max_retries=1, **self.config.ray_options())
        self.pending[remote.remote(target, self.config, self.seed)] = step
        self.exported[step] = target

    def collect(self, wait: bool = False) -> None:
        """Rank 0: record every evaluation that has finished (all of them, waiting, with `wait`)."""
        import ray

        if self.rank != 0 or not self.pending:
            return
        done, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=None if wait else 0)
        for ref in done:
            step = self.pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 -- lost node, model that would not load: recorded, run goes on
                self.logger.set_tags({f"{names.TAG_EVAL_FAILED_PREFIX}{step}": one_line(exc)})
                continue
            self._record(result, step)

    def finish(self) -> None:
        """Rank 0, at the end: wait for the rest, name the final model's folder."""
        self.collect(wait=True)
        if self.rank == 0 and self.exported:
            self.logger.set_tags({names.TAG_MODEL_DIR: self.exported[max(self.exported)]})

    def _record(self, result, step: int) -> None:
        self.seconds += result.metrics.get(names.EVAL_SECONDS, 0.0)
        self.logger.log_metrics(result.metrics, step)
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / names.ARTIFACT_EVAL_JSON
            path.write_text(result.to_json(), encoding="utf-8")
            self.logger.log_artifact(path, str(Path(names.eval_artifact_path(step)).parent))
            for task, text in result.samples_jsonl().items():  # per-item results (eval.log_samples)
                where = Path(names.eval_samples_path(step, task))
                sample_path = Path(directory) / where.name
                sample_path.write_text(text, encoding="utf-8")
                self.logger.log_artifact(sample_path, str(where.parent))
        if result.failures:
            self.logger.set_tags({f"{names.TAG_EVAL_FAILED_PREFIX}{step}":
                                  json.dumps(result.failures, sort_keys=True)[:4000]})

    def _write(self, model, target: str) -> None:
        from scaling.evaluate import save_model_for_eval

        tokenizer = self._load_tokenizer()
        if storage.is_local(target):
            save_model_for_eval(model, storage.filesystem(target)[1], tokenizer=tokenizer)
            return
        with tempfile.TemporaryDirectory() as directory:
            local = save_model_for_eval(model, Path(directory) / "model", tokenizer=tokenizer)
            storage.copy_tree(str(local), target)

    def _load_tokenizer(self):
        if self._tokenizer is None and self.tokenizer_uri:
            from transformers import AutoTokenizer

            if storage.is_local(self.tokenizer_uri):
                self._tokenizer = AutoTokenizer.from_pretrained(storage.filesystem(self.tokenizer_uri)[1])
            else:
                with tempfile.TemporaryDirectory() as directory:
                    storage.copy_tree(self.tokenizer_uri, directory)
                    self._tokenizer = AutoTokenizer.from_pretrained(directory)
        return self._tokenizer


def publish_tokenizer(name_or_path: str, root: str) -> str:
    """The study's tokenizer as a Hugging Face folder on the storage every node reaches (once per
    tokenizer): what every exported model folder carries, so lm-eval can read it."""
    import hashlib

    from scaling.data import build_tokenizer

    tokenizer = build_tokenizer(name_or_path)
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
    target = storage.join(root, f"tokenizer-{digest}")
    if storage.exists(storage.join(target, "tokenizer_config.json")):
        return target
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        storage.copy_tree(directory, target)
    return target
