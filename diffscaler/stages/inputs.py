"""Input checks shared by the stages, run before any of them (and before Ray): the run's own inputs
(model vs data.vae, the given backbone file, the feature weights), and the helpers a stage's `preflight`
uses for what an earlier stage would have made (datasets built as configured, a backbone to read)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from diffscaler.artifacts import BackboneLoadError, check_model_matches, load_public_dit, read_backbone_meta
from diffscaler.config import WEBDATASET_PREFIX, ConfigError, ModelConfig, from_dict, swept_datasets
from diffscaler.data import DatasetError, dataset_dir, dataset_jobs, load_index
from diffscaler.data.build import dataset_parameters, planned_counts
from diffscaler.data.writer import build_changes
from diffscaler.stages.base import InputError, Run
from diffscaler.vae import VaeError, cached_vae_identity


def check_run_inputs(run: Run) -> None:
    """What every run checks, whichever stages it selects."""
    check_latent_space(run)
    check_split_sizes(run)
    try:
        check_given_backbone(run)
    except (BackboneLoadError, ConfigError) as err:
        raise InputError(str(err)) from None
    e = run.cfg.eval
    if e.feature_weights_path and not Path(e.feature_weights_path).is_file():
        raise InputError(f"eval.feature_weights_path: file not found: {e.feature_weights_path}")


def check_split_sizes(run: Run) -> None:
    """Counts are known before any stage (catalog x limit x split, or the index): every target's train
    split holds a fine-tune batch, a swept target has an eval split, an evaluated one two references.
    (eval.num_reference is a cap, not a count to meet: a smaller split gives all it has.)"""
    selected = set(run.selected)
    if not selected & {"finetune", "sweep", "evaluate"}:
        return
    cfg = run.cfg
    ft, targets = cfg.finetune, cfg.data.targets
    batch = math.ceil(ft.batch_size / len(targets)) if ft.mixed and targets else ft.batch_size
    swept = swept_datasets(cfg)[0] if "sweep" in selected else ()
    for task in targets:
        try:
            counts = planned_counts(cfg.data, task.name)
        except (ValueError, OSError):
            continue  # a missing or unknown source: the shards stage's preflight names it
        if counts is None:
            continue
        where = (
            f"task {task.name!r}: {counts['train']} train and {counts['eval']} eval images ({task.source_name}, "
            f"data.eval_fraction {cfg.data.eval_fraction}, data.limit {cfg.data.limit})"
        )
        if selected & {"finetune", "sweep"} and counts["train"] < batch:
            raise InputError(
                f"{where}: fewer train images than one batch of finetune.batch_size {ft.batch_size}"
                f"{' (mixed)' if ft.mixed else ''}; lower finetune.batch_size or add images"
            )
        if task.name in swept and counts["eval"] < 1:
            raise InputError(
                f"{where}: the sweep's validation loss and FID need an eval split; set data.eval_fraction > 0"
            )
        split = cfg.eval.reference_split
        if "evaluate" in selected and counts[split] < 2:
            raise InputError(
                f"{where}: FID needs at least 2 reference images in the {split} split "
                "(eval.reference_split); add images or change data.eval_fraction"
            )


def check_latent_space(run: Run) -> None:
    """model (and so the backbone), data.vae and data.image_size agree: latents of that VAE at that size."""
    d, m = run.cfg.data, run.cfg.model
    if not d.vae:
        if m.in_channels != 3 and "shards" in run.selected:
            raise InputError(
                f"model.in_channels {m.in_channels}: a latent backbone's shards are encoded "
                "through its VAE; set data.vae=PATH (a local diffusers AutoencoderKL)"
            )
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
        raise InputError(
            f"pipeline.backbone: {given} is neither a DiffScaler backbone (.safetensors) nor a "
            "facebookresearch/DiT checkpoint (.pt)"
        )


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
                raise InputError(
                    f"pipeline.backbone {given} is a DiT checkpoint that the 'pretrain' stage imports "
                    f"to {path}; add 'pretrain' to pipeline.stages"
                )
            return
        if not path.is_file():
            raise InputError(f"no backbone at {path}: add 'pretrain' to pipeline.stages or set pipeline.backbone=FILE")
        meta = read_backbone_meta(path)
        check_model_matches(from_dict(ModelConfig, meta["model"], "backbone.model"), run.cfg.model, str(path))
    except (BackboneLoadError, ConfigError) as err:
        raise InputError(str(err)) from None


def require_built(run: Run, names: Iterable[str]) -> None:
    """In a run without 'shards', the datasets a stage reads must already be built as data.* asks."""
    if "shards" in run.selected:
        return
    try:
        dataset_jobs(run.cfg.data)  # clashing names
    except ValueError as err:
        raise InputError(str(err)) from None
    for name in names:
        folder = dataset_dir(run.cfg.data, name)
        try:
            load_index(folder)
        except DatasetError as err:
            raise InputError(
                f"dataset {name!r} has no shards at {folder} ({err}); add 'shards' to pipeline.stages "
                "or point data.shards_root at built shards"
            ) from None
        changes = build_changes(folder, dataset_parameters(run.cfg.data, name), ignore=("tool",))
        if changes:
            built = str(load_index(folder).data.get("source", ""))
            task = next((t for t in run.cfg.data.targets if t.name == name), None)
            fix = "add 'shards' to pipeline.stages to rebuild it"
            if built.startswith(WEBDATASET_PREFIX) and task is not None and not task.webdataset:
                fix = f"these are indexed WebDataset shards: declare the target with source: {built!r}"
            raise InputError(
                f"dataset {name!r} at {folder} was built with other parameters than data.* asks for: "
                + ", ".join(changes)
                + f"; {fix}"
            )


def require_targets_and_backbone(run: Run) -> None:
    """The preflight of every stage that works on the target datasets with the backbone."""
    require_built(run, [t.name for t in run.cfg.data.targets])
    require_backbone(run)
