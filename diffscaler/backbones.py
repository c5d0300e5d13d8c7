"""The model factory: one place that turns `model.arch` into a backbone, so every stage (pretrain, finetune,
evaluate, report) builds and loads the DiT and the U-Net baseline through the same code path.

    model = build_backbone(cfg.model, seed=0)      # DiT (arch dit) or ClassUNet (arch unet)
    macs = backbone_macs(cfg.model)                # multiply-adds per image, one forward
    bank = attach_bank(model, tasks, method="difffit", rank=8, targets=...)   # AdapterBank or ConvBank
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from diffscaler.adapters.bank import AdapterBank, TaskInfo
from diffscaler.adapters.conv import ConvBank
from diffscaler.config import ModelConfig
from diffscaler.models.dit import DiT, build_model, model_macs
from diffscaler.models.unet import ClassUNet
from diffscaler.unet import build_unet

Backbone = DiT | ClassUNet


def build_backbone(config: ModelConfig, seed: int | None = None) -> Backbone:
    """A fresh backbone of `config.arch` (seeded when `seed` is given)."""
    if config.arch == "unet":
        return build_unet(config, seed=seed)
    return build_model(config, seed=seed)


@functools.cache
def backbone_macs(config: ModelConfig) -> int:
    """Multiply-adds of one forward per image: the DiT's analytic count, the U-Net's counted by torch's
    FlopCounterMode on one image (convolutions and matmuls; FLOPs / 2)."""
    if config.arch != "unet":
        return model_macs(config)
    from torch.utils.flop_counter import FlopCounterMode

    model = build_unet(config, seed=0).eval()
    c, s = config.in_channels, config.input_size
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, c, s, s), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops() // 2


def attach_bank(model: nn.Module, tasks: Sequence[TaskInfo], method: str, **dit_options: Any):
    """Per-task adapters of `method` over `model`: the DiT's AdapterBank (rank, targets, ... apply) or the
    U-Net's ConvBank (bias / scale / full on its convolutions; the DiT-only options are not used)."""
    if isinstance(model, ClassUNet):
        return ConvBank.attach(model, tasks, method=method, seed=dit_options.get("seed", 0))
    return AdapterBank.attach(model, tasks, method=method, **dit_options)


def bank_of(model: nn.Module) -> AdapterBank | ConvBank | None:
    """The bank attached to `model` (its forward is the bank's), of either kind, or None."""
    owner = getattr(model.__dict__.get("forward"), "__self__", None)
    return owner if isinstance(owner, AdapterBank | ConvBank) else None
