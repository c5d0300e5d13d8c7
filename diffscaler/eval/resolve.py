"""A request resolved: every default filled in from the config and every input checked (the adapter
fits the backbone and names a configured task, the shards hold enough images, a latent backbone's VAE
matches its shards) on the driver, before any actor starts. EvalInputError names the request and why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from diffscaler.adapters.bank import AdapterLoadError
from diffscaler.artifacts import TASK_MODEL_KEY, read_trained_meta
from diffscaler.config import ExperimentConfig
from diffscaler.data import DatasetError, ShardError, read_split
from diffscaler.data.build import dataset_dir, pretrain_dataset_dir
from diffscaler.data.conditions import adapter_condition
from diffscaler.data.index import load_index
from diffscaler.eval.requests import EvalRequest, task_names
from diffscaler.eval.stats import EvalInputError, ReferencePlan, plan_reference
from diffscaler.vae import VaeError, cached_vae_identity


@dataclass
class ResolvedRequest:
    """A request with every default filled in and its inputs checked."""

    request: EvalRequest
    num_samples: int
    seed: int
    steps: int
    sampler: str
    cfg_scale: float
    num_classes: int
    method: str
    rank: int
    plan: ReferencePlan
    task_model: bool = False  # adapter_path is a whole model of its own (scratch)
    real_plan: ReferencePlan | None = None  # source "real": the other split's images stand in for samples
    condition: dict[str, Any] | None = None  # the adapter's condition_extractor (a conditional task)
    maps: np.ndarray | None = None  # uint8 (M, C_cond, S, S): the reference split's maps, sample k takes k mod M
    condition_scale: float = 1.0


def pixel_side(model: dict[str, Any], cfg: ExperimentConfig) -> int:
    """Side of the images a backbone's samples become: its input for pixels, times data.vae's downsampling."""
    if model["in_channels"] == 3:
        return int(model["input_size"])
    return int(model["input_size"]) * int(cached_vae_identity(cfg.data.vae, cfg.data.vae_config or None)["downsample"])


def _check_vae(model: dict[str, Any], cfg: ExperimentConfig, where: str) -> str:
    """data.vae's hash for a latent backbone ("" for pixels); EvalInputError when it cannot decode its samples."""
    if model["in_channels"] == 3:
        return ""
    if not cfg.data.vae:
        raise EvalInputError(
            f"{where}: the backbone takes {model['in_channels']}-channel latents; FID scores decoded "
            "images: set data.vae=PATH (the VAE its shards were encoded with)"
        )
    try:
        ident = cached_vae_identity(cfg.data.vae, cfg.data.vae_config or None)
    except VaeError as err:
        raise EvalInputError(f"{where}: data.vae: {err}") from None
    if ident["latent_channels"] != model["in_channels"]:
        raise EvalInputError(
            f"{where}: data.vae {cfg.data.vae} makes {ident['latent_channels']}-channel latents, the "
            f"backbone takes {model['in_channels']}"
        )
    return str(ident["hash"])


def _check_shards_vae(shards: str, vae_hash: str, where: str) -> None:
    index = load_index(shards)
    if vae_hash and index.latent and index.vae_hash and index.vae_hash != vae_hash:
        raise EvalInputError(
            f"{where}: shards at {shards} were encoded with VAE {index.vae_hash}, data.vae is {vae_hash}"
        )


