"""Encoding throughput: images per second through a VAE into latent shards (`shards make --vae`).

    python -m bench.encode_latents                       # the tiny random test VAE, 64 images at 32x32 px
    python -m bench.encode_latents --vae /data/sd-vae-ft-ema --size 256 --images 256 --gpus-per-actor 1

Two rows: `Vae.encode` of both flips in this process (the actors' work, no Ray), and the whole
`encode_shards` on a local Ray cluster (image load + resize, both flips, PNG of the original, fp16 npy,
tar writing; the actor's start-up - diffusers import, VAE load - is counted in its wall time and shown
separately). The tiny VAE says what the pipeline costs around the network; a real SD VAE's numbers come
from a GPU run (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from diffscaler.vae import load_vae, save_tiny_vae


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae", default="", help="VAE folder (default: a tiny random one in a temp dir)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    ap.add_argument("--no-ray", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from PIL import Image

    tmp = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    vae_path = args.vae or save_tiny_vae(tmp / "tiny-vae")
    rng = np.random.default_rng(0)
    folder = tmp / "images"
    folder.mkdir()
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    rows = []
    t0 = time.perf_counter()
    vae = load_vae(vae_path)
    load_s = time.perf_counter() - t0
    import torch

    torch.set_num_threads(1)
    pixels = rng.integers(0, 256, (args.batch_size, args.size, args.size, 3), dtype=np.uint8)
    vae.encode(np.concatenate([pixels, pixels[:, :, ::-1]]))  # warm-up
    n, t0 = 0, time.perf_counter()
    while n < args.images:
        vae.encode(np.concatenate([pixels, pixels[:, :, ::-1]]))
        n += len(pixels)
    s = time.perf_counter() - t0
    rows.append(
        {
            "row": "Vae.encode, both flips, 1 thread",
            "images": n,
            "seconds": round(s, 2),
            "images_per_s": round(n / s, 1),
            "vae_load_s": round(load_s, 1),
        }
    )
    if not args.no_ray:
        import ray

        from diffscaler.data.encode import encode_shards

        ray.init(address="local", num_cpus=max(2, args.actors), include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            encode_shards(
                f"folder:{folder}",
                str(tmp / "shards"),
                vae_path,
                size=args.size,
                samples_per_shard=max(1, args.images // 4),
                eval_fraction=0.0,
                batch_size=args.batch_size,
                actors=args.actors,
                gpus_per_actor=args.gpus_per_actor,
                log=lambda m: None,
            )
            s = time.perf_counter() - t0
        finally:
            ray.shutdown()
        rows.append(
            {
                "row": f"encode_shards on Ray, {args.actors} actor(s), incl. actor start-up",
                "images": args.images,
                "seconds": round(s, 2),
                "images_per_s": round(args.images / s, 1),
            }
        )
    load = os.getloadavg()[0]
    for r in rows:
        print(json.dumps({**r, "size": args.size, "load_avg_1min": round(load, 1)}))


if __name__ == "__main__":
    main()
