"""One backbone serving many tasks: the adapters folder in host memory, a bank of device slots, LRU paging.

    runtime = TaskRuntime.load("backbone.safetensors", "adapters/", max_resident=64)
    images = runtime.images([ImageRow("emoji", 0, 0, seed=7), ImageRow("icons", 0, 0, seed=7)], steps=25)

Used by the generation job (`diffscaler.serving.generate`, one runtime per Ray Data actor) and the Serve
deployment (`diffscaler.serving.app`, one per replica). Every adapter of the folder is read once into host
memory (`AdapterCatalog`); the model holds one `AdapterBank` with `max_resident` task slots, and a batch's
tasks are paged into slots on demand, the least recently used out. A mixed batch runs through the bank's
grouped path (`AdapterBank.forward` sorts it by task).

Image i of task t, class c, run seed s is seeded by (s, t, c, i) only (`image_seed`): never by the batch it
lands in, the slot its task occupies, the other tasks of the batch or the number of workers (up to float
rounding of the grouped matmuls: at most one level of 255). A task with a condition map (TaskInfo.condition)
takes one map per row (`ImageRow.condition`), beside the rows of other tasks in the same batch: the bank gets
the batch's maps and a mask of the rows that carry one; each slot holds its task's condition path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffscaler.adapters.bank import AdapterBank, AdapterLoadError, TaskInfo
from diffscaler.artifacts import (
    _bank_tasks,
    _check_adapter_fits,
    check_condition_fits,
    content_hash,
    load_backbone,
    read_adapter_file,
    task_info_from_meta,
)
from diffscaler.config import DiffusionConfig, ModelConfig
from diffscaler.diffusion.gaussian import GaussianDiffusion
from diffscaler.diffusion.sampling import generate, to_uint8
from diffscaler.models.dit import DiT


def refuse_unet(model: ModelConfig, backbone: str | Path) -> None:
    """ValueError for a U-Net backbone: serving and generation page tasks into the DiT's AdapterBank slots. A
    U-Net's adapters (BitFit, DiffFit, full: `diffscaler.adapters.conv`) sample through `diffscaler sample`."""
    if model.arch != "dit":
        raise ValueError(
            f"--backbone {backbone}: a U-Net backbone (model.arch {model.arch}); serving and generation run DiT "
            "backbones only. Sample a U-Net's adapters with `diffscaler sample --backbone ... --adapters ...`"
        )


def image_seed(seed: int, task: str, label: int, index: int) -> int:
    """The 63-bit noise seed of image `index` of (`task`, class `label`) in a run seeded `seed`."""
    digest = hashlib.sha256(task.encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "big") for i in range(0, 16, 4)]
    state = np.random.SeedSequence([int(seed), *words, int(label), int(index)]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> 1)


@dataclass(frozen=True)
class ImageRow:
    task: str  # adapter name
    label: int  # class within the task (0 for an unconditional task)
    index: int  # image number within (task, class)
    seed: int  # the run's (or request's) seed
    # a task with a condition map: uint8 (C, S, S), the task's channels at its map side (not part of the seed)
    condition: np.ndarray | None = field(default=None, compare=False, repr=False)
    unconditioned: bool = False  # a task with a condition map, asked explicitly for its output without one

    @property
    def noise_seed(self) -> int:
        return image_seed(self.seed, self.task, self.label, self.index)


@dataclass
class AdapterEntry:
    """One servable adapter, held in host memory."""

    name: str
    file: Path
    meta: dict[str, Any]
    state: dict[str, torch.Tensor]  # host tensors, as in the file
    hash: str  # content hash of the tensors (sha256 over names, dtypes, shapes and bytes)
    stamp: tuple[int, ...]  # (mtime_ns, size) of the tensors and of the JSON when read: unchanged, not read again

    @property
    def info(self) -> TaskInfo:
        return task_info_from_meta(self.meta)

    @property
    def condition(self) -> dict[str, Any] | None:
        """The task's condition map as sampling needs it ({kind, params, channels, size}), None without one."""
        from diffscaler.data.conditions import adapter_condition

        record = adapter_condition(self.meta)
        if record is not None and not record.get("size"):
            record["size"] = self.meta["model"]["input_size"]
        return record

    def describe(self) -> dict[str, Any]:
        m = self.meta
        cond = self.condition
        return {
            "name": self.name,
            "method": m["method"],
            "rank": m["rank"],
            "classes": m["num_classes"],
            "conditional": m["conditional"],
            "class_names": list(m.get("class_names", ())),
            "adapter_hash": self.hash,
            # the spatial condition map the task takes (None: none): kind, channels, side in pixels
            "condition": None
            if cond is None
            else {"kind": cond["kind"], "channels": int(cond["channels"]), "size": int(cond["size"])},
        }


