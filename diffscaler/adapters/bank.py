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
initialised from the backbone's null-class embedding. A task with a spatial condition (TaskInfo.condition:
an edge map, a mask, a depth map) also owns a condition path (`diffscaler.adapters.condition`): a
zero-initialised embedding of its map added to the token embeddings (every method), or for method
`controlnet` a trainable copy of the first N blocks fed with the map (the baseline). The forward takes
`condition` (N, C, S, S) in [-1, 1] and `condition_mask` (N,) bool: which rows use their map (False: the
unconditioned output, for condition dropout and guidance). Rows of unconditional tasks ignore the map.

The backbone knows nothing of this (peft-style): `attach` swaps the target linears for wrappers that
keep the base layer inside (`diffscaler.adapters.layers`, one class per method family), adds the
conditioning rows as the model's `task_embedder`, and installs `AdapterBank.forward` as the model's
forward: it routes task ids (checks, sorts a mixed batch by task, embeds labels per task) and calls
the backbone's `DiT.denoise`. State-dict keys and adapter files are what they were.

    bank = AdapterBank.attach(model, [TaskInfo("emoji"), TaskInfo("icons")], method="affiner", rank=8)
    out = model(x, t, y, task_ids=torch.tensor([0, 1, 1, 0]))   # the bank's forward, installed on the model
    edges = TaskInfo("emoji-edges", condition="canny", condition_channels=1)
    bank = AdapterBank.attach(model, [edges, TaskInfo("icons")])
    out = model(x, t, y, task_ids=ids, condition=maps)            # maps (N, 1, S, S); icons rows ignore theirs
    diffscaler.artifacts.save_adapter(bank, "emoji", "adapters/", backbone_hash=...)
    bank = diffscaler.artifacts.load_adapters(fresh_model, ["adapters/emoji.safetensors"], backbone_hash=...)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffscaler.adapters.condition import (
    ConditionEmbedding,
    ConditionTokens,
    ControlBranch,
    ControlInjection,
    TokenInjection,
    stem_factor,
)
from diffscaler.adapters.layers import METHOD_PARTS, AdaptedLinear, ScaleShiftLinear, adapted_linear
from diffscaler.adapters.lean_grad import compute_dtype, grouping_supported
from diffscaler.adapters.routing import TaskEmbedder, TaskGroups, TaskIds, TaskInfo, per_sample_ids
from diffscaler.config import ADAPTER_METHODS, ADAPTER_TARGETS
from diffscaler.models.dit import BlockInjection, DiT, TaskLinear

__all__ = ["METHOD_PARTS", "AdapterBank", "AdapterLoadError", "TaskInfo", "attached_bank"]


class AdapterLoadError(ValueError):
    """An adapter file that does not fit the model it is loaded onto."""


CONDITION_PREFIX = "condition."  # tensor names of a task's condition path in its adapter file


# ------------------------------------------------------------------------------------------------
# Target selection (by structure, never by parameter-name substrings)
# ------------------------------------------------------------------------------------------------


def _target_slots(model: DiT, method: str, targets: Sequence[str]) -> list[tuple[nn.Module, str, str]]:
    """(parent module, attribute, dotted path) of every linear the method wraps."""
    slots: list[tuple[nn.Module, str, str]] = []
    if method == "controlnet":
        return slots  # the frozen blocks stay as they are; the task's copies live in its condition path
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


