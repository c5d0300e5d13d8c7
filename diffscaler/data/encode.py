"""Latent shards: images encoded once through a VAE, on Ray (`shards make --vae PATH`).

    encode_shards("folder:/data/cub", "shards/birds", "/data/sd-vae-ft-ema", size=256, actors=4, gpus_per_actor=1)
    encode_shards("webdataset:/data/rooms-wds", "shards/rooms", vae, size=256, label_key="none",
                  condition=ConditionSpec.from_config("key:depth.png", data))   # users' shards and their maps

Same catalog, subset and split as `make_shards`; a Ray Data `map_batches` over an actor pool (each actor
holds the VAE) encodes, the driver writes the tars in order. A sample holds `npy` and `flip.npy` (fp16
(C, h, w): the posterior mean times the VAE's scaling factor, of the image and of its mirror image, since
the VAE is not flip-equivariant and the reader's hflip must pick a true latent), `png` (the encoded
image: FID references come from it), `cond.png` with a condition (pixel resolution), `cls`, `json`.
The mean, not a sample: the posterior's std is ~1e-2 of the latent's, noise the diffusion loss drowns.
A finished shard leaves `<shard>.done.json` (its entry, its plan's hash): a rerun encodes only the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from diffscaler.cluster import connect_ray
from diffscaler.config import WEBDATASET_PREFIX
from diffscaler.data import storage
from diffscaler.data.conditions import (
    CONDITION_MEMBER,
    ConditionSpec,
    encode_map,
    fit_map,
)
from diffscaler.data.index import (
    FOREIGN_FORMAT_VERSION,
    FORMAT_NAME,
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
from diffscaler.data.indexer import shards_fingerprint
from diffscaler.data.pngcodec import encode_png
from diffscaler.data.sources import ImageSource, prepare_image_alpha
from diffscaler.data.tarformat import RawSample, write_tar
from diffscaler.data.user_shards import UserShardSource, scan_user_shards
from diffscaler.data.writer import _SHARD_FILE, build_parameters, condition_members, open_and_select
from diffscaler.vae import load_vae, vae_identity

FLIP_MEMBER = "flip.npy"
PIXELS_MEMBER = "png"


def latent_parameters(
    source: str,
    size: int,
    samples_per_shard: int,
    eval_fraction: float,
    limit: int,
    seed: int,
    vae_hash: str,
    condition: ConditionSpec | None = None,
    *,
    image_key: str = "",
    label_key: str = "",
) -> dict[str, Any]:
    """Top-level index fields that determine a latent build (`image_size` is the latent side there). Users'
    WebDataset shards (webdataset:SHARDS) add what they were read with: their files' names, sizes and mtimes
    (`source_files`), and `read_with` {image_key, label_key}; the map's member is in the condition's kind."""
    shards = source[len(WEBDATASET_PREFIX) :] if source.startswith(WEBDATASET_PREFIX) else ""
    files = shards_fingerprint(shards) if shards else None
    params = build_parameters(
        source, size, samples_per_shard, eval_fraction, limit, seed, condition, source_files=files
    )
    del params["image_size"]
    if shards:
        params["read_with"] = {"image_key": image_key, "label_key": label_key}
    return {**params, "pixel_size": size, "vae_hash": vae_hash}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


class LatentEncoder:
    """A Ray Data actor: prepares one batch of source images and encodes both flips through the VAE."""

    def __init__(
        self,
        source: ImageSource | UserShardSource,
        vae_path: str,
        vae_config: str | None,
        size: int,
        threads: int = 0,
        condition: ConditionSpec | None = None,
    ):
        import torch

        if threads > 0:
            torch.set_num_threads(threads)
        self.source, self.size, self.condition = source, size, condition
        self.vae = load_vae(vae_path, vae_config, device="cuda" if torch.cuda.is_available() else "cpu")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["ref"])
        images, conds, reasons = [], [], [""] * n
        for k, ref in enumerate(batch["ref"]):
            try:
                rgb, alpha = prepare_image_alpha(self.source.load(str(ref)), self.size)
                # the map stays at pixel resolution: computed from the image that is encoded, or the user's map
                # cropped as its image was; never encoded itself
                conds.append(encode_map(self._map(str(ref), rgb, alpha)) if self.condition is not None else b"")
                images.append(rgb)
            except Exception as err:  # any decoder failure is reported with the input's name
                images.append(np.full((self.size, self.size, 3), 255, np.uint8))
                conds.append(b"")
                reasons[k] = f"{type(err).__name__}: {err}"
        pixels = np.stack(images)  # (n, S, S, 3) uint8
        both = self.vae.encode(np.concatenate([pixels, pixels[:, :, ::-1].copy()])).cpu().numpy()  # (2n, C, h, w)
        return {
            **batch,
            "npy": np.array([_npy(z) for z in both[:n]], dtype=object),
            "flip": np.array([_npy(z) for z in both[n:]], dtype=object),
            "png": np.array([encode_png(p) for p in pixels], dtype=object),
            "cond": np.array(conds, dtype=object),
            "reason": np.array(reasons, dtype=object),
        }

    def _map(self, ref: str, rgb: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
        if self.condition.computed:
            return self.condition.compute(rgb, alpha)
        return fit_map(self.source.load_map(ref), self.size, self.condition.channels)


def encode_shards(
    source: str,
    out: str,
    vae_path: str,
    *,
    vae_config: str | None = None,
    size: int = 256,
    samples_per_shard: int = 1000,
    eval_fraction: float = 0.1,
    limit: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    skip_bad: bool = False,
    condition: ConditionSpec | None = None,
    image_key: str = "",
    label_key: str = "",
    log: Callable[[str], None] | None = None,
    progress_every: int = 500,
) -> DatasetIndex:
    """Encode `source` through the VAE at `vae_path` into latent shards + index.json at `out` (on Ray:
    diffscaler.cluster joins one if none is connected); with `condition`, each sample also holds its map (cond.png,
    at pixel resolution). `source` may be users' WebDataset shards, `webdataset:SHARDS`: read as
    diffscaler.data.user_shards says (`image_key`, `label_key` as `shards index` takes them, a `key:<member>`
    condition their own maps), split by key hash, in shard order. Raises VaeError (bad VAE), DatasetError
    (empty source, a condition the source cannot give, an undecodable input or a sample without its map
    unless `skip_bad`), SourceMissingError."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if size < 1 or samples_per_shard < 1 or batch_size < 1 or actors < 1 or progress_every < 1:
        raise ValueError(
            f"--size, --samples-per-shard, batch size, actors and progress_every must be >= 1, got "
            f"{size}, {samples_per_shard}, {batch_size}, {actors}, {progress_every}"
        )
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    identity = vae_identity(vae_path, vae_config)  # VaeError before any work
    if size % identity["downsample"]:
        raise ValueError(f"--size {size} is not a multiple of the VAE's downsampling factor {identity['downsample']}")
    latent_side = size // identity["downsample"]
    shape = [identity["latent_channels"], latent_side, latent_side]
    # before any sample is read: a source changed during the build is rebuilt by the next run
    params = latent_parameters(
        source,
        size,
        samples_per_shard,
        eval_fraction,
        limit,
        seed,
        identity["hash"],
        condition,
        image_key=image_key,
        label_key=label_key,
    )
    skipped: list[dict[str, str]] = []
    if source.startswith(WEBDATASET_PREFIX):
        connect_ray(log_to_driver=False)  # the scan: one Ray task per shard
        found = scan_user_shards(
            source[len(WEBDATASET_PREFIX) :],
            image_key=image_key,
            label_key=label_key,
            condition=condition.kind if condition is not None else "",
            eval_fraction=eval_fraction,
            limit=limit,
            skip_bad=skip_bad,
            parallel=True,
            log=log,
        )
        src, class_names, train, evals, available = (
            found.source,
            found.class_names,
            found.train,
            found.evals,
            found.total,
        )
        skipped.extend(found.skipped)
        if condition is not None:  # stored as a computed map is: member cond.png, 8-bit, at pixel resolution
            condition = replace(condition, member=CONDITION_MEMBER, channels=found.condition_channels)
    else:
        src, catalog, _selected, train, evals = open_and_select(source, condition, limit, seed, eval_fraction)
        class_names, available = catalog.class_names, len(catalog.items)
    log(
        f"shards make {source} --vae {vae_path}: {len(train) + len(evals)} of {available} images -> train "
        f"{len(train)}, eval {len(evals)}, {size}x{size} px -> latents {shape} fp16 -> {out}"
    )

    # The plan: which images form which shard. Its hash names a finished shard's sidecar (resume).
    plan: list[tuple[str, int, list[Any]]] = []
    for split, items in zip(SPLITS, (train, evals)):
        for number, lo in enumerate(range(0, len(items), samples_per_shard)):
            plan.append((split, number, items[lo : lo + samples_per_shard]))
    storage.remove(index_url(out))  # from here on the folder does not look complete
    done: dict[int, dict[str, Any]] = {}
    for s, (split, number, items) in enumerate(plan):
        sidecar = _sidecar(out, split, number)
        if storage.exists(sidecar):
            record = json.loads(storage.read_bytes(sidecar))
            if record.get("plan") == _plan_hash(params, split, number, items) and storage.exists(
                storage.join(out, shard_name(split, number))
            ):
                done[s] = record
    if done:
        log(f"shards make {source}: resuming, {len(done)} of {len(plan)} shards already encoded")

    rows = [
        {"shard": s, "pos": k, "ref": item.ref, "label": item.label}
        for s, (_split, _n, items) in enumerate(plan)
        if s not in done
        for k, item in enumerate(items)
    ]
    t0, encoded = time.perf_counter(), 0
    arrived = 0  # images whose latents reached the driver: a log line every progress_every of them

    def on_row() -> None:
        nonlocal arrived
        arrived += 1
        if arrived % progress_every == 0 and arrived < len(rows):
            rate = arrived / max(time.perf_counter() - t0, 1e-9)
            log(f"shards make {source}: encoded {arrived}/{len(rows)} images ({rate:.1f} images/s)")

    if rows:
        for s, results in _encoded_shards(
            rows,
            src,
            vae_path,
            vae_config,
            size,
            batch_size,
            actors,
            cpus_per_actor,
            gpus_per_actor,
            on_row,
            condition,
        ):
            split, number, items = plan[s]
            done[s] = _write_shard(
                out,
                split,
                number,
                items,
                results,
                class_names,
                skip_bad,
                source,
                condition.member if condition is not None else "",
            )
            done[s]["plan"] = _plan_hash(params, split, number, items)
            storage.write_bytes_atomic(_sidecar(out, split, number), json.dumps(done[s], sort_keys=True).encode())
            encoded += len(items)
            rate = encoded / max(time.perf_counter() - t0, 1e-9)
            log(
                f"shards make {source}: encoded {shard_name(split, number)} ({len(done)}/{len(plan)} shards, "
                f"{rate:.1f} images/s)"
            )

    splits: dict[str, Any] = {}
    for split in SPLITS:
        records = [done[s] for s, (sp, _n, _i) in enumerate(plan) if sp == split]
        counts = [0] * len(class_names)
        for r in records:
            counts = [a + b for a, b in zip(counts, r["class_counts"])]
            skipped.extend(r["skipped"])
        entries = [r["entry"] for r in records]
        splits[split] = {
            "num_samples": sum(e["num_samples"] for e in entries),
            "class_counts": counts,
            "shards": entries,
        }
    if splits["train"]["num_samples"] == 0:
        raise DatasetError(f"source {source!r}: no decodable images ({len(skipped)} skipped) - empty dataset")
    keep = {e["name"] for s in splits.values() for e in s["shards"]}
    for name in storage.list_names(out):
        if _SHARD_FILE.match(name) and name not in keep:
            storage.remove(storage.join(out, name))  # a shard from an earlier, larger build
    index = {
        "format": FORMAT_NAME,
        "format_version": FOREIGN_FORMAT_VERSION,
        **params,
        "image_size": latent_side,
        "source_detail": src.detail,
        "class_names": list(class_names),
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "members": {
            "image": "npy",
            "flip": FLIP_MEMBER,
            "pixels": PIXELS_MEMBER,
            "label": "cls",
            "label_values": "index",
            "channels": shape[0],
            "resize": False,
            **condition_members(condition).get("members", {}),
        },
        "latent": {
            "shape": shape,
            "image_size": size,
            "dtype": "float16",
            "value": "VAE posterior mean * scaling_factor (flip.npy: of the flipped image)",
            "vae": identity,
        },
        "splits": splits,
        "skipped_inputs": skipped,
        "content_hash": combine_hashes([e["sha256"] for split in SPLITS for e in splits[split]["shards"]]),
    }
    storage.write_bytes_atomic(storage.join(out, INDEX_NAME), encode_index(index))
    for split, number, _items in plan:
        storage.remove(_sidecar(out, split, number))
    wall = time.perf_counter() - t0
    log(
        f"shards make {source}: wrote {len(keep)} latent shards, {index['num_samples']} samples "
        f"({encoded} encoded in {wall:.1f} s), {index['content_hash']}"
    )
    return load_index(out)


