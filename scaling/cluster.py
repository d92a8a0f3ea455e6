"""The Ray cluster a study runs on: connecting to it, reading it live, and probing it.

- `connect_ray`: join the cluster `ray start` brought up (what `ray submit` and the launcher
  do) or the one RAY_ADDRESS names; otherwise start a private local Ray;
- live reads: node types (alive nodes plus what the autoscaler may add), the largest node;
- probes run on every node before any work: the storage path is writable and shared, and
  the MLflow store answers (rank 0 of a run logs from a worker node, not from the driver);
- `check_study_against_cluster`: the whole preflight of a training study.

The arithmetic these feed (capacity, placement) is pure and lives in `scaling.placement`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import uuid
from pathlib import Path
from typing import Mapping

from scaling.errors import ConfigError, one_line
from scaling.storage import filesystem, join, resolve_storage_path, write_text
from scaling.placement import (UNLIMITED, NodeType, build_worker_bundle, check_capacity, choose_placement_strategy,
                               plan_placement, read_launcher_node_types)

PROBE_TIMEOUT_S = 120.0
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # the cluster launcher writes it on the head
FAST_REPORTS_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
"""Ray Train 2.60's controller polls workers every 2 s by default, and every `ray.train.report`
waits for a poll: 0.1 s took a 2-worker tiny run from ~90 s to ~48 s."""


# --- connecting ----------------------------------------------------------------------------------


def connect_ray(num_cpus: int | None = None) -> None:
    """Join the cluster `ray start` brought up on this machine (what `ray submit` and the cluster
    launcher do) or the one RAY_ADDRESS names; otherwise start a private local Ray.

    Unlike `ray.init(address="auto")`, a Ray that some other program started with `ray.init()`
    on the same machine is never joined: its lifetime is that program's, not ours.
    RAY_ADDRESS=local forces a private local Ray. Worker output stays in Ray's log files: the
    driver prints its own progress lines (`scaling.console`).
    """
    import ray

    from scaling.console import quiet_ray_before_init

    for key, value in FAST_REPORTS_ENV.items():
        os.environ.setdefault(key, value)
    # Ctrl-C reaches the study driver (which marks runs killed), not Tune's own handler, which would
    # swallow it and let the driver go on to the next rung.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    if ray.is_initialized():
        return
    quiet_ray_before_init()
    env = {key: os.environ[key] for key in FAST_REPORTS_ENV}
    if "SCALING_MLFLOW_RETRY_S" in os.environ:  # how long rank 0 waits out an MLflow outage (scaling.tracking)
        env["SCALING_MLFLOW_RETRY_S"] = os.environ["SCALING_MLFLOW_RETRY_S"]
    address = os.environ.get("RAY_ADDRESS") or _started_cluster_address()
    # ray.init installs Ray's C++ crash handler over SIGTERM (it aborts the driver, leaving runs RUNNING):
    # the caller's own SIGTERM handler (scaling.console.stop_on_sigterm) is put back after it.
    sigterm = signal.getsignal(signal.SIGTERM)
    if address and address != "local":
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 runtime_env={"env_vars": env}, log_to_driver=False, logging_level=logging.WARNING)
    if callable(sigterm) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, sigterm)
    from scaling.console import explain_ray_worker_warning

    explain_ray_worker_warning()


def _started_cluster_address() -> str | None:
    """The address the last `ray start` on this machine wrote, if that cluster is still running."""
    try:
        from ray._private.services import find_bootstrap_address, find_gcs_addresses

        address = find_bootstrap_address(None)
        return address if address and address in find_gcs_addresses() else None
    except Exception:  # noqa: BLE001 -- private API: if it moves, start a local Ray
        return None


# --- live reads ----------------------------------------------------------------------------------


def read_cluster_node_types() -> list[NodeType]:
    """Alive nodes (one type each) plus what the autoscaler may still add, when discoverable.

    The autoscaler's node groups come from the GCS (autoscaler v2, KubeRay) or the launcher's
    bootstrap file on the head; both are best effort, so a cluster without them counts only
    its alive nodes.
    """
    import ray

    alive = [NodeType(f"node {n['NodeID'][:8]}", _logical(n["Resources"]), 1)
             for n in ray.nodes() if n.get("Alive")]
    return alive + _autoscaler_node_types()


def _logical(resources: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if not k.startswith("node:")}


def _autoscaler_node_types() -> list[NodeType]:
    try:  # autoscaler v2 / KubeRay publish their node groups in the GCS (private API: best effort)
        from ray._private.state import state

        config = state.get_cluster_config()
        if config is not None and config.node_group_configs:
            return [NodeType(g.name, dict(g.resources), UNLIMITED if g.max_count < 0 else g.max_count)
                    for g in config.node_group_configs if g.max_count != 0]
    except Exception:  # noqa: BLE001 -- absent or moved: fall back to the bootstrap file
        pass
    path = Path(os.path.expanduser(BOOTSTRAP_CONFIG))
    if path.is_file():
        import yaml

        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return read_launcher_node_types(config, include_head=False)  # the head is alive, counted above
    return []


def read_largest_node() -> tuple[int, float]:
    """(GPUs, memory in GB) of the largest alive node (memory inf when Ray does not say)."""
    import ray

    gpus, memory = 0, 0.0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        gpus = max(gpus, int(resources.get("GPU", 0)))
        memory = max(memory, resources.get("memory", 0.0) / 1e9)
    return gpus, memory or math.inf


def concurrent_runs(study, num_runs: int, extra: Mapping[str, float] | None = None) -> int:
    """How many of the study's runs the connected cluster (with its autoscaler) fits side by side.

    `extra` is what each run needs besides its workers (its evaluation task's CPUs/GPUs): reserved,
    or runs waiting at their end for an evaluation could hold every CPU it needs.
    """
    import ray

    resources = study.resources
    width = plan_placement(resources.num_workers, resources.cpus_per_worker, resources.use_gpu,
                           read_cluster_node_types(), num_runs).concurrent_runs
    if extra:
        total = ray.cluster_resources()
        per_run = {"CPU": resources.num_workers * resources.cpus_per_worker + extra.get("num_cpus", 0.0),
                   "GPU": resources.num_workers * resources.use_gpu + extra.get("num_gpus", 0.0)}
        width = min([width] + [int(total.get(key, 0.0) // need) for key, need in per_run.items() if need > 0])
    return max(1, width)


def placement_strategy(study) -> str:
    """The ScalingConfig placement_strategy for the study's runs on the connected cluster."""
    resources = study.resources
    return choose_placement_strategy(resources.num_workers,
                                     build_worker_bundle(resources.cpus_per_worker, resources.use_gpu),
                                     read_cluster_node_types())


# --- probes --------------------------------------------------------------------------------------


def probe_storage(storage_path: str) -> None:
    """Write a file from the driver; on every alive node read it, write and delete one; clean up.

    Fails (ConfigError) when a node cannot write there, or does not see the driver's file (a
    local folder not shared between nodes: Ray Train needs shared storage across nodes).
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    uri = resolve_storage_path(storage_path)
    token = uuid.uuid4().hex[:12]
    marker = f".preflight/{token}"
    try:
        _write_probe(uri, marker)
    except Exception as exc:  # noqa: BLE001 -- any failure means the driver cannot write there
        raise ConfigError(f"storage_path={storage_path!r} is not writable from the driver ({one_line(exc, 300)}); "
                          "fix the path or its credentials (s3://: AWS credentials or an instance profile)") from None
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: _storage_probe_task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(uri, marker)
            for n in nodes}
        for node, ref in refs.items():
            problem = ray.get(ref, timeout=PROBE_TIMEOUT_S)
            if problem:
                raise ConfigError(f"storage_path={storage_path!r} from node {node}: {problem}")
    finally:
        try:
            _delete_probe(uri, marker)
        except Exception:  # noqa: BLE001 -- cleanup only
            pass


def _write_probe(uri: str, relative: str) -> None:
    write_text(join(uri, relative), "dispersion-scaling preflight\n")


def _delete_probe(uri: str, relative: str) -> None:
    found, root = filesystem(uri)
    found.delete_file(f"{root}/{relative}")


def _storage_probe_task_body(uri: str, marker: str) -> str:
    """'' when this node sees the driver's file and can write and delete its own; else the problem."""
    from pyarrow import fs

    try:
        found, root = filesystem(uri)
        if found.get_file_info(f"{root}/{marker}").type != fs.FileType.File:
            return ("cannot see a file the driver just wrote there: a local folder is not shared between nodes; "
                    "use s3://... or a shared filesystem (NFS) mounted at the same path on every node")
        own = f"{marker}-{uuid.uuid4().hex[:8]}"
        _write_probe(uri, own)
        _delete_probe(uri, own)
        return ""
    except Exception as exc:  # noqa: BLE001 -- reported as the node's problem
        return f"not writable ({one_line(exc, 300)}); check the path, permissions or credentials on that node"


def _tracking_probe_task_body(tracking_uri: str) -> str:
    from scaling.tracking import check_reachable

    return check_reachable(tracking_uri)


class _LazyRemote:
    """A zero-CPU Ray task defined on first use, so importing this module does not import ray."""

    def __init__(self, fn):
        self._fn, self._remote = fn, None

    def options(self, **kwargs):
        if self._remote is None:
            import ray

            self._remote = ray.remote(num_cpus=0, max_retries=0)(self._fn)
        return self._remote.options(**kwargs)


_storage_probe_task = _LazyRemote(_storage_probe_task_body)
_tracking_probe_task = _LazyRemote(_tracking_probe_task_body)


def probe_tracking(tracking_uri: str) -> None:
    """The MLflow store answers from the driver and, for a server, from every node."""
    from scaling.tracking import check_reachable

    problem = check_reachable(tracking_uri)
    if problem:
        raise ConfigError(f"MLflow at {tracking_uri!r} is unreachable from the driver ({problem}); start the "
                          "server or fix tracking_uri / MLFLOW_TRACKING_URI (clusters/README.md)")
    if not tracking_uri.startswith(("http://", "https://")):
        return  # a file store: concurrent first use from every node would race on its schema migration
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for node in (n for n in ray.nodes() if n.get("Alive")):
        ref = _tracking_probe_task.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(tracking_uri)
        problem = ray.get(ref, timeout=PROBE_TIMEOUT_S)
        if problem:
            raise ConfigError(
                f"MLflow at {tracking_uri!r} is unreachable from node {node['NodeManagerAddress']} ({problem}); "
                "rank 0 logs from a worker node, so the server must listen on an address the nodes reach "
                "(the head's private IP, see clusters/aws.yaml), not 127.0.0.1")


# --- the preflight of a training study -----------------------------------------------------------


def check_study_memory_on_cluster(study, plans, fallback: tuple[float | None, str] | None = None, *,
                                  node_types: list[NodeType] | None = None) -> str | None:
    """Refuse (ConfigError) a study whose runs cannot fit the cluster's GPUs (`scaling.memory`), before any
    worker starts. The GPUs are the nodes' `accelerator_type` (the smallest when several types); a cluster
    that does not say is checked against `fallback` (the dry run's --gpu), with a warning returned."""
    from scaling.memory import GPU_MEMORY_GIB, check_study_memory, gpu_from_accelerator_type

    if not study.resources.use_gpu:
        return None
    node_types = read_cluster_node_types() if node_types is None else node_types
    known = {gpu_from_accelerator_type(t.resources) for t in node_types
             if t.max_count > 0 and t.resources.get("GPU", 0) >= 1} - {None}
    if known:
        smallest = min(known, key=lambda name: GPU_MEMORY_GIB[name])
        check_study_memory(study, plans, GPU_MEMORY_GIB[smallest], f"the cluster's {smallest}")
        return None
    if fallback is not None and fallback[0] is not None:
        check_study_memory(study, plans, fallback[0], fallback[1])
        return (f"the cluster's nodes do not name their GPU type (Ray's accelerator_type); the memory plan was "
                f"checked against {fallback[1]} ({fallback[0]:.1f} GiB): pass --gpu to name yours")
    return None



def check_study_against_cluster(study, num_runs: int, tracking_uri: str, *,
                                node_types: list[NodeType] | None = None) -> list[str]:
    """Fail fast (ConfigError) when the connected cluster cannot run the study; return warnings.

    Checks, cheapest first: the worker group fits some node types ever possible (GPUs, CPUs,
    node counts under the autoscaler's limits); the storage path is writable and shared from
    every node; MLflow answers. Warns when the runs can only go one at a time.
    """
    resources = study.resources
    node_types = read_cluster_node_types() if node_types is None else node_types
    check_capacity(resources.num_workers, resources.cpus_per_worker, resources.use_gpu, node_types)
    probe_storage(study.storage_path)
    probe_tracking(tracking_uri)
    warnings = []
    placement = plan_placement(resources.num_workers, resources.cpus_per_worker, resources.use_gpu,
                               node_types, num_runs)
    if num_runs > 1 and placement.concurrent_runs == 1:
        warnings.append(
            f"the cluster fits one run of {resources.num_workers} worker(s) at a time, so the study's {num_runs} "
            "runs go one after another; add nodes (or raise max_workers) to train runs side by side")
    if len(node_types) > 1 and tracking_uri.startswith("sqlite:"):
        warnings.append(f"MLflow store {tracking_uri} is a local SQLite file but the cluster has several nodes: "
                        "rank 0 on another node writes to its own copy unless the path is shared; "
                        "run an MLflow server (clusters/README.md)")
    return warnings
