"""The study on a real multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`): a head
and two worker nodes with custom resources, 1 logical CPU each, so a 2-worker run must span two
nodes. Also: the preflight's probes on that cluster, and a worker node removed mid-run.

This file runs its own cluster, so it shuts down the session's Ray first and brings it back
afterwards (same CPU count) for the test files that follow.
"""

from __future__ import annotations

import threading
import time

import pytest

from conftest import tiny_train_study

from scaling import names
from scaling.errors import ConfigError

pytestmark = pytest.mark.slow  # a 3-node cluster plus two 2-worker DeepSpeed runs: minutes on 2 cores


def tiny_study(tmp_path, name, steps):
    return tiny_train_study(tmp_path, name, arms=["baseline"], training={"max_steps": steps},
                            resources={"num_workers": 2, "zero_stage": 2}, checkpoint={"max_failures": 2})


def train_runs(study):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=study.tracking_uri)
    experiment = client.get_experiment_by_name(study.study)
    return client, client.search_runs([experiment.experiment_id], filter_string=f"tags.kind = '{names.KIND_TRAIN}'")


def _logged_step(study, step) -> bool:
    try:
        client, runs = train_runs(study)
        return any(m.step >= step for run in runs
                   for m in client.get_metric_history(run.info.run_id, names.TRAIN_CE_LOSS))
    except Exception:  # noqa: BLE001 -- the store or the run does not exist yet
        return False


def train_worker_nodes(alive_only=False) -> list[str]:
    """Node ids of Ray Train worker actors (the GCS actor table; no dashboard needed)."""
    from ray._private.state import actors

    return [a["Address"]["NodeID"] for a in actors().values()
            if a["ActorClassName"].endswith("RayTrainWorker") and (not alive_only or a["State"] == "ALIVE")]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    session_cpus = ray.cluster_resources().get("CPU") if ray.is_initialized() else None
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                            "resources": {"head": 1}})
    for label in ("node_a", "node_b"):
        cluster.add_node(num_cpus=1, resources={label: 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if session_cpus is not None:  # give the session fixture its Ray back
            ray.init(num_cpus=int(session_cpus), include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})


def test_preflight_probes_every_node(cluster, tmp_path):
    from scaling.cluster import probe_storage, probe_tracking, read_cluster_node_types

    assert len(read_cluster_node_types()) == 3
    probe_storage(str(tmp_path / "runs"))  # writable and shared (one machine)
    assert [p.name for p in (tmp_path / "runs" / ".preflight").iterdir()] == []  # probes cleaned up
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="unreachable from the driver"):
        probe_tracking("http://127.0.0.1:9")  # nothing listens on the discard port
    assert time.perf_counter() - started < 60
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ConfigError, match="storage_path=.*not writable from the driver"):
        probe_storage(str(blocked / "runs"))


def test_study_spans_two_nodes(cluster, tmp_path):
    from scaling.study import run_study

    study = tiny_study(tmp_path, "spread", steps=2)
    outcomes = run_study(study, "")
    assert [o.status for o in outcomes] == ["finished"]
    nodes = train_worker_nodes()
    assert len(nodes) == 2 and len(set(nodes)) == 2, "the 2 workers ran on two different nodes"


def test_losing_a_worker_node_resumes_from_checkpoint(cluster, tmp_path):
    from scaling.study import run_study

    steps = 8
    study = tiny_study(tmp_path, "lost-node", steps=steps)
    result = {}
    thread = threading.Thread(target=lambda: result.update(outcomes=run_study(study, "")), daemon=True)
    thread.start()
    # Wait until step 3 is logged (so step 2's checkpoint report has returned: a checkpoint folder
    # alone may still be mid-write, and losing it restarts from step 0), then remove a worker node
    # that hosts one of this run's workers.
    deadline = time.monotonic() + 300
    while not _logged_step(study, 3):
        assert time.monotonic() < deadline and thread.is_alive(), "step 3 was never logged"
        time.sleep(0.2)
    hosting = set(train_worker_nodes(alive_only=True))  # the first test's workers are dead by now
    victim = next(node for node in cluster.worker_nodes if node.node_id in hosting)
    cluster.remove_node(victim, allow_graceful=False)
    thread.join(timeout=600)
    assert not thread.is_alive()
    assert [o.status for o in result["outcomes"]] == ["finished"]
    client, runs = train_runs(study)
    assert len(runs) == 1, "the run is recorded once, resumed in place"
    run = runs[0]
    assert int(run.data.tags["resumed_from_step"]) >= 2
    ce_steps = {m.step for m in client.get_metric_history(run.info.run_id, names.TRAIN_CE_LOSS)}
    assert ce_steps == set(range(1, steps + 1))
