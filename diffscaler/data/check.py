"""`diffscaler shards check DIR`: validate a shard folder completely; any problem -> non-zero exit.

Checks: index.json parses and has a supported format; every listed shard exists and reads to its end
through the webdataset library (truncation and header corruption are caught); every sample has its
image and label members (index.json's `members`: `png` + `cls` for our own shards); every image
decodes to image_size x image_size RGB (latents: to channels x size x size); a conditional dataset's
condition map decodes, at its image's size; every label is a class of the index; `json` members parse;
sample counts and class counts match the index; each shard's content hash and the dataset's content
hash match. Our own shards (format_version 1) must also hold their samples in ascending key order.
Every problem names the file and, where one is known, the sample key.
Leftover temp files and unlisted shard files are reported as notes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from diffscaler.data import storage
from diffscaler.data.index import SPLITS, DatasetError, ShardInfo, combine_hashes, load_index, sample_digest
from diffscaler.data.samples import (
    LATENT_EXTENSION,
    SampleError,
    SampleFormat,
    ShardError,
    decode_rgb8,
    iter_samples,
)


@dataclass
class CheckReport:
    dataset: str  # folder or URL checked
    problems: list[str] = field(default_factory=list)  # each names a file and, if known, a sample key
    notes: list[str] = field(default_factory=list)  # harmless findings (leftover temp files)
    num_samples: int = 0  # samples read from all shards
    num_shards: int = 0  # shard files opened
    content_hash: str = ""  # recomputed from the shards

    @property
    def ok(self) -> bool:
        return not self.problems


def check_dataset(dataset_dir: str) -> CheckReport:
    report = CheckReport(str(dataset_dir))
    try:
        index = load_index(dataset_dir)
    except DatasetError as err:
        report.problems.append(str(err))
        return report
    fmt, ordered = index.sample_format, index.version == 1
    shard_hashes: list[str] = []
    listed = set()
    for split in SPLITS:
        if split not in index.data["splits"]:
            report.problems.append(f"{index.url}/index.json: split {split!r} missing")
            continue
        class_counts = [0] * index.num_classes
        for shard in index.shards(split):
            listed.add(shard.name)
            report.num_shards += 1
            found, digest = _check_shard(shard, fmt, ordered, class_counts, report)
            shard_hashes.append(digest)
            if found != shard.num_samples:
                report.problems.append(f"{shard.url}: has {found} samples, index.json says {shard.num_samples}")
            elif digest != shard.sha256:
                report.problems.append(f"{shard.url}: content hash {digest[:16]}... differs from index.json")
        expected_counts = index.data["splits"][split].get("class_counts")
        if expected_counts is not None and expected_counts != class_counts:
            report.problems.append(
                f"{index.url}/index.json: split {split!r} class_counts {expected_counts} but shards hold {class_counts}"
            )
    report.content_hash = combine_hashes(shard_hashes)
    if report.content_hash != index.content_hash:
        report.problems.append(
            f"{index.url}/index.json: content_hash {index.content_hash} but the shards hash to {report.content_hash}"
        )
    for name in storage.list_names(index.url):
        if storage.TEMP_MARK in name:
            report.notes.append(f"{storage.join(index.url, name)}: temp file left by an interrupted write")
        elif name.endswith(".tar") and name not in listed:
            report.notes.append(f"{storage.join(index.url, name)}: shard not listed in index.json (ignored)")
    return report


def _check_shard(
    shard: ShardInfo, fmt: SampleFormat, ordered: bool, class_counts: list[int], report: CheckReport
) -> tuple[int, str]:
    """Read one shard fully; append problems; return (samples counted, content hash of all samples)."""
    hasher = hashlib.sha256()
    found = 0
    previous = ""
    url = shard.url
    try:
        for sample in iter_samples(url):
            key = sample["__key__"]
            members = {k: v for k, v in sample.items() if not k.startswith("__")}
            sample_digest(hasher, key, members)
            report.num_samples += not (shard.skips(key) and key not in shard.excluded_keys)  # not the other split's
            where = f"{url}: sample {key!r}"
            if ordered and key <= previous:
                report.problems.append(f"{where}: key not in ascending order (after {previous!r})")
            previous = key
            if shard.skips(key):
                continue  # known bad, left out by `shards index --skip-bad`, or of the other split
            found += 1
            try:
                label = fmt.label(sample)
                class_counts[label] += 1
            except SampleError as err:
                report.problems.append(f"{where}: {err}")
            try:
                ext, data = fmt.image_member(sample)
                fmt.decode_image(ext, data)
                if fmt.condition_key:  # the map decodes, at its image's size
                    fmt.decode_condition(sample, None if ext == LATENT_EXTENSION else decode_rgb8(ext, data).shape[:2])
            except SampleError as err:
                report.problems.append(f"{where}: {err}")
            if "json" in sample:
                try:
                    json.loads(sample["json"])
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    report.problems.append(f"{where}: json member does not parse: {err}")
    except ShardError as err:
        if not err.key and "missing" in err.reason:
            report.problems.append(f"{url}: missing (listed in index.json)")
            return 0, ""
        report.problems.append(f"{err} (after {found} of {shard.num_samples} samples)")
    return found, hasher.hexdigest()
