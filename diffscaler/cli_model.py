"""Model subcommands of the `diffscaler` CLI: model-info, init-backbone, sample.

An entrypoint beside `diffscaler.cli`: the pure-torch core (models, diffusion, adapters) knows no
argparse, files or images.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffscaler.artifacts import adapter_files, load_adapters, load_backbone, read_adapter_meta, save_backbone
from diffscaler.config import DiffusionConfig, ModelConfig, validate_model
from diffscaler.diffusion.gaussian import GaussianDiffusion
from diffscaler.diffusion.sampling import plan_samples, sample_images
from diffscaler.images import image_grid, save_png
from diffscaler.models.dit import DIT_SIZES, DiT, build_model, model_macs
from diffscaler.runlock import check_out_dir
from diffscaler.vae import load_vae


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model-info", help="parameter and FLOP counts of a DiT preset")
    p.add_argument("--model", default="DiT-XL/2", help="preset, e.g. DiT-XL/2 (default) or DiT-T/4")
    p.add_argument("--input-size", type=int, default=32, help="input side (latent cells or pixels)")
    p.add_argument("--in-channels", type=int, default=4, help="4 for VAE latents, 3 for pixels")
    p.add_argument("--num-classes", type=int, default=1000, help="classes (default: ImageNet's 1000)")
    p.add_argument("--no-learn-sigma", action="store_true", help="fixed variance (halves output channels)")
    p.add_argument("--all", action="store_true", help="every preset at this input size")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("init-backbone", help="write a freshly initialised backbone file")
    p.add_argument("--model", required=True, help="preset, e.g. DiT-T/4")
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--in-channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--learn-sigma", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .safetensors path (a JSON is written beside it)")
    p.set_defaults(func=cmd_init_backbone)

    p = sub.add_parser("sample", help="sample images from a backbone, optionally with task adapters")
    p.add_argument("--backbone", required=True, help="backbone .safetensors (or a public DiT .pt)")
    p.add_argument(
        "--adapters", nargs="*", default=[], help="<task>.safetensors files, adapter folders or a bank.json (one bank)"
    )
    p.add_argument("--task", default="", help="task name(s), comma-separated; interleaved in shared batches")
    p.add_argument(
        "--class",
        dest="class_label",
        type=int,
        default=None,
        help="class label (default: cycle over classes of a conditional model)",
    )
    p.add_argument("--num", type=int, default=16, help="images per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument(
        "--condition",
        action="append",
        default=[],
        metavar="[TASK=]DIR",
        help="a folder of images: each conditional task extracts its maps from them with its own "
        "extractor (the adapter records it); TASK=DIR gives one task its own folder; repeatable",
    )
    p.add_argument(
        "--condition-maps",
        action="append",
        default=[],
        metavar="[TASK=]DIR",
        help="a folder of ready condition maps (the task's channels, its images' size); repeatable",
    )
    p.add_argument(
        "--condition-scale",
        type=float,
        default=1.0,
        help="guidance on the condition map (1 = none), independent of --cfg-scale",
    )
    p.add_argument(
        "--unconditioned",
        action="store_true",
        help="sample conditional tasks given no --condition without a map (what the map buys)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--merge", action="store_true", help="fold the single task's adapter into the weights")
    p.add_argument("--vae", default="", help="latent backbone: decode through this local AutoencoderKL (folder/file)")
    p.add_argument("--vae-config", default="", help="config.json of a single-file --vae")
    p.add_argument("--out", required=True, help="output folder: samples.npz, grid.png (and conditions.png)")
    p.set_defaults(func=cmd_sample)


def _model_config(args: argparse.Namespace, learn_sigma: bool):
    cfg = ModelConfig(
        name=args.model,
        input_size=args.input_size,
        in_channels=args.in_channels,
        num_classes=args.num_classes,
        learn_sigma=learn_sigma,
    )
    validate_model(cfg)
    return cfg


def model_info(cfg) -> dict:
    import torch

    with torch.device("meta"):  # counts without allocating (XL is 675 M parameters)
        model = DiT(cfg)
    return {
        "model": cfg.name,
        "input_size": cfg.input_size,
        "in_channels": cfg.in_channels,
        "params": model.num_parameters(),
        "gflops_per_forward": round(model_macs(cfg) / 1e9, 3),
        "flops_convention": "multiply-adds per image (DiT paper)",
    }


def cmd_model_info(args: argparse.Namespace) -> int:
    learn_sigma = not args.no_learn_sigma
    if args.all:
        names = [f"DiT-{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8) if args.input_size % p == 0]
        rows = []
        for name in names:
            args.model = name
            rows.append(model_info(_model_config(args, learn_sigma)))
    else:
        rows = [model_info(_model_config(args, learn_sigma))]
    if args.json:
        print(json.dumps(rows if args.all else rows[0]))
        return 0
    print(f"{'model':<10} {'input':>9} {'params (M)':>11} {'GFLOPs (MACs/img)':>18}")
    for r in rows:
        print(
            f"{r['model']:<10} {r['input_size']:>4}x{r['in_channels']:<4} {r['params'] / 1e6:>11.2f} "
            f"{r['gflops_per_forward']:>18.2f}"
        )
    return 0


def cmd_init_backbone(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out}: a backbone file ends in .safetensors")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file path ending in .safetensors")
    if file := next((p for p in out.parents if p.exists() and not p.is_dir()), None):
        raise ValueError(f"--out {out}: {file} is a file, not a folder")
    model = build_model(_model_config(args, args.learn_sigma), seed=args.seed)
    digest = save_backbone(model, out, provenance={"init": "fresh", "seed": args.seed})
    print(json.dumps({"backbone": str(out), "content_hash": digest, "params": model.num_parameters()}))
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """A latent backbone's samples are decoded through --vae (its shards' VAE): samples.npz holds images
    (and, with conditional tasks, `condition` uint8 (N, C, S, S) and `has_condition` (N,): the maps used)."""
    import torch

    if args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    out = check_out_dir(args.out)  # before sampling: a bad --out found afterwards would lose the images
    model, meta = load_backbone(args.backbone)
    vae = None
    if model.config.in_channels != 3 or args.vae:
        if not args.vae:
            raise ValueError(
                f"--vae: {args.backbone} is a latent backbone ({model.config.in_channels} channels); "
                "its samples become images only through the VAE its shards were encoded with"
            )
        vae = load_vae(args.vae, args.vae_config or None)
        if vae.latent_channels != model.config.in_channels:
            raise ValueError(
                f"--vae {args.vae}: makes {vae.latent_channels}-channel latents, the backbone "
                f"{args.backbone} takes {model.config.in_channels}"
            )
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(), learn_sigma=model.config.learn_sigma)
    if args.steps < 1 or args.steps > diffusion.num_timesteps:
        raise ValueError(f"--steps must be in [1, {diffusion.num_timesteps}], got {args.steps}")
    names = [t for t in args.task.split(",") if t]
    task_ids = None
    conditions = None
    if not args.adapters and (args.condition or args.condition_maps):
        raise ValueError("--condition / --condition-maps: condition maps go to tasks' adapters; give --adapters")
    if args.adapters:
        files = adapter_files(args.adapters)
        bank = load_adapters(model, files, backbone_hash=meta["content_hash"])
        names = names or [t.name for t in bank.tasks]
        unknown = [n for n in names if n not in {t.name for t in bank.tasks}]
        if unknown:
            raise ValueError(
                f"--task: {', '.join(unknown)} not among the adapters' tasks {[t.name for t in bank.tasks]}"
            )
        idx = [bank.task_index(n) for n in names]
        counts = [bank.tasks[i].num_classes for i in idx]
        per_sample_task, labels = plan_samples(names, args.num, counts, args.class_label)
        task_ids = [idx[t] for t in per_sample_task]
        for i, lab in zip(task_ids, labels, strict=True):
            if not 0 <= lab < bank.tasks[i].num_classes:
                raise ValueError(
                    f"--class {lab} is out of range for task {bank.tasks[i].name!r} "
                    f"({bank.tasks[i].num_classes} class(es))"
                )
        metas = {m["task"]: m for m in (read_adapter_meta(f) for f in files)}
        # Every map is read and checked here, before any sampling.
        conditions = sample_conditions(args, names, metas, per_sample_task)
        if args.merge:
            if len(names) != 1:
                raise ValueError("--merge folds one task into the weights; give exactly one --task")
            bank.merge(names[0])
    else:
        if names:
            raise ValueError(f"--task {args.task} needs --adapters holding those tasks")
        names = [""]
        per_sample_task, labels = plan_samples(names, args.num, [model.config.num_classes], args.class_label)
        if not all(0 <= lab < model.config.num_classes for lab in labels):
            raise ValueError(f"--class must be in [0, {model.config.num_classes})")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extra = {}
    if conditions is not None:
        from diffscaler.data.conditions import maps_to_unit

        extra = dict(
            conditions=torch.from_numpy(maps_to_unit(conditions[0])),  # (N, C_cond, S, S) in [-1, 1]
            condition_mask=torch.from_numpy(conditions[1]),
            condition_scale=args.condition_scale,
        )
    images = sample_images(
        model,
        diffusion,
        num=len(labels),
        seed=args.seed,
        labels=labels,
        task_ids=task_ids,
        batch_size=args.batch_size,
        steps=args.steps,
        sampler=args.sampler,
        cfg_scale=args.cfg_scale,
        decode=vae.decode if vae is not None else None,
        **extra,
    )
    seconds = time.perf_counter() - t0
    task_of = np.array([names[t] for t in per_sample_task])
    maps = {} if conditions is None else {"condition": conditions[0], "has_condition": conditions[1]}
    np.savez(
        out / "samples.npz",
        images=images,
        task=task_of,
        label=np.array(labels, dtype=np.int64),
        index=np.arange(len(labels), dtype=np.int64),
        **maps,
    )
    # grid: one row per task when several are interleaved
    order = np.argsort(np.array(per_sample_task), kind="stable")
    save_png(image_grid(images[order], ncols=args.num if len(names) > 1 else None), out / "grid.png")
    if conditions is not None:  # the maps in the same places as their images (black: no map)
        shown = conditions[0][:, :3] if conditions[0].shape[1] >= 3 else np.repeat(conditions[0][:, :1], 3, axis=1)
        shown = shown.transpose(0, 2, 3, 1)  # (N, S, S, 3)
        if shown.shape[1:3] == images.shape[1:3]:
            save_png(image_grid(shown[order], ncols=args.num if len(names) > 1 else None), out / "conditions.png")
    print(
        json.dumps(
            {
                "images": len(labels),
                "tasks": names,
                "seconds": round(seconds, 2),
                "samples": str(out / "samples.npz"),
                "grid": str(out / "grid.png"),
            }
        )
    )
    return 0


def _condition_dirs(values: list[str], flag: str, names: list[str]) -> dict[str, str]:
    """{task or "" (every conditional task): folder} from repeated `[TASK=]DIR` arguments."""
    out: dict[str, str] = {}
    for value in values:
        task, sep, folder = value.partition("=")
        if not sep or task not in names:  # a folder whose name holds "=" stays a folder
            task, folder = "", value
        if task in out:
            raise ValueError(f"{flag}: {'task ' + repr(task) if task else 'a folder for every task'} given twice")
        out[task] = folder
    return out


def sample_conditions(
    args: argparse.Namespace, names: list[str], metas: dict[str, dict], per_sample_task: list[int]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(maps uint8 (N, C, S, S), has_condition bool (N,)) for the planned samples, None when no task takes a
    map. Sample k of a task takes that task's map k mod its number of maps; rows of unconditional (or
    --unconditioned) tasks get zeros. Errors name the task, folder or file before anything is sampled."""
    from diffscaler.data.conditions import (
        adapter_condition,
        batch_maps,
        check_map_shape,
        maps_from_files,
        maps_from_images,
        spec_from_record,
    )

    images = _condition_dirs(args.condition, "--condition", names)
    ready = _condition_dirs(args.condition_maps, "--condition-maps", names)
    records = {n: adapter_condition(metas[n]) for n in names}
    for flag, dirs in (("--condition", images), ("--condition-maps", ready)):
        plain = [t for t in dirs if t and not records[t]]
        if plain:
            raise ValueError(f"{flag}: task(s) {plain} take no condition map (trained without one)")
        if "" in dirs and not any(records.values()):
            raise ValueError(f"{flag}: none of the tasks {names} takes a condition map")
    if not any(records.values()):
        return None
    per_task: dict[str, np.ndarray | None] = {}
    for name in names:
        record = records[name]
        if not record:
            per_task[name] = None
            continue
        channels, size = int(record["channels"]), int(record["size"])
        own = [(flag, d[name]) for flag, d in (("--condition", images), ("--condition-maps", ready)) if name in d]
        if len(own) > 1:
            raise ValueError(f"task {name!r}: both --condition and --condition-maps name a folder for it")
        given = own or [(flag, d[""]) for flag, d in (("--condition", images), ("--condition-maps", ready)) if "" in d]
        if len(given) > 1:
            raise ValueError(
                f"task {name!r}: both --condition and --condition-maps give every task a folder; "
                f"name one per task ({name}=DIR)"
            )
        if not given:
            if args.unconditioned:
                per_task[name] = None
                continue
            raise ValueError(
                f"task {name!r} is conditioned on {record['kind']} maps: give --condition DIR (images "
                "to extract its maps from), --condition-maps DIR (ready maps), or --unconditioned to "
                "sample it without a map"
            )
        flag, folder = given[0]
        what = f"{flag} {folder} (task {name!r})"
        try:
            if flag == "--condition":
                maps = maps_from_images(folder, spec_from_record(record), size, limit=args.num)
            else:
                maps = maps_from_files(folder, channels, size, limit=args.num)
            check_map_shape(maps, channels, size, what)
        except ValueError as err:
            raise ValueError(f"{what}: {err}" if what not in str(err) else str(err)) from None
        per_task[name] = maps
    if all(m is None for m in per_task.values()):  # every conditional task --unconditioned: zero maps
        side = int(next(r for r in records.values() if r)["size"])
        return np.zeros((len(per_sample_task), 1, side, side), np.uint8), np.zeros(len(per_sample_task), bool)
    return batch_maps([per_task[n] for n in names], per_sample_task)
