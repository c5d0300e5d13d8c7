"""Pretraining set-up: tiny.yaml shrunk to seconds, shards of coloured squares, and the run's JSON-lines files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffscaler.config import load_config
from diffscaler.data import make_shards
from diffscaler.train.train_log import read_jsonl  # re-exported: the tests read metrics as the report does

TINY = Path(__file__).resolve().parents[2] / "ray_jobs" / "configs" / "tiny.yaml"
COLORS = [(220, 30, 30), (20, 150, 40), (30, 60, 220), (210, 170, 0)]


def tiny_cfg(tmp: Path, run_name: str, *extra: str):
    """tiny.yaml shrunk to seconds: batch 8, high lr, storage under `tmp`."""
    return load_config(
        TINY,
        [
            "pretrain.global_batch_size=8",
            "pretrain.steps=8",
            "pretrain.lr=0.002",
            "pretrain.warmup_steps=0",
            "pretrain.log_every=1",
            "pretrain.checkpoint_every=4",
            "pretrain.sample_every=4",
            "pretrain.ema_decay=0.9",
            "pretrain.max_failures=1",
            f"pretrain.storage_path={tmp / 'ray'}",
            f"pretrain.run_name={run_name}",
            "diffusion.sampling_steps=4",
            "model.name=DiT-T/4",  # the test shards are 32x32 (the demo's tiny.yaml is 16x16)
            "model.input_size=32",
            "data.image_size=32",
            *extra,
        ],
    )


def make_pretrain_shards(root: Path, colors=COLORS) -> str:
    """96 32x32 images, a coloured square per class, as shards under `root`."""
    rng = np.random.default_rng(0)
    for c, color in enumerate(colors):
        folder = root / "src" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(24):
            image = np.full((32, 32, 3), 255, np.uint8)
            x, y = rng.integers(2, 14, 2)
            image[y : y + 16, x : x + 16] = color
            Image.fromarray(image).save(folder / f"{i:03d}.png")
    out = str(root / "shards")
    make_shards(f"folder:{root / 'src'}", out, size=32, samples_per_shard=12, eval_fraction=0.0, log=lambda m: None)
    return out


def events(out: Path, kind: str) -> list[dict]:
    return [e for e in read_jsonl(out / "events.jsonl") if e["event"] == kind]