def resolve_request(
    req: EvalRequest, cfg: ExperimentConfig, backbone_meta: dict[str, Any], where: str
) -> ResolvedRequest:
    """`req` with the config's defaults, its inputs checked; EvalInputError starts with `where`."""
    model = backbone_meta["model"]
    vae_hash = _check_vae(model, cfg, where)
    method, rank, num_classes = "", 0, int(model["num_classes"])
    task_model = False
    condition = None
    if req.source not in ("generated", "real"):
        raise EvalInputError(f"{where}: source {req.source!r} is not generated or real")
    if req.source == "real" and req.adapter_path:
        raise EvalInputError(f"{where}: a real-images (floor) request takes no adapter")
    if req.adapter_path:
        try:
            meta = read_trained_meta(req.adapter_path)
        except AdapterLoadError as err:
            raise EvalInputError(f"{where}: {err}") from None
        task_model = bool(meta.get(TASK_MODEL_KEY))
        if meta["task"] not in task_names(cfg):
            raise EvalInputError(
                f"{where}: adapter {req.adapter_path} is for task {meta['task']!r}, which is not in "
                f"data.targets {task_names(cfg)}; there are no shards to score it on"
            )
        if req.task is not None and meta["task"] != req.task:
            raise EvalInputError(
                f"{where}: adapter {req.adapter_path} is for task {meta['task']!r}, the request says {req.task!r}"
            )
        bh = backbone_meta.get("content_hash")
        if bh and meta.get("backbone_hash") != bh:
            raise EvalInputError(
                f"{where}: adapter {req.adapter_path} was trained on backbone "
                f"{meta.get('backbone_hash')!r}, not on the evaluated one ({bh!r})"
            )
        task = meta["task"]
        method, rank = meta["method"], int(meta["rank"])
        num_classes = int(meta["num_classes"]) if meta.get("conditional") else 1
        condition = adapter_condition(meta)
    else:  # the bare backbone (class-conditional over its own classes), or a task's real images
        if req.task is not None and req.task not in task_names(cfg):
            raise EvalInputError(f"{where}: task {req.task!r} is not in data.targets {task_names(cfg)}")
        task = req.task
        method = "real" if req.source == "real" else ""
    shards = req.shards_dir or (pretrain_dataset_dir(cfg.data) if task is None else dataset_dir(cfg.data, task))
    num_samples = cfg.eval.num_samples if req.num_samples is None else req.num_samples
    if num_samples < 2:
        raise EvalInputError(f"{where}: num_samples={num_samples}; FID needs at least 2 generated images")
    steps = cfg.eval.sampling_steps if req.steps is None else req.steps
    if not 1 <= steps <= cfg.diffusion.num_timesteps:
        raise EvalInputError(f"{where}: steps={steps} is not in [1, {cfg.diffusion.num_timesteps}]")
    sampler = req.sampler or cfg.diffusion.sampler
    if sampler not in ("ddim", "ddpm"):
        raise EvalInputError(f"{where}: sampler {sampler!r} is not ddim or ddpm")
    real_plan = None
    try:
        plan = plan_reference(shards, cfg, req.num_reference, image_size=pixel_side(model, cfg))
        _check_shards_vae(shards, vae_hash, where)
        if req.source == "real":
            other = "train" if plan.split == "eval" else "eval"
            available = plan_reference(shards, cfg, 0, image_size=plan.image_size, split=other).available
            real_plan = plan_reference(
                shards, cfg, min(num_samples, available), image_size=plan.image_size, split=other
            )
        maps = (
            reference_maps(shards, plan.split, num_samples, condition, model["in_channels"] != 3) if condition else None
        )
    except EvalInputError as err:
        raise EvalInputError(f"{where}: {err}") from None
    return ResolvedRequest(
        request=replace(req, task=task, shards_dir=shards),
        num_samples=num_samples,
        seed=cfg.eval.seed if req.seed is None else req.seed,
        steps=steps,
        sampler=sampler,
        cfg_scale=cfg.diffusion.cfg_scale if req.cfg_scale is None else float(req.cfg_scale),
        num_classes=num_classes,
        method=method,
        rank=rank,
        plan=plan,
        task_model=task_model,
        real_plan=real_plan,
        condition=condition,
        maps=maps,
        condition_scale=cfg.diffusion.condition_scale if req.condition_scale is None else float(req.condition_scale),
    )


def reference_maps(shards: str, split: str, count: int, condition: dict[str, Any], latent: bool) -> np.ndarray:
    """The first `count` condition maps of a split (fewer when it holds fewer), uint8 (M, C_cond, S, S), checked
    against the adapter's condition record (kind, channels, side); EvalInputError naming what differs."""
    return split_maps(shards, split, count, condition, latent)[0]


def split_maps(
    shards: str, split: str, count: int, condition: dict[str, Any], latent: bool
) -> tuple[np.ndarray, np.ndarray]:
    """`reference_maps` and the sample key each map came from (str (M,)): the generation job records them."""
    try:
        index = load_index(shards)
    except DatasetError as err:
        raise EvalInputError(f"no shards to take condition maps from: {err}") from None
    spec = index.condition
    if spec is None or spec.kind != condition["kind"]:
        raise EvalInputError(
            f"the adapter was trained with {condition['kind']} maps, the shards at {shards} carry "
            f"{spec.kind if spec else 'none'}"
        )
    try:
        _images, _labels, maps, keys = read_split(shards, split, limit=count, pixels=latent, conditions=True, keys=True)
    except (DatasetError, ShardError) as err:
        raise EvalInputError(f"condition maps of {shards} ({split} split): {err}") from None
    want = (int(condition["channels"]), int(condition["size"]), int(condition["size"]))
    if tuple(maps.shape[1:]) != want:
        raise EvalInputError(f"condition maps of {shards} are {tuple(maps.shape[1:])}, the adapter takes {want}")
    return maps, keys
