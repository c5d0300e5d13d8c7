"""Ray program: fine-tune one adapter per target dataset on a frozen backbone, all in parallel.

    python -m ray_jobs.finetune --config ray_jobs/configs/tiny.yaml --backbone runs/pretrain/backbone.safetensors \
        --out runs/adapters
    python -m ray_jobs.finetune --config ray_jobs/configs/tiny.yaml --backbone FILE --out runs/compare \
        'finetune.methods=[affiner,difffit,lora,bitfit,full]'            # every row of the comparison table
    python -m ray_jobs.finetune ... finetune.mixed=true                  # all tasks in one run, mixed batches
    ray job submit --working-dir . -- python -m ray_jobs.finetune --config ray_jobs/configs/gpu.yaml \
        --backbone /shared/backbone.safetensors --out /shared/adapters finetune.use_gpu=true

Writes OUT/<task>.safetensors + .json per target (further methods in OUT/<method>/), OUT/bank.safetensors
+ bank.json, OUT/logs/<method>/<task>.jsonl and OUT/summary.json, and prints the table (task, method,
rank, trainable parameters and % of the backbone, steps, final loss, wall time). Rerun with the same
OUT to redo only what failed or changed. Exit status 2: bad input (named) found before any fine-tune
started; 1: at least one fine-tune failed (the table says which and why); 0: all done.
"""

from __future__ import annotations

import argparse
import sys

from diffscaler.config import ConfigError, load_config
from diffscaler.runlock import RunFolderError, run_lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. ray_jobs/configs/tiny.yaml")
    parser.add_argument("--backbone", required=True, help="backbone.safetensors (or a public DiT .pt)")
    parser.add_argument("--out", required=True, help="adapter folder")
    parser.add_argument("--force", action="store_true", help="retrain adapters that are already up to date")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.steps=50")
    args = parser.parse_args(argv)

    from diffscaler.stages import Run
    from diffscaler.stages.finetune import FinetuneStage
    from diffscaler.train.finetune import FinetuneInputError, format_table

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"ray_jobs.finetune: config error: {err}", file=sys.stderr)
        return 2
    try:  # Ray is started (or joined) only once the input checks pass and something is left to train
        run = Run.for_program(
            cfg, "finetune", args.out, backbone=args.backbone, force=args.force, adapters_dir=args.out
        )
        with run_lock(args.out, "ray_jobs.finetune"):  # one run per --out: a second would mix up the files
            summary = FinetuneStage().train(run)  # the pipeline's finetune stage, without its failure rule
    except (ConfigError, FinetuneInputError, RunFolderError) as err:
        print(f"ray_jobs.finetune: error: {err}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"summary: {summary.out_dir}/summary.json; banks: {summary.banks}; {summary.wall_s:.1f} s")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
