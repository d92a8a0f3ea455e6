"""Cluster files and the preflight's capacity math, offline: every file under clusters/ passes
Ray's own cluster-config validation (KubeRay's RayJob structurally) and the preflight's parser;
`scaling/run.py` works as a bare script from another directory (as `ray submit` runs it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scaling.config import load_study
from scaling.errors import ConfigError
from scaling.placement import (NodeType, build_worker_bundle, check_capacity, choose_placement_strategy,
                               count_concurrent_runs, plan_placement, read_launcher_node_types,
                               read_rayjob_node_types)
from scaling.study import deal_chains, run_in_chains

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
LAUNCHER_FILES = ("aws.yaml", "local.yaml")


def prepared(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((CLUSTERS / name).read_text()))
    validate_config(config)  # Ray's JSON schema plus its own consistency checks
    return config


def test_every_cluster_file_is_covered():
    assert sorted(p.name for p in CLUSTERS.glob("*.yaml")) == sorted((*LAUNCHER_FILES, "kuberay.yaml"))


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_files_pass_rays_validation(name):
    config = prepared(name)
    text = (CLUSTERS / name).read_text()
    assert not re.search(r"(?i)aws_secret|aws_access_key_id|password\s*:", text), "no credentials in cluster files"
    mounts = config["file_mounts"]
    assert mounts["~/dispersion-scaling"] == "." and mounts["~/search_spaces"] == "./search_spaces"
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==" in c)
    package_at = next(i for i, c in enumerate(setup) if "-e ~/dispersion-scaling" in c)
    assert torch_at < package_at, "torch (the CUDA build) is installed before the package"
    # The head starts MLflow through the one shipped script (tests/test_launcher.py runs it), which
    # then runs `ray start` itself, so the server answers before Ray (and any job) starts.
    start = config["head_start_ray_commands"][-1]
    script, ray_start = start.split("bash ~/dispersion-scaling/clusters/start_head.sh")
    assert ray_start.split()[:3] == ["ray", "start", "--head"], start
    assert "--dashboard-host=127.0.0.1" in ray_start, "the dashboard is reached through SSH only"
    assert "mlflow" not in ray_start and "pgrep" not in start
    assert (ROOT / "clusters" / "start_head.sh").is_file()


def test_aws_node_types_fit_the_paper_study():
    config = prepared("aws.yaml")
    assert "MLFLOW_ARTIFACTS=s3://" in " ".join(config["head_start_ray_commands"])  # MLflow artifacts on S3
    node_types = read_launcher_node_types(config)
    assert {t.name: t.max_count for t in node_types} == {"head": 1, "gpu_1x": 8, "gpu_8x": 2}
    study = load_study(ROOT / "search_spaces" / "gpt2_ladder.yaml")  # 8 GPU workers per run
    res = study.resources
    check_capacity(res.num_workers, res.cpus_per_worker, res.use_gpu, node_types)
    placement = plan_placement(res.num_workers, res.cpus_per_worker, res.use_gpu, node_types, num_runs=28)
    assert placement.strategy == "STRICT_PACK" and placement.concurrent_runs == 2  # one 8-GPU node per run
    single = plan_placement(1, res.cpus_per_worker, True, node_types, num_runs=28)
    assert single.concurrent_runs == 8 + 2 * 8  # small runs fill every GPU of both types


def test_local_file_counts_head_and_workers():
    node_types = read_launcher_node_types(prepared("local.yaml"))
    # The local provider uses one type for head and workers; Ray detects their resources.
    assert [(t.max_count, dict(t.resources)) for t in node_types] == [(3, {})]


def kuberay_documents() -> dict[str, dict]:
    """clusters/kuberay.yaml's objects by kind (one of each)."""
    documents = [d for d in yaml.safe_load_all((CLUSTERS / "kuberay.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in documents}
    assert len(by_kind) == len(documents), "one object per kind"
    return by_kind


def test_kuberay_rayjob_runs_a_study_that_loads():
    manifest = kuberay_documents()["RayJob"]
    assert manifest["apiVersion"] == "ray.io/v1"
    spec = manifest["spec"]
    match = re.search(r"python -m scaling\.run (\S+\.yaml)", spec["entrypoint"])
    assert match, spec["entrypoint"]
    study = load_study(ROOT / match.group(1))
    assert spec["rayClusterSpec"]["rayVersion"].startswith("2.60")
    yaml.safe_load(spec["runtimeEnvYAML"])
    node_types = read_rayjob_node_types(manifest)
    assert {t.name: (t.max_count, t.resources.get("GPU", 0)) for t in node_types} == {
        "head": (1, 0), "gpu-1x": (8, 1), "gpu-8x": (2, 8)}
    res = study.resources
    check_capacity(res.num_workers, res.cpus_per_worker, res.use_gpu, node_types)


def test_kuberay_mlflow_answers_the_name_the_rayjob_uses():
    from urllib.parse import urlsplit

    from mlflow.server.security_utils import is_allowed_host_header  # the server's own Host check

    docs = kuberay_documents()
    job, deployment, service = docs["RayJob"], docs["Deployment"], docs["Service"]
    # The URI the job's driver and tasks get (runtime env) is the head pod's too.
    job_uri = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["MLFLOW_TRACKING_URI"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in head["env"]}["MLFLOW_TRACKING_URI"] == job_uri
    uri = urlsplit(job_uri)
    # That name is the Service (same namespace: no namespace pinned anywhere), on the Service's port...
    assert uri.hostname == service["metadata"]["name"] and uri.port == service["spec"]["ports"][0]["port"]
    assert not any("namespace" in d["metadata"] for d in docs.values())
    # ...which selects the MLflow pods and forwards to the port the server listens on.
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    container = pod["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    target = service["spec"]["ports"][0]["targetPort"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["command"] == ["mlflow", "server"] and args["host"] == "0.0.0.0"
    assert int(args["port"]) == ports.get(target, target)
    # MLflow 3 answers 403 to a Host it does not list: the pods send "mlflow:5000".
    allowed = args["allowed-hosts"].split(",")
    assert is_allowed_host_header(allowed, uri.netloc) and is_allowed_host_header(allowed, "localhost:5000")
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    # Ready only when the API (not /health, which skips the Host check) answers that name.
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"].startswith("/api/") and probe["port"] in (target, int(args["port"]))
    assert {h["name"]: h["value"] for h in probe["httpHeaders"]}["Host"] == uri.netloc
    # One SQLite writer on a persistent volume.
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert args["backend-store-uri"] == f"sqlite:///{mount}/mlflow.db"


def test_paper_study_has_the_papers_settings():
    from scaling.config import plan_runs

    study = load_study(ROOT / "search_spaces" / "paper_midtrain_gpt2.yaml")
    t, r, d = study.training, study.resources, study.data
    assert study.ladder == "gpt2" and d.source == "wikitext" and d.packing == "raw" and d.val_split == "validation"
    assert t.init_from_for("gpt2-small") == "gpt2" and t.init_from_for("gpt2-xl") == "gpt2-xl"
    assert (t.seq_len, t.batch_size * t.seq_len, t.warmup_fraction, t.min_lr_ratio) == (1024, 131_072, 0.2, 0.0)
    assert (t.betas, t.weight_decay, t.grad_clip, t.lr, t.lr_scaling) == ((0.9, 0.95), 0.1, 1.0, 5e-5,
                                                                         "sqrt_world_size")
    assert (r.use_gpu, r.precision, r.num_workers) == (True, "bf16", 1)
    assert [a.name for a in study.arms] == ["baseline", "dispersion", "neftune", "active_forgetting"]
    assert study.seeds == (0, 1, 2) and study.probes.at_start and study.probes.every_steps == 306
    assert {(p.steps, p.warmup_steps, p.lr) for p in plan_runs(study)} == {(1526, 306, 5e-5)}
    assert study.storage_path.startswith("s3://")


# --- capacity math -------------------------------------------------------------------------------

CPU_NODES = [NodeType("a", {"CPU": 4}, 2)]
GPU_TYPES = [NodeType("head", {"CPU": 8}, 1), NodeType("g1", {"CPU": 8, "GPU": 1}, 4),
             NodeType("g8", {"CPU": 96, "GPU": 8}, 1)]


def test_gpu_study_on_a_cpu_cluster_fails_with_the_fix():
    with pytest.raises(ConfigError, match="use_gpu=true.*no node type.*use_gpu: false"):
        check_capacity(2, 1, True, CPU_NODES)


def test_worker_bigger_than_any_node_fails():
    with pytest.raises(ConfigError, match="cpus_per_worker=16"):
        check_capacity(1, 16, False, CPU_NODES)


def test_more_workers_than_nodes_ever_possible_fails():
    with pytest.raises(ConfigError, match="num_workers=9.*at most 8 CPUs"):
        check_capacity(9, 1, False, CPU_NODES)
    check_capacity(8, 1, False, CPU_NODES)  # exactly full is fine


def test_placement_rule():
    bundle = build_worker_bundle(8, True)
    assert choose_placement_strategy(8, bundle, GPU_TYPES) == "STRICT_PACK"  # a whole g8 node
    assert choose_placement_strategy(9, bundle, GPU_TYPES) == "PACK"  # bigger than any node
    assert choose_placement_strategy(2, {"CPU": 1}, [NodeType("n", {"CPU": 1}, 3)]) == "PACK"


def test_concurrent_runs_counts_whole_groups():
    one_gpu = build_worker_bundle(8, True)
    assert count_concurrent_runs(GPU_TYPES, 1, one_gpu, "STRICT_PACK", max_runs=100) == 4 + 8
    assert count_concurrent_runs(GPU_TYPES, 8, one_gpu, "STRICT_PACK", max_runs=100) == 1
    assert count_concurrent_runs(GPU_TYPES, 8, one_gpu, "PACK", max_runs=100) == 1  # 12 GPUs: one group of 8
    assert count_concurrent_runs(GPU_TYPES, 4, one_gpu, "PACK", max_runs=100) == 3
    assert count_concurrent_runs(GPU_TYPES, 1, one_gpu, "PACK", max_runs=5) == 5  # capped by the runs
    assert count_concurrent_runs(CPU_NODES, 3, {"CPU": 1}, "STRICT_PACK", max_runs=10) == 2  # 1 CPU left each
    assert plan_placement(3, 8, True, [NodeType("g1", {"CPU": 8, "GPU": 1}, 2)], 4).concurrent_runs == 1


def test_chains_deal_the_jobs_out_in_turn_run_side_by_side_and_keep_the_jobs_order():
    import threading
    import time

    running, peak, lock, chains = [0], [0], threading.Lock(), []

    def train(chain):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            chains.append([name for name, _ in chain])
        time.sleep(sum(seconds for _, seconds in chain))
        with lock:
            running[0] -= 1
        return [name.upper() for name, _ in chain]

    jobs = [("a", 0.3), ("b", 0.05), ("c", 0.2), ("d", 0.0), ("e", 0.1)]
    assert run_in_chains(train, jobs, deal_chains(jobs, 2)) == ["A", "B", "C", "D", "E"]
    assert peak[0] == 2 and sorted(chains) == [["a", "c", "e"], ["b", "d"]]
    peak[0], chains[:] = 0, []
    assert run_in_chains(train, jobs, deal_chains(jobs, 1)) == ["A", "B", "C", "D", "E"] and peak[0] == 1
    assert chains == [["a", "b", "c", "d", "e"]]
    chains[:] = []
    assert run_in_chains(train, jobs[:2], deal_chains(jobs[:2], 8)) == ["A", "B"] and sorted(chains) == [["a"], ["b"]]
    assert run_in_chains(train, [], deal_chains([], 2)) == []
    chains[:] = []  # longest first, in a snake: outcomes still in the jobs' order
    assert run_in_chains(train, jobs, deal_chains(jobs, 2, cost=lambda job: job[1])) == ["A", "B", "C", "D", "E"]
    assert sorted(chains) == [["a", "b", "d"], ["c", "e"]]


def test_longest_first_snake_balances_chains_and_keeps_pairs_side_by_side():
    # 4 rungs (cost 8, 4, 2, 1) x 2 seeds x 2 arms in plan order: dealt in turn, one chain gets every
    # baseline and the other every dispersion arm; the snake gives each chain the same mix, longest first.
    jobs = [(cost, arm, seed) for cost in (1, 2, 4, 8) for seed in (0, 1) for arm in ("base", "disp")]
    in_turn = deal_chains(jobs, 2)
    assert {jobs[i][1] for i in in_turn[0]} == {"base"} and {jobs[i][1] for i in in_turn[1]} == {"disp"}
    snake = deal_chains(jobs, 2, cost=lambda job: job[0])
    loads = [sum(jobs[i][0] for i in chain) for chain in snake]
    assert loads[0] == loads[1] == 30
    assert [jobs[chain[0]][0] for chain in snake] == [8, 8]  # the longest runs start first
    for place in range(len(snake[0])):  # a run's two arms train at the same time, on two chains
        a, b = jobs[snake[0][place]], jobs[snake[1][place]]
        assert (a[0], a[2]) == (b[0], b[2]) and a[1] != b[1]
    assert sorted(i for chain in snake for i in chain) == list(range(len(jobs)))


# --- the entry point as ray submit runs it --------------------------------------------------------


def test_run_py_as_a_bare_script_from_another_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(ROOT / "scaling" / "run.py"),
                          str(ROOT / "search_spaces" / "smoke.yaml"), "--dry-run"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tiny-165K" in out.stdout
    assert not list(tmp_path.iterdir()), "a dry run writes nothing"
