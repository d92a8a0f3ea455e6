"""Preflight: check a study against the Ray cluster before any training, and size placement.

Two layers:
- pure capacity math on `NodeType`s (what one node offers, how many such nodes can ever
  exist), read from a cluster-launcher YAML, a KubeRay `RayJob` manifest or a live cluster;
- probes run on the live cluster: the storage path written and deleted from every node (and
  shared between them), the MLflow tracking server answering from the driver and, for a
  server URI, from every node (rank 0 logs from a worker node, not from the driver).

Placement rule (`choose_placement_strategy`): a run whose worker group fits on one node of
some type gets `STRICT_PACK` (all its workers on one node, so ZeRO all-reduce stays on
NVLink/shared memory and an 8-GPU rung takes a whole 8-GPU node), small groups of several
runs then share a node; a group bigger than any node gets `PACK` (as few nodes as possible).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from scaling.errors import ConfigError

UNLIMITED = 10**6
"""Stands for an unbounded node count (autoscaler max_count -1)."""
PROBE_TIMEOUT_S = 120.0
MLFLOW_TIMEOUT_S = 10
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # the cluster launcher writes it on the head


@dataclass(frozen=True)
class NodeType:
    """What one node offers and how many such nodes there can ever be."""

    name: str
    resources: Mapping[str, float] = field(default_factory=dict)
    """Logical resources of one node: CPU, GPU, memory, custom ones."""
    max_count: int = 1
    """Nodes of this type alive now, or the autoscaler's max_workers for a type."""

    def __post_init__(self):
        if self.max_count < 0:
            raise ConfigError(f"node type {self.name!r}: max_count={self.max_count} must be >= 0")


# --- pure capacity math ------------------------------------------------------------------------


def build_worker_bundle(num_cpus: float, use_gpu: bool) -> dict[str, float]:
    """The resources of one Ray Train worker (what `ScalingConfig` asks per worker)."""
    bundle = {"CPU": float(num_cpus)}
    if use_gpu:
        bundle["GPU"] = 1.0
    return bundle


def _fits(bundle: Mapping[str, float], free: Mapping[str, float]) -> bool:
    return all(free.get(key, 0.0) + 1e-9 >= amount for key, amount in bundle.items() if amount > 0)


def _expand(node_types: Iterable[NodeType], cap: int) -> list[dict[str, float]]:
    """One free-resources dict per node, at most `cap` nodes of each type."""
    return [dict(t.resources) for t in node_types for _ in range(min(t.max_count, cap))]


def choose_placement_strategy(num_workers: int, bundle: Mapping[str, float],
                              node_types: Iterable[NodeType]) -> str:
    """STRICT_PACK when the whole worker group fits on one node of some type, else PACK."""
    for node_type in node_types:
        if node_type.max_count > 0 and _fits({k: v * num_workers for k, v in bundle.items()}, node_type.resources):
            return "STRICT_PACK"
    return "PACK"


def count_concurrent_runs(node_types: Iterable[NodeType], num_workers: int, bundle: Mapping[str, float],
                          strategy: str, max_runs: int) -> int:
    """How many worker groups (runs) fit side by side, first-fit, at most `max_runs` (0 when none fits)."""
    nodes = _expand(node_types, cap=max(1, max_runs * num_workers))
    placed = 0
    while placed < max_runs:
        trial = [dict(free) for free in nodes]
        if strategy == "STRICT_PACK":
            target = {k: v * num_workers for k, v in bundle.items()}
            index = next((i for i, free in enumerate(trial) if _fits(target, free)), None)
            if index is None:
                break
            for key, amount in target.items():
                trial[index][key] = trial[index].get(key, 0.0) - amount
        else:
            remaining = num_workers
            for free in trial:  # first fit packs each node before moving on, like Ray's PACK
                while remaining and _fits(bundle, free):
                    for key, amount in bundle.items():
                        free[key] = free.get(key, 0.0) - amount
                    remaining -= 1
            if remaining:
                break
        nodes = trial
        placed += 1
    return placed


