"""The Affiner bank: per-task parameters over a frozen DiT, stacked over tasks.

For each wrapped linear layer (frozen W, b̂) and task t:

    affiner:  y = (1 + a_t) ⊙ (W x) + b̂ + b_t + s_t · U_t · relu(D_t · x)
    difffit:  y = (1 + a_t) ⊙ (W x) + b̂ + b_t                    (bias + scale factors)
    lora:     y = W x + b̂ + U_t · D_t · x                          (rank r, no scale/shift)
    bitfit:   y = W x + b̂ + b_t                                    (bias only)
    full:     y = (W + ΔW_t) x + b̂ + Δb_t      on every linear layer (a full fine-tune per task)

a_t, b_t, U_t, ΔW_t start at zero, so at init every task's output equals the backbone's exactly.
Parameters are stacked over tasks ([T, ...]); a batch carries `task_ids` (N,) and each sample
gathers its own task's rows, in training too. A single-task batch (an int task id) costs plain
matmuls: a_t is folded into the weight and b_t into the bias on the fly. `AdapterBank.merge` folds
one task into W for zero-overhead single-task sampling (the relu branch stays as a side path, its
rank-r product accumulated into the output by the matmul). Training a_t over the frozen base uses
`diffscaler.adapters.lean_grad`: a_t's gradient comes from the output, so W x is never saved.

Each task also owns conditioning rows (one per class, or one for an unconditional task),
initialised from the backbone's null-class embedding.

The backbone knows nothing of this (peft-style): `attach` swaps the target linears for wrappers that
keep the base layer inside (`diffscaler.adapters.layers`, one class per method family), adds the
conditioning rows as the model's `task_embedder`, and installs `AdapterBank.forward` as the model's
forward: it routes task ids (checks, sorts a mixed batch by task, embeds labels per task) and calls
the backbone's `DiT.denoise`. State-dict keys and adapter files are what they were.

    bank = AdapterBank.attach(model, [TaskInfo("emoji"), TaskInfo("icons")], method="affiner", rank=8)
    out = model(x, t, y, task_ids=torch.tensor([0, 1, 1, 0]))   # the bank's forward, installed on the model
    diffscaler.artifacts.save_adapter(bank, "emoji", "adapters/", backbone_hash=...)
    bank = diffscaler.artifacts.load_adapters(fresh_model, ["adapters/emoji.safetensors"], backbone_hash=...)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffscaler.adapters.layers import METHOD_PARTS, AdaptedLinear, ScaleShiftLinear, adapted_linear
from diffscaler.adapters.lean_grad import compute_dtype, grouping_supported
from diffscaler.adapters.routing import TaskEmbedder, TaskGroups, TaskIds
from diffscaler.config import ADAPTER_METHODS, ADAPTER_TARGETS
from diffscaler.models.dit import DiT, TaskLinear

__all__ = ["METHOD_PARTS", "AdapterBank", "AdapterLoadError", "TaskInfo", "attached_bank"]


class AdapterLoadError(ValueError):
    """An adapter file that does not fit the model it is loaded onto."""


@dataclass(frozen=True)
class TaskInfo:
    name: str  # task name (file stem of its adapter)
    num_classes: int = 1  # conditioning rows; 1 for an unconditional task
    conditional: bool = False  # labels select rows (and guidance uses the null row)
    rank: int = 0  # this task's rank (0 = the bank's rank); smaller ranks are zero-padded exactly
    class_names: tuple[str, ...] = ()  # optional, for reports

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"task {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        if not self.conditional and self.num_classes != 1:
            raise ValueError(f"task {self.name!r}: an unconditional task has exactly one row")


# ------------------------------------------------------------------------------------------------
# Target selection (by structure, never by parameter-name substrings)
# ------------------------------------------------------------------------------------------------


def _target_slots(model: DiT, method: str, targets: Sequence[str]) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, dotted path) of every linear the method wraps."""
    slots: list[tuple[nn.Module, str, str]] = []
    if method == "full":
        for path, module in list(model.named_modules()):
            for attr, child in module.named_children():
                if isinstance(child, TaskLinear | AdaptedLinear):
                    slots.append((module, attr, f"{path}.{attr}" if path else attr))
        return slots
    for i, block in enumerate(model.blocks):
        by_target = {
            "qkv": (block.attn, "qkv", f"blocks.{i}.attn.qkv"),
            "proj": (block.attn, "proj", f"blocks.{i}.attn.proj"),
            "fc1": (block.mlp, "fc1", f"blocks.{i}.mlp.fc1"),
            "fc2": (block.mlp, "fc2", f"blocks.{i}.mlp.fc2"),
            "adaLN": (block.adaLN_modulation, "1", f"blocks.{i}.adaLN_modulation.1"),
        }
        slots.extend(by_target[t] for t in ADAPTER_TARGETS if t in targets)
    return slots


