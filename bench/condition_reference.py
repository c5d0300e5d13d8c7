"""Condition fidelity's reference rows on the bundled data: the ceiling (real images against their own maps)
and chance (against other images' maps), per task kind and image size. Where generated images must land.

    python -m bench.condition_reference                          # canny on emoji and icons, mask on emoji; 16, 32 px
    python -m bench.condition_reference --images 500 --sizes 16 32 64

Each row builds real shards (`make_shards` with the condition, as the shards stage does), reads the eval
split's images and maps back (`read_split(..., conditions=True)`) and scores them with
diffscaler.eval.fidelity: edge F1 at 1-px tolerance (canny), mask IoU (mask, re-extracted from RGB). Also
printed: the share of pixels that are on in the maps (dense edge maps make chance high at 1-px tolerance).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

from diffscaler.config import DataConfig
from diffscaler.data import make_shards, read_split
from diffscaler.data.conditions import ConditionSpec
from diffscaler.eval.fidelity import reference_rows

TASKS = (("emoji", "canny"), ("icons", "canny"), ("emoji", "mask"), ("icons", "mask"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400, help="images per source (eval split: all of them)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32], help="image sides in pixels")
    parser.add_argument("--seed", type=int, default=0, help="selection and derangement seed")
    args = parser.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="condition-reference-")
    data = DataConfig()
    rows = []
    try:
        for size in args.sizes:
            for source, kind in TASKS:
                spec = ConditionSpec.from_config(kind, data)
                out = os.path.join(tmp, f"{source}-{kind}-{size}")
                # eval_fraction just under 1: (almost) every image in the eval split, as evaluation reads it
                make_shards(
                    source,
                    out,
                    size=size,
                    limit=args.images,
                    eval_fraction=0.99,
                    seed=args.seed,
                    condition=spec,
                    log=lambda m: None,
                )
                images, _labels, maps = read_split(out, "eval", conditions=True)
                ref = reference_rows(spec, images, maps, seed=args.seed)
                rows.append((source, kind, size, len(images), ref["ceiling"], ref["mismatched"], (maps > 127).mean()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\ncondition fidelity reference rows: eval split of {args.images} images per source, seed {args.seed}, "
        f"extractor defaults of DataConfig (canny {data.canny_low:g}/{data.canny_high:g}, blur {data.canny_blur:g}; "
        f"mask alpha >= {data.mask_alpha_threshold}, RGB white within {data.mask_white_threshold})"
    )
    print(f"{'source':<8} {'kind':<6} {'px':>3} {'n':>5} {'metric':<9} {'ceiling':>15} {'mismatched':>15} {'on':>6}")
    for source, kind, size, n, ceiling, chance, on in rows:
        print(
            f"{source:<8} {kind:<6} {size:>3} {n:>5} {ceiling.metric:<9} {ceiling.mean:>7.3f} ± {ceiling.std:.3f} "
            f"{chance.mean:>7.3f} ± {chance.std:.3f} {on:>6.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
