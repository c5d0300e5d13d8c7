"""`diffscaler shards index`: make WebDataset shards written by other tools a dataset here.

    diffscaler shards index 's3://bucket/laion/{00000..00099}.tar' --out shards/laion --label-key none
    index_shards("/data/pets-wds", parallel=True)              # -> DatasetIndex (one Ray task per shard)

Each shard is read once through the webdataset library and every image (or npy latent) decoded, so the
index (format_version 2, diffscaler.data.index) can record counts, content hashes, classes, the image
size and which members hold image, label and condition map: every stage then uses the folder like our
own shards. Defaults: the image extensions found, `cls` labels when every sample has one (`json:FIELD`:
ints are class numbers, strings class names), shards named eval/val/test as the eval split. Bad input is
a DatasetError listing each fault by file and key, and no index is written; with `--skip-bad` the
samples are left out and recorded in `skipped_inputs`.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from webdataset import shardlists

from diffscaler.config import CONDITION_KEY_PREFIX, CONDITION_MAP_EXTENSIONS
from diffscaler.data import storage
from diffscaler.data.conditions import ConditionError, map_channels, open_map
from diffscaler.data.index import (
    FOREIGN_FORMAT_VERSION,
    FORMAT_NAME,
    INDEX_NAME,
    SPLITS,
    DatasetError,
    DatasetIndex,
    combine_hashes,
    encode_index,
    in_eval_split,
    load_index,
    sample_digest,
)
from diffscaler.data.samples import (
    IMAGE_EXTENSIONS,
    LATENT_EXTENSION,
    SampleError,
    ShardError,
    decode_latent,
    decode_rgb8,
    iter_samples,
    raw_label,
    url_scheme,
)
from diffscaler.data.writer import tool_version

_EVAL_NAME = re.compile(r"(?:^|[-_./])(?:eval|val|valid|validation|test)(?:[-_.]|\d|$)", re.IGNORECASE)
_MAX_LISTED = 20  # faults listed in a DatasetError (all are counted)


@dataclass
class ShardScan:
    """What one pass over one shard found (picklable: returned by Ray tasks)."""

    url: str
    name: str
    keys: list[str] = field(default_factory=list)  # every sample, in order
    image_ext: dict[str, str] = field(default_factory=dict)  # key -> image member used
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # key -> decoded shape
    labels: dict[str, Any] = field(default_factory=dict)  # key -> raw label (int / str / ...)
    without_cls: int = 0  # samples with no .cls member (auto label choice)
    bad: dict[str, str] = field(default_factory=dict)  # key -> reason
    sha256: str = ""  # content hash of all its samples (as `shards check` recomputes it)
    error: str = ""  # why the shard cannot be read to its end ("" = it can)
    error_key: str = ""  # the last sample read before that
    map_channels: dict[str, int] = field(default_factory=dict)  # key -> its condition map's channels (1 or 3)


def scan_shard(
    url: str, name: str, image_keys: Sequence[str], label_key: str | None, condition_key: str = ""
) -> ShardScan:
    """Read one shard through webdataset, decode every image (and condition map, when `condition_key`
    names one); label_key None = auto (cls if present)."""
    scan = ShardScan(url, name)
    hasher = hashlib.sha256()
    try:
        for sample in iter_samples(url):
            key = sample["__key__"]
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            sample_digest(hasher, key, members)
            scan.keys.append(key)
            exts = [e for e in (image_keys or (*IMAGE_EXTENSIONS, LATENT_EXTENSION)) if e in members]
            try:
                if not exts:
                    wanted = " / ".join("." + e for e in image_keys) if image_keys else "an image or .npy"
                    have = ", ".join("." + k for k in sorted(members)) or "nothing"
                    raise SampleError(f"missing member(s) {wanted} (has {have})")
                ext = exts[0]
                array = decode_latent(members[ext]) if ext == LATENT_EXTENSION else decode_rgb8(ext, members[ext])
                if condition_key:
                    scan.map_channels[key] = _scan_map(members, condition_key, array.shape, ext)
                scan.image_ext[key], scan.shapes[key] = ext, tuple(array.shape)
                if "cls" not in members:
                    scan.without_cls += 1
                if label_key is None:
                    if "cls" in members:
                        scan.labels[key] = raw_label(members, "cls")
                elif label_key:
                    scan.labels[key] = raw_label(members, label_key)
            except SampleError as err:
                scan.bad[key] = str(err)
    except ShardError as err:
        scan.error, scan.error_key = err.reason, err.key
    scan.sha256 = hasher.hexdigest()
    return scan


def _scan_map(members: dict[str, bytes], condition_key: str, image_shape: tuple[int, ...], image_ext: str) -> int:
    """The condition map's channels; SampleError when it is missing, unreadable or not its image's size."""
    if condition_key not in members:
        raise SampleError(f"missing member .{condition_key} (the condition map key:{condition_key})")
    if image_ext == LATENT_EXTENSION:
        raise SampleError(
            f"a key: condition map beside an npy latent: index the images, not latents (condition key:{condition_key})"
        )
    try:
        image = open_map(condition_key.rsplit(".", 1)[-1], members[condition_key])
    except ConditionError as err:
        raise SampleError(f".{condition_key}: {err}") from None
    height, width = image_shape[:2]
    if image.size != (width, height):
        raise SampleError(
            f"condition map .{condition_key} is {image.size[0]}x{image.size[1]} px, its image "
            f"{width}x{height}: a map must have its image's size"
        )
    return map_channels(image)


@dataclass
class ShardScans:
    """Every shard of a source scanned (scan_shard), with the label choice and class names made from them."""

    scans: list[ShardScan]
    label_key: str  # the label member used: cls | json:FIELD | "" (none: one unconditional class)
    class_names: list[str]
    label_values: str  # "index" (labels are class numbers) | "name" (entries of class_names)

    def label(self, scan: ShardScan, key: str) -> int:
        """The class number of a good sample."""
        value = scan.labels.get(key) if self.label_key else 0
        return self.class_names.index(str(value)) if self.label_values == "name" else int(value)

    def condition_channels(self) -> int:
        """Of the good samples' condition maps: 3 when any is colour (grey ones are then read as RGB), else 1."""
        good = [c for s in self.scans if not s.error for k, c in s.map_channels.items() if k not in s.bad]
        return max(good, default=1)

    def faults(
        self, source: str, skip_bad: bool, fix: str, log: Callable[[str], None], what: str
    ) -> list[tuple[str, str, str]]:
        """(url, key, reason) of each bad sample and unreadable shard; a DatasetError listing them by file and
        key unless `skip_bad` (then each is logged). `fix` says how to leave them out (a flag, a config key)."""
        faults = [(s.url, s.error_key, f"{s.error} (whole shard)") for s in self.scans if s.error]
        faults += [(s.url, k, r) for s in self.scans if not s.error for k, r in s.bad.items()]
        if faults and not skip_bad:
            listed = "\n  ".join(str(ShardError(*f)) for f in faults[:_MAX_LISTED])
            more = f"\n  ... and {len(faults) - _MAX_LISTED} more" if len(faults) > _MAX_LISTED else ""
            raise DatasetError(
                f"{source}: {len(faults)} bad sample(s) or shard(s); fix them or {fix} "
                f"to leave them out:\n  {listed}{more}"
            )
        for fault in faults:
            log(f"{what} {source}: skipped {ShardError(*fault)}")
        return faults


