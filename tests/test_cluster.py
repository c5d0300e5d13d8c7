"""diffscaler.cluster on a real local Ray cluster (no autoscaler: only alive nodes count)."""

import pytest

from diffscaler.cluster import connect_ray, max_cluster_resources, node_shapes, ray_address
from diffscaler.config import load_config


def test_address_order(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(load_config(None)) == "local"  # never a stale `ray start` cluster
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert ray_address(load_config(None)) == "http://head:8265"
    assert ray_address(load_config(None, ["pipeline.ray_address=auto"])) == "auto"


@pytest.mark.ray
def test_without_an_autoscaler_only_alive_nodes_count(ray_local, monkeypatch):
    monkeypatch.delenv("DIFFSCALER_AUTOSCALER_CONFIG", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/ray_bootstrap_config.yaml
    assert connect_ray(load_config(None)) is False  # already connected: nothing to own
    shapes = node_shapes()
    assert len(shapes) == 1 and shapes[0]["CPU"] == 2.0 and shapes[0].get("GPU", 0.0) == 0.0
    total = max_cluster_resources()
    assert total["CPU"] == 2.0 and total.get("GPU", 0.0) == 0.0


@pytest.mark.ray
def test_the_autoscaler_config_file_adds_the_node_types_it_can_start_from_zero(ray_local, monkeypatch):
    """Ray 2.60 does not publish the autoscaler's node types to the GCS; its config file (here the repo's own
    cluster.yaml, as `ray up` leaves it on the head) says what it can start, so a GPU request is not refused
    on a cluster whose GPU workers are all down."""
    from pathlib import Path

    import yaml

    from diffscaler.train.finetune import FinetuneInputError, check_fits

    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.delenv("DIFFSCALER_AUTOSCALER_CONFIG", raising=False)
    with pytest.raises(FinetuneInputError, match="no node has that"):
        check_fits(1, 1, "finetune")  # only the alive 2-CPU node: no GPU anywhere
    cluster_yaml = Path(__file__).resolve().parents[1] / "cluster.yaml"
    monkeypatch.setenv("DIFFSCALER_AUTOSCALER_CONFIG", str(cluster_yaml))
    check_fits(1, 1, "finetune")  # a GPU worker type can be started
    config = yaml.safe_load(cluster_yaml.read_text())
    workers = {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}
    shapes = node_shapes()
    assert len(shapes) == 1 + len(workers)  # the alive node, then one shape per worker type
    total = max_cluster_resources()
    gpus = sum(t["resources"].get("GPU", 0) * t.get("max_workers", config["max_workers"]) for t in workers.values())
    assert total["GPU"] == gpus > 0
    with pytest.raises(FinetuneInputError, match="no node has that"):
        check_fits(1, 64, "finetune")  # more GPUs than any type has: still refused up front
