"""Per-task adapters over a frozen DiT (pure torch): the Affiner and its baselines.

`bank` attaches them and routes task ids (`routing`); `layers` holds one wrapper class per method
family; `lean_grad` the Affiner's training backward; `condition` a task's spatial condition path (its
map's embedding, or the ControlNet baseline's block copies).
"""

from diffscaler.adapters.bank import CONDITION_PREFIX, AdapterBank, AdapterLoadError, TaskInfo, attached_bank
from diffscaler.adapters.condition import ConditionEmbedding, ConditionTokens, ControlBranch
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
    "CONDITION_PREFIX",
    "METHOD_PARTS",
    "AdaptedLinear",
    "AdapterBank",
    "AdapterLoadError",
    "ConditionEmbedding",
    "ConditionTokens",
    "ControlBranch",
    "DeltaLinear",
    "LowRankLinear",
    "ScaleShiftLinear",
    "TaskEmbedder",
    "TaskGroups",
    "TaskInfo",
    "adapted_linear",
    "attached_bank",
]
