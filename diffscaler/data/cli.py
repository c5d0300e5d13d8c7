"""`diffscaler shards make` and `diffscaler shards check` (a command-line contract).

    diffscaler shards make --source NAME|folder:PATH|webdataset:SHARDS --out DIR [--size 32] [--samples-per-shard N]
                           [--eval-fraction F] [--limit N] [--seed S] [--workers W] [--skip-bad]
                           [--vae PATH [--vae-config JSON] [--actors N] [--gpus-per-actor G]]
                           [--condition canny|mask [--canny-low L --canny-high H --canny-blur S]
                                                   [--mask-alpha-threshold A --mask-white-threshold W]]
                                         # --vae: latent shards (npy fp16, both flips) encoded on Ray
                                         # --condition: each sample also holds its map (cond.png)
                           [--label-key cls|json:FIELD|none] [--image-key jpg] [--condition key:MEMBER]
                                         # webdataset:SHARDS (with --vae): users' shards encoded, their maps kept
    diffscaler shards check DIR          # exit status 0 = valid, 1 = problems (each names file + key)
    diffscaler shards index URL_OR_DIR [--out DIR] [--image-key jpg] [--label-key cls|json:FIELD|none]
                            [--size N] [--eval-shards K | --eval-fraction F] [--skip-bad] [--ray]
                            [--condition key:MEMBER]
                                         # WebDataset shards made by other tools -> index.json (exit 1 on
                                         # bad samples, each named by file + key, unless --skip-bad)

NAME is one of openclipart, emoji, icons, tiles, textiles, fashion-mnist. DIR may be an fsspec URL.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from diffscaler.cluster import connect_ray
from diffscaler.config import (
    CONDITION_KEY_PREFIX,
    CONDITION_KINDS,
    WEBDATASET_PREFIX,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    TaskSpec,
)
from diffscaler.data.check import check_dataset
from diffscaler.data.conditions import ConditionSpec
from diffscaler.data.encode import encode_shards
from diffscaler.data.index import SPLITS, DatasetError
from diffscaler.data.indexer import index_shards
from diffscaler.data.sources import BUNDLED_SOURCES
from diffscaler.data.writer import make_shards
from diffscaler.runlock import run_lock
from diffscaler.vae import VaeError

_DEFAULTS = DataConfig()


def _condition(args: argparse.Namespace) -> ConditionSpec | None:
    """--condition and the extractor flags as a ConditionSpec, the source and its flags validated as a config's
    data.targets are (--label-key / --image-key belong to webdataset: sources, which shards make encodes
    through --vae; key:<member> reads their maps)."""
    users = args.source.startswith(WEBDATASET_PREFIX)
    if users and not args.vae:
        raise ConfigError(
            f"--source {args.source}: shards make encodes WebDataset shards through --vae PATH; for a pixel "
            "backbone they are indexed where they lie (`diffscaler shards index SHARDS`)"
        )
    keyed = users and args.condition.startswith(CONDITION_KEY_PREFIX)
    if args.condition and args.condition not in CONDITION_KINDS and not keyed:
        raise ConfigError(
            f"--condition {args.condition!r}: shards make computes {' or '.join(CONDITION_KINDS)}; a "
            "key:<member> map is read from WebDataset shards (`diffscaler shards index --condition`, or "
            "`shards make --source webdataset:SHARDS --vae PATH`)"
        )
    if not (args.condition or users or args.label_key or args.image_key):
        return None
    data = DataConfig(
        canny_low=args.canny_low,
        canny_high=args.canny_high,
        canny_blur=args.canny_blur,
        mask_alpha_threshold=args.mask_alpha_threshold,
        mask_white_threshold=args.mask_white_threshold,
        vae=args.vae,
    )
    task = TaskSpec("cli", args.source, condition=args.condition, label_key=args.label_key, image_key=args.image_key)
    cfg = ExperimentConfig(data=replace(data, targets=(task,)))
    try:  # the same checks as a config's data.* (thresholds, mask on an opaque source), named as flags
        cfg.validate()
    except ConfigError as err:
        flags = {
            "data.targets[0].condition": "--condition",
            "data.targets[0].label_key": "--label-key",
            "data.targets[0].image_key": "--image-key",
            "data.targets[0].source": "--source",
            "data.canny_": "--canny-",
            "data.mask_": "--mask-",
        }
        message = str(err)
        for field, flag in flags.items():
            message = message.replace(field, flag)
        raise ConfigError(message.replace("_threshold", "-threshold")) from None
    return ConditionSpec.from_config(args.condition, data) if args.condition else None


def _make(args: argparse.Namespace) -> int:
    condition = _condition(args)  # a bad --condition is refused before the lock creates anything
    if "://" in args.out:  # a bucket has no flock
        return _make_here(args, condition)
    with run_lock(args.out, "diffscaler shards make"):  # as every program: a second writer would mix up the shards
        return _make_here(args, condition)


def _make_here(args: argparse.Namespace, condition: ConditionSpec | None) -> int:
    if args.vae:
        try:
            index = encode_shards(
                args.source,
                args.out,
                args.vae,
                vae_config=args.vae_config or None,
                size=args.size,
                samples_per_shard=args.samples_per_shard,
                eval_fraction=args.eval_fraction,
                limit=args.limit,
                seed=args.seed,
                batch_size=args.batch_size,
                actors=args.actors,
                gpus_per_actor=args.gpus_per_actor,
                skip_bad=args.skip_bad,
                condition=condition,
                image_key=args.image_key,
                label_key=args.label_key,
            )
        except (VaeError, DatasetError) as err:
            print(f"problem: {err}", file=sys.stderr)
            return 1
        shape = "x".join(map(str, index.data["latent"]["shape"]))
        counts = ", ".join(f"{s} {index.num_samples(s)}" for s in SPLITS)
        print(f"{index.url}: {counts} latents {shape}, {index.num_classes} classes, {index.content_hash}")
        return 0
    index = make_shards(
        args.source,
        args.out,
        size=args.size,
        samples_per_shard=args.samples_per_shard,
        eval_fraction=args.eval_fraction,
        limit=args.limit,
        seed=args.seed,
        workers=args.workers,
        skip_bad=args.skip_bad,
        condition=condition,
    )
    counts = ", ".join(f"{s} {index.num_samples(s)}" for s in SPLITS)
    print(f"{index.url}: {counts} samples, {index.num_classes} classes, {index.content_hash}")
    return 0


def _check(args: argparse.Namespace) -> int:
    report = check_dataset(args.dir)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    if report.problems:
        print(f"{report.dataset}: {len(report.problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"ok: {report.dataset}: {report.num_samples} samples in {report.num_shards} shards, {report.content_hash}")
    return 0


def _index(args: argparse.Namespace) -> int:
    if args.ray:
        connect_ray(log_to_driver=False)
    try:
        index = index_shards(
            args.source,
            args.out or None,
            image_key=args.image_key,
            label_key=args.label_key,
            size=args.size,
            eval_shards=args.eval_shards,
            eval_fraction=args.eval_fraction,
            skip_bad=args.skip_bad,
            parallel=args.ray,
            condition=args.condition,
        )
    except (DatasetError, ValueError) as err:
        print(f"problem: {err}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{s} {index.num_samples(s)}" for s in SPLITS)
    print(f"{index.url}: {counts} samples, {index.num_classes} classes, {index.content_hash}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    shards = subparsers.add_parser("shards", help="build and check WebDataset shard folders")
    sub = shards.add_subparsers(dest="shards_command", required=True)

    make = sub.add_parser("make", help="decode a source into <split>-NNNNNN.tar shards + index.json")
    make.add_argument(
        "--source",
        required=True,
        help=f"one of {', '.join(BUNDLED_SOURCES)}, folder:PATH, or webdataset:SHARDS (with --vae)",
    )
    make.add_argument("--out", required=True, help="output folder or fsspec URL")
    make.add_argument("--size", type=int, default=_DEFAULTS.image_size, help="square side in pixels")
    make.add_argument("--samples-per-shard", type=int, default=_DEFAULTS.samples_per_shard)
    make.add_argument("--eval-fraction", type=float, default=_DEFAULTS.eval_fraction, help="held-out share")
    make.add_argument("--limit", type=int, default=0, help="at most N images, class-balanced (0 = all)")
    make.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="subset, split and order seed")
    make.add_argument("--workers", type=int, default=1, help="decode processes (output is identical)")
    make.add_argument("--skip-bad", action="store_true", help="skip undecodable inputs (listed in the index)")
    make.add_argument("--vae", default="", help="encode to latents with this local AutoencoderKL (folder or file)")
    make.add_argument("--vae-config", default="", help="config.json of a single-file --vae")
    make.add_argument("--actors", type=int, default=1, help="--vae: encoding actors (Ray Data actor pool)")
    make.add_argument("--gpus-per-actor", type=float, default=0.0, help="--vae: GPUs per encoding actor")
    make.add_argument("--batch-size", type=int, default=16, help="--vae: images per encode call")
    make.add_argument(
        "--condition",
        default="",
        help="store a condition map per image: canny | mask (alpha) | key:MEMBER (webdataset: sources, --vae)",
    )
    make.add_argument(
        "--label-key", default="", help="webdataset: sources: cls | json:FIELD | none (default: cls if all)"
    )
    make.add_argument(
        "--image-key", default="", help="webdataset: sources: image member(s), e.g. jpg;png (default: found)"
    )
    make.add_argument("--canny-low", type=float, default=_DEFAULTS.canny_low, help="canny: low threshold")
    make.add_argument("--canny-high", type=float, default=_DEFAULTS.canny_high, help="canny: high threshold")
    make.add_argument("--canny-blur", type=float, default=_DEFAULTS.canny_blur, help="canny: Gaussian sigma, px")
    make.add_argument(
        "--mask-alpha-threshold",
        type=int,
        default=_DEFAULTS.mask_alpha_threshold,
        help="mask: alpha at or above which a pixel is foreground",
    )
    make.add_argument(
        "--mask-white-threshold",
        type=int,
        default=_DEFAULTS.mask_white_threshold,
        help="mask of RGB images (fidelity): background within this of white",
    )
    make.set_defaults(func=_make)

    check = sub.add_parser("check", help="validate a shard folder; non-zero exit status on any problem")
    check.add_argument("dir", help="shard folder or fsspec URL")
    check.set_defaults(func=_check)

    index = sub.add_parser("index", help="index WebDataset shards made by other tools (writes index.json)")
    index.add_argument("source", help="folder of *.tar (local or fsspec URL) or a shard pattern ({000..009}, pipe:)")
    index.add_argument("--out", default="", help="folder for index.json (default: the shards' folder)")
    index.add_argument("--image-key", default="", help="image member(s), e.g. jpg or jpg;png or npy (default: found)")
    index.add_argument("--label-key", default="", help="cls | json:FIELD | none (default: cls if every sample has one)")
    index.add_argument("--size", type=int, default=0, help="resize images to N x N (default: keep; one size needed)")
    index.add_argument("--eval-shards", type=int, default=0, help="last K shards are the eval split (unless named)")
    index.add_argument(
        "--eval-fraction",
        type=float,
        default=0.1,
        help="without eval shards: this share of samples, chosen by key hash (0 = no eval split)",
    )
    index.add_argument("--skip-bad", action="store_true", help="leave out bad samples (listed in the index)")
    index.add_argument("--ray", action="store_true", help="scan on Ray, one task per shard")
    index.add_argument("--condition", default="", help="key:MEMBER: each sample's condition map (e.g. key:depth.png)")
    index.set_defaults(func=_index)
