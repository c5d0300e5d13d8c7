"""Reference statistics of a dataset's eval split (cached), and FID / KID through torch-fidelity's code.

    ref = reference_stats("shards/emoji", cfg)            # computes once, then loads from the cache
    fid = fid_from_features(generated_features, ref)       # torch-fidelity's Fréchet distance
    kid_mean, kid_std = kid_from_features(generated_features, ref.features, subset_size=100)

The cache (cfg.eval.cache_dir) holds the reference *features* of the first `num_reference` eval
images, as safetensors; mu and sigma are derived from them on load exactly as torch-fidelity does
(`fid_features_to_statistics`, well under a second), and KID needs the features themselves anyway.
Why not torch-fidelity's own `cache_root=` / `input2_cache_name=`: it stores pickles (`.pt`) and
loads them with `weights_only=False`, and its key is only the name we give it. Ours is keyed by

    index.json content hash, feature network, its weights file hash, feature layer, number of
    reference images, image size, cache format version

so a rebuilt (changed) dataset, another feature network or other weights can never reuse stale
statistics: the key changes, the file name changes, and the key stored inside the file is checked
again on load.

Generated and reference images are compared at the same resolution: reference images are resized
to `image_size` (the model's input size) when the shards hold another size.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffscaler.atomic import atomic_path
from diffscaler.config import ExperimentConfig
from diffscaler.data.index import DatasetError, load_index
from diffscaler.data.reader import read_split
from diffscaler.torchvision_compat import import_torch_fidelity

STATS_FORMAT = "diffscaler-fid-reference"
STATS_FORMAT_VERSION = 1


class EvalInputError(ValueError):
    """Evaluation input that cannot work (files, tasks, counts); the message names the file or numbers."""


@dataclass(frozen=True)
class ReferenceStats:
    features: np.ndarray  # (N, D) float32, features of the first N eval images
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    feature_network: str  # e.g. efficientnet-lite0
    feature_layer: str  # torch-fidelity feature name, e.g. "1280"
    num_reference: int  # N
    dataset: str  # shard folder
    dataset_hash: str  # index.json content hash
    image_size: int  # side the reference images were compared at
    cache_path: str  # where they are cached ("" = not cached)


# ------------------------------------------------------------------------------------------------
# Metrics: torch-fidelity's own functions on feature arrays
# ------------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> dict[str, np.ndarray]:
    """(N, D) -> {"mu": (D,), "sigma": (D, D)} in float64, with torch-fidelity's `fid_features_to_statistics`."""
    import_torch_fidelity()
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features.ndim != 2 or len(features) < 2:
        raise EvalInputError(f"FID needs at least 2 feature vectors (N, D), got shape {features.shape}")
    return fid_features_to_statistics(torch.from_numpy(np.asarray(features, dtype=np.float64)))


def frechet_distance(stats_1: dict[str, np.ndarray], stats_2: dict[str, np.ndarray]) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), by torch-fidelity's `fid_statistics_to_metric`."""
    import_torch_fidelity()
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)[KEY_METRIC_FID])


def fid_from_features(features: np.ndarray, ref: ReferenceStats) -> float:
    return frechet_distance(feature_statistics(features), {"mu": ref.mu, "sigma": ref.sigma})


def kid_from_features(
    features: np.ndarray, ref_features: np.ndarray, subset_size: int, subsets: int = 100, seed: int = 2020
) -> tuple[float, float]:
    """KID (mean, std over `subsets` random subsets) by torch-fidelity's `kid_features_to_metric`.

    The subset size is capped at the smaller set (torch-fidelity would refuse otherwise).
    """
    import_torch_fidelity()
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = min(subset_size, len(features), len(ref_features))
    if size < 2:
        raise EvalInputError(f"KID needs at least 2 samples per set, got {len(features)} and {len(ref_features)}")
    out = kid_features_to_metric(
        torch.from_numpy(np.asarray(features, np.float64)),
        torch.from_numpy(np.asarray(ref_features, np.float64)),
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
    )
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


# ------------------------------------------------------------------------------------------------
# Reference images and the cache
# ------------------------------------------------------------------------------------------------


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, size, size, 3) with Pillow's antialiased bicubic (no-op when equal)."""
    if images.shape[1:3] == (size, size):
        return images
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BICUBIC)) for im in images])


@dataclass(frozen=True)
class ReferencePlan:
    """What one reference computation will use; the cache key derives from it."""

    dataset: str
    dataset_name: str
    dataset_hash: str
    available: int  # images in the eval split
    num_reference: int  # images used (first N in shard order)
    image_size: int
    feature_network: str
    feature_layer: str
    weights_hash: str
    cache_dir: str
    split: str = "eval"  # which split's images: eval (held out) or train

    def key(self) -> dict[str, object]:
        return {
            **({"split": self.split} if self.split != "eval" else {}),  # eval: the key of earlier caches
            "format": STATS_FORMAT,
            "format_version": STATS_FORMAT_VERSION,
            "dataset_hash": self.dataset_hash,
            "feature_network": self.feature_network,
            "feature_layer": self.feature_layer,
            "weights_hash": self.weights_hash,
            "num_reference": self.num_reference,
            "image_size": self.image_size,
        }

    @property
    def cache_path(self) -> str:
        if not self.cache_dir:
            return ""
        digest = hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.dataset_name)
        name = f"{safe}-{self.feature_network}-{self.feature_layer}-n{self.num_reference}-{self.image_size}px-{digest}"
        return os.path.join(self.cache_dir, name + ".safetensors")


