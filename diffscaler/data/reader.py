"""Readers that feed training and evaluation from a shard folder (local path or fsspec URL).

    reader = ShardReader("shards/openclipart", "train", batch_size=16, rank=r, world_size=w, seed=0)
    for batch in reader.stream(start_step=k): ...   # infinite; step k = epoch k // n, batch k % n
    mixed = MixedTaskReader.from_dirs([("shards/emoji", 0), ("shards/icons", 1)], batch_size=32)
    images, labels = read_split("shards/emoji", "eval")   # uint8 (N, H, W, 3), int64 (N,): FID refs

Batches are a pure function of (seed, epoch, rank, world_size, batch_size, shuffle_buffer), never of
loader workers or timing (`epoch_chunks`), so a resumed run sees exactly the batches an uninterrupted one
would. Why not `wds.split_by_node` or Ray Data `read_webdataset`: both split whole shards, so ranks get
unequal counts when shards do not divide evenly (a rank with none hangs the collective), and neither
resumes mid-epoch. Reading itself goes through the webdataset library (diffscaler.data.samples), so any
WebDataset `diffscaler shards index` has indexed reads like our own. Speeds: bench/RESULTS.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffscaler.data.conditions import CONDITION_MEMBER, maps_to_unit
from diffscaler.data.index import DatasetError, DatasetIndex, load_index
from diffscaler.data.pngcodec import PngError, decode_png_batch
from diffscaler.data.samples import SampleError, SampleFormat, ShardError, iter_samples

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
_BATCH_KEYS = ("image", "label", "task_id", "condition", "has_condition")  # what a batch holds (see above)
_MAX_MESSAGES = 100  # skipped-sample messages kept on the reader (the count is always exact)


def _seed_int(*parts: Any) -> int:
    """A stable 64-bit seed from any parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


@dataclass(frozen=True)
class Segment:
    shard: int  # index into the split's shard list
    lo: int  # first sample position inside the shard
    hi: int  # one past the last


@dataclass(frozen=True)
class Chunk:
    first_batch: int  # batch index (within the epoch) of the chunk's first batch
    num_batches: int
    segments: tuple[Segment, ...]  # where its samples lie, in sequence order
    perm_seed: int  # seeds the permutation of its samples (0 = keep order)


@dataclass(frozen=True)
class _Bad:
    url: str
    key: str
    reason: str

    def message(self) -> str:
        return str(ShardError(self.url, self.key, self.reason))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return sorted(range(num_shards), key=lambda i: _seed_int(seed, "shards", epoch, i))


