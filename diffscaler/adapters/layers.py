"""The adapted linear layers: a frozen base linear kept inside its wrapper, plus per-task parameters
stacked over tasks ([T, ...]), one small class per method family:

    ScaleShiftLinear   affiner, difffit, bitfit   y = (1 + a_t) ⊙ (W x) + b̂ + b_t [+ s_t · U_t relu(D_t x)]
    LowRankLinear      lora                       y = W x + b̂ + U_t · D_t · x
    DeltaLinear        full                       y = (W + ΔW_t) x + b̂ + Δb_t

`forward(x, task_ids)` takes the route the backbone threads to every `TaskLinear`: None runs the
backbone, an int one task (plain matmuls), (N,) ids or `TaskGroups` a mixed batch. Every task part
that adds to the output starts at zero (a_t, b_t, U_t, ΔW_t), so at init every task is the backbone.
`merge(t)` folds one task into W, b̂ (exactly restored by `unmerge()`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

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
from diffscaler.adapters.routing import TaskGroups, TaskIds

# Which per-task tensors each method owns (its "structure"; trainable params are chosen by it), in the
# order they are registered, saved and handed to the optimizer.
METHOD_PARTS = {
    "affiner": ("scale", "shift", "down", "up", "branch_scale"),
    "difffit": ("scale", "shift"),
    "lora": ("down", "up"),
    "bitfit": ("shift",),
    "full": ("weight_delta", "bias_delta"),
    "controlnet": (),  # no wrapped layer: the task's block copies live in its condition path
}


def _scale_shift(y: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(1 + a) ⊙ y + b̂ + b, in y's dtype; a, b: (out,) or per sample (N, 1.., out).

    Written y + y·a rather than y·(1 + a): in bf16, 1 + a keeps 8 bits, so a = 0.05 would act as
    0.047; a alone keeps its relative precision. Casting the per-channel terms to y's dtype keeps a
    bf16 activation bf16 (fp32 parameters would otherwise promote it) and lets autograd save y in bf16.
    """
    out = y if scale is None else y + y * scale.to(y.dtype)
    return out + (bias + shift.to(bias.dtype)).to(y.dtype)


def _zeros(*shape: int, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, device=device, dtype=torch.float32))  # adapter weights stay fp32


