"""A training run's own folder on the study's storage: its name, its layout, its checkpoints and how it ended.

`RunFolder` is the one owner of a run's folder: nothing else builds a path inside it (tests/test_layout.py
guards this). `<storage_path>/<study>-<run slug>-<hash>/` (a sweep trial: `<study>-<rung>-trial-<trial id>/`)
holds:

- `checkpoints/step_0000100/`: one DeepSpeed checkpoint per saved step, every rank's files, and a
  `COMPLETE` file that rank 0 writes once every rank has written its part (a folder without it is an
  interrupted save and is never read). The newest `num_to_keep` complete ones are kept.
- `outcome.json`: written by rank 0 when the run ends (finished, or failed with its reason), after its
  MLflow records are flushed, with its last report. The driver reads a run's outcome here.
- `mlflow-spill/<run id>.jsonl`: what rank 0 could not write to MLflow during an outage (a local or mounted
  folder only), so a resumed life sends what its earlier life spilled.
- `hf/step_0000120/`: the model exported for a downstream evaluation at that step (`scaling.evaluations`).

Checkpoints and outcomes live with the run, not with the Ray Train worker group that trained it, so
one worker group can train several runs in turn (`scaling.runs`): whichever group picks a run up
resumes it from its own latest checkpoint, and skips it once it has an outcome.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from scaling import storage

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
OUTCOME = "outcome.json"
SPILL = "mlflow-spill"
EXPORTS = "hf"

DEEPSPEED_CHECKPOINT_CLASSES = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                                "deepspeed.runtime.zero.config.ZeroStageEnum",
                                "deepspeed.utils.tensor_fragment.fragment_address")
"""The only non-tensor classes DeepSpeed's own checkpoints hold (ZeRO 0-3, fp32 and bf16): loading
allows these and nothing else, so a tampered checkpoint cannot run code when it is unpickled."""


def step_tag(step: int) -> str:
    return f"step_{step:07d}"


@dataclass(frozen=True)
class RunFolder:
    """One run's folder: where it is (`uri`, a local path or a storage URI) and what lives in it. Build one with
    `for_run` (a study's fixed arms and reruns), `for_trial` (a sweep trial) or `at` (a folder named before)."""

    uri: str

    @classmethod
    def at(cls, folder: str | RunFolder) -> RunFolder:
        return folder if isinstance(folder, RunFolder) else cls(folder)

    @classmethod
    def for_run(cls, storage_path: str, study: str, slug: str, config_hash: str) -> RunFolder:
        """`<storage>/<study>-<slug>-<hash>`: the same resolved config always maps to the same folder."""
        return cls._named(storage_path, f"{study}-{slug}-{config_hash[:8]}")

    @classmethod
    def for_trial(cls, storage_path: str, study: str, rung: str, trial_id: str) -> RunFolder:
        """`<storage>/<study>-<rung>-trial-<trial id>`: a resumed search finds its trial's folder by the trial id."""
        return cls._named(storage_path, f"{study}-{rung}-trial-{trial_id}")

    @classmethod
    def _named(cls, storage_path: str, name: str) -> RunFolder:
        return cls(storage.join(storage.resolve_storage_path(storage_path), name))

    @property
    def name(self) -> str:
        """The folder's own name: the Ray Train name of a chain of one run."""
        return self.uri.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def checkpoints(self) -> str:
        return storage.join(self.uri, CHECKPOINTS)

    def checkpoint(self, tag: str) -> str:
        return storage.join(self.uri, CHECKPOINTS, tag)

    @property
    def outcome(self) -> str:
        return storage.join(self.uri, OUTCOME)

    @property
    def spill_dir(self) -> str | None:
        """`<run folder>/mlflow-spill` when the folder is a local (or mounted) path, so a resumed run finds
        what its earlier life spilled; None (RunLogger's default temp folder) on object storage."""
        return os.path.join(self.uri, SPILL) if "://" not in self.uri else None

    @property
    def exports(self) -> str:
        return storage.join(self.uri, EXPORTS)

    def export(self, step: int) -> str:
        """The Hugging Face folder of the model exported at `step` (a downstream evaluation's input)."""
        return storage.join(self.uri, EXPORTS, step_tag(step))

    # --- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, engine, step: int, client_state: dict[str, Any], keep: int) -> None:
        """Every rank: write this step's DeepSpeed checkpoint into the run's folder, then mark it complete
        (rank 0, once all ranks wrote) and delete the older ones beyond `keep`. On object storage the files
        are written locally first and copied up."""
        import torch.distributed as dist

        root = self.checkpoints
        tag = step_tag(step)
        if storage.is_local(root):
            try:
                engine.save_checkpoint(_local_path(root), tag=tag, client_state=client_state)
            except Exception as exc:
                raise _named_if_full(exc, _local_path(root)) from exc
        else:
            with tempfile.TemporaryDirectory(prefix="checkpoint-") as local:
                engine.save_checkpoint(local, tag=tag, client_state=client_state)
                storage.copy_tree(os.path.join(local, tag), self.checkpoint(tag))
        dist.barrier()  # every rank's files are on the storage
        if dist.get_rank() == 0:
            storage.write_text(storage.join(self.checkpoint(tag), COMPLETE), f"{step}\n")
            for older in self.complete_checkpoints()[keep:]:
                storage.remove_tree(older)
            for unfinished in self._incomplete_checkpoints(before=tag):
                storage.remove_tree(unfinished)

    def complete_checkpoints(self) -> list[str]:
        """The run's complete checkpoints (folder URIs), newest first."""
        return [self.checkpoint(tag) for tag in self._tags()
                if storage.exists(storage.join(self.checkpoint(tag), COMPLETE))]

    def trained_to(self, steps: int) -> bool:
        """The run saved its last step's checkpoint (complete): it trained to its end, whatever became of
        its records after."""
        return storage.exists(storage.join(self.checkpoint(step_tag(steps)), COMPLETE))

    def restore_checkpoint(self, engine, device) -> tuple[dict | None, list[str]]:
        """Load the run's newest readable checkpoint, every rank agreeing on which: (client state, one line
        per newer checkpoint that could not be read). (None, []) when the run has none yet. Raises when it
        has some but none can be read: a run never restarts silently from step 0.

        Files are unpickled with torch's weights-only loader (DeepSpeed asks for the full unpickler; the
        environment switch overrides it), allowing DeepSpeed's own checkpoint classes only.
        """
        import torch

        from scaling.errors import TrainingFailure

        candidates = sorted(self.complete_checkpoints() + self._legacy_checkpoints(),
                            key=lambda uri: uri.rsplit("/", 1)[1], reverse=True)  # newest step first
        if not candidates:
            return None, []
        allowed = [getattr(importlib.import_module(path.rpartition(".")[0]), path.rpartition(".")[2])
                   for path in DEEPSPEED_CHECKPOINT_CLASSES]
        skipped = []
        for candidate in candidates:
            parent, tag = candidate.rsplit("/", 1)
            state, problem = None, None
            saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
            try:
                with _readable(parent, tag) as local, torch.serialization.safe_globals(allowed):
                    path, state = engine.load_checkpoint(local, tag=tag)
                if path is None or not state or "step" not in state:
                    problem = "no DeepSpeed checkpoint in it"
            except Exception as exc:  # noqa: BLE001 -- truncated, corrupt or missing files: try the one before
                problem = _brief(exc)
            finally:
                if saved is None:
                    os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
                else:
                    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved
            ok = torch.tensor([0 if problem else 1], device=device)
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)  # a checkpoint every rank can read
            if int(ok.item()):
                return state, skipped
            skipped.append(f"{candidate.rsplit('/', 2)[1] + '/' if '/checkpoint_' in candidate else ''}{tag}: "
                           f"{problem or 'unreadable on another rank'}")
        raise TrainingFailure(f"no readable checkpoint to resume from ({'; '.join(skipped)}); the run is not "
                              f"restarted from step 0: delete {self.checkpoints} to start it over")

    def _legacy_checkpoints(self) -> list[str]:
        """Checkpoints Ray Train kept for this run before runs had their own (`<folder>/checkpoint_<date>/step_*`,
        written by earlier versions of this code): still resumed from, so an unfinished run is never restarted."""
        from pyarrow import fs

        found, path = storage.filesystem(self.uri)
        try:
            infos = found.get_file_info(fs.FileSelector(path, allow_not_found=True))
            kept = [info.base_name for info in infos
                    if info.type == fs.FileType.Directory and info.base_name.startswith("checkpoint_")]
            return [storage.join(self.uri, name, tag.base_name) for name in kept
                    for tag in found.get_file_info(fs.FileSelector(f"{path}/{name}"))
                    if tag.type == fs.FileType.Directory and tag.base_name.startswith("step_")]
        except OSError:
            return []

    def _tags(self) -> list[str]:
        """Checkpoint folder names (`step_0000100`), newest first."""
        from pyarrow import fs

        found, path = storage.filesystem(self.checkpoints)
        try:
            infos = found.get_file_info(fs.FileSelector(path, allow_not_found=True))
        except OSError:
            return []
        return sorted((info.base_name for info in infos
                       if info.type == fs.FileType.Directory and info.base_name.startswith("step_")), reverse=True)

    def _incomplete_checkpoints(self, before: str) -> list[str]:
        """Folders of saves interrupted before `before` was written (never to be read)."""
        return [self.checkpoint(tag) for tag in self._tags()
                if tag < before and not storage.exists(storage.join(self.checkpoint(tag), COMPLETE))]

    # --- outcome --------------------------------------------------------------------------------

    def write_outcome(self, *, failure: str | None, report: dict[str, Any], seconds: float) -> None:
        """Rank 0, at the end of the run (its records flushed): finished, or failed with `failure`."""
        storage.write_text(self.outcome, json.dumps({"failure": failure, "report": report, "seconds": seconds,
                                                     "ended_at": time.time()}, default=float))

    def read_outcome(self) -> dict[str, Any] | None:
        """{"failure": str | None, "report": {...}, "seconds": s, "ended_at": epoch s} of a run that ended
        (seconds: its last life, start-up to outcome; ended_at: absent in outcomes of earlier versions), or None
        while it has not."""
        text = storage.read_text(self.outcome)
        return json.loads(text) if text else None

    def clear_outcome(self) -> None:
        """Before a failed run is tried again: without this, its worker group would skip it."""
        found, path = storage.filesystem(self.outcome)
        try:
            found.delete_file(path)
        except OSError:  # not there
            pass


