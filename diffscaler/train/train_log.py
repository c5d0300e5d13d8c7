"""What a training run reports: metrics.jsonl, TensorBoard scalars, stdout lines, events, MFU.

    log = MetricsLog(out_dir, start_step=0, total_steps=200, print_lines=True)   # rank 0 only
    log.log({"step": 10, "loss": 0.41, "lr": 3e-4, "images_per_s": 55.0, "mfu": 0.01})
    log.close()

Files under the run's output folder:
- `metrics.jsonl`: one JSON object per logged step: step, loss (all-reduced mean of the per-step
  losses since the last line), lr, images_per_s (whole job), mfu (fraction of the peak), grad_norm.
- `tensorboard/`: the same as scalars (`tensorboard --logdir DIR/tensorboard`).
- `events.jsonl`: start / resume / checkpoint / samples / done / failure events, with steps.

MFU = training FLOPs per second / (peak FLOP/s per device x devices), with training FLOPs per image
= 3 x 2 x the model's multiply-adds per forward (forward + backward, as in PaLM/nanoGPT; the
recompute of gradient checkpointing is not counted). The peak is `pretrain.peak_tflops` when set,
else picked by device (dense bf16 tensor-core peaks) or, on CPU, a nominal 1 TFLOP/s per worker -
a placeholder that makes CPU numbers comparable with each other, not a measured peak.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from diffscaler.atomic import write_text_atomic

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
GPU_DEFAULT_PEAK_FLOPS = 989e12  # an unknown GPU is measured against an H100
CPU_NOMINAL_PEAK_FLOPS = 1e12  # nominal, per worker: not a measured peak (see module docstring)


def device_peak_flops(peak_tflops: float, use_gpu: bool, device_name: str = "") -> tuple[float, str]:
    """(peak FLOP/s per device, where that number came from)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12, f"pretrain.peak_tflops={peak_tflops:g}"
    if not use_gpu:
        return CPU_NOMINAL_PEAK_FLOPS, "nominal CPU peak 1 TFLOP/s per worker"
    for key, flops in GPU_PEAK_FLOPS.items():
        if key in device_name:
            return flops, f"{key} dense bf16 peak {flops / 1e12:g} TFLOP/s"
    return GPU_DEFAULT_PEAK_FLOPS, f"unknown GPU {device_name!r}: H100 dense bf16 peak 989 TFLOP/s"


def training_flops_per_image(model_macs: int) -> int:
    """Forward (2 FLOPs per multiply-add) plus backward (twice the forward)."""
    return 3 * 2 * model_macs


def say(message: str) -> None:
    """One line to stdout. Not print(): inside Ray Train workers print() is patched to also log, and
    the line would reach the driver twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed writer
    return records


class EventLog:
    """Appends one JSON object per event to `events.jsonl` (rank 0)."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "events.jsonl"

    def write(self, event: str, **fields: Any) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def format_line(record: dict[str, Any], total_steps: int) -> str:
    parts = [f"step {record['step']}/{total_steps}", f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}"]
    if "images_per_s" in record:
        parts.append(f"{record['images_per_s']:.1f} images/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.2f}%")
    if record.get("grad_norm") is not None:
        parts.append(f"grad-norm {record['grad_norm']:.3f}")
    return "pretrain: " + ", ".join(parts)


class MetricsLog:
    """Rank 0's metrics sinks: metrics.jsonl (append + flush), TensorBoard, stdout lines.

    `history` (the metrics.jsonl of the checkpoint being resumed, or None) replaces the file, so
    steps repeated after a restart appear once; TensorBoard purges the repeated steps too.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        start_step: int,
        total_steps: int,
        print_lines: bool,
        history: list[dict[str, Any]] | None = None,
    ):
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.total_steps = total_steps
        self.print_lines = print_lines
        self.discarded: list[dict[str, Any]] = []  # lines past the resumed step (repeated now)
        current = read_jsonl(self.path)
        kept = history if history is not None else [r for r in current if r["step"] <= start_step]
        self.discarded = [r for r in current if r["step"] > start_step]
        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self.file = self.path.open("a")
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()
        step = record["step"]
        scalars = {
            "train/loss": "loss",
            "train/lr": "lr",
            "train/grad_norm": "grad_norm",
            "perf/images_per_s": "images_per_s",
            "perf/mfu": "mfu",
        }
        for tag, key in scalars.items():
            value = record.get(key)
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()
        if self.print_lines:
            say(format_line(record, self.total_steps))

    def close(self) -> None:
        self.file.close()
        self.writer.close()


@contextmanager
def follow_progress(metrics_path: Path, total_steps: int, enabled: bool) -> Iterator[None]:
    """Driver side: a tqdm bar that follows metrics.jsonl while rank 0 writes it (same machine or a
    shared folder). Ray workers have no terminal, so the bar lives here, not in the workers."""
    if not enabled:
        yield
        return
    from tqdm import tqdm

    stop = threading.Event()

    def follow() -> None:
        bar = tqdm(total=total_steps, unit="step", desc="pretrain", dynamic_ncols=True)
        try:
            while not stop.wait(1.0):
                records = read_jsonl(metrics_path) if metrics_path.is_file() else []
                if records:
                    last = records[-1]
                    bar.n = last["step"]
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last.get('images_per_s', 0):.1f}")
                    bar.refresh()
        except (OSError, ValueError, KeyError):
            pass  # a half-written line or a vanished file: the bar is cosmetic
        finally:
            bar.close()

    thread = threading.Thread(target=follow, name="pretrain-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def interactive() -> bool:
    """A terminal is attached and this is not a CI log."""
    return sys.stdout.isatty() and os.environ.get("CI", "") == ""
