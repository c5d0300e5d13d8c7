"""Print each fine-tune method's trainable parameters and share of the backbone for a config, counted on
real banks (diffscaler.shares): the parameter-matched comparison shows its 0.5-1 % rather than assuming it.

    python -m bench.param_shares --config ray_jobs/configs/compare-matched.yaml
    python -m bench.param_shares --config ray_jobs/configs/compare.yaml finetune.method_ranks={lora:2}
    python -m bench.param_shares --config ray_jobs/configs/compare-matched.yaml --unet UNet-T   # + the U-Net's
"""

from __future__ import annotations

import argparse
import sys

from diffscaler.config import ConfigError, load_config
from diffscaler.shares import format_shares, method_shares, unet_shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML")
    parser.add_argument("--unet", default="", help="also a U-Net preset (UNet-T, UNet-S) at the config's size")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.method_ranks={lora:2}")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    title = f"Parameter shares: {cfg.model.name} at {cfg.model.input_size} px, {args.config}"
    print(format_shares(method_shares(cfg), title))
    if args.unet:
        try:
            rows = unet_shares(cfg.model, args.unet)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(
            format_shares(rows, f"\nParameter shares: {args.unet} (diffusers UNet2DModel) at {cfg.model.input_size} px")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
