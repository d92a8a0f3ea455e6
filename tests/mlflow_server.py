"""A real MLflow tracking server in a child process, to kill, freeze and restart in tests.

Two ways to serve one SQLite store and one artifact folder over HTTP:
- `cli=True`: `python -m mlflow server --workers 1`, exactly what users run (uvicorn plus MLflow's
  job runner); it took 20-75 s to answer on a busy 2-core machine;
- `cli=False`: MLflow's own Flask tracking app (`mlflow.server.app`, what its gunicorn/waitress
  modes serve) in one process with werkzeug's threaded server: same handlers and store, answers in
  about 8 s once the database exists, so the default test run can afford restarts.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

_FLASK_SERVER = """
import os, sys
from mlflow.server.constants import (ARTIFACT_ROOT_ENV_VAR, ARTIFACTS_DESTINATION_ENV_VAR,
                                     BACKEND_STORE_URI_ENV_VAR, SERVE_ARTIFACTS_ENV_VAR)
host, port, store, artifacts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ.update({BACKEND_STORE_URI_ENV_VAR: store, SERVE_ARTIFACTS_ENV_VAR: "true",
                   ARTIFACT_ROOT_ENV_VAR: "mlflow-artifacts:/", ARTIFACTS_DESTINATION_ENV_VAR: artifacts})
from mlflow.server import app
from werkzeug.serving import make_server
make_server(host, port, app, threaded=True).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """One server on 127.0.0.1 over `folder/mlflow.db`; `start`, `kill` (SIGKILL), `freeze`/`thaw`."""

    def __init__(self, folder: Path, *, cli: bool = False, port: int | None = None):
        self.folder, self.cli = Path(folder), cli
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, wait: bool = True, timeout_s: float = 240) -> float:
        """Start the server; with `wait`, return once it answers (seconds it took)."""
        store, artifacts = f"sqlite:///{self.folder / 'mlflow.db'}", str(self.folder / "artifacts")
        if self.cli:
            command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                       "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(self.port),
                       "--workers", "1"]
        else:
            command = [sys.executable, "-c", _FLASK_SERVER, "127.0.0.1", str(self.port), store, artifacts]
        self.starts += 1
        log = open(self.folder / f"server-{self.starts}.log", "wb")
        # Its own process group: killing it kills uvicorn's workers and the job runner too.
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "MLFLOW_LOGGING_LEVEL": "WARNING"})
        return self.wait_ready(timeout_s) if wait else 0.0

    def wait_ready(self, timeout_s: float = 240) -> float:
        """Seconds until the server answered a call that reads its store."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"MLflow server exited ({self.process.returncode}); see {self.folder}/server-*.log")
            try:  # a call that reaches the store (the first one creates or checks the database)
                with urllib.request.urlopen(f"{self.uri}/api/2.0/mlflow/experiments/get?experiment_id=0",
                                            timeout=max(1.0, timeout_s - (time.monotonic() - started))) as reply:
                    if reply.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"MLflow server at {self.uri} did not answer within {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL the whole server (as a crash or an OOM kill would), and wait until it is gone."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def freeze(self) -> None:
        """SIGSTOP: the server accepts connections but answers nothing (a hung server)."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            self.thaw()
        self.kill()
