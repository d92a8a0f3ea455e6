"""What a user sees on the terminal: one-line errors, progress lines, quiet third-party logs.

Every entry point runs its body through `run_cli`, so a `DispersionScalingError` prints as one
line (`prog: error: ...`, exit 2) and Ctrl-C exits 130 without a traceback. Workers' output
stays in Ray's log files (`connect_ray` turns off log forwarding); the driver prints one
progress line per run at a time (`format_progress`) and the summaries. Light on purpose:
`analysis` uses it, so nothing heavy is imported here.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
import warnings
from typing import Callable, Sequence

from scaling.errors import ConfigError, DispersionScalingError

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
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reading runs back (analysis, waves)
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


def format_count(value: float | None) -> str:
    """A count as tables, tick labels and the dry run show it: 165K, 124M, 1.56B, 3.2T, 3.20e+18 beyond
    trillions; `–` when missing or not finite."""
    if value is None or not math.isfinite(value):
        return "–"
    if abs(value) >= 1e15:
        return f"{value:.2e}"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


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


def significant(value, digits: int = 4) -> str:
    """A value as a table shows it: floats to 4 significant digits (`7.093`, `0.8124`), integers whole (`25,472`),
    `-` when missing, anything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:#.{digits}g}".rstrip(".")  # '#' keeps trailing zeros: 6.660 lines up with 6.649
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Rows of dicts as an aligned text table: `columns` are (key, header); numbers at 4 significant digits,
    right-aligned; text left-aligned. What a terminal shows instead of a raw data frame."""
    cells = [[significant(row.get(key)) for key, _ in columns] for row in rows]
    numeric = [all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows) for key, _ in columns]
    widths = [max([len(header)] + [len(line[i]) for line in cells]) for i, (_, header) in enumerate(columns)]

    def line(values):
        return "  ".join(value.rjust(width) if right else value.ljust(width)
                         for value, width, right in zip(values, widths, numeric)).rstrip()

    return "\n".join([line([header for _, header in columns]), "  ".join("-" * width for width in widths)]
                     + [line(values) for values in cells])


class StudyProgress:
    """Study-level progress for the console: runs done of all runs, time elapsed and an estimate of what is
    left. Chains of runs train side by side, each in its own worker group; a chain's runs left are estimated at
    its own pace (wall time per run since its first run ended, so the group's start-up is not counted twice;
    after one run, that run's seconds; before any, the other chains' pace), and the study's time left is its
    slowest chain's. Thread-safe: each chain reports from its own thread."""

    def __init__(self, planned: int = 0, clock: Callable[[], float] = time.monotonic):
        """`planned`: the runs known at the start (chains register theirs as they start; a sweep adds some)."""
        self._planned = planned
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._chains: list[dict] = []

    def chain(self, runs: int) -> "ChainProgress":
        """Register a chain of `runs` runs starting now."""
        with self._lock:
            self._chains.append({"runs": runs, "done": 0, "trained": 0, "first_end": None, "first_s": None})
            return ChainProgress(self, len(self._chains) - 1)

    def _ended(self, index: int, trained: bool, seconds: float | None) -> str:
        """One run of chain `index` ended (trained: it took time; else skipped); the line's progress part."""
        with self._lock:
            chain = self._chains[index]
            chain["done"] += 1
            if trained:
                chain["trained"] += 1
                if chain["first_end"] is None:
                    chain["first_end"], chain["first_s"] = self._clock(), seconds
            return self._describe(index)

    def _pace(self, chain: dict, now: float) -> float | None:
        """Seconds per run of a chain so far, or None before its first run ended."""
        if chain["trained"] >= 2:
            return (now - chain["first_end"]) / (chain["trained"] - 1)
        if chain["trained"] == 1:
            return chain["first_s"] if chain["first_s"] else None
        return None

    def _describe(self, index: int) -> str:
        now = self._clock()
        done = sum(c["done"] for c in self._chains)
        registered = sum(c["runs"] for c in self._chains)
        total = max(self._planned, registered)
        paces = [pace for c in self._chains if (pace := self._pace(c, now)) is not None]
        left = [None] if done < total and self._planned > registered else []
        for c in self._chains:
            if c["done"] < c["runs"]:
                pace = self._pace(c, now)
                pace = pace if pace is not None else (max(paces) if paces else None)
                left.append(pace * (c["runs"] - c["done"]) if pace is not None else None)
        remaining = "done" if not left else (
            f"about {format_duration(max(left))} left" if None not in left else "time left not known yet")
        chain = self._chains[index]
        where = f"; chain {index + 1}: {chain['done']}/{chain['runs']}" if len(self._chains) > 1 else ""
        return f"[{done}/{total} runs{where}; {format_duration(now - self._started)} elapsed, {remaining}]"


class ChainProgress:
    """One chain's handle on the study's progress (`StudyProgress.chain`)."""

    def __init__(self, study: StudyProgress, index: int):
        self.study, self.index = study, index

    @property
    def label(self) -> str:
        return f"chain {self.index + 1}"

    def ended(self, trained: bool = True, seconds: float | None = None) -> str:
        """A run of this chain ended (`seconds`: how long it trained; `trained` False: skipped, finished before)."""
        return self.study._ended(self.index, trained, seconds)


WORKER_POOL_WARNING = "worker processes have been started on node"
WORKER_POOL_EXPLAINED = ("Ray started more worker processes than it expects to start at once on this machine "
                         "(each chain's workers, its Ray Train controller, data and evaluation tasks): expected "
                         "when runs go side by side on few CPUs; it only slows start-up (shown once)")


def explain_ray_worker_warning(prefix: str = LOG_PREFIX) -> None:
    """Replace Ray's "N PYTHON worker processes ... 4x the maximum expected startup concurrency" warning (the
    raylet's, printed by the driver; its pointer to a GitHub issue does not apply here) with one line that says
    what it means for a study, once. Ray prints it through a private function: if that moves, Ray's own line
    shows as before."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = ray_worker.print_to_stdstream
    if getattr(original, "explains_worker_pool", False):
        return
    shown = threading.Event()

    def print_to_stdstream(data, *args, **kwargs):
        lines = data.get("lines") or []
        if data.get("pid") == "raylet" and any(WORKER_POOL_WARNING in line for line in lines):
            kept = [line for line in lines if WORKER_POOL_WARNING not in line]
            if not shown.is_set():
                shown.set()
                print(f"{prefix} note: {WORKER_POOL_EXPLAINED}", flush=True)
            if not kept:
                return None
            data = {**data, "lines": kept}
        return original(data, *args, **kwargs)

    print_to_stdstream.explains_worker_pool = True
    ray_worker.print_to_stdstream = print_to_stdstream
