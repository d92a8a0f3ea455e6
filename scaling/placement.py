"""Where a study's runs go: capacity and placement arithmetic over node types (pure Python).

A `NodeType` is what one node offers and how many such nodes can ever exist; node types are
read from a cluster-launcher YAML, a KubeRay `RayJob` manifest, or (by `scaling.cluster`) the
live cluster. Nothing here talks to Ray.

Placement rule (`choose_placement_strategy`): a run whose worker group fits on one node of
some type gets `STRICT_PACK` (all its workers on one node, so ZeRO all-reduce stays on
NVLink/shared memory and an 8-GPU rung takes a whole 8-GPU node), small groups of several
runs then share a node; a group bigger than any node gets `PACK` (as few nodes as possible).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from scaling.errors import ConfigError

UNLIMITED = 10**6
"""Stands for an unbounded node count (autoscaler max_count -1)."""


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


# --- placement of a study's runs ------------------------------------------------------------------


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
