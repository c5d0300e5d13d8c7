"""Per-task adapters over a frozen DiT (pure torch): the Affiner and its baselines."""

from diffscaler.adapters.bank import (
    METHOD_PARTS,
    AdaptedLinear,
    AdapterBank,
    AdapterLoadError,
    TaskInfo,
)

__all__ = ["METHOD_PARTS", "AdaptedLinear", "AdapterBank", "AdapterLoadError", "TaskInfo"]
