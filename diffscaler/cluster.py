"""Which Ray cluster a DiffScaler program joins: the one place that decides.

    connect_ray(cfg)   # True when this call connected (the caller then owns ray.shutdown())
    connect_ray()      # a library call with no experiment config (`shards make --ray`, latent encoding)

Address, in order: `pipeline.ray_address` from the config; `RAY_ADDRESS` (set by `ray job submit`
and on cluster nodes); otherwise `"local"`, a new local cluster. A bare `ray.init()` would instead
join whatever /tmp/ray/ray_current_cluster names (any `ray start` cluster on this machine, even a
dead one, where it retries forever).
"""

from __future__ import annotations

import os
from typing import Any

from diffscaler.config import ExperimentConfig


def ray_address(cfg: ExperimentConfig | None = None) -> str:
    configured = cfg.pipeline.ray_address if cfg is not None else ""
    return configured or os.environ.get("RAY_ADDRESS") or "local"


def connect_ray(cfg: ExperimentConfig | None = None, **init_kwargs: Any) -> bool:
    """Join the cluster unless connected already; `init_kwargs` go to ray.init (log_to_driver=False)."""
    import ray  # here, not at the top: importing this module keeps Ray out of a driver that needs none

    if ray.is_initialized():
        return False
    ray.init(address=ray_address(cfg), **init_kwargs)
    return True


# ------------------------------------------------------------------------------------------------
# What the cluster has, or can start: requests no node can ever hold would stay PENDING forever
# ------------------------------------------------------------------------------------------------


AUTOSCALER_CONFIG_ENV = "DIFFSCALER_AUTOSCALER_CONFIG"  # a cluster.yaml-style file: its available_node_types
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"  # where `ray up` leaves the cluster config on the head node


def _autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of each node type the autoscaler may still start (none without an autoscaler).

    First from the GCS (`ray._private.state`, the call Ray Train uses for its own scaling checks). Ray
    2.60's autoscaler does not publish its config there (it stays None, so a 0-CPU head that scales from
    zero would look like a cluster no request fits): then from the autoscaler's config file,
    $DIFFSCALER_AUTOSCALER_CONFIG, else the ~/ray_bootstrap_config.yaml `ray up` writes on the head.
    """
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older/newer Ray without it: the config file, else the nodes that are up
        config = None
    if config is not None:
        return [{k: float(v) for k, v in g.resources.items()} for g in config.node_group_configs if g.max_count != 0]
    return [resources for resources, _max in _config_file_node_types()]


def _config_file_node_types() -> list[tuple[dict[str, float], int]]:
    """(resources, max_workers) of every worker type in the autoscaler's config file (none without one)."""
    import os

    import yaml

    path = os.environ.get(AUTOSCALER_CONFIG_ENV) or os.path.expanduser(BOOTSTRAP_CONFIG)
    try:
        with open(path) as f:
            config = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return []
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    limit = int(config.get("max_workers", 0) or 0)
    out = []
    for name, spec in types.items():
        most = int(spec.get("max_workers", limit) or 0)
        if name != head and most > 0:  # the head is up already: it is one of the alive nodes
            out.append(({k: float(v) for k, v in (spec.get("resources") or {}).items()}, most))
    return out


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
    if not grow:  # the GCS has no autoscaler config (Ray 2.60): its file, as in _autoscaler_node_types
        for resources, most in _config_file_node_types():
            for k, v in resources.items():
                grow[k] = grow.get(k, 0.0) + v * most
        if grow:
            grow = {k: v + alive.get(k, 0.0) for k, v in grow.items()}  # the nodes up now, plus all it may add
    return {k: max(alive.get(k, 0.0), float(grow.get(k, 0))) for k in set(alive) | set(grow)}
