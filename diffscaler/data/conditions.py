"""Spatial condition maps: computed once at shard time (`canny`, `mask`) or read from the user's own
WebDataset shards (`key:<member>`), stored beside the image, and re-extracted from generated images.

    spec = ConditionSpec.from_config("canny", cfg.data)      # kind + extractor parameters (data.canny_*)
    cond = spec.compute(rgb, alpha)                          # uint8 (32, 32) in {0, 255} -> member cond.png
    spec.extract(generated_rgb)                              # the task's extractor on an RGB image (fidelity)

Computed maps are the 8-bit grey member `cond.png`, at pixel resolution also in latent shards; a `key:`
map stays in the user's member (grey: 1 channel, colour or palette: 3), cropped and resized like its
image, and has no extractor here. `canny` thresholds default to 100 / 200 with no blur: chosen by eye on
emoji and icons at 16-32 px, where 50 / 100 marks shading and a blur erases small parts. `mask` is the
alpha's foreground (a source without alpha is refused before any work); a generated image has no alpha,
so its mask, and the real-image ceiling's, is everything but the near-white region reaching the border.
index.json records the condition (diffscaler.data.index).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from diffscaler.config import CONDITION_KEY_PREFIX, CONDITION_KINDS, OPAQUE_SOURCES, DataConfig
from diffscaler.data.pngcodec import encode_png
from diffscaler.data.sources import centre_square, prepare_image_alpha

CONDITION_MEMBER = "cond.png"  # computed maps (canny, mask): 8-bit grey PNG beside the image
_ALPHA_PROBE = 8  # images of a source probed for an alpha channel before a `mask` build


class ConditionError(ValueError):
    """A condition that cannot be computed or read here; the message names the source, file or map."""


@dataclass(frozen=True)
class ConditionSpec:
    """One task's condition: its kind, the extractor's parameters, and how the map is stored."""

    kind: str  # canny | mask | key:<member>
    params: dict[str, float] = field(default_factory=dict)  # extractor parameters, as index.json records them
    member: str = CONDITION_MEMBER  # the shard member holding the map
    channels: int = 1  # of the stored map: 1 (grey) or 3 (RGB); a key: map's is found when indexing

    @classmethod
    def from_config(cls, kind: str, data: DataConfig) -> ConditionSpec | None:
        """The spec of TaskSpec.condition `kind` with data.*'s extractor parameters (None for "")."""
        if not kind:
            return None
        if kind == "canny":
            return cls(
                kind, {"low": float(data.canny_low), "high": float(data.canny_high), "blur": float(data.canny_blur)}
            )
        if kind == "mask":
            return cls(
                kind,
                {"alpha_threshold": int(data.mask_alpha_threshold), "white_threshold": int(data.mask_white_threshold)},
            )
        if kind.startswith(CONDITION_KEY_PREFIX) and len(kind) > len(CONDITION_KEY_PREFIX):
            return cls(kind, {}, member=kind[len(CONDITION_KEY_PREFIX) :], channels=0)
        raise ConditionError(
            f"{kind!r} is not a condition kind; allowed: {', '.join(CONDITION_KINDS)}, {CONDITION_KEY_PREFIX}<member>"
        )

    @classmethod
    def from_index(cls, data: dict[str, Any]) -> ConditionSpec | None:
        """The spec an index.json records (None for an unconditional dataset)."""
        record = data.get("condition")
        if not record:
            return None
        members = data.get("members", {})
        return cls(
            str(record["kind"]),
            dict(record.get("params", {})),
            str(members.get("condition", CONDITION_MEMBER)),
            int(members.get("condition_channels", 1)),
        )

    @property
    def computed(self) -> bool:
        """Computed from each image at shard time (canny, mask), not read from the user's shards."""
        return self.kind in CONDITION_KINDS

    @property
    def has_extractor(self) -> bool:
        """Whether the condition can be re-extracted from an RGB image (fidelity); not for key: maps."""
        return self.computed

    def record(self) -> dict[str, Any]:
        """index.json's build parameter `condition` (what a changed config must rebuild for)."""
        return {"kind": self.kind, "params": dict(sorted(self.params.items()))}

    def compute(self, rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
        """The map stored at shard time from prepare_image_alpha's output: uint8 (S, S) in {0, 255}."""
        if self.kind == "canny":
            return canny_edges(rgb, self.params["low"], self.params["high"], self.params["blur"])
        if self.kind == "mask":
            if alpha is None:
                raise ConditionError("the image has no alpha channel; condition mask is its alpha foreground")
            return alpha_mask(alpha, int(self.params["alpha_threshold"]))
        raise ConditionError(f"condition {self.kind} is read from the shards, not computed")

    def extract(self, rgb: np.ndarray) -> np.ndarray:
        """The task's extractor on uint8 RGB images (H, W, 3) or (N, H, W, 3): uint8 maps (.., H, W)."""
        if rgb.ndim == 4:
            return np.stack([self.extract(im) for im in rgb]) if len(rgb) else np.zeros(rgb.shape[:3], np.uint8)
        if self.kind == "canny":
            return canny_edges(rgb, self.params["low"], self.params["high"], self.params["blur"])
        if self.kind == "mask":
            return foreground_mask(rgb, int(self.params["white_threshold"]))
        raise ConditionError(f"condition {self.kind} has no extractor here (a map made by another tool)")


# ------------------------------------------------------------------------------------------------
# Extractors: uint8 RGB (H, W, 3) in, uint8 (H, W) in {0, 255} out
# ------------------------------------------------------------------------------------------------


def canny_edges(rgb: np.ndarray, low: float, high: float, blur: float = 0.0) -> np.ndarray:
    """OpenCV Canny edges of an RGB image (L2 gradient; Gaussian blur of sigma `blur` px first if > 0). On 3
    channels cv2 takes each pixel's strongest channel: edges between colours of equal brightness count."""
    image = np.ascontiguousarray(rgb, dtype=np.uint8)
    if blur > 0:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    return cv2.Canny(image, float(low), float(high), L2gradient=True)


def alpha_mask(alpha: np.ndarray, threshold: int) -> np.ndarray:
    """Foreground of a resized alpha channel: 255 where alpha >= threshold."""
    return np.where(alpha >= threshold, 255, 0).astype(np.uint8)


def foreground_mask(rgb: np.ndarray, white_threshold: int) -> np.ndarray:
    """The mask extractor for RGB images: everything but the near-white region connected to the border
    (4-connectivity), so white inside an outline (an eye, a highlight) stays foreground. Used alike for
    generated images and the real-image ceiling, so both are scored the same way."""
    near_white = (np.asarray(rgb) >= 255 - white_threshold).all(axis=-1).astype(np.uint8)  # (H, W)
    _count, labels = cv2.connectedComponents(near_white, connectivity=4)  # label 0 = not near-white
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = np.isin(labels, np.unique(edge[edge > 0]))
    return np.where(background, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Maps as stored and as the model takes them
# ------------------------------------------------------------------------------------------------


def encode_map(cond: np.ndarray) -> bytes:
    """uint8 (S, S) or (C, S, S) -> the cond.png member (deterministic 8-bit PNG: grey, or RGB for 3 channels)."""
    cond = np.asarray(cond, dtype=np.uint8)
    if cond.ndim == 3:
        cond = cond[0] if cond.shape[0] == 1 else cond.transpose(1, 2, 0)  # (S, S) or (S, S, 3)
    return encode_png(np.ascontiguousarray(cond))


def maps_to_unit(maps: np.ndarray) -> np.ndarray:
    """uint8 maps (..., C, S, S) -> float32 in [-1, 1] (0 -> -1, 255 -> 1), what the model takes."""
    out = maps.astype(np.float32)
    out /= 127.5  # exact at 0 and 255
    out -= 1.0
    return out


def open_map(ext: str, data: bytes) -> Image.Image:
    """A map member's bytes -> the PIL image as stored; ConditionError if Pillow cannot read it."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ConditionError(f"unreadable map .{ext}: {type(err).__name__}: {err}") from None
    return im


def decode_map(ext: str, data: bytes, channels: int) -> Image.Image:
    """A map member -> a PIL image of mode L (channels 1) or RGB/P (channels 3); ConditionError if unreadable."""
    return to_map_mode(open_map(ext, data), channels)


def map_channels(image: Image.Image) -> int:
    """1 for a grey map (8/16-bit, float, grey + alpha), 3 for colour and palette maps."""
    return 1 if image.mode in ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F") else 3


def to_map_mode(image: Image.Image, channels: int) -> Image.Image:
    """Mode L (1 channel; 16-bit and float maps scaled to 8 bits) or RGB / P (3 channels)."""
    if map_channels(image) == 1:
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            arr = np.asarray(image, dtype=np.float64)
            top = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
            image = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
        image = image.convert("L")
        return image if channels == 1 else image.convert("RGB")
    if channels == 1:
        raise ConditionError(f"a colour map (mode {image.mode}) where the index records grey (1-channel) maps")
    return image if image.mode == "P" else image.convert("RGB")


def prepare_map(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """A map image -> uint8 (channels, size, size), cropped and resized as prepare_image does the image
    (centre square, Lanczos; nearest for palette label maps)."""
    if image.size != (size, size):
        resample = Image.Resampling.NEAREST if image.mode == "P" else Image.Resampling.LANCZOS
        image = image.resize((size, size), resample, box=centre_square(*image.size), reducing_gap=3.0)
    if image.mode == "P":
        image = image.convert("RGB")
    arr = np.asarray(image, dtype=np.uint8)
    return arr[None].copy() if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def fit_map(image: Image.Image, size: int, channels: int) -> np.ndarray:
    """A user's map for a latent build: the same centre square as its image, resized with nearest neighbour
    (a label or depth map takes no value that is not in it) -> uint8 (size, size) or (size, size, 3)."""
    image = to_map_mode(image, channels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.NEAREST, box=centre_square(*image.size))
    if image.mode == "P":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8).copy()


def check_map_shape(maps: np.ndarray, channels: int, size: int, what: str) -> None:
    """Maps given for a task must be uint8 (N, channels, size, size): else ConditionError naming `what`."""
    want = (channels, size, size)
    if maps.ndim != 4 or tuple(maps.shape[1:]) != want:
        raise ConditionError(
            f"{what}: condition maps are {tuple(maps.shape)}, the task takes (N, {channels}, "
            f"{size}, {size}) ({channels} channel(s) at the images' {size}x{size} px)"
        )


# ------------------------------------------------------------------------------------------------
# Checks before any work
# ------------------------------------------------------------------------------------------------


def check_condition_source(spec: ConditionSpec | None, source: str, src: Any, catalog: Any) -> None:
    """A condition the shards stage can build for this image source, else ConditionError naming it:
    `key:` maps are read from WebDataset shards, not image sources; `mask` needs images with alpha (the
    first images of the catalog are probed; an opaque one later in the build is a bad input)."""
    if spec is None:
        return
    if not spec.computed:
        raise ConditionError(
            f"condition {spec.kind} reads the member {spec.member!r} of WebDataset shards, and source {source!r} is "
            f"an image source: index your shards with `diffscaler shards index DIR --condition {spec.kind}`"
        )
    if spec.kind != "mask":
        return
    if source in OPAQUE_SOURCES:
        raise ConditionError(f"condition mask is the alpha foreground, and source {source!r} has no alpha channel")
    probed = [item.ref for item in catalog.items[:_ALPHA_PROBE]]
    if not any(has_alpha(src.load(ref)) for ref in probed):
        raise ConditionError(
            f"condition mask is the alpha foreground, and source {source!r} has no alpha "
            f"channel (none of its first {len(probed)} images has one: {', '.join(probed[:3])}...)"
        )


def has_alpha(image: Image.Image) -> bool:
    """Whether prepare_image_alpha finds transparency in this image (RGBA, LA, PA, or a transparency key)."""
    return prepare_image_alpha(image, 1)[1] is not None


# ------------------------------------------------------------------------------------------------
# Maps given at sampling time (diffscaler sample --condition / --condition-maps)
# ------------------------------------------------------------------------------------------------


def adapter_condition(meta: dict[str, Any]) -> dict[str, Any] | None:
    """An adapter JSON's condition as sampling needs it: {kind, params, channels, size} (the shards'
    `condition_extractor` the fine-tune recorded, completed by the bank's own `condition` record), or None
    for an adapter of a task without maps."""
    path = meta.get("condition") or {}
    extractor = meta.get("condition_extractor") or path.get("extractor") or {}
    if not extractor and not path:
        return None
    out = {"kind": path.get("kind", ""), "params": {}, "channels": path.get("channels", 1), "size": path.get("size")}
    out.update({k: v for k, v in extractor.items() if v is not None})
    return out


def spec_from_record(record: dict[str, Any]) -> ConditionSpec:
    """The ConditionSpec an adapter's `condition_extractor` (kind, params, channels, size) describes."""
    kind = str(record["kind"])
    member = kind[len(CONDITION_KEY_PREFIX) :] if kind.startswith(CONDITION_KEY_PREFIX) else CONDITION_MEMBER
    return ConditionSpec(kind, dict(record.get("params", {})), member, int(record.get("channels", 1)))


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly in `folder`, sorted by name; ConditionError when there are none."""
    from diffscaler.data.sources import IMAGE_EXTENSIONS

    root = Path(folder)
    if not root.is_dir():
        raise ConditionError(f"{root}: not a folder")
    files = sorted(
        p
        for p in root.iterdir()
        if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS) and not p.name.startswith(".")
    )
    if not files:
        raise ConditionError(f"{root}: no image files ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")
    return files


def map_from_image(data: bytes, ext: str, spec: ConditionSpec, size: int) -> np.ndarray:
    """One ordinary image's map, extracted as the shards stage does (the same crop and resize to `size`, then
    the task's extractor): uint8 (1, size, size). ConditionError naming the problem."""
    if not spec.computed:
        raise ConditionError(
            f"condition {spec.kind} is a map made by another tool and has no extractor here: give a ready map"
        )
    rgb, alpha = prepare_image_alpha(open_map(ext, data), size)
    return spec.compute(rgb, alpha)[None]


def ready_map(data: bytes, ext: str, channels: int, size: int) -> np.ndarray:
    """One ready map as the task takes it: uint8 (channels, size, size). A map of another size or channel count
    is a ConditionError (maps are not resized: a map stands for one image of the task's size, pixel for pixel)."""
    image = open_map(ext, data)
    have = map_channels(image)
    if have != channels:
        raise ConditionError(
            f"a {have}-channel map (mode {image.mode}), the task takes {channels}-channel "
            f"maps ({'grey' if channels == 1 else 'colour'})"
        )
    if image.size != (size, size):
        raise ConditionError(
            f"a {image.size[0]}x{image.size[1]} map, the task takes {size}x{size} maps (its images' size)"
        )
    return prepare_map(to_map_mode(image, channels), size, channels)


def maps_from_images(folder: str | Path, spec: ConditionSpec, size: int, limit: int = 0) -> np.ndarray:
    """Maps extracted from a folder of ordinary images exactly as the shards stage does (the same crop and
    resize to `size`, then the task's extractor): uint8 (N, 1, size, size), files in name order."""
    if not spec.computed:
        raise ConditionError(
            f"condition {spec.kind} is a map made by another tool and has no extractor here: give "
            "ready maps (--condition-maps DIR)"
        )
    files = image_files(folder)[: limit or None]
    out = np.empty((len(files), 1, size, size), np.uint8)
    for i, f in enumerate(files):
        try:
            out[i] = map_from_image(f.read_bytes(), f.suffix.lstrip("."), spec, size)
        except ConditionError as err:
            raise ConditionError(f"{f}: {err}") from None
    return out


def maps_from_files(folder: str | Path, channels: int, size: int, limit: int = 0) -> np.ndarray:
    """Ready maps (one image file each, name order) as the task takes them: uint8 (N, channels, size, size).
    A map of another size or channel count is a ConditionError naming the file (see `ready_map`)."""
    files = image_files(folder)[: limit or None]
    out = np.empty((len(files), channels, size, size), np.uint8)
    for i, f in enumerate(files):
        try:
            out[i] = ready_map(f.read_bytes(), f.suffix.lstrip("."), channels, size)
        except ConditionError as err:
            raise ConditionError(f"{f}: {err}") from None
    return out


def batch_maps(per_task: Sequence[np.ndarray | None], per_sample_task: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Maps of a mixed batch: sample k of task t takes that task's map (its count so far) mod its number of
    maps; (maps uint8 (N, C_max, S, S), has_condition bool (N,)); rows of tasks without maps (None) get zeros
    and False, fewer channels are zero-padded (as MixedTaskReader does). ConditionError for mixed sizes."""
    given = [m for m in per_task if m is not None]
    if not given:
        raise ConditionError("no task of the batch has condition maps")
    sides = sorted({m.shape[2] for m in given})
    if len(sides) > 1:
        raise ConditionError(f"the conditional tasks take maps of different sizes {sides}; one batch holds one size")
    maps = np.zeros((len(per_sample_task), max(m.shape[1] for m in given), sides[0], sides[0]), np.uint8)
    has = np.zeros(len(per_sample_task), bool)
    seen = [0] * len(per_task)
    for k, t in enumerate(per_sample_task):
        task_maps = per_task[t]
        if task_maps is not None:
            maps[k, : task_maps.shape[1]] = task_maps[seen[t] % len(task_maps)]
            has[k] = True
        seen[t] += 1
    return maps, has
