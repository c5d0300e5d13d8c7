"""DeepSpeed from our config: the JSON config, the optimizer, the warm-up schedule, CPU workarounds.

    ds_config = deepspeed_config(cfg.pretrain, world_size=2, use_gpu=False)
    optimizer = build_optimizer(model, cfg.pretrain)          # torch AdamW (see below for why)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                      lr_scheduler=warmup_scheduler(cfg.pretrain.warmup_steps))

Only functions that build plain dicts and torch objects live here; `deepspeed` itself is imported
by the caller (inside a Ray Train worker, after `DS_ACCELERATOR` is set).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

from diffscaler.config import PretrainConfig

# Largest printed-step interval DeepSpeed accepts; our own logger reports progress.
_SILENT_STEPS = 2**31 - 1


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """`auto` is bf16 on GPU and fp32 on CPU (DeepSpeed's fp16 does not run on CPU; bf16 does)."""
    if precision == "auto":
        return "bf16" if use_gpu else "fp32"
    return precision


def micro_batch_size(p: PretrainConfig) -> int:
    """Images per rank per forward pass (config validation guarantees the division is exact)."""
    return p.global_batch_size // (p.num_workers * p.grad_accum_steps)


def deepspeed_config(p: PretrainConfig, *, world_size: int, use_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed JSON config generated from `pretrain.*` (the optimizer is passed as an object)."""
    if world_size != p.num_workers:
        raise ValueError(f"world size {world_size} differs from pretrain.num_workers={p.num_workers}")
    precision = resolve_precision(p.precision, use_gpu)
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage >= 2:
        # Overlapping the gradient reduce with backward needs a side stream: GPU only.
        zero.update(contiguous_gradients=True, overlap_comm=use_gpu, reduce_scatter=True)
    if p.zero_stage == 3:
        # Small tensors (biases, norms) stay whole on every rank: partitioning them costs more
        # collectives than it saves memory.
        zero.update(stage3_param_persistence_threshold=int(1e5), stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_batch_size": p.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(p),
        "gradient_accumulation_steps": p.grad_accum_steps,
        "gradient_clipping": p.grad_clip,  # 0 = off
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # Our optimizer is a torch.optim.AdamW object; DeepSpeed calls it "untested" under ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _SILENT_STEPS,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, p: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; weight decay on matrices only (not biases, norms).

    A torch optimizer and not DeepSpeed's `"optimizer"` section: DeepSpeed's own Adam JIT-compiles a
    fused C++/CUDA op at start (~1 min on CPU) and on CPU gains nothing.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=p.lr, betas=(0.9, 0.999), eps=1e-8)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear ramp, then constant."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


class WarmupLambda:
    """Picklable lr lambda (a LambdaLR state dict then records the warm-up length with it)."""

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return warmup_factor(step, self.warmup_steps)


def warmup_scheduler(warmup_steps: int) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """For `deepspeed.initialize(lr_scheduler=...)`: DeepSpeed calls it with the optimizer it wraps and
    steps the schedule once per optimizer step (not per micro-batch)."""

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLambda(warmup_steps))

    return make


def skip_cpu_shm_allreduce_build() -> None:
    """On CPU, stop DeepSpeed JIT-compiling its shared-memory all-reduce op at `initialize`.

    That op (~50 s of C++ compile per fresh machine, 1.5 GB RSS) only speeds up DeepSpeed's
    inference all-reduce; training collectives go through torch.distributed (gloo) either way.
    Call inside the worker before `deepspeed.initialize`. importlib because
    `import deepspeed.comm.torch as m` would bind the top-level `torch` package instead.
    """
    if os.environ.get("DS_ACCELERATOR", "") != "cpu":
        return
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None
