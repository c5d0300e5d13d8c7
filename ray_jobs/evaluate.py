"""Score every adapter in a folder (and optionally the bare backbone) with the FID actor pool.

    python -m ray_jobs.evaluate --config ray_jobs/configs/tiny.yaml --backbone runs/backbone/backbone.safetensors \\
        --adapters runs/adapters --out runs/eval [--include-backbone] [eval.num_samples=64 eval.num_actors=2 ...]
    ray job submit --working-dir . -- python -m ray_jobs.evaluate --config ... pipeline.ray_address=auto

--adapters takes folders (a fine-tune's --out: its `<task>.safetensors` + `<task>.json`, not the bank
beside them), adapter files (`DIR/*.safetensors`) or a `bank.json`; each task is scored against the
eval split of its shards (cfg.data.shards_root/<task>). Every input is checked before Ray is joined.
Writes OUT/fid.json (per task: FID, KID, feature network, generated and reference image counts,
seconds) and prints the table. Exit status: 0 all scored, 1 some request failed (see its error),
2 bad input.
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
    p.add_argument(
        "--adapters",
        nargs="*",
        default=[],
        help="adapter folder(s), <task>.safetensors files or a bank.json (e.g. a fine-tune's --out)",
    )
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
    # `--adapters DIR/*.safetensors eval.num_samples=64`: the list also takes the overrides after it
    overrides = [a for a in args.adapters if "=" in a and not Path(a).exists()]
    args.adapters = [a for a in args.adapters if a not in overrides]
    args.overrides = overrides + args.overrides
    from diffscaler.eval import EvalInputError
    from diffscaler.runlock import RunFolderError, run_lock

    try:
        cfg = load_config(args.config, args.overrides)
        with run_lock(args.out, "ray_jobs.evaluate"):  # one evaluation per --out: a second would mix up fid.json
            return _evaluate(args, cfg)
    except (ConfigError, EvalInputError, RunFolderError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2


def check_inputs(cfg: ExperimentConfig, backbone: str, adapters: list[str], include_backbone: bool) -> list:
    """The requests to score, with the backbone, every adapter, the shards and the feature network
    checked, before any Ray connection (FidEvaluator checks them again, on the cluster side)."""
    from diffscaler.adapters.bank import AdapterLoadError
    from diffscaler.artifacts import (
        BackboneLoadError,
        adapter_files,
        load_backbone,
        read_adapter_meta,
        read_backbone_meta,
    )
    from diffscaler.eval import EvalInputError, request_for_task
    from diffscaler.eval.features import FeatureWeightsError, resolve_weights_path
    from diffscaler.eval.pool import _resolve

    if not adapters and not include_backbone:
        raise EvalInputError("nothing to score: give --adapters DIR and/or --include-backbone")
    try:
        path = Path(backbone)
        meta = load_backbone(path)[1] if path.suffix == ".pt" else read_backbone_meta(path)
        metas = {str(f.resolve()): read_adapter_meta(f) for f in adapter_files(adapters)}  # actors run elsewhere
        requests = [request_for_task(cfg, m["task"], f) for f, m in metas.items()]
        # a conditional task's adapter is scored with its maps, and again without them (what the map buys)
        requests += [request_for_task(cfg, m["task"], f, label="no condition", conditioned=False)
                     for f, m in metas.items() if m.get("condition_extractor")]  # fmt: skip
        resolve_weights_path(cfg.eval.feature_network, cfg.eval.feature_weights_path)
    except (BackboneLoadError, AdapterLoadError, FeatureWeightsError) as err:
        raise EvalInputError(str(err)) from None
    if include_backbone:
        requests.append(request_for_task(cfg, None))
    for i, req in enumerate(requests):
        _resolve(req, cfg, meta, f"request {i} ({req.task or 'backbone'})")  # adapter fits, shards exist
    return requests


def _evaluate(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    """Check every input, then connect to Ray and score; EvalInputError for bad input."""
    import ray

    from diffscaler.cluster import connect_ray
    from diffscaler.eval import EvalInputError, FidEvaluator, format_table
    from diffscaler.eval.pool import condition_references, format_condition_reference, write_fid_json

    requests = check_inputs(cfg, args.backbone, args.adapters, args.include_backbone)
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
    conditional = sorted({r.task for r in results if r.condition and r.task})
    references = condition_references(cfg, conditional)  # fidelity's ceiling and chance rows
    write_fid_json(results, out / "fid.json", extra={
        "backbone": args.backbone, "adapters": args.adapters, "config": cfg.to_dict(),
        "total_seconds": round(time.perf_counter() - t0, 3), "num_actors": cfg.eval.num_actors,
        "actors_replaced": replaced, **({"condition_reference": references} if conditional else {}),
    })  # fmt: skip
    print(format_table(results))
    for line in format_condition_reference(references):
        print(line)
    print(f"wrote {out / 'fid.json'}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
