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
import statistics
import sys
import time

import torch

from bench.workloads import (
    ModelSpec,
    Row,
    RunSettings,
    bench_tasks,
    diffusion_on,
    input_maker,
    measure_model,
    perturb_,
    ratio,
    train_step,
)
from diffscaler.adapters import AdapterBank
from diffscaler.models import build_model
from diffscaler.models.compile import compile_blocks

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


# ------------------------------------------------------------------------------------------------
# Methods side by side (--methods): every PEFT step against the full step and the frozen limit,
# timed in rounds (one step of each per round) so load drifting on a shared CPU hits all alike;
# and each step's peak host memory counted from the profiler's allocation events.
# ------------------------------------------------------------------------------------------------

METHOD_VARIANTS = ("full", "frozen-limit", "affiner", "affiner-autograd", "difffit", "bitfit", "lora")


def _variant_step(spec: ModelSpec, variant: str, settings: RunSettings, generator: torch.Generator):
    """(step, make_inputs, tensors that persist between steps) for one variant on a fresh model."""
    model = build_model(spec.config(), seed=settings.seed)
    model.check_inputs = False
    perturb_(list(model.parameters()), 0.02, seed=settings.seed + 1)
    diffusion = diffusion_on(settings.device, spec.learn_sigma)
    task_mode = "none" if variant in ("full", "frozen-limit") else "single"
    make = input_maker(spec, spec.train_batch, settings.device, task_mode, settings.num_tasks, generator)
    if variant == "frozen-limit":
        # The backbone frozen and nothing of its own trained: the backward computes every input
        # gradient and no weight gradient, the bound a frozen-backbone method can reach.
        model.requires_grad_(False)
        model.train()

        if settings.compile_backend:
            compile_blocks(model, settings.compile_backend, settings.fullgraph, settings.compile_mode)

        def limit_step(x0, t, y, task_ids):
            x0 = x0.requires_grad_(True)
            losses = diffusion.training_losses(lambda xt, tt: model(xt, tt, y, task_ids), x0, t)
            losses["loss"].mean().backward()

        return limit_step, make, (model, None)
    if variant == "full":
        params = list(model.parameters())
    else:
        method = variant.removesuffix("-autograd")
        bank = AdapterBank.attach(model, bench_tasks(settings.num_tasks), method=method, rank=settings.rank)
        perturb_(bank.parameters(), 0.02, seed=settings.seed + 2)
        bank.set_lean_backward(not variant.endswith("-autograd"))
        params = bank.parameters()
    model.train()
    if settings.compile_backend:  # after attaching: the blocks' graphs include the adapters' terms
        compile_blocks(model, settings.compile_backend, settings.fullgraph, settings.compile_mode)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=settings.device.type == "cpu" or None)
    return train_step(model, diffusion, optimizer, settings), make, (model, optimizer)


def _persistent_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of every distinct storage alive between steps: parameters, buffers, grads, optimizer state."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def step_peak_bytes(step, inputs: tuple, model: torch.nn.Module, optimizer) -> tuple[int, int]:
    """(peak bytes during one step, persistent bytes before it), optimizer state included.

    The step runs under the PyTorch profiler with `profile_memory`: every CPU allocation and free of
    the step is an event; the running sum of them, on top of what is alive before the step
    (parameters, buffers, optimizer state), peaks at the step's peak."""
    from torch.profiler import ProfilerActivity, profile

    before = _persistent_bytes(model, optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(*inputs)
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in deltas:
        running += nbytes
        peak = max(peak, running)
    return before + peak, before


def measure_methods(spec: ModelSpec, settings: RunSettings, variants=METHOD_VARIANTS) -> list[dict]:
    generator = torch.Generator().manual_seed(settings.seed)
    built = {v: _variant_step(spec, v, settings, generator) for v in variants}
    clock = {"wall": time.perf_counter, "process": time.process_time}[settings.cpu_clock]
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(settings.warmup + settings.repeats):
        for v, (step, make, _) in built.items():
            inputs = make()
            start = clock()
            step(*inputs)
            if round_ >= settings.warmup:
                times[v].append(clock() - start)
    rows = []
    for v, (step, make, (model, optimizer)) in built.items():
        peak, persistent = step_peak_bytes(step, make(), model, optimizer)
        median = statistics.median(times[v])
        rows.append(
            {
                "variant": v,
                "median_s": median,
                "spread": (max(times[v]) - min(times[v])) / median,
                "images_per_s": spec.train_batch / median,
                "peak_bytes": peak,
                "persistent_bytes": persistent,
            }
        )
    return rows


def methods_report(label: str, rows: list[dict]) -> str:
    full = next(r for r in rows if r["variant"] == "full")
    lines = [
        f"\n{label}, batch {'?' if not rows else round(rows[0]['images_per_s'] * rows[0]['median_s'])}",
        f"{'step':<18} {'ms/step':>9} {'spread %':>8} {'x full img/s':>12} {'peak MiB':>9} "
        f"{'x full peak':>11} {'persist MiB':>11}",
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:<18} {r['median_s'] * 1e3:>9.1f} {100 * r['spread']:>8.1f} "
            f"{full['median_s'] / r['median_s']:>11.2f}x {r['peak_bytes'] / 2**20:>9.1f} "
            f"{r['peak_bytes'] / full['peak_bytes']:>10.2f}x {r['persistent_bytes'] / 2**20:>11.1f}"
        )
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
    parser.add_argument(
        "--methods",
        action="store_true",
        help="instead: every method's step (and the frozen-backbone limit) against the full step, with peak memory",
    )
    parser.add_argument(
        "--variants",
        default=",".join(METHOD_VARIANTS),
        help="with --methods: the steps to time, comma-separated (default: all; full is always in)",
    )
    args = parser.parse_args(argv)
    variants = ("full", *[v for v in args.variants.split(",") if v and v != "full"])
    unknown = sorted(set(variants) - set(METHOD_VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {list(METHOD_VARIANTS)}")

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
    if args.methods:
        for spec in specs:
            print(methods_report(spec.label(), measure_methods(spec, settings, variants)), flush=True)
        return 0
    rows: list[Row] = []
    for spec in specs:
        rows += measure_model(spec, settings)
    print(report(rows, specs))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
