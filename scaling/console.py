"""What a user sees on the terminal: one-line errors, progress lines, quiet third-party logs.

Every entry point runs its body through `run_cli`, so a `DispersionScalingError` prints as one
line (`prog: error: ...`, exit 2) and Ctrl-C exits 130 without a traceback. Workers' output
stays in Ray's log files (`connect_ray` turns off log forwarding); the driver prints one
progress line per run at a time (`format_progress`) and the summaries. Light on purpose:
`analysis` uses it, so nothing heavy is imported here.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Callable

from scaling.errors import DispersionScalingError

LOG_PREFIX = "[dispersion-scaling]"
NOISY_LOGGERS = ("mlflow", "alembic", "ray", "ray.train", "ray.tune", "ray.data", "DeepSpeed", "deepspeed",
                 "transformers", "datasets", "urllib3", "filelock", "optuna")
"""Libraries whose INFO chatter (database migrations, accelerator detection, resource requests)
hides the lines a user wants; their warnings and errors still show."""


def say(message: str) -> None:
    """One line of the driver's own output."""
    print(f"{LOG_PREFIX} {message}", flush=True)


def run_cli(body: Callable[[], int], prog: str) -> int:
    """Run an entry point's body: user errors become one line on stderr (exit 2), Ctrl-C exit 130."""
    try:
        return body()
    except DispersionScalingError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # a python outside the project's venv, or a partial install
        if exc.name is None or exc.name.split(".")[0] in ("scaling", "analysis"):
            raise
        print(f"{prog}: error: the Python package {exc.name!r} is not installed in {sys.executable}; activate the "
              "project's venv (. .venv/bin/activate) or install it: pip install -e . (README.md, set-up)",
              file=sys.stderr)
        return 2


def stop_on_sigterm() -> None:
    """SIGTERM (a scheduler, `kill`) stops a driver as Ctrl-C does: the study marks its runs killed
    and releases its workers, instead of dying with runs left RUNNING."""
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def quiet_libraries() -> None:
    """Lower third-party INFO logs and deprecation chatter to warnings (real warnings still show)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")


def quiet_ray_data_console() -> None:
    """After `import ray.data`, which installs its own handlers: its console handler shows warnings only,
    its session log file under /tmp/ray keeps everything."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    from ray.util.debug import log_once

    log_once("ray_data_progress_manager_disabled")  # spend its one-time "progress bars disabled" warning: ours show


def quiet_ray_before_init() -> None:
    """Before `ray.init`: no usage-stats banner; third-party chatter lowered; Tune's own console output
    (an experiment box, result paths, a TensorBoard hint) left out: the driver prints each trial's progress."""
    quiet_libraries()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with the older reporter, verbose=0 prints nothing


def format_duration(seconds: float | None) -> str:
    """`42s`, `3m05s`, `1h02m`; `?` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_progress(label: str, step: int, total: int, loss: float | None, tokens_per_s: float | None,
                    eta_s: float | None) -> str:
    """`tiny-165K dispersion s0  step 120/300  loss 5.712  2,310 tok/s  ETA 1m20s`."""
    parts = [f"{label:<32}", f"step {step}/{total}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if tokens_per_s is not None:
        parts.append(f"{tokens_per_s:,.0f} tok/s")
    parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


def check_writable_dir(path, flag: str = "--out") -> None:
    """Refuse an output folder that cannot be created or written, before any long work, and leave
    nothing behind: folders made for the probe are removed again."""
    from pathlib import Path

    from scaling.errors import ConfigError

    directory = Path(path).absolute()
    missing = []
    cursor = directory
    while not cursor.exists() and cursor != cursor.parent:
        missing.append(cursor)
        cursor = cursor.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag} {str(path)!r} is not a writable folder ({exc.strerror or exc}); "
                          "pick a folder you can write to") from None
    finally:
        for folder in missing:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                pass