def scan_shards(
    source: str,
    urls: Sequence[str],
    image_keys: Sequence[str],
    label_key: str,
    condition_key: str = "",
    parallel: bool = False,
) -> ShardScans:
    """Scan each shard (one Ray task each with `parallel`), choose the label (label_key "" = cls when every
    sample has one, else none; "none"; "cls"; "json:FIELD") and name the classes; a sample whose label is no
    class is marked bad in its scan."""
    names = [shard_base_name(u) for u in urls]
    if len(set(names)) != len(names):
        raise DatasetError(f"{source}: shard names repeat ({[n for n, c in Counter(names).items() if c > 1][:3]})")
    wanted_label = None if not label_key else ("" if label_key == "none" else label_key)
    if parallel:
        import ray

        remote = ray.remote(num_cpus=1, max_retries=0)(scan_shard)
        scans = ray.get([remote.remote(u, n, image_keys, wanted_label, condition_key) for u, n in zip(urls, names)])
    else:
        scans = [scan_shard(u, n, image_keys, wanted_label, condition_key) for u, n in zip(urls, names)]

    # Label: what was asked, else cls when every decodable sample has one, else unconditional.
    if wanted_label is None:
        wanted_label = "cls" if all(s.without_cls == 0 for s in scans) else ""
    label_order = [(s, k) for s in scans for k in s.keys if k not in s.bad and not s.error]
    raw = [s.labels.get(k) for s, k in label_order] if wanted_label else []
    class_names, label_values, label_problems = (
        _class_names(raw, wanted_label) if wanted_label else (["unconditional"], "index", {})
    )
    for i, reason in label_problems.items():
        s, k = label_order[i]
        s.bad[k] = reason
    return ShardScans(list(scans), wanted_label, class_names, label_values)


