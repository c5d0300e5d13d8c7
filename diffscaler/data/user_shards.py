"""Users' own WebDataset shards as the image source of a latent build (a `webdataset:` target with data.vae).

    found = scan_user_shards("/data/rooms-wds", label_key="none", condition="key:depth.png", eval_fraction=0.1)
    found.train, found.evals                 # SourceItems (ref "<shard name>/<key>", class number), shard order
    found.source.load(ref)                   # the sample's image (PIL), as a folder source's load gives it
    found.source.load_map(ref)               # its condition map (PIL), the member key:<member> names

encode_shards (diffscaler.data.encode) reads them as it reads a folder: the scan here reads every shard once
through the webdataset library (indexer.scan_shard: each image and map decoded, labels read, a map missing
or of another size than its image named by shard and key), then the encoding actors read the samples again.
The eval split is the indexer's per-sample one, by key hash (index.in_eval_split), and the order is the
shards' own: an actor reads one shard at a time and keeps only that shard's image and map members.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image

from diffscaler.data.index import DatasetError, in_eval_split
from diffscaler.data.indexer import condition_key_member, scan_shards, shard_base_name, shard_urls
from diffscaler.data.samples import IMAGE_EXTENSIONS, iter_samples
from diffscaler.data.sources import SourceItem

SKIP_HINT = "set data.skip_bad_samples=true (shards make: --skip-bad)"  # how bad samples are left out


@dataclass(frozen=True)
class UserShardSource:
    """Reads samples of users' shards by ref "<shard name>/<key>" (picklable: built once, sent to the actors)."""

    spec: str  # the shards: a folder of *.tar, a brace pattern or URL (what follows webdataset:)
    urls: tuple[str, ...]  # each shard, as shard_urls listed it when the build began
    image_keys: tuple[str, ...]  # image members tried in order (the first present is the image)
    condition_member: str = ""  # the map's member ("" = none)

    @property
    def detail(self) -> str:
        return f"{self.spec} ({len(self.urls)} WebDataset shard(s))"

    def load(self, ref: str) -> Image.Image:
        members = self._members(ref)
        ext = next(e for e in self.image_keys if e in members)
        return _open(members[ext])

    def load_map(self, ref: str) -> Image.Image:
        members = self._members(ref)
        if self.condition_member not in members:
            raise KeyError(f"missing member .{self.condition_member} (the condition map)")
        return _open(members[self.condition_member])

    def _members(self, ref: str) -> dict[str, bytes]:
        name, key = ref.split("/", 1)  # a shard name has no "/" (shard_base_name); a key may
        url = next(u for u in self.urls if shard_base_name(u) == name)
        samples = _shard_members(url, (*self.image_keys, *([self.condition_member] if self.condition_member else [])))
        if key not in samples:
            raise KeyError(f"sample {key!r} is no longer in {url} (the shard changed since it was scanned)")
        return samples[key]


_HELD: dict[str, dict[str, dict[str, bytes]]] = {}  # per process: the last shard read, {key: {member: bytes}}


def _shard_members(url: str, wanted: tuple[str, ...]) -> dict[str, dict[str, bytes]]:
    """The wanted members of every sample of one shard; only the last shard read stays in memory (the samples
    arrive in shard order, so each actor reads a shard about once)."""
    if url not in _HELD:
        _HELD.clear()
        _HELD[url] = {s["__key__"]: {e: s[e] for e in wanted if e in s} for s in iter_samples(url, check_end=False)}
    return _HELD[url]


def _open(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im


@dataclass
class UserShards:
    """What a scan of users' shards found: the samples to encode, split, and the ones left out."""

    source: UserShardSource
    class_names: tuple[str, ...]
    train: list[SourceItem]
    evals: list[SourceItem]
    total: int  # samples in the shards, good or not
    condition_channels: int = 1  # of the maps: 1 grey, 3 colour (one colour map makes them all RGB)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"ref", "reason"} of each sample left out


def scan_user_shards(
    spec: str,
    *,
    image_key: str = "",
    label_key: str = "",
    condition: str = "",
    eval_fraction: float = 0.1,
    limit: int = 0,
    skip_bad: bool = False,
    parallel: bool = False,
    log: Callable[[str], None] | None = None,
) -> UserShards:
    """Scan the shards `spec` names (one Ray task each with `parallel`). A bad sample - no image, a missing,
    unreadable or wrongly sized map, a label that is no class - or an unreadable shard is a DatasetError
    naming shard and key, unless `skip_bad` (then left out and listed in `skipped`). `limit` keeps the first
    that many good samples in shard order (0 = all); the eval split takes keys by hash (in_eval_split)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    image_keys = tuple(k.lower() for k in image_key.split(";") if k) or IMAGE_EXTENSIONS
    for ext in image_keys:
        if ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image_key {ext!r}: a latent build encodes images, one of {', '.join(IMAGE_EXTENSIONS)}")
    if label_key and label_key not in ("cls", "none") and not label_key.startswith("json:"):
        raise ValueError(f"label_key {label_key!r}: use cls, json:FIELD (a class number or name) or none")
    member = condition_key_member(condition)  # ValueError for anything but key:<image member>
    urls, _folder = shard_urls(spec)
    found = scan_shards(spec, urls, image_keys, label_key, member, parallel)
    faults = found.faults(spec, skip_bad, SKIP_HINT, log, "shards make")
    good = [(s, k) for s in found.scans if not s.error for k in s.keys if k not in s.bad]
    items = [SourceItem(f"{s.name}/{k}", found.label(s, k)) for s, k in good]
    if not items:
        raise DatasetError(f"{spec}: no usable sample in {len(urls)} shard(s)")
    if limit:
        items = items[:limit]
    evals = [i for i in items if in_eval_split(i.ref.split("/", 1)[1], eval_fraction)]
    train = [i for i in items if not in_eval_split(i.ref.split("/", 1)[1], eval_fraction)]
    return UserShards(
        UserShardSource(spec, tuple(urls), image_keys, member),
        tuple(found.class_names),
        train,
        evals,
        sum(len(s.keys) for s in found.scans),
        found.condition_channels() if member else 1,
        [{"ref": f"{url}: sample {key!r}" if key else url, "reason": reason} for url, key, reason in faults],
    )
