"""Where a study's records live and what produced them: the MLflow URI and the git commit.

Pure Python (no mlflow, torch or Ray at import), so `analysis` resolves the store exactly as
the trainer does.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scaling import names


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The given URI, else $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory.

    Relative SQLite paths are made absolute so that Ray workers (other working directories)
    and the analysis write and read the same file as the driver.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or names.DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for any other store)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


def git_commit(cwd: str | Path | None = None) -> str:
    """The commit of the checkout at `cwd` (default: this package's), with '+dirty' when tracked
    files have changes; "unknown" outside a git checkout."""
    cwd = cwd if cwd is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if commit and dirty else "")


def ui_link(tracking_uri: str, page: str) -> str:
    """Where to open `page` (an MLflow UI fragment such as `#/experiments/1/runs/abc`): the server's
    own address for an http store, the local `mlflow ui` default for a SQLite file."""
    if tracking_uri.startswith("http"):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"http://127.0.0.1:5000/{page}  (after: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000)"
