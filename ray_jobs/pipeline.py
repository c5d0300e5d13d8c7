"""Ray program: the whole pipeline from one YAML file - shards, pretrain, fine-tunes, sweep, FID, report.

    python -m ray_jobs.pipeline --config ray_jobs/configs/tiny.yaml --out runs/demo          # `make demo`
    python -m ray_jobs.pipeline --config ray_jobs/configs/tiny.yaml --out runs/demo pretrain.steps=400
    python -m ray_jobs.pipeline --config cfg.yaml --out runs/x 'pipeline.stages=[finetune,evaluate,report]'
    python -m ray_jobs.pipeline --config cfg.yaml --out runs/x pipeline.backbone=runs/demo/backbone/backbone.safetensors
    python -m ray_jobs.pipeline --config cfg.yaml --out runs/x --force finetune,evaluate
    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env-json '{"excludes": [".git", ".venv", "shards", "runs"]}' \
        -- python -m ray_jobs.pipeline --config ray_jobs/configs/gpu.yaml --out /shared/runs/run1

Rerun the same command after a failure or Ctrl-C: finished stages whose outputs are still valid are
skipped (`OUT/pipeline.json` records each stage's status, wall time and outputs). Exit status:
0 done; 1 a stage failed (named on stderr and in pipeline.json), or the run folder could not be
written (a full disk: "no space left on device at PATH"); 2 bad input found before any stage ran;
130 interrupted (Ctrl-C or SIGTERM, e.g. `ray job stop`).
"""

from __future__ import annotations

import argparse
import sys

from diffscaler.config import ConfigError, load_config
from diffscaler.errors import no_space_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. ray_jobs/configs/tiny.yaml")
    parser.add_argument("--out", required=True, help="run folder (relative storage paths of the config go inside)")
    parser.add_argument("--force", default="", help="comma-separated stages to redo even if their outputs are valid")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. pretrain.steps=400")
    args = parser.parse_args(argv)

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"ray_jobs.pipeline: config error: {err}", file=sys.stderr)
        return 2
    # after the config is known good: the stages import torch, Ray and the libraries (seconds), a config
    # error is reported without them; an unknown stage name, by the stage registry before anything is written
    from diffscaler.pipeline import PipelineInputError, PipelineStageError, run_pipeline

    try:
        run_pipeline(cfg, args.out, force=[s for s in args.force.split(",") if s])
    except (ConfigError, PipelineInputError) as err:
        print(f"ray_jobs.pipeline: error: {err}", file=sys.stderr)
        return 2
    except PipelineStageError as err:
        print(
            f"ray_jobs.pipeline: {err}\nrerun the same command to continue; see {args.out}/pipeline.json",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            f"ray_jobs.pipeline: interrupted; finished stages are kept, rerun to continue ({args.out}/pipeline.json)",
            file=sys.stderr,
        )
        return 130
    except OSError as err:  # outside any stage: the run folder's own files (a full disk, permissions)
        print(
            f"ray_jobs.pipeline: error: {no_space_message(err) or err}; see {args.out}/pipeline.json", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
