"""Where a study's records live and what produced them: the MLflow URI, the MLflow UI's links, the git commit.

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


LOCAL_UI = "http://127.0.0.1:5000"
"""Where `ui_command` serves a local store's UI."""


def ui_command(tracking_uri: str) -> str:
    """The command that serves a local store (a SQLite file) in the MLflow UI at `LOCAL_UI`."""
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


def ui_link(tracking_uri: str, page: str) -> str:
    """Where to open `page` (an MLflow UI fragment such as `#/experiments/1/runs/abc`): the server's
    own address for an http store, else `LOCAL_UI` after `ui_command`."""
    if tracking_uri.startswith("http"):
        return f"{tracking_uri.rstrip('/')}/{page}"
    return f"{LOCAL_UI}/{page}  (after: {ui_command(tracking_uri)})"


TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
"""URI schemes MLflow keeps a tracking store under (`postgresql+psycopg2://` counts as postgresql)."""
PROBE_TIMEOUT_S = 5.0


def tracking_uri_problem(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """'' when `uri` names a store MLflow can use and, for a server, the server answers an HTTP request within
    `timeout_s`; else the problem in a few words. Pure Python (no mlflow import) and fast: MLflow's own client
    retries a dead server for minutes, so every command that talks to MLflow asks this first."""
    if "://" not in uri:
        return ""  # a plain path: MLflow's file store
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES:
        return (f"scheme {scheme[:20]!r} is not an MLflow store; use sqlite:///PATH, http(s)://HOST:PORT, file:///PATH, "
                "postgresql://, mysql://, mssql:// or databricks")
    if scheme not in ("http", "https"):
        return ""
    import ssl
    import urllib.error
    import urllib.parse
    import urllib.request

    try:
        parts = urllib.parse.urlsplit(uri)
        host, port = parts.hostname, parts.port  # the port raises ValueError when it is not a number
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if not host:
        return "the URL names no host"
    address = f"[{host}]" if ":" in host else host
    health = f"{scheme}://{address}{f':{port}' if port else ''}{parts.path.rstrip('/')}/health"
    try:
        urllib.request.urlopen(health, timeout=timeout_s).close()  # noqa: S310 -- http(s) only, checked above
    except urllib.error.HTTPError:
        return ""  # it answered (a proxy's 404 or 401 still means a live server)
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):
            return ""  # it answered with TLS; MLflow's own client settles certificates
        return f"no answer: {exc.reason}"[:200]
    except (OSError, ValueError) as exc:  # a timeout mid-answer, a malformed URL
        return f"no answer within {timeout_s:g} s ({type(exc).__name__}: {exc})"[:200]
    return ""


# --- MLflow UI links: each opens in the model-training view (MLflow 3 opens a bare run or compare link in its
# GenAI view, whatever the experiment's kind) ------------------------------------------------------------

TRAINING_VIEW = "workflowType=machine_learning"


def runs_page(experiment_id: str) -> str:
    """The MLflow UI path of a study's runs table."""
    return f"#/experiments/{experiment_id}/runs?{TRAINING_VIEW}"


def view_page(experiment_id: str, view_id: str = names.STUDY_VIEW_ID) -> str:
    """The runs table opened in a saved view (`scaling.tracking.Tracker.save_view`): the study's by default."""
    return f"{runs_page(experiment_id)}&{names.VIEW_URL_PARAM}={view_id}"


def run_page(experiment_id: str, run_id: str) -> str:
    """One run's page (an analysis run: its report and claims)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_VIEW}"


def compare_page(experiment_id: str, run_ids) -> str:
    """MLflow's compare page for runs of one experiment: scatter, box and parallel-coordinates plots of their
    params and metrics (N, log10_N, lambda, val/loss, ...)."""
    import json
    from urllib.parse import quote

    runs = quote(json.dumps(list(run_ids), separators=(",", ":")))
    return f"#/compare-runs?runs={runs}&experiments={quote(json.dumps([experiment_id]))}&{TRAINING_VIEW}"
