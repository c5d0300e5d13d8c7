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
def test_without_an_autoscaler_only_alive_nodes_count(ray_local):
    assert connect_ray(load_config(None)) is False  # already connected: nothing to own
    shapes = node_shapes()
    assert len(shapes) == 1 and shapes[0]["CPU"] == 2.0 and shapes[0].get("GPU", 0.0) == 0.0
    total = max_cluster_resources()
    assert total["CPU"] == 2.0 and total.get("GPU", 0.0) == 0.0
