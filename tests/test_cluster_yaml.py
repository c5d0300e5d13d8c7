"""cluster.yaml: a valid Ray autoscaler config whose node types can hold what the GPU config's jobs request."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from diffscaler.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_CONFIG = ROOT / "ray_jobs" / "configs" / "gpu.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def worker_types(cluster: dict) -> dict[str, dict]:
    return {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}


def test_passes_ray_autoscaler_schema(cluster):
    # Ray's own validation: defaults filled in as `ray up` does, then its JSON schema (no cloud calls)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))


def test_head_is_cpu_only_and_gpu_workers_scale_from_zero(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must take no tasks: resources {CPU: 0}"
    workers = worker_types(cluster)
    assert workers, "no worker node types"
    for name, node in workers.items():
        assert node["resources"].get("GPU", 0) >= 1, f"{name}: worker types are GPU nodes"
        assert node.get("min_workers", 0) == 0, f"{name}: must scale from zero"
        assert node["max_workers"] >= 1, f"{name}: max_workers 0 can never start"
    assert cluster["max_workers"] >= max(n["max_workers"] for n in workers.values())


def test_one_on_demand_and_one_spot_type(cluster):
    markets = {
        name: node["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        for name, node in worker_types(cluster).items()
    }
    assert "on-demand" in markets.values(), f"pretraining needs an on-demand type: {markets}"
    assert "spot" in markets.values(), f"fine-tunes / sweeps / eval run on a spot type: {markets}"


def test_setup_installs_the_project_and_mounts_shared_storage(cluster):
    setup = "\n".join(cluster["setup_commands"])
    assert "pip install" in setup and "diffscaler" in setup, "setup_commands must install the project"
    assert "make datasets" in setup, "shard builders on workers need the dataset packages"
    assert any(Path(remote).name == "diffscaler" for remote in cluster["file_mounts"]), "the project is copied"
    # the GPU config's storage lives on the mount every node gets
    cfg = load_config(GPU_CONFIG)
    mount = "/shared"
    assert "mount -t nfs4" in setup and f" {mount})" in setup
    for path in (cfg.data.shards_root, cfg.pretrain.storage_path, cfg.eval.cache_dir):
        assert path.startswith(mount + "/") or "://" in path, f"{path} is not on shared storage"
    # the head starts the job server where `ray job submit --address http://HEAD:8265` expects it
    assert "--dashboard-port=8265" in " ".join(cluster["head_start_ray_commands"])


def fits(request: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0) + 1e-9 >= v for k, v in request.items() if v)


def test_node_types_hold_every_request_of_the_gpu_config(cluster):
    """Each job's resource request (ray_jobs/configs/gpu.yaml) fits a worker type, and the pretraining
    gang fits the GPU capacity of the types it can use: otherwise Ray waits forever."""
    cfg = load_config(GPU_CONFIG)
    p, f, s, e = cfg.pretrain, cfg.finetune, cfg.sweep, cfg.eval
    assert p.use_gpu and f.use_gpu and e.gpus_per_actor > 0, "gpu.yaml is expected to use GPUs in every stage"
    workers = worker_types(cluster)
    requests = {
        "pretrain worker": {"CPU": p.cpus_per_worker, "GPU": 1},  # one per Ray Train worker
        "fine-tune task": {"CPU": f.cpus_per_task, "GPU": 1},
        "sweep trial": {"CPU": s.cpus_per_trial, "GPU": 1},
        "FID actor": {"CPU": e.cpus_per_actor, "GPU": e.gpus_per_actor},
    }
    for what, req in requests.items():
        holders = [n for n, node in workers.items() if fits(req, node["resources"])]
        assert holders, f"no worker type can hold a {what} {req}"
    # the whole pretraining gang: how many workers fit per node, times how many such nodes may start
    per_worker = requests["pretrain worker"]
    capacity = sum(
        node["max_workers"] * min(math.floor(node["resources"].get(k, 0) / v) for k, v in per_worker.items())
        for node in workers.values()
    )
    assert capacity >= p.num_workers, f"{p.num_workers} pretraining GPU workers, the cluster can hold {capacity}"
    # and the on-demand type alone holds it (a spot reclaim would kill the gang)
    on_demand = [node for node in workers.values() if "InstanceMarketOptions" not in node["node_config"]]
    assert any(
        node["max_workers"] * min(math.floor(node["resources"].get(k, 0) / v) for k, v in per_worker.items())
        >= p.num_workers
        for node in on_demand
    )
