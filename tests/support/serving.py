"""A tiny pixel backbone (DiT-T/4 at 8 px) and a folder of distinct adapters, for the serving and generation tests."""

from __future__ import annotations

from pathlib import Path

import torch

from diffscaler.adapters import AdapterBank, TaskInfo
from diffscaler.artifacts import save_adapter, save_backbone
from diffscaler.config import ModelConfig
from diffscaler.models import build_model

# b is class-conditional with 3 classes; d has a smaller rank than the others
TASKS = [TaskInfo("a"), TaskInfo("b", num_classes=3, conditional=True), TaskInfo("c"), TaskInfo("d", rank=1)]


def make_backbone(path: Path, seed: int = 0) -> str:
    model = build_model(ModelConfig(name="DiT-T/4", input_size=8, num_classes=4), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a fresh DiT's output layer is zero: perturb it so images depend on the weights
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return save_backbone(model, path)


def make_adapters(backbone: Path, folder: Path, tasks=TASKS, seed: int = 0) -> list[Path]:
    """Adapters of `tasks` trained on nothing but made distinct: random parameters (the bank starts at zero)."""
    from diffscaler.artifacts import load_backbone

    model, meta = load_backbone(backbone)
    bank = AdapterBank.attach(model, list(tasks), rank=2)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    bank._zero_rank_padding()
    return [save_adapter(bank, t.name, folder, backbone_hash=meta["content_hash"])[0] for t in tasks]


def setup_models(root: Path) -> tuple[Path, Path]:
    """(backbone file, adapters folder) under `root`."""
    backbone = root / "backbone.safetensors"
    make_backbone(backbone)
    make_adapters(backbone, root / "adapters")
    return backbone, root / "adapters"


def live_actor_pids(class_fragment: str) -> list[int]:
    """Pids of the live actors whose class name contains `class_fragment`, from Ray's actor table in the GCS
    (the state API's source; `ray.util.state` would need the dashboard, which the test clusters leave off)."""
    from ray._private.state import actors

    return [
        int(a["Pid"])
        for a in actors().values()
        if a.get("State") == "ALIVE" and class_fragment in a.get("ActorClassName", "") and a.get("Pid")
    ]


def condition_task(name: str, kind: str, size: int = 8) -> TaskInfo:
    """A task taking `kind` maps (canny or mask, the data config's default extractor parameters) at `size` px."""
    from diffscaler.config import DataConfig
    from diffscaler.data.conditions import ConditionSpec

    spec = ConditionSpec.from_config(kind, DataConfig())
    record = {**spec.record(), "channels": 1, "size": size}
    return TaskInfo(name, condition=kind, condition_channels=1, condition_size=size, condition_extractor=record)


# edges and masked take condition maps (8 px, 1 channel); plain takes none; masked is class-conditional
def condition_tasks() -> list[TaskInfo]:
    """edges and masked take condition maps (8 px, 1 channel); plain takes none; masked has 2 classes."""
    from dataclasses import replace

    masked = replace(condition_task("masked", "mask"), num_classes=2, conditional=True)
    return [condition_task("edges", "canny"), TaskInfo("plain"), masked]
