"""`diffscaler shards check DIR`: validate a shard folder completely; any problem -> non-zero exit.

Checks: index.json parses and has a supported format; every listed shard exists and is a whole tar
(truncation and header corruption are caught); samples are adjacent, in ascending key order, and
have `png` and `cls`; every PNG decodes to image_size x image_size RGB; every label is an integer
in [0, num_classes); `json` members parse; sample counts and class counts match the index; each
shard's content hash and the dataset's content hash match. Every problem names the file and, where
one is known, the sample key. Leftover temp files and unlisted shard files are reported as notes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from diffscaler.data import storage
from diffscaler.data.index import SPLITS, DatasetError, combine_hashes, load_index, sample_digest
from diffscaler.data.pngcodec import PngError, decode_png
from diffscaler.data.tarformat import ShardError, iter_raw_samples, missing_members, parse_label


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
    size, num_classes = index.image_size, index.num_classes
    shard_hashes: list[str] = []
    listed = set()
    for split in SPLITS:
        if split not in index.data["splits"]:
            report.problems.append(f"{index.url}/index.json: split {split!r} missing")
            continue
        class_counts = [0] * num_classes
        for shard in index.shards(split):
            listed.add(shard.name)
            report.num_shards += 1
            found, digest = _check_shard(shard.url, shard.num_samples, size, num_classes, class_counts, report)
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
    url: str, expected: int, size: int, num_classes: int, class_counts: list[int], report: CheckReport
) -> tuple[int, str]:
    """Read one shard fully; append problems; return (samples found, content hash)."""
    hasher = hashlib.sha256()
    found = 0
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        report.problems.append(f"{url}: missing (listed in index.json)")
        return 0, ""
    previous = ""
    try:
        for sample in iter_raw_samples(data, url):
            found += 1
            report.num_samples += 1
            sample_digest(hasher, sample.key, sample.members)
            where = f"{url}: sample {sample.key!r}"
            if sample.key <= previous:
                report.problems.append(f"{where}: key not in ascending order (after {previous!r})")
            previous = sample.key
            missing = missing_members(sample)
            if missing:
                report.problems.append(f"{where}: missing member(s) {', '.join('.' + m for m in missing)}")
            if "cls" in sample.members:
                try:
                    label = parse_label(sample, url)
                    if 0 <= label < num_classes:
                        class_counts[label] += 1
                    else:
                        report.problems.append(f"{where}: label {label} outside [0, {num_classes})")
                except ShardError as err:
                    report.problems.append(str(err))
            if "png" in sample.members:
                try:
                    image = decode_png(sample.members["png"])
                    if image.shape != (size, size, 3):
                        report.problems.append(f"{where}: image is {image.shape}, index says ({size}, {size}, 3)")
                except PngError as err:
                    report.problems.append(f"{where}: unreadable image: {err}")
            if "json" in sample.members:
                try:
                    json.loads(sample.members["json"])
                except (UnicodeDecodeError, json.JSONDecodeError) as err:
                    report.problems.append(f"{where}: json member does not parse: {err}")
    except ShardError as err:
        report.problems.append(f"{err} (after {found} of {expected} samples)")
    return found, hasher.hexdigest()
