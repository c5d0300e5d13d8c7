"""Sampling helpers on top of GaussianDiffusion: batches, guidance, tasks, condition maps, uint8 images.

Image i depends only on (seed, i, task, class, condition map): noise comes from per-sample generators
(`SampleNoise`), so batch size, task mix and worker count do not change what is generated.

Two guidances, independent: `cfg_scale` on the class (label -1 = the null row) and `condition_scale` on
a spatial condition map (the task's output without its map as the unconditioned branch). Scale 1 is no
extra pass; one scale != 1 doubles the batch, both (InstructPix2Pix's two-scale form) triple it:

    eps = e(∅y, ∅c) + s_c (e(∅y, c) - e(∅y, ∅c)) + s_y (e(y, c) - e(∅y, c))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from diffscaler.adapters.bank import attached_bank
from diffscaler.adapters.condition import ConditionTokens
from diffscaler.diffusion.gaussian import GaussianDiffusion, SampleNoise
from diffscaler.models.dit import DiT


def guided_forward(
    model: DiT,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    task_ids: torch.Tensor | int | None,
    cond: ConditionTokens | None,
    cfg_scale: float = 1.0,
    condition_scale: float = 1.0,
) -> torch.Tensor:
    """The model's output (N, C_out, H, W) under class guidance and condition guidance (see the module
    docstring), in one forward of 1, 2 or 3 N rows. With learned sigma the variance channels come from
    the fully conditioned pass. Rows without a map (unconditional tasks) get the same output from both
    condition branches, so condition guidance leaves them as they are."""
    if cond is None:
        return model.forward_with_cfg(x, t, y, cfg_scale, *(() if task_ids is None else (task_ids,)))
    if cond.tokens is None:
        condition_scale = 1.0  # no row has a map: both condition branches are the same pass
    null = torch.full_like(y, -1)
    passes = [(y, cond)]  # the full pass first: its variance channels are kept
    if cfg_scale != 1.0:
        passes.append((null, cond))
    if condition_scale != 1.0:
        passes.append((null if cfg_scale != 1.0 else y, cond.without_map()))
    n, k = x.shape[0], len(passes)
    ids = task_ids.repeat(k) if isinstance(task_ids, torch.Tensor) else task_ids
    out = model(
        x.repeat(k, 1, 1, 1),
        t.repeat(k),
        torch.cat([p[0] for p in passes]),
        ids,
        condition=ConditionTokens.cat([p[1] for p in passes]) if k > 1 else cond,
    )
    parts = out.split(n)  # each (N, C_out, H, W)
    c = model.in_channels
    eps = [p[:, :c] for p in parts]
    if k == 1:
        return out
    if cfg_scale != 1.0 and condition_scale != 1.0:
        full, no_class, neither = eps
        guided = neither + condition_scale * (no_class - neither) + cfg_scale * (full - no_class)
    else:
        full, other = eps
        guided = other + (cfg_scale if cfg_scale != 1.0 else condition_scale) * (full - other)
    return torch.cat([guided, parts[0][:, c:]], dim=1)


@torch.no_grad()
def generate(
    model: DiT,
    diffusion: GaussianDiffusion,
    *,
    labels: torch.Tensor,
    indices: Sequence[int],
    seed: int,
    task_ids: torch.Tensor | int | None = None,
    steps: int = 50,
    sampler: str = "ddim",
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    clip_denoised: bool = True,
    autocast_dtype: torch.dtype | None = None,
    clamp: bool = True,
    sample_seeds: Sequence[int] | None = None,
    condition: torch.Tensor | None = None,
    condition_mask: torch.Tensor | None = None,
    condition_scale: float = 1.0,
) -> torch.Tensor:
    """One batch: float images (N, C, H, W) in [-1, 1] for sample `indices` with `labels` (latents,
    unclamped, with `clamp=False`). `sample_seeds` (one per sample) replace the (seed, index) noise seeds.
    `condition` (N, C, S, S) in [-1, 1]: the maps of the rows of conditional tasks; `condition_mask` (N,)
    bool: False asks a conditional task's row for its output without a map (explicitly; a conditional
    task's row with neither is an error before any step)."""
    device = next(model.parameters()).device
    labels = labels.to(device)
    if isinstance(task_ids, torch.Tensor):
        task_ids = task_ids.to(device)
    cfg = model.config
    if condition_scale < 0 or cfg_scale < 0:
        raise ValueError(f"guidance scales must be >= 0, got cfg_scale={cfg_scale}, condition_scale={condition_scale}")
    bank = attached_bank(model)
    cond = None
    if bank is not None and task_ids is not None:
        # the maps' tokens do not depend on t: embedded once here, added at every step
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            cond = bank.embed_condition(
                condition, task_ids, None if condition_mask is None else condition_mask.to(device), n=len(labels)
            )
    elif condition is not None or condition_mask is not None:
        raise ValueError("a condition map needs task ids of an adapter bank with a conditional task")
    noise = SampleNoise(
        seed, indices, (cfg.in_channels, cfg.input_size, cfg.input_size), device, sample_seeds=sample_seeds
    )

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return guided_forward(model, x, t, labels, task_ids, cond, cfg_scale, condition_scale).float()

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


