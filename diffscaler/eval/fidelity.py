"""Condition fidelity: do generated images follow the maps they were sampled with? (numpy + OpenCV only)

    spec = index.condition                                             # the task's extractor, from index.json
    score = condition_fidelity(spec, generated, maps)                  # FidelityScore: metric, mean, std, n
    rows = reference_rows(spec, real_images, real_maps, seed=0)       # {"ceiling": ..., "mismatched": ...}
    edge_f1(pred, target, tolerance=1)    mask_iou(pred, target)       # per image, float64 (N,)

The condition is re-extracted from each image with the task's own extractor (`ConditionSpec.extract`:
Canny for `canny`; for `mask` the foreground against the white background, since an RGB image has no
alpha) and compared with the map it was given:
- `canny` -> edge F1 with a 1-pixel tolerance: precision = share of extracted edge pixels within 1 px
  (Chebyshev: a 3x3 dilation) of a given edge pixel, recall = share of given edge pixels within 1 px of
  an extracted one, F1 = 2PR / (P + R). A relaxed match (no one-to-one assignment as in the BSDS
  benchmark): at 16-32 px a 1-px shift of an outline is the resampling's noise, not an error.
- `mask` -> intersection over union of the two foregrounds.
- `key:<member>` -> no extractor here: condition_fidelity returns None (fidelity n/a; FID still applies).
Both scores are per image, 1 for two empty maps, and averaged over images.

Two reference rows make the numbers readable: the **ceiling** (real images against their own maps: what
the extractor reaches at this resolution; 1 for canny by construction, below 1 for mask where the stored
map is the alpha but re-extraction sees only RGB) and **mismatched** (real images against other images'
maps, by a seeded derangement: chance level). Ceiling and generated images go through the same RGB
extractor, so they are scored alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from diffscaler.data.conditions import ConditionError, ConditionSpec

METRICS = {"canny": "edge_f1", "mask": "mask_iou"}  # what each kind is scored with


@dataclass(frozen=True)
class FidelityScore:
    metric: str  # edge_f1 (1-px tolerance) | mask_iou
    mean: float  # over images
    std: float  # over images (population)
    n: int  # images scored
    per_image: tuple[float, ...]  # in input order

    def to_json(self) -> dict:
        out = asdict(self)
        del out["per_image"]
        return out


def _binary(maps: np.ndarray) -> np.ndarray:
    """uint8 maps (N, H, W) or (N, 1, H, W) -> bool (N, H, W): on where > 127 (bool maps as they are)."""
    maps = np.asarray(maps)
    if maps.ndim == 4 and maps.shape[1] == 1:
        maps = maps[:, 0]
    if maps.ndim != 3:
        raise ConditionError(f"maps are {maps.shape}; expected (N, H, W) or (N, 1, H, W) single-channel maps")
    return maps if maps.dtype == bool else maps > 127


def _pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = _binary(pred), _binary(target)
    if p.shape != t.shape:
        raise ConditionError(
            f"extracted maps are {p.shape[1:]} x {len(p)}, given maps {t.shape[1:]} x {len(t)}: "
            "they must match image for image"
        )
    return p, t


def edge_f1(pred: np.ndarray, target: np.ndarray, tolerance: int = 1) -> np.ndarray:
    """Per-image F1 of edge maps with a `tolerance`-pixel match (Chebyshev distance): float64 (N,)."""
    p, t = _pair(pred, target)
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    near_t = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in t]) if len(t) else t
    near_p = np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in p]) if len(p) else p
    n_p, n_t = p.sum(axis=(1, 2)), t.sum(axis=(1, 2))
    precision = np.where(n_p > 0, (p & near_t).sum(axis=(1, 2)) / np.maximum(n_p, 1), 1.0)
    recall = np.where(n_t > 0, (t & near_p).sum(axis=(1, 2)) / np.maximum(n_t, 1), 1.0)
    total = precision + recall
    return np.where(total > 0, 2 * precision * recall / np.where(total > 0, total, 1), 0.0)


def mask_iou(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-image intersection over union of foreground maps: float64 (N,); 1 when both are empty."""
    p, t = _pair(pred, target)
    inter, union = (p & t).sum(axis=(1, 2)), (p | t).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def condition_fidelity(spec: ConditionSpec, images: np.ndarray, maps: np.ndarray) -> FidelityScore | None:
    """Score uint8 RGB `images` (N, H, W, 3) against the maps they were given (N, 1, H, W) with the task's
    extractor; None when the condition has no extractor here (key: maps). ConditionError on shapes that
    do not match image for image."""
    if not spec.has_extractor:
        return None
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise ConditionError(f"images are {images.dtype} {images.shape}; expected uint8 RGB (N, H, W, 3)")
    given = _binary(maps)
    if given.shape != images.shape[:3]:
        raise ConditionError(
            f"{len(images)} images of {images.shape[1]}x{images.shape[2]} px, but {len(given)} "
            f"maps of {given.shape[1]}x{given.shape[2]} px: one map per image, at the images' size"
        )
    extracted = spec.extract(images)
    scores = (edge_f1 if spec.kind == "canny" else mask_iou)(extracted, given)
    return FidelityScore(
        METRICS[spec.kind],
        float(scores.mean()) if len(scores) else float("nan"),
        float(scores.std()) if len(scores) else float("nan"),
        len(scores),
        tuple(float(s) for s in scores),
    )


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) with no fixed point (Sattolo's algorithm: one random cycle)."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    order = np.arange(n)
    rng = np.random.default_rng(seed)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(0, i))  # j < i: never stays in place
        order[i], order[j] = order[j], order[i]
    return order


def mismatched_fidelity(
    spec: ConditionSpec, images: np.ndarray, maps: np.ndarray, seed: int = 0
) -> FidelityScore | None:
    """Real images scored against other images' maps (image i against map derangement[i]): chance level."""
    return condition_fidelity(spec, images, np.asarray(maps)[derangement(len(maps), seed)])


def reference_rows(
    spec: ConditionSpec, images: np.ndarray, maps: np.ndarray, seed: int = 0
) -> dict[str, FidelityScore | None]:
    """{"ceiling": real images vs their own maps, "mismatched": vs a derangement of the maps}."""
    return {
        "ceiling": condition_fidelity(spec, images, maps),
        "mismatched": mismatched_fidelity(spec, images, maps, seed),
    }
