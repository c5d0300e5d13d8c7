"""Tiny DiT backbones, adapter banks and their inputs, for the core's tests (model, adapters, artifacts, CLI)."""

import torch

from diffscaler.adapters import AdapterBank, TaskInfo
from diffscaler.config import ModelConfig
from diffscaler.models import DiT

TASKS = [TaskInfo("a"), TaskInfo("b", num_classes=3, conditional=True), TaskInfo("c")]


def perturb(model: DiT, scale: float = 0.02) -> DiT:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def backbone() -> DiT:
    torch.manual_seed(0)
    return perturb(DiT(ModelConfig(name="DiT-T/8", input_size=16, num_classes=5)), 0.05)


def inputs(n=6):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    ids = torch.tensor([0, 1, 2, 1, 0, 2][:n])
    y = torch.tensor([0, 2, 0, 1, 0, 0][:n])
    return x, t, y, ids


def randomize(bank: AdapterBank, scale=0.1):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    bank._zero_rank_padding()