def shard_urls(source: str) -> tuple[list[str], str | None]:
    """(shard URLs, the folder they are in or None): a folder's *.tar, or a brace pattern / URL list."""
    source = str(source)
    if not re.search(r"[{}]|::", source) and not source.endswith(".tar") and url_scheme(source) != "pipe":
        names = [n for n in storage.list_names(source) if n.endswith(".tar") and not n.startswith(".")]
        if not names:
            raise DatasetError(f"{source}: no .tar shards in this folder")
        return [storage.join(source, n) for n in names], source.rstrip("/") or source
    urls = shardlists.expand_urls(source)
    if not urls:
        raise DatasetError(f"{source}: the pattern names no shards")
    return urls, None


def shards_fingerprint(source: str) -> dict[str, object] | str:
    """Names, sizes and modification times of the shards `source` names (like a folder source's
    fingerprint): an index built by the shards stage records it, so rewritten or added shards re-index.
    "unavailable" when they cannot be listed (the index is then trusted as it is)."""
    try:
        urls, _ = shard_urls(source)
    except (DatasetError, OSError):
        return "unavailable"
    hasher = hashlib.sha256()
    for url in urls:
        if url_scheme(url) == "pipe":
            hasher.update(f"{url}\n".encode())  # a command: nothing to stat
            continue
        fs, path = storage.filesystem(url)
        try:
            info = fs.info(path)
        except OSError:
            return "unavailable"
        mtime = info.get("mtime", info.get("LastModified", info.get("last_modified", "")))
        hasher.update(f"{url}\t{info.get('size')}\t{mtime}\n".encode())
    return {"files": len(urls), "names_sizes_mtimes": "sha256:" + hasher.hexdigest()}


def shard_base_name(url: str) -> str:
    return re.split(r"[/\s]", url.rstrip("/"))[-1] or url


def _class_names(labels: list[Any], label_key: str) -> tuple[list[str], str, dict[int, str]]:
    """(class names, label_values, {position in labels: problem}) from the raw labels seen."""
    ints = [v for v in labels if isinstance(v, int) and not isinstance(v, bool)]
    strs = [v for v in labels if isinstance(v, str)]
    if strs and not ints:
        names = sorted(set(strs))
        return names, "name", {}
    problems = {
        i: (
            f"label {v!r} is not a class number"
            if not isinstance(v, int) or isinstance(v, bool)
            else f"label {v} is negative"
        )
        for i, v in enumerate(labels)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0
    }
    top = max((v for v in ints if v >= 0), default=0)
    return [str(c) for c in range(top + 1)], "index", problems


