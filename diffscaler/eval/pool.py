"""`FidEvaluator`: a pool of Ray actors that samples (task, adapter) requests and scores FID/KID.

    ray.init()
    with FidEvaluator("runs/backbone/backbone.safetensors", cfg) as ev:
        results = ev.evaluate([request_for_task(cfg, "emoji", "adapters/emoji.safetensors"),
                               request_for_task(cfg, None)])          # None: bare backbone, pretraining set
    print(format_table(results))

How it works
- Each actor (`FidWorker`, cfg.eval.cpus_per_actor CPUs / gpus_per_actor GPUs) loads the backbone
  and the feature network once, at start. Adapted models are built from a copy of the backbone
  and kept while consecutive jobs use the same adapter file.
- A request is split into chunks of sample indices [start, start + count). An actor samples them with
  `sample_images(..., seed, start_index=start)` - sample k always gets seed index k and class label
  k % num_classes - extracts features and returns them. So the score does not depend on the number
  of actors or on how the work was split, up to float rounding of differently sized batches (CPU:
  features agree to ~1e-5; H100 with bf16 sampling: to ~5e-3 absolute, features being O(0.1-1)).
- Reference statistics (stats.py) come from the cache, or their images are sent to the actors in
  chunks too; the driver caches them and computes FID and KID per request with torch-fidelity's code.
- The driver keeps one job in flight per actor and `ray.wait`s on all of them: an actor that dies
  (killed, out of memory) surfaces as `RayActorError` on its job's result - it is replaced by a new
  actor and the job retried once; a job failing twice marks its request failed with the reason (the
  other requests go on). An optional `chunk_timeout_s` kills and replaces an actor that hangs.

Launch on its own: `python -m ray_jobs.evaluate --config ray_jobs/configs/tiny.yaml --backbone FILE
--adapters DIR --out DIR2`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffscaler.adapters.bank import AdapterLoadError
from diffscaler.artifacts import (
    TASK_MODEL_KEY,
    BackboneLoadError,
    load_adapters,
    load_backbone,
    read_backbone_meta,
    read_trained_meta,
)
from diffscaler.atomic import write_text_atomic
from diffscaler.config import ExperimentConfig, config_from_json
from diffscaler.diffusion.gaussian import GaussianDiffusion
from diffscaler.diffusion.sampling import sample_images
from diffscaler.errors import last_error_line
from diffscaler.eval.stats import (
    EvalInputError,
    ReferencePlan,
    ReferenceStats,
    _stats_from_features,
    feature_statistics,
    frechet_distance,
    kid_from_features,
    load_cached,
    load_reference_images,
    nearest_centroid_accuracy,
    plan_reference,
    save_cached,
)
from diffscaler.vae import VaeError, cached_vae_identity

MAX_ATTEMPTS = 2  # a job is tried at most twice (one retry), on a fresh actor after a death


# ------------------------------------------------------------------------------------------------
# Requests and results
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalRequest:
    task: str | None  # task name in cfg.data.targets; None = bare backbone on the pretraining set
    adapter_path: str | None = None  # <task>.safetensors (JSON beside it); None = bare backbone
    shards_dir: str = ""  # dataset folder; its eval split is the reference ("" = from cfg.data)
    num_samples: int | None = None  # generated images (None = cfg.eval.num_samples)
    seed: int | None = None  # base of the per-sample seeds (None = cfg.eval.seed)
    steps: int | None = None  # sampler steps (None = cfg.eval.sampling_steps)
    sampler: str | None = None  # ddim | ddpm (None = cfg.diffusion.sampler)
    cfg_scale: float | None = None  # guidance scale (None = cfg.diffusion.cfg_scale)
    num_reference: int | None = None  # reference images (None = cfg.eval.num_reference; 0 = all)
    label: str = ""  # free text echoed in the result (trial id, method)
    # generated: sample the model (no adapter_path with a task: the bare backbone's samples over its classes,
    # scored against the task: the comparison's "no adapter" row); real: the floor - the task's real images
    # of the other split, as many as num_samples allows, scored against the reference split
    source: str = "generated"


@dataclass(frozen=True)
class EvalResult:
    task: str | None  # None = bare backbone
    adapter: str  # adapter file ("" = bare backbone)
    label: str
    status: str  # "ok" | "failed"
    error: str  # the reason when failed
    fid: float | None  # Fréchet distance on `feature_network` features
    kid_mean: float | None  # KID (polynomial kernel, torch-fidelity), mean over subsets
    kid_std: float | None
    feature_network: str  # every score names its feature network...
    num_generated: int  # ...and its sample counts
    num_reference: int
    seconds: float  # wall-clock s from the request's first job to its score
    sample_seconds: float  # actor s spent sampling (summed over chunks)
    feature_seconds: float  # actor s spent in the feature network (generated images)
    seed: int
    steps: int
    sampler: str
    cfg_scale: float
    dataset: str  # shard folder of the reference
    dataset_hash: str  # its index.json content hash
    image_size: int  # side of the compared images
    method: str  # adapter method ("" for the bare backbone)
    rank: int  # adapter rank (0 for the bare backbone)
    features: np.ndarray | None = field(default=None, repr=False, compare=False)  # (N, D) if asked
    # share of the images a nearest-centroid classifier (feature network, fitted on every target's reference
    # images) assigns to this task's dataset; None when not computed
    task_accuracy: float | None = None
    source: str = "generated"  # generated | real (the floor row)
    reference_split: str = "eval"  # the split the images were scored against

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, features=None))
        d.pop("features")
        return d


# ------------------------------------------------------------------------------------------------
# The actor
# ------------------------------------------------------------------------------------------------


class FidWorker:
    """Holds the backbone and the feature network; samples chunks and extracts features."""

    def __init__(self, backbone_path: str, cfg_dict: dict[str, Any]):
        import torch

        from diffscaler.eval.features import build_feature_extractor

        cfg = config_from_json(cfg_dict)
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.eval.gpus_per_actor > 0 and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(cfg.eval.cpus_per_actor)))  # Ray's CPU share, not the whole node
        model, meta = load_backbone(backbone_path)
        self.backbone = model.to(self.device).eval()
        self.backbone_hash = meta["content_hash"]
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion, learn_sigma=self.backbone.config.learn_sigma)
        self.extractor = build_feature_extractor(cfg.eval.feature_network, cfg.eval.feature_weights_path, self.device)
        self.vae = None  # a latent backbone's samples are decoded here, next to the feature network
        if self.backbone.config.in_channels != 3:
            from diffscaler.vae import load_vae

            self.vae = load_vae(cfg.data.vae, cfg.data.vae_config or None, device=str(self.device))
        self._adapted: tuple[str, Any] | None = None  # (adapter key, model) of the last adapter used

    def pid(self) -> int:
        return os.getpid()

    def _model_for(self, adapter_path: str | None, task_model: bool = False):
        if not adapter_path:
            return self.backbone
        st = os.stat(adapter_path)
        key = f"{os.path.abspath(adapter_path)}|{st.st_size}|{st.st_mtime_ns}"
        if self._adapted is None or self._adapted[0] != key:
            self._adapted = None  # free the previous copy first
            if task_model:  # a whole model of its own (scratch): no backbone underneath
                model, _meta = load_backbone(adapter_path)
            else:
                model = copy.deepcopy(self.backbone)
                load_adapters(model, [adapter_path], self.backbone_hash)
            self._adapted = (key, model.to(self.device).eval())
        return self._adapted[1]

    def sample_features(self, job: dict[str, Any]) -> dict[str, Any]:
        """Samples [start, start + count) of one request -> features (count, D) float32."""
        import torch

        from diffscaler.eval.features import extract_features

        t0 = time.perf_counter()
        task_model = bool(job.get("task_model"))
        model = self._model_for(job["adapter_path"], task_model)
        start, count, num_classes = job["start"], job["count"], job["num_classes"]
        labels = [(start + k) % num_classes for k in range(count)]  # by global index: split-independent
        task_ids = [0] * count if job["adapter_path"] and not task_model else None  # task 0 of its bank
        autocast = torch.bfloat16 if self.device.type == "cuda" else None
        images = sample_images(
            model,
            self.diffusion,
            num=count,
            seed=job["seed"],
            labels=labels,
            task_ids=task_ids,
            start_index=start,
            batch_size=self.cfg.eval.batch_size,
            steps=job["steps"],
            sampler=job["sampler"],
            cfg_scale=job["cfg_scale"],
            eta=self.cfg.diffusion.ddim_eta,
            autocast_dtype=autocast,
            decode=self.vae.decode if self.vae is not None else None,
        )  # (count, H, W, C) uint8 (decoded through data.vae for a latent backbone)
        t1 = time.perf_counter()
        feats = extract_features(self.extractor, images, self.cfg.eval.batch_size)  # (count, D)
        t2 = time.perf_counter()
        return {"features": feats, "sample_seconds": t1 - t0, "feature_seconds": t2 - t1, "pid": os.getpid()}

    def image_features(self, images: np.ndarray) -> dict[str, Any]:
        """Reference images uint8 (N, H, W, 3) -> features (N, D) float32."""
        from diffscaler.eval.features import extract_features

        t0 = time.perf_counter()
        feats = extract_features(self.extractor, images, self.cfg.eval.batch_size)
        return {"features": feats, "feature_seconds": time.perf_counter() - t0, "pid": os.getpid()}


# ------------------------------------------------------------------------------------------------
# Request resolution (driver side, before any work)
# ------------------------------------------------------------------------------------------------


def task_names(cfg: ExperimentConfig) -> list[str]:
    return [t.name for t in cfg.data.targets]


def request_for_task(
    cfg: ExperimentConfig, task: str | None, adapter_path: str | None = None, **overrides: Any
) -> EvalRequest:
    """A request whose reference is the task's shard folder under cfg.data.shards_root."""
    from diffscaler.data.build import dataset_dir, pretrain_dataset_dir

    if task is None:
        return EvalRequest(task=None, adapter_path=adapter_path, shards_dir=pretrain_dataset_dir(cfg.data), **overrides)
    if task not in task_names(cfg):
        where = f"adapter {adapter_path}: " if adapter_path else ""
        raise EvalInputError(f"{where}task {task!r} is not in data.targets {task_names(cfg)}; no shards to score it on")
    return EvalRequest(task=task, adapter_path=adapter_path, shards_dir=dataset_dir(cfg.data, task), **overrides)


