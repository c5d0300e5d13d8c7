"""An evaluation project without Ray: real shards from synthetic PNGs, a tiny backbone and adapters, and FID
computed directly with SciPy (the reference the metric tests compare against)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from diffscaler.config import ExperimentConfig, load_config


def write_pngs(folder: Path, n: int, seed: int, size: int = 32) -> None:
    """`n` RGB PNGs: a flat colour with a square of another colour (seeded)."""
    from PIL import Image

    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = np.full((size, size, 3), rng.randint(0, 256, 3), np.uint8)
        x, y = rng.randint(0, size - size // 4, 2)
        im[y : y + size // 4, x : x + size // 4] = rng.randint(0, 256, 3)
        Image.fromarray(im).save(folder / f"{i:03d}.png")


def make_dataset(src: Path, out: Path, n: int = 40, seed: int = 0, eval_fraction: float = 0.5) -> str:
    """Shards (train + eval split) of `n` synthetic images, built by the data package."""
    from diffscaler.data.writer import make_shards

    write_pngs(src, n, seed)
    make_shards(f"folder:{src}", str(out), size=32, eval_fraction=eval_fraction, log=lambda _m: None)
    return str(out)


def tiny_config(root: Path, *extra: str) -> ExperimentConfig:
    return load_config(
        None,
        [
            "model.name=DiT-T/8",
            "model.input_size=32",
            "model.num_classes=3",
            f"data.shards_root={root / 'shards'}",
            "data.targets=[dots]",
            f"data.pretrain_source=folder:{root / 'src' / 'pre'}",
            f"eval.cache_dir={root / 'cache'}",
            "eval.num_samples=16",
            "eval.sampling_steps=3",
            "eval.batch_size=16",
            "eval.kid_subset_size=8",
            "eval.num_actors=2",
            "eval.cpus_per_actor=0.5",
            *extra,
        ],
    )


def make_backbone(cfg: ExperimentConfig, path: Path, seed: int = 0) -> str:
    """A DiT whose zero-initialised output layer is perturbed, so samples depend on the weights."""
    from diffscaler.artifacts import save_backbone
    from diffscaler.models import build_model

    model = build_model(cfg.model, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05, generator=gen)
    return save_backbone(model, path)


def make_adapter(cfg: ExperimentConfig, backbone: Path, task: str, out_dir: Path, scale: float = 0.0) -> Path:
    """An Affiner adapter for `task` on `backbone`; `scale` != 0 moves its per-channel scales off zero."""
    from diffscaler.adapters import AdapterBank, TaskInfo
    from diffscaler.artifacts import load_backbone, save_adapter

    model, meta = load_backbone(backbone)
    bank = AdapterBank.attach(model, [TaskInfo(task)], method="affiner", rank=4)
    if scale:
        with torch.no_grad():
            for p in bank.parameters():
                p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    st, _js = save_adapter(bank, task, out_dir, meta["content_hash"])
    return st


def setup_project(root: Path) -> dict[str, object]:
    """Everything an evaluation needs under `root`: shards for task `dots` and the pretraining set,
    a backbone, and an adapter for `dots` (plus one for a task that is not in the config)."""
    cfg = tiny_config(root)
    from diffscaler.data.build import dataset_dir, pretrain_dataset_dir

    make_dataset(root / "src" / "dots", Path(dataset_dir(cfg.data, "dots")), n=40, seed=0)
    make_dataset(root / "src" / "pre", Path(pretrain_dataset_dir(cfg.data)), n=24, seed=5)
    backbone = root / "bb" / "backbone.safetensors"
    make_backbone(cfg, backbone)
    adapter = make_adapter(cfg, backbone, "dots", root / "adapters", scale=0.05)
    ghost = make_adapter(cfg, backbone, "ghost", root / "other_adapters")
    return {"cfg": cfg, "backbone": str(backbone), "adapter": str(adapter), "ghost": str(ghost)}


def direct_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance with SciPy only: sqrt(S1) S2 sqrt(S1) is symmetric PSD, so eigh is robust."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1.astype(np.float64), rowvar=False), np.cov(f2.astype(np.float64), rowvar=False)
    w, v = scipy.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = scipy.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())