def index_shards(
    source: str,
    out: str | None = None,
    *,
    image_key: str = "",
    label_key: str = "",
    size: int = 0,
    eval_shards: int = 0,
    eval_fraction: float = 0.1,
    skip_bad: bool = False,
    parallel: bool = False,
    condition: str = "",
    record: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> DatasetIndex:
    """Scan the shards of `source`, write `<out>/index.json` (out defaults to the shards' folder);
    `record` adds top-level fields (the shards stage's build parameters).

    label_key: "" = auto (cls if every sample has one, else none), "cls", "json:FIELD" or "none".
    condition: "" or key:<member>, the member holding each sample's condition map.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    image_keys = tuple(k.lower() for k in image_key.split(";") if k)
    for ext in image_keys:
        if ext not in (*IMAGE_EXTENSIONS, LATENT_EXTENSION):
            raise ValueError(f"--image-key {ext!r} is not one of {', '.join((*IMAGE_EXTENSIONS, LATENT_EXTENSION))}")
    if image_keys and LATENT_EXTENSION in image_keys and len(image_keys) > 1:
        raise ValueError("--image-key npy (latents) cannot be mixed with image extensions")
    if label_key and label_key not in ("cls", "none") and not label_key.startswith("json:"):
        why = "; a txt member holds free text (captions), not a class label" if label_key == "txt" else ""
        raise ValueError(f"--label-key {label_key!r}: use cls, json:FIELD (a class number or name) or none{why}")
    if size < 0 or eval_shards < 0:
        raise ValueError(f"--size and --eval-shards must be >= 0, got {size}, {eval_shards}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    condition_key = condition_key_member(condition)
    urls, folder = shard_urls(source)
    out = out or folder
    if out is None:
        raise DatasetError(f"{source}: a shard pattern needs --out, the folder that gets index.json")
    log(f"shards index {source}: {len(urls)} shard(s){' on Ray, one task each' if parallel else ''}")
    found = scan_shards(source, urls, image_keys, label_key, condition_key, parallel)
    scans, wanted_label, class_names, label_values = found.scans, found.label_key, found.class_names, found.label_values
    names = [s.name for s in scans]

    # Image size and kind.
    kinds = Counter(ext for s in scans for k, ext in s.image_ext.items() if k not in s.bad)
    latent = LATENT_EXTENSION in kinds
    if latent and len(kinds) > 1:
        raise DatasetError(f"{source}: samples mix npy latents and images ({dict(kinds)}); pass --image-key")
    shapes = Counter(sh for s in scans for k, sh in s.shapes.items() if k not in s.bad and not s.error)
    if not shapes:
        raise DatasetError(f"{source}: no decodable sample in {len(urls)} shard(s)")
    if latent:
        shape = shapes.most_common(1)[0][0]
        channels, side = (shape[0], shape[1]) if shape[1] == shape[2] else (shape[2], shape[0])
        for s in scans:
            for k, sh in s.shapes.items():
                if sh not in ((channels, side, side), (side, side, channels)) and k not in s.bad:
                    s.bad[k] = f"latent is {sh}, most are ({channels}, {side}, {side})"
        image_size, resize = side, False
    else:
        channels = 3
        sides = {(sh[0], sh[1]) for sh in shapes}
        if size:
            image_size, resize = size, sides != {(size, size)}
        elif len(sides) == 1 and next(iter(sides))[0] == next(iter(sides))[1]:
            image_size, resize = next(iter(sides))[0], False
        else:
            seen = ", ".join(f"{w}x{h}" for h, w in sorted(sides)[:5])
            raise DatasetError(
                f"{source}: images are of sizes {seen}{'...' if len(sides) > 5 else ''}; "
                "pass --size N to resize them to N x N (short side, centre crop)"
            )

    faults = found.faults(source, skip_bad, "pass --skip-bad", log, "shards index")

    # Splits and entries.
    named_eval = [i for i, n in enumerate(names) if _EVAL_NAME.search(n.rsplit(".", 1)[0])]
    if named_eval:
        eval_at = set(named_eval)
    elif eval_shards:
        if eval_shards >= len(urls):
            raise DatasetError(f"{source}: --eval-shards {eval_shards} leaves no shard of {len(urls)} for training")
        eval_at = set(range(len(urls) - eval_shards, len(urls)))
    else:
        eval_at = set()
    # Without eval shards, a per-sample split by key hash (in_eval_split): each shard serves both splits.
    key_split = eval_fraction if not eval_at else 0.0
    splits: dict[str, Any] = {
        split: {"num_samples": 0, "class_counts": [0] * len(class_names), "shards": []} for split in SPLITS
    }
    for i, s in enumerate(scans):
        if s.error:
            continue  # left out whole (skip_bad)
        good = [k for k in s.keys if k not in s.bad]
        if key_split:
            parts = {sp: [k for k in good if in_eval_split(k, key_split) == (sp == "eval")] for sp in SPLITS}
        else:
            parts = {"eval" if i in eval_at else "train": good}
        for split_name, keys in parts.items():
            if key_split and not keys:
                continue
            split = splits[split_name]
            for k in keys:
                split["class_counts"][found.label(s, k)] += 1
            entry: dict[str, Any] = {"name": s.name, "num_samples": len(keys), "sha256": s.sha256}
            if s.url != storage.join(out, s.name):
                entry["url"] = s.url
            if s.bad:
                entry["excluded_keys"] = sorted(s.bad)
            split["shards"].append(entry)
            split["num_samples"] += len(keys)
    if splits["train"]["num_samples"] == 0:
        raise DatasetError(f"{source}: no usable training sample")
    members = {
        "image": ";".join(image_keys) if image_keys else ";".join(sorted(kinds, key=_ext_rank)),
        "label": wanted_label,
        "label_values": label_values,
        "channels": channels,
        "resize": resize,
    }
    if condition_key:  # one colour map makes them all 3-channel (grey maps are read as RGB then)
        members.update(condition=condition_key, condition_channels=found.condition_channels())
    index = {
        "format": FORMAT_NAME,
        "format_version": FOREIGN_FORMAT_VERSION,
        "tool": _tool(),
        "source": f"webdataset:{source}",
        "source_detail": f"{len(urls)} shard(s) indexed by `diffscaler shards index`",
        "image_size": image_size,
        "class_names": class_names,
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "members": members,
        "condition": {"kind": condition, "params": {}} if condition_key else None,
        "splits": splits,
        "eval_split": {"by": "key_hash", "fraction": key_split} if key_split else {"by": "shard"},
        "skipped_inputs": [
            {"ref": f"{url}: sample {key!r}" if key else url, "reason": reason} for url, key, reason in faults
        ],
        "content_hash": combine_hashes([e["sha256"] for sp in SPLITS for e in splits[sp]["shards"]]),
        **(record or {}),
    }
    storage.write_bytes_atomic(storage.join(out, INDEX_NAME), encode_index(index))
    counts = ", ".join(f"{sp} {splits[sp]['num_samples']}" for sp in SPLITS)
    what = f"image {members['image']} {image_size}x{image_size}{' (resized)' if resize else ''}"
    log(
        f"shards index {source}: {counts} samples, {len(class_names)} class(es), {what}, "
        f"label {wanted_label or 'none'} -> {out}"
    )
    return load_index(out)


def condition_key_member(condition: str) -> str:
    """The member a `key:<member>` condition names ("" for none); ValueError for any other condition."""
    if not condition:
        return ""
    member = condition[len(CONDITION_KEY_PREFIX) :] if condition.startswith(CONDITION_KEY_PREFIX) else ""
    if not member or member.rsplit(".", 1)[-1].lower() not in CONDITION_MAP_EXTENSIONS or "/" in member:
        raise ValueError(
            f"--condition {condition!r}: indexed shards carry their own maps, key:<member> with an "
            f"image member ({', '.join(CONDITION_MAP_EXTENSIONS)}), e.g. key:depth.png; canny and "
            "mask maps are computed by `diffscaler shards make --condition` from an image source"
        )
    return member


def _ext_rank(ext: str) -> int:
    order = (*IMAGE_EXTENSIONS, LATENT_EXTENSION)
    return order.index(ext) if ext in order else len(order)


def _tool() -> str:
    return tool_version()
