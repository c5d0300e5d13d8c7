"""`FidEvaluator`: a pool of `FidWorker` actors that scores FID/KID of many requests in one queue.

    with FidEvaluator("runs/backbone/backbone.safetensors", cfg) as ev:   # after ray.init()
        results = ev.evaluate([request_for_task(cfg, "emoji", "adapters/emoji.safetensors"),
                               request_for_task(cfg, None)])          # None: bare backbone, pretraining set

Each request becomes chunks of sample indices (and missing reference statistics chunks of images), one in
flight per actor. An actor that dies (killed, out of memory, its node gone) surfaces as `RayActorError` on
its chunk: a new actor replaces it and the chunk is retried once; a chunk failing twice fails its request
alone, with the reason. A replacement lost before it started (its constructor never ran: scheduled on a node
that was already gone but not yet declared dead, CI saw it) does not spend the chunk's retry: the chunk never
ran. Such losses are bounded too (MAX_UNSTARTED), so an actor that cannot start at all still fails the request.
The scores are those of an undisturbed run: a chunk's samples depend only on their indices.
The driver computes FID/KID from the features (stats.py).

Why not Ray's own `max_restarts` / `max_task_retries` (tried for issue 25): with an actor lost with its node
(tests/test_spot_nodes.py), Ray spent the chunk's retry on "actor temporarily unavailable" errors (connection
refused at the dead node's address) before it declared the node dead, and the chunk failed.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffscaler.artifacts import BackboneLoadError, load_backbone, read_backbone_meta
from diffscaler.config import ExperimentConfig
from diffscaler.data import load_index, read_split
from diffscaler.data.build import dataset_dir
from diffscaler.errors import last_error_line
from diffscaler.eval.fidelity import METRICS, reference_rows
from diffscaler.eval.requests import EvalRequest, accuracy_classes
from diffscaler.eval.resolve import ResolvedRequest, pixel_side, resolve_request
from diffscaler.eval.results import EvalResult
from diffscaler.eval.stats import (
    EvalInputError,
    ReferencePlan,
    ReferenceStats,
    cache_reference,
    feature_statistics,
    frechet_distance,
    kid_from_features,
    load_cached,
    load_reference_images,
    nearest_centroid_accuracy,
    plan_reference,
)
from diffscaler.eval.worker import FidWorker

MAX_ATTEMPTS = 2  # a job is tried at most twice (one retry), on a fresh actor after a death
MAX_UNSTARTED = 2  # actors lost before they started that a job may see before those count as attempts


@dataclass
class _Job:
    kind: str  # "sample" | "reference"
    owner: int  # request index (sample) or reference index (reference)
    start: int  # first sample / image index
    count: int
    payload: dict[str, Any] | np.ndarray
    attempts: int = 0
    unstarted: int = 0  # times its actor was lost before the actor started (the job never ran)
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
        self.backbone_path = str(path.resolve())  # the actors' working directory may not be the driver's
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

    def _actor_started(self, slot: int) -> bool:
        """True when the actor in `slot` ran its constructor: its first call (`pid`) answered. Calls to one actor
        run in order, so a chunk that ran on it comes after that answer."""
        import ray
        from ray.exceptions import RayError

        ref = self._pid_refs[slot]
        if not ray.wait([ref], timeout=0)[0]:
            return False
        try:
            ray.get(ref)
        except RayError:
            return False
        return True

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
                    started = self._actor_started(slot)
                    self._replace_actor(slot)
                    reason = f"actor died ({type(err).__name__}: {last_error_line(err)})"
                    if not started and jobs[jid].unstarted < MAX_UNSTARTED:
                        jobs[jid].unstarted += 1  # the chunk never ran: not an attempt
                        emit("retry", jid, slot, reason=f"{reason}; it had not started, the chunk did not run")
                        queue.appendleft(jid)
                    else:
                        fail(jid, slot, reason)
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

    def resolve(self, requests: Sequence[EvalRequest]) -> list[ResolvedRequest]:
        """Fill defaults and check every request; EvalInputError names the request, file or numbers."""
        out = []
        for i, req in enumerate(requests):
            where = f"request {i} ({req.label or req.task or 'backbone'})"
            out.append(resolve_request(req, self.cfg, self.backbone_meta, where))
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
    def _collect_references(
        plans: list[ReferencePlan], jobs: list[_Job], results: dict[int, dict]
    ) -> dict[int, ReferenceStats]:
        """Stats (and a cache file) for every plan whose feature jobs all succeeded."""
        out = {}
        for p, plan in enumerate(plans):
            mine = sorted((j.start, jid) for jid, j in enumerate(jobs) if j.kind == "reference" and j.owner == p)
            if mine and all(jid in results for _s, jid in mine):
                feats = np.concatenate([results[jid]["features"] for _s, jid in mine])  # (N, D) in image order
                out[p] = cache_reference(plan, feats)
        return out

    def _centroid_plans(self, resolved: list[ResolvedRequest]) -> list[ReferencePlan]:
        """One reference plan per source of the targets (the classifier's classes, in target order, from the
        first target of each source) when every request's task is a target."""
        tasks = {res.request.task for res in resolved}
        if not resolved or None in tasks or not self.cfg.eval.reference_rows:
            return []
        size = pixel_side(self.backbone_meta["model"], self.cfg)
        _class_of, first_tasks = accuracy_classes(self.cfg)
        try:
            return [plan_reference(dataset_dir(self.cfg.data, t), self.cfg, None, image_size=size) for t in first_tasks]
        except EvalInputError:
            return []  # a target without shards: no classifier, the scores still come

    def evaluate(
        self,
        requests: Sequence[EvalRequest],
        *,
        return_features: bool = False,
        progress: ProgressFn | None = None,
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
            if res.maps is not None:  # each chunk carries its own samples' maps: sample k takes map k mod M
                payload |= {
                    "condition_extractor": res.condition,
                    "conditioned": res.request.conditioned,
                    "condition_scale": res.condition_scale,
                }
            jobs += [
                _Job(
                    "sample",
                    i,
                    lo,
                    n,
                    payload
                    if res.maps is None
                    else {**payload, "maps": res.maps[np.arange(lo, lo + n) % len(res.maps)]},
                )
                for lo, n in self._chunks(res.num_samples)
            ]
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

        centroids = None  # (K, D): one per source of the targets, from its reference features
        if centroid_plans and all(plans.index(c) in refs for c in centroid_plans):
            centroids = np.stack([refs[plans.index(c)].features.mean(0) for c in centroid_plans])
        class_of, _first_tasks = accuracy_classes(self.cfg)
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
                task=res.request.task,
                adapter=res.request.adapter_path or "",
                label=res.request.label,
                feature_network=res.plan.feature_network,
                num_reference=res.plan.num_reference,
                sample_seconds=round(sum(d["sample_seconds"] for d in done), 3),
                feature_seconds=round(sum(d["feature_seconds"] for d in done), 3),
                seed=res.seed,
                steps=res.steps,
                sampler=res.sampler,
                cfg_scale=res.cfg_scale,
                dataset=res.plan.dataset,
                dataset_hash=res.plan.dataset_hash,
                image_size=res.plan.image_size,
                method=res.method,
                rank=res.rank,
                source=res.request.source,
                reference_split=res.plan.split,
                condition=res.condition["kind"] if res.condition else "",
                conditioned=res.maps is not None and res.request.conditioned,
                condition_scale=res.condition_scale,
            )
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
                accuracy = nearest_centroid_accuracy(feats, centroids, class_of[res.request.task])
            fid = frechet_distance(feature_statistics(feats), {"mu": ref.mu, "sigma": ref.sigma})
            kid_mean, kid_std = kid_from_features(feats, ref.features, self.cfg.eval.kid_subset_size)
            out.append(
                EvalResult(
                    status="ok",
                    error="",
                    fid=fid,
                    kid_mean=kid_mean,
                    kid_std=kid_std,
                    num_generated=len(feats),
                    seconds=round(time.perf_counter() - first_submit.get(i, t_start), 3),
                    features=feats if return_features else None,
                    task_accuracy=accuracy,
                    **base,
                    **_fidelity(res, done),
                )
            )
        return out