class TaskNames:
    """Task name -> slot, and merging one task into the weights, for a bank of either kind (AdapterBank;
    diffscaler.adapters.conv.ConvBank): `layers` maps a path to its MergeableLayer."""

    tasks: list[TaskInfo]
    layers: dict[str, Any]

    def merge(self, task: str | int) -> None:
        """Fold one task's parts into every wrapped layer's base weights, for single-task sampling."""
        t = task if isinstance(task, int) else self.task_index(task)
        for layer in self.layers.values():
            layer.merge(t)

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()

    def task_index(self, name: str) -> int:
        for i, t in enumerate(self.tasks):
            if t.name == name:
                return i
        raise KeyError(f"unknown task {name!r}; this bank holds {[t.name for t in self.tasks]}")

    def task_ids(self, names: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor([self.task_index(n) for n in names], dtype=torch.long, device=device)


@dataclass
class AdapterBank(TaskNames):
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
    condition_blocks: bool = False  # the map's tokens also enter every block's input (gated per block)
    controlnet_blocks: int = 0  # method controlnet: frozen blocks copied per conditional task
    condition_size: int = 0  # side of every conditional task's map in pixels (0: no task has one)
    # training only: share of the rows of conditional tasks that get no map (learns the unconditioned
    # output that condition guidance needs); set by the fine-tune from finetune.condition_dropout
    condition_dropout: float = 0.0

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
    def attach(
        cls,
        model: DiT,
        tasks: Sequence[TaskInfo],
        method: str = "affiner",
        rank: int = 8,
        targets: Sequence[str] = ADAPTER_TARGETS,
        branch_scale_init: float = 1.0,
        seed: int = 0,
        condition_blocks: bool = False,
        controlnet_blocks: int = 0,
        condition_dropout: float = 0.0,
    ) -> AdapterBank:
        """Wrap `model`'s target layers in place, freeze the backbone, return the bank.

        Tasks with a condition get their condition path (see `diffscaler.adapters.condition`):
        `condition_blocks` adds the map's tokens to every block's input too; `controlnet_blocks` is N of
        method controlnet (0 = half the backbone's blocks); `condition_dropout` see the field.
        """
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
        tasks = [t if t.rank else dataclasses.replace(t, rank=rank) for t in tasks]
        depth = len(model.blocks)
        n_copy = controlnet_blocks or max(1, depth // 2)
        if method == "controlnet" and not 1 <= n_copy <= depth:
            raise ValueError(f"controlnet_blocks {controlnet_blocks}: the backbone has {depth} blocks to copy")
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout {condition_dropout} must be in [0, 1)")
        sizes = {t.condition_size or model.config.input_size for t in tasks if t.has_condition}
        if len(sizes) > 1:
            raise ValueError(f"conditional tasks' maps have different sides {sorted(sizes)}; one backbone takes one")
        for size in sizes:
            stem_factor(size, model.config.input_size)
        if any(t.rank > rank for t in tasks):
            raise ValueError(f"a task's rank exceeds the bank's rank {rank}: {[(t.name, t.rank) for t in tasks]}")
        if "down" in METHOD_PARTS[method]:
            widths = {
                path: min(parent.get_submodule(attr).weight.shape)
                for parent, attr, path in _target_slots(model, method, targets)
            }
            too_wide = {p: w for p, w in widths.items() if rank > w}
            if too_wide:
                first = next(iter(too_wide))
                raise ValueError(f"adapter rank {rank} is larger than layer {first}'s width {too_wide[first]}")
        model.requires_grad_(False)
        generator = torch.Generator().manual_seed(seed)
        bank = cls(
            model,
            method,
            rank,
            tuple(targets),
            list(tasks),
            condition_blocks=condition_blocks,
            controlnet_blocks=n_copy if method == "controlnet" else 0,
            condition_size=next(iter(sizes), 0),
            condition_dropout=condition_dropout,
        )
        for parent, attr, path in _target_slots(model, method, targets):
            base = parent.get_submodule(attr)
            wrapped = adapted_linear(base, method, len(tasks), rank, branch_scale_init, generator)
            setattr(parent, attr, wrapped)
            bank.layers[path] = wrapped
        null_row = model.y_embedder.embedding_table.weight[model.y_embedder.null_label]
        # a submodule of the model (state-dict key `task_embedder.rows`; moved, trained, synced with it)
        model.task_embedder = TaskEmbedder(tasks, null_row)
        model.task_embedder.dropout_prob = model.y_embedder.dropout_prob
        if sizes:
            # a submodule too (state-dict keys `condition_path.<task index>.*`), one entry per conditional task
            model.condition_path = nn.ModuleDict(
                {str(i): bank._condition_module(t) for i, t in enumerate(tasks) if t.has_condition}
            )
        model.train(model.training)  # new modules adopt the model's mode (label dropout is train-only)
        bank._zero_rank_padding()
        model.forward = bank.forward  # the model's forward now routes task ids (see `forward`)
        for p in bank.parameters():
            p.requires_grad_(True)
        return bank

    def _condition_module(self, task: TaskInfo) -> nn.Module:
        model = self.model
        factor = stem_factor(self.condition_size, model.config.input_size)
        dev = model.x_embedder.proj.weight.device
        if self.method == "controlnet":
            module = ControlBranch(
                task.condition_channels,
                model.hidden_size,
                model.patch_size,
                factor,
                model.blocks[: self.controlnet_blocks],
            )
        else:
            module = ConditionEmbedding(
                task.condition_channels,
                model.hidden_size,
                model.patch_size,
                factor,
                len(model.blocks),
                self.condition_blocks,
            )
        return module.to(dev)

    @torch.no_grad()
    def set_task(self, t: int, info: TaskInfo) -> None:
        """Make slot `t` hold task `info` (a resident bank paging tasks in and out, `diffscaler.serving`): its
        classes, rank (padding zeroed) and condition path (built for a task with a map, reused when the slot's
        has the same channels, dropped for a task without). Load its tensors next with `load_task_state`.
        ValueError when its map does not fit the bank's (another side than `condition_size`)."""
        model = self.model
        info = info if info.rank else dataclasses.replace(info, rank=self.rank)
        if info.rank > self.rank:
            raise ValueError(f"task {info.name!r} has rank {info.rank}, the bank's rank is {self.rank}")
        if info.num_classes > self.task_embedder.rows.shape[1]:
            raise ValueError(
                f"task {info.name!r} has {info.num_classes} classes, the bank's rows hold "
                f"{self.task_embedder.rows.shape[1]}"
            )
        path = self.condition_path
        if info.has_condition:
            side = info.condition_size or model.config.input_size
            others = path is not None and any(k != str(t) for k in path)
            if others and side != self.condition_size:
                raise ValueError(
                    f"task {info.name!r} takes {side} px maps, the bank's conditional tasks take {self.condition_size}"
                )
            stem_factor(side, model.config.input_size)
            self.condition_size = side
            if path is None:
                model.condition_path = path = nn.ModuleDict()
            old = next((m for k, m in path.items() if k == str(t)), None)
            first = None if old is None else (old.embed.stem[0] if len(old.embed.stem) else old.embed.proj)
            if first is None or first.in_channels != info.condition_channels:  # else load_task_state overwrites it
                path[str(t)] = self._condition_module(info).train(model.training)
        elif path is not None and str(t) in path:
            del path[str(t)]
        self.tasks[t] = info
        emb = self.task_embedder
        emb.num_classes[t] = info.num_classes
        emb.conditional[t] = info.conditional
        for layer in self.layers.values():
            if "down" in layer.parts:  # columns beyond the task's rank are exactly zero
                layer.down[t].zero_()
                layer.up[t].zero_()

    @torch.no_grad()
    def _zero_rank_padding(self) -> None:
        # Rows of D_t and columns of U_t beyond a task's own rank are zero: exactly no contribution,
        # and zero gradients keep them zero in training.
        for layer in self.layers.values():
            if "down" not in layer.parts:
                continue
            for i, task in enumerate(self.tasks):
                layer.down[i, task.rank :] = 0
                layer.up[i, :, task.rank :] = 0

    # -- the task-routing forward ------------------------------------------------------------------
    @property
    def task_embedder(self) -> TaskEmbedder:
        return self.model.task_embedder

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        task_ids: TaskIds = None,
        condition: torch.Tensor | ConditionTokens | None = None,
        condition_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The adapted model's forward: x (N, C, H, W), t (N,), y (N,) -> (N, C_out, H, W).

        Without `task_ids` the backbone runs (labels index its classes). With them, each sample uses its
        task's conditioning rows and adapters; its label indexes that task's classes (-1 = the
        backbone's null row, for guidance). `condition` (N, C, S, S) in [-1, 1] holds the maps of the rows
        of conditional tasks (or `embed_condition`'s ConditionTokens, computed once per sampling call);
        `condition_mask` (N,) bool which rows use their map (default: every row of a conditional task).
        Rows of unconditional tasks ignore both. A row of a conditional task with no map and no False in
        `condition_mask` is an error; in training `condition_dropout` drops maps at random.
        """
        model = self.model
        if task_ids is None:
            if condition is not None or condition_mask is not None:
                raise ValueError("a condition map needs task_ids: the backbone alone takes none")
            return DiT.forward(model, x, t, y)
        if model.check_inputs:
            model.check_batch(x, t, y)
            self.task_embedder.check(y, task_ids, x.shape[0])
        if not isinstance(condition, ConditionTokens):
            condition = self.embed_condition(
                condition,
                task_ids,
                condition_mask,
                n=x.shape[0],
                dropout=self.condition_dropout if model.training else 0.0,
            )
        elif len(condition) != x.shape[0] or condition_mask is not None:
            raise ValueError(
                f"ConditionTokens of {len(condition)} rows for a batch of {x.shape[0]}"
                + (" (and their mask is inside them: no condition_mask)" if condition_mask is not None else "")
            )
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
            task_ids = TaskGroups(
                ids, torch.bincount(ids, minlength=len(self.tasks)) if counts is None else counts, present
            )
            condition = None if condition is None else condition.take(order)
        label_emb = self.task_embedder(y, task_ids, model.y_embedder)  # (N, D)
        out = model.denoise(x, t, label_emb, task_ids, self._injection(condition))  # (N, C_out, H, W)
        if order is None:
            return out
        return torch.empty_like(out).index_copy_(0, order, out)  # row order[i] of the batch = sorted row i

    # -- the condition path -------------------------------------------------------------------------
    @property
    def condition_path(self) -> nn.ModuleDict | None:
        """Each conditional task's condition module, keyed by its task index as a string (None: no task has a map)."""
        return getattr(self.model, "condition_path", None)

    def _check_condition(self, cond: torch.Tensor, ids: torch.Tensor, use: torch.Tensor, n: int) -> None:
        if cond.dim() != 4 or cond.shape[0] != n:
            raise ValueError(f"condition has shape {tuple(cond.shape)}; it needs (N={n}, C, S, S), one map per row")
        used = sorted({int(i) for i in ids[use].tolist()})
        side, width = self.condition_size, max(self.tasks[i].condition_channels for i in used)
        # C: the widest channel count of the batch's tasks, or of the bank's (a batch cut from a padded set)
        widest = max(t.condition_channels for t in self.tasks)
        if cond.shape[2:] != (side, side) or cond.shape[1] not in (width, widest):
            names = ", ".join(
                f"{self.tasks[i].name!r} ({self.tasks[i].condition}, {self.tasks[i].condition_channels} ch)"
                for i in used
            )
            also = f" (or {widest}: the bank's widest)" if widest != width else ""
            raise ValueError(
                f"condition maps have shape {tuple(cond.shape[1:])} (C, H, W), but task(s) {names} "
                f"take ({width}, {side}, {side}){also}: {side} px maps with the widest task's "
                "channels (narrower maps padded with zero channels, as the readers give them)"
            )
        if self.model.check_inputs:
            vals = cond[use]
            if not torch.isfinite(vals).all():
                raise ValueError("condition maps contain NaN or infinite values")
            if vals.numel() and float(vals.abs().max()) > 1.0 + 1e-6:
                raise ValueError(
                    f"condition maps must be in [-1, 1] (the readers' and maps_to_unit's range); "
                    f"got values up to {float(vals.abs().max()):g}"
                )

    def embed_condition(
        self,
        condition: torch.Tensor | None,
        task_ids: TaskIds,
        condition_mask: torch.Tensor | None = None,
        n: int | None = None,
        dropout: float = 0.0,
    ) -> ConditionTokens | None:
        """The batch's maps embedded (N rows in the caller's order): computed once per sampling call,
        as the map's tokens do not depend on t. None when no task of the bank takes a map; tokens None
        when no row uses one (the backbone's cost).

        ValueError: a row of a conditional task without a map and not masked off, a map of the wrong
        size or channel count, values outside [-1, 1]. Rows of unconditional tasks ignore the map."""
        if task_ids is None:
            raise ValueError("a condition map needs task_ids: the backbone alone takes none")
        if n is None:
            if isinstance(task_ids, torch.Tensor | TaskGroups):
                n = len(per_sample_ids(task_ids, 0, self.model.pos_embed.device))
            elif condition is not None or condition_mask is not None:
                n = (condition if condition is not None else condition_mask).shape[0]
            else:
                n = 1  # one task id and nothing else: whether that task needs a map
        path = self.condition_path
        device = self.model.pos_embed.device
        ids = per_sample_ids(task_ids, n, device).to(device)
        if condition_mask is not None and (
            not isinstance(condition_mask, torch.Tensor)
            or condition_mask.dtype != torch.bool
            or condition_mask.shape != (n,)
        ):
            raise ValueError(f"condition_mask must be a bool tensor of shape ({n},)")
        if path is None:
            return None  # no task of this bank takes a map: a given map is ignored, like an unconditional row's
        takes = torch.tensor([t.has_condition for t in self.tasks], device=device)[ids]  # (N,)
        use = takes if condition_mask is None else takes & condition_mask.to(device)
        if condition is None:
            if bool(use.any()):
                i = int(use.nonzero()[0, 0])
                task = self.tasks[int(ids[i])]
                raise ValueError(
                    f"task {task.name!r} takes a condition map ({task.condition}, {task.condition_channels} "
                    f"channel(s), {self.condition_size} px) and row {i} has none: pass condition=(N, "
                    f"{task.condition_channels}, {self.condition_size}, {self.condition_size}) maps, or "
                    f"condition_mask False for its rows to ask for its unconditioned output explicitly"
                )
            return ConditionTokens(ids, use, None)
        if not bool(use.any()):
            return ConditionTokens(ids, use, None)
        condition = condition.to(device)
        self._check_condition(condition, ids, use, n)
        if dropout > 0:
            use = use & (torch.rand(n, device=device) >= dropout)
        tokens = None
        for key, module in path.items():
            rows = (use & (ids == int(key))).nonzero().flatten()
            if rows.numel() == 0:
                continue
            c = self.tasks[int(key)].condition_channels
            if rows.numel() == n:
                tokens = module.embed(condition[:, :c])  # (N, L, D): every row is this task's
                break
            part = module.embed(condition[rows, :c])  # (N_t, L, D)
            if tokens is None:
                tokens = part.new_zeros(n, *part.shape[1:])
            tokens = tokens.index_copy(0, rows, part)
        return ConditionTokens(ids, use, tokens)  # tokens None: every map dropped

    def _injection(self, cond: ConditionTokens | None) -> BlockInjection | None:
        if cond is None or cond.tokens is None:
            return None
        path = self.condition_path
        if self.method == "controlnet":
            return ControlInjection(cond, {int(k): m for k, m in path.items()})
        gates = None
        if self.condition_blocks:
            stacked = torch.stack(
                [
                    path[str(i)].gates if str(i) in path else torch.zeros_like(next(iter(path.values())).gates)
                    for i in range(len(self.tasks))
                ]
            )  # (T, depth - 1, D)
            gates = stacked[cond.ids]  # (N, depth - 1, D)
        return TokenInjection(cond, gates)

    def condition_parameters_per_task(self, task: str | int = 0) -> int:
        """Trainable parameters of one task's condition path (0 for a task without a map)."""
        t = task if isinstance(task, int) else self.task_index(task)
        path = self.condition_path
        if path is None or str(t) not in path:
            return 0
        return sum(p.numel() for p in path[str(t)].parameters())

    # -- queries ----------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter (chosen by structure): stacked layer parts + conditioning rows + the
        conditional tasks' condition paths."""
        params = [p for layer in self.layers.values() for _, p in layer.task_parameters()]
        path = self.condition_path
        cond = [] if path is None else list(path.parameters())
        return params + [self.model.task_embedder.rows] + cond

    def trainable_parameters_per_task(self, task: str | int = 0) -> int:
        """Parameters one task owns (its own rank, its own rows, its condition path), as a separate
        fine-tune trains them."""
        info = self.tasks[task if isinstance(task, int) else self.task_index(task)]
        total = info.num_classes * self.model.hidden_size + self.condition_parameters_per_task(info.name)
        for layer in self.layers.values():
            out_f, in_f = layer.base.weight.shape
            for name, _ in layer.task_parameters():
                total += {
                    "scale": out_f,
                    "shift": out_f,
                    "down": info.rank * in_f,
                    "up": out_f * info.rank,
                    "branch_scale": 1,
                    "weight_delta": out_f * in_f,
                    "bias_delta": out_f,
                }[name]
        return total

    def backbone_parameters(self) -> int:
        adapter_ids = {id(p) for p in self.parameters()}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in adapter_ids)

    # -- merge ------------------------------------------------------------------------------------
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
        path = self.condition_path
        if path is not None and str(t) in path:
            for k, v in path[str(t)].state_dict().items():
                state[f"{CONDITION_PREFIX}{k}"] = v.detach().float().contiguous().cpu()
        return state

    def task_state_keys(self, t: int) -> set[str]:
        """The tensor names of `task_state(t)` (without copying any tensor)."""
        keys = {f"{path}.{name}" for path, layer in self.layers.items() for name, _ in layer.task_parameters()}
        path = self.condition_path
        if path is not None and str(t) in path:
            keys |= {f"{CONDITION_PREFIX}{k}" for k in path[str(t)].state_dict()}
        return keys | {"task_embedder.rows"}

    @torch.no_grad()
    def load_task_state(self, t: int, state: dict[str, torch.Tensor], file: str | Path = "<state>") -> None:
        info = self.tasks[t]
        expected = self.task_state_keys(t)
        carries = any(k.startswith(CONDITION_PREFIX) for k in state)
        if carries and not info.has_condition:
            raise AdapterLoadError(
                f"{file}: the adapter carries a condition path, but task {t} ({info.name!r}) "
                "of this bank takes no condition map; load it into a bank built from its "
                "JSON (diffscaler.artifacts.load_adapters)"
            )
        if info.has_condition and not carries:
            raise AdapterLoadError(
                f"{file}: task {info.name!r} takes a condition map ({info.condition}) but the "
                "file has no condition path"
            )
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise AdapterLoadError(
                f"{file}: tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
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
                    raise AdapterLoadError(
                        f"{file}: {path}.{name} has shape {tuple(v.shape)}, the model needs {tuple(dst.shape)}"
                    )
                dst.copy_(v)
        rows = state["task_embedder.rows"]
        dst = self.model.task_embedder.rows[t, : info.num_classes]
        if tuple(rows.shape) != tuple(dst.shape):
            raise AdapterLoadError(
                f"{file}: task_embedder.rows has shape {tuple(rows.shape)}, the model needs {tuple(dst.shape)}"
            )
        dst.copy_(rows)
        if info.has_condition:
            own = self.condition_path[str(t)].state_dict()
            for k, dst in own.items():
                v = state[f"{CONDITION_PREFIX}{k}"]
                if tuple(dst.shape) != tuple(v.shape):
                    raise AdapterLoadError(
                        f"{file}: {CONDITION_PREFIX}{k} has shape {tuple(v.shape)}, the "
                        f"condition path of task {info.name!r} needs {tuple(dst.shape)}"
                    )
                dst.copy_(v)


def attached_bank(model: nn.Module) -> AdapterBank | None:
    """The bank attached to `model` (its forward is the bank's), or None for a bare backbone."""
    owner = getattr(model.__dict__.get("forward"), "__self__", None)
    return owner if isinstance(owner, AdapterBank) else None
