"""Image folders and shard surgery for the data tests: random PNG class folders, a member rewritten in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffscaler.data.tarformat import RawSample, iter_raw_samples, write_tar


def quiet(_message: str) -> None:
    pass


def make_image_folder(root: Path, per_class: dict[str, int], size: tuple[int, int] = (12, 10), seed: int = 0) -> Path:
    """Class folders of random RGB PNGs; every image differs (noise), so samples can be told apart."""
    rng = np.random.default_rng(seed)
    for cls, count in per_class.items():
        folder = root / cls if cls else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return root


def rewrite_member(shard: Path, transform) -> None:
    """Re-pack a shard's samples through `transform(sample) -> sample or None`."""
    samples = [transform(s) for s in iter_raw_samples(shard.read_bytes(), str(shard))]
    shard.write_bytes(write_tar([s for s in samples if s is not None]))


def corrupt_png_of(key):
    def transform(s: RawSample):
        if s.key == key:
            png = bytearray(s.members["png"])
            png[45] ^= 0xFF  # inside IDAT: CRC and inflate fail
            s.members["png"] = bytes(png)
        return s

    return transform


def rgba_folder(root: Path, n: int = 12, seed: int = 0) -> Path:
    """n RGBA images of 20x16 px: transparent, an opaque 2-px strip at each side (outside the centre square, so
    a crop that is not prepare_image's shows it), a half-transparent rectangle and an opaque one at random places."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        px = np.zeros((16, 20, 4), np.uint8)
        px[:, :2] = px[:, -2:] = (200, 0, 0, 255)
        for alpha in (100, 255):
            y, x = rng.integers(0, 10, 2)
            h, w = rng.integers(3, 7, 2)
            px[y : y + h, 2 + x : 2 + x + w] = (*rng.integers(0, 200, 3), alpha)
        Image.fromarray(px, "RGBA").save(root / f"img_{i:03d}.png")
    return root
