"""Issue 8's speed table on one GPU, in one short run: for DiT-XL/2 and DiT-B/2 on 32x32x4 latents
and pixel-space DiT-S/2 on 32x32x3 images (1000 classes, learned sigma), each phase of
`bench.workloads.PHASES`: the full training step, the Affiner step, the mixed-task step, and the
sampling forward (bare, unmerged, mixed, merged). bf16 autocast over fp32 master weights, each
block compiled with torch.compile (inductor), fused AdamW, SDPA attention.

MFU = (FLOPs per image) x images/s / peak, with 2 FLOPs per multiply-add and a training step
counted as 3 forwards; the peak is the bf16 matrix-product rate measured at the start of the run
(and, second, the H100 SXM's 989 TFLOP/s dense bf16 datasheet figure).

    python -m bench.gpu_speed --out $OUT --commit abc1234 --budget-s 520   # on the GPU (about 9 min)
    python -m bench.gpu_speed --models XL --load-compile-cache F   # a rerun reusing compiled kernels
    python -m bench.gpu_speed --models XL --phases train --sdpa-backend cudnn --train-batch 192   # levers
    python -m bench.gpu_speed --models XL --phases mixed-train,sample-mixed --no-grouped-mixed     # A/B
    python -m bench.gpu_speed --cpu-smoke --out /tmp/smoke         # every code path, tiny, on the CPU

Writes OUT/gpu_speed.jsonl (a header line, then one line per phase, all timings) and
OUT/gpu_speed.md (the table for bench/RESULTS.md); with --save-compile-cache also
OUT/compile_cache.bin.gz (torch.compile's artefacts, for --load-compile-cache on the next run).
On an H100 run 1's seven phases took about 6.5 minutes, 60 % of it compiling (~27 block graphs);
the two Affiner A/B phases (plain autograd, recomputed blocks) add about 70 s per model. --budget-s
skips the phases that would start later, and --models/--phases pick a subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gzip
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench.workloads import (
    PHASES,
    SDPA_BACKENDS,
    ModelSpec,
    Row,
    RunSettings,
    matmul_ceiling_tflops,
    measure_model,
    ratio,
)

H100_SXM_DENSE_BF16_TFLOPS = 989.4  # datasheet, dense (no sparsity)

GPU_SPECS = {
    "XL": ModelSpec("DiT-XL/2", 32, 4, train_batch=128, sample_batch=256),
    "B": ModelSpec("DiT-B/2", 32, 4, train_batch=256, sample_batch=256),
    "S": ModelSpec("DiT-S/2", 32, 3, train_batch=256, sample_batch=256),
}
CPU_SMOKE_SPECS = {"T": ModelSpec("DiT-T/8", 16, 4, train_batch=4, sample_batch=4, num_classes=10)}

# (phase, the phase it is compared with, how: "speedup" = images/s over, "cost" = time per image over)
COMPARISONS = (
    ("affiner", "train", "speedup", ">= 1.5x"),
    ("affiner", "affiner-autograd", "speedup", "lean backward's A/B (> 1x: lean faster)"),
    ("affiner-ckpt", "train", "speedup", "recompute: memory for speed"),
    ("mixed-train", "affiner", "cost", "<= 1.05x"),
    ("sample-unmerged", "sample-bare", "cost", "<= 1.10x"),
    ("sample-mixed", "sample-unmerged", "cost", "<= 1.05x"),
    ("sample-merged", "sample-bare", "cost", "side path only"),
)


def flops_per_image(spec: ModelSpec, phase: str) -> float:
    """Nominal FLOPs per image: 2 per multiply-add; a training step is 3 forwards (the issue's MFU).
    Only the full training step and the sampling forwards get an MFU: a frozen backbone skips the
    weight gradients, so 3 forwards would overstate its work."""
    if phase == "train":
        return 6.0 * spec.macs()
    if phase.startswith("sample"):
        return 2.0 * spec.macs()
    return math.nan


def fmt(value: float, digits: int = 1) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(rows: list[Row], specs: dict[str, ModelSpec], peak_tflops: float) -> str:
    by_label = {spec.label(): spec for spec in specs.values()}
    lines = [
        "| model | phase | batch | ms/step | images/s | MFU % (measured peak) | MFU % (989 spec) "
        "| peak mem GiB | spread % | first call s | check (rel. err) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spec = by_label[r.model]
        flops = flops_per_image(spec, r.phase) * r.images_per_s
        mem = r.peak_mem_bytes / 2**30 if r.peak_mem_bytes is not None else math.nan
        check = f"{r.check_rel_err:.1e} {r.check_what}" if r.check_rel_err is not None else ""
        if r.error:
            lines.append(f"| {r.model} | {r.phase} | {r.batch} | {r.error} | | | | | | | |")
            continue
        lines.append(
            f"| {r.model} | {r.phase} | {r.batch} | {fmt(r.median_s * 1e3, 2)} | {fmt(r.images_per_s, 0)} "
            f"| {fmt(100 * flops / (peak_tflops * 1e12))} | {fmt(100 * flops / (H100_SXM_DENSE_BF16_TFLOPS * 1e12))} "
            f"| {fmt(mem, 2)} | {fmt(100 * r.spread)} | {fmt(r.first_call_s)} | {check} |"
        )
    lines += ["", "| model | comparison | ratio | target |", "|---|---|---|---|"]
    for spec in specs.values():
        label = spec.label()
        mine = [r for r in rows if r.model == label]
        for num, den, kind, target in COMPARISONS:
            cost = ratio(mine, label, num, den)
            value = 1 / cost if kind == "speedup" else cost
            what = f"{num} images/s / {den} images/s" if kind == "speedup" else f"{num} / {den} time per image"
            lines.append(f"| {label} | {what} | {fmt(value, 2)}{'' if math.isnan(value) else 'x'} | {target} |")
        mem = {r.phase: r.peak_mem_bytes for r in mine if r.peak_mem_bytes}
        for phase in ("affiner", "affiner-autograd", "affiner-ckpt", "mixed-train"):
            if phase in mem and "train" in mem:
                lines.append(f"| {label} | {phase} / train peak memory | {mem[phase] / mem['train']:.2f}x | <= 0.6x |")
    return "\n".join(lines)


def save_compile_cache(path: Path) -> str:
    """torch.compile's artefacts (FX graphs, Triton kernels) for the next run; gzip, atomic write."""
    try:
        artifacts = torch.compiler.save_cache_artifacts()
    except Exception as exc:  # an optional speed-up of the next run, never a reason to fail this one
        return f"not saved ({type(exc).__name__}: {exc})"
    if artifacts is None:
        return "not saved (nothing recorded)"
    blob = gzip.compress(artifacts[0], compresslevel=3)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    return f"saved {len(blob) / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the CPU: every code path, no speed")
    parser.add_argument("--models", default=None, help="comma list of XL,B,S (default all; T with --cpu-smoke)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for the results")
    parser.add_argument("--commit", default="unknown", help="the commit measured (the device copy has no .git)")
    parser.add_argument("--compile-backend", default=None, help="inductor (GPU default), aot_eager (CPU default), none")
    parser.add_argument("--sdpa-backend", default=None, choices=SDPA_BACKENDS, help="force one attention kernel")
    parser.add_argument(
        "--no-grouped-mixed", action="store_true", help="mixed batches per sample, not sorted into a grouped matmul"
    )
    parser.add_argument(
        "--compile-mode", default=None, help="inductor mode: reduce-overhead (CUDA graphs), max-autotune, ..."
    )
    parser.add_argument("--train-batch", type=int, default=None, help="override every model's training batch")
    parser.add_argument("--sample-batch", type=int, default=None, help="override every model's sampling batch")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip phases that would start after this")
    parser.add_argument(
        "--save-compile-cache",
        action="store_true",
        help="write OUT/compile_cache.bin.gz (20-55 MiB gzipped for the full table: over the "
        "16 MiB a device call returns, so off by default)",
    )
    parser.add_argument("--load-compile-cache", default=None, help="a compile_cache.bin.gz of an earlier run")
    args = parser.parse_args(argv)

    start = time.monotonic()
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --cpu-smoke for the CPU check")
    device = torch.device("cpu" if smoke else "cuda")
    specs_all = CPU_SMOKE_SPECS if smoke else GPU_SPECS
    names = args.models.split(",") if args.models else list(specs_all)
    bad = [n for n in names if n not in specs_all]
    if bad:
        parser.error(f"--models {bad}: allowed {list(specs_all)}")
    specs = {n: specs_all[n] for n in names}
    for flag in ("train_batch", "sample_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
        if value is not None:
            specs = {n: dataclasses.replace(spec, **{flag: value}) for n, spec in specs.items()}
    phases = tuple(p for p in args.phases.split(",") if p)
    backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    settings = RunSettings(
        device=device,
        amp_dtype=torch.bfloat16,
        compile_backend=None if backend == "none" else backend,
        fullgraph=smoke,
        warmup=args.warmup if args.warmup is not None else (2 if smoke else 3),
        repeats=args.repeats if args.repeats is not None else (2 if smoke else 10),
        sdpa_backend=args.sdpa_backend,
        group_mixed=not args.no_grouped_mixed,
        compile_mode=args.compile_mode,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if smoke:
        torch.set_num_threads(1)  # tiny ops: OpenMP threads only spin against each other on a shared CPU
    if not smoke:
        torch.backends.cuda.matmul.allow_tf32 = True  # any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    if args.load_compile_cache:
        torch.compiler.load_cache_artifacts(gzip.decompress(Path(args.load_compile_cache).read_bytes()))

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = matmul_ceiling_tflops(device, n=8192 if not smoke else 256, repeats=10 if not smoke else 2)
    header = {
        "card": card,
        "date": dt.date.today().isoformat(),
        "commit": args.commit,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "compile_backend": settings.compile_backend,
        "amp": str(settings.amp_dtype),
        "measured_bf16_matmul_tflops": peak,
        "spec_bf16_tflops": H100_SXM_DENSE_BF16_TFLOPS,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "sdpa_backend": settings.sdpa_backend,
        "group_mixed": settings.group_mixed,
        "compile_mode": settings.compile_mode,
        "batches": {spec.label(): [spec.train_batch, spec.sample_batch] for spec in specs.values()},
    }
    print(
        f"== {card} | torch {torch.__version__} | bf16 matmul ceiling {peak:.0f} TFLOP/s (8192^3, median)"
        f" | backend {settings.compile_backend} | commit {args.commit}",
        flush=True,
    )
    jsonl = out / "gpu_speed.jsonl"
    with jsonl.open("w") as f:
        f.write(json.dumps({"header": header}) + "\n")

    def on_row(row: Row) -> None:
        with jsonl.open("a") as f:
            f.write(json.dumps(row.to_dict()) + "\n")
        mem = f"{row.peak_mem_bytes / 2**30:.1f} GiB" if row.peak_mem_bytes else "-"
        check = f" check {row.check_rel_err:.1e} ({row.check_what})" if row.check_rel_err is not None else ""
        print(
            f"[{time.monotonic() - start:6.1f}s] {row.model:<22} {row.phase:<16} batch {row.batch:<4} "
            + (
                row.error
                or f"{row.median_s * 1e3:8.2f} ms  {row.images_per_s:8.0f} img/s  mem {mem}"
                f"  first call {row.first_call_s:.1f}s{check}"
            ),
            flush=True,
        )

    rows: list[Row] = []
    for spec in specs.values():
        rows += measure_model(
            spec, settings, phases, on_row=on_row, out_of_time=lambda: time.monotonic() - start > args.budget_s
        )
    if args.save_compile_cache and not smoke:
        print(f"compile cache: {save_compile_cache(out / 'compile_cache.bin.gz')}", flush=True)
    text = (
        f"card: {card}; date: {header['date']}; commit: {args.commit}; torch {torch.__version__}; "
        f"measured bf16 matmul ceiling: {peak:.0f} TFLOP/s\n\n" + table(rows, specs, peak)
    )
    (out / "gpu_speed.md").write_text(text + "\n")
    print(f"\n{text}\n\ntotal {time.monotonic() - start:.0f} s", flush=True)
    return 1 if any(r.error and not r.error.startswith("skipped") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
