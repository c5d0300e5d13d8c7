"""Build a shard folder from an image source: `make_shards` and the `ShardWriter` it uses.

    diffscaler shards make --source emoji --out shards/emoji
    diffscaler shards make --source folder:/data/pets --out s3://bucket/shards/pets --size 64
    make_shards("openclipart", "shards/openclipart", limit=2200, workers=2)

Order of writes, so an interrupted run never looks complete: the old index.json is removed first;
each shard is written to a temp name and renamed; shards left over from an earlier, larger build
are removed; index.json is written last (also temp + rename).

Determinism: the catalog is sorted, the subset and split are seeded hash orders, the PNG encoder
and tar headers are fixed, decode processes return results in input order, and the index has no
timestamps - the same inputs give byte-identical shards and the same content hash.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import diffscaler
from diffscaler.data import storage
from diffscaler.data.conditions import ConditionError, ConditionSpec, check_condition_source, encode_map
from diffscaler.data.index import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    SPLITS,
    DatasetError,
    DatasetIndex,
    combine_hashes,
    encode_index,
    index_url,
    load_index,
    sample_digest,
    shard_name,
)
from diffscaler.data.pngcodec import encode_png
from diffscaler.data.sources import (
    UNLISTABLE,
    ImageSource,
    SourceItem,
    get_source,
    prepare_image_alpha,
    select_balanced,
    source_fingerprint,
    split_train_eval,
)
from diffscaler.data.tarformat import RawSample, write_tar

_SHARD_FILE = re.compile(r"^(train|eval)-\d{6}\.tar$")


class ShardWriter:
    """Collects one split's samples and writes `<split>-NNNNNN.tar` files (temp name, then rename).

    `add` takes the members of one sample; `close` flushes the last shard and returns the index
    entries `{"name", "num_samples", "sha256"}` in order.
    """

    def __init__(self, out_dir: str, split: str, samples_per_shard: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir, self.split, self.samples_per_shard = out_dir, split, samples_per_shard
        self.entries: list[dict[str, Any]] = []
        self._pending: list[RawSample] = []

    def add(self, key: str, members: dict[str, bytes]) -> None:
        self._pending.append(RawSample(key, dict(members)))
        if len(self._pending) == self.samples_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        hasher = hashlib.sha256()
        for sample in self._pending:
            sample_digest(hasher, sample.key, sample.members)
        name = shard_name(self.split, len(self.entries))
        storage.write_bytes_atomic(storage.join(self.out_dir, name), write_tar(self._pending))
        self.entries.append({"name": name, "num_samples": len(self._pending), "sha256": hasher.hexdigest()})
        self._pending = []

    def close(self) -> list[dict[str, Any]]:
        self._flush()
        return self.entries


def _decode_item(job: tuple[ImageSource, str, int, ConditionSpec | None]) -> tuple[bytes | None, bytes | None, str]:
    """(source, ref, size, condition) -> (PNG bytes, condition map PNG bytes or None, "") or (None, None,
    reason). Runs in decode worker processes."""
    source, ref, size, condition = job
    try:
        rgb, alpha = prepare_image_alpha(source.load(ref), size)
        cond = encode_map(condition.compute(rgb, alpha)) if condition is not None else None
        return encode_png(rgb), cond, ""
    except Exception as err:  # any decoder failure is reported with the input's name
        return None, None, f"{type(err).__name__}: {err}"


def _decoded(
    source: ImageSource, items: list[SourceItem], size: int, workers: int, condition: ConditionSpec | None = None
) -> Iterator[tuple[bytes | None, bytes | None, str]]:
    jobs = ((source, item.ref, size, condition) for item in items)
    if workers <= 1 or len(items) < 64:
        yield from map(_decode_item, jobs)
        return
    # imap keeps input order, so the output does not depend on which process finished first.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_decode_item, jobs, chunksize=16)


def tool_version() -> str:
    # The package attribute first; the installed metadata when `diffscaler` resolves as a namespace
    # package (seen with the editable install when the interpreter starts outside the checkout).
    version = getattr(diffscaler, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("diffscaler")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    return f"diffscaler {version}"


def build_parameters(
    source: str,
    size: int,
    samples_per_shard: int,
    eval_fraction: float,
    limit: int,
    seed: int,
    condition: ConditionSpec | None = None,
    *,
    source_files: dict[str, object] | str | None = None,
) -> dict[str, Any]:
    """The inputs that determine a build; equal parameters + same tool version = same shards. The
    condition is null for an unconditional build (an index of earlier versions has none: the same);
    `source_files` fingerprints a folder source's files (null for bundled packages; given: users' shards')."""
    return {
        "condition": condition.record() if condition is not None else None,
        "source": source,
        "source_files": source_files if source_files is not None else source_fingerprint(source),
        "image_size": size,
        "samples_per_shard": samples_per_shard,
        "eval_fraction": eval_fraction,
        "limit": limit,
        "seed": seed,
        "tool": tool_version(),
    }


def condition_members(condition: ConditionSpec | None) -> dict[str, Any]:
    """index.json's `members` entries that say where a computed map is ({} for an unconditional build)."""
    if condition is None:
        return {}
    return {"members": {"condition": condition.member, "condition_channels": condition.channels}}


def is_up_to_date(out: str, params: dict[str, Any]) -> bool:
    """True when `out` holds a complete build (index present) made with exactly these parameters."""
    return not build_changes(out, params)


