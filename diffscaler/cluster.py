"""Which Ray cluster a DiffScaler program joins: the one place that decides.

    connect_ray(cfg)   # True when this call connected (the caller then owns ray.shutdown())

Address, in order: `pipeline.ray_address` from the config; `RAY_ADDRESS` (set by `ray job submit`
and on cluster nodes); otherwise `"local"`, a new local cluster. A bare `ray.init()` would instead
join whatever /tmp/ray/ray_current_cluster names (any `ray start` cluster on this machine, even a
dead one, where it retries forever).
"""

from __future__ import annotations

import os

from diffscaler.config import ExperimentConfig


def ray_address(cfg: ExperimentConfig) -> str:
    return cfg.pipeline.ray_address or os.environ.get("RAY_ADDRESS") or "local"


def connect_ray(cfg: ExperimentConfig) -> bool:
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=ray_address(cfg))
    return True


# ------------------------------------------------------------------------------------------------
# What the cluster has, or can start: requests no node can ever hold would stay PENDING forever
# ------------------------------------------------------------------------------------------------


def _autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of each node type the autoscaler may still start (none without an autoscaler).

    Ray 2.60 has no public API for this; the autoscaler publishes its config to the GCS, read here
    through `ray._private.state` (the same call Ray Train uses for its own scaling checks).
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older/newer Ray without it: fall back to the nodes that are up
        return []
    if config is None:
        return []
    return [{k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs if g.max_count != 0]


def node_shapes() -> list[dict[str, float]]:
    """Resources of every alive node plus every node type the autoscaler can add (scale from zero)."""
    import ray

    alive = [{k: float(v) for k, v in n.get("Resources", {}).items()} for n in ray.nodes() if n.get("Alive")]
    return alive + _autoscaler_node_types()


def max_cluster_resources() -> dict[str, float]:
    """Totals the cluster has now or can grow to (the autoscaler's maximum, where there is one)."""
    import ray

    alive = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        from ray._private.state import state

        grow = state.get_max_resources_from_cluster_config() or {}
    except Exception:
        grow = {}
    return {k: max(alive.get(k, 0.0), float(grow.get(k, 0))) for k in set(alive) | set(grow)}
