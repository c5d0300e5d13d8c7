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

from diffscaler.config import ConfigError, load_config
from diffscaler.eval.pool import condition_references, format_condition_reference
from diffscaler.eval.results import format_table, write_fid_json
from diffscaler.eval.stats import EvalInputError
from diffscaler.runlock import RunFolderError, run_lock
from diffscaler.stages import Run
from diffscaler.stages.evaluate import EvaluateStage


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
    try:
        cfg = load_config(args.config, args.overrides)
        run = Run.for_program(cfg, "evaluate", args.out, backbone=args.backbone)  # OUT/fid.json
        with run_lock(args.out, "ray_jobs.evaluate"):  # one evaluation per --out: a second would mix up fid.json
            return _evaluate(args, run)
    except (ConfigError, EvalInputError, RunFolderError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 2


def _evaluate(args: argparse.Namespace, run: Run) -> int:
    """The evaluate stage on the given adapters: every input checked, then Ray joined and the pool run."""
    stage = EvaluateStage()
    requests = stage.requests(run, args.adapters, args.include_backbone)
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
        results, replaced = stage.score(run, requests, progress=log)
    finally:
        run.disconnect()
    conditional = sorted({r.task for r in results if r.condition and r.task})
    references = condition_references(run.cfg, conditional)  # fidelity's ceiling and chance rows
    write_fid_json(
        results,
        run.layout.fid_json,
        extra={
            "backbone": args.backbone,
            "adapters": args.adapters,
            "config": run.cfg.to_dict(),
            "total_seconds": round(time.perf_counter() - t0, 3),
            "num_actors": run.cfg.eval.num_actors,
            "actors_replaced": replaced,
            **({"condition_reference": references} if conditional else {}),
        },
    )
    print(format_table(results))
    for line in format_condition_reference(references):
        print(line)
    print(f"wrote {run.layout.fid_json}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
