"""What a task's condition path costs: sampling with the map against the same task without it, a batch
mixing conditional and unconditional tasks against one task alone, ControlNet beside them, and the
trainable parameters of each (% of the backbone). A micro-benchmark that prints a table (not a timed test).

    python -m bench.condition_cost                                   # CPU: DiT-T/4 on 32 px, DiT-T/2 on 32x32x4 latents
    python -m bench.condition_cost --threads 1 --cpu-clock process   # steadier numbers on a shared CPU
    python -m bench.condition_cost --device cuda --model DiT-XL/2:32:4:256:32

Each timed call is one whole sampling call (`diffscaler.diffusion.sampling.generate`, DDIM, `--steps`):
the map is embedded once per call and added at every step, so that is what a user pays. Phases (one task
per batch unless said): `no-map` the conditional task asked for its output without its map (the same
model and task: the baseline), `map` with its map, `map-blocks` the map also into every block's input,
`mixed` a batch of 2 conditional + 2 unconditional tasks (sorted by task: grouped matmuls), `controlnet`
the ControlNet baseline (N = half the blocks) with its map, `map-guided` condition guidance at scale 2
(two passes by design). Parameter shares come from models built on the meta device (no memory), also
for DiT-XL/2 on 256 px images (32x32x4 latents).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
from dataclasses import dataclass

import torch

from bench.workloads import perturb_, time_calls
from diffscaler.adapters import AdapterBank, TaskInfo
from diffscaler.config import ModelConfig
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.diffusion.sampling import generate
from diffscaler.models import DiT

# name:input_size:in_channels:map_size:batch
CPU_DEFAULT_MODELS = ("DiT-T/4:32:3:32:16", "DiT-T/2:32:4:256:8")
SHARE_MODELS = ("DiT-XL/2:32:4:256:1",)  # parameter shares only (meta device)

# (phase, baseline phase, what the ratio says; the targets are <= 1.05x for the first three)
RATIOS = (
    ("map", "no-map", "sampling with the map / the same task without it"),
    ("map-blocks", "no-map", "map into every block too / the same task without it"),
    ("mixed", "map", "mixed 2 conditional + 2 unconditional tasks / one task alone"),
    ("controlnet", "no-map", "ControlNet (N = depth/2) with its map / the task without one"),
    ("map-guided", "map", "condition guidance (scale 2) / no guidance (2 passes by design)"),
)


@dataclass(frozen=True)
class Spec:
    name: str
    input_size: int
    in_channels: int
    map_size: int
    batch: int

    def label(self) -> str:
        return f"{self.name} {self.input_size}x{self.input_size}x{self.in_channels}, {self.map_size} px maps"

    def config(self) -> ModelConfig:
        return ModelConfig(name=self.name, input_size=self.input_size, in_channels=self.in_channels, num_classes=10)


def parse_spec(text: str) -> Spec:
    parts = text.split(":")
    if len(parts) != 5:
        raise argparse.ArgumentTypeError(f"--model {text!r}: expected NAME:SIZE:CHANNELS:MAP_SIZE:BATCH")
    return Spec(parts[0], *(int(p) for p in parts[1:]))


def tasks_for(spec: Spec) -> list[TaskInfo]:
    """Two conditional tasks (a 1-channel edge map, a 3-channel depth map) and two unconditional ones."""
    side = spec.map_size
    return [
        TaskInfo("edges", condition="canny", condition_channels=1, condition_size=side),
        TaskInfo("plain"),
        TaskInfo("depth", condition="key:depth.png", condition_channels=3, condition_size=side),
        TaskInfo("plain2"),
    ]


def build(spec: Spec, method: str, device: torch.device, blocks: bool = False) -> tuple[DiT, AdapterBank]:
    torch.manual_seed(0)
    model = DiT(spec.config())
    bank = AdapterBank.attach(model, tasks_for(spec), method=method, rank=8, condition_blocks=blocks)
    model.to(device).eval()
    model.check_inputs = False  # host syncs are not what is measured
    perturb_(list(model.parameters()), 0.02, seed=1)  # zeros time faster than trained weights
    return model, bank


def parameter_shares(spec: Spec) -> dict[str, float]:
    """Per-task trainable parameters as % of the backbone, on the meta device (nothing allocated)."""
    out = {}
    with torch.device("meta"):
        for method in ("affiner", "controlnet"):
            model = DiT(spec.config())
            bank = AdapterBank.attach(model, tasks_for(spec), method=method, rank=8)
            backbone = bank.backbone_parameters()
            cond = bank.condition_parameters_per_task("edges")
            if method == "affiner":
                out["backbone"] = backbone
                out["cond path"] = cond
                out["Affiner"] = bank.trainable_parameters_per_task("edges") - cond
            else:
                out["ControlNet"] = cond
    return out


def measure(spec: Spec, device: torch.device, steps: int, warmup: int, repeats: int, clock: str) -> dict:
    diffusion = GaussianDiffusion()
    n = spec.batch
    g = torch.Generator().manual_seed(0)
    maps = (torch.rand(n, 3, spec.map_size, spec.map_size, generator=g) > 0.5).float() * 2 - 1
    labels = torch.zeros(n, dtype=torch.long)
    mixed_ids = torch.arange(n) % 4  # edges, plain, depth, plain2, ...

    def call(model: DiT, ids, **kw):
        return lambda: generate(
            model, diffusion, labels=labels, indices=range(n), seed=0, task_ids=ids, steps=steps, **kw
        )

    model, _ = build(spec, "affiner", device)
    off = torch.zeros(n, dtype=torch.bool)
    phases = {
        "no-map": call(model, 0, condition_mask=off),
        "map": call(model, 0, condition=maps[:, :1]),
        "mixed": call(model, mixed_ids, condition=maps),
        "map-guided": call(model, 0, condition=maps[:, :1], condition_scale=2.0),
    }
    blocks_model, _ = build(spec, "affiner", device, blocks=True)
    phases["map-blocks"] = call(blocks_model, 0, condition=maps[:, :1])
    control_model, _ = build(spec, "controlnet", device)
    phases["controlnet"] = call(control_model, 0, condition=maps[:, :1])
    times = {}
    # interleaved rounds: a neighbour's burst on a shared machine hits every phase alike
    for _ in range(repeats):
        for phase, fn in phases.items():
            times.setdefault(phase, []).extend(time_calls(lambda fn=fn: fn(), lambda: (), device, warmup, 1, clock)[1])
    return {phase: statistics.median(ts) for phase, ts in times.items()} | {
        "_spread": {phase: (max(ts) - min(ts)) / statistics.median(ts) for phase, ts in times.items()}
    }


def report(results: dict[str, dict], shares: dict[str, dict], batch: dict[str, int], steps: int) -> str:
    lines = [f"{'model':<44} {'phase':<12} {'batch':>5} {'s/call':>8} {'ms/image/step':>14} {'spread %':>8}"]
    for label, res in results.items():
        for phase, s in res.items():
            if phase.startswith("_"):
                continue
            per = 1e3 * s / batch[label] / steps
            lines.append(
                f"{label:<44} {phase:<12} {batch[label]:>5} {s:>8.3f} {per:>14.3f} {100 * res['_spread'][phase]:>8.1f}"
            )
    for label, res in results.items():
        lines.append(f"\n{label}")
        for num, den, what in RATIOS:
            value = res.get(num, math.nan) / res.get(den, math.nan)
            lines.append(f"  {what:<66} {'-' if math.isnan(value) else f'{value:.3f}x'}")
    lines.append(
        f"\n{'trainable parameters per task':<44} {'backbone':>12} {'cond path':>18} {'Affiner':>18} {'ControlNet':>18}"
    )
    for label, sh in shares.items():
        b = sh["backbone"]
        cells = [f"{sh[k]:>9,} {100 * sh[k] / b:>6.2f} %" for k in ("cond path", "Affiner", "ControlNet")]
        lines.append(f"{label:<44} {b:>12,} " + " ".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help=f"NAME:SIZE:CHANNELS:MAP_SIZE:BATCH, repeatable (default {' '.join(CPU_DEFAULT_MODELS)})",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps per sampling call (eval.sampling_steps)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--cpu-clock",
        choices=("wall", "process"),
        default="wall",
        help="CPU timing: wall time, or this process's CPU time (steadier on a shared machine)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_spec(m) for m in (args.model or CPU_DEFAULT_MODELS)]
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    )
    print(
        f"== condition cost on {where} | torch {torch.__version__} | fp32 eager | {args.steps} DDIM steps per call "
        f"| median of {args.repeats} interleaved rounds"
        + (f" | {args.cpu_clock} clock" if device.type == "cpu" else ""),
        flush=True,
    )
    results = {s.label(): measure(s, device, args.steps, args.warmup, args.repeats, args.cpu_clock) for s in specs}
    share_specs = specs + [parse_spec(m) for m in SHARE_MODELS if m.split(":")[0] not in {s.name for s in specs}]
    shares = {s.label(): parameter_shares(s) for s in share_specs}
    print(report(results, shares, {s.label(): s.batch for s in specs}, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
