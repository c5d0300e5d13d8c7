"""Ray program: pretrain the DiT backbone with Ray Train + DeepSpeed ZeRO, export backbone.safetensors.

    python -m ray_jobs.pretrain --config ray_jobs/configs/tiny.yaml --out runs/pretrain
    python -m ray_jobs.pretrain --config ray_jobs/configs/tiny.yaml --out runs/pretrain \
        pretrain.zero_stage=3 pretrain.steps=400          # same run name: resumes and continues
    ray job submit --working-dir . -- python -m ray_jobs.pretrain --config ray_jobs/configs/gpu.yaml \
        --out /shared/runs/pretrain pretrain.storage_path=s3://bucket/ray

Writes OUT/backbone.safetensors + backbone.json, OUT/metrics.jsonl, OUT/events.jsonl,
OUT/tensorboard/ and OUT/samples/; checkpoints go to pretrain.storage_path/pretrain.run_name, a relative
storage_path inside OUT (OUT/runs/ray/pretrain by default), so only the same OUT resumes a run.
Connects to pipeline.ray_address or RAY_ADDRESS (set by `ray job submit`) when given, else starts
a local Ray. Under `ray job submit` the program runs in a temporary copy of the working dir: give
--out, data.shards_root and pretrain.storage_path as absolute paths on shared storage (or URLs), or
the outputs stay in that copy. Exit status 2: bad input (named), found before any worker started; 1: the run failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from diffscaler.config import ConfigError, ExperimentConfig, load_config
from diffscaler.runlock import RunFolderError, run_lock


def in_out_folder(cfg: ExperimentConfig, out: str) -> ExperimentConfig:
    """A relative pretrain.storage_path goes inside --out, as in the pipeline's run folder: against the
    working directory, a new --out would resume whatever an earlier run left under the same run name."""
    from diffscaler.stages.base import inside

    root = Path(out).expanduser().resolve()
    storage_path = inside(root, cfg.pretrain.storage_path)
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, storage_path=storage_path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. ray_jobs/configs/tiny.yaml")
    parser.add_argument("--out", required=True, help="output folder (backbone, metrics, logs)")
    parser.add_argument("--shards", default=None, help="pretraining shard folder (default: from data.*)")
    parser.add_argument("--weights", choices=("ema", "raw"), default="ema", help="weights to export")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain.steps=50")
    args = parser.parse_args(argv)

    import ray

    from diffscaler.data.index import DatasetError
    from diffscaler.stages import Run
    from diffscaler.stages.pretrain import PretrainStage
    from diffscaler.train.pretrain import PretrainError

    connected_before = ray.is_initialized()
    try:
        cfg = in_out_folder(load_config(args.config, args.overrides), args.out)
        run = Run.for_program(cfg, "pretrain", args.out, backbone_dir=args.out)
        # the stage's training checks the config, shards and storage first, then connects to (or starts) Ray.
        with run_lock(args.out, "ray_jobs.pretrain"):  # one run per --out: a second would mix up the files
            result = PretrainStage().train(run, args.shards, weights=args.weights)
    except (ConfigError, DatasetError, RunFolderError) as err:
        print(f"ray_jobs.pretrain: error: {err}", file=sys.stderr)
        return 2
    except PretrainError as err:
        print(f"ray_jobs.pretrain: failed: {err}", file=sys.stderr)
        return 1
    finally:
        if not connected_before and ray.is_initialized():
            ray.shutdown()
    skipped = ""
    if result.skipped_samples:  # data.skip_bad_samples=true dropped some: say so where it is read
        skipped = (
            f"; {result.skipped_samples} bad sample(s) skipped in {len(result.skipped_files or {})} "
            "shard(s), listed in backbone.json"
        )
    print(
        f"pretrain: backbone {result.backbone} ({result.weights} weights, step {result.step}, "
        f"{result.content_hash}); metrics {result.metrics}; {result.wall_s:.1f} s{skipped}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
