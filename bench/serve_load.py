"""Load on `diffscaler serve` over loopback, and the generation job's rate (issue 22). Prints tables.

    python -m bench.serve_load                         # the run in bench/RESULTS.md (CPU, ~10 min on 2 cores)
    python -m bench.serve_load --requests 32 --steps 4 --zipf-tasks 200   # a quicker look

Bounded: every scenario sends a fixed number of requests (`--requests`, one image each) from a fixed
number of client threads (`--concurrency`) to 127.0.0.1 and stops. Scenarios, on one local Ray cluster
and one Serve proxy, each deployment with one replica, `serve.max_batch_size` = `--batch`:

1. mixed batching (`diffscaler.serving.app`): traffic on 1 task, and uniform over 8 and 64 tasks, all
   resident: images/s and p50/p99 latency; per-image cost relative to 1 task.
2. the same 8-task traffic through Ray Serve's model multiplexing (`@serve.multiplexed`, one model id per
   adapter, each model a backbone with that one task's bank, `@serve.batch` splitting by model id): what a
   user gets from Serve alone.
3. `--zipf-tasks` tasks (1000), Zipf traffic (exponent `--zipf-s`) with 64 resident, against the same
   traffic with every task resident: adapter cache hit rate (per batch and task), page-in time, images/s.
4. the generation job (`diffscaler.serving.generate`) with 1 and 2 actors: images/s over the job's wall
   time (Ray Data start and actor start-up included).

The model: DiT-T/2 at 16x16 px (the demo's backbone shape), random weights, affiner rank `--rank` on every
target; `--steps` DDIM steps per image. Numbers go to bench/RESULTS.md with machine, date and commit.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # at module level: FastAPI resolves the route's annotations from the globals
from fastapi.responses import JSONResponse

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster


def make_models(root: Path, num_tasks: int, rank: int, seed: int = 0) -> tuple[Path, Path]:
    """(backbone, adapters folder) with `num_tasks` distinct random affiners t0000, t0001, ..."""
    import torch

    from diffscaler.adapters import AdapterBank, TaskInfo
    from diffscaler.artifacts import save_adapter, save_backbone
    from diffscaler.config import ModelConfig
    from diffscaler.models import build_model

    backbone = root / "backbone.safetensors"
    if not backbone.exists():
        model = build_model(ModelConfig(name="DiT-T/2", input_size=16, num_classes=4), seed=seed)
        save_backbone(model, backbone)
    from diffscaler.artifacts import load_backbone

    model, meta = load_backbone(backbone)
    folder = root / f"adapters{num_tasks}"
    bank = AdapterBank.attach(model, [TaskInfo(f"t{i:04d}") for i in range(num_tasks)], rank=rank)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    for i in range(num_tasks):
        save_adapter(bank, i, folder, backbone_hash=meta["content_hash"])
    return backbone, folder


# ------------------------------------------------------------------------------------------------
# The comparison: Serve's model multiplexing, one adapter per model id (so one task per batch)
# ------------------------------------------------------------------------------------------------


def multiplexed_app(backbone: str, adapters: str, cfg_json: str, max_models: int, max_batch: int, wait_s: float):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor as Pool

    from ray import serve

    api = FastAPI()

    @serve.deployment(name="Multiplexed")
    @serve.ingress(api)
    class Multiplexed:
        def __init__(self):
            from diffscaler.config import config_from_json

            self.cfg = config_from_json(cfg_json)
            self.pool = Pool(max_workers=1)
            self.batches = 0

        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str):
            from diffscaler.artifacts import load_adapters, load_backbone
            from diffscaler.diffusion.gaussian import GaussianDiffusion

            model, meta = load_backbone(backbone)
            load_adapters(model, [Path(adapters) / f"{model_id}.safetensors"], meta["content_hash"])
            return model.eval(), GaussianDiffusion.from_config(self.cfg.diffusion)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=wait_s)
        async def images(self, items: list[tuple[int, int]]) -> list[Any]:  # (seed, steps) per image
            model, diffusion = await self.get_model(serve.get_multiplexed_model_id())
            self.batches += 1
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.pool, self._run, model, diffusion, items)

        def _run(self, model, diffusion, items):
            import torch

            from diffscaler.diffusion.sampling import generate, to_uint8
            from diffscaler.serving.runtime import image_seed

            task = serve.get_multiplexed_model_id()
            seeds = [image_seed(seed, task, 0, 0) for seed, _steps in items]
            # one task per batch: the int task id takes the bank's single-task path (plain matmuls)
            x = generate(
                model,
                diffusion,
                labels=torch.zeros(len(items), dtype=torch.long),
                indices=range(len(items)),
                seed=0,
                task_ids=0,
                steps=items[0][1],
                sample_seeds=seeds,
            )
            return list(to_uint8(x))

        @api.post("/v1/generate")
        async def generate(self, request: Request):
            import json

            from diffscaler.data.pngcodec import encode_png

            body = json.loads(await request.body())
            image = await self.images((int(body.get("seed", 0)), int(body.get("steps", 10))))
            return JSONResponse({"bytes": len(encode_png(image)), "batches": self.batches})

    return Multiplexed.options(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256).bind()


# ------------------------------------------------------------------------------------------------
# The load generator
# ------------------------------------------------------------------------------------------------


def drive(url: str, tasks: list[str], concurrency: int, steps: int, multiplexed: bool = False) -> dict[str, float]:
    """Send one request per entry of `tasks` (num 1) from `concurrency` threads; images/s and latencies.
    Each thread keeps one HTTP/1.1 connection (the standard library's client: no dependency of the bench)."""
    import http.client
    import json
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    local = threading.local()
    latencies: list[float] = []
    errors: list[str] = []

    def one(k: int) -> None:
        conn = getattr(local, "conn", None) or http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
        local.conn = conn
        headers = {"Content-Type": "application/json"}
        if multiplexed:
            headers["serve_multiplexed_model_id"] = tasks[k]
        body = json.dumps({"task": tasks[k], "num": 1, "seed": k, "steps": steps})
        t0 = time.perf_counter()
        conn.request("POST", parts.path + "/v1/generate", body=body, headers=headers)
        response = conn.getresponse()
        text = response.read()
        latencies.append(time.perf_counter() - t0)
        if response.status != 200:
            errors.append(f"{response.status} {text[:200]!r}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(len(tasks))))
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, first: {errors[0]}")
    q = statistics.quantiles(latencies, n=100)
    return {"images_s": len(tasks) / wall, "p50_s": statistics.median(latencies), "p99_s": q[98], "wall_s": wall}


def stats(url: str) -> dict[str, float]:
    import json
    from urllib.request import urlopen

    with urlopen(url + "/v1/stats", timeout=60) as response:
        return json.loads(response.read())


def zipf_tasks(n_tasks: int, n: int, s: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_tasks + 1) ** s
    picks = rng.choice(n_tasks, size=n, p=p / p.sum())
    order = rng.permutation(n_tasks)  # popular tasks are not the first files
    return [f"t{order[i]:04d}" for i in picks]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=96, help="requests per scenario (one image each)")
    p.add_argument("--concurrency", type=int, default=16, help="client threads")
    p.add_argument("--batch", type=int, default=16, help="serve.max_batch_size")
    p.add_argument("--wait", type=float, default=0.02, help="serve.batch_wait_s")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per image")
    p.add_argument("--rank", type=int, default=4, help="affiner rank of every task")
    p.add_argument("--zipf-tasks", type=int, default=1000)
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--resident", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the replica")
    p.add_argument("--gen-images", type=int, default=32, help="generation job: images per task (4 tasks)")
    p.add_argument("--skip", default="", help="comma-separated scenarios to skip: mixed,multiplexed,zipf,generate")
    args = p.parse_args(argv)
    skip = set(args.skip.split(","))

    import ray
    from ray import serve

    from diffscaler.config import load_config
    from diffscaler.serving.app import build_app

    root = Path(tempfile.mkdtemp(prefix="serve_load-"))
    try:
        t0 = time.perf_counter()
        backbone, folder64 = make_models(root, 64, args.rank)
        folder_z = make_models(root, args.zipf_tasks, args.rank)[1] if "zipf" not in skip else None
        print(f"# models written in {time.perf_counter() - t0:.1f} s under {root}", file=sys.stderr)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        port = 8000 + os.getpid() % 1000
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        common = [
            f"serve.max_batch_size={args.batch}",
            f"serve.batch_wait_s={args.wait}",
            "serve.max_steps=1000",
            f"serve.threads={args.threads}",
            "serve.cpus_per_replica=1",
            "serve.max_ongoing_requests=256",
            "serve.max_queued_requests=1024",
            "serve.max_images_per_request=64",
        ]
        rng = np.random.default_rng(0)
        rows: list[tuple[str, dict[str, float], str]] = []

        def deploy(name: str, folder: Path, resident: int):
            cfg = load_config(None, [*common, f"serve.max_resident_tasks={resident}"])
            serve.run(build_app(str(backbone), str(folder), cfg), name=name, route_prefix=f"/{name}")
            return f"{base}/{name}"

        if "mixed" not in skip or "multiplexed" not in skip:
            url = deploy("mixed", folder64, 64)
            drive(url, [f"t{i:04d}" for i in range(64)] * 2, args.concurrency, args.steps)  # warm-up: all paged in
            for label, n_tasks in (("1 task", 1), ("8 tasks uniform", 8), ("64 tasks uniform", 64)):
                if "mixed" in skip and n_tasks != 8:
                    continue
                traffic = [f"t{i:04d}" for i in rng.integers(0, n_tasks, size=args.requests)]
                before = stats(url)
                result = drive(url, traffic, args.concurrency, args.steps)
                after = stats(url)
                batches = after["batches"] - before["batches"]
                tasks_per_batch = (after["batch_tasks"] - before["batch_tasks"]) / max(batches, 1)
                result["images_per_batch"] = (after["images"] - before["images"]) / max(batches, 1)
                note = f"{result['images_per_batch']:.1f} images and {tasks_per_batch:.1f} tasks per batch"
                rows.append((f"mixed batching, {label}", result, note))
            serve.delete("mixed")
        if "multiplexed" not in skip:
            cfg = load_config(None, common)
            app = multiplexed_app(str(backbone), str(folder64), cfg.to_json(), 8, args.batch, args.wait)
            serve.run(app, name="mux", route_prefix="/mux")
            url = f"{base}/mux"
            drive(url, [f"t{i:04d}" for i in range(8)] * 2, args.concurrency, args.steps, multiplexed=True)
            traffic = [f"t{i:04d}" for i in rng.integers(0, 8, size=args.requests)]
            result = drive(url, traffic, args.concurrency, args.steps, multiplexed=True)
            rows.append(("Serve multiplexing, 8 tasks uniform", result, "1 task/batch"))
            serve.delete("mux")
        if "zipf" not in skip and folder_z is not None:
            warm = zipf_tasks(args.zipf_tasks, args.requests, args.zipf_s, seed=1)
            traffic = zipf_tasks(args.zipf_tasks, args.requests * 2, args.zipf_s, seed=2)
            for label, resident in ((f"{args.resident} resident", args.resident), ("all resident", args.zipf_tasks)):
                t_load = time.perf_counter()
                url = deploy("zipf", folder_z, resident)
                load_s = time.perf_counter() - t_load
                drive(url, warm, args.concurrency, args.steps)  # the cache in its steady state
                before = stats(url)
                result = drive(url, traffic, args.concurrency, args.steps)
                after = stats(url)
                hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
                page_ins = after["page_ins"] - before["page_ins"]
                page_s = (after["page_in_seconds"] - before["page_in_seconds"]) / max(page_ins, 1)
                note = (
                    f"hit rate {hits / max(hits + misses, 1):.2f}, {page_ins} page-ins of "
                    f"{page_s * 1e3:.2f} ms, deploy {load_s:.0f} s"
                )
                rows.append((f"{args.zipf_tasks} tasks Zipf({args.zipf_s}), {label}", result, note))
                serve.delete("zipf")
        serve.shutdown()
        if "generate" not in skip:
            from diffscaler.serving.generate import generate_set

            for actors in (1, 2):
                cfg = load_config(
                    None,
                    [
                        f"generate.images_per_task={args.gen_images}",
                        f"generate.sampling_steps={args.steps}",
                        f"generate.batch_size={args.batch}",
                        f"generate.num_actors={actors}",
                        "generate.cpus_per_actor=1",
                        f"generate.samples_per_shard={args.batch}",  # a shard per batch
                        "generate.tasks=[t0000, t0001, t0002, t0003]",
                    ],
                )
                out = root / f"gen{actors}"
                shard_times: list[float] = []
                t0 = time.perf_counter()
                index = generate_set(
                    cfg,
                    str(backbone),
                    str(folder64),
                    str(out),
                    log=lambda _m: None,
                    on_shard=lambda _d, _t, times=shard_times: times.append(time.perf_counter()),
                )
                wall = time.perf_counter() - t0
                # after the first shard: without Ray Data's and the actors' start-up
                steady = (index["num_samples"] - args.batch) / max(shard_times[-1] - shard_times[0], 1e-9)
                rows.append(
                    (
                        f"generation job, {actors} actor(s)",
                        {
                            "images_s": index["num_samples"] / wall,
                            "p50_s": float("nan"),
                            "p99_s": float("nan"),
                            "wall_s": wall,
                        },
                        f"{index['num_samples']} images of 4 tasks in {wall:.1f} s (start-up included); "
                        f"{steady:.2f} images/s after the first shard",
                    )
                )
        print(
            f"\n{args.requests} requests x 1 image, concurrency {args.concurrency}, max_batch_size {args.batch}, "
            f"batch_wait_s {args.wait}, {args.steps} DDIM steps, DiT-T/2 16x16 px, affiner rank {args.rank}\n"
        )
        print("| scenario | images/s | p50 latency (s) | p99 latency (s) | notes |")
        print("|---|---|---|---|---|")
        one = next((r for n, r, _ in rows if n.endswith("1 task")), None)
        for name, r, note in rows:
            per_image = one["images_s"] / r["images_s"] if one else 0.0
            rel = f"; {per_image:.2f}x the 1-task cost per image" if one and "generation" not in name else ""
            print(f"| {name} | {r['images_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {note}{rel} |")
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
