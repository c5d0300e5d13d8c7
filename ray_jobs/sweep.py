"""Ray Tune program: sweep adapter rank and learning rate per dataset (ASHA), score the best by FID.

    python -m ray_jobs.sweep --config ray_jobs/configs/tiny.yaml --backbone runs/pretrain/backbone.safetensors \
        --out runs/sweep
    python -m ray_jobs.sweep --config ray_jobs/configs/tiny.yaml --backbone FILE --out runs/sweep \
        'sweep.ranks=[2,8,32]' sweep.num_samples=8 'sweep.datasets=[emoji]' --adapters runs/adapters
    ray job submit --working-dir . -- python -m ray_jobs.sweep --config ray_jobs/configs/gpu.yaml \
        --backbone /shared/backbone.safetensors --out /shared/sweep --storage s3://bucket/tune

Writes OUT/trials.csv (every trial), OUT/best.json (best configuration per dataset) and copies each
winner to ADAPTERS/<dataset>.safetensors + .json (default OUT/adapters). Rerunning the same command
resumes an interrupted sweep from Tune's storage (default OUT/tune). Exit status 2: bad input (named)
found before any trial started; 1: a dataset got no best configuration; 0: done.
"""

from __future__ import annotations

import argparse
import sys

from diffscaler.config import ConfigError, load_config
from diffscaler.eval import EvalInputError
from diffscaler.runlock import RunFolderError, run_lock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. ray_jobs/configs/tiny.yaml")
    parser.add_argument("--backbone", required=True, help="backbone.safetensors (or a public DiT .pt)")
    parser.add_argument("--out", required=True, help="sweep folder: trials.csv, best.json")
    parser.add_argument("--adapters", default=None, help="adapter folder the winners are copied to (OUT/adapters)")
    parser.add_argument("--storage", default=None, help="Tune storage_path: folder, NFS or s3:// (OUT/tune)")
    parser.add_argument("--no-fid", action="store_true", help="pick the best trial by validation loss only")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sweep.num_samples=8")
    args = parser.parse_args(argv)

    from diffscaler.stages import Run
    from diffscaler.stages.sweep import SweepStage
    from diffscaler.train.finetune import FinetuneInputError

    try:
        cfg = load_config(args.config, args.overrides)
        run = Run.for_program(cfg, "sweep", args.out, backbone=args.backbone, sweep_dir=args.out)
        with run_lock(args.out, "ray_jobs.sweep"):  # one sweep per --out: a second would mix up the files
            result = SweepStage().search(
                run, adapter_dir=args.adapters, storage_path=args.storage, run_fid=not args.no_fid
            )
    except (ConfigError, FinetuneInputError, EvalInputError, RunFolderError) as err:
        print(f"ray_jobs.sweep: error: {err}", file=sys.stderr)
        return 2
    print(f"trials: {result.out_dir}/trials.csv ({len(result.trials)} trials); best: {result.out_dir}/best.json")
    for dataset, best in result.best.items():
        fid = (
            f"FID {best['fid']:.2f} ({best['fid_feature_network']}, {best['fid_samples']} samples)"
            if best["fid"] is not None
            else "no FID"
        )
        print(
            f"{dataset}: rank {best['rank']}, lr {best['lr']:.3g}, val loss {best['val_loss']:.4f}, {fid} "
            f"-> {best['adapter']}"
        )
    datasets = {t.dataset for t in result.trials}
    return 0 if datasets <= set(result.best) else 1


if __name__ == "__main__":
    sys.exit(main())
