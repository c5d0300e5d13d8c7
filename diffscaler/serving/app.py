"""The Ray Serve application: one deployment holding the backbone and the bank, behind a FastAPI ingress.

    diffscaler serve --backbone B --adapters DIR [--config C] [serve.port=8000 ...]     (diffscaler.serving.cli)
    serve run diffscaler.serving.app:app_builder backbone=B adapters=DIR [config=C]    (Serve's own CLI)

HTTP API (on the Serve proxy, under serve.route_prefix):

    POST /v1/generate  {"task": "emoji", "class": 0, "num": 4, "seed": 7, "steps": 25, "guidance": 1.0}
        -> {"task", "class", "num", "seed", "steps", "guidance", "backbone_hash", "adapter_hash",
            "images": [{"index", "class", "seed", "png_base64"}]}      (image/png when num is 1 and Accept asks)
        a task with a condition map also takes "condition": a base64 PNG image (the task's own extractor makes
        the map, as `diffscaler sample --condition` does) or, with "condition_is_map": true, the map itself
        (the task's channels and side); "condition_scale" (guidance on the map, default serve.condition_scale);
        "unconditioned": true asks for its output without a map. All `num` images take that one map; the
        answer's "condition" holds the map used (map_png_base64).
    GET  /v1/tasks      every served task (name, method, rank, classes, condition, adapter hash, resident) and
                        refused files
    GET  /healthz       {"status": "ok", ...}
    POST /v1/reload     re-read the adapters folder now on the replica that answers (new, changed, removed files);
                        every replica also watches the folder (serve.watch_interval_s)
    GET  /v1/stats      the replica's batches, images, mixed batches, adapter cache hits and page-ins
    (/v1/tasks, /v1/stats, /healthz and /v1/reload name the replica and its catalog: generation and digest)

Mixed-task dynamic batching: a request becomes `num` single-image calls of the replica's `@serve.batch`
method, so one batch (up to serve.max_batch_size images, waiting at most serve.batch_wait_s) holds images of
any requests and tasks; the task (and its map, for a task with one) travels with each image. The batch is split
only by (steps, guidance, condition_scale), which share a timestep schedule and guidance (rows without a map
join any condition_scale), and runs through the bank's grouped path (`TaskRuntime`), maps and mask per row. Image
k of a request is image k of (task, class) at the request's seed, as the generation job makes it: the same
request gives the same images whatever it was batched with. Serve's model multiplexing is not used: it
splits every batch by model id, one adapter per batch (bench/serve_load.py measures both).

A replica pages adapters between host memory and serve.max_resident_tasks device slots (least recently
used out). Serve's `max_ongoing_requests` bounds a replica's concurrent requests and `max_queued_requests`
the waiting ones: beyond them the proxy answers 503.

Adapters change while serving: every replica watches the folder (a thread compares the names, sizes and mtimes
of its files every serve.watch_interval_s) and re-reads it on a change, so an adapter written, rewritten or
removed reaches every replica, including those autoscaling starts later, with no request; each also re-reads on
`POST /v1/reload` (at once, on the replica that answers) and before answering 404 for a task it does not know
(at most once a second). Watching rather than fanning POST /v1/reload out with `DeploymentHandle.broadcast`:
that is alpha in Ray 2.60, reaches only the replicas live at the call, and a broadcast made from inside a
request waits for a free `max_ongoing_requests` slot on its own replica (never, at max_ongoing_requests=1),
while a changed folder needs no client at all. Files are read outside the model's lock: batches keep running,
and only the swap of entries and slots waits for the batch in flight.
"""

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from diffscaler.config import ExperimentConfig, config_from_json, load_config
from diffscaler.data.conditions import encode_map
from diffscaler.data.pngcodec import encode_png

logger = logging.getLogger("ray.serve")
api = FastAPI(title="DiffScaler", description="Many tasks' Affiners over one backbone, batched together.")
MAX_SEED = 2**63 - 1
REQUEST_FIELDS = (
    "task",
    "class",
    "num",
    "seed",
    "steps",
    "guidance",
    "condition",
    "condition_is_map",
    "condition_scale",
    "unconditioned",
)


class BadRequest(ValueError):
    """A request field out of range or of the wrong type: 400 naming the field."""


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _int_field(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"field {name!r}: expected an integer, got {json.dumps(value)}")
    if not lo <= value <= hi:
        raise BadRequest(f"field {name!r}: {value} is out of range [{lo}, {hi}]")
    return value


def _number_field(body: dict[str, Any], name: str, default: float, hi: float) -> float:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"field {name!r}: expected a number, got {json.dumps(value)}")
    if not 0 <= value <= hi:
        raise BadRequest(f"field {name!r}: {value} is out of range [0, {hi:g}]")
    return float(value)