def _stamp(path: Path) -> tuple[int, ...]:
    """(mtime_ns, size) of an adapter's tensors and of its JSON: either rewritten is a change to read."""
    st = path.stat()
    try:
        js = path.with_suffix(".json").stat()
    except FileNotFoundError:  # the tensors written, the JSON not yet: refused now, read once it lands
        return st.st_mtime_ns, st.st_size
    return st.st_mtime_ns, st.st_size, js.st_mtime_ns, js.st_size


@dataclass
class ScanResult:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # file -> reason

    def summary(self) -> dict[str, Any]:
        return {"added": self.added, "updated": self.updated, "removed": self.removed, "refused": self.refused}


class AdapterCatalog:
    """The `<task>.safetensors` adapters of one folder that fit the backbone, in host memory.

    `scan()` re-reads the folder: new and changed files are read (the fine-tune stage writes them
    atomically, tensors then JSON), removed ones dropped. A file that does not fit (another backbone, another
    method than the bank's, a task's own model, corrupt) is refused with its reason and logged; a task whose
    new file is refused keeps the version read before, and every other task keeps serving.
    """

    def __init__(
        self,
        folder: str | Path,
        backbone_hash: str,
        model_config: ModelConfig,
        log: Callable[[str], None] | None = None,
    ):
        self.folder = Path(folder)
        self.backbone_hash, self.model_config = backbone_hash, model_config
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.entries: dict[str, AdapterEntry] = {}
        self.refused: dict[str, str] = {}
        self.method: str | None = None  # one bank holds one method and one target set: the first read decides
        self.targets: tuple[str, ...] | None = None
        # how conditional tasks' maps enter the bank (size, blocks, controlnet_blocks): the first one read decides
        self.condition_layout: tuple[int, bool, int] | None = None
        self.generation = 0  # +1 at each scan that added, updated or removed a task
        self.scan_lock = threading.Lock()

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            raise AdapterLoadError(f"--adapters {self.folder}: not a folder")
        return [f for f in sorted(self.folder.glob("*.safetensors")) if _bank_tasks(f) is None]

    def _read(
        self, file: Path, method: str | None, targets: tuple[str, ...] | None, layout: tuple[int, bool, int] | None
    ) -> AdapterEntry:
        stamp = _stamp(file)
        meta, state = read_adapter_file(file)
        _check_adapter_fits(meta, file, self.model_config, self.backbone_hash)
        check_condition_fits(meta, file, self.model_config)
        if meta.get("task") != file.stem:
            raise AdapterLoadError(f"{file}: holds task {meta.get('task')!r}, its file name says {file.stem!r}")
        if method is not None and (meta["method"], tuple(meta["targets"])) != (method, targets):
            raise AdapterLoadError(
                f"{file}: method {meta['method']} on {meta['targets']}, the served bank holds "
                f"{method} on {list(targets or ())}: one bank holds one method"
            )
        own = self._layout(meta)
        if own is not None and layout is not None and own != layout:
            raise AdapterLoadError(
                f"{file}: its condition map enters as (size, blocks, controlnet_blocks) {own}, the served "
                f"bank's conditional tasks as {layout}: one bank takes every map the same way"
            )
        return AdapterEntry(file.stem, file, meta, state, content_hash(state), stamp)

    def _layout(self, meta: dict[str, Any]) -> tuple[int, bool, int] | None:
        cond = meta.get("condition")
        if not cond:
            return None
        size = int(cond.get("size") or self.model_config.input_size)
        return size, bool(cond.get("blocks")), int(cond.get("controlnet_blocks") or 0)

    def fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        """(name, mtime_ns, size) of every .safetensors and .json file of the folder: a stat per file and no read,
        cheap enough to check every few seconds; a change means `scan()` has something to do."""
        found = []
        with os.scandir(self.folder) as it:
            for e in it:
                if e.name.endswith((".safetensors", ".json")) and e.is_file():
                    with contextlib.suppress(FileNotFoundError):  # removed between listing and stat
                        st = e.stat()
                        found.append((e.name, st.st_mtime_ns, st.st_size))
        return tuple(sorted(found))

    def digest(self) -> str:
        """A short hash of the served (task, adapter hash) pairs: equal on two replicas serving the same adapters."""
        pairs = ",".join(f"{n}={e.hash}" for n, e in sorted(self.entries.items()))
        return hashlib.sha256(pairs.encode()).hexdigest()[:16]

    def scan(
        self, commit_lock: threading.Lock | None = None, on_commit: Callable[[], None] | None = None
    ) -> ScanResult:
        """Re-read the folder. New and changed files are read before `commit_lock` is taken (requests keep being
        served from the entries as they were); the new entries then replace the old under it in one step, and
        `on_commit` runs there too. One scan at a time (a watcher and a POST may ask together)."""
        with self.scan_lock:
            return self._scan(commit_lock, on_commit)

    def _scan(self, commit_lock: threading.Lock | None, on_commit: Callable[[], None] | None) -> ScanResult:
        result = ScanResult()
        files = self._files()
        seen = set()
        refused: dict[str, str] = {}
        read: dict[str, AdapterEntry] = {}
        method, targets, layout = self.method, self.targets, self.condition_layout
        for file in files:
            name = file.stem
            seen.add(name)
            old = self.entries.get(name)
            try:
                if old is not None and old.stamp == _stamp(file):
                    continue
                entry = self._read(file, method, targets, layout)
            except (AdapterLoadError, OSError, KeyError, ValueError) as err:
                refused[str(file)] = str(err)
                if str(file) not in self.refused:
                    kept = " (the version read before keeps serving)" if old is not None else ""
                    self.log(f"serve: refused {file}: {err}{kept}")
                continue
            if method is None:
                method, targets = entry.meta["method"], tuple(entry.meta["targets"])
            if layout is None:
                layout = self._layout(entry.meta)
            read[name] = entry
            (result.updated if old is not None else result.added).append(name)
        with commit_lock or contextlib.nullcontext():
            self.method, self.targets, self.condition_layout = method, targets, layout
            result.removed = sorted(set(self.entries) - seen)
            # a new dict, not an edit of the old: a reader iterating the entries (a GET) never sees them change
            self.entries = {n: e for n, e in {**self.entries, **read}.items() if n in seen}
            self.refused = result.refused = refused
            if result.added or result.updated or result.removed:
                self.generation += 1
            if on_commit is not None:
                on_commit()
        if result.added or result.updated or result.removed:
            self.log(
                f"serve: adapters of {self.folder}: {len(self.entries)} served; added {result.added}, "
                f"updated {result.updated}, removed {result.removed}"
            )
        return result


