"""`index.json`: what a shard folder holds. Written last, so a folder without it is not a dataset.

Version 1 (`diffscaler shards make`), keys sorted and no timestamps (reruns are byte-identical): format,
format_version, tool, the build parameters (source, source_detail, image_size, samples_per_shard,
eval_fraction, limit, seed), class_names, num_samples, skipped_inputs, per split {num_samples,
class_counts, shards: [{name, num_samples, sha256}]}, and content_hash. A shard's sha256 hashes its
samples' contents (key, then each member's extension and bytes, in order), content_hash the shard
hashes of all splits in order; `diffscaler shards check` verifies both.

Version 2 (`diffscaler shards index` over other tools' WebDatasets, and latent shards) adds `members`
(image and label members, label values, channels, resize); shard entries may carry `url` and
`excluded_keys`. A version-1 index reads as members {"image": "png", "label": "cls"}. Latent shards
(diffscaler.data.encode) add members flip and pixels and a `latent` block (shape, pixel image_size,
dtype, the VAE's identity). Either version may record `condition` ({kind, params}; null or absent when
unconditional) with members.condition and condition_channels; maps are at pixel resolution.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from diffscaler.data import storage
from diffscaler.data.conditions import ConditionSpec
from diffscaler.data.samples import IMAGE_EXTENSIONS, LATENT_EXTENSION, SampleFormat

INDEX_NAME = "index.json"
FORMAT_NAME = "diffscaler-shards"
FORMAT_VERSION = 1  # what `shards make` writes
FOREIGN_FORMAT_VERSION = 2  # what `shards index` writes
READ_VERSIONS = (FORMAT_VERSION, FOREIGN_FORMAT_VERSION)
SPLITS = ("train", "eval")


class DatasetError(ValueError):
    """A dataset folder that cannot be used; the message names the folder or file and the problem."""


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_digest(hasher: Any, key: str, members: dict[str, bytes]) -> None:
    """Feed one sample into a running sha256 (shared by the writer and `check`)."""
    hasher.update(key.encode() + b"\0")
    for ext in sorted(members):
        data = members[ext]
        hasher.update(ext.encode() + b"\0" + len(data).to_bytes(8, "big") + data)


def combine_hashes(shard_hashes: list[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(shard_hashes).encode()).hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    url: str  # full path or URL of the tar
    name: str  # base name, e.g. train-000000.tar
    num_samples: int  # samples in it
    sha256: str  # content hash of its samples
    first_sample: int  # position of its first sample within the split
    excluded_keys: frozenset[str] = frozenset()  # samples left out when indexing (not in num_samples)
    split: str = "train"  # the split this entry belongs to
    key_split_fraction: float = 0.0  # > 0: the shard serves both splits, a sample's key hash says which

    def skips(self, key: str) -> bool:
        """True for a sample this split does not read: excluded when indexing, or of the other split."""
        if key in self.excluded_keys:
            return True
        return self.key_split_fraction > 0 and in_eval_split(key, self.key_split_fraction) != (self.split == "eval")


def in_eval_split(key: str, fraction: float) -> bool:
    """The per-sample split of indexed shards: deterministic in the key alone (not its shard or position)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < fraction * 2**64