def _bool_field(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"field {name!r}: expected true or false, got {json.dumps(value)}")
    return value


def _condition_bytes(body: dict[str, Any]) -> bytes | None:
    """The decoded bytes of field 'condition' (base64, optionally a data: URL), None when absent."""
    value = body.get("condition")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"field 'condition': expected a base64 PNG string, got {json.dumps(value)[:60]}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error) as err:
        raise BadRequest(f"field 'condition': not valid base64 ({err})") from None


def parse_request(raw: bytes, cfg: ExperimentConfig) -> dict[str, Any]:
    """The request's fields, defaults filled in; BadRequest naming the first bad field."""
    s = cfg.serve
    max_steps = min(s.max_steps, cfg.diffusion.num_timesteps)  # serve.max_steps caps the schedule's steps
    try:
        body = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BadRequest(f"malformed JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object with at least 'task'")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequest(f"field {unknown[0]!r}: not a request field; fields: {', '.join(REQUEST_FIELDS)}")
    task = body.get("task")
    if not isinstance(task, str) or not task:
        raise BadRequest(f"field 'task': expected a task name, got {json.dumps(task)}")
    guidance = _number_field(body, "guidance", s.guidance, 100)
    condition = _condition_bytes(body)
    is_map, unconditioned = _bool_field(body, "condition_is_map"), _bool_field(body, "unconditioned")
    if is_map and condition is None:
        raise BadRequest("field 'condition_is_map': says how to read 'condition', and the request has none")
    if unconditioned and condition is not None:
        raise BadRequest("field 'unconditioned': asks for the output without a map, and 'condition' gives one")
    return {
        "task": task,
        "class": _int_field(body, "class", None, 0, 2**31 - 1),
        "num": _int_field(body, "num", 1, 1, s.max_images_per_request),
        "seed": _int_field(body, "seed", 0, 0, MAX_SEED),
        "steps": _int_field(body, "steps", min(s.sampling_steps, max_steps), 1, max_steps),
        "guidance": guidance,
        "condition": condition,  # bytes of the image (or, with condition_is_map, the ready map), or None
        "condition_is_map": is_map,
        "condition_scale": _number_field(body, "condition_scale", s.condition_scale, 100),
        "unconditioned": unconditioned,
    }


def condition_map(req: dict[str, Any], entry: Any) -> np.ndarray | None:
    """The request's map for its task, uint8 (C, S, S) (None: no map); BadRequest naming the field. An image is
    made into the map by the task's own extractor, as `diffscaler sample --condition` does; a ready map
    (condition_is_map) must have the task's channels and side."""
    from diffscaler.data.conditions import ConditionError, map_from_image, ready_map, spec_from_record

    cond, task = entry.condition, req["task"]
    if cond is None:
        if req["condition"] is not None:
            raise BadRequest(f"field 'condition': task {task!r} takes no condition map (trained without one)")
        return None
    channels, size = int(cond["channels"]), int(cond["size"])
    if req["condition"] is None:
        if req["unconditioned"]:
            return None
        raise BadRequest(
            f"field 'condition': task {task!r} is conditioned on {cond['kind']} maps ({channels} channel(s), "
            f"{size}x{size} px): give 'condition', a base64 PNG image its map is extracted from (or, with "
            "'condition_is_map': true, the map itself), or 'unconditioned': true for its output without a map"
        )
    try:
        if req["condition_is_map"]:
            return ready_map(req["condition"], "png", channels, size)
        return map_from_image(req["condition"], "png", spec_from_record(cond), size)
    except ConditionError as err:
        what = "a ready map" if req["condition_is_map"] else "an image to extract the map from"
        raise BadRequest(f"field 'condition' ({what}) for task {task!r}: {err}") from None