class MergeableLayer(nn.Module):
    """A frozen `base` layer (weight, bias) into which one task can be folded: `merge(t)` calls `_fold`, and
    `unmerge()` restores the saved weight and bias exactly. Shared by the DiT's AdaptedLinear and the
    U-Net's TaskConvLayer (diffscaler.adapters.conv)."""

    base: nn.Module
    merged_task: int | None = None
    _unmerged: tuple[torch.Tensor, torch.Tensor] | None = None

    def _fold(self, w: torch.Tensor, b: torch.Tensor, t: int) -> None:
        """Fold task t into the base weight and bias in place."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, t: int) -> None:
        if self.merged_task is not None:
            raise RuntimeError(f"task {self.merged_task} is already merged; unmerge() first")
        w, b = self.base.weight, self.base.bias
        if b is None:  # a bias-free layer has nowhere to put b_t
            raise RuntimeError("a layer without a bias cannot take a merged task")
        self._unmerged = (w.detach().clone(), b.detach().clone())  # exact restore, no division
        self._fold(w, b, t)
        self.merged_task = t

    @torch.no_grad()
    def unmerge(self) -> None:
        if self._unmerged is not None:
            self.base.weight.copy_(self._unmerged[0])
            self.base.bias.copy_(self._unmerged[1])
        self._unmerged, self.merged_task = None, None


class AdaptedLinear(MergeableLayer):
    """A frozen base linear plus stacked per-task parameters; forward(x, task_ids) like TaskLinear.

    A family implements `_forward_single`, `_forward_mixed`, `_forward_merged` and `_fold`."""

    def __init__(self, base: nn.Linear, method: str):
        super().__init__()
        self.base = base
        self.method = method
        self.parts = METHOD_PARTS[method]

    @property
    def weight(self) -> torch.Tensor:  # the frozen base weight, for code that reads dtype/device
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor:
        return self.base.bias

    def task_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name in self.parts:
            yield name, getattr(self, name)

    def forward(self, x: torch.Tensor, task_ids: TaskIds = None) -> torch.Tensor:
        if task_ids is None:
            if self.merged_task is not None:
                raise RuntimeError("a task is merged into this layer's weights; unmerge() to run the backbone")
            return F.linear(x, self.base.weight, self.base.bias)
        if self.merged_task is not None:
            # The task lives in W, b̂ now. Any other task in the batch would silently get the merged
            # one's weights: refuse it.
            if isinstance(task_ids, int):
                if task_ids != self.merged_task:
                    raise RuntimeError(f"task {self.merged_task} is merged; task {task_ids} needs unmerge() first")
            elif bool(((task_ids.ids if isinstance(task_ids, TaskGroups) else task_ids) != self.merged_task).any()):
                raise RuntimeError(f"task {self.merged_task} is merged; a batch with other tasks needs unmerge()")
            return self._forward_merged(x, self.merged_task)
        if isinstance(task_ids, int):
            return self._forward_single(x, task_ids)
        return self._forward_mixed(x, task_ids)

    def _forward_single(self, x: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError

    def _forward_mixed(self, x: torch.Tensor, task_ids: torch.Tensor | TaskGroups) -> torch.Tensor:
        raise NotImplementedError

    def _forward_merged(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return F.linear(x, self.base.weight, self.base.bias)


class _RankBranch:
    """The rank-r side path U_t · act(D_t x) (times s_t where a branch scale exists), shared by the
    Affiner's relu branch and LoRA. D_t starts random (LoRA's A init), U_t at zero."""

    down: nn.Parameter
    up: nn.Parameter
    branch_scale: nn.Parameter | None
    relu_branch: bool

    def _init_branch(self, base: nn.Linear, num_tasks: int, rank: int, generator: torch.Generator) -> None:
        out_f, in_f = base.weight.shape
        down = torch.empty(num_tasks, rank, in_f, dtype=torch.float32)
        bound = 1.0 / math.sqrt(in_f)  # LoRA's A init (kaiming-uniform, a=sqrt(5))
        down.uniform_(-bound, bound, generator=generator)
        self.down = nn.Parameter(down.to(base.weight.device))  # D_t, random
        self.up = _zeros(num_tasks, out_f, rank, device=base.weight.device)  # U_t, zero

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


class ScaleShiftLinear(_RankBranch, AdaptedLinear):
    """affiner: (1 + a_t) ⊙ (W x) + b̂ + b_t + s_t · U_t relu(D_t x); difffit: without the branch;
    bitfit: the shift b_t alone.

    Training a scale over the frozen base uses `lean_affine_linear` (a_t's gradient from the output,
    W x never saved); a mixed batch sorted by task runs one grouped matmul over the folded weights."""

    # False: plain autograd for the scale, for A/B benchmarks and checks (AdapterBank.set_lean_backward).
    lean_backward: bool = True

    def __init__(
        self,
        base: nn.Linear,
        method: str,
        num_tasks: int,
        rank: int = 0,
        branch_scale_init: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__(base, method)
        out_f, dev = base.weight.shape[0], base.weight.device
        self.scale = _zeros(num_tasks, out_f, device=dev) if "scale" in self.parts else None
        self.shift = _zeros(num_tasks, out_f, device=dev)
        self.down = self.up = self.branch_scale = None
        self.relu_branch = "down" in self.parts
        if self.relu_branch:
            self._init_branch(base, num_tasks, rank, generator or torch.Generator())
            self.branch_scale = nn.Parameter(torch.full((num_tasks,), float(branch_scale_init), device=dev))

    def _lean(self) -> bool:
        """Train the scale with lean_affine_linear (frozen base, scale trained, grad mode on)."""
        base = self.base
        return (
            self.lean_backward
            and self.scale is not None
            and self.scale.requires_grad
            and torch.is_grad_enabled()
            and base.bias is not None
            and not base.weight.requires_grad
            and not base.bias.requires_grad
        )

    def _branch_args(self, t: int | torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.down[t], self.up[t], self.branch_scale[t]) if self.relu_branch else ()

    def _forward_single(self, x: torch.Tensor, t: int) -> torch.Tensor:
        w, b = self.base.weight, self.base.bias
        if self._lean():
            return lean_affine_linear(x, w, b, self.scale[t], self.shift[t], *self._branch_args(t))
        if self.scale is not None and self.scale.requires_grad and torch.is_grad_enabled():
            # Training: (1 + a_t) as an epilogue on W x. Folded into W, autograd would compute the full
            # weight gradient (a matmul as large as the forward) only to reduce it to a_t's gradient.
            y = _scale_shift(F.linear(x, w), self.scale[t], b, self.shift[t])
            return self._add_branch_single(y, x, t) if self.relu_branch else y
        if self.scale is not None:  # (1 + a_t) ⊙ (W x) == ((1 + a_t) ⊙_rows W) x: one matmul
            w = folded_weight(w, self.scale[t], w.dtype)
        y = F.linear(x, w, b + self.shift[t].to(b.dtype))
        return self._add_branch_single(y, x, t) if self.relu_branch else y

    def _group_offsets(self, x: torch.Tensor, groups: TaskGroups | None) -> torch.Tensor | None:
        """Row offsets for one grouped matmul over the tasks' folded weights, or None where the
        per-sample path is cheaper or unsupported: T folded weight copies must cost less than the two
        passes over the (N, L, out) output they save (T * in <= N * L), so the adaLN layers (one row
        per sample) stay per sample."""
        if groups is None or self.scale is None or x.dim() != 3:
            return None
        num_tasks, (n, length, in_f) = self.scale.shape[0], x.shape
        if num_tasks * in_f > n * length or not grouping_supported(x.device, compute_dtype(x)):
            return None
        return groups.offsets(length)

    def _present_offsets(self, x: torch.Tensor, groups: TaskGroups) -> torch.Tensor | None:
        """`_group_offsets` counting only the P tasks present (P folded copies: P * in <= N * L)."""
        if self.scale is None or x.dim() != 3 or groups.present is None:
            return None
        n, length, in_f = x.shape
        if len(groups.present) * in_f > n * length or not grouping_supported(x.device, compute_dtype(x)):
            return None
        return groups.present_offsets(length)

    def _add_shift_and_branch_(self, y: torch.Tensor, x3: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """y (N, L, out) += b̂ + b_t [+ s_t U_t relu(D_t x)] in place, per sample, in y's dtype."""
        dtype = y.dtype
        c = (self.base.bias.to(self.shift.dtype) + self.shift[ids]).to(dtype)  # (N, out)
        relu_h = up_scaled = None
        if self.relu_branch:
            relu_h = F.relu(torch.bmm(x3, self.down[ids].to(dtype).transpose(1, 2)))  # (N, L, r)
            up_scaled = self._up_scaled(ids).to(dtype)  # (N, out, r)
        return add_shift_and_branch_(y, c, relu_h, up_scaled)

    def _forward_grouped(
        self, x: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, task_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sampling a batch sorted by task: (1 + a_t) folded into each task's weight copy, one grouped
        matmul, then b̂ + b_t and the branch added by one more (rank r + 1) matmul into the output.
        `task_scale` (P, out): the scales of the tasks `offsets` delimit (default: every task's)."""
        w = self.base.weight
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x3 = x.to(dtype)  # (N, L, in)
            scales = self.scale if task_scale is None else task_scale
            y = grouped_scaled_linear(x3, w, scales, offsets, dtype)  # (N, L, out)
            return self._add_shift_and_branch_(y, x3, ids)

    def _forward_mixed(self, x: torch.Tensor, task_ids: torch.Tensor | TaskGroups) -> torch.Tensor:
        groups = task_ids if isinstance(task_ids, TaskGroups) else None
        ids = groups.ids if groups is not None else task_ids
        w, b = self.base.weight, self.base.bias
        if groups is not None and groups.present is not None and not torch.is_grad_enabled() and not self._lean():
            present = self._present_offsets(x, groups)  # sampling: fold only the tasks in the batch
            if present is not None:
                return self._forward_grouped(x, ids, present, self.scale[groups.present])
        offsets = self._group_offsets(x, groups)
        if self._lean():
            return lean_affine_linear(
                x,
                w,
                b,
                self.scale[ids],
                self.shift[ids],
                *self._branch_args(ids),
                task_scale=self.scale if offsets is not None else None,
                offsets=offsets,
            )
        if offsets is not None and not torch.is_grad_enabled():
            return self._forward_grouped(x, ids, offsets)
        if x.dim() == 3 and not torch.is_grad_enabled():
            return self._forward_per_sample_inplace(x, ids)
        per_sample = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,)  # broadcast (N, out) over tokens
        y = F.linear(x, w)  # (N, *, out): one shared matmul for every task in the batch
        scale = self.scale[ids].view(per_sample) if self.scale is not None else None
        y = _scale_shift(y, scale, b, self.shift[ids].view(per_sample))
        return self._add_branch_mixed(y, x, ids) if self.relu_branch else y

    def _forward_per_sample_inplace(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sampling a mixed batch where grouping does not pay (few tokens per sample): one shared matmul, then
        y += y ⊙ a_t in place and b̂ + b_t riding in the branch's matmul (`add_shift_and_branch_`): two passes
        over the (N, L, out) output where the autograd path takes four and three temporaries."""
        w = self.base.weight
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x3 = x.to(dtype)  # (N, L, in)
            y = F.linear(x3, w.to(dtype))  # (N, L, out)
            if self.scale is not None:
                y.addcmul_(y, self.scale[ids].to(dtype).unsqueeze(1))  # y + y·a: a keeps its precision in bf16
            return self._add_shift_and_branch_(y, x3, ids)

    def _forward_merged(self, x: torch.Tensor, t: int) -> torch.Tensor:
        # a_t, b_t live in W, b̂ now; only the rank-r side path remains
        y = F.linear(x, self.base.weight, self.base.bias)
        return self._add_branch_single(y, x, t) if self.relu_branch else y

    def _fold(self, w: torch.Tensor, b: torch.Tensor, t: int) -> None:
        if self.scale is not None:
            w.mul_((1 + self.scale[t]).to(w.dtype).unsqueeze(1))
        b.add_(self.shift[t].to(b.dtype))


class LowRankLinear(_RankBranch, AdaptedLinear):
    """lora: W x + b̂ + U_t · D_t · x (rank r, no scale or shift). Merging leaves W as it is: the
    rank-r product stays a side path, accumulated into the output by its matmul."""

    def __init__(
        self,
        base: nn.Linear,
        method: str,
        num_tasks: int,
        rank: int = 0,
        branch_scale_init: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__(base, method)
        self.branch_scale = None
        self.relu_branch = False
        self._init_branch(base, num_tasks, rank, generator or torch.Generator())

    def _forward_single(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return self._add_branch_single(F.linear(x, self.base.weight, self.base.bias), x, t)

    def _forward_mixed(self, x: torch.Tensor, task_ids: torch.Tensor | TaskGroups) -> torch.Tensor:
        ids = task_ids.ids if isinstance(task_ids, TaskGroups) else task_ids
        return self._add_branch_mixed(F.linear(x, self.base.weight, self.base.bias), x, ids)

    _forward_merged = _forward_single

    def _fold(self, w: torch.Tensor, b: torch.Tensor, t: int) -> None:
        pass


class DeltaLinear(AdaptedLinear):
    """full: (W + ΔW_t) x + b̂ + Δb_t on every linear layer, a full fine-tune per task."""

    def __init__(
        self,
        base: nn.Linear,
        method: str,
        num_tasks: int,
        rank: int = 0,
        branch_scale_init: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__(base, method)
        out_f, in_f = base.weight.shape
        self.weight_delta = _zeros(num_tasks, out_f, in_f, device=base.weight.device)
        self.bias_delta = _zeros(num_tasks, out_f, device=base.weight.device)

    def _forward_single(self, x: torch.Tensor, t: int) -> torch.Tensor:
        w, b = self.base.weight, self.base.bias
        return F.linear(x, w + self.weight_delta[t].to(w.dtype), b + self.bias_delta[t].to(b.dtype))

    def _forward_mixed(self, x: torch.Tensor, task_ids: torch.Tensor | TaskGroups) -> torch.Tensor:
        ids = task_ids.ids if isinstance(task_ids, TaskGroups) else task_ids
        w, b = self.base.weight, self.base.bias
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1])
        w_t = w.unsqueeze(0) + self.weight_delta[ids].to(w.dtype)  # (N, out, in)
        y = torch.bmm(x3, w_t.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        per_sample = (n,) + (1,) * (x.dim() - 2) + (-1,)  # broadcast (N, out) over tokens
        return y + (b + self.bias_delta[ids].to(b.dtype)).view(per_sample)

    def _fold(self, w: torch.Tensor, b: torch.Tensor, t: int) -> None:
        w.add_(self.weight_delta[t].to(w.dtype))
        b.add_(self.bias_delta[t].to(b.dtype))


LAYER_FAMILIES: dict[str, type[AdaptedLinear]] = {
    "affiner": ScaleShiftLinear,
    "difffit": ScaleShiftLinear,
    "bitfit": ScaleShiftLinear,
    "lora": LowRankLinear,
    "full": DeltaLinear,
}


def adapted_linear(
    base: nn.Linear, method: str, num_tasks: int, rank: int, branch_scale_init: float, generator: torch.Generator
) -> AdaptedLinear:
    """The wrapper of `method`'s family around `base`."""
    return LAYER_FAMILIES[method](base, method, num_tasks, rank, branch_scale_init, generator)