def condition_reference(shards: str, split: str, count: int, seed: int) -> dict[str, Any] | None:
    """The two rows that make condition fidelity readable, on the first `count` real images of `split` (the
    images generated ones are sampled with the maps of): `ceiling` (each image against its own map: what the
    extractor reaches at this resolution) and `mismatched` (against another image's map: chance). None for a
    dataset without maps or whose maps have no extractor here (key:)."""
    index = load_index(shards)
    spec = index.condition
    if spec is None or not spec.has_extractor:
        return None
    images, _labels, maps = read_split(shards, split, limit=count, pixels=index.latent, conditions=True)
    rows = reference_rows(spec, images, maps, seed=seed) if len(images) > 1 else {}
    return {
        "condition": spec.kind,
        "metric": METRICS[spec.kind],
        "split": split,
        "num_images": len(images),
        **{k: v.to_json() for k, v in rows.items() if v is not None},
    }


def condition_references(cfg: ExperimentConfig, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{task: condition_reference} on the images whose maps evaluation samples with (eval.reference_split,
    the first eval.num_samples); tasks whose maps have no extractor here are left out."""
    refs = {
        t: condition_reference(dataset_dir(cfg.data, t), cfg.eval.reference_split, cfg.eval.num_samples, cfg.eval.seed)
        for t in tasks
    }
    return {t: r for t, r in refs.items() if r is not None}


def format_condition_reference(refs: dict[str, dict[str, Any]]) -> list[str]:
    """One line per task: the ceiling and the mismatched-maps chance of its condition fidelity."""
    return [
        f"{t} condition fidelity ({r['metric']}, {r['num_images']} real images): ceiling "
        f"{r['ceiling']['mean']:.3f}, mismatched maps {r['mismatched']['mean']:.3f}"
        for t, r in refs.items()
        if "ceiling" in r
    ]


def _fidelity(res: ResolvedRequest, done: list[dict[str, Any]]) -> dict[str, Any]:
    """The result's fidelity fields from its chunks' per-image scores (empty for tasks without maps)."""
    scores = [s for d in done for s in (d.get("fidelity") or ())]
    if res.condition is None or not scores:
        return {}
    return {
        "fidelity_metric": METRICS[res.condition["kind"]],
        "fidelity": float(np.mean(scores)),
        "fidelity_std": float(np.std(scores)),
    }


def _owner_errors(jobs: list[_Job], failed: dict[int, str], kind: str) -> dict[int, str]:
    """{owner: reason} for failed jobs of `kind`; a real failure wins over "skipped"."""
    errors: dict[int, str] = {}
    for jid, reason in sorted(failed.items()):
        owner = jobs[jid].owner
        if jobs[jid].kind == kind and (owner not in errors or errors[owner].startswith("skipped")):
            errors[owner] = reason
    return errors
