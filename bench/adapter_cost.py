"""What the Affiner costs: a mixed-task batch against a single-task batch of the same size, and the
Affiner against the plain backbone, in training and in sampling. A micro-benchmark that prints a
table (not a timed test); the same workloads as `bench.gpu_speed`, at sizes a CPU can run.

    python -m bench.adapter_cost                                   # CPU: DiT-T/4 and DiT-T/2, eager fp32
    python -m bench.adapter_cost --threads 1 --cpu-clock process   # steadier numbers on a shared CPU
    python -m bench.adapter_cost --device cuda --bf16 --compile inductor --model DiT-XL/2:32:4:128:256

Rows: the full backbone step (forward, hybrid loss, backward, AdamW), the Affiner step (backbone
frozen, rank 8 on qkv/proj/fc1/fc2/adaLN, one task), the same step on a batch mixing 8 tasks, and
the sampling forward pass: bare backbone, one task unmerged, 8 tasks mixed, one task merged into W.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys

import torch

from bench.workloads import ModelSpec, Row, RunSettings, measure_model, ratio

# name:input_size:in_channels:train_batch:sample_batch
CPU_DEFAULT_MODELS = ("DiT-T/4:32:3:32:32", "DiT-T/2:32:3:8:8")

# (phase, baseline phase, what the ratio says)
RATIOS = (
    ("affiner", "train", "Affiner step speed-up over the full step (images/s ratio)"),
    ("affiner", "affiner-autograd", "lean backward speed-up over plain autograd (images/s ratio)"),
    ("affiner-ckpt", "train", "Affiner step, blocks recomputed, speed-up over the full step"),
    ("mixed-train", "affiner", "mixed 8-task step / single-task step (time per image)"),
    ("sample-unmerged", "sample-bare", "Affiner unmerged / bare backbone, sampling (time per image)"),
    ("sample-mixed", "sample-unmerged", "mixed 8-task / single-task, sampling (time per image)"),
    ("sample-merged", "sample-bare", "merged Affiner / bare backbone, sampling (time per image)"),
)


def parse_model(text: str, num_classes: int) -> ModelSpec:
    parts = text.split(":")
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"--model {text!r}: expected NAME:SIZE:CHANNELS:TRAIN_BATCH:SAMPLE_BATCH")
    name, size, channels, train_batch, sample_batch = parts
    return ModelSpec(name, int(size), int(channels), int(train_batch), int(sample_batch), num_classes=num_classes)


def report(rows: list[Row], specs: list[ModelSpec]) -> str:
    lines = [f"{'model':<22} {'phase':<16} {'batch':>5} {'ms/step':>10} {'images/s':>10} {'spread %':>8}"]
    for r in rows:
        if r.error:
            lines.append(f"{r.model:<22} {r.phase:<16} {r.batch:>5} {r.error}")
            continue
        lines.append(
            f"{r.model:<22} {r.phase:<16} {r.batch:>5} {r.median_s * 1e3:>10.2f} {r.images_per_s:>10.1f} "
            f"{100 * r.spread:>8.1f}"
        )
    for spec in specs:
        label = spec.label()
        lines.append(f"\n{label}")
        for num, den, what in RATIOS:
            value = ratio(rows, label, num, den)
            value = 1 / value if num.startswith("affiner") else value  # speed-ups: images/s over images/s
            lines.append(f"  {what:<62} {'-' if math.isnan(value) else f'{value:.2f}x'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"NAME:SIZE:CHANNELS:TRAIN_BATCH:SAMPLE_BATCH, repeatable (default {' and '.join(CPU_DEFAULT_MODELS)})",
    )
    parser.add_argument("--num-classes", type=int, default=1000, help="backbone classes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights")
    parser.add_argument("--compile", default=None, metavar="BACKEND", help="compile each block (inductor, ...)")
    parser.add_argument(
        "--no-grouped-mixed", action="store_true", help="mixed batches per sample, not sorted into a grouped matmul"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--cpu-clock",
        choices=("wall", "process"),
        default="wall",
        help="CPU timing: wall time, or this process's CPU time (steadier on a shared machine, with --threads 1)",
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_model(m, args.num_classes) for m in (args.model or CPU_DEFAULT_MODELS)]
    settings = RunSettings(
        device=device,
        amp_dtype=torch.bfloat16 if args.bf16 else None,
        compile_backend=args.compile,
        warmup=args.warmup,
        repeats=args.repeats,
        group_mixed=not args.no_grouped_mixed,
        cpu_clock=args.cpu_clock,
    )
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads")
    )
    print(
        f"== adapter cost on {where} | torch {torch.__version__} | "
        f"{'bf16 autocast' if args.bf16 else 'fp32'} | {'compiled: ' + args.compile if args.compile else 'eager'}"
        f" | median of {args.repeats} after {args.warmup} warm-up"
        + (f" | {args.cpu_clock} clock" if device.type == "cpu" else ""),
        flush=True,
    )
    rows: list[Row] = []
    for spec in specs:
        rows += measure_model(spec, settings)
    print(report(rows, specs))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
