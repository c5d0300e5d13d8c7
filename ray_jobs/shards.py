"""Ray program: build the shards of every dataset a config names, one Ray task per dataset.

    python -m ray_jobs.shards --config ray_jobs/configs/tiny.yaml
    python -m ray_jobs.shards --config ray_jobs/configs/tiny.yaml data.limit=200 --only emoji,icons --force
    ray job submit -- python -m ray_jobs.shards --config cfg.yaml pipeline.ray_address=auto \
        data.shards_root=s3://bucket/shards

Datasets: cfg.data.pretrain_source and every cfg.data.targets[i] (by its source), written to
cfg.data.shards_root/<name>, by the pipeline's shards stage: datasets built as configured that pass
`shards check` are kept unless --force. Each dataset folder is locked while it is built (`<name>/.lock`):
a folder in use by another program, or inside a pipeline's run folder in use, is refused.
"""

from __future__ import annotations

import argparse
import sys

from diffscaler.config import ConfigError, load_config
from diffscaler.runlock import RunFolderError, run_lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.shards", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.limit=200")
    parser.add_argument("--only", default="", help="comma-separated dataset names (default: all)")
    parser.add_argument("--force", action="store_true", help="rebuild datasets that are up to date")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"ray_jobs.shards: config error: {err}", file=sys.stderr)
        return 2

    from contextlib import ExitStack

    from diffscaler.data import dataset_dir
    from diffscaler.stages import Run
    from diffscaler.stages.shards import ShardsStage

    stage = ShardsStage(only=[n for n in args.only.split(",") if n])  # the pipeline's shards stage, on --only
    run = Run.for_program(cfg, "shards", force=args.force)
    try:  # unknown, missing or empty sources are reported before Ray starts
        stage.preflight(run)
        with ExitStack() as locks:  # each dataset folder, as every program locks its output (a bucket has no flock)
            for folder in (dataset_dir(cfg.data, name) for name in stage.names(run)):
                if "://" not in folder:
                    locks.enter_context(run_lock(folder, "ray_jobs.shards", flag="shards folder"))
            run.connect()
            built = stage.run(run)  # rebuilds what is stale or fails `shards check`, every one with --force
    except (ValueError, FileNotFoundError, RunFolderError) as err:  # missing package, empty source, folder in use
        print(f"ray_jobs.shards: error: {err}", file=sys.stderr)
        return 2
    finally:
        run.disconnect()
    print(f"{'dataset':<16} {'train':>8} {'eval':>8} {'classes':>8}  content hash")
    for name, row in built.items():
        print(f"{name:<16} {row['train']:>8} {row['eval']:>8} {row['classes']:>8}  {row['content_hash']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
