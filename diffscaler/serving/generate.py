"""The generation job: many tasks' images as WebDataset shards, on a Ray Data actor pool.

    python -m ray_jobs.generate --config C --backbone B --adapters DIR --out OUT generate.images_per_task=5000

The plan interleaves the tasks image by image (a, b, c, a, b, c, ...), so every `generate.batch_size`
rows that reach an actor are one mixed-task batch through the bank's grouped path (`TaskRuntime`). Image i
of (task t, class c) is seeded by (generate.seed, t, c, i) alone: the images do not depend on
`num_actors`, `batch_size` or which tasks are generated beside it (at most one level of 255 apart).

OUT is a dataset folder `diffscaler shards check` accepts (index.json format_version 1: `png` + `cls` +
`json` per sample; class_names are `task` or `task/class`, so the set is a pretraining or fine-tuning
source). Each sample's `json`: task, class, seed, index, steps, sampler, guidance, backbone and adapter
hashes. All images go to the train split; eval is empty.

Tasks with a condition map take their maps from a split of their own shards (`data.shards_root/<task>`,
`generate.condition_split`, read as evaluate reads `eval.reference_split`: `diffscaler.eval.resolve.split_maps`):
image k of a task (its k-th image in the plan, whatever its class) takes map k mod M of the split's first M
maps (M at most the task's image count). Its sample stores the map beside the image as `cond.png`, and its
json records `condition`: kind, split, the source sample's key and the map's number. A set whose tasks all take
the same kind of map records it in index.json (a conditional fine-tuning source). A task with maps and no
shards to take them from is refused before Ray, naming the task.

Resume: each written shard gets `<shard>.done.json` (its index entry and the hash of the plan rows and
parameters that made it); a rerun with the same parameters keeps those shards and generates only the
others. An actor that dies mid-run is restarted by Ray Data and its batches are retried. The sidecars
are removed once index.json is written; a rerun of a complete folder with the same parameters is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffscaler.config import ExperimentConfig, GenerateConfig
from diffscaler.data import storage
from diffscaler.data.conditions import CONDITION_MEMBER, encode_map
from diffscaler.data.index import FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, combine_hashes, sample_digest, shard_name
from diffscaler.data.pngcodec import encode_png
from diffscaler.data.tarformat import RawSample, write_tar

GENERATED_SOURCE = "generated"


class GenerateInputError(ValueError):
    """Input the generation job cannot run on; the message names it."""


@dataclass(frozen=True)
class TaskPlan:
    name: str
    num_classes: int
    class_names: tuple[str, ...]
    adapter_hash: str
    condition: str = ""  # the kind of condition map the task takes ("" = none)

    def label_names(self) -> list[str]:
        if self.num_classes == 1:
            return [self.name]
        names = self.class_names if len(self.class_names) == self.num_classes else range(self.num_classes)
        return [f"{self.name}/{c}" for c in names]


@dataclass(frozen=True)
class TaskMaps:
    """A task's condition maps, from a split of its shards: image k of the task takes map k mod M."""

    record: dict[str, Any]  # the adapter's condition (kind, params, channels, size)
    shards: str  # the dataset folder the maps come from
    split: str
    maps: np.ndarray  # uint8 (M, C, S, S)
    keys: np.ndarray  # str (M,): each map's source sample key

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.maps.tobytes() + "\n".join(self.keys.tolist()).encode()).hexdigest()