def build_changes(out: str, params: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """What differs between the build at `out` and these parameters (but `ignore`), in words ([] = up to date)."""
    try:
        index = load_index(out)
    except DatasetError:
        return ["no complete build"]
    changes = []
    for key, wanted in params.items():
        built = index.data.get(key)
        if built == wanted or key in ignore or (key == "source_files" and wanted == UNLISTABLE):
            continue
        if key == "source_files" and isinstance(built, dict) and isinstance(wanted, dict):
            then, now = built.get("files"), wanted.get("files")
            changes.append(
                f"the files of {params['source']} changed since the build (names, sizes or mtimes of its images; "
                f"{then} files then, {now} now)"
            )
        else:
            changes.append(f"{key} built={built!r} config={wanted!r}")
    return changes


def open_source(source: str):
    """(source, its catalog) for a spec, or the error `shards make` reports: ValueError for an unknown
    name, SourceMissingError (which package to install), FileNotFoundError, DatasetError when empty."""
    src = get_source(source)
    catalog = src.catalog()
    if not catalog.items:
        raise DatasetError(f"source {source!r} ({src.detail}): no images found - empty dataset")
    return src, catalog


def open_and_select(source: str, condition, limit: int, seed: int, eval_fraction: float):
    """(source, catalog, selected, train, eval) for `shards make`, pixel or latent: the source opened, checked
    to give `condition` before anything is written, its images chosen per class and split."""
    src, catalog = open_source(source)
    try:
        check_condition_source(condition, source, src, catalog)
    except ConditionError as err:
        raise DatasetError(f"source {source!r}: {err}") from None
    selected = select_balanced(catalog, limit, seed)
    train, evals = split_train_eval(selected, eval_fraction, seed)
    return src, catalog, selected, train, evals


def make_shards(
    source: str,
    out: str,
    *,
    size: int = 32,
    samples_per_shard: int = 1000,
    eval_fraction: float = 0.1,
    limit: int = 0,
    seed: int = 0,
    workers: int = 1,
    skip_bad: bool = False,
    condition: ConditionSpec | None = None,
    log: Callable[[str], None] | None = None,
) -> DatasetIndex:
    """Decode `source` (bundled name or folder:PATH), write shards + index.json to `out` (folder or URL).
    With `condition` (canny or mask) each sample also gets its map as the member `cond.png`.

    Raises SourceMissingError (which package to install), DatasetError (empty source, a condition the
    source cannot give, an input that cannot be decoded - unless `skip_bad`, which records it in the
    index's skipped_inputs).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if size < 1:
        raise ValueError(f"--size must be >= 1, got {size}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if limit < 0:
        raise ValueError(f"--limit must be >= 0 (0 = all), got {limit}")
    params = build_parameters(source, size, samples_per_shard, eval_fraction, limit, seed, condition)  # before reading
    src, catalog, selected, train, evals = open_and_select(source, condition, limit, seed, eval_fraction)
    with_map = f", condition {condition.kind} -> {condition.member}" if condition is not None else ""
    log(
        f"shards make {source}: {len(selected)} of {len(catalog.items)} images, {len(catalog.class_names)} "
        f"classes -> train {len(train)}, eval {len(evals)} at {size}x{size} px{with_map} -> {out}"
    )

    storage.remove(index_url(out))  # from here on the folder does not look complete
    splits: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    for split, items in zip(SPLITS, (train, evals)):
        writer = ShardWriter(out, split, samples_per_shard)
        class_counts = [0] * len(catalog.class_names)
        position = 0
        for item, (png, cond, reason) in zip(items, _decoded(src, items, size, workers, condition)):
            if png is None:
                if not skip_bad:
                    raise DatasetError(f"source {source!r}: input {item.ref!r} cannot be decoded: {reason}")
                skipped.append({"ref": item.ref, "reason": reason})
                log(f"shards make {source}: skipped {item.ref!r}: {reason}")
                continue
            meta = {"id": item.ref, "class": catalog.class_names[item.label]}
            members = {
                "cls": str(item.label).encode(),
                "json": json.dumps(meta, sort_keys=True).encode(),
                "png": png,
                **({condition.member: cond} if cond is not None else {}),
            }
            writer.add(f"{position:08d}", members)
            class_counts[item.label] += 1
            position += 1
            if position % samples_per_shard == 0:
                log(f"shards make {source}: {split} {position}/{len(items)}")
        entries = writer.close()
        splits[split] = {"num_samples": position, "class_counts": class_counts, "shards": entries}
    if splits["train"]["num_samples"] == 0:
        raise DatasetError(f"source {source!r}: no decodable images ({len(skipped)} skipped) - empty dataset")

    keep = {e["name"] for s in splits.values() for e in s["shards"]}
    for name in storage.list_names(out):
        if _SHARD_FILE.match(name) and name not in keep:
            storage.remove(storage.join(out, name))  # a shard from an earlier, larger build

    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **params,
        **condition_members(condition),
        "source_detail": src.detail,
        "class_names": list(catalog.class_names),
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "splits": splits,
        "skipped_inputs": skipped,
        "content_hash": combine_hashes([e["sha256"] for split in SPLITS for e in splits[split]["shards"]]),
    }
    storage.write_bytes_atomic(storage.join(out, INDEX_NAME), encode_index(index))
    log(f"shards make {source}: wrote {len(keep)} shards, {index['num_samples']} samples, {index['content_hash']}")
    return load_index(out)
