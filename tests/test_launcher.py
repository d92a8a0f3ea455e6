"""The cluster launcher path for real, on this machine: `clusters/start_head.sh` on its own, then
`ray up` / `ray submit` / `ray job submit` / `ray exec` / `ray down` with `clusters/local.yaml`
against an SSH server on 127.0.0.1.

    pytest -m slow tests/test_launcher.py -s        # -s prints the timings

The end-to-end test needs root, util-linux (`unshare`, `nsenter`), iproute2, and
`apt-get install -y openssh-server rsync`; it skips, saying what is missing, otherwise. Its
"head" is this machine seen through Linux namespaces, so that nothing of the machine or of other
programs on it is touched: a network namespace (the head's IP is 198.51.100.10, a documentation
address MLflow's default host list does not cover; ports 22, 5000, 6379, 8265 are private to the
test), a PID namespace (the launcher's `ray stop` sees only the test's processes; stopping the
namespace's sshd stops everything in it), and a mount namespace in which a fresh home folder (the
distribution's /etc/skel), /tmp and /run are the test's own folders. sshd runs there with its own
host key, authorized key, config and pid file. The launcher CLI runs in the host's filesystem,
inside the network namespace (`nsenter --net`). The test config is clusters/local.yaml with the
head at 127.0.0.1, this user and the test's key, no workers, and `setup_commands` replaced by the
test's Python environment on PATH (offline); everything else, including file_mounts and
head_start_ray_commands, as shipped.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
START_HEAD = ROOT / "clusters" / "start_head.sh"
HEAD_IP = "198.51.100.10"  # TEST-NET-2: not in MLflow's default allowed hosts (loopback, private ranges)
TOOLS = ("unshare", "nsenter", "ip", "sshd", "ssh", "ssh-keygen", "rsync")

pytestmark = pytest.mark.slow


def _api_status(url: str, host: str | None = None) -> int:
    """HTTP status of an MLflow API call, optionally with another Host header (as a tunnel sends)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1")
    if host:
        request.add_header("Host", host)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.2)
    return False


# --- the start-up script on its own --------------------------------------------------------------


