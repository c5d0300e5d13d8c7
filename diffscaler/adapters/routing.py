"""Task routing: what a batch's task ids become on their way through an adapted DiT.

The backbone threads one opaque per-sample argument to every linear layer and never reads it
(`diffscaler.models.dit.TaskLinear`); the adapter side gives it meaning. `AdapterBank.forward` (the
model's forward once a bank is attached) checks the ids, sorts a mixed batch by task when the
adapted layers can then run one grouped matmul (`TaskGroups`), embeds each sample's label through its
task's conditioning rows (`TaskEmbedder`) and calls the backbone's `DiT.denoise` with the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from diffscaler.models.dit import LabelEmbedder


@dataclass(frozen=True)
class TaskInfo:
    """One task of an adapter bank: its conditioning rows, rank and condition map (here, below bank.py, which
    re-exports it)."""

    name: str  # task name (file stem of its adapter)
    num_classes: int = 1  # conditioning rows; 1 for an unconditional task
    conditional: bool = False  # labels select rows (and guidance uses the null row)
    rank: int = 0  # this task's rank (0 = the bank's rank); smaller ranks are zero-padded exactly
    class_names: tuple[str, ...] = ()  # optional, for reports
    condition: str = ""  # spatial condition kind: canny | mask | key:<member>; "" = none (no map)
    condition_channels: int = 0  # channels of the task's map (1 grey, 3 colour); 0 = no map
    condition_size: int = 0  # the map's side in pixels; 0 = the DiT's input side (a pixel backbone)
    # how the map is made, as the shards' index.json records it (free-form; saved in the adapter's JSON)
    condition_extractor: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"task {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        if not self.conditional and self.num_classes != 1:
            raise ValueError(f"task {self.name!r}: an unconditional task has exactly one row")
        if bool(self.condition) != (self.condition_channels > 0):
            raise ValueError(
                f"task {self.name!r}: a condition needs its kind and channels together "
                f"(condition={self.condition!r}, condition_channels={self.condition_channels})"
            )
        if self.condition_channels < 0 or self.condition_size < 0:
            raise ValueError(f"task {self.name!r}: condition_channels and condition_size must be >= 0")

    @property
    def has_condition(self) -> bool:
        return self.condition_channels > 0


@dataclass(frozen=True)
class TaskGroups:
    """A mixed batch sorted by task, so each task's samples are one run of rows: adapters can run one
    grouped matmul over per-task weights instead of per-sample work. Built by `AdapterBank.forward`."""

    ids: torch.Tensor  # (N,) task id per sample, ascending
    counts: torch.Tensor  # (T,) samples of each task (T = tasks in the bank, empty ones included)
    present: torch.Tensor | None = None  # (P,) ascending ids of the tasks in the batch (sampling: only they fold)

    def offsets(self, rows_per_sample: int) -> torch.Tensor:
        """(T,) int32 end row of each task's run in an (N * rows_per_sample, D) view."""
        return (torch.cumsum(self.counts, 0) * rows_per_sample).to(torch.int32)

    def present_offsets(self, rows_per_sample: int) -> torch.Tensor:
        """(P,) int32 end row of each present task's run: `offsets` without the empty tasks."""
        assert self.present is not None
        return (torch.cumsum(self.counts[self.present], 0) * rows_per_sample).to(torch.int32)


# (N,) long per sample; one int for a single-task batch; TaskGroups (a sorted mixed batch); or None
TaskIds = torch.Tensor | int | TaskGroups | None


def per_sample_ids(task_ids: TaskIds, n: int, device: torch.device) -> torch.Tensor:
    """(N,) long ids, whichever form `task_ids` has."""
    if isinstance(task_ids, TaskGroups):
        return task_ids.ids
    if isinstance(task_ids, int):
        return torch.full((n,), task_ids, dtype=torch.long, device=device)
    return task_ids


class TaskEmbedder(nn.Module):
    """Per-task conditioning rows [T, K_max, D], initialised from the backbone's null row."""

    def __init__(self, tasks: Sequence[TaskInfo], null_row: torch.Tensor):
        super().__init__()
        k_max = max(t.num_classes for t in tasks)
        rows = null_row.detach().float().reshape(1, 1, -1).repeat(len(tasks), k_max, 1)
        self.rows = nn.Parameter(rows)  # (T, K_max, D)
        # On the backbone's device: a host-to-device copy per forward would sync every training step.
        dev = null_row.device
        num_classes = torch.tensor([t.num_classes for t in tasks], device=dev)
        self.register_buffer("num_classes", num_classes, persistent=False)
        self.register_buffer("conditional", torch.tensor([t.conditional for t in tasks], device=dev), persistent=False)
        self.dropout_prob = 0.0  # set from the backbone's label dropout by AdapterBank.attach

    def check(self, y: torch.Tensor, task_ids: TaskIds, n: int) -> None:
        num_tasks = self.rows.shape[0]
        ids = per_sample_ids(task_ids, n, y.device)
        if ids.shape != (n,):
            raise ValueError(f"task_ids must be an int or have shape ({n},), got {tuple(ids.shape)}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"task_ids must be integers, got {ids.dtype}")
        if n == 0:
            return
        if int(ids.min()) < 0 or int(ids.max()) >= num_tasks:
            raise ValueError(f"task ids must be in [0, {num_tasks}); got [{int(ids.min())}, {int(ids.max())}]")
        limit = self.num_classes.to(ids.device)[ids]
        bad = (y < -1) | (y >= limit)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"label {int(y[i])} of sample {i} is out of range for task {int(ids[i])} "
                f"(valid: 0..{int(limit[i]) - 1}, or -1 for the null row)"
            )

    def forward(self, y: torch.Tensor, task_ids: TaskIds, y_embedder: LabelEmbedder) -> torch.Tensor:
        n = y.shape[0]
        ids = per_sample_ids(task_ids, n, y.device)
        if self.training and self.dropout_prob > 0:
            # Label dropout only for conditional tasks (unconditional tasks have no null to learn).
            drop = (torch.rand(n, device=y.device) < self.dropout_prob) & self.conditional.to(y.device)[ids]
            y = torch.where(drop, torch.full_like(y, -1), y)
        rows = self.rows[ids, y.clamp(min=0)]  # (N, D)
        null = y_embedder.embedding_table.weight[y_embedder.null_label].to(rows.dtype)  # frozen
        return torch.where((y < 0).unsqueeze(1), null.expand_as(rows), rows).to(
            y_embedder.embedding_table.weight.dtype
        )  # (N, D)