def sample_images(
    model: DiT,
    diffusion: GaussianDiffusion,
    *,
    num: int,
    seed: int,
    labels: Sequence[int] | None = None,
    task_ids: Sequence[int] | None = None,
    start_index: int = 0,
    batch_size: int = 64,
    steps: int = 50,
    sampler: str = "ddim",
    cfg_scale: float = 1.0,
    eta: float = 0.0,
    clip_denoised: bool = True,
    autocast_dtype: torch.dtype | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    conditions: torch.Tensor | np.ndarray | None = None,
    condition_mask: Sequence[bool] | None = None,
    condition_scale: float = 1.0,
) -> np.ndarray:
    """`num` images as uint8 (num, H, W, C); sample k has index `start_index + k`.

    `labels[k]` / `task_ids[k]` give each sample's class and task (tasks may mix within a batch).
    `conditions[k]` (num, C, S, S) is sample k's map: uint8 0..255 (as `read_split(conditions=True)` gives
    them) or float in [-1, 1]; rows of unconditional tasks are ignored (zeros will do).
    `condition_mask[k]` False asks for a conditional task's output without its map.
    `decode` (a latent-space model: e.g. `Vae.decode`) maps the sampled latents, unclipped, to images in
    [-1, 1]; latents are not clipped to [-1, 1] while sampling (DiT samples latents with clip_denoised off).
    """
    if num < 0 or batch_size < 1:
        raise ValueError(f"num must be >= 0 and batch_size >= 1, got {num} and {batch_size}")
    labels = [0] * num if labels is None else list(labels)
    if len(labels) != num or (task_ids is not None and len(task_ids) != num):
        raise ValueError(
            f"need one label (and task id) per sample: num={num}, labels={len(labels)}, "
            f"task_ids={None if task_ids is None else len(task_ids)}"
        )
    if conditions is not None:
        conditions = torch.as_tensor(conditions)
        if conditions.dtype == torch.uint8:
            conditions = conditions.float() / 127.5 - 1  # as diffscaler.data.conditions.maps_to_unit
        if conditions.dim() != 4 or conditions.shape[0] != num:
            raise ValueError(f"conditions has shape {tuple(conditions.shape)}; need (num={num}, C, S, S)")
    if condition_mask is not None and len(condition_mask) != num:
        raise ValueError(f"need one condition_mask entry per sample: num={num}, got {len(condition_mask)}")
    out = []
    for lo in range(0, num, batch_size):
        hi = min(num, lo + batch_size)
        batch_tasks = None if task_ids is None else list(task_ids[lo:hi])
        # one task in the batch: an int id takes the single-task path (plain matmuls, no gathers)
        ids = (
            None
            if batch_tasks is None
            else int(batch_tasks[0])
            if len(set(batch_tasks)) == 1
            else torch.tensor(batch_tasks, dtype=torch.long)
        )
        x = generate(
            model,
            diffusion,
            labels=torch.tensor(labels[lo:hi], dtype=torch.long),
            indices=range(start_index + lo, start_index + hi),
            seed=seed,
            task_ids=ids,
            steps=steps,
            sampler=sampler,
            cfg_scale=cfg_scale,
            eta=eta,
            clip_denoised=clip_denoised and decode is None,
            autocast_dtype=autocast_dtype,
            clamp=decode is None,
            condition=None if conditions is None else conditions[lo:hi],
            condition_mask=None if condition_mask is None else torch.tensor(list(condition_mask[lo:hi])),
            condition_scale=condition_scale,
        )
        out.append(to_uint8(x if decode is None else decode(x)))
    if not out:
        c, s = model.config.in_channels, model.config.input_size
        return np.zeros((0, s, s, c), dtype=np.uint8)
    return np.concatenate(out)


def plan_samples(
    task_names: Sequence[str], num_per_task: int, class_counts: Sequence[int], class_label: int | None
) -> tuple[list[int], list[int]]:
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
