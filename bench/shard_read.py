"""Read-speed benchmark: decoded images per CPU-second from WebDataset shards (tables: bench/RESULTS.md).

    python -m bench.shard_read                         # builds Fashion-MNIST 32x32 shards in a temp dir
    python -m bench.shard_read --foreign --images 4000 --no-webdataset   # + 256x256 JPEG, 32x32x4 npy rows
    python -m bench.shard_read --canny --images 4000 --no-webdataset     # + the same images with Canny maps

Rows: ShardReader (local, fsspec `memory://` and `file://`, DataLoader workers; the library path and the
pngcodec batch fast path for PNG), shards written by webdataset.ShardWriter and indexed by `shards index`
(--foreign), conditional shards (--canny), and for comparison `webdataset.WebDataset` and, with
--ray-data, Ray Data `read_webdataset`. Every image is fully decoded. Two figures: wall-clock images/s
per working process, and images per CPU-second (this process and its finished children), which stays
honest when other jobs share the cores; the bar is what one GPU consumes (RESULTS.md, run 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import fsspec

from diffscaler.config import DataConfig
from diffscaler.data import ShardReader, load_index, make_shards
from diffscaler.data.conditions import ConditionSpec
from diffscaler.data.indexer import index_shards


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _measure(run: Callable[[], int]) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of one run."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    images = run()
    return images, time.perf_counter() - wall, _cpu_seconds() - cpu


def _shard_reader(url: str, batch_size: int, workers: int, epochs: int, fast_png: bool = True) -> Callable[[], int]:
    def run() -> int:
        reader = ShardReader(url, "train", batch_size, loader_workers=workers, hflip=True, fast_png=fast_png)
        return sum(b["image"].shape[0] for epoch in range(epochs) for b in reader.epoch(epoch))

    return run


def _webdataset(urls: list[str], batch_size: int) -> Callable[[], int]:
    def run() -> int:
        import webdataset as wds

        dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("png", "cls").batched(batch_size)
        return sum(len(pngs) for pngs, _labels in dataset)

    return run


def _ray_data(urls: list[str], batch_size: int) -> tuple[int, float, float]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        cpus = float(ray.cluster_resources().get("CPU", 1))
        ds = ray.data.read_webdataset(urls, decoder=True).select_columns(["png", "cls"])
        start = time.perf_counter()
        images = sum(len(b["png"]) for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
        return images, time.perf_counter() - start, cpus
    finally:
        if started:
            ray.shutdown()


GPU_PIXEL_IMAGES_S = 5963  # DiT-S/2, 32x32 pixels, H100 bf16 (RESULTS.md run 1)
GPU_LATENT_IMAGES_S = 539  # DiT-XL/2, 32x32x4 latents, H100 bf16 (RESULTS.md run 1)


def _foreign(root: str, kind: str, images: int, per_shard: int) -> str:
    """webdataset.ShardWriter shards of `kind` (jpg256 | npy32) in root/kind, indexed; returns the folder."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    folder = os.path.join(root, kind)
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    base = np.asarray(Image.linear_gradient("L").resize((256, 256)))[..., None].repeat(3, axis=2)  # smooth, like photos
    with wds.ShardWriter(os.path.join(folder, "part-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(images):
            if kind == "jpg256":
                pixels = np.clip(base.astype(np.int16) + rng.integers(-20, 20, (1, 1, 3)), 0, 255).astype(np.uint8)
                pixels = np.roll(pixels, i, axis=1)
                buf = io.BytesIO()
                Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
                sink.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "cls": i % 10})
            else:
                sink.write(
                    {"__key__": f"{i:09d}", "npy": rng.standard_normal((4, 32, 32)).astype(np.float32), "cls": i % 10}
                )
    index_shards(folder, log=lambda m: None)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="", help="existing shard folder (default: build Fashion-MNIST)")
    parser.add_argument("--images", type=int, default=20000, help="images to build when no --dataset")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=2, help="passes over the train split per ShardReader row")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the worker row")
    parser.add_argument("--ray-data", action="store_true", help="also time Ray Data read_webdataset")
    parser.add_argument("--no-webdataset", action="store_true", help="skip the webdataset reference row")
    parser.add_argument("--foreign", action="store_true", help="also 256x256 JPEG and 32x32x4 npy shards")
    parser.add_argument("--foreign-images", type=int, default=2000, help="images per foreign dataset")
    parser.add_argument("--canny", action="store_true", help="also the same images with Canny maps (built sets)")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="shard-read-bench-")
    memory = fsspec.filesystem("memory")
    try:
        dataset = args.dataset
        if not dataset:
            dataset = os.path.join(tmp, "fashion-mnist")
            print(f"building {args.images} Fashion-MNIST images at 32x32 into {dataset} ...", file=sys.stderr)
            make_shards("fashion-mnist", dataset, size=32, limit=args.images, eval_fraction=0.0, log=lambda m: None)
        index = load_index(dataset)
        shards = index.shards("train")
        for name in ["index.json", *(s.name for s in shards)]:
            memory.pipe_file(f"/shard-read-bench/{name}", (Path(dataset) / name).read_bytes())
        file_url = f"file://{os.path.abspath(dataset)}"
        b, e = args.batch_size, args.epochs

        rows = []  # (what, processes, images, wall s, CPU s)
        rows.append(("ShardReader, local path (pngcodec fast path)", 1, *_measure(_shard_reader(dataset, b, 0, e))))
        rows.append(
            ("ShardReader, local path, library only (Pillow)", 1, *_measure(_shard_reader(dataset, b, 0, e, False)))
        )
        rows.append(
            ("ShardReader, fsspec memory://", 1, *_measure(_shard_reader("memory://shard-read-bench", b, 0, e)))
        )
        rows.append(("ShardReader, fsspec file://", 1, *_measure(_shard_reader(file_url, b, 0, e))))
        if args.canny:
            canny = os.path.join(tmp, "fashion-mnist-canny")
            make_shards(
                index.source,
                canny,
                size=index.image_size,
                limit=index.num_samples("train"),
                eval_fraction=0.0,
                condition=ConditionSpec.from_config("canny", DataConfig()),
                log=lambda m: None,
            )
            canny_row = _measure(_shard_reader(canny, b, 0, e))
            rows.append(("ShardReader, local path, + canny maps (fast path)", 1, *canny_row))
        workers_row = _measure(_shard_reader(dataset, b, args.workers, e))
        rows.append((f"ShardReader, local, {args.workers} DataLoader workers", args.workers, *workers_row))
        if not args.no_webdataset:
            rows.append(
                ("webdataset.WebDataset + decode('rgb8'), local", 1, *_measure(_webdataset([s.url for s in shards], b)))
            )
        if args.ray_data:
            images, seconds, cpus = _ray_data([s.url for s in shards], b)
            rows.append((f"Ray Data read_webdataset, local ({cpus:g} CPUs)", int(cpus), images, seconds, float("nan")))

        foreign_rows = []
        if args.foreign:
            for kind, what, gpu in (
                ("jpg256", "256x256 JPEG", GPU_LATENT_IMAGES_S),
                ("npy32", "32x32x4 npy latents", GPU_LATENT_IMAGES_S),
            ):
                folder = _foreign(tmp, kind, args.foreign_images, 500)
                fb = 32 if kind == "jpg256" else b
                foreign_rows.append(
                    (f"ShardReader, {what}, batch {fb}", 1, *_measure(_shard_reader(folder, fb, 0, 1)), gpu)
                )

        print(
            f"\nshard read speed: {index.image_size}x{index.image_size} PNG, batch {b}, {index.num_samples('train')} "
            f"train images, {os.cpu_count()}-core CPU machine, load average {os.getloadavg()[0]:.1f} at the end"
        )
        print(f"{'reader':<50} {'procs':>5} {'images':>7} {'wall s':>7} {'images/s':>9} {'/s/proc':>8} {'/CPU-s':>8}")
        for what, procs, images, wall, cpu in rows:
            per_cpu = f"{images / cpu:>8.0f}" if cpu == cpu else f"{'-':>8}"
            rate = images / wall
            print(f"{what:<50} {procs:>5} {images:>7} {wall:>7.2f} {rate:>9.0f} {rate / procs:>8.0f} {per_cpu}")
        print(
            f"GPU bar: {GPU_PIXEL_IMAGES_S} images/s (DiT-S/2 pixels) = {GPU_PIXEL_IMAGES_S / 2:.0f} /CPU-s on 2 cores"
        )
        for what, procs, images, wall, cpu, gpu in foreign_rows:
            per_cpu = images / cpu
            print(
                f"{what:<50} {procs:>5} {images:>7} {wall:>7.2f} {images / wall:>9.0f} {images / wall:>8.0f} "
                f"{per_cpu:>8.0f}   GPU bar {gpu} images/s = {gpu / 2:.0f} /CPU-s on 2 cores"
            )
        return 0
    finally:
        if memory.exists("/shard-read-bench"):
            memory.rm("/shard-read-bench", recursive=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
