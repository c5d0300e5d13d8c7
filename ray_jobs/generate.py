"""Generate many tasks' images as WebDataset shards, on a Ray Data actor pool (mixed-task batches).

    python -m ray_jobs.generate --config ray_jobs/configs/tiny.yaml \\
        --backbone runs/demo/backbone/backbone.safetensors --adapters runs/demo/adapters --out runs/gen \\
        generate.images_per_task=1000 generate.num_actors=2
    ray job submit --working-dir . -- python -m ray_jobs.generate --config ... --out /shared/gen \\
        pipeline.ray_address=auto

Tasks: generate.tasks (default: every adapter in --adapters that fits the backbone). A task with a condition
map takes its maps from generate.condition_split of its shards (data.shards_root/<task>): image k, map k mod M.
OUT holds train-NNNNNN.tar shards (png + cls + json per image, and cond.png for a task with maps) and index.json
(`diffscaler shards check OUT` accepts it); a rerun keeps finished shards and generates only the missing ones.
OUT is locked while the job runs. Every input is checked before Ray is joined.
Exit status: 0 done, 2 bad input (named), 1 the job failed.
"""

from __future__ import annotations

import argparse
import sys

from diffscaler.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_jobs.generate", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML (its generate: section)")
    p.add_argument("--backbone", required=True, help="backbone.safetensors")
    p.add_argument("--adapters", required=True, help="folder of <task>.safetensors adapters (a fine-tune's --out)")
    p.add_argument("--out", required=True, help="output dataset folder (shards + index.json)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. generate.images_per_task=64")
    args = p.parse_args(argv)

    from diffscaler.runlock import RunFolderError, check_out_dir, run_lock
    from diffscaler.serving.generate import GenerateInputError, check_inputs, generate_set

    try:
        cfg = load_config(args.config, args.overrides)
        check_out_dir(args.out)
        checked = check_inputs(cfg, args.backbone, args.adapters, args.out)  # before the lock creates OUT and Ray
        with run_lock(args.out, "ray_jobs.generate"):
            from diffscaler.cluster import connect_ray

            started = connect_ray(cfg)
            try:
                generate_set(cfg, args.backbone, args.adapters, args.out, checked=checked)
            finally:
                if started:
                    import ray

                    ray.shutdown()
    except (ConfigError, GenerateInputError, RunFolderError) as err:
        print(f"generate: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