class UnknownTaskError(KeyError):
    """A task the runtime does not serve."""


class TaskRuntime:
    """A backbone, its adapters' catalog and a bank of `max_resident` device slots paged least recently used."""

    def __init__(
        self,
        model: DiT,
        meta: dict[str, Any],
        catalog: AdapterCatalog,
        max_resident: int,
        device: torch.device,
        diffusion: DiffusionConfig | None = None,
    ):
        if model.config.in_channels != 3:
            raise ValueError(
                f"backbone with {model.config.in_channels} input channels: serving and generation take "
                "pixel-space backbones (a latent backbone needs the VAE decoder, not built here)"
            )
        if max_resident < 1:
            raise ValueError(f"max_resident must be at least 1, got {max_resident}")
        self.backbone_state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # host copy: rebuilds
        self.model_config, self.meta, self.catalog = model.config, meta, catalog
        self.max_resident, self.device = max_resident, device
        self.diffusion_config = diffusion or DiffusionConfig()
        self.diffusion = GaussianDiffusion.from_config(self.diffusion_config, learn_sigma=model.config.learn_sigma)
        self.model: DiT | None = None
        self.bank: AdapterBank | None = None
        # (method, targets, rank, classes, condition layout) of the bank
        self.shape: tuple[str, tuple[str, ...], int, int, Any] | None = None
        self.slots: OrderedDict[str, tuple[int, str]] = OrderedDict()  # task -> (slot, adapter hash), LRU first
        self.free: list[int] = []
        self.stats = {"hits": 0, "misses": 0, "page_ins": 0, "page_in_seconds": 0.0, "images": 0}

    @classmethod
    def load(
        cls,
        backbone: str | Path,
        adapters: str | Path,
        max_resident: int = 64,
        device: str = "",
        diffusion: DiffusionConfig | None = None,
        log: Callable[[str], None] | None = None,
    ) -> TaskRuntime:
        """Read the backbone and every adapter of the folder that fits it. Raises BackboneLoadError,
        AdapterLoadError (no adapter at all fits: each file's reason is named)."""
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model, meta = load_backbone(backbone)
        refuse_unet(model.config, backbone)
        catalog = AdapterCatalog(adapters, meta["content_hash"], model.config, log)
        catalog.scan()
        if not catalog.entries:
            reasons = "; ".join(f"{f}: {r}" for f, r in catalog.refused.items()) or "no <task>.safetensors files"
            raise AdapterLoadError(f"--adapters {adapters}: no adapter fits backbone {backbone} ({reasons})")
        runtime = cls(model, meta, catalog, max_resident, dev, diffusion)
        runtime.sync()
        return runtime

    # -- the bank -------------------------------------------------------------------------------------
    def reload(self, lock: threading.Lock | None = None) -> ScanResult:
        """Re-read the adapters folder; resident tasks whose file changed or went are paged out. With `lock` (the one
        batches hold), files are read outside it and only the swap of entries and slots happens under it."""
        return self.catalog.scan(lock, on_commit=self.sync)

    def sync(self) -> None:
        """Build the bank if the catalog needs a larger one (rank, classes), and drop stale slots."""
        entries = self.catalog.entries
        if not entries:
            self.slots.clear()
            return
        method, targets = self.catalog.method or "affiner", self.catalog.targets or ()
        rank = max(e.meta["rank"] for e in entries.values())
        classes = max(e.meta["num_classes"] for e in entries.values())
        layout = self.catalog.condition_layout
        if (
            self.shape is None
            or self.shape[:2] != (method, targets)
            or rank > self.shape[2]
            or classes > self.shape[3]
            or (layout is not None and layout != self.shape[4])
        ):
            self._build(method, targets, max(rank, 1), classes, layout)
        for name, (slot, digest) in list(self.slots.items()):
            entry = entries.get(name)
            if entry is None or entry.hash != digest:
                del self.slots[name]
                self.free.append(slot)
        # free slots take the tasks not resident yet (folder order): no page-in on their first request
        for name in [n for n in entries if n not in self.slots][: len(self.free)]:
            slot = self.free.pop()
            self._page_in(entries[name], slot, count=False)
            self.slots[name] = (slot, entries[name].hash)
            self.slots.move_to_end(name, last=False)  # preloaded tasks are the first to go

    def _build(self, method: str, targets: tuple[str, ...], rank: int, classes: int, layout: Any) -> None:
        model = DiT(self.model_config)
        model.load_state_dict(self.backbone_state)
        # placeholder slots: each takes a task's rank, classes, rows and condition path when the task is paged in
        slots = [TaskInfo(f"slot{i}", classes, classes > 1, rank) for i in range(self.max_resident)]
        _size, blocks, controlnet_blocks = layout or (0, False, 0)
        self.bank = AdapterBank.attach(
            model,
            slots,
            method=method,
            rank=rank,
            targets=targets,
            condition_blocks=blocks,
            controlnet_blocks=controlnet_blocks,
        )
        self.model = model.to(self.device).eval()
        self.shape = (method, targets, rank, classes, layout)
        self.slots.clear()
        self.free = list(range(self.max_resident))

    @torch.no_grad()
    def _page_in(self, entry: AdapterEntry, slot: int, count: bool = True) -> None:
        assert self.bank is not None and self.model is not None
        t0 = time.perf_counter()
        self.bank.set_task(slot, entry.info)  # its classes, rank and condition path (a task with a map)
        self.bank.load_task_state(slot, entry.state, entry.file)
        if count:  # preloading at start or reload is not a page-in on demand
            self.stats["page_ins"] += 1
            self.stats["page_in_seconds"] += time.perf_counter() - t0

    def resident(self) -> list[str]:
        return list(self.slots)

    def _ensure(self, names: Sequence[str]) -> dict[str, int]:
        """Slots of `names` (at most max_resident distinct), paging in the missing, the least recently used out."""
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            if name in self.slots:
                self.slots.move_to_end(name)
                self.stats["hits"] += 1
                continue
            self.stats["misses"] += 1
            entry = self.catalog.entries[name]
            if not self.free:
                victim = next(n for n in self.slots if n not in wanted)  # LRU first; a batch's own tasks stay
                self.free.append(self.slots.pop(victim)[0])
            slot = self.free.pop()
            self._page_in(entry, slot)
            self.slots[name] = (slot, entry.hash)
        return {name: self.slots[name][0] for name in wanted}

    # -- images ---------------------------------------------------------------------------------------
    def check_row(self, row: ImageRow) -> None:
        """ValueError (UnknownTaskError) for a row its task cannot take: a class out of range, a map given to a
        task without maps, a task with maps given none (and not asked `unconditioned`), a map of another shape."""
        entry = self.catalog.entries.get(row.task)
        if entry is None:
            raise UnknownTaskError(row.task)
        n = entry.meta["num_classes"]
        if not 0 <= row.label < n:
            raise ValueError(f"class {row.label} is out of range for task {row.task!r} ({n} class(es))")
        cond = entry.condition
        if cond is None:
            if row.condition is not None:
                raise ValueError(f"task {row.task!r} takes no condition map (trained without one)")
            return
        want = (int(cond["channels"]), int(cond["size"]), int(cond["size"]))
        if row.condition is None:
            if not row.unconditioned:
                raise ValueError(
                    f"task {row.task!r} is conditioned on {cond['kind']} maps {want} (C, H, W): give one, or "
                    "ask for its output without a map explicitly (unconditioned)"
                )
            return
        if row.unconditioned:
            raise ValueError(f"task {row.task!r}: a condition map and unconditioned together")
        shape = tuple(np.shape(row.condition))
        if shape != want or np.asarray(row.condition).dtype != np.uint8:
            raise ValueError(f"task {row.task!r} takes uint8 {cond['kind']} maps {want} (C, H, W), got {shape}")

    def images(
        self,
        rows: Sequence[ImageRow],
        steps: int,
        sampler: str = "ddim",
        guidance: float = 1.0,
        condition_scale: float = 1.0,
    ) -> np.ndarray:
        """uint8 (N, H, W, 3) images of `rows`, one mixed-task batch (split only where more than
        max_resident distinct tasks meet). Rows of tasks with maps carry theirs (`ImageRow.condition`);
        `condition_scale` guides on the map (rows without one are left as they are)."""
        for row in rows:
            self.check_row(row)
        out: list[np.ndarray] = []
        lo = 0
        while lo < len(rows):
            hi, tasks = lo, set()
            while hi < len(rows) and (rows[hi].task in tasks or len(tasks) < self.max_resident):
                tasks.add(rows[hi].task)
                hi += 1
            out.append(self._run(rows[lo:hi], steps, sampler, guidance, condition_scale))
            lo = hi
        self.stats["images"] += len(rows)
        if not out:
            s = self.model_config.input_size
            return np.zeros((0, s, s, 3), np.uint8)
        return np.concatenate(out)

    def _conditions(self, rows: Sequence[ImageRow]) -> dict[str, torch.Tensor]:
        """generate()'s condition arguments for `rows`: maps (N, C_max, S, S) in [-1, 1] (zeros for rows
        without one) and condition_mask (N,), or nothing when no row's task takes a map."""
        if self.bank is None or self.bank.condition_path is None:
            return {}
        mask = torch.tensor([r.condition is not None for r in rows], dtype=torch.bool)
        given = [r.condition for r in rows if r.condition is not None]
        if not given:
            return {"condition_mask": mask}
        from diffscaler.data.conditions import maps_to_unit

        side = given[0].shape[-1]
        maps = np.zeros((len(rows), max(m.shape[0] for m in given), side, side), np.uint8)
        for k, r in enumerate(rows):
            if r.condition is not None:
                maps[k, : r.condition.shape[0]] = r.condition
        return {"condition": torch.from_numpy(maps_to_unit(maps)), "condition_mask": mask}

    def _run(
        self, rows: Sequence[ImageRow], steps: int, sampler: str, guidance: float, condition_scale: float
    ) -> np.ndarray:
        assert self.model is not None
        slots = self._ensure([r.task for r in rows])
        ids = [slots[r.task] for r in rows]
        task_ids: torch.Tensor | int = ids[0] if len(set(ids)) == 1 else torch.tensor(ids, dtype=torch.long)
        x = generate(
            self.model,
            self.diffusion,
            labels=torch.tensor([r.label for r in rows], dtype=torch.long),
            indices=range(len(rows)),
            seed=0,
            task_ids=task_ids,
            steps=steps,
            sampler=sampler,
            cfg_scale=guidance,
            eta=self.diffusion_config.ddim_eta,
            sample_seeds=[r.noise_seed for r in rows],
            condition_scale=condition_scale,
            **self._conditions(rows),
        )
        return to_uint8(x)


def torch_threads(threads: int) -> None:
    """Pin torch's intra-op threads (0 = leave torch's default); Ray actors see all cores otherwise."""
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
