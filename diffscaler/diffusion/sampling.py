"""Sampling helpers on top of GaussianDiffusion: batches, guidance, tasks, uint8 images.

Image i depends only on (seed, i, task, class): noise comes from per-sample generators
(`SampleNoise`), so batch size, task mix and worker count do not change what is generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffscaler.diffusion.gaussian import GaussianDiffusion, SampleNoise
from diffscaler.models.dit import DiT


@torch.no_grad()
def generate(model: DiT, diffusion: GaussianDiffusion, *, labels: torch.Tensor, indices: Sequence[int],
             seed: int, task_ids: torch.Tensor | int | None = None, steps: int = 50, sampler: str = "ddim",
             cfg_scale: float = 1.0, eta: float = 0.0, clip_denoised: bool = True,
             autocast_dtype: torch.dtype | None = None, clamp: bool = True,
             sample_seeds: Sequence[int] | None = None) -> torch.Tensor:
    """One batch: float images (N, C, H, W) in [-1, 1] for sample `indices` with `labels` (latents,
    unclamped, with `clamp=False`). `sample_seeds` (one per sample) replace the (seed, index) noise seeds."""
    device = next(model.parameters()).device
    labels = labels.to(device)
    if isinstance(task_ids, torch.Tensor):
        task_ids = task_ids.to(device)
    cfg = model.config
    noise = SampleNoise(seed, indices, (cfg.in_channels, cfg.input_size, cfg.input_size), device,
                        sample_seeds=sample_seeds)

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model.forward_with_cfg(x, t, labels, cfg_scale, task_ids).float()

    was_training = model.training
    model.eval()
    try:
        x = diffusion.sample(model_fn, noise, steps=steps, sampler=sampler, eta=eta, clip_denoised=clip_denoised)
    finally:
        model.train(was_training)
    return x.clamp(-1, 1) if clamp else x


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (C = 3 for pixel space)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def sample_images(model: DiT, diffusion: GaussianDiffusion, *, num: int, seed: int,
                  labels: Sequence[int] | None = None, task_ids: Sequence[int] | None = None,
                  start_index: int = 0, batch_size: int = 64, steps: int = 50, sampler: str = "ddim",
                  cfg_scale: float = 1.0, eta: float = 0.0, clip_denoised: bool = True,
                  autocast_dtype: torch.dtype | None = None,
                  decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """`num` images as uint8 (num, H, W, C); sample k has index `start_index + k`.

    `labels[k]` / `task_ids[k]` give each sample's class and task (tasks may mix within a batch).
    `decode` (a latent-space model: e.g. `Vae.decode`) maps the sampled latents, unclipped, to images in
    [-1, 1]; latents are not clipped to [-1, 1] while sampling (DiT samples latents with clip_denoised off).
    """
    if num < 0 or batch_size < 1:
        raise ValueError(f"num must be >= 0 and batch_size >= 1, got {num} and {batch_size}")
    labels = [0] * num if labels is None else list(labels)
    if len(labels) != num or (task_ids is not None and len(task_ids) != num):
        raise ValueError(f"need one label (and task id) per sample: num={num}, labels={len(labels)}, "
                         f"task_ids={None if task_ids is None else len(task_ids)}")
    out = []
    for lo in range(0, num, batch_size):
        hi = min(num, lo + batch_size)
        batch_tasks = None if task_ids is None else list(task_ids[lo:hi])
        # one task in the batch: an int id takes the single-task path (plain matmuls, no gathers)
        ids = (None if batch_tasks is None else int(batch_tasks[0]) if len(set(batch_tasks)) == 1
               else torch.tensor(batch_tasks, dtype=torch.long))
        x = generate(model, diffusion, labels=torch.tensor(labels[lo:hi], dtype=torch.long),
                     indices=range(start_index + lo, start_index + hi), seed=seed, task_ids=ids, steps=steps,
                     sampler=sampler, cfg_scale=cfg_scale, eta=eta, clip_denoised=clip_denoised and decode is None,
                     autocast_dtype=autocast_dtype, clamp=decode is None)
        out.append(to_uint8(x if decode is None else decode(x)))
    if not out:
        c, s = model.config.in_channels, model.config.input_size
        return np.zeros((0, s, s, c), dtype=np.uint8)
    return np.concatenate(out)


def plan_samples(task_names: Sequence[str], num_per_task: int, class_counts: Sequence[int],
                 class_label: int | None) -> tuple[list[int], list[int]]:
    """Interleave tasks sample by sample (a, b, a, b, ...) so every batch mixes them.

    Returns (task index per sample, label per sample). Sample order fixes the per-sample seed index.
    """
    tasks, labels = [], []
    for k in range(num_per_task):
        for t in range(len(task_names)):
            tasks.append(t)
            n_cls = class_counts[t]
            labels.append(class_label if class_label is not None else k % n_cls)
    return tasks, labels

