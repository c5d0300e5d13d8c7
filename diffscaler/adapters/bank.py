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

    bank = AdapterBank.attach(model, [TaskInfo("emoji"), TaskInfo("icons")], method="affiner", rank=8)
    out = model(x, t, y, task_ids=torch.tensor([0, 1, 1, 0]))
    diffscaler.artifacts.save_adapter(bank, "emoji", "adapters/", backbone_hash=...)
    bank = diffscaler.artifacts.load_adapters(fresh_model, ["adapters/emoji.safetensors"], backbone_hash=...)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffscaler.adapters.lean_grad import (
    add_shift_and_branch_,
    compute_dtype,
    folded_weight,
    grouped_scaled_linear,
    grouping_supported,
    lean_affine_linear,
)
from diffscaler.config import ADAPTER_METHODS, ADAPTER_TARGETS
from diffscaler.models.dit import DiT, LabelEmbedder, TaskGroups, TaskIds, TaskLinear

# Which per-task tensors each method owns (its "structure"; trainable params are chosen by it).
METHOD_PARTS = {
    "affiner": ("scale", "shift", "down", "up", "branch_scale"),
    "difffit": ("scale", "shift"),
    "lora": ("down", "up"),
    "bitfit": ("shift",),
    "full": ("weight_delta", "bias_delta"),
}


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
# Layers
# ------------------------------------------------------------------------------------------------


def _scale_shift(
    y: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor, shift: torch.Tensor | None
) -> torch.Tensor:
    """(1 + a) ⊙ y + b̂ + b, in y's dtype; a, b: (out,) or per sample (N, 1.., out).

    Written y + y·a rather than y·(1 + a): in bf16, 1 + a keeps 8 bits, so a = 0.05 would act as
    0.047; a alone keeps its relative precision. Casting the per-channel terms to y's dtype keeps a
    bf16 activation bf16 (fp32 parameters would otherwise promote it) and lets autograd save y in bf16.
    """
    out = y if scale is None else y + y * scale.to(y.dtype)
    bias = bias if shift is None else bias + shift.to(bias.dtype)
    return out + bias.to(y.dtype)