def epoch_chunks(
    shard_counts: Sequence[int],
    *,
    epoch: int,
    seed: int,
    rank: int,
    world_size: int,
    batch_size: int,
    shuffle_buffer: int,
    shuffle: bool = True,
) -> list[Chunk]:
    """The rank's chunks for one epoch; identical on every machine.

    The split's shards, in a seeded order per epoch, form one sequence of N samples. Rank r takes
    [r * (N // W), r * (N // W) + n * B) with n = (N // W) // B: every rank gets exactly n full batches
    (up to W * B tail samples left out, different ones each epoch). That range is cut into chunks of
    ceil(shuffle_buffer / B) batches, each an exact seeded permutation; flips are drawn per batch from
    (seed, epoch, rank, batch). Loader workers take chunks round-robin and the main process restores step
    order; resuming at step k decodes nothing before it."""
    total = sum(shard_counts)
    per_rank = total // world_size
    num_batches = per_rank // batch_size
    order = shard_order(len(shard_counts), seed, epoch, shuffle)
    starts = []  # global start position of each shard in this epoch's sequence
    position = 0
    for s in order:
        starts.append((s, position))
        position += shard_counts[s]
    batches_per_chunk = max(1, math.ceil(shuffle_buffer / batch_size)) if shuffle else max(1, 4096 // batch_size)
    chunks = []
    rank_start = rank * per_rank
    for first in range(0, num_batches, batches_per_chunk):
        n = min(batches_per_chunk, num_batches - first)
        lo, hi = rank_start + first * batch_size, rank_start + (first + n) * batch_size
        segments = tuple(
            Segment(s, max(lo, start) - start, min(hi, start + shard_counts[s]) - start)
            for s, start in starts
            if start < hi and start + shard_counts[s] > lo
        )
        perm_seed = _seed_int(seed, "chunk", epoch, rank, first) if shuffle else 0
        chunks.append(Chunk(first, n, segments, perm_seed))
    return chunks


class _ChunkDecoder:
    """Turns chunks into decoded batches; runs in the main process or in DataLoader workers."""

    def __init__(
        self,
        shard_urls,
        shard_counts,
        skips,
        fmt: SampleFormat,
        batch_size,
        seed,
        rank,
        hflip,
        task_id,
        skip_bad,
        fast_png,
    ):
        self.shard_urls, self.shard_counts, self.skips = list(shard_urls), list(shard_counts), list(skips)
        self.fmt, self.fast_png = fmt, fast_png and fmt.image_keys[0] == "png"
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        self.hflip, self.task_id, self.skip_bad = hflip, task_id, skip_bad
        self.flip_pairs = hflip and fmt.latent and bool(fmt.flip_key)  # latents of both flips are stored
        self.conditional = bool(fmt.condition_key)  # samples carry a condition map

    def _segment_items(self, segment: Segment) -> list[Any]:
        """The segment's samples (raw member bytes, not decoded); _Bad for each one that cannot be read."""
        url = self.shard_urls[segment.shard]
        skips = self.skips[segment.shard]  # ShardInfo.skips: excluded when indexing, or of the other split
        want = segment.hi - segment.lo
        items: list[Any] = []
        position = 0
        last_key = ""
        try:
            for sample in iter_samples(url, check_end=False):
                if position >= segment.hi:
                    break
                last_key = sample["__key__"]
                if skips(last_key):
                    continue  # not counted in this split's index.json entry
                if position >= segment.lo:
                    items.append(sample)
                position += 1
        except ShardError as err:
            if not err.key and not last_key:
                reason = f"{err.reason} (listed in index.json)"
            else:
                reason = f"{err.reason} (sample lost: shard unreadable after key {last_key!r})"
            items.extend([_Bad(url, err.key or last_key, reason)] * (want - len(items)))
            return items
        if len(items) < want:
            expected = self.shard_counts[segment.shard]
            reason = f"shard ends after {position} samples, index.json says {expected} (sample lost)"
            items.extend([_Bad(url, last_key, reason)] * (want - len(items)))
        return items

    def chunk_batches(
        self, chunk: Chunk, epoch: int, skip_before: int = 0, step_offset: int = 0
    ) -> Iterator[dict[str, Any]]:
        """Batches of one chunk as dicts with `step` (step_offset + batch index in the epoch); batches
        with index < skip_before are not decoded."""
        if chunk.first_batch + chunk.num_batches <= skip_before:
            return
        items: list[Any] = []
        for segment in chunk.segments:
            items.extend(self._segment_items(segment))
        if chunk.perm_seed:
            random.Random(chunk.perm_seed).shuffle(items)
        size = self.batch_size
        for b in range(chunk.num_batches):
            index = chunk.first_batch + b
            if index < skip_before:
                continue
            # Replacements for bad samples (skip_bad): the chunk's other samples, from the next batch on.
            spares = (items[j % len(items)] for j in range((b + 1) * size, b * size + len(items)))
            batch = self._decode(items[b * size : (b + 1) * size], spares, epoch, index)
            batch["step"] = step_offset + index
            yield batch

    def _decode_one(self, item: Any) -> tuple[np.ndarray, int, np.ndarray | None] | _Bad:
        """(image or latent (pair), label, condition map uint8 (C, S, S) or None), or _Bad."""
        if isinstance(item, _Bad):
            return item
        try:
            if self.flip_pairs:
                pair, label = self.fmt.decode_flip_pair(item)
                return pair, label, self.fmt.decode_condition(item) if self.conditional else None
            if self.conditional:
                return self.fmt.decode_with_condition(item)
            return (*self.fmt.decode(item), None)
        except SampleError as err:
            return _Bad(item["__url__"], item["__key__"], str(err))

    def _fast_png(self, items: list[Any]) -> list[tuple[np.ndarray, int, np.ndarray | None]] | None:
        """The measured exception (bench/RESULTS.md): a batch whose images are all `png` decodes in one
        vectorised call of pngcodec instead of Pillow per image. None when it does not apply or any
        sample fails; the caller then decodes each sample through the library and names the culprit.
        Condition maps: see _fast_maps."""
        size, fmt = self.fmt.image_size, self.fmt
        try:
            blobs = [item["png"] for item in items]  # KeyError: a _Bad, or a sample without png
            labels = [fmt.label(item) for item in items]
            decoded = decode_png_batch(blobs)
            if not isinstance(decoded, np.ndarray) or decoded.shape[1:] != (size, size, 3):
                return None
            conds = self._fast_maps(items) if self.conditional else [None] * len(items)
        except (KeyError, TypeError, SampleError, PngError):
            return None
        return list(zip(decoded, labels, conds))

    def _fast_maps(self, items: list[Any]) -> list[np.ndarray]:
        """Condition maps of a fast batch: our own grey cond.png maps in one pngcodec call (they are the
        image's size by construction), any other map through decode_condition (Pillow, size check, resize)."""
        fmt = self.fmt
        if fmt.condition_key == CONDITION_MEMBER and fmt.condition_channels == 1 and not fmt.resize:
            maps = decode_png_batch([item[fmt.condition_key] for item in items], grey=True)
            side = fmt.condition_size or fmt.image_size
            if isinstance(maps, np.ndarray) and maps.shape[1:] == (side, side):
                return list(maps[:, None])  # (C=1, S, S) each
        return [fmt.decode_condition(item) for item in items]

    def _decode(self, items: list[Any], spares: Iterator[Any], epoch: int, index: int) -> dict[str, Any]:
        fast = self.fast_png and self._fast_png(items)
        if fast:
            return self._batch(fast, [], epoch, index)
        results = [self._decode_one(item) for item in items]
        bad = [r for r in results if isinstance(r, _Bad)]
        if bad and not self.skip_bad:
            return {"error": bad[0]}
        good = [r for r in results if not isinstance(r, _Bad)]
        # Keep the batch full (every rank, every step, same shapes): fill with the chunk's next good
        # samples. The dropped ones are counted and reported, never silently lost.
        for spare in spares if bad else ():
            if len(good) == len(items):
                break
            result = self._decode_one(spare)
            if not isinstance(result, _Bad):
                good.append(result)
        if len(good) < len(items):
            return {
                "error": _Bad(
                    bad[0].url,
                    bad[0].key,
                    f"{bad[0].reason}; and too few good samples "
                    f"left in this chunk of epoch {epoch} to fill batch {index}",
                )
            }
        return self._batch(good, bad, epoch, index)

    def _batch(
        self, good: list[tuple[np.ndarray, int, np.ndarray | None]], bad: list[_Bad], epoch: int, index: int
    ) -> dict[str, Any]:
        arrays, labels = np.stack([g[0] for g in good]), [g[1] for g in good]
        conds = np.stack([g[2] for g in good]) if self.conditional else None  # (B, C_cond, S, S) uint8
        if self.flip_pairs:  # (B, 2, C, H, W): the stored latent of the flipped image where a flip is drawn
            flip = np.random.default_rng(_seed_int(self.seed, "flip", epoch, self.rank, index)).random(len(arrays))
            arrays = np.ascontiguousarray(arrays[np.arange(len(arrays)), (flip < 0.5).astype(np.int64)])
        elif self.hflip:
            flip = np.random.default_rng(_seed_int(self.seed, "flip", epoch, self.rank, index)).random(len(arrays))
            arrays = arrays.copy()
            arrays[flip < 0.5] = arrays[flip < 0.5, ..., ::-1] if self.fmt.latent else arrays[flip < 0.5, :, ::-1]
        if conds is not None and self.hflip:  # the map follows its image: mirrored in pixel space, exactly
            conds[flip < 0.5] = conds[flip < 0.5, ..., ::-1]
        if self.fmt.latent:
            chw = arrays  # (B, C, H, W) float32 as stored
        else:
            # Scale in numpy: torch's element-wise ops spin up intra-op threads, which on a busy 2-core
            # machine cost 15x more than this (measured: ~98 vs ~6 us per 32x32 image).
            chw = arrays.transpose(0, 3, 1, 2).astype(np.float32, order="C")  # (B, 3, H, W), contiguous
            chw /= 127.5  # exact at 0 and 255, so the range is exactly [-1, 1]
            chw -= 1.0
        out = {
            "image": torch.from_numpy(chw),  # (B, C, H, W) float32: images in [-1, 1], latents as stored
            "label": torch.tensor(labels, dtype=torch.int64),  # (B,)
            "task_id": torch.full((len(labels),), self.task_id, dtype=torch.int64),  # (B,)
            "skipped": [b.message() for b in bad],
            "skipped_urls": [b.url for b in bad],
        }
        if conds is not None:
            out["condition"] = torch.from_numpy(maps_to_unit(conds))  # (B, C_cond, S, S) float32 in [-1, 1]
            out["has_condition"] = torch.ones(len(labels), dtype=torch.bool)  # (B,)
        return out


@dataclass(frozen=True)
class _Plan:
    """Everything that fixes which samples form which batch: a pure function, cheap to ship to workers."""

    shard_counts: tuple[int, ...]
    seed: int
    rank: int
    world_size: int
    batch_size: int
    shuffle_buffer: int
    shuffle: bool
    batches_per_epoch: int

    def chunks(self, epoch: int) -> list[Chunk]:
        return epoch_chunks(
            self.shard_counts,
            epoch=epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            shuffle=self.shuffle,
        )

    def sequence(self, start_step: int, stop_step: int | None) -> Iterator[tuple[int, Chunk]]:
        """(epoch, chunk) holding steps start_step .. stop_step - 1 (None = endless), in order."""
        n = self.batches_per_epoch
        epoch = start_step // n
        while stop_step is None or epoch * n < stop_step:
            for chunk in self.chunks(epoch):
                first = epoch * n + chunk.first_batch
                if stop_step is not None and first >= stop_step:
                    return
                if first + chunk.num_batches > start_step:
                    yield epoch, chunk
            epoch += 1


class _WorkerBatches(torch.utils.data.IterableDataset):
    """DataLoader side: worker k of K decodes chunks k, k + K, ... of the plan's chunk sequence.

    The workers live as long as the iteration: an endless `stream()` keeps them across epochs.
    """

    def __init__(self, decoder: _ChunkDecoder, plan: _Plan, start_step: int, stop_step: int | None):
        super().__init__()
        self.decoder, self.plan, self.start_step, self.stop_step = decoder, plan, start_step, stop_step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        n = self.plan.batches_per_epoch
        for position, (epoch, chunk) in enumerate(self.plan.sequence(self.start_step, self.stop_step)):
            if position % workers == worker:
                yield from self.decoder.chunk_batches(chunk, epoch, self.start_step - epoch * n, epoch * n)


class ShardReader:
    """One split of one shard folder, for one rank of `world_size` (pass Ray Train's rank explicitly:
    nothing here reads RANK / WORLD_SIZE).

    A batch is {"image": float32 (B, 3, H, W) in [-1, 1] (latent shards: (B, C, H, W) as stored),
    "label": int64 (B,), "task_id": int64 (B,)}; a conditional dataset adds "condition" float32
    (B, C_cond, S, S) in [-1, 1] at pixel side S, flipped with its image, and "has_condition" bool (B,).
    Bad samples (corrupt tar, missing member, undecodable image, unknown label, short shard) raise
    ShardError naming file and key; with `skip_bad` they are dropped, counted in `skipped` and the batch
    is filled from the chunk's next good samples."""

    def __init__(
        self,
        dataset_dir: str,
        split: str = "train",
        batch_size: int = 32,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        hflip: bool = True,
        task_id: int = 0,
        skip_bad: bool = False,
        loader_workers: int = 0,
        shuffle_buffer: int = 1000,
        shuffle: bool = True,
        fast_png: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size < 1 or loader_workers < 0 or shuffle_buffer < 0:
            raise ValueError(
                f"need batch_size >= 1, loader_workers >= 0, shuffle_buffer >= 0; got "
                f"{batch_size}, {loader_workers}, {shuffle_buffer}"
            )
        self.index: DatasetIndex = load_index(dataset_dir)
        self.split, self.batch_size, self.rank, self.world_size = split, batch_size, rank, world_size
        self.seed, self.loader_workers, self.shuffle_buffer, self.shuffle = (
            seed,
            loader_workers,
            shuffle_buffer,
            shuffle,
        )
        self.task_id = task_id
        shards = self.index.shards(split)
        self.shard_counts = [s.num_samples for s in shards]
        self.num_samples = sum(self.shard_counts)
        self.batches_per_epoch = (self.num_samples // world_size) // batch_size
        if self.batches_per_epoch == 0:
            raise DatasetError(
                f"{self.index.url}: split {split!r} has {self.num_samples} samples in {len(shards)} shard(s); "
                f"{world_size} rank(s) x batch {batch_size} needs at least {world_size * batch_size}"
            )
        readers = world_size * max(1, loader_workers)
        if len(shards) < readers:
            warnings.warn(
                f"{self.index.url}: split {split!r} has {len(shards)} shard(s) ({shards[0].name}...) for "
                f"{readers} readers ({world_size} rank(s) x {max(1, loader_workers)} worker(s)); samples are "
                "assigned per sample so every rank still gets disjoint, equal batches, but readers re-read "
                "shared shards - rebuild with a smaller --samples-per-shard for throughput",
                stacklevel=2,
            )
        self._plan = _Plan(
            tuple(self.shard_counts),
            seed,
            rank,
            world_size,
            batch_size,
            shuffle_buffer,
            shuffle,
            self.batches_per_epoch,
        )
        self._decoder = _ChunkDecoder(
            [s.url for s in shards],
            self.shard_counts,
            [s.skips for s in shards],
            self.index.sample_format,
            batch_size,
            seed,
            rank,
            hflip,
            task_id,
            skip_bad,
            fast_png,
        )
        self.skipped = 0  # bad samples dropped so far (skip_bad=True)
        self.skipped_files: dict[str, int] = {}  # {shard url: bad samples dropped from it}
        self.skipped_messages: list[str] = []  # the first _MAX_MESSAGES of them, with file and key

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    @property
    def image_size(self) -> int:
        return self.index.image_size

    def chunks(self, epoch: int) -> list[Chunk]:
        return self._plan.chunks(epoch)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Batches start_batch .. batches_per_epoch - 1 of `epoch`, in order."""
        n = self.batches_per_epoch
        yield from self._batches(epoch * n + start_batch, (epoch + 1) * n)

    def stream(self, start_step: int = 0) -> Iterator[Batch]:
        """Endless batches for steps start_step, start_step + 1, ...; step k is batch k % n of epoch k // n."""
        yield from self._batches(start_step, None)

    def _batches(self, start_step: int, stop_step: int | None) -> Iterator[Batch]:
        n = self.batches_per_epoch
        if self.loader_workers == 0:
            for epoch, chunk in self._plan.sequence(start_step, stop_step):
                for raw in self._decoder.chunk_batches(chunk, epoch, start_step - epoch * n, epoch * n):
                    yield self._finish(raw)
            return
        workers = self.loader_workers
        if stop_step is not None:  # no idle worker processes for a short range
            workers = min(workers, sum(1 for _ in self._plan.sequence(start_step, stop_step)))
        loader = torch.utils.data.DataLoader(
            _WorkerBatches(self._decoder, self._plan, start_step, stop_step), batch_size=None, num_workers=workers
        )
        # Workers deliver round-robin by chunk; hand batches out in step order.
        waiting: dict[int, dict[str, Any]] = {}
        expected = start_step
        for raw in loader:
            if "error" in raw:
                self._finish(raw)  # raises ShardError
            waiting[raw["step"]] = raw
            while expected in waiting:
                yield self._finish(waiting.pop(expected))
                expected += 1
        if stop_step is not None and expected != stop_step:
            raise RuntimeError(f"reader lost batches: got steps up to {expected}, expected {stop_step}")

    def _finish(self, raw: dict[str, Any]) -> Batch:
        if "error" in raw:
            bad = raw["error"]
            raise ShardError(bad.url, bad.key, bad.reason)
        for message, url in zip(raw["skipped"], raw["skipped_urls"], strict=True):
            self.skipped += 1
            self.skipped_files[url] = self.skipped_files.get(url, 0) + 1
            if len(self.skipped_messages) < _MAX_MESSAGES:
                self.skipped_messages.append(message)
            log.warning("skipped bad sample (%d so far): %s", self.skipped, message)
        return {k: raw[k] for k in _BATCH_KEYS if k in raw}


class MixedTaskReader:
    """Several datasets in every batch, each sample carrying its task id (mixed-task fine-tuning).

    Each task's reader keeps its own epochs and seed; step k concatenates step k of every reader,
    so resuming at step k is exact here too. With one conditional task the batch has "condition" and
    "has_condition": other tasks' rows get zeros and False, narrower maps zero channels.
    """

    def __init__(self, readers: Sequence[ShardReader]):
        if not readers:
            raise ValueError("MixedTaskReader needs at least one reader")
        self.readers = list(readers)

    @classmethod
    def from_dirs(
        cls, tasks: Sequence[tuple[str, int]], batch_size: int, split: str = "train", **reader_kwargs: Any
    ) -> MixedTaskReader:
        """`tasks` = [(dataset_dir, task_id), ...]; batch_size is split as evenly as possible."""
        if batch_size < len(tasks):
            raise ValueError(f"batch_size {batch_size} is smaller than the number of tasks {len(tasks)}")
        sizes = [batch_size // len(tasks) + (i < batch_size % len(tasks)) for i in range(len(tasks))]
        return cls([ShardReader(d, split, size, task_id=t, **reader_kwargs) for (d, t), size in zip(tasks, sizes)])

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.readers)

    @property
    def condition_shape(self) -> tuple[int, int, int] | None:
        """(C_cond, S, S) of the batches' "condition" (the widest task's channels), None if no task has one."""
        specs = [(r.index.condition, r.index.pixel_size) for r in self.readers if r.index.condition is not None]
        if not specs:
            return None
        sides = {side for _spec, side in specs}
        if len(sides) > 1:
            raise DatasetError(f"conditional tasks' maps have different sizes {sorted(sides)}: one batch needs one")
        side = sides.pop()
        return max(spec.channels for spec, _side in specs), side, side

    def stream(self, start_step: int = 0) -> Iterator[Batch]:
        streams = [r.stream(start_step) for r in self.readers]
        shape = self.condition_shape
        while True:
            parts = [next(s) for s in streams]
            batch = {k: torch.cat([p[k] for p in parts]) for k in ("image", "label", "task_id")}
            if shape is not None:
                maps = []
                for p in parts:  # zeros for unconditional rows; fewer channels padded with zero channels
                    padded = torch.zeros(len(p["label"]), *shape)
                    if "condition" in p:
                        padded[:, : p["condition"].shape[1]] = p["condition"]
                    maps.append(padded)
                batch["condition"] = torch.cat(maps)  # (B, C_cond, S, S) float32
                batch["has_condition"] = torch.cat(
                    [p.get("has_condition", torch.zeros(len(p["label"]), dtype=torch.bool)) for p in parts]
                )  # (B,)
            yield batch


def read_split(
    dataset_dir: str,
    split: str = "eval",
    limit: int = 0,
    *,
    pixels: bool = False,
    conditions: bool = False,
    keys: bool = False,
) -> tuple[np.ndarray, ...]:
    """A whole split in shard order: uint8 images (N, H, W, 3) and int64 labels (N,); limit 0 = all.
    For latent shards the first array is float32 (N, C, H, W); with `pixels`, VAE latent shards give
    the images that were encoded instead (uint8 (N, S, S, 3)). With `conditions` a third array holds
    the condition maps, uint8 (N, C_cond, S, S) at pixel resolution, image for image (DatasetError for
    an unconditional dataset): the maps evaluation samples with. With `keys` a last array holds each sample's
    `__key__` (str (N,)): where an image or map came from.

    For reference statistics (FID); any bad sample raises ShardError naming the file and key.
    """
    index = load_index(dataset_dir)
    fmt = index.sample_format
    shards = index.shards(split)
    total = sum(s.num_samples for s in shards)
    want = total if limit <= 0 else min(limit, total)
    if want == 0:
        raise DatasetError(f"{index.url}: split {split!r} is empty")
    size = index.image_size
    latent = fmt.latent and not pixels
    if pixels and fmt.latent and not fmt.pixels_key:
        raise DatasetError(f"{index.url}: latent shards without the encoded images (members.pixels)")
    shape = (fmt.channels, size, size) if latent else (index.pixel_size, index.pixel_size, 3)
    images = np.empty((want, *shape), np.float32 if latent else np.uint8)
    encoded_pixels = fmt.latent and pixels  # the images a latent dataset was encoded from
    decode = fmt.decode_pixels if encoded_pixels else fmt.decode
    labels = np.empty((want,), np.int64)
    names: list[str] = []
    maps = None
    if conditions:
        spec = index.condition
        if spec is None:
            raise DatasetError(f"{index.url}: an unconditional dataset (index.json records no condition)")
        maps = np.empty((want, spec.channels, index.pixel_size, index.pixel_size), np.uint8)
        if not encoded_pixels:
            decode = fmt.decode_with_condition
    n = 0
    for shard in shards:
        if n >= want:
            break
        found = 0
        for sample in iter_samples(shard.url, check_end=False):
            if shard.skips(sample["__key__"]):
                continue
            found += 1
            try:
                if maps is None:
                    images[n], labels[n] = decode(sample)
                elif encoded_pixels:  # (not `decode is fmt.decode_pixels`: each access makes a new bound method)
                    images[n], labels[n] = decode(sample)
                    maps[n] = fmt.decode_condition(sample, images[n].shape[:2])
                else:
                    images[n], labels[n], maps[n] = decode(sample)
            except SampleError as err:
                raise ShardError(shard.url, sample["__key__"], str(err)) from None
            names.append(sample["__key__"])
            n += 1
            if n >= want:
                break
        if n < want and found < shard.num_samples:
            raise ShardError(shard.url, "", f"shard ends after {found} samples, index.json says {shard.num_samples}")
    out = (images, labels) if maps is None else (images, labels, maps)
    return (*out, np.array(names, dtype=str)) if keys else out