def check_capacity(num_workers: int, cpus_per_worker: float, use_gpu: bool,
                   node_types: list[NodeType], *, where: str = "the Ray cluster") -> None:
    """Raise ConfigError when the worker group can never be placed on these node types."""
    bundle = build_worker_bundle(cpus_per_worker, use_gpu)
    usable = [t for t in node_types if t.max_count > 0]
    described = ", ".join(f"{t.name} x{'inf' if t.max_count >= UNLIMITED else t.max_count} "
                          f"({_format_resources(t.resources)})" for t in usable) or "no nodes"
    if use_gpu and not any(t.resources.get("GPU", 0) >= 1 for t in usable):
        raise ConfigError(
            f"resources.use_gpu=true needs a GPU per worker but no node type of {where} has a GPU "
            f"[{described}]; set resources.use_gpu: false, or add a GPU node type (clusters/aws.yaml)"
        )
    if not any(_fits(bundle, t.resources) for t in usable):
        raise ConfigError(
            f"resources.cpus_per_worker={cpus_per_worker:g}{' with a GPU' if use_gpu else ''} is more than any "
            f"node of {where} offers [{described}]; lower cpus_per_worker or use bigger nodes"
        )
    if count_concurrent_runs(usable, num_workers, bundle, "PACK", max_runs=1) < 1:
        total_cpu = sum(t.resources.get("CPU", 0) * min(t.max_count, num_workers) for t in usable)
        raise ConfigError(
            f"resources.num_workers={num_workers} x cpus_per_worker={cpus_per_worker:g}"
            f"{' (+1 GPU each)' if use_gpu else ''} needs {num_workers * cpus_per_worker:g} CPUs but {where} "
            f"can offer at most {total_cpu:g} CPUs [{described}]; lower num_workers or add nodes"
        )


def _format_resources(resources: Mapping[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU") or not k.startswith(("node:", "memory",
                                                                                          "object_store"))}
    return " ".join(f"{k}={v:g}" for k, v in sorted(shown.items())) or "no resources"


# --- reading node types from cluster files -------------------------------------------------------


def read_launcher_node_types(config: Mapping[str, Any], *, include_head: bool = True) -> list[NodeType]:
    """Node types of a Ray cluster-launcher YAML after Ray's `prepare_config` (as `ray up` reads it).

    Resources Ray detects on the machine (`resources: {}`, e.g. the local provider) are unknown
    offline; a type's `resources` must list CPU/GPU for the capacity check to count them (the
    aws file does). The head type counts one node plus its own max_workers (the local provider
    uses one type for head and workers); `include_head=False` counts only the workers.
    """
    types_ = config.get("available_node_types") or {}
    if not types_:
        raise ConfigError("cluster config: no available_node_types; list the head and worker node types")
    head = config.get("head_node_type")
    global_max = int(config.get("max_workers", UNLIMITED))
    node_types = []
    for name, spec in types_.items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        count = min(int(spec.get("max_workers", 0 if name == head else global_max)), global_max)
        if name == head and include_head:
            count += 1
        if count:
            node_types.append(NodeType(name, resources, count))
    return node_types


def read_rayjob_node_types(manifest: Mapping[str, Any]) -> list[NodeType]:
    """Node types of a KubeRay `RayJob` (or `RayCluster`) manifest: the head and each worker group.

    A pod's resources are its `rayStartParams` num-cpus/num-gpus when set, else its container limits.
    """
    spec = manifest.get("spec") or {}
    cluster = spec.get("rayClusterSpec") or (spec if "headGroupSpec" in spec else None)
    if not cluster:
        raise ConfigError("kuberay manifest: spec.rayClusterSpec (headGroupSpec, workerGroupSpecs) is missing")
    groups = [("head", cluster["headGroupSpec"], 1)]
    for group in cluster.get("workerGroupSpecs") or []:
        groups.append((group.get("groupName", "workers"), group, int(group.get("maxReplicas", group.get("replicas", 1)))))
    return [NodeType(name, _pod_resources(group), count) for name, group, count in groups]