# ------------------------------------------------------------------------------------------------
# The bank
# ------------------------------------------------------------------------------------------------


@dataclass
class AdapterBank:
    """Handle on the adapters attached to one DiT (the modules themselves live in the model)."""

    model: DiT
    method: str
    rank: int
    targets: tuple[str, ...]
    tasks: list[TaskInfo]
    layers: dict[str, AdaptedLinear] = field(default_factory=dict)
    # Mixed batches are sorted by task in `forward` so each task's (1 + a_t) folds into its own
    # weight copy (one grouped matmul); False keeps the per-sample epilogue (A/B benchmarks, checks).
    group_mixed_batches: bool = True

    def set_lean_backward(self, enabled: bool) -> None:
        """Train the scale with the lean backward (True, the default) or plain autograd (A/B, checks)."""
        for layer in self.layers.values():
            if isinstance(layer, ScaleShiftLinear):
                layer.lean_backward = enabled

    def groups_batch(self, x: torch.Tensor, tokens: int, num_present: int | None = None) -> bool:
        """Whether `forward` sorts the mixed batch `x` (N, C, H, W) by task: a method with a scale, and
        at least the token-width layers would run grouped (see ScaleShiftLinear._group_offsets). Otherwise
        the batch keeps its order (and each sample's bits do not depend on the other tasks' ids).
        `num_present`: without grad, only the tasks in the batch are folded (a bank of many slots, serving)."""
        if not self.group_mixed_batches or self.method not in ("affiner", "difffit"):
            return False
        folded = num_present if num_present is not None else len(self.tasks)
        fits = folded * self.model.hidden_size <= x.shape[0] * tokens
        return fits and grouping_supported(x.device, compute_dtype(x))

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: DiT, tasks: Sequence[TaskInfo], method: str = "affiner", rank: int = 8,
               targets: Sequence[str] = ADAPTER_TARGETS, branch_scale_init: float = 1.0,
               seed: int = 0) -> AdapterBank:
        """Wrap `model`'s target layers in place, freeze the backbone, return the bank."""
        if attached_bank(model) is not None:
            raise ValueError("this model already has adapters attached")
        if method not in ADAPTER_METHODS:
            raise ValueError(f"adapter method {method!r} is not one of {list(ADAPTER_METHODS)}")
        unknown = [t for t in targets if t not in ADAPTER_TARGETS]
        if unknown or not targets:
            raise ValueError(f"adapter targets {list(targets)}: allowed {list(ADAPTER_TARGETS)}, at least one")
        if not tasks:
            raise ValueError("a bank needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names repeat: {names}")
        tasks = [t if t.rank else TaskInfo(t.name, t.num_classes, t.conditional, rank, t.class_names)
                 for t in tasks]
        if any(t.rank > rank for t in tasks):
            raise ValueError(f"a task's rank exceeds the bank's rank {rank}: {[(t.name, t.rank) for t in tasks]}")
        if "down" in METHOD_PARTS[method]:
            widths = {path: min(parent.get_submodule(attr).weight.shape)
                      for parent, attr, path in _target_slots(model, method, targets)}
            too_wide = {p: w for p, w in widths.items() if rank > w}
            if too_wide:
                first = next(iter(too_wide))
                raise ValueError(f"adapter rank {rank} is larger than layer {first}'s width {too_wide[first]}")
        model.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        bank = cls(model, method, rank, tuple(targets), list(tasks))
        for parent, attr, path in _target_slots(model, method, targets):
            base = parent.get_submodule(attr)
            wrapped = adapted_linear(base, method, len(tasks), rank, branch_scale_init, generator)
            setattr(parent, attr, wrapped)
            bank.layers[path] = wrapped
        null_row = model.y_embedder.embedding_table.weight[model.y_embedder.null_label]
        # a submodule of the model (state-dict key `task_embedder.rows`; moved, trained, synced with it)
        model.task_embedder = TaskEmbedder(tasks, null_row)
        model.task_embedder.dropout_prob = model.y_embedder.dropout_prob
        model.train(model.training)  # new modules adopt the model's mode (label dropout is train-only)
        bank._zero_rank_padding()
        model.forward = bank.forward  # the model's forward now routes task ids (see `forward`)
        for p in bank.parameters():
            p.requires_grad_(True)
        return bank

    @torch.no_grad()
    def _zero_rank_padding(self) -> None:
        # Rows of D_t and columns of U_t beyond a task's own rank are zero: exactly no contribution,
        # and zero gradients keep them zero in training.
        for layer in self.layers.values():
            if "down" not in layer.parts:
                continue
            for i, task in enumerate(self.tasks):
                layer.down[i, task.rank:] = 0
                layer.up[i, :, task.rank:] = 0

    # -- the task-routing forward ------------------------------------------------------------------
    @property
    def task_embedder(self) -> TaskEmbedder:
        return self.model.task_embedder

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, task_ids: TaskIds = None) -> torch.Tensor:
        """The adapted model's forward: x (N, C, H, W), t (N,), y (N,) -> (N, C_out, H, W).

        Without `task_ids` the backbone runs (labels index its classes). With them, each sample uses its
        task's conditioning rows and adapters; its label indexes that task's classes (-1 = the
        backbone's null row, for guidance).
        """
        model = self.model
        if task_ids is None:
            return DiT.forward(model, x, t, y)
        if model.check_inputs:
            model.check_batch(x, t, y)
            self.task_embedder.check(y, task_ids, x.shape[0])
        order = None
        counts = present = None
        if isinstance(task_ids, torch.Tensor) and not torch.is_grad_enabled():
            # sampling folds only the tasks in the batch: a bank of many slots (serving) still groups
            counts = torch.bincount(task_ids, minlength=len(self.tasks))
            present = counts.nonzero().flatten()
        if isinstance(task_ids, torch.Tensor) and self.groups_batch(
            x, model.grid_size**2, None if present is None else len(present)
        ):
            # Sort the batch by task once here (every op in the model is per sample), so the adapters
            # see each task's samples as one run of rows; the output is put back in the caller's order.
            order = torch.argsort(task_ids, stable=True)
            x, t, y, ids = x[order], t[order], y[order], task_ids[order]
            task_ids = TaskGroups(ids, torch.bincount(ids, minlength=len(self.tasks)) if counts is None else counts,
                                  present)
        label_emb = self.task_embedder(y, task_ids, model.y_embedder)  # (N, D)
        out = model.denoise(x, t, label_emb, task_ids)  # (N, C_out, H, W)
        if order is None:
            return out
        return torch.empty_like(out).index_copy_(0, order, out)  # row order[i] of the batch = sorted row i

    # -- queries ----------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter (chosen by structure): stacked layer parts + conditioning rows."""
        params = [p for layer in self.layers.values() for _, p in layer.task_parameters()]
        return params + [self.model.task_embedder.rows]

    def task_index(self, name: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i
        raise KeyError(f"unknown task {name!r}; this bank holds {[t.name for t in self.tasks]}")

    def task_ids(self, names: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([self.task_index(n) for n in names], dtype=torch.long, device=device)

    def trainable_parameters_per_task(self, task: str | int = 0) -> int:
        """Parameters one task owns (its own rank, its own rows), as a separate fine-tune trains them."""
        info = self.tasks[task if isinstance(task, int) else self.task_index(task)]
        total = info.num_classes * self.model.hidden_size
        for layer in self.layers.values():
            out_f, in_f = layer.base.weight.shape
            for name, _ in layer.task_parameters():
                total += {"scale": out_f, "shift": out_f, "down": info.rank * in_f, "up": out_f * info.rank,
                          "branch_scale": 1, "weight_delta": out_f * in_f, "bias_delta": out_f}[name]
        return total

    def backbone_parameters(self) -> int:
        adapter_ids = {id(p) for p in self.parameters()}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in adapter_ids)

    # -- merge ------------------------------------------------------------------------------------
    def merge(self, task: str | int) -> None:
        """Fold one task's a_t, b_t (or ΔW_t) into the base weights for single-task sampling."""
        t = task if isinstance(task, int) else self.task_index(task)
        for layer in self.layers.values():
            layer.merge(t)

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    # -- per-task state (file I/O lives in diffscaler.artifacts) ----------------------------------
    def task_state(self, task: str | int) -> dict[str, torch.Tensor]:
        t = task if isinstance(task, int) else self.task_index(task)
        info = self.tasks[t]
        state: dict[str, torch.Tensor] = {}
        for path, layer in self.layers.items():
            for name, p in layer.task_parameters():
                v = p.detach()[t]
                if name == "down":
                    v = v[: info.rank]
                elif name == "up":
                    v = v[:, : info.rank]
                elif name == "branch_scale":
                    v = v.reshape(1)
                state[f"{path}.{name}"] = v.float().contiguous().cpu()
        state["task_embedder.rows"] = self.model.task_embedder.rows.detach()[t, : info.num_classes].float().cpu()
        return state

    def task_state_keys(self) -> set[str]:
        """The tensor names of `task_state` (without copying any tensor)."""
        keys = {f"{path}.{name}" for path, layer in self.layers.items() for name, _ in layer.task_parameters()}
        return keys | {"task_embedder.rows"}

    @torch.no_grad()
    def load_task_state(self, t: int, state: dict[str, torch.Tensor], file: str | Path = "<state>") -> None:
        info = self.tasks[t]
        expected = self.task_state_keys()
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise AdapterLoadError(f"{file}: tensors do not match the model: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
        for path, layer in self.layers.items():
            for name, p in layer.task_parameters():
                v = state[f"{path}.{name}"]
                dst = p[t]
                if name == "down":
                    dst = dst[: info.rank]
                elif name == "up":
                    dst = dst[:, : info.rank]
                elif name == "branch_scale":
                    v = v.reshape(())
                if tuple(dst.shape) != tuple(v.shape):
                    raise AdapterLoadError(f"{file}: {path}.{name} has shape {tuple(v.shape)}, "
                                           f"the model needs {tuple(dst.shape)}")
                dst.copy_(v)
        rows = state["task_embedder.rows"]
        dst = self.model.task_embedder.rows[t, : info.num_classes]
        if tuple(rows.shape) != tuple(dst.shape):
            raise AdapterLoadError(f"{file}: task_embedder.rows has shape {tuple(rows.shape)}, "
                                   f"the model needs {tuple(dst.shape)}")
        dst.copy_(rows)


def attached_bank(model: nn.Module) -> AdapterBank | None:
    """The bank attached to `model` (its forward is the bank's), or None for a bare backbone."""
    owner = getattr(model.__dict__.get("forward"), "__self__", None)
    return owner if isinstance(owner, AdapterBank) else None