# --- the same for a folder given as a string (the trainer's `RunTask.folder`) ---------------------------


def save_checkpoint(engine, folder: str | RunFolder, step: int, client_state: dict[str, Any], keep: int) -> None:
    RunFolder.at(folder).save_checkpoint(engine, step, client_state, keep)


def complete_checkpoints(folder: str | RunFolder) -> list[str]:
    return RunFolder.at(folder).complete_checkpoints()


def restore_checkpoint(engine, folder: str | RunFolder, device) -> tuple[dict | None, list[str]]:
    return RunFolder.at(folder).restore_checkpoint(engine, device)


def write_outcome(folder: str | RunFolder, *, failure: str | None, report: dict[str, Any], seconds: float) -> None:
    RunFolder.at(folder).write_outcome(failure=failure, report=report, seconds=seconds)


def read_outcome(folder: str | RunFolder) -> dict[str, Any] | None:
    return RunFolder.at(folder).read_outcome()


def clear_outcome(folder: str | RunFolder) -> None:
    RunFolder.at(folder).clear_outcome()


# --- helpers ------------------------------------------------------------------------------------

FULL_BELOW_BYTES = 16 * 2**20


def _named_if_full(exc: Exception, path: str) -> Exception:
    """torch's writer reports a full volume as "enforce fail ... unexpected pos ...", without the OS's
    words: when the volume has (almost) no space left, say so, so the run's failure names the fix."""
    import errno
    import shutil

    try:
        full = shutil.disk_usage(path).free < FULL_BELOW_BYTES
    except OSError:
        return exc
    if not full or isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return exc
    return OSError(errno.ENOSPC, f"No space left on device: saving a checkpoint in {path} failed ({exc})")


class _readable:
    """A local folder holding `<parent>/<tag>`: the folder itself when local, else a downloaded copy."""

    def __init__(self, parent: str, tag: str):
        self.parent, self.tag, self._temp = parent, tag, None

    def __enter__(self) -> str:
        if storage.is_local(self.parent):
            return _local_path(self.parent)
        self._temp = tempfile.TemporaryDirectory(prefix="checkpoint-")
        storage.copy_tree(storage.join(self.parent, self.tag), os.path.join(self._temp.name, self.tag))
        return self._temp.name

    def __exit__(self, *exc):
        if self._temp is not None:
            self._temp.cleanup()


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def _brief(exc: BaseException) -> str:
    """One line of a load failure: torch's weights-only unpickler puts the reason ("... unsupported
    GLOBAL posix.system ...") in the middle of a long message, other errors on their last line."""
    import re

    from scaling.errors import one_line

    reason = re.search(r"[^\n]*unsupported [^\n]*", str(exc), flags=re.IGNORECASE)
    return f"{type(exc).__name__}: {reason.group(0).strip()}"[:300] if reason else one_line(exc, 300)


