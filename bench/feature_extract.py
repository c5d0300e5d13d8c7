"""FID feature extraction on CPU: what folding BatchNorm and channels-last (NHWC) buy EfficientNet-Lite0.

    python -m bench.feature_extract [--images 128] [--batch 64] [--repeats 3]

Times `net.extract_features` on random 224 px inputs (the extractor's own input) for the four variants on
one thread, best of `--repeats`, and prints images per CPU-second (process CPU time: honest on a busy
machine, where wall time is not). The extractor (diffscaler.eval.features) uses the folded, NHWC one.
"""

from __future__ import annotations

import argparse
import time

import torch
from efficientnet_lite_pytorch import EfficientNet

from diffscaler.eval.features import EFFICIENTNET_NAME, _fuse_batchnorm, default_efficientnet_weights, load_weights_file


def _net(fold: bool) -> torch.nn.Module:
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(load_weights_file(default_efficientnet_weights(), EFFICIENTNET_NAME), strict=False)
    net.eval().requires_grad_(False)
    if fold:
        _fuse_batchnorm(net)
    return net


def _images_per_s(net: torch.nn.Module, x: torch.Tensor, batch: int, repeats: int) -> float:
    best = float("inf")
    with torch.inference_mode():
        net.extract_features(x[:batch])  # warm-up
        for _ in range(repeats):
            t0 = time.process_time()
            for i in range(0, len(x), batch):
                net.extract_features(x[i : i + batch])
            best = min(best, time.process_time() - t0)
    return len(x) / best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.feature_extract", description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(args.images, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    print(f"torch {torch.__version__}, 1 thread, {args.images} images, batch {args.batch}, best of {args.repeats}")
    print("| BatchNorm | layout | images / CPU-s |\n|---|---|---:|")
    for fold in (False, True):
        for nhwc in (False, True):
            net = _net(fold)
            inputs = x
            if nhwc:
                net = net.to(memory_format=torch.channels_last)
                inputs = x.contiguous(memory_format=torch.channels_last)
            rate = _images_per_s(net, inputs, args.batch, args.repeats)
            print(f"| {'folded' if fold else 'separate'} | {'NHWC' if nhwc else 'NCHW'} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
