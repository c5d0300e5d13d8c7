"""Input checks shared by the stages, run before any of them (and before Ray): the run's own inputs
(model vs data.vae, the given backbone file, the feature weights), and the helpers a stage's `preflight`
uses for what an earlier stage would have made (datasets built as configured, a backbone to read)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from diffscaler.artifacts import BackboneLoadError, check_model_matches, load_public_dit, read_backbone_meta
from diffscaler.config import ConfigError, ModelConfig, from_dict
from diffscaler.data import DatasetError, dataset_dir, dataset_jobs, load_index
from diffscaler.data.build import _parameters, dataset_condition
from diffscaler.data.writer import build_changes
from diffscaler.stages.base import InputError, Run
from diffscaler.vae import VaeError, cached_vae_identity


def check_run_inputs(run: Run) -> None:
    """What every run checks, whichever stages it selects."""
    check_latent_space(run)
    try:
        check_given_backbone(run)
    except (BackboneLoadError, ConfigError) as err:
        raise InputError(str(err)) from None
    e = run.cfg.eval
    if e.feature_weights_path and not Path(e.feature_weights_path).is_file():
        raise InputError(f"eval.feature_weights_path: file not found: {e.feature_weights_path}")


def check_latent_space(run: Run) -> None:
    """model (and so the backbone), data.vae and data.image_size agree: latents of that VAE at that size."""
    d, m = run.cfg.data, run.cfg.model
    if not d.vae:
        if m.in_channels != 3 and "shards" in run.selected:
            raise InputError(f"model.in_channels {m.in_channels}: a latent backbone's shards are encoded "
                             "through its VAE; set data.vae=PATH (a local diffusers AutoencoderKL)")  # fmt: skip
        return
    try:
        ident = cached_vae_identity(d.vae, d.vae_config or None)
    except VaeError as err:
        raise InputError(f"data.vae: {err}") from None
    side = m.input_size * ident["downsample"]
    if (m.in_channels, side) != (ident["latent_channels"], d.image_size):
        raise InputError(
            f"model {m.name} takes {m.in_channels}x{m.input_size}x{m.input_size} inputs, data.vae {d.vae} makes "
            f"{ident['latent_channels']}x{d.image_size // ident['downsample']}x"
            f"{d.image_size // ident['downsample']} latents of data.image_size={d.image_size} images "
            f"(downsampling {ident['downsample']}): set data.image_size={side} or model.input_size / "
            "model.in_channels to the backbone's"
        )


def check_given_backbone(run: Run) -> None:
    """pipeline.backbone, when given, is a file that fits model.* (a .safetensors or a public DiT .pt)."""
    given = run.given_backbone
    if not given:
        return
    if not Path(given).is_file():
        raise InputError(f"pipeline.backbone: file not found: {given}")
    if given.endswith(".pt"):
        load_public_dit(given, expect=run.cfg.model)
    elif given.endswith(".safetensors"):
        meta = read_backbone_meta(given)
        check_model_matches(from_dict(ModelConfig, meta["model"], "backbone.model"), run.cfg.model, given)
    else:
        raise InputError(f"pipeline.backbone: {given} is neither a DiffScaler backbone (.safetensors) nor a "
                         "facebookresearch/DiT checkpoint (.pt)")  # fmt: skip


def require_backbone(run: Run) -> None:
    """A stage that reads the backbone, in a run without 'pretrain': the backbone must already be there."""
    if "pretrain" in run.selected:
        return
    given = run.given_backbone
    try:
        if given.endswith(".safetensors"):
            return  # checked by check_given_backbone
        path = run.layout.backbone_file
        if given:  # a public .pt: the pretrain stage imports it
            if not (path.is_file() and read_backbone_meta(path)["provenance"].get("source") == given):
                raise InputError(f"pipeline.backbone {given} is a DiT checkpoint that the 'pretrain' stage imports "
                                 f"to {path}; add 'pretrain' to pipeline.stages")  # fmt: skip
            return
        if not path.is_file():
            raise InputError(f"no backbone at {path}: add 'pretrain' to pipeline.stages or set pipeline.backbone=FILE")
        meta = read_backbone_meta(path)
        check_model_matches(from_dict(ModelConfig, meta["model"], "backbone.model"), run.cfg.model, str(path))
    except (BackboneLoadError, ConfigError) as err:
        raise InputError(str(err)) from None


def build_parameters(run: Run, source: str, name: str = "") -> dict[str, Any]:
    """What a dataset's index records about its build (with data.vae: latent shards of that VAE; with the
    condition map of the task named `name`)."""
    return _parameters(run.cfg.data, source, dataset_condition(run.cfg.data, name))


def require_built(run: Run, names: Iterable[str]) -> None:
    """In a run without 'shards', the datasets a stage reads must already be built as data.* asks."""
    if "shards" in run.selected:
        return
    try:
        jobs = dataset_jobs(run.cfg.data)
    except ValueError as err:
        raise InputError(str(err)) from None
    for name in names:
        folder = dataset_dir(run.cfg.data, name)
        try:
            load_index(folder)
        except DatasetError as err:
            raise InputError(f"dataset {name!r} has no shards at {folder} ({err}); add 'shards' to pipeline.stages "
                             "or point data.shards_root at built shards") from None  # fmt: skip
        changes = build_changes(folder, build_parameters(run, jobs[name], name), ignore=("tool",))
        if changes:
            raise InputError(
                f"dataset {name!r} at {folder} was built with other parameters than data.* asks for: "
                + ", ".join(changes)
                + "; add 'shards' to pipeline.stages to rebuild it"
            )


def require_targets_and_backbone(run: Run) -> None:
    """The preflight of every stage that works on the target datasets with the backbone."""
    require_built(run, [t.name for t in run.cfg.data.targets])
    require_backbone(run)
