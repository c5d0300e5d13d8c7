"""Per-task adapters over a frozen U-Net (diffscaler.models.unet): the methods that apply to convolutions.

For every Conv2d and Linear of the U-Net (frozen W, b̂) and task t, on the output channels c:

    bitfit:   y = W * x + b̂ + b_t                    (bias only)
    difffit:  y = (1 + a_t) ⊙ (W * x + b̂) + b_t      (DiffFit-style scale + bias)
    full:     y = (W + ΔW_t) * x + b̂ + b_t           (a full fine-tune per task)

a_t, b_t, ΔW_t start at zero, so at init every task's output equals the backbone's exactly. Each task also
owns class-embedding rows (one per class, or one for an unconditional task), initialised from the backbone's
null row, as the DiT's bank does. The Affiner and LoRA are refused: their rank-r branches are defined on
the DiT's token linears (diffscaler.adapters.bank).

`bank.merge(task)` folds one task into W, b̂ (single-task sampling at the backbone's cost); `unmerge()`
restores them exactly.

diffusers' forward cannot thread task ids to each layer (the DiT's `route`), so the bank's forward puts them
on one shared `TaskRoute` for the duration of the call; the wrappers read it.

    bank = ConvBank.attach(unet, [TaskInfo("emoji"), TaskInfo("icons")], method="difffit")
    eps = unet(x, t, y, task_ids=torch.tensor([0, 1, 1, 0]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffscaler.adapters.bank import AdapterLoadError, TaskInfo, TaskNames
from diffscaler.adapters.layers import MergeableLayer
from diffscaler.models.unet import ClassUNet

CONV_METHODS = ("bitfit", "difffit", "full")
CONV_PARTS = {"bitfit": ("shift",), "difffit": ("scale", "shift"), "full": ("weight_delta", "shift")}


class TaskRoute:
    """The task ids of the forward in progress: None (the backbone), an int (one task) or (N,) ids."""

    def __init__(self) -> None:
        self.ids: int | torch.Tensor | None = None


class TaskConvLayer(MergeableLayer):
    """A frozen Conv2d or Linear plus per-task parts stacked over tasks ([T, ...]), on its output channels."""

    def __init__(self, base: nn.Conv2d | nn.Linear, method: str, num_tasks: int, route: TaskRoute):
        super().__init__()
        self.base = base
        self.method = method
        self.parts = CONV_PARTS[method]
        self.route = route
        self.is_conv = isinstance(base, nn.Conv2d)
        out = base.out_channels if self.is_conv else base.out_features
        zeros = dict(device=base.weight.device, dtype=torch.float32)  # adapter weights stay fp32
        self.shift = nn.Parameter(torch.zeros(num_tasks, out, **zeros))  # (T, out)
        if "scale" in self.parts:
            self.scale = nn.Parameter(torch.zeros(num_tasks, out, **zeros))  # (T, out)
        if "weight_delta" in self.parts:
            self.weight_delta = nn.Parameter(torch.zeros(num_tasks, *base.weight.shape, **zeros))  # (T, *W)

    def task_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, getattr(self, name)) for name in self.parts]

    def _channels(self, v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample channel values v (N, out) shaped to broadcast over y: (N, out, 1, 1) for a conv's
        (N, out, H, W), (N, 1.., out) for a linear's (N, .., out)."""
        if self.is_conv:
            return v.reshape(v.shape[0], v.shape[1], *[1] * (y.ndim - 2)).to(y.dtype)
        return v.reshape(v.shape[0], *[1] * (y.ndim - 2), v.shape[1]).to(y.dtype)

    def _base(self, x: torch.Tensor, task: int | None) -> torch.Tensor:
        if task is None or "weight_delta" not in self.parts:
            return self.base(x)
        weight = self.base.weight + self.weight_delta[task].to(self.base.weight.dtype)
        if self.is_conv:
            return self.base._conv_forward(x, weight, self.base.bias)
        return F.linear(x, weight, self.base.bias)

    def _fold(self, w: torch.Tensor, b: torch.Tensor, t: int) -> None:
        """W' = (1 + a_t) ⊙ (W + ΔW_t), b' = (1 + a_t) ⊙ b̂ + b_t, on the output channels (dim 0 of W)."""
        gain = 1 + self.scale[t] if "scale" in self.parts else torch.ones_like(self.shift[t])  # (out,)
        if "weight_delta" in self.parts:
            w.add_(self.weight_delta[t].to(w.dtype))
        w.mul_(gain.reshape(-1, *[1] * (w.ndim - 1)).to(w.dtype))
        b.mul_(gain.to(b.dtype)).add_(self.shift[t].to(b.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = self.route.ids
        if ids is None or self.merged_task is not None:  # (a merged batch's ids are checked once, by the bank)
            return self.base(x)
        if isinstance(ids, int):
            y = self._base(x, ids)  # conv (N, out, H, W) or linear (N, .., out)
            ids = torch.full((x.shape[0],), ids, dtype=torch.long, device=x.device)
        elif "weight_delta" in self.parts:  # a mixed batch: each task's rows through its own weight
            y = None
            for t in torch.unique(ids).tolist():
                rows = (ids == t).nonzero().squeeze(1)
                out = self._base(x[rows], t)
                y = x.new_empty((x.shape[0], *out.shape[1:])) if y is None else y
                y = y.index_copy(0, rows, out)
        else:
            y = self.base(x)
        if "scale" in self.parts:
            y = y + y * self._channels(self.scale[ids], y)
        return y + self._channels(self.shift[ids], y)


class TaskClassEmbedding(nn.Module):
    """The U-Net's class table with per-task rows [T, K_max, D] (from the null row): label -1 = the null row."""

    def __init__(self, base: nn.Embedding, tasks: Sequence[TaskInfo], null_label: int, route: TaskRoute):
        super().__init__()
        self.base = base
        self.null_label = null_label
        self.route = route
        k_max = max(t.num_classes for t in tasks)
        null_row = base.weight.detach()[null_label].float()
        self.rows = nn.Parameter(null_row.reshape(1, 1, -1).repeat(len(tasks), k_max, 1))  # (T, K_max, D)
        self.register_buffer("num_classes", torch.tensor([t.num_classes for t in tasks]), persistent=False)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        ids = self.route.ids
        if ids is None:
            return self.base(labels)
        if isinstance(ids, int):
            ids = torch.full_like(labels, ids)
        rows = self.rows[ids, labels.clamp(min=0)]  # (N, D)
        null = self.base.weight[self.null_label].to(rows.dtype).expand_as(rows)
        return torch.where((labels < 0).unsqueeze(1), null, rows).to(self.base.weight.dtype)


@dataclass
class ConvBank(TaskNames):
    """Handle on the adapters attached to one ClassUNet (the modules themselves live in the model)."""

    model: ClassUNet
    method: str
    tasks: list[TaskInfo]
    route: TaskRoute
    layers: dict[str, TaskConvLayer] = field(default_factory=dict)
    label_dropout: float = 0.0
    targets: tuple[str, ...] = ()  # every Conv2d and Linear: no target set to choose (the adapter JSON's field)

    @classmethod
    def attach(cls, model: nn.Module, tasks: Sequence[TaskInfo], method: str = "difffit", seed: int = 0) -> ConvBank:
        """Wrap every Conv2d and Linear of `model` in place, freeze the backbone, return the bank."""
        if not isinstance(model, ClassUNet):
            raise ValueError(
                f"ConvBank adapts a U-Net (model.arch unet); got {type(model).__name__}: a DiT takes "
                "diffscaler.adapters.AdapterBank"
            )
        if method not in CONV_METHODS:
            raise ValueError(
                f"adapter method {method!r} does not apply to a U-Net: its rank-r branch is defined on "
                f"the DiT's token linears; a U-Net takes {list(CONV_METHODS)}"
            )
        if isinstance(getattr(model.unet, "class_embedding", None), TaskClassEmbedding):
            raise ValueError("this model already has adapters attached")
        if not tasks:
            raise ValueError("a bank needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names repeat: {names}")
        del seed  # every part starts at zero: nothing random to draw (kept for AdapterBank's call shape)
        model.requires_grad_(False)
        route = TaskRoute()
        bank = cls(model, method, list(tasks), route, label_dropout=model.dropout_prob)
        slots = [
            (parent, attr, f"{path}.{attr}" if path else attr)
            for path, parent in model.named_modules()
            for attr, child in parent.named_children()
            if isinstance(child, nn.Conv2d | nn.Linear)
        ]
        for parent, attr, path in slots:
            wrapped = TaskConvLayer(getattr(parent, attr), method, len(tasks), route)
            setattr(parent, attr, wrapped)
            bank.layers[path] = wrapped
        model.unet.class_embedding = TaskClassEmbedding(model.unet.class_embedding, tasks, model.null_label, route)
        model.forward = bank.forward  # the model's forward now routes task ids
        for p in bank.parameters():
            p.requires_grad_(True)
        return bank

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, task_ids: int | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Without `task_ids` the backbone; with them each sample's task (y indexes its classes, -1 = null)."""
        model = self.model
        merged = next(iter(self.layers.values())).merged_task  # every layer holds the same merged task, or none
        if merged is not None and (task_ids is None or bool((torch.as_tensor(task_ids) != merged).any())):
            # The task lives in W, b̂ now: any other task (or the bare backbone) would silently get its weights.
            raise RuntimeError(f"task {merged} is merged into the weights; unmerge() to run others")
        if task_ids is None:
            return ClassUNet.forward(model, x, t, y)
        if isinstance(task_ids, torch.Tensor) and task_ids.shape != (x.shape[0],):
            raise ValueError(f"task_ids of shape {tuple(task_ids.shape)}; the batch needs ({x.shape[0]},)")
        ids = task_ids if isinstance(task_ids, int) else task_ids.to(x.device)
        counts = self.model.unet.class_embedding.num_classes.to(y.device)
        per_sample = torch.full_like(y, ids) if isinstance(ids, int) else ids
        if bool(((y >= counts[per_sample]) | (y < -1)).any()):
            raise ValueError("a label is outside its task's classes (-1 = the null row)")
        if model.training and self.label_dropout > 0:
            y = torch.where(torch.rand(y.shape, device=y.device) < self.label_dropout, -1, y)
        self.route.ids = ids
        try:
            # labels go to TaskClassEmbedding as they are (-1 included); it resolves them per task
            return model.unet(x, t, class_labels=y).sample
        finally:
            self.route.ids = None

    def parameters(self) -> list[nn.Parameter]:
        params = [p for layer in self.layers.values() for _, p in layer.task_parameters()]
        return [*params, self.model.unet.class_embedding.rows]

    def task_state(self, task: str | int) -> dict[str, torch.Tensor]:
        """One task's tensors (its slice of every stacked part, its class rows), fp32 on the CPU."""
        t = task if isinstance(task, int) else self.task_index(task)
        state = {
            f"{path}.{name}": p.detach()[t].float().contiguous().cpu()
            for path, layer in self.layers.items()
            for name, p in layer.task_parameters()
        }
        rows = self.model.unet.class_embedding.rows.detach()[t, : self.tasks[t].num_classes]
        state["class_embedding.rows"] = rows.float().contiguous().cpu()
        return state

    @torch.no_grad()
    def load_task_state(self, t: int, state: dict[str, torch.Tensor], file: object = "<state>") -> None:
        """Put one task's tensors (as `task_state` wrote them) into slot `t`; a foreign file is refused."""
        expected = {f"{path}.{name}" for path, layer in self.layers.items() for name, _ in layer.task_parameters()}
        expected.add("class_embedding.rows")
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise AdapterLoadError(
                f"{file}: tensors do not match this U-Net bank ({self.method}): missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        for path, layer in self.layers.items():
            for name, p in layer.task_parameters():
                v = state[f"{path}.{name}"]
                if tuple(v.shape) != tuple(p[t].shape):
                    raise AdapterLoadError(
                        f"{file}: {path}.{name} has shape {tuple(v.shape)}, needs {tuple(p[t].shape)}"
                    )
                p[t].copy_(v)
        rows = self.model.unet.class_embedding.rows
        v = state["class_embedding.rows"]
        if tuple(v.shape) != (self.tasks[t].num_classes, rows.shape[-1]):
            raise AdapterLoadError(f"{file}: class_embedding.rows has shape {tuple(v.shape)}")
        rows[t, : v.shape[0]].copy_(v)

    def trainable_parameters_per_task(self, task: str | int = 0) -> int:
        """Parameters one task owns (its own rows), as a separate fine-tune trains them."""
        task = task if isinstance(task, int) else self.task_index(task)
        per_layer = sum(p[task].numel() for layer in self.layers.values() for _, p in layer.task_parameters())
        return per_layer + self.tasks[task].num_classes * self.model.unet.class_embedding.rows.shape[-1]

    def backbone_parameters(self) -> int:
        adapter_ids = {id(p) for p in self.parameters()}
        return sum(p.numel() for p in self.model.parameters() if id(p) not in adapter_ids)
