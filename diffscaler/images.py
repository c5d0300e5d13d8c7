"""uint8 image arrays to files: contact grids and PNGs (PIL). Outside the pure-torch core, for the
command line, the report and the pretrain loop's sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) grid on white."""
    n, h, w, c = images.shape
    ncols = ncols or max(1, int(np.ceil(np.sqrt(n))))
    nrows = max(1, int(np.ceil(n / ncols)))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        r, col = divmod(k, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = images[
            k
        ]
    return grid


def save_png(array: np.ndarray, path: str | Path) -> None:
    """(H, W, C) uint8 -> PNG (one channel as grey, else the first three as RGB)."""
    from PIL import Image

    arr = array[..., 0] if array.shape[-1] == 1 else array[..., :3]
    Image.fromarray(arr).save(path)