class AdaptedLinear(nn.Module):
    """A frozen base linear plus stacked per-task parameters; forward(x, task_ids) like TaskLinear."""

    # Training a scale (affiner, difffit) over a frozen base: take a's gradient from the output instead of
    # saving W x (see diffscaler.adapters.lean_grad). False: plain autograd, for A/B benchmarks and checks.
    lean_backward: bool = True

    def __init__(self, base: nn.Linear, method: str, num_tasks: int, rank: int, branch_scale_init: float,
                 generator: torch.Generator):
        super().__init__()
        self.base = base
        self.method = method
        out_f, in_f = base.weight.shape
        parts = METHOD_PARTS[method]
        dev, dt = base.weight.device, torch.float32  # adapter weights stay fp32 over a bf16 base
        self.scale = nn.Parameter(torch.zeros(num_tasks, out_f, device=dev, dtype=dt)) if "scale" in parts else None
        self.shift = nn.Parameter(torch.zeros(num_tasks, out_f, device=dev, dtype=dt)) if "shift" in parts else None
        self.down = self.up = self.branch_scale = None
        if "down" in parts:
            down = torch.empty(num_tasks, rank, in_f, dtype=dt)
            bound = 1.0 / math.sqrt(in_f)  # LoRA's A init (kaiming-uniform, a=sqrt(5))
            down.uniform_(-bound, bound, generator=generator)
            self.down = nn.Parameter(down.to(dev))  # D_t, random
            self.up = nn.Parameter(torch.zeros(num_tasks, out_f, rank, device=dev, dtype=dt))  # U_t, zero
        if "branch_scale" in parts:
            self.branch_scale = nn.Parameter(torch.full((num_tasks,), float(branch_scale_init), device=dev, dtype=dt))
        self.weight_delta = self.bias_delta = None
        if "weight_delta" in parts:
            self.weight_delta = nn.Parameter(torch.zeros(num_tasks, out_f, in_f, device=dev, dtype=dt))
            self.bias_delta = nn.Parameter(torch.zeros(num_tasks, out_f, device=dev, dtype=dt))
        self.relu_branch = method == "affiner"
        self.merged_task: int | None = None
        self._unmerged: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def weight(self) -> torch.Tensor:  # the frozen base weight, for code that reads dtype/device
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base.bias

    def task_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name in METHOD_PARTS[self.method]:
            yield name, getattr(self, name)

    def _up_scaled(self, t: int | torch.Tensor) -> torch.Tensor:
        """s_t · U_t, (out, r) or per sample (N, out, r): the branch scale folded into U (fp32)."""
        if self.branch_scale is None:
            return self.up[t]
        s = self.branch_scale[t]
        return self.up[t] * (s if s.dim() == 0 else s.view(-1, 1, 1))

    def _add_branch_single(self, y: torch.Tensor, x: torch.Tensor, t: int) -> torch.Tensor:
        """y + s_t · U_t · act(D_t x), the rank-r product accumulated into y by the matmul itself: no
        (..., out) temporary written and read back (addmm's C operand)."""
        h = F.linear(x, self.down[t].to(x.dtype))  # (..., r)
        if self.relu_branch:
            h = F.relu(h)
        y2 = y.reshape(-1, y.shape[-1])  # (rows, out)
        out = torch.addmm(y2, h.reshape(-1, h.shape[-1]).to(y.dtype), self._up_scaled(t).to(y.dtype).t())
        return out.reshape(y.shape)

    def _add_branch_mixed(self, y: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The same per sample: batched matmuls over the gathered D, U of each sample's task."""
        n, in_f = x.shape[0], x.shape[-1]
        x3 = x.reshape(n, -1, in_f)  # (N, L, in)
        h = torch.bmm(x3, self.down[ids].to(x.dtype).transpose(1, 2))  # (N, L, r)
        if self.relu_branch:
            h = F.relu(h)
        y3 = y.reshape(n, -1, y.shape[-1])  # (N, L, out)
        out = torch.baddbmm(y3, h.to(y.dtype), self._up_scaled(ids).to(y.dtype).transpose(1, 2))
        return out.reshape(y.shape)

    def _lean(self) -> bool:
        """Train the scale with lean_affine_linear (frozen base, scale trained, grad mode on)."""
        base = self.base
        branch_ok = self.down is None or (self.relu_branch and self.branch_scale is not None)
        return (self.lean_backward and self.scale is not None and self.shift is not None and branch_ok
                and self.scale.requires_grad and torch.is_grad_enabled() and base.bias is not None
                and not base.weight.requires_grad and not base.bias.requires_grad)

    def forward(self, x: torch.Tensor, task_ids: TaskIds = None) -> torch.Tensor:
        w, b = self.base.weight, self.base.bias
        if task_ids is None:
            if self.merged_task is not None:
                raise RuntimeError("a task is merged into this layer's weights; unmerge() to run the backbone")
            return F.linear(x, w, b)
        if self.merged_task is not None:
            # a_t, b_t (or ΔW_t) live in W, b̂ now; only the rank-r side path remains. Any other task in
            # the batch would silently get the merged one's weights: refuse it.
            if isinstance(task_ids, int):
                if task_ids != self.merged_task:
                    raise RuntimeError(f"task {self.merged_task} is merged; task {task_ids} needs unmerge() first")
            elif bool(((task_ids.ids if isinstance(task_ids, TaskGroups) else task_ids) != self.merged_task).any()):
                raise RuntimeError(f"task {self.merged_task} is merged; a batch with other tasks needs unmerge()")
            y = F.linear(x, w, b)
            return self._add_branch_single(y, x, self.merged_task) if self.down is not None else y
        if isinstance(task_ids, int):
            return self._forward_single(x, task_ids)
        return self._forward_mixed(x, task_ids)

    def _forward_single(self, x: torch.Tensor, t: int) -> torch.Tensor:
        w, b = self.base.weight, self.base.bias
        if self.weight_delta is not None:
            return F.linear(x, w + self.weight_delta[t].to(w.dtype), b + self.bias_delta[t].to(b.dtype))
        if self._lean():
            branch = (self.down[t], self.up[t], self.branch_scale[t]) if self.down is not None else ()
            return lean_affine_linear(x, w, b, self.scale[t], self.shift[t], *branch)
        if self.scale is not None and self.scale.requires_grad and torch.is_grad_enabled():
            # Training: (1 + a_t) as an epilogue on W x. Folded into W, autograd would compute the full
            # weight gradient (a matmul as large as the forward) only to reduce it to a_t's gradient.
            shift = self.shift[t] if self.shift is not None else None
            y = _scale_shift(F.linear(x, w), self.scale[t], b, shift)
            return self._add_branch_single(y, x, t) if self.down is not None else y
        if self.scale is not None:  # (1 + a_t) ⊙ (W x) == ((1 + a_t) ⊙_rows W) x: one matmul
            w = folded_weight(w, self.scale[t], w.dtype)
        if self.shift is not None:
            b = b + self.shift[t].to(b.dtype)
        y = F.linear(x, w, b)
        return self._add_branch_single(y, x, t) if self.down is not None else y

    def _group_offsets(self, x: torch.Tensor, groups: TaskGroups | None) -> torch.Tensor | None:
        """Row offsets for one grouped matmul over the tasks' folded weights, or None where the
        per-sample path is cheaper or unsupported: T folded weight copies must cost less than the two
        passes over the (N, L, out) output they save (T * in <= N * L), so the adaLN layers (one row
        per sample) stay per sample."""
        if groups is None or self.scale is None or self.shift is None or x.dim() != 3:
            return None
        num_tasks, (n, length, in_f) = self.scale.shape[0], x.shape
        if num_tasks * in_f > n * length or not grouping_supported(x.device, compute_dtype(x)):
            return None
        return groups.offsets(length)

    def _forward_grouped(self, x: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Sampling a batch sorted by task: (1 + a_t) folded into each task's weight copy, one grouped
        matmul, then b̂ + b_t and the branch added by one more (rank r + 1) matmul into the output."""
        w, b = self.base.weight, self.base.bias
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x3 = x.to(dtype)  # (N, L, in)
            y = grouped_scaled_linear(x3, w, self.scale, offsets, dtype)  # (N, L, out)
            c = (b.to(self.shift.dtype) + self.shift[ids]).to(dtype)  # (N, out)
            relu_h = up_scaled = None
            if self.down is not None:
                relu_h = F.relu(torch.bmm(x3, self.down[ids].to(dtype).transpose(1, 2)))  # (N, L, r)
                up_scaled = self._up_scaled(ids).to(dtype)  # (N, out, r)
            return add_shift_and_branch_(y, c, relu_h, up_scaled)

    def _forward_mixed(self, x: torch.Tensor, task_ids: torch.Tensor | TaskGroups) -> torch.Tensor:
        groups = task_ids if isinstance(task_ids, TaskGroups) else None
        ids = groups.ids if groups is not None else task_ids
        n = x.shape[0]
        per_sample = (n,) + (1,) * (x.dim() - 2) + (-1,)  # broadcast (N, out) over tokens
        w, b = self.base.weight, self.base.bias
        if self.weight_delta is not None:
            x3 = x.reshape(n, -1, x.shape[-1])
            w_t = w.unsqueeze(0) + self.weight_delta[ids].to(w.dtype)  # (N, out, in)
            y = torch.bmm(x3, w_t.transpose(1, 2)).reshape(*x.shape[:-1], -1)
            return y + (b + self.bias_delta[ids].to(b.dtype)).view(per_sample)
        offsets = self._group_offsets(x, groups)
        if self._lean():
            branch = (self.down[ids], self.up[ids], self.branch_scale[ids]) if self.down is not None else ()
            return lean_affine_linear(x, w, b, self.scale[ids], self.shift[ids], *branch,
                                      task_scale=self.scale if offsets is not None else None, offsets=offsets)
        if offsets is not None and not torch.is_grad_enabled():
            return self._forward_grouped(x, ids, offsets)
        y = F.linear(x, w)  # (N, *, out): one shared matmul for every task in the batch
        scale = self.scale[ids].view(per_sample) if self.scale is not None else None
        shift = self.shift[ids].view(per_sample) if self.shift is not None else None
        y = _scale_shift(y, scale, b, shift)
        return self._add_branch_mixed(y, x, ids) if self.down is not None else y

    @torch.no_grad()
    def merge(self, t: int) -> None:
        if self.merged_task is not None:
            raise RuntimeError(f"task {self.merged_task} is already merged; unmerge() first")
        w, b = self.base.weight, self.base.bias
        self._unmerged = (w.detach().clone(), b.detach().clone())  # exact restore, no division
        if self.weight_delta is not None:
            w.add_(self.weight_delta[t].to(w.dtype))
            b.add_(self.bias_delta[t].to(b.dtype))
        if self.scale is not None:
            w.mul_((1 + self.scale[t]).to(w.dtype).unsqueeze(1))
        if self.shift is not None:
            b.add_(self.shift[t].to(b.dtype))
        self.merged_task = t

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._unmerged is not None:
            self.base.weight.copy_(self._unmerged[0])
            self.base.bias.copy_(self._unmerged[1])
        self._unmerged, self.merged_task = None, None


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
        ids = torch.full((n,), task_ids, dtype=torch.long, device=y.device) if isinstance(task_ids, int) else task_ids
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
        if isinstance(task_ids, TaskGroups):
            task_ids = task_ids.ids
        n = y.shape[0]
        ids = torch.full((n,), task_ids, dtype=torch.long, device=y.device) if isinstance(task_ids, int) else task_ids
        if self.training and self.dropout_prob > 0:
            # Label dropout only for conditional tasks (unconditional tasks have no null to learn).
            drop = (torch.rand(n, device=y.device) < self.dropout_prob) & self.conditional.to(y.device)[ids]
            y = torch.where(drop, torch.full_like(y, -1), y)
        rows = self.rows[ids, y.clamp(min=0)]  # (N, D)
        null = y_embedder.embedding_table.weight[y_embedder.null_label].to(rows.dtype)  # frozen
        return torch.where((y < 0).unsqueeze(1), null.expand_as(rows), rows).to(
            y_embedder.embedding_table.weight.dtype
        )


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
    # Mixed batches are sorted by task inside DiT.forward so each task's (1 + a_t) folds into its own
    # weight copy (one grouped matmul); False keeps the per-sample epilogue (A/B benchmarks, checks).
    group_mixed_batches: bool = True

    def set_lean_backward(self, enabled: bool) -> None:
        """Train the scale with the lean backward (True, the default) or plain autograd (A/B, checks)."""
        for layer in self.layers.values():
            layer.lean_backward = enabled

    def groups_batch(self, x: torch.Tensor, tokens: int) -> bool:
        """Whether DiT.forward sorts the mixed batch `x` (N, C, H, W) by task: a method with a scale, and
        at least the token-width layers would run grouped (see AdaptedLinear._group_offsets). Otherwise
        the batch keeps its order (and each sample's bits do not depend on the other tasks' ids)."""
        if not self.group_mixed_batches or self.method not in ("affiner", "difffit"):
            return False
        fits = len(self.tasks) * self.model.hidden_size <= x.shape[0] * tokens
        return fits and grouping_supported(x.device, compute_dtype(x))

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: DiT, tasks: Sequence[TaskInfo], method: str = "affiner", rank: int = 8,
               targets: Sequence[str] = ADAPTER_TARGETS, branch_scale_init: float = 1.0,
               seed: int = 0) -> AdapterBank:
        """Wrap `model`'s target layers in place, freeze the backbone, return the bank."""
        if getattr(model, "adapter_bank", None) is not None:
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
            wrapped = AdaptedLinear(base, method, len(tasks), rank, branch_scale_init, generator)
            setattr(parent, attr, wrapped)
            bank.layers[path] = wrapped
        null_row = model.y_embedder.embedding_table.weight[model.y_embedder.null_label]
        model.task_embedder = TaskEmbedder(tasks, null_row)
        model.task_embedder.dropout_prob = model.y_embedder.dropout_prob
        model.train(model.training)  # new modules adopt the model's mode (label dropout is train-only)
        bank._zero_rank_padding()
        model.adapter_bank = bank
        for p in bank.parameters():
            p.requires_grad_(True)
        return bank

    @torch.no_grad()
    def _zero_rank_padding(self) -> None:
        # Rows of D_t and columns of U_t beyond a task's own rank are zero: exactly no contribution,
        # and zero gradients keep them zero in training.
        for layer in self.layers.values():
            if layer.down is None:
                continue
            for i, task in enumerate(self.tasks):
                layer.down[i, task.rank:] = 0
                layer.up[i, :, task.rank:] = 0

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

    @torch.no_grad()
    def load_task_state(self, t: int, state: dict[str, torch.Tensor], file: str | Path = "<state>") -> None:
        info = self.tasks[t]
        expected = set(self.task_state(t))
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
