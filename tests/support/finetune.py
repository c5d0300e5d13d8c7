"""Two small fine-tune tasks and a backbone, as the fine-tune, sweep, comparison and spot-node tests set them up.

A tiny DiT-T/4 (16 px) whose zero-initialised tensors are perturbed, and shard sets built by the data
package from synthetic PNG folders (a flat colour and a class-dependent square).
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffscaler.artifacts import save_backbone
from diffscaler.config import load_config
from diffscaler.data import make_shards
from diffscaler.models import build_model

IMAGE_SIZE = 16
TWO_TASKS = "[{name: ta, conditional: true}, {name: tb}]"


def make_image_folder(root: Path, seed: int, per_class: int = 12, classes: tuple[str, ...] = ("dark", "light")) -> Path:
    """PNG folder with one sub-folder per class: flat colour + a class-dependent square."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            img[:] = rng.integers(0, 256, 3, dtype=np.uint8)
            lo = int(rng.integers(0, 8))
            img[lo : lo + 8, lo : lo + 8] = 40 if c == 0 else 215
            Image.fromarray(img).save(d / f"{i:03d}.png")
    return root


def make_task_shards(shards_root: Path, name: str, seed: int, per_class: int = 12) -> Path:
    src = make_image_folder(shards_root.parent / "images" / name, seed, per_class)
    out = shards_root / name
    make_shards(
        f"folder:{src}",
        str(out),
        size=IMAGE_SIZE,
        samples_per_shard=8,
        eval_fraction=0.25,
        seed=0,
        log=lambda msg: None,
    )
    return out


def make_backbone(path: Path) -> str:
    """A DiT-T/4 whose zero-initialised tensors are perturbed: a fresh DiT outputs exactly zero and would
    give the adapters zero gradients."""
    cfg = load_config(None, ["model.name=DiT-T/4", f"model.input_size={IMAGE_SIZE}", "model.num_classes=3"])
    model = build_model(cfg.model, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() and bool((p == 0).all()):
                p.normal_(0.0, 0.02)
    return save_backbone(model, path)


def tiny_config(shards_root: Path, targets: str, *overrides: str):
    base = [
        "model.name=DiT-T/4",
        f"model.input_size={IMAGE_SIZE}",
        "model.num_classes=3",
        f"data.image_size={IMAGE_SIZE}",
        f"data.shards_root={shards_root}",
        f"data.targets={targets}",
        "finetune.steps=4",
        "finetune.batch_size=6",
        "finetune.log_every=2",
        "finetune.warmup_steps=2",
        "finetune.lr=0.01",
    ]
    return load_config(None, base + list(overrides))


def make_work(root: Path) -> types.SimpleNamespace:
    """Two tasks' shards and a backbone under `root` (the fine-tune and sweep tests' set-up)."""
    shards = root / "shards"
    make_task_shards(shards, "ta", seed=1)
    make_task_shards(shards, "tb", seed=2)
    backbone = root / "backbone" / "backbone.safetensors"
    return types.SimpleNamespace(root=root, shards=shards, backbone=backbone, hash=make_backbone(backbone))