def test_start_head_script_starts_mlflow_once_and_admits_the_heads_address(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    port = _free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HEAD_IP"))},
           "HOME": str(home), "MLFLOW_PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    show_uri = [sys.executable, "-c", "import os; print('URI', os.environ['MLFLOW_TRACKING_URI'])"]

    def start(*command, **extra):
        return subprocess.run(["bash", str(START_HEAD), *command], env={**env, **extra}, capture_output=True,
                              text=True, timeout=400)

    pid_file = home / "mlflow" / "server.pid"
    pids = []
    try:
        first = start(*show_uri)
        assert first.returncode == 0, first.stdout + first.stderr
        uri = first.stdout.strip().splitlines()[-1].removeprefix("URI ")
        pids.append(int(pid_file.read_text()))
        head_ip = uri.removeprefix("http://").rsplit(":", 1)[0]
        assert uri == f"http://{head_ip}:{port}" and not head_ip.startswith("127."), uri  # the nodes' address
        assert _api_status(uri) == 200
        assert _api_status(uri, host=f"localhost:{_free_port()}") == 200  # an SSH tunnel from any local port
        assert _api_status(uri, host="attacker.example") == 403  # MLflow's DNS-rebinding guard stays on
        assert (home / ".bashrc").read_text().count("MLFLOW_TRACKING_URI") == 1

        again = start()  # `ray up` once more: the running server is kept
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
        assert int(pid_file.read_text()) == pids[0] and _alive(pids[0])

        moved = start(MLFLOW_ARTIFACTS=str(tmp_path / "elsewhere"))  # other settings: a new server
        assert moved.returncode == 0, moved.stdout + moved.stderr
        pids.append(int(pid_file.read_text()))
        assert pids[1] != pids[0] and _wait_gone(pids[0], 30) and _api_status(uri) == 200
        lines = [line for line in (home / ".bashrc").read_text().splitlines() if "MLFLOW_TRACKING_URI" in line]
        assert lines == [f"export MLFLOW_TRACKING_URI={uri}  # set by dispersion-scaling clusters/start_head.sh"]

        # Someone else's server on the port: a clear error, before `ray start` would run.
        other = tmp_path / "other-home"
        other.mkdir()
        clash = start("touch", str(tmp_path / "ray-started"), HOME=str(other))
        assert clash.returncode != 0 and f"port {port}" in clash.stderr and "MLFLOW_PORT" in clash.stderr
        assert not (tmp_path / "ray-started").exists() and not (other / "mlflow" / "server.pid").exists()
    finally:
        for pid in pids:
            if _alive(pid):
                os.killpg(pid, signal.SIGTERM)  # setsid: the pid is its group's
                if not _wait_gone(pid, 30):
                    os.killpg(pid, signal.SIGKILL)


# --- the launcher end to end ---------------------------------------------------------------------


def _missing_requirements() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (namespaces, and sshd as the head)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists()]
    if missing:
        return f"missing {', '.join(missing)}: apt-get install -y openssh-server rsync iproute2 util-linux"
    probe = subprocess.run(["unshare", "--net", "--pid", "--mount", "--fork", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare is not permitted here: {probe.stderr.decode().strip()}"
    return None


class Sandbox:
    """sshd as PID 1 of new network, PID and mount namespaces; the launcher CLI runs beside it."""

    def __init__(self, base: Path, logs: Path):
        self.base, self.logs = base, logs
        self.home, self.tmp, self.run = base / "home", base / "tmp", base / "run"
        self.key = self.tmp / "sshd" / "client_key"
        self.user = getpass.getuser()
        self.cluster_name = f"dispersion-scaling-test-{os.getpid()}"
        self.process: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.timings: dict[str, float] = {}
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "PYTHONPATH")}
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.bound: list[Path] = []
        self.had_control_parent = self.control_path().parent.exists()

    # set-up ---------------------------------------------------------------------------------------
    def start(self) -> None:
        sshd_dir = self.tmp / "sshd"
        (self.run / "sshd").mkdir(parents=True)  # sshd's privilege-separation folder
        sshd_dir.mkdir(parents=True)
        self.home.mkdir()
        for name in (".bashrc", ".profile"):  # a new account's start-up files
            if Path("/etc/skel", name).exists():
                shutil.copy(Path("/etc/skel", name), self.home / name)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(sshd_dir / name)], check=True)
        shutil.copy(sshd_dir / "client_key.pub", sshd_dir / "authorized_keys")
        # Paths as seen inside the namespace, where this folder's tmp/ is /tmp.
        (sshd_dir / "sshd_config").write_text(textwrap.dedent(f"""\
            ListenAddress 127.0.0.1:22
            HostKey /tmp/sshd/host_key
            AuthorizedKeysFile /tmp/sshd/authorized_keys
            PidFile /tmp/sshd/sshd.pid
            AllowUsers {self.user}
            PermitRootLogin prohibit-password
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            UsePAM no
            StrictModes no
            """))
        real_home = Path.home()
        binds = []
        for path in {Path(sys.executable).resolve(), Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}:
            if real_home in path.parents:  # the interpreter lives in the home folder (pyenv): keep it visible
                top = real_home / path.relative_to(real_home).parts[0]
                binds.append((top, self.home / top.name))
        script = ["set -e", "ip link set lo up", "ip link add v0 type veth peer name v1",
                  f"ip addr add {HEAD_IP}/24 dev v0", "ip link set v0 up", "ip link set v1 up",
                  f"ip route add default via {HEAD_IP.rsplit('.', 1)[0]}.1 dev v0"]
        for source, target in sorted(set(binds)):
            target.mkdir()
            self.bound.append(target)
            script += [f"mount --bind {source} {target}", f"mount -o remount,bind,ro {target}"]
        script += [f"mount --rbind {self.home} {real_home}", f"mount --bind {self.run} /run",
                   f"mount --bind {self.tmp} /tmp", "exec $(command -v sshd || echo /usr/sbin/sshd) -D -e "
                   "-f /tmp/sshd/sshd_config"]
        (self.base / "init.sh").write_text("\n".join(script) + "\n")
        with open(self.logs / "sshd.log", "wb") as log:
            self.process = subprocess.Popen(
                ["unshare", "--net", "--pid", "--mount", "--fork", "--mount-proc", "--kill-child",
                 "bash", str(self.base / "init.sh")], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while self.init_pid is None and time.monotonic() < deadline:
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            text = children.read_text().split() if children.exists() else []
            self.init_pid = int(text[0]) if text else None
            time.sleep(0.1)
        assert self.init_pid, (self.logs / "sshd.log").read_text()
        while time.monotonic() < deadline:
            probe = self.client(["ssh", "-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                                 "-o", "UserKnownHostsFile=/dev/null", f"{self.user}@127.0.0.1", "true"],
                                "ssh-probe", timeout=20, check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError("sshd did not accept the test key:\n" + (self.logs / "sshd.log").read_text())

    def write_config(self) -> Path:
        config = yaml.safe_load((ROOT / "clusters" / "local.yaml").read_text())
        config["cluster_name"] = self.cluster_name
        config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
        config["auth"] = {"ssh_user": self.user, "ssh_private_key": str(self.key)}
        marker = "# dispersion-scaling launcher test"
        config["setup_commands"] = [
            f"grep -q '{marker}' ~/.bashrc || echo 'export PATH={Path(sys.executable).parent}:$PATH "
            f"PYTHONPATH=$HOME/dispersion-scaling  {marker}' >> ~/.bashrc"]
        path = self.base / "cluster.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    # running things -------------------------------------------------------------------------------
    def client(self, args, name, *, timeout=900, check=True, env=None):
        """A command on the 'laptop': this filesystem, the head's network."""
        start = time.monotonic()
        with open(self.logs / f"{name}.log", "w") as log:
            out = subprocess.run(["nsenter", "-t", str(self.init_pid), "-n", "--", *map(str, args)], cwd=ROOT,
                                 env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                 text=True, timeout=timeout)
        self.timings[name] = round(time.monotonic() - start, 1)
        out.output = (self.logs / f"{name}.log").read_text()
        if check:
            assert out.returncode == 0, f"{name} failed ({out.returncode}):\n{out.output[-6000:]}"
        return out

    def client_python(self, code, name):
        """Python on the client side (the head's network); returns what it printed after RESULT, as JSON."""
        out = self.client([sys.executable, "-c", code], name, timeout=120)
        return json.loads(next(line for line in out.output.splitlines() if line.startswith("RESULT "))[7:])

    def head_processes(self) -> list[str]:
        """Command lines of every process in the head's PID namespace."""
        ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and os.readlink(proc / "ns" / "pid") == ns:
                    found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
            except OSError:
                continue
        return found

    # clean-up -------------------------------------------------------------------------------------
    def stop(self) -> None:
        control = self.control_path()
        for proc in Path("/proc").iterdir():  # the launcher's SSH control masters for this cluster
            try:
                if proc.name.isdigit() and str(control).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGTERM)
            except OSError:
                continue
        if self.process is not None:
            if self.init_pid and _alive(self.init_pid):
                os.kill(self.init_pid, signal.SIGTERM)  # PID 1 of the namespace: the kernel stops the rest
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()  # --kill-child takes the namespace down with it
                self.process.wait(timeout=30)
        for target in self.bound:  # read-only bind mounts lived in the namespace only; never delete through one
            assert not os.path.ismount(target) and not any(target.iterdir()), target
            target.rmdir()
        if self.base.exists():
            shutil.rmtree(self.base)
        for leftover in (Path(f"/tmp/ray/cluster-{self.cluster_name}.state"),
                         Path(f"/tmp/ray/cluster-{self.cluster_name}.lock")):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(control, ignore_errors=True)
        if not self.had_control_parent:
            try:
                control.parent.rmdir()  # only when empty: no other cluster of this user uses it
            except OSError:
                pass
        for cached in Path("/tmp").glob("ray-config-*"):  # the launcher's cache of this cluster's config
            try:
                if self.cluster_name in cached.read_text():
                    cached.unlink()
            except OSError:
                continue

    def control_path(self) -> Path:
        # Where Ray's SSHCommandRunner keeps this cluster's SSH control sockets (Ray 2.60).
        user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
        return Path(f"/tmp/ray_ssh_{user}/{hashlib.sha256(self.cluster_name.encode()).hexdigest()[:10]}")


# What `ray up` / `ray submit` would put in the head's home folder, were it this machine's.
HEAD_HOME_FILES = ("dispersion-scaling", "search_spaces", "mlflow", "runs", "run.py", "ray_bootstrap_config.yaml",
                   "ray_bootstrap_key.pem", ".ray")


def _snapshot_home() -> tuple:
    home = Path.home()
    bashrc = home / ".bashrc"
    return (bashrc.read_text() if bashrc.exists() else None, [n for n in HEAD_HOME_FILES if (home / n).exists()])


MLFLOW_RUNS = """
import json
from mlflow.tracking import MlflowClient
client = MlflowClient({uri!r})
experiment = client.get_experiment_by_name({study!r})
runs = client.search_runs([experiment.experiment_id], "tags.kind = 'train'") if experiment else []
print("RESULT", json.dumps([dict(arm=r.data.tags.get("arm"), status=r.info.status, tag_status=r.data.tags.get("status"),
                       val_loss=r.data.metrics.get("val/loss"),
                       artifacts=[a.path for a in client.list_artifacts(r.info.run_id)]) for r in runs]))
"""


def _assert_finished(runs, arms):
    assert sorted(r["arm"] for r in runs) == sorted(arms), runs
    for run in runs:
        assert run["status"] == "FINISHED" and run["tag_status"] == "finished", run
        assert run["val_loss"] is not None and 0 < run["val_loss"] < 20, run
        assert run["artifacts"], f"no artifacts reached the head's MLflow: {run}"


def test_launcher_up_submit_job_exec_down(tmp_path):
    reason = _missing_requirements()
    if reason:
        pytest.skip(reason)
    logs = tmp_path / "logs"
    logs.mkdir()
    home_before = _snapshot_home()
    # Not under the home folder, which the namespace replaces (nor under pytest's tmp, if that is there).
    box = Sandbox(Path(tempfile.mkdtemp(prefix="launcher-test-", dir="/tmp")), logs)
    uri = f"http://{HEAD_IP}:5000"
    study_args = ["search_spaces/smoke.yaml", "--set", "rungs=[tiny-165K]", "--set", "training.max_steps=4"]
    try:
        box.start()
        config = box.write_config()
        box.client(["ray", "up", "-y", config], "ray-up", timeout=900)

        # The head as a login shell sees it (ray submit, ray attach): the URI by the head's address.
        shell = box.client(["ray", "exec", config, "echo URI=$MLFLOW_TRACKING_URI; cat ~/mlflow/server.pid"],
                           "ray-exec-env")
        assert f"URI={uri}" in shell.output
        mlflow_pid = shell.output.split(f"URI={uri}")[1].split()[0]
        # MLflow answers by the head's address; the Ray dashboard only on the head's loopback.
        reach = box.client_python(textwrap.dedent(f"""
            import json, socket, urllib.request
            def open_port(port):
                with socket.socket() as s:
                    s.settimeout(5)
                    return s.connect_ex(({HEAD_IP!r}, port)) == 0
            print("RESULT", json.dumps(dict(mlflow=urllib.request.urlopen({uri!r} + "/api/2.0/mlflow/experiments/search"
                                                                "?max_results=1", timeout=10).status,
                                  dashboard=open_port(8265))))"""), "reach")
        assert reach == {"mlflow": 200, "dashboard": False}

        # `ray up` again (after a code change): MLflow keeps running, ~/.bashrc keeps one URI line.
        box.client(["ray", "up", "-y", config], "ray-up-again", timeout=900)
        again = box.client(["ray", "exec", config, "cat ~/mlflow/server.pid; grep -c MLFLOW_TRACKING_URI ~/.bashrc"],
                           "ray-exec-again")
        assert f"{mlflow_pid}\n1" in again.output.replace("\r", ""), again.output[-2000:]

        box.client(["ray", "submit", config, "scaling/run.py", "--", *study_args], "ray-submit", timeout=1200)
        _assert_finished(box.client_python(MLFLOW_RUNS.format(uri=uri, study="smoke"), "mlflow-submit"),
                         ["baseline", "dispersion"])

        # The README's alternative: a Ray job through `ray dashboard`'s SSH tunnel, shipping this
        # checkout; its driver on the head inherits MLFLOW_TRACKING_URI from `ray start`.
        local_port = 18265
        with open(logs / "ray-dashboard.log", "w") as log:
            tunnel = subprocess.Popen(["nsenter", "-t", str(box.init_pid), "-n", "--", "ray", "dashboard", "-p",
                                       str(local_port), str(config)], cwd=ROOT, env=box.env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            box.client_python(textwrap.dedent(f"""
                import socket, time
                deadline = time.monotonic() + 120
                while True:
                    with socket.socket() as s:
                        if s.connect_ex(("127.0.0.1", {local_port})) == 0:
                            break
                    assert time.monotonic() < deadline, "ray dashboard did not open its tunnel"
                    time.sleep(1)
                print("RESULT true")"""), "tunnel")
            box.client(["ray", "job", "submit", "--working-dir", ".", "--", "python", "-m", "scaling.run",
                        *study_args, "--set", "study=smoke-job", "--set", "arms=[baseline]"], "ray-job-submit",
                       env={"RAY_ADDRESS": f"http://127.0.0.1:{local_port}"}, timeout=1200)
        finally:
            os.killpg(tunnel.pid, signal.SIGTERM)
            tunnel.wait(timeout=30)
        _assert_finished(box.client_python(MLFLOW_RUNS.format(uri=uri, study="smoke-job"), "mlflow-job"),
                         ["baseline"])

        # clusters/README.md's way to stop MLflow, then `ray down`: nothing of the cluster is left.
        box.client(["ray", "exec", config, "kill -- -$(cat ~/mlflow/server.pid)"], "stop-mlflow")
        box.client(["ray", "down", "-y", config], "ray-down", timeout=600)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(box.head_processes()) > 1:
            time.sleep(1)
        left = box.head_processes()
        assert len(left) == 1 and "sshd" in left[0], left
    finally:
        timings = dict(box.timings)
        box.stop()
        print(f"\nlauncher timings (s): {json.dumps(timings)}; load average {os.getloadavg()}")
    assert _snapshot_home() == home_before, "the test changed this machine's home folder"