def _pod_resources(group: Mapping[str, Any]) -> dict[str, float]:
    params = group.get("rayStartParams") or {}
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    resources = {"CPU": float(params.get("num-cpus", _k8s_quantity(limits.get("cpu", 0)))),
                 "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
    return {k: v for k, v in resources.items() if v}


def _k8s_quantity(value: Any) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- the live cluster ----------------------------------------------------------------------------


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


def resolve_storage_path(path: str) -> str:
    """An absolute local folder (workers have other working directories) or the URI as given."""
    return path if "://" in path else str(Path(path).resolve())


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
        raise ConfigError(f"storage_path={storage_path!r} is not writable from the driver ({_brief(exc)}); "
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


def _filesystem(uri: str):
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(uri)
    return filesystem, root.rstrip("/")


def _write_probe(uri: str, relative: str) -> None:
    filesystem, root = _filesystem(uri)
    filesystem.create_dir(f"{root}/{relative.rsplit('/', 1)[0]}", recursive=True)
    with filesystem.open_output_stream(f"{root}/{relative}") as stream:
        stream.write(b"dispersion-scaling preflight\n")


def _delete_probe(uri: str, relative: str) -> None:
    filesystem, root = _filesystem(uri)
    filesystem.delete_file(f"{root}/{relative}")


def _storage_probe_task_body(uri: str, marker: str) -> str:
    """'' when this node sees the driver's file and can write and delete its own; else the problem."""
    from pyarrow import fs

    try:
        filesystem, root = _filesystem(uri)
        if filesystem.get_file_info(f"{root}/{marker}").type != fs.FileType.File:
            return ("cannot see a file the driver just wrote there: a local folder is not shared between nodes; "
                    "use s3://... or a shared filesystem (NFS) mounted at the same path on every node")
        own = f"{marker}-{uuid.uuid4().hex[:8]}"
        _write_probe(uri, own)
        _delete_probe(uri, own)
        return ""
    except Exception as exc:  # noqa: BLE001 -- reported as the node's problem
        return f"not writable ({_brief(exc)}); check the path, permissions or credentials on that node"


def _remote(fn):
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(fn)


class _LazyRemote:
    """A Ray task defined on first use, so importing this module does not import ray."""

    def __init__(self, fn):
        self._fn, self._remote = fn, None

    def options(self, **kwargs):
        if self._remote is None:
            self._remote = _remote(self._fn)
        return self._remote.options(**kwargs)


_storage_probe_task = _LazyRemote(_storage_probe_task_body)


def probe_tracking(tracking_uri: str) -> None:
    """List experiments on the MLflow store from the driver and, for a server, from every node."""
    problem = _tracking_probe_body(tracking_uri)
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


def _tracking_probe_body(tracking_uri: str) -> str:
    """'' when the store answers a one-experiment search within a few seconds; else the problem."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")}
    os.environ.update(MLFLOW_HTTP_REQUEST_TIMEOUT=str(MLFLOW_TIMEOUT_S), MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        return ""
    except Exception as exc:  # noqa: BLE001 -- reported with the URI
        return _brief(exc)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_tracking_probe_task = _LazyRemote(_tracking_probe_body)


def _brief(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


# --- the whole check -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """How the study's runs go onto the cluster."""

    strategy: str
    """ScalingConfig placement_strategy for every run (see the module docstring)."""
    concurrent_runs: int
    """Runs trained side by side (>= 1)."""


def plan_placement(num_workers: int, cpus_per_worker: float, use_gpu: bool, node_types: list[NodeType],
                   num_runs: int) -> Placement:
    """The placement strategy and how many of `num_runs` runs fit the node types side by side."""
    bundle = build_worker_bundle(cpus_per_worker, use_gpu)
    strategy = choose_placement_strategy(num_workers, bundle, node_types)
    fit = count_concurrent_runs(node_types, num_workers, bundle, strategy, max_runs=max(1, num_runs))
    return Placement(strategy, max(1, fit))


def count_runs(study, plans) -> int:
    return len(plans) * len(study.seeds) * len(study.arms)


def concurrent_runs(study, num_runs: int) -> int:
    """How many of the study's runs the connected cluster (with its autoscaler) fits side by side."""
    resources = study.resources
    return plan_placement(resources.num_workers, resources.cpus_per_worker, resources.use_gpu,
                          read_cluster_node_types(), num_runs).concurrent_runs


def placement_strategy(study) -> str:
    """The ScalingConfig placement_strategy for the study's runs on the connected cluster."""
    resources = study.resources
    return choose_placement_strategy(resources.num_workers,
                                     build_worker_bundle(resources.cpus_per_worker, resources.use_gpu),
                                     read_cluster_node_types())


def run_side_by_side(run, jobs: list[tuple], width: int) -> list:
    """`run(*job)` for every job, `width` at a time in threads (each blocks on its own Ray Train run);
    results in the jobs' order whatever order they finish in."""
    if width <= 1 or len(jobs) <= 1:
        return [run(*job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="run") as pool:
        futures = [pool.submit(run, *job) for job in jobs]
        return [future.result() for future in futures]


def check_study_against_cluster(study, plans, *, tracking_uri: str | None = None,
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
    if tracking_uri is None:
        from scaling.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(study.tracking_uri)
    probe_tracking(tracking_uri)
    warnings = []
    runs = count_runs(study, plans)
    placement = plan_placement(resources.num_workers, resources.cpus_per_worker, resources.use_gpu,
                               node_types, runs)
    if runs > 1 and placement.concurrent_runs == 1:
        warnings.append(
            f"the cluster fits one run of {resources.num_workers} worker(s) at a time, so the study's {runs} runs "
            "go one after another; add nodes (or raise max_workers) to train runs side by side")
    if len(node_types) > 1 and tracking_uri.startswith("sqlite:"):
        warnings.append(f"MLflow store {tracking_uri} is a local SQLite file but the cluster has several nodes: "
                        "rank 0 on another node writes to its own copy unless the path is shared; "
                        "run an MLflow server (clusters/README.md)")
    return warnings