@dataclass(frozen=True)
class DatasetIndex:
    """A loaded and structurally validated index.json."""

    url: str  # dataset folder
    data: dict[str, Any]  # the JSON as loaded

    @property
    def image_size(self) -> int:
        return int(self.data["image_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.data["class_names"])

    @property
    def num_classes(self) -> int:
        return len(self.data["class_names"])

    @property
    def version(self) -> int:
        return int(self.data["format_version"])

    @property
    def sample_format(self) -> SampleFormat:
        """Which members hold image and label, and how they decode (version 1: png + cls)."""
        members = self.data.get("members", {})
        return SampleFormat(
            image_keys=tuple(members.get("image", "png").split(";")),
            label_key=members.get("label", "cls"),
            class_names=tuple(self.class_names),
            label_values=members.get("label_values", "index"),
            image_size=self.image_size,
            channels=int(members.get("channels", 3)),
            resize=bool(members.get("resize", False)),
            flip_key=members.get("flip", ""),
            pixels_key=members.get("pixels", ""),
            condition_key=members.get("condition", "") if self.data.get("condition") else "",
            condition_channels=int(members.get("condition_channels", 1)),
            condition_size=self.pixel_size,
        )

    @property
    def condition(self) -> ConditionSpec | None:
        """The spatial condition the samples carry (kind, extractor parameters, member, channels), or None."""
        return ConditionSpec.from_index(self.data)

    @property
    def channels(self) -> int:
        return self.sample_format.channels

    @property
    def latent(self) -> bool:
        return self.sample_format.latent

    @property
    def vae_hash(self) -> str:
        """The VAE identity hash latent shards were encoded with ("" for pixels or foreign latents)."""
        return str(self.data.get("latent", {}).get("vae", {}).get("hash", ""))

    @property
    def pixel_size(self) -> int:
        """Side of the images: image_size for pixel shards, the encoded images' side for VAE latents."""
        return int(self.data.get("latent", {}).get("image_size", self.image_size))

    @property
    def source(self) -> str:
        return str(self.data["source"])

    @property
    def content_hash(self) -> str:
        return str(self.data["content_hash"])

    @property
    def data_hash(self) -> str:
        """What a reader gets from this folder: the shards' content plus every index field that changes how
        they are read (members such as the image and label keys, size and resize, classes, condition, the
        splits with their shards and excluded samples). Fine-tunes, pretraining checkpoints and reference
        statistics are keyed on it: re-indexing the same shards with other labels changes it, not content_hash."""
        read = {
            k: self.data.get(k)
            for k in ("content_hash", "members", "image_size", "class_names", "condition", "latent", "eval_split")
        }
        read["splits"] = {
            split: [
                [e["name"], e.get("url", ""), e["num_samples"], sorted(e.get("excluded_keys", []))]
                for e in self._split(split)["shards"]
            ]
            for split in SPLITS
        }
        return "sha256:" + hashlib.sha256(json.dumps(read, sort_keys=True).encode()).hexdigest()

    def backbone_mismatch(self, in_channels: int, input_size: int, vae_hash: str = "") -> str:
        """Why a backbone taking in_channels x input_size x input_size inputs cannot train on (or be scored
        against) these shards, or "" when it can; `vae_hash` (a configured VAE's) must equal the shards' VAE."""
        have = (
            f"{self.channels}x{self.image_size}x{self.image_size} latents"
            if self.latent
            else f"{self.image_size}x{self.image_size} RGB images"
        )
        wants_latents = in_channels != 3
        takes = (
            f"{in_channels}x{input_size}x{input_size} latents"
            if wants_latents
            else f"{input_size}x{input_size} RGB images"
        )
        if wants_latents and not self.latent:
            return (
                f"shards at {self.url} hold {have}, the backbone takes {takes}: encode the images through its "
                "VAE (`diffscaler shards make --vae PATH --size N`, or data.vae=PATH in a pipeline)"
            )
        if self.latent and not wants_latents:
            return (
                f"shards at {self.url} hold {have}, the backbone takes {takes} (a pixel-space backbone): "
                "build pixel shards (no --vae / data.vae) or use a latent backbone"
            )
        if (self.channels if self.latent else 3, self.image_size) != (in_channels, input_size):
            hint = f" (images of {self.pixel_size}x{self.pixel_size} px)" if self.latent else ""
            return f"shards at {self.url} hold {have}{hint}, the backbone takes {takes}"
        if vae_hash and self.latent and self.vae_hash != vae_hash:
            theirs = self.vae_hash or "(unknown: not made by shards make --vae)"
            return f"shards at {self.url} were encoded with VAE {theirs}, data.vae is {vae_hash}; re-encode them"
        return ""

    def num_samples(self, split: str) -> int:
        return int(self._split(split)["num_samples"])

    @property
    def key_split_fraction(self) -> float:
        """The eval share of a per-sample split (index.json "eval_split": {"by": "key_hash", ...}), else 0."""
        rule = self.data.get("eval_split") or {}
        return float(rule.get("fraction", 0.0)) if rule.get("by") == "key_hash" else 0.0

    def shards(self, split: str) -> list[ShardInfo]:
        out, first = [], 0
        for entry in self._split(split)["shards"]:
            n = int(entry["num_samples"])
            url = entry.get("url") or storage.join(self.url, entry["name"])
            excluded = frozenset(entry.get("excluded_keys", ()))
            out.append(
                ShardInfo(url, entry["name"], n, entry["sha256"], first, excluded, split, self.key_split_fraction)
            )
            first += n
        return out

    def _split(self, split: str) -> dict[str, Any]:
        splits = self.data["splits"]
        if split not in splits:
            raise DatasetError(f"{self.url}: no split {split!r}; index has {sorted(splits)}")
        return splits[split]


def index_url(dataset_dir: str) -> str:
    return storage.join(dataset_dir, INDEX_NAME)


def encode_index(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def _validate(data: Any, where: str) -> None:
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise DatasetError(f"{where}: {what}")

    need(isinstance(data, dict), "not a JSON object")
    need(data.get("format") == FORMAT_NAME, f"format is {data.get('format')!r}, expected {FORMAT_NAME!r}")
    version = data.get("format_version")
    need(
        version in READ_VERSIONS,
        f"format_version {version!r} is not supported (this tool reads {', '.join(map(str, READ_VERSIONS))})",
    )
    for key in ("image_size", "class_names", "splits", "content_hash", "source"):
        need(key in data, f"missing field {key!r}")
    need(isinstance(data["image_size"], int) and data["image_size"] > 0, "image_size must be a positive int")
    need(isinstance(data["class_names"], list) and len(data["class_names"]) >= 1, "class_names is empty")
    for split, entry in data["splits"].items():
        need(isinstance(entry, dict) and isinstance(entry.get("shards"), list), f"split {split!r} has no shards list")
        total = 0
        for shard in entry["shards"]:
            need(
                isinstance(shard, dict) and {"name", "num_samples", "sha256"} <= set(shard),
                f"split {split!r}: shard entry {shard!r} lacks name/num_samples/sha256",
            )
            need("/" not in shard["name"], f"shard name {shard['name']!r} must be a base name")
            need(version > 1 or "url" not in shard, "shard entries of format_version 1 have no 'url'")
            total += int(shard["num_samples"])
        need(
            total == entry.get("num_samples"),
            f"split {split!r}: shard counts add up to {total}, num_samples says {entry.get('num_samples')}",
        )
    members = data.get("members", {})
    need(isinstance(members, dict), "members must be an object")
    for ext in str(members.get("image", "png")).split(";"):
        need(
            ext in IMAGE_EXTENSIONS + (LATENT_EXTENSION,),
            f"members.image {ext!r} is not one of {', '.join(IMAGE_EXTENSIONS + (LATENT_EXTENSION,))}",
        )
    condition = data.get("condition")
    if condition:
        need(
            isinstance(condition, dict)
            and isinstance(condition.get("kind"), str)
            and isinstance(condition.get("params", {}), dict),
            "condition must be {kind, params}",
        )
        need(
            isinstance(members.get("condition"), str) and bool(members["condition"]),
            "a condition needs members.condition (the member holding the map)",
        )
        need(members.get("condition_channels", 1) in (1, 3), "members.condition_channels must be 1 or 3")


def load_index(dataset_dir: str) -> DatasetIndex:
    """Read and validate `<dataset_dir>/index.json`; DatasetError names the file and the problem."""
    url = index_url(dataset_dir)
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise DatasetError(
            f"{url}: not found - not a shard folder, or `diffscaler shards make` did not finish "
            "(the index is written last)"
        ) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{url}: not valid JSON: {err}") from None
    _validate(data, url)
    return DatasetIndex(str(dataset_dir).rstrip("/") or str(dataset_dir), data)
