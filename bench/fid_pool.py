"""Throughput of the FID actor pool with 1 vs 2 (or more) actors: images sampled + featurised per second.

    .venv/bin/python -m bench.fid_pool                               # 1 and 2 actors, 1 CPU each
    .venv/bin/python -m bench.fid_pool --actors 1,2,4 --cpus-per-actor 0.5 --samples 128 --steps 10
    .venv/bin/python -m bench.fid_pool --backbone runs/backbone/backbone.safetensors --shards shards/emoji

Without --backbone/--shards it builds a throwaway project in a temp folder (synthetic 32 px images,
a DiT-T/8 backbone, one Affiner adapter). Each actor count gets its own pool; one warm-up request
(actor start, reference statistics) runs first, then the timed request. "pool s" is the time from
the first chunk submitted to the last chunk done (the FID/KID arithmetic on the driver is listed
apart). Prints a table; numbers are for the machine it runs on.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from diffscaler.adapters import AdapterBank, TaskInfo
from diffscaler.artifacts import save_adapter, save_backbone
from diffscaler.config import load_config
from diffscaler.eval import EvalRequest, FidEvaluator
from diffscaler.models import build_model


def build_throwaway_project(root: Path, model_name: str, num_images: int) -> tuple[str, str, str]:
    """(backbone, adapter, shards dir) of a tiny synthetic project under `root`."""
    import torch
    from PIL import Image

    from diffscaler.data.writer import make_shards

    rng = np.random.RandomState(0)
    src = root / "src" / "bench"
    src.mkdir(parents=True)
    for i in range(num_images):
        im = np.full((32, 32, 3), rng.randint(0, 256, 3), np.uint8)
        x, y = rng.randint(0, 24, 2)
        im[y : y + 8, x : x + 8] = rng.randint(0, 256, 3)
        Image.fromarray(im).save(src / f"{i:04d}.png")
    shards = root / "shards" / "bench"
    make_shards(f"folder:{src}", str(shards), size=32, eval_fraction=0.5, log=lambda _m: None)
    cfg = load_config(None, [f"model.name={model_name}", "model.input_size=32", "model.num_classes=4"])
    model = build_model(cfg.model, seed=0)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.05)
    digest = save_backbone(model, root / "bb" / "backbone.safetensors")
    bank = AdapterBank.attach(model, [TaskInfo("bench")], method="affiner", rank=4)
    adapter, _ = save_adapter(bank, "bench", root / "adapters", digest)
    return str(root / "bb" / "backbone.safetensors"), str(adapter), str(shards)


def run(
    actors: int, args: argparse.Namespace, backbone: str, adapter: str | None, shards: str, cache: str
) -> dict[str, float]:
    # The adapter's task must be a configured target (its JSON names it); the shards are given directly.
    task = json.loads(Path(adapter).with_suffix(".json").read_text())["task"] if adapter else None
    cfg = load_config(
        None,
        [
            f"data.targets=[{task or 'none'}]",
            f"eval.cache_dir={cache}",
            f"eval.num_actors={actors}",
            f"eval.cpus_per_actor={args.cpus_per_actor}",
            f"eval.batch_size={args.batch_size}",
            f"eval.sampling_steps={args.steps}",
            "eval.kid_subset_size=50",
            f"eval.num_reference={args.num_reference}",
        ],
    )
    request = EvalRequest(task=task, adapter_path=adapter, shards_dir=shards, num_samples=args.samples)
    stamps: list[float] = []

    def clock(event: dict) -> None:
        if event["event"] in ("submitted", "done") and event["kind"] == "sample":
            stamps.append(time.perf_counter())

    with FidEvaluator(backbone, cfg) as ev:
        ev.evaluate(
            [EvalRequest(task=task, adapter_path=adapter, shards_dir=shards, num_samples=2 * actors, steps=1)]
        )  # warm-up: actors up, reference cached
        t0 = time.perf_counter()
        (result,) = ev.evaluate([request], progress=clock)
        total = time.perf_counter() - t0
    pool_s = stamps[-1] - stamps[0]
    return {
        "actors": actors,
        "images": result.num_generated,
        "pool_s": pool_s,
        "images_per_s": result.num_generated / pool_s,
        "metric_s": total - pool_s,
        "sample_ms": 1000 * result.sample_seconds / result.num_generated,
        "feature_ms": 1000 * result.feature_seconds / result.num_generated,
        "fid": result.fid or float("nan"),
        "parallelism": (result.sample_seconds + result.feature_seconds) / pool_s,
        "network": result.feature_network,
        "reference": result.num_reference,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=64, help="generated images in the timed request")
    p.add_argument("--steps", type=int, default=10, help="sampler steps")
    p.add_argument("--batch-size", type=int, default=16, help="eval.batch_size (also the max chunk size)")
    p.add_argument("--num-reference", type=int, default=0, help="reference images (0 = whole eval split)")
    p.add_argument("--model", default="DiT-T/8", help="model preset of the throwaway backbone")
    p.add_argument("--backbone", default="", help="use this backbone instead of a throwaway one")
    p.add_argument("--adapter", default="", help="adapter file to score (with --backbone)")
    p.add_argument("--shards", default="", help="reference dataset (with --backbone)")
    args = p.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster
    import ray

    with tempfile.TemporaryDirectory(prefix="fid_pool_bench_") as tmp:
        if args.backbone:
            backbone, adapter, shards = args.backbone, args.adapter or None, args.shards
        else:
            images = 2 * max(args.samples, 64)
            backbone, adapter, shards = build_throwaway_project(Path(tmp), args.model, num_images=images)
        counts = [int(a) for a in args.actors.split(",")]
        ray.init(
            num_cpus=max(2, int(np.ceil(max(counts) * args.cpus_per_actor))),
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            rows = [run(n, args, backbone, adapter, shards, str(Path(tmp) / "cache")) for n in counts]
        finally:
            ray.shutdown()
    base = rows[0]["images_per_s"]
    print(
        f"FID pool throughput: {args.samples} images, {args.steps} sampler steps, {args.cpus_per_actor} CPU/actor, "
        f"{rows[0]['network']} features, {rows[0]['reference']} reference images"
    )
    print("(img/s = generated images sampled + featurised per second of pool time; busy = actor-seconds / pool")
    print(" seconds, i.e. how many actors were working at once; ms/img = actor time per image)")
    print(
        f"{'actors':>6} {'images':>6} {'pool s':>8} {'img/s':>7} {'speedup':>7} {'busy':>5} {'sample ms/img':>13} "
        f"{'feature ms/img':>14} {'metric s':>8} {'FID':>9}"
    )
    for r in rows:
        print(
            f"{r['actors']:>6} {r['images']:>6} {r['pool_s']:>8.2f} {r['images_per_s']:>7.2f} "
            f"{r['images_per_s'] / base:>6.2f}x {r['parallelism']:>5.2f} {r['sample_ms']:>13.1f} "
            f"{r['feature_ms']:>14.1f} {r['metric_s']:>8.2f} {r['fid']:>9.3f}"
        )


if __name__ == "__main__":
    main()