def requests_for_adapter_dir(cfg: ExperimentConfig, adapters_dir: str, **overrides: Any) -> list[EvalRequest]:
    """One request per `<task>.safetensors` in `adapters_dir` (task read from the JSON beside it)."""
    folder = Path(adapters_dir)
    if not folder.is_dir():
        raise EvalInputError(f"adapter folder not found: {folder}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EvalInputError(f"{folder}: no <task>.safetensors adapter files")
    out = []
    for f in files:
        meta_path = f.with_suffix(".json")
        if not meta_path.is_file():
            raise EvalInputError(f"{f}: its config {meta_path.name} is missing beside it")
        try:
            task = json.loads(meta_path.read_text())["task"]
        except (json.JSONDecodeError, KeyError) as err:
            raise EvalInputError(f"{meta_path}: not an adapter config ({err})") from None
        out.append(request_for_task(cfg, task, str(f), **overrides))
    return out


@dataclass
class _Resolved:
    """A request with every default filled in and its inputs checked."""

    request: EvalRequest
    num_samples: int
    seed: int
    steps: int
    sampler: str
    cfg_scale: float
    num_classes: int
    method: str
    rank: int
    plan: ReferencePlan
    task_model: bool = False  # adapter_path is a whole model of its own (scratch)
    real_plan: ReferencePlan | None = None  # source "real": the other split's images stand in for samples


def pixel_side(model: dict[str, Any], cfg: ExperimentConfig) -> int:
    """Side of the images a backbone's samples become: its input for pixels, times data.vae's downsampling."""
    if model["in_channels"] == 3:
        return int(model["input_size"])
    return int(model["input_size"]) * int(cached_vae_identity(cfg.data.vae, cfg.data.vae_config or None)["downsample"])


def _check_vae(model: dict[str, Any], cfg: ExperimentConfig, where: str) -> str:
    """data.vae's hash for a latent backbone ("" for pixels); EvalInputError when it cannot decode its samples."""
    if model["in_channels"] == 3:
        return ""
    if not cfg.data.vae:
        raise EvalInputError(f"{where}: the backbone takes {model['in_channels']}-channel latents; FID scores decoded "
                             "images: set data.vae=PATH (the VAE its shards were encoded with)")  # fmt: skip
    try:
        ident = cached_vae_identity(cfg.data.vae, cfg.data.vae_config or None)
    except VaeError as err:
        raise EvalInputError(f"{where}: data.vae: {err}") from None
    if ident["latent_channels"] != model["in_channels"]:
        raise EvalInputError(f"{where}: data.vae {cfg.data.vae} makes {ident['latent_channels']}-channel latents, the "
                             f"backbone takes {model['in_channels']}")  # fmt: skip
    return str(ident["hash"])


def _check_shards_vae(shards: str, vae_hash: str, where: str) -> None:
    from diffscaler.data.index import load_index

    index = load_index(shards)
    if vae_hash and index.latent and index.vae_hash and index.vae_hash != vae_hash:
        raise EvalInputError(f"{where}: shards at {shards} were encoded with VAE {index.vae_hash}, data.vae is "
                             f"{vae_hash}")  # fmt: skip


def _resolve(req: EvalRequest, cfg: ExperimentConfig, backbone_meta: dict[str, Any], where: str) -> _Resolved:
    from diffscaler.data.build import dataset_dir, pretrain_dataset_dir

    model = backbone_meta["model"]
    vae_hash = _check_vae(model, cfg, where)
    method, rank, num_classes = "", 0, int(model["num_classes"])
    task_model = False
    if req.source not in ("generated", "real"):
        raise EvalInputError(f"{where}: source {req.source!r} is not generated or real")
    if req.source == "real" and req.adapter_path:
        raise EvalInputError(f"{where}: a real-images (floor) request takes no adapter")
    if req.adapter_path:
        try:
            meta = read_trained_meta(req.adapter_path)
        except AdapterLoadError as err:
            raise EvalInputError(f"{where}: {err}") from None
        task_model = bool(meta.get(TASK_MODEL_KEY))
        if meta["task"] not in task_names(cfg):
            raise EvalInputError(
                f"{where}: adapter {req.adapter_path} is for task {meta['task']!r}, which is not in "
                f"data.targets {task_names(cfg)}; there are no shards to score it on"
            )
        if req.task is not None and meta["task"] != req.task:
            raise EvalInputError(
                f"{where}: adapter {req.adapter_path} is for task {meta['task']!r}, the request says {req.task!r}"
            )
        bh = backbone_meta.get("content_hash")
        if bh and meta.get("backbone_hash") != bh:
            raise EvalInputError(
                f"{where}: adapter {req.adapter_path} was trained on backbone "
                f"{meta.get('backbone_hash')!r}, not on the evaluated one ({bh!r})"
            )
        task = meta["task"]
        method, rank = meta["method"], int(meta["rank"])
        num_classes = int(meta["num_classes"]) if meta.get("conditional") else 1
    else:  # the bare backbone (class-conditional over its own classes), or a task's real images
        if req.task is not None and req.task not in task_names(cfg):
            raise EvalInputError(f"{where}: task {req.task!r} is not in data.targets {task_names(cfg)}")
        task = req.task
        method = "real" if req.source == "real" else ""
    shards = req.shards_dir or (pretrain_dataset_dir(cfg.data) if task is None else dataset_dir(cfg.data, task))
    num_samples = cfg.eval.num_samples if req.num_samples is None else req.num_samples
    if num_samples < 2:
        raise EvalInputError(f"{where}: num_samples={num_samples}; FID needs at least 2 generated images")
    steps = cfg.eval.sampling_steps if req.steps is None else req.steps
    if not 1 <= steps <= cfg.diffusion.num_timesteps:
        raise EvalInputError(f"{where}: steps={steps} is not in [1, {cfg.diffusion.num_timesteps}]")
    sampler = req.sampler or cfg.diffusion.sampler
    if sampler not in ("ddim", "ddpm"):
        raise EvalInputError(f"{where}: sampler {sampler!r} is not ddim or ddpm")
    real_plan = None
    try:
        plan = plan_reference(shards, cfg, req.num_reference, image_size=pixel_side(model, cfg))
        _check_shards_vae(shards, vae_hash, where)
        if req.source == "real":
            other = "train" if plan.split == "eval" else "eval"
            available = plan_reference(shards, cfg, 0, image_size=plan.image_size, split=other).available
            real_plan = plan_reference(shards, cfg, min(num_samples, available), image_size=plan.image_size,
                                       split=other)  # fmt: skip
    except EvalInputError as err:
        raise EvalInputError(f"{where}: {err}") from None
    return _Resolved(
        request=replace(req, task=task, shards_dir=shards), num_samples=num_samples,
        seed=cfg.eval.seed if req.seed is None else req.seed, steps=steps, sampler=sampler,
        cfg_scale=cfg.diffusion.cfg_scale if req.cfg_scale is None else float(req.cfg_scale),
        num_classes=num_classes, method=method, rank=rank, plan=plan, task_model=task_model, real_plan=real_plan,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The pool (driver side)
# ------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    kind: str  # "sample" | "reference"
    owner: int  # request index (sample) or reference index (reference)
    start: int  # first sample / image index
    count: int
    payload: dict[str, Any] | np.ndarray
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


ProgressFn = Callable[[dict[str, Any]], None]


class FidEvaluator:
    """A pool of `FidWorker` actors; see the module docstring. Needs an initialised Ray connection."""

    def __init__(
        self,
        backbone_path: str,
        cfg: ExperimentConfig,
        num_actors: int | None = None,
        *,
        chunk_size: int | None = None,
        chunk_timeout_s: float | None = None,
    ):
        import ray

        from diffscaler.eval.features import FeatureWeightsError, resolve_weights_path

        if not ray.is_initialized():
            raise RuntimeError("FidEvaluator needs a Ray connection: call ray.init() (or ray.init(address=...)) first")
        path = Path(backbone_path)
        try:
            if path.suffix == ".pt":
                if not path.is_file():
                    raise BackboneLoadError(f"DiT checkpoint not found: {path}")
                from diffscaler.artifacts import load_backbone

                _model, self.backbone_meta = load_backbone(path)
            else:
                self.backbone_meta = read_backbone_meta(path)
        except BackboneLoadError as err:
            raise EvalInputError(str(err)) from None
        try:
            resolve_weights_path(cfg.eval.feature_network, cfg.eval.feature_weights_path)
        except FeatureWeightsError as err:
            raise EvalInputError(str(err)) from None
        self.cfg = cfg
        self.backbone_path = str(path)
        self.num_actors = num_actors or cfg.eval.num_actors
        if self.num_actors < 1:
            raise EvalInputError(f"num_actors must be >= 1, got {self.num_actors}")
        self.chunk_size = chunk_size
        self.chunk_timeout_s = chunk_timeout_s
        total = ray.cluster_resources()
        if cfg.eval.cpus_per_actor > total.get("CPU", 0) or cfg.eval.gpus_per_actor > total.get("GPU", 0):
            # Not an error: an autoscaler may still add such a node. Without one the actors stay pending.
            warnings.warn(
                f"eval asks {cfg.eval.cpus_per_actor} CPU + {cfg.eval.gpus_per_actor} GPU per actor, but the Ray "
                f"cluster has {total.get('CPU', 0)} CPU + {total.get('GPU', 0)} GPU now: the actors stay pending "
                "until a node that fits joins (set eval.cpus_per_actor / eval.gpus_per_actor, or chunk_timeout_s)",
                stacklevel=2,
            )
        self._actor_cls = ray.remote(FidWorker).options(
            num_cpus=cfg.eval.cpus_per_actor, num_gpus=cfg.eval.gpus_per_actor, max_restarts=0, max_task_retries=0
        )
        self._cfg_dict = cfg.to_dict()
        self._actors: list[Any] = [self._start_actor() for _ in range(self.num_actors)]
        self._pid_refs: list[Any] = [a.pid.remote() for a in self._actors]
        self.actors_replaced = 0  # actors that died (or hung) and were replaced, over this pool's life

    # -- actors ---------------------------------------------------------------------------------

    def _start_actor(self):
        return self._actor_cls.remote(self.backbone_path, self._cfg_dict)

    def _replace_actor(self, slot: int) -> None:
        import ray

        with contextlib.suppress(Exception):  # already gone
            ray.kill(self._actors[slot], no_restart=True)
        self._actors[slot] = self._start_actor()
        self._pid_refs[slot] = self._actors[slot].pid.remote()
        self.actors_replaced += 1

    def actor_pid(self, slot: int, timeout: float = 120.0) -> int:
        """Process id of the actor in `slot` (waits for it to start); for tests and diagnostics."""
        import ray

        return int(ray.get(self._pid_refs[slot], timeout=timeout))

    def actor_pids(self, timeout: float = 120.0) -> list[int]:
        return [self.actor_pid(s, timeout) for s in range(len(self._actors))]

    def shutdown(self) -> None:
        import ray

        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self._actors = []

    def __enter__(self) -> FidEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- scheduling -----------------------------------------------------------------------------

    def _chunks(self, total: int) -> list[tuple[int, int]]:
        """[(start, count)] covering [0, total): at most batch_size each, their number a multiple of the
        actor count when possible, so every actor gets an equal share (48 on 2 actors, batch 16: 4 x 12)."""
        if self.chunk_size:
            size = self.chunk_size
        else:
            n = math.ceil(total / self.cfg.eval.batch_size)
            n = min(total, math.ceil(n / self.num_actors) * self.num_actors)
            size = max(1, math.ceil(total / n))
        return [(lo, min(size, total - lo)) for lo in range(0, total, size)]

    def _submit(self, slot: int, job: _Job):
        actor = self._actors[slot]
        if job.kind == "sample":
            return actor.sample_features.remote({**job.payload, "start": job.start, "count": job.count})
        return actor.image_features.remote(job.payload)

    def _run(self, jobs: list[_Job], progress: ProgressFn | None) -> tuple[dict[int, dict], dict[int, str]]:
        """Run every job; returns ({job id: result}, {job id: failure reason}). Never raises for a job."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

        if not self._actors:
            raise RuntimeError("this FidEvaluator was shut down")
        queue = deque(range(len(jobs)))
        idle = deque(range(len(self._actors)))
        inflight: dict[Any, tuple[int, int, float]] = {}  # ref -> (slot, job id, submit time)
        results: dict[int, dict] = {}
        failed: dict[int, str] = {}
        dead_owners: set[tuple[str, int]] = set()  # requests already failed: skip their other jobs

        def emit(event: str, jid: int, slot: int, **extra: Any) -> None:
            if progress is not None:
                j = jobs[jid]
                progress(
                    {
                        "event": event,
                        "kind": j.kind,
                        "owner": j.owner,
                        "start": j.start,
                        "count": j.count,
                        "attempt": j.attempts + 1,
                        "slot": slot,
                        **extra,
                    }
                )

        def fail(jid: int, slot: int, reason: str) -> None:
            job = jobs[jid]
            job.errors.append(reason)
            job.attempts += 1
            if job.attempts < MAX_ATTEMPTS:
                emit("retry", jid, slot, reason=reason)
                queue.appendleft(jid)  # retried next, on whichever actor is free (a fresh one after a death)
                return
            failed[jid] = f"failed {job.attempts} times: " + " | ".join(job.errors)
            dead_owners.add((job.kind, job.owner))
            emit("failed", jid, slot, reason=failed[jid])

        while queue or inflight:
            while queue and idle:
                jid = queue.popleft()
                if (jobs[jid].kind, jobs[jid].owner) in dead_owners:
                    failed[jid] = "skipped: another part of this request failed"
                    continue
                slot = idle.popleft()
                inflight[self._submit(slot, jobs[jid])] = (slot, jid, time.monotonic())
                emit("submitted", jid, slot)
            if not inflight:
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=1.0)
            if not ready:
                if self.chunk_timeout_s:
                    now = time.monotonic()
                    for ref, (slot, jid, t0) in list(inflight.items()):
                        if now - t0 > self.chunk_timeout_s:  # a hung actor: kill it, treat as a death
                            del inflight[ref]
                            self._replace_actor(slot)
                            idle.append(slot)
                            fail(jid, slot, f"no result after {self.chunk_timeout_s:.0f} s; actor killed and replaced")
                continue
            for ref in ready:
                slot, jid = inflight.pop(ref)[:2]
                try:
                    out = ray.get(ref)
                except RayActorError as err:  # died: killed, OOM, crashed, or failed to start
                    self._replace_actor(slot)
                    fail(jid, slot, f"actor died ({type(err).__name__}: {last_error_line(err)})")
                except RayTaskError as err:  # the job raised; the actor itself is fine
                    cause = err.cause or err
                    fail(jid, slot, f"{type(cause).__name__}: {last_error_line(cause)}")
                except (RayError, GetTimeoutError) as err:  # worker crash, lost object: start afresh
                    self._replace_actor(slot)
                    fail(jid, slot, f"{type(err).__name__}: {last_error_line(err)}")
                else:
                    results[jid] = out
                    emit("done", jid, slot, pid=out.get("pid"))
                idle.append(slot)
        return results, failed

    # -- public ---------------------------------------------------------------------------------

    def resolve(self, requests: Sequence[EvalRequest]) -> list[_Resolved]:
        """Fill defaults and check every request; EvalInputError names the request, file or numbers."""
        out = []
        for i, req in enumerate(requests):
            where = f"request {i} ({req.label or req.task or 'backbone'})"
            out.append(_resolve(req, self.cfg, self.backbone_meta, where))
        return out

    def reference(self, shards_dir: str, num_reference: int | None = None) -> ReferenceStats:
        """Reference statistics of `shards_dir` (cache, or computed on the pool and cached)."""
        size = pixel_side(self.backbone_meta["model"], self.cfg)
        plans = [plan_reference(shards_dir, self.cfg, num_reference, image_size=size)]
        refs, jobs = self._reference_jobs(plans)
        results, failed = self._run(jobs, None) if jobs else ({}, {})
        refs |= self._collect_references(plans, jobs, results)
        if 0 not in refs:
            reason = _owner_errors(jobs, failed, "reference").get(0, "unknown")
            raise RuntimeError(f"reference features of {shards_dir} failed: {reason}")
        return refs[0]

    def _reference_jobs(self, plans: list[ReferencePlan]) -> tuple[dict[int, ReferenceStats], list[_Job]]:
        """Cached references, and feature jobs (image chunks) for the others."""
        refs: dict[int, ReferenceStats] = {}
        jobs: list[_Job] = []
        for p, plan in enumerate(plans):
            cached = load_cached(plan)
            if cached is not None:
                refs[p] = cached
                continue
            images = load_reference_images(plan)  # (N, S, S, 3) uint8
            jobs += [_Job("reference", p, lo, n, images[lo : lo + n]) for lo, n in self._chunks(len(images))]
        return refs, jobs

    @staticmethod
    def _collect_references(plans: list[ReferencePlan], jobs: list[_Job], results: dict[int, dict]
                            ) -> dict[int, ReferenceStats]:  # fmt: skip
        """Stats (and a cache file) for every plan whose feature jobs all succeeded."""
        out = {}
        for p, plan in enumerate(plans):
            mine = sorted((j.start, jid) for jid, j in enumerate(jobs) if j.kind == "reference" and j.owner == p)
            if mine and all(jid in results for _s, jid in mine):
                feats = np.concatenate([results[jid]["features"] for _s, jid in mine])  # (N, D) in image order
                out[p] = _stats_from_features(plan, feats, save_cached(plan, feats))
        return out

    def _centroid_plans(self, resolved: list[_Resolved]) -> list[ReferencePlan]:
        """One reference plan per target (the classifier's classes) when every request's task is a target."""
        from diffscaler.data.build import dataset_dir

        tasks = {res.request.task for res in resolved}
        if not resolved or None in tasks or not self.cfg.eval.reference_rows:
            return []
        size = pixel_side(self.backbone_meta["model"], self.cfg)
        try:
            return [plan_reference(dataset_dir(self.cfg.data, t), self.cfg, None, image_size=size)
                    for t in task_names(self.cfg)]  # fmt: skip
        except EvalInputError:
            return []  # a target without shards: no classifier, the scores still come

    def evaluate(
        self, requests: Sequence[EvalRequest], *, return_features: bool = False, progress: ProgressFn | None = None,
        task_accuracy: bool | None = None,
    ) -> list[EvalResult]:
        """Score every request; results in request order. Bad input raises EvalInputError up front;
        work that fails twice gives a result with status "failed" and the reason. `task_accuracy` (default:
        eval.reference_rows, and every request on a target) fits a nearest-centroid classifier on the targets'
        reference features and reports the share of each request's images assigned to its own task."""
        resolved = self.resolve(requests)
        t_start = time.perf_counter()
        # Reference plans, deduplicated (several requests often share a dataset).
        plans: list[ReferencePlan] = []
        plan_of: list[int] = []
        real_of: dict[int, int] = {}  # request -> plan of the real images that stand in for its samples
        for i, res in enumerate(resolved):
            for plan in (res.plan, res.real_plan):
                if plan is not None and plan not in plans:
                    plans.append(plan)
            plan_of.append(plans.index(res.plan))
            if res.real_plan is not None:
                real_of[i] = plans.index(res.real_plan)
        centroid_plans = self._centroid_plans(resolved) if task_accuracy is None or task_accuracy else []
        for plan in centroid_plans:
            if plan not in plans:
                plans.append(plan)

        # One queue: missing reference features first, then every request's sample chunks.
        refs, jobs = self._reference_jobs(plans)
        for i, res in enumerate(resolved):
            if res.real_plan is not None:
                continue  # its "samples" are the real images of real_plan, featurized as a reference
            payload = {
                "task_model": res.task_model,
                "adapter_path": res.request.adapter_path,
                "seed": res.seed,
                "steps": res.steps,
                "sampler": res.sampler,
                "cfg_scale": res.cfg_scale,
                "num_classes": res.num_classes,
            }
            jobs += [_Job("sample", i, lo, n, payload) for lo, n in self._chunks(res.num_samples)]
        first_submit: dict[int, float] = {}

        def track(event: dict[str, Any]) -> None:
            if event["kind"] == "sample" and event["event"] == "submitted":
                first_submit.setdefault(event["owner"], time.perf_counter())
            if progress is not None:
                progress(event)

        results, failed = self._run(jobs, track)
        refs |= self._collect_references(plans, jobs, results)
        ref_errors = _owner_errors(jobs, failed, "reference")
        req_errors = _owner_errors(jobs, failed, "sample")

        centroids = None  # (K, D): one per target, from its reference features
        if centroid_plans and all(plans.index(c) in refs for c in centroid_plans):
            centroids = np.stack([refs[plans.index(c)].features.mean(0) for c in centroid_plans])
        out = []
        for i, res in enumerate(resolved):
            p = plan_of[i]
            error = ""
            if p not in refs:
                error = f"reference features of {res.plan.dataset} failed: {ref_errors.get(p, 'unknown')}"
            elif i in real_of and real_of[i] not in refs:
                error = f"features of the real images failed: {ref_errors.get(real_of[i], 'unknown')}"
            elif i in req_errors:
                error = req_errors[i]
            mine = sorted((j.start, jid) for jid, j in enumerate(jobs) if j.kind == "sample" and j.owner == i)
            done = [results[jid] for _s, jid in mine if jid in results]
            base = dict(
                task=res.request.task, adapter=res.request.adapter_path or "", label=res.request.label,
                feature_network=res.plan.feature_network, num_reference=res.plan.num_reference,
                sample_seconds=round(sum(d["sample_seconds"] for d in done), 3),
                feature_seconds=round(sum(d["feature_seconds"] for d in done), 3), seed=res.seed, steps=res.steps,
                sampler=res.sampler, cfg_scale=res.cfg_scale, dataset=res.plan.dataset,
                dataset_hash=res.plan.dataset_hash, image_size=res.plan.image_size, method=res.method, rank=res.rank,
                source=res.request.source, reference_split=res.plan.split,
            )  # fmt: skip
            if error:
                out.append(
                    EvalResult(
                        status="failed",
                        error=error,
                        fid=None,
                        kid_mean=None,
                        kid_std=None,
                        num_generated=sum(len(d["features"]) for d in done),
                        seconds=round(time.perf_counter() - first_submit.get(i, t_start), 3),
                        **base,
                    )
                )
                continue
            if i in real_of:
                feats = refs[real_of[i]].features  # (N, D): the real images of the other split
            else:
                feats = np.concatenate([d["features"] for d in done])  # (num_samples, D), in sample order
            ref = refs[p]
            accuracy = None
            if centroids is not None:
                accuracy = nearest_centroid_accuracy(feats, centroids, task_names(self.cfg).index(res.request.task))
            fid = frechet_distance(feature_statistics(feats), {"mu": ref.mu, "sigma": ref.sigma})
            kid_mean, kid_std = kid_from_features(feats, ref.features, self.cfg.eval.kid_subset_size)
            out.append(EvalResult(
                status="ok", error="", fid=fid, kid_mean=kid_mean, kid_std=kid_std, num_generated=len(feats),
                seconds=round(time.perf_counter() - first_submit.get(i, t_start), 3),
                features=feats if return_features else None, task_accuracy=accuracy, **base,
            ))  # fmt: skip
        return out


def _owner_errors(jobs: list[_Job], failed: dict[int, str], kind: str) -> dict[int, str]:
    """{owner: reason} for failed jobs of `kind`; a real failure wins over "skipped"."""
    errors: dict[int, str] = {}
    for jid, reason in sorted(failed.items()):
        owner = jobs[jid].owner
        if jobs[jid].kind == kind and (owner not in errors or errors[owner].startswith("skipped")):
            errors[owner] = reason
    return errors


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


def format_table(results: Sequence[EvalResult]) -> str:
    """A fixed-width table: one row per result, units and feature network in the header."""
    net = sorted({r.feature_network for r in results})
    head = (
        f"{'task':<14} {'label':<12} {'method':<8} {'rank':>4} {'FID':>9} {'KID':>10} {'±':>8} "
        f"{'gen':>5} {'ref':>5} {'s':>7}  status"
    )
    lines = [
        f"FID / KID on {', '.join(net)} features (not comparable with Inception FID unless that is the network)",
        head,
        "-" * len(head),
    ]
    for r in results:
        fid = f"{r.fid:9.3f}" if r.fid is not None else f"{'-':>9}"
        kid = f"{r.kid_mean:10.5f}" if r.kid_mean is not None else f"{'-':>10}"
        std = f"{r.kid_std:8.5f}" if r.kid_std is not None else f"{'-':>8}"
        status = r.status if r.status == "ok" else f"FAILED: {r.error[:80]}"
        lines.append(
            f"{(r.task or '(backbone)'):<14} {r.label[:12]:<12} {r.method or '-':<8} {r.rank:>4} {fid} {kid} "
            f"{std} {r.num_generated:>5} {r.num_reference:>5} {r.seconds:>7.1f}  {status}"
        )
    return "\n".join(lines)


def write_fid_json(results: Sequence[EvalResult], path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """`{"results": [...], "by_task": {key: result}, **extra}` written atomically (temp name, rename).

    The key is the task name ("(backbone)" for the bare backbone); a task scored several times (methods,
    trials) is keyed "label/task" instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.to_dict() for r in results]
    names = [r["task"] or "(backbone)" for r in rows]
    keys = [f"{r['label']}/{n}" if names.count(n) > 1 else n for r, n in zip(rows, names)]
    if len(set(keys)) < len(keys):  # same task and label twice: fall back to positions
        keys = [f"{i}:{k}" for i, k in enumerate(keys)]
    doc = {
        "format": "diffscaler-fid",
        "format_version": 1,
        "units": {
            "fid": "Fréchet distance on the named feature network's features",
            "kid_mean": "MMD² (poly kernel)",
            "seconds": "s wall-clock",
            "sample_seconds": "actor s",
            "feature_seconds": "actor s",
        },
        **(extra or {}),
        "results": rows,
        "by_task": dict(zip(keys, rows)),
    }
    write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
