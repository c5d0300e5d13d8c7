"""Score every adapter in a folder (and optionally the bare backbone) with the FID actor pool.

    python -m ray_jobs.evaluate --config ray_jobs/configs/tiny.yaml --backbone runs/backbone/backbone.safetensors \\
        --adapters runs/adapters --out runs/eval [--include-backbone] [eval.num_samples=64 eval.num_actors=2 ...]
    ray job submit --working-dir . -- python -m ray_jobs.evaluate --config ... pipeline.ray_address=auto

The adapter folder holds `<task>.safetensors` + `<task>.json`; each task is scored against the eval
split of its shards (cfg.data.shards_root/<task>). Writes OUT/fid.json (per task: FID, KID, feature
network, generated and reference image counts, seconds) and prints the table. Exit status: 0 all
scored, 1 some request failed (see its error), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from diffscaler.config import ConfigError, ExperimentConfig, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML (or JSON)")
    p.add_argument("--backbone", required=True, help="backbone.safetensors (or a public DiT .pt)")
    p.add_argument("--adapters", default="", help="folder of <task>.safetensors adapters")
    p.add_argument(
        "--include-backbone",
        action="store_true",
        help="also score the bare backbone on the pretraining set (class-conditional samples)",
    )
    p.add_argument("--out", required=True, help="output folder for fid.json")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. eval.num_samples=64")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from diffscaler.eval import EvalInputError
    from diffscaler.runlock import RunFolderError, run_lock

    try:
        cfg = load_config(args.config, args.overrides)
        with run_lock(args.out, "ray_jobs.evaluate"):  # one evaluation per --out: a second would mix up fid.json
            return _evaluate(args, cfg)
    except (ConfigError, EvalInputError, RunFolderError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    """Check every input, then connect to Ray and score; EvalInputError for bad input."""
    import ray

    from diffscaler.cluster import connect_ray
    from diffscaler.eval import EvalInputError, FidEvaluator, format_table, request_for_task, requests_for_adapter_dir
    from diffscaler.eval.pool import write_fid_json

    if not args.adapters and not args.include_backbone:
        raise EvalInputError("nothing to score: give --adapters DIR and/or --include-backbone")
    requests = requests_for_adapter_dir(cfg, args.adapters) if args.adapters else []
    if args.include_backbone:
        requests.append(request_for_task(cfg, None))
    started_ray = connect_ray(cfg)
    done = {"n": 0}

    def log(event: dict) -> None:
        if event["event"] == "done":
            done["n"] += 1
            what = "reference images" if event["kind"] == "reference" else f"request {event['owner']}"
            lo, hi = event["start"], event["start"] + event["count"]
            print(f"evaluate: {what} [{lo}, {hi}) done ({done['n']} chunks so far)", file=sys.stderr)
        elif event["event"] in ("retry", "failed"):
            print(f"evaluate: {event['event']}: {event.get('reason', '')}", file=sys.stderr)

    t0 = time.perf_counter()
    try:
        with FidEvaluator(args.backbone, cfg) as evaluator:
            results = evaluator.evaluate(requests, progress=log)
            replaced = evaluator.actors_replaced
    except EvalInputError as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2
    finally:
        if started_ray:
            ray.shutdown()
    out = Path(args.out)
    write_fid_json(results, out / "fid.json", extra={
        "backbone": args.backbone, "adapters": args.adapters, "config": cfg.to_dict(),
        "total_seconds": round(time.perf_counter() - t0, 3), "num_actors": cfg.eval.num_actors,
        "actors_replaced": replaced,
    })  # fmt: skip
    print(format_table(results))
    print(f"wrote {out / 'fid.json'}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
