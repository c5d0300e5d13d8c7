"""Per-task adapters over a frozen DiT (pure torch): the Affiner and its baselines.

`bank` attaches them and routes task ids (`routing`); `layers` holds one wrapper class per method
family; `lean_grad` the Affiner's training backward.
"""

from diffscaler.adapters.bank import AdapterBank, AdapterLoadError, TaskInfo, attached_bank
from diffscaler.adapters.layers import (
    METHOD_PARTS,
    AdaptedLinear,
    DeltaLinear,
    LowRankLinear,
    ScaleShiftLinear,
    adapted_linear,
)
from diffscaler.adapters.routing import TaskEmbedder, TaskGroups

__all__ = [
    "METHOD_PARTS",
    "AdaptedLinear",
    "AdapterBank",
    "AdapterLoadError",
    "DeltaLinear",
    "LowRankLinear",
    "ScaleShiftLinear",
    "TaskEmbedder",
    "TaskGroups",
    "TaskInfo",
    "adapted_linear",
    "attached_bank",
]
