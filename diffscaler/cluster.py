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
