"""Pretraining step throughput of one DeepSpeed rank (no Ray): images/s, step time, MFU, EMA cost.

    python -m bench.pretrain_step                                  # CPU: DiT-T/4 32x32, fp32
    python -m bench.pretrain_step --model DiT-B/2 --batch 256 --zero 2 3 --gpu   # one GPU, bf16

The same pieces as a Ray Train worker of `diffscaler.train.pretrain` - the DeepSpeed config built
from `pretrain.*`, the torch AdamW, the warm-up schedule, `train_step`, the fp32 EMA - on a
one-process group, with synthetic batches (data loading is measured by bench/shard_read.py).
MFU = 6 x model multiply-adds x images/s over the peak of `device_peak_flops` (named in the table).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

from diffscaler.config import DiffusionConfig, ModelConfig, PretrainConfig
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.models import build_model, model_macs
from diffscaler.train.deepspeed_setup import (
    build_optimizer,
    deepspeed_config,
    resolve_precision,
    skip_cpu_shm_allreduce_build,
    warmup_scheduler,
)
from diffscaler.train.ema import EmaWeights
from diffscaler.train.train_log import device_peak_flops, training_flops_per_image


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pretrain_step", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="DiT-T/4")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="images per step (one rank)")
    parser.add_argument("--zero", type=int, nargs="+", default=[2], help="ZeRO stages to measure")
    parser.add_argument("--gpu", action="store_true", help="CUDA + bf16 (else CPU + fp32)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    args = parser.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.gpu else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import logging

    import deepspeed
    import torch

    from diffscaler.train.pretrain import train_step

    deepspeed.utils.logger.setLevel(logging.WARNING)
    skip_cpu_shm_allreduce_build()
    deepspeed.init_distributed(dist_backend="nccl" if args.gpu else "gloo")
    device = torch.device("cuda", 0) if args.gpu else torch.device("cpu")
    device_name = torch.cuda.get_device_name(device) if args.gpu else "cpu"
    model_cfg = ModelConfig(name=args.model, input_size=args.input_size, num_classes=1000)
    flops_per_image = training_flops_per_image(model_macs(model_cfg))
    peak, peak_source = device_peak_flops(0.0, args.gpu, device_name)
    rows = []
    for stage in args.zero:
        p = PretrainConfig(
            num_workers=1,
            use_gpu=args.gpu,
            global_batch_size=args.batch,
            zero_stage=stage,
            grad_checkpointing=args.grad_checkpointing,
            warmup_steps=0,
        )
        dtype = torch.bfloat16 if resolve_precision(p.precision, p.use_gpu) == "bf16" else torch.float32
        model = build_model(model_cfg, seed=0)
        model.check_inputs = False
        model.set_grad_checkpointing(p.grad_checkpointing)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=build_optimizer(model, p),
            lr_scheduler=warmup_scheduler(0),
            config=deepspeed_config(p, world_size=1, use_gpu=p.use_gpu),
        )
        ema = EmaWeights(engine.module, p.ema_decay)
        diffusion = GaussianDiffusion.from_config(DiffusionConfig())
        x = torch.rand(args.batch, 3, args.input_size, args.input_size, device=device) * 2 - 1
        y = torch.randint(0, 1000, (args.batch,), device=device)
        batches = itertools.repeat({"image": x, "label": y})

        def sync() -> None:
            if args.gpu:
                torch.cuda.synchronize()

        for _ in range(3):
            train_step(engine, diffusion, batches, 1, dtype, device)
            ema.update()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = train_step(engine, diffusion, batches, 1, dtype, device)
        float(loss)
        sync()
        step_s = (time.perf_counter() - start) / args.steps
        start = time.perf_counter()
        for _ in range(args.steps):
            ema.update()
        sync()
        ema_s = (time.perf_counter() - start) / args.steps
        images_per_s = args.batch / step_s
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if args.gpu else float("nan")
        rows.append(
            (
                stage,
                str(dtype).split(".")[-1],
                images_per_s,
                1e3 * step_s,
                images_per_s * flops_per_image / peak,
                1e3 * ema_s,
                memory,
            )
        )
        del engine, model, ema
        if args.gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    print(
        f"{args.model} at {args.input_size}x{args.input_size}, batch {args.batch} on one rank ({device_name}), "
        f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}; MFU against {peak_source}"
    )
    print(f"{'ZeRO':>4} {'dtype':>8} {'images/s':>10} {'step ms':>9} {'MFU %':>7} {'EMA ms':>8} {'peak GiB':>9}")
    for stage, dtype, ips, ms, mfu, ema_ms, mem in rows:
        print(f"{stage:>4} {dtype:>8} {ips:>10.1f} {ms:>9.1f} {100 * mfu:>7.2f} {ema_ms:>8.2f} {mem:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