def _replica_id() -> str:
    """Serve's id of this replica (unique within the deployment); the process id outside Serve."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica (a direct construction)
        return f"pid-{os.getpid()}"


@serve.deployment(name="TaskServer")
@serve.ingress(api)
class TaskServer:
    """One replica: a `TaskRuntime` (backbone + bank + adapters in host memory) and its batch queue."""

    def __init__(self, backbone: str, adapters: str, cfg_json: str):
        from diffscaler.serving.runtime import TaskRuntime, torch_threads

        self.cfg = config_from_json(cfg_json)
        s = self.cfg.serve
        torch_threads(s.threads)
        self.runtime = TaskRuntime.load(
            backbone, adapters, max_resident=s.max_resident_tasks, diffusion=self.cfg.diffusion, log=logger.warning
        )
        self.backbone_hash = self.runtime.meta["content_hash"]
        # The model runs on one thread beside the event loop: requests keep arriving (and batching) while it runs.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffscaler-model")
        self.lock = threading.Lock()
        self.last_miss_scan = 0.0
        # mixed_condition_batches: batches holding rows with a condition map and rows without
        self.stats = {"batches": 0, "images": 0, "mixed_batches": 0, "batch_tasks": 0, "mixed_condition_batches": 0}
        self.images_batched.set_max_batch_size(s.max_batch_size)
        self.images_batched.set_batch_wait_timeout_s(s.batch_wait_s)
        self.replica = _replica_id()
        self.stop = threading.Event()
        if s.watch_interval_s > 0:
            threading.Thread(
                target=self._watch, args=(s.watch_interval_s,), name="diffscaler-watch", daemon=True
            ).start()

    def _watch(self, interval: float) -> None:
        """Re-read the folder when its fingerprint changes (a stat per file every `interval` seconds)."""
        # no fingerprint yet: the first tick re-reads once (a file written between the start's read and here)
        catalog, seen, failing = self.runtime.catalog, None, False
        while not self.stop.wait(interval):
            try:
                now = catalog.fingerprint()
                if now != seen:
                    self._reload()
                    seen = now
                failing = False
            except Exception as err:  # the folder gone or unreadable: keep serving what was read, say so once
                if not failing:
                    logger.warning(f"serve: watching {catalog.folder} failed: {type(err).__name__}: {err}")
                failing = True

    # -- the batch ------------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def images_batched(self, items: list[tuple[Any, int, float, float]]) -> list[Any]:
        """items: (ImageRow, steps, guidance, condition_scale) per image, of any requests and tasks (a row of a
        task with a condition map carries its map) -> uint8 image or error."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._run_batch, items)

    @staticmethod
    def batch_groups(items: list[tuple[Any, int, float, float]]) -> dict[tuple[int, float, float | None], list[int]]:
        """The parts of a batch that share a timestep schedule and guidance: (steps, guidance, condition_scale)
        -> item positions. A row without a map ignores condition_scale: it joins a part of its steps and guidance."""
        groups: dict[tuple[int, float, float | None], list[int]] = {}
        for k, (row, steps, guidance, condition_scale) in enumerate(items):
            groups.setdefault((steps, guidance, condition_scale if row.condition is not None else None), []).append(k)
        for key in [k for k in groups if k[2] is None]:
            host = next((h for h in groups if h[:2] == key[:2] and h[2] is not None), None)
            if host is not None:
                groups[host] = sorted(groups[host] + groups.pop(key))
        return groups

    def _run_batch(self, items: list[tuple[Any, int, float, float]]) -> list[Any]:
        out: list[Any] = [None] * len(items)
        with self.lock:
            for (steps, guidance, condition_scale), members in self.batch_groups(items).items():
                rows = [items[k][0] for k in members]
                try:
                    scale = 1.0 if condition_scale is None else condition_scale  # no row has a map
                    images = self.runtime.images(rows, steps, self.cfg.serve.sampler, guidance, scale)
                except Exception as err:  # a task removed between admission and its batch, a device error
                    for k in members:
                        out[k] = err
                    continue
                for k, image in zip(members, images):
                    out[k] = image
                tasks = len({r.task for r in rows})
                self.stats["batches"] += 1
                self.stats["images"] += len(rows)
                self.stats["batch_tasks"] += tasks
                self.stats["mixed_batches"] += tasks > 1
                with_map = sum(r.condition is not None for r in rows)
                self.stats["mixed_condition_batches"] += 0 < with_map < len(rows)
        return out

    def _reload(self) -> dict[str, Any]:
        return self.runtime.reload(self.lock).summary()  # reads outside self.lock: batches keep running

    def catalog_state(self) -> dict[str, Any]:
        """Which replica answers and what it serves: the digest is equal on replicas serving the same adapters."""
        c = self.runtime.catalog
        return {"replica": self.replica, "generation": c.generation, "digest": c.digest()}

    def __del__(self):  # Serve calls it when the replica shuts down: the watcher stops with it
        if hasattr(self, "stop"):
            self.stop.set()

    # -- routes ---------------------------------------------------------------------------------------
    @api.post("/v1/generate")
    async def generate(self, request: Request) -> Response:
        from diffscaler.serving.runtime import ImageRow

        try:
            req = parse_request(await request.body(), self.cfg)
        except BadRequest as err:
            return _error(400, str(err))
        entries = self.runtime.catalog.entries
        if req["task"] not in entries and time.monotonic() - self.last_miss_scan > 1.0:
            self.last_miss_scan = time.monotonic()
            await asyncio.to_thread(self._reload)  # a task written into the folder since the last scan
        entry = self.runtime.catalog.entries.get(req["task"])
        if entry is None:
            served = sorted(self.runtime.catalog.entries)
            return _error(404, f"unknown task {req['task']!r}; served tasks: {', '.join(served)}", tasks=served)
        classes = entry.meta["num_classes"]
        if req["class"] is not None and req["class"] >= classes:
            return _error(
                400,
                f"field 'class': {req['class']} is out of range for task {req['task']!r} "
                f"({classes} class(es): 0..{classes - 1})",
            )
        try:  # decoding and extracting off the event loop: other requests keep arriving
            cond = await asyncio.to_thread(condition_map, req, entry)
        except BadRequest as err:
            return _error(400, str(err))
        plan = [
            (req["class"], k) if req["class"] is not None else (k % classes, k // classes) for k in range(req["num"])
        ]
        # every image of the request takes its one map
        unconditioned = req["unconditioned"] and entry.condition is not None
        rows = [ImageRow(req["task"], c, i, req["seed"], cond, unconditioned) for c, i in plan]
        results = await asyncio.gather(
            *[self.images_batched((r, req["steps"], req["guidance"], req["condition_scale"])) for r in rows]
        )
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            if isinstance(failed, KeyError):  # removed by a reload between admission and its batch
                return _error(404, f"unknown task {req['task']!r}: its adapter was removed")
            return _error(500, f"generation failed: {type(failed).__name__}: {failed}")
        accept = request.headers.get("accept", "")
        if req["num"] == 1 and "image/png" in accept and "application/json" not in accept:
            return Response(
                encode_png(results[0]),
                media_type="image/png",
                headers={"X-Seed": str(rows[0].noise_seed), "X-Adapter-Hash": entry.hash},
            )
        echo = {k: v for k, v in req.items() if k not in ("condition", "condition_is_map")}
        if entry.condition is not None:  # the map the images were made with, as the task takes it
            echo["condition"] = {
                "kind": entry.condition["kind"],
                "given": "none" if cond is None else "map" if req["condition_is_map"] else "image",
                "map_png_base64": None if cond is None else base64.b64encode(encode_map(cond)).decode(),
            }
        return JSONResponse(
            {
                **echo,
                "backbone_hash": self.backbone_hash,
                "adapter_hash": entry.hash,
                "images": [
                    {
                        "index": r.index,
                        "class": r.label,
                        "seed": r.noise_seed,
                        "png_base64": base64.b64encode(encode_png(np.asarray(im))).decode(),
                    }
                    for r, im in zip(rows, results)
                ],
            }
        )

    @api.get("/v1/tasks")
    async def tasks(self) -> dict[str, Any]:
        resident = set(self.runtime.resident())
        return {
            "tasks": [
                {**e.describe(), "resident": name in resident}
                for name, e in sorted(self.runtime.catalog.entries.items())
            ],
            "refused": self.runtime.catalog.refused,
            "max_resident_tasks": self.runtime.max_resident,
            "backbone_hash": self.backbone_hash,
            **self.catalog_state(),
        }

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "tasks": len(self.runtime.catalog.entries),
            "backbone_hash": self.backbone_hash,
            **self.catalog_state(),
        }

    @api.post("/v1/reload")
    async def reload(self) -> dict[str, Any]:
        summary = await asyncio.to_thread(self._reload)
        return {**summary, "tasks": sorted(self.runtime.catalog.entries), **self.catalog_state()}

    @api.get("/v1/stats")
    async def replica_stats(self) -> dict[str, Any]:
        return {
            **self.stats,
            **self.runtime.stats,
            "resident": len(self.runtime.resident()),
            "tasks": sorted(self.runtime.catalog.entries),
            **self.catalog_state(),
        }


def build_app(backbone: str, adapters: str, cfg: ExperimentConfig):
    """The bound application with serve: options (replicas or autoscaling, resources, request limits)."""
    from pathlib import Path

    s = cfg.serve
    options: dict[str, Any] = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "ray_actor_options": {"num_cpus": s.cpus_per_replica, "num_gpus": 1 if s.use_gpu else 0},
    }
    if s.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = s.num_replicas
    return TaskServer.options(**options).bind(
        str(Path(backbone).resolve()), str(Path(adapters).resolve()), cfg.to_json()
    )


def app_builder(args: dict[str, str]):
    """For Serve's CLI and config files: `serve run diffscaler.serving.app:app_builder backbone=B adapters=DIR
    [config=C] [overrides="serve.max_batch_size=64 serve.max_resident_tasks=16"]`."""
    cfg = load_config(args.get("config") or None, args.get("overrides", "").split())
    return build_app(args["backbone"], args["adapters"], cfg)