def task_rows(task: TaskPlan, g: GenerateConfig) -> list[tuple[int, int]]:
    """(class, index within that class) of each image of `task`, in order."""
    if task.num_classes == 1:
        return [(0, i) for i in range(g.images_per_task)]
    classes = [g.class_label] if g.class_label >= 0 else list(range(task.num_classes))
    if g.images_per_class > 0:  # class by class in turn: image k of every class before image k + 1
        return [(c, i) for i in range(g.images_per_class) for c in classes]
    return [(classes[k % len(classes)], k // len(classes)) for k in range(g.images_per_task)]


def plan_rows(tasks: list[TaskPlan], g: GenerateConfig) -> list[dict[str, Any]]:
    """Every image of the set, tasks interleaved one image at a time; `label` is the dataset's class."""
    per_task = [task_rows(t, g) for t in tasks]
    first_label = np.cumsum([0] + [len(t.label_names()) for t in tasks]).tolist()
    rows: list[dict[str, Any]] = []
    for k in range(max((len(r) for r in per_task), default=0)):
        for t, task in enumerate(tasks):
            if k < len(per_task[t]):
                cls, index = per_task[t][k]
                # `k`: the task's image number, whose map is k mod M (a task with condition maps)
                rows.append({"task": task.name, "cls": cls, "index": index, "label": first_label[t] + cls, "k": k})
    for n, row in enumerate(rows):
        row["shard"], row["pos"] = divmod(n, g.samples_per_shard)
    return rows


def image_parameters(
    cfg: ExperimentConfig, backbone_hash: str, tasks: list[TaskPlan], maps: dict[str, TaskMaps] | None = None
) -> dict[str, Any]:
    """What determines the images (not num_actors, batch_size or resources): equal parameters, equal set."""
    g, d = cfg.generate, cfg.diffusion
    conditions = {
        n: {"kind": m.record["kind"], "split": m.split, "num_maps": len(m.maps), "maps": m.digest()}
        for n, m in sorted((maps or {}).items())
    }
    return {
        **({"conditions": conditions, "condition_scale": g.condition_scale} if conditions else {}),
        "backbone_hash": backbone_hash,
        "adapters": {t.name: t.adapter_hash for t in tasks},
        "images_per_task": g.images_per_task,
        "images_per_class": g.images_per_class,
        "class_label": g.class_label,
        "sampling_steps": g.sampling_steps,
        "sampler": g.sampler,
        "guidance": g.guidance,
        "seed": g.seed,
        "samples_per_shard": g.samples_per_shard,
        "diffusion": {k: v for k, v in asdict(d).items() if k not in ("sampler", "sampling_steps", "cfg_scale")},
    }


def check_inputs(
    cfg: ExperimentConfig, backbone: str, adapters: str, out: str
) -> tuple[list[TaskPlan], str, dict[str, TaskMaps]]:
    """(the tasks to generate, the backbone hash, the condition maps of the tasks that take them);
    GenerateInputError naming the problem, before Ray."""
    from diffscaler.adapters.bank import AdapterLoadError
    from diffscaler.artifacts import BackboneLoadError, read_backbone_meta
    from diffscaler.config import from_dict
    from diffscaler.serving.runtime import AdapterCatalog, refuse_unet

    try:
        meta = read_backbone_meta(backbone)
        from diffscaler.config import ModelConfig

        model_cfg = from_dict(ModelConfig, meta["model"], "backbone.model")
        catalog = AdapterCatalog(adapters, meta["content_hash"], model_cfg, log=lambda _m: None)
        catalog.scan()
    except (BackboneLoadError, AdapterLoadError) as err:
        raise GenerateInputError(str(err)) from None
    try:
        refuse_unet(model_cfg, backbone)
    except ValueError as err:
        raise GenerateInputError(str(err)) from None
    if model_cfg.in_channels != 3:
        raise GenerateInputError(
            f"--backbone {backbone}: a latent backbone ({model_cfg.in_channels} channels); the "
            "generation job writes images from pixel-space backbones only"
        )
    names = list(cfg.generate.tasks) or sorted(catalog.entries)
    missing = [n for n in names if n not in catalog.entries]
    if missing or not names:
        why = "; ".join(f"{f}: {r}" for f, r in catalog.refused.items() if Path(f).stem in missing or not names)
        raise GenerateInputError(
            f"generate.tasks: {missing or 'none'} not among the adapters of {adapters} that fit "
            f"the backbone {sorted(catalog.entries)}" + (f" ({why})" if why else "")
        )
    tasks, maps = [], {}
    for n in names:
        entry = catalog.entries[n]
        m, cond = entry.meta, entry.condition
        task = TaskPlan(n, m["num_classes"], tuple(m.get("class_names", ())), entry.hash, cond["kind"] if cond else "")
        tasks.append(task)
        if cfg.generate.class_label >= m["num_classes"] and m["num_classes"] > 1:
            raise GenerateInputError(
                f"generate.class_label {cfg.generate.class_label}: task {n!r} has {m['num_classes']} classes"
            )
        if cond is not None:
            maps[n] = task_maps(cfg, task, cond)
    existing = Path(out) / INDEX_NAME
    if existing.is_file():
        try:
            old = json.loads(existing.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("source") != GENERATED_SOURCE:
            raise GenerateInputError(
                f"--out {out}: holds a dataset that is not a generated set ({existing}); choose another folder"
            )
    return tasks, meta["content_hash"], maps


def task_maps(cfg: ExperimentConfig, task: TaskPlan, condition: dict[str, Any]) -> TaskMaps:
    """The condition maps `task` takes: the first of generate.condition_split of its shards
    (data.shards_root/<task>), as many as it has images at most; GenerateInputError naming the task."""
    from diffscaler.data.build import dataset_dir
    from diffscaler.eval.resolve import split_maps
    from diffscaler.eval.stats import EvalInputError

    g = cfg.generate
    shards = dataset_dir(cfg.data, task.name)
    try:
        maps, keys = split_maps(shards, g.condition_split, len(task_rows(task, g)), condition, latent=False)
    except EvalInputError as err:
        raise GenerateInputError(
            f"task {task.name!r} takes {condition['kind']} condition maps, taken from the "
            f"{g.condition_split!r} split of its shards {shards} (data.shards_root/<task>, "
            f"generate.condition_split): {err}"
        ) from None
    return TaskMaps(condition, shards, g.condition_split, maps, keys)


class GenerateActor:
    """A Ray Data actor: the backbone and the bank (every generated task resident); one mixed batch per call."""

    def __init__(
        self, backbone: str, adapters: str, hashes: dict[str, str], cfg_json: str, threads: int = 0, maps: Any = None
    ):
        import ray

        from diffscaler.config import config_from_json
        from diffscaler.serving.runtime import TaskRuntime, torch_threads

        torch_threads(threads)
        # {task: uint8 (M, C, S, S)}: the condition maps, put in the object store once by the driver
        self.maps: dict[str, np.ndarray] = (ray.get(maps) if isinstance(maps, ray.ObjectRef) else maps) or {}
        cfg = config_from_json(cfg_json)
        self.g = cfg.generate
        self.runtime = TaskRuntime.load(
            backbone, adapters, max_resident=max(1, len(hashes)), diffusion=cfg.diffusion, log=lambda _m: None
        )
        changed = [
            n
            for n, h in hashes.items()
            if n not in self.runtime.catalog.entries or self.runtime.catalog.entries[n].hash != h
        ]
        if changed:
            raise RuntimeError(f"adapters {changed} of {adapters} changed after the job was planned; rerun it")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from diffscaler.serving.runtime import ImageRow

        rows = []
        for t, c, i, k in zip(batch["task"], batch["cls"], batch["index"], batch["k"]):
            maps = self.maps.get(str(t))
            cond = None if maps is None else maps[int(k) % len(maps)]  # image k of the task takes map k mod M
            rows.append(ImageRow(str(t), int(c), int(i), self.g.seed, cond))
        images = self.runtime.images(
            rows, self.g.sampling_steps, self.g.sampler, self.g.guidance, self.g.condition_scale
        )
        return {
            **batch,
            "png": np.array([encode_png(im) for im in images], dtype=object),
            "noise_seed": np.array([r.noise_seed for r in rows], dtype=np.uint64),
        }


def _sidecar(out: str, number: int) -> str:
    return storage.join(out, shard_name("train", number) + ".done.json")


def _plan_hash(params: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    text = json.dumps([params, [(r["task"], r["cls"], r["index"], r["k"]) for r in rows]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def generate_set(
    cfg: ExperimentConfig,
    backbone: str,
    adapters: str,
    out: str,
    log: Callable[[str], None] | None = None,
    on_shard: Callable[[int, int], None] | None = None,
    checked: tuple[list[TaskPlan], str, dict[str, TaskMaps]] | None = None,
) -> dict[str, Any]:
    """Generate the set into `out` (inputs checked first, then Ray: joined if not connected); returns the
    index. `on_shard(written, total)` runs after each shard is written. `checked`: what `check_inputs` returned
    for these arguments, when the caller ran it already (the condition maps are not read twice)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    g = cfg.generate
    tasks, backbone_hash, maps = checked or check_inputs(cfg, backbone, adapters, out)
    rows = plan_rows(tasks, g)
    params = image_parameters(cfg, backbone_hash, tasks, maps)
    shards: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        shards.setdefault(row["shard"], []).append(row)
    Path(out).mkdir(parents=True, exist_ok=True)
    index_path = storage.join(out, INDEX_NAME)
    if storage.exists(index_path):
        old = json.loads(storage.read_bytes(index_path))
        if old.get("generate") == params:
            log(f"generate: {out} already holds this set ({old['num_samples']} images), nothing to do")
            return old
        theirs = old.get("generate") or {}
        differ = sorted(k for k in set(params) | set(theirs) if params.get(k) != theirs.get(k))
        raise GenerateInputError(
            f"--out {out}: holds a finished generated set made with other parameters "
            f"({', '.join(differ)} differ); choose another folder"
        )
    done: dict[int, dict[str, Any]] = {}
    for s, shard_rows in shards.items():
        sidecar = _sidecar(out, s)
        if storage.exists(sidecar):
            record = json.loads(storage.read_bytes(sidecar))
            if record.get("plan") == _plan_hash(params, shard_rows) and storage.exists(
                storage.join(out, shard_name("train", s))
            ):
                done[s] = record
    log(
        f"generate: {len(tasks)} task(s), {len(rows)} images in {len(shards)} shard(s) of up to "
        f"{g.samples_per_shard} -> {out}" + (f"; resuming, {len(done)} shard(s) already written" if done else "")
    )
    todo = [r for s, rs in shards.items() if s not in done for r in rs]
    t0, made = time.perf_counter(), 0
    if todo:
        for s, results in _generated_shards(
            todo, cfg, backbone, adapters, {t.name: t.adapter_hash for t in tasks}, log, maps
        ):
            done[s] = _write_shard(out, s, results, params, tasks, g, maps)
            done[s]["plan"] = _plan_hash(params, shards[s])
            storage.write_bytes_atomic(_sidecar(out, s), json.dumps(done[s], sort_keys=True).encode())
            made += len(results)
            rate = made / max(time.perf_counter() - t0, 1e-9)
            log(
                f"generate: wrote {shard_name('train', s)} ({len(results)} images; {len(done)}/{len(shards)} shards, "
                f"{rate:.2f} images/s)"
            )
            if on_shard is not None:
                on_shard(len(done), len(shards))
    class_names = [n for t in tasks for n in t.label_names()]
    counts = [0] * len(class_names)
    for row in rows:
        counts[row["label"]] += 1
    entries = [done[s]["entry"] for s in sorted(shards)]
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "source": GENERATED_SOURCE,
        "source_detail": f"diffscaler generate: backbone {backbone}, adapters {adapters}",
        "image_size": _image_size(backbone),
        "samples_per_shard": g.samples_per_shard,
        "class_names": class_names,
        "num_samples": len(rows),
        **_index_condition(tasks, maps),
        "generate": params,
        "splits": {
            "train": {"num_samples": len(rows), "class_counts": counts, "shards": entries},
            "eval": {"num_samples": 0, "class_counts": [0] * len(class_names), "shards": []},
        },
        "skipped_inputs": [],
        "content_hash": combine_hashes([e["sha256"] for e in entries]),
    }
    storage.write_bytes_atomic(index_path, (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    for s in shards:
        storage.remove(_sidecar(out, s))
    wall = time.perf_counter() - t0
    log(
        f"generate: {out}: {len(rows)} images in {len(shards)} shards ({made} generated in {wall:.1f} s, "
        f"{made / max(wall, 1e-9):.2f} images/s), {index['content_hash']}"
    )
    return index


def _index_condition(tasks: list[TaskPlan], maps: dict[str, TaskMaps]) -> dict[str, Any]:
    """index.json's condition: recorded when every task takes the same kind of map (each sample then holds
    one, so the set is a conditional dataset); else none (the maps are extra members readers ignore)."""
    kinds = {
        json.dumps([m.record["kind"], m.record.get("params", {}), int(m.record["channels"])], sort_keys=True)
        for m in maps.values()
    }
    if not maps or len(maps) != len(tasks) or len(kinds) != 1:
        return {"condition": None}
    first = next(iter(maps.values())).record
    return {
        "condition": {"kind": first["kind"], "params": dict(sorted(first.get("params", {}).items()))},
        "members": {"condition": CONDITION_MEMBER, "condition_channels": int(first["channels"])},
    }


def _image_size(backbone: str) -> int:
    from diffscaler.artifacts import read_backbone_meta

    return int(read_backbone_meta(backbone)["model"]["input_size"])


def _generated_shards(
    rows: list[dict[str, Any]],
    cfg: ExperimentConfig,
    backbone: str,
    adapters: str,
    hashes: dict[str, str],
    log: Callable[[str], None],
    maps: dict[str, TaskMaps] | None = None,
) -> Iterator[tuple[int, list]]:
    """(shard, its rows in order) as each shard's images complete (in plan order)."""
    import ray

    from diffscaler.cluster import connect_ray

    g = cfg.generate
    connect_ray(cfg, log_to_driver=False)  # the caller's cluster when connected (ray_jobs.generate joins first)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards complete one after another: bounded driver memory
    columns = [{k: r[k] for k in ("shard", "pos", "task", "cls", "index", "k")} for r in rows]
    maps_ref = ray.put({n: m.maps for n, m in maps.items()}) if maps else None  # once, not per batch
    ds = ray.data.from_items(columns, override_num_blocks=max(1, min(len(rows) // g.batch_size, 1000)))
    ds = ds.map_batches(
        GenerateActor,
        fn_constructor_kwargs={
            "backbone": str(Path(backbone).resolve()),
            "adapters": str(Path(adapters).resolve()),
            "hashes": hashes,
            "cfg_json": cfg.to_json(),
            "threads": max(1, int(g.cpus_per_actor)),
            "maps": maps_ref,
        },
        batch_size=g.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=g.num_actors),
        num_cpus=g.cpus_per_actor,
        num_gpus=1 if g.use_gpu else 0,
    )
    pending: dict[int, list[dict[str, Any]]] = {}
    current, t0 = int(rows[0]["shard"]), time.perf_counter()
    for arrived, row in enumerate(ds.iter_rows(), 1):
        if g.progress_every and arrived % g.progress_every == 0 and arrived < len(rows):
            rate = arrived / max(time.perf_counter() - t0, 1e-9)
            log(f"generate: {arrived}/{len(rows)} images ({rate:.2f} images/s)")
        shard = int(row["shard"])
        if shard != current and current in pending:
            yield current, sorted(pending.pop(current), key=lambda r: int(r["pos"]))
        current = shard
        pending.setdefault(shard, []).append(row)
    for shard in sorted(pending):
        yield shard, sorted(pending[shard], key=lambda r: int(r["pos"]))


def _write_shard(
    out: str,
    number: int,
    results: list[dict[str, Any]],
    params: dict[str, Any],
    tasks: list[TaskPlan],
    g: GenerateConfig,
    maps: dict[str, TaskMaps] | None = None,
) -> dict[str, Any]:
    maps = maps or {}
    by_name = {t.name: t for t in tasks}
    first_label = dict(zip([t.name for t in tasks], np.cumsum([0] + [len(t.label_names()) for t in tasks]).tolist()))
    samples = []
    for row in results:
        task = by_name[str(row["task"])]
        cls, index = int(row["cls"]), int(row["index"])
        meta = {
            "task": task.name,
            "class": cls,
            "class_name": task.label_names()[cls],
            "seed": g.seed,
            "index": index,
            "noise_seed": int(row["noise_seed"]),
            "steps": g.sampling_steps,
            "sampler": g.sampler,
            "guidance": g.guidance,
            "backbone_hash": params["backbone_hash"],
            "adapter_hash": task.adapter_hash,
        }
        members = {
            "png": bytes(row["png"]),
            "cls": str(first_label[task.name] + cls).encode(),
        }
        own = maps.get(task.name)
        if own is not None:  # the map the image was made with, beside it, and where it came from
            m = int(row["k"]) % len(own.maps)
            members[CONDITION_MEMBER] = encode_map(own.maps[m])
            meta["condition"] = {
                "kind": own.record["kind"],
                "split": own.split,
                "source": own.shards,
                "source_key": str(own.keys[m]),
                "map_index": m,
                "condition_scale": g.condition_scale,
            }
        members["json"] = json.dumps(meta, sort_keys=True).encode()
        samples.append(RawSample(f"{number:06d}{int(row['pos']):06d}", members))
    hasher = hashlib.sha256()
    for sample in samples:
        sample_digest(hasher, sample.key, sample.members)
    name = shard_name("train", number)
    storage.write_bytes_atomic(storage.join(out, name), write_tar(samples))
    return {"entry": {"name": name, "num_samples": len(samples), "sha256": hasher.hexdigest()}}