def _sidecar(out: str, split: str, number: int) -> str:
    return storage.join(out, shard_name(split, number) + ".done.json")


def _plan_hash(params: dict[str, Any], split: str, number: int, items: list[Any]) -> str:
    text = json.dumps([params, split, number, [(i.ref, i.label) for i in items]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _encoded_shards(rows, src, vae_path, vae_config, size, batch_size, actors, cpus, gpus, on_row, condition=None):
    """(plan position, that shard's rows in order) as each shard's encoding completes (in plan order);
    `on_row()` as each encoded image arrives."""
    import ray

    connect_ray(log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards complete one after another: bounded driver memory
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch_size))
    ds = ds.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={
            "source": src,
            "vae_path": vae_path,
            "vae_config": vae_config,
            "size": size,
            "threads": max(1, int(cpus)),
            "condition": condition,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    pending: dict[int, list[dict[str, Any]]] = {}
    current = rows[0]["shard"]
    for row in ds.iter_rows():
        on_row()
        shard = int(row["shard"])
        if shard != current and current in pending:
            yield current, sorted(pending.pop(current), key=lambda r: int(r["pos"]))
        current = shard
        pending.setdefault(shard, []).append(row)
    for shard in sorted(pending):
        yield shard, sorted(pending[shard], key=lambda r: int(r["pos"]))


def _write_shard(out, split, number, items, results, class_names, skip_bad, source, cond_member="") -> dict[str, Any]:
    if len(results) != len(items):
        raise RuntimeError(f"{shard_name(split, number)}: {len(results)} encoded rows for {len(items)} images")
    samples, counts, skipped = [], [0] * len(class_names), []
    position = 0  # key: shard number + position in it (unique in the split, stable across resumes)
    for item, row in zip(items, results):
        if row["reason"]:
            if not skip_bad:
                raise DatasetError(f"source {source!r}: input {item.ref!r} cannot be decoded: {row['reason']}")
            skipped.append({"ref": item.ref, "reason": str(row["reason"])})
            continue
        meta = {"id": item.ref, "class": class_names[item.label]}
        members = {
            "cls": str(item.label).encode(),
            "json": json.dumps(meta, sort_keys=True).encode(),
            "npy": bytes(row["npy"]),
            FLIP_MEMBER: bytes(row["flip"]),
            PIXELS_MEMBER: bytes(row["png"]),
        }
        if cond_member:
            members[cond_member] = bytes(row["cond"])
        samples.append(RawSample(f"{number:06d}{position:05d}", members))
        counts[item.label] += 1
        position += 1
    hasher = hashlib.sha256()
    for sample in samples:
        sample_digest(hasher, sample.key, sample.members)
    name = shard_name(split, number)
    storage.write_bytes_atomic(storage.join(out, name), write_tar(samples))
    return {
        "entry": {"name": name, "num_samples": len(samples), "sha256": hasher.hexdigest()},
        "class_counts": counts,
        "skipped": skipped,
    }