def plan_reference(
    shards_dir: str,
    cfg: ExperimentConfig,
    num_reference: int | None = None,
    image_size: int | None = None,
    split: str | None = None,
) -> ReferencePlan:
    """Check the dataset and the requested count; EvalInputError names the folder and the numbers.
    `split` defaults to eval.reference_split."""
    from diffscaler.eval.features import FEATURE_LAYER, resolve_weights_path, weights_file_hash

    try:
        index = load_index(shards_dir)
        split = split or cfg.eval.reference_split
        available = index.num_samples(split)
    except DatasetError as err:
        raise EvalInputError(f"reference dataset: {err}") from None
    want = cfg.eval.num_reference if num_reference is None else num_reference
    if want < 0:
        raise EvalInputError(f"num_reference must be >= 0 (0 = the whole split), got {want}")
    if available < 2:
        raise EvalInputError(f"{shards_dir}: {split} split has {available} image(s); FID needs at least 2 references")
    # eval.num_reference is a cap (at most that many): a smaller split gives all it has, and the plan says so.
    network = cfg.eval.feature_network
    weights = resolve_weights_path(network, cfg.eval.feature_weights_path)
    return ReferencePlan(
        dataset=str(shards_dir),
        dataset_name=os.path.basename(str(shards_dir).rstrip("/")) or "dataset",
        dataset_hash=index.data_hash,
        available=available,
        num_reference=min(want, available) if want else available,
        image_size=image_size or cfg.model.input_size,
        feature_network=network,
        feature_layer=FEATURE_LAYER[network],
        weights_hash=weights_file_hash(weights),
        cache_dir=cfg.eval.cache_dir,
        split=split,
    )


def load_reference_images(plan: ReferencePlan) -> np.ndarray:
    """The first `num_reference` images of the plan's split, uint8 (N, S, S, 3) at the plan's image size."""
    # pixels: latent shards made through a VAE give the original images, never decoded reconstructions
    images, _labels = read_split(plan.dataset, plan.split, limit=plan.num_reference, pixels=True)
    return resize_images(images, plan.image_size)


def _stats_from_features(plan: ReferencePlan, features: np.ndarray, path: str) -> ReferenceStats:
    stats = feature_statistics(features)
    return ReferenceStats(
        features=features,
        mu=stats["mu"],
        sigma=stats["sigma"],
        feature_network=plan.feature_network,
        feature_layer=plan.feature_layer,
        num_reference=len(features),
        dataset=plan.dataset,
        dataset_hash=plan.dataset_hash,
        image_size=plan.image_size,
        cache_path=path,
    )


def load_cached(plan: ReferencePlan) -> ReferenceStats | None:
    """The cached reference for this plan, or None; a file whose stored key differs is ignored."""
    from safetensors import safe_open

    path = plan.cache_path
    if not path or not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="np") as f:
            stored = json.loads((f.metadata() or {}).get("key", "{}"))
            features = f.get_tensor("features")
    except Exception:  # a truncated or foreign file: recompute (it is rewritten atomically)
        return None
    if stored != json.loads(json.dumps(plan.key())) or features.shape[0] != plan.num_reference:
        return None
    return _stats_from_features(plan, features.astype(np.float32), path)


def save_cached(plan: ReferencePlan, features: np.ndarray) -> str:
    """Write the features atomically (temp file, then rename); returns the path ("" = no cache dir)."""
    from safetensors.numpy import save_file

    path = plan.cache_path
    if not path:
        return ""
    meta = {"key": json.dumps(plan.key(), sort_keys=True), "dataset": plan.dataset}
    with atomic_path(path) as tmp:
        save_file({"features": np.ascontiguousarray(features, dtype=np.float32)}, str(tmp), metadata=meta)
    return path


FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 (N, H, W, 3) -> float32 (N, D)


def compute_reference(plan: ReferencePlan, extract: FeatureFn) -> ReferenceStats:
    """Cache hit, or read the images, extract features with `extract`, cache them."""
    cached = load_cached(plan)
    if cached is not None:
        return cached
    features = extract(load_reference_images(plan))
    if features.shape[0] != plan.num_reference:
        raise RuntimeError(f"feature extraction returned {features.shape[0]} rows for {plan.num_reference} images")
    return cache_reference(plan, features)


def cache_reference(plan: ReferencePlan, features: np.ndarray) -> ReferenceStats:
    """Save a plan's reference features (N, D) to its cache file and return their statistics."""
    return _stats_from_features(plan, features, save_cached(plan, features))


def reference_stats(
    shards_dir: str,
    cfg: ExperimentConfig,
    num_reference: int | None = None,
    image_size: int | None = None,
    batch_size: int | None = None,
) -> ReferenceStats:
    """Reference statistics computed in this process (no Ray): cached, keyed as the module docstring says."""
    from diffscaler.eval.features import build_feature_extractor, extract_features

    plan = plan_reference(shards_dir, cfg, num_reference, image_size)
    state: dict[str, object] = {}

    def extract(images: np.ndarray) -> np.ndarray:
        if "net" not in state:  # only built on a cache miss
            state["net"] = build_feature_extractor(cfg.eval.feature_network, cfg.eval.feature_weights_path)
        return extract_features(state["net"], images, batch_size or cfg.eval.batch_size)  # type: ignore[arg-type]

    return compute_reference(plan, extract)


def describe(ref: ReferenceStats) -> str:
    return (
        f"{Path(ref.dataset).name}: {ref.num_reference} reference images at {ref.image_size}px, "
        f"{ref.feature_network} features ({ref.feature_layer}-d)"
    )


def nearest_centroid_accuracy(features: np.ndarray, centroids: np.ndarray, own: int) -> float:
    """Share of `features` (N, D) whose nearest centroid (K, D), by Euclidean distance, is row `own`."""
    d2 = (features**2).sum(1, keepdims=True) - 2.0 * features @ centroids.T + (centroids**2).sum(1)  # (N, K)
    return float(np.mean(np.argmin(d2, axis=1) == own))
