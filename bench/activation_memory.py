"""Activation memory of each training step, counted exactly on the CPU: the bytes autograd keeps
from the forward for the backward (every saved tensor's storage once, parameters excluded).

At the start of the backward those saved tensors plus the weights, gradients and optimizer state
are what is alive, which is where a training step's memory peaks; this counts the first part
without a GPU, so the Affiner's memory levers can be checked (and predicted) here and measured on
the card later. It runs the project's own model, bank and loss, with bf16 autocast by default and
one forward per phase (no backward: nothing is timed).

    python -m bench.activation_memory                       # T/2 .. XL/2, bf16, eager: a table
    python -m bench.activation_memory --models XL --batch 2 --compile aot_eager

Phases: `train` (full backbone), `affiner` (one task, lean backward: a's gradient from the output,
`diffscaler.adapters.lean_grad`), `affiner-autograd` (the same step with plain autograd, which
keeps W x of every adapted layer), `mixed-train` (8 tasks in the batch, lean).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.workloads import (
    ModelSpec,
    bench_tasks,
    diffusion_on,
    input_maker,
)
from diffscaler.adapters import AdapterBank
from diffscaler.models import DiT, build_model
from diffscaler.models.compile import compile_blocks

PHASES = ("train", "affiner", "affiner-autograd", "mixed-train")
SPECS = {  # the three models at the GPU table's batches (bench.gpu_speed), plus the CPU test size
    "T": ModelSpec("DiT-T/2", 32, 3, train_batch=8, sample_batch=8),
    "S": ModelSpec("DiT-S/2", 32, 3, train_batch=256, sample_batch=256),
    "B": ModelSpec("DiT-B/2", 32, 4, train_batch=256, sample_batch=256),
    "XL": ModelSpec("DiT-XL/2", 32, 4, train_batch=128, sample_batch=256),
}


def saved_activation_bytes(forward: Callable[[], torch.Tensor], exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while `forward()` runs, `exclude`'s storages
    (the parameters) left out. The graph is dropped before returning."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out  # frees the graph and its saved tensors
    return sum(storages.values())


@dataclass(frozen=True)
class MemoryRow:
    model: str
    phase: str
    per_image_bytes: int  # saved for the backward per image (activations)
    fixed_bytes: int  # saved once per step whatever the batch (e.g. autocast's bf16 copies of weights)
    state_bytes: int  # weights + gradients + optimizer state of the step (fp32 master weights, AdamW)

    def at_batch(self, batch: int) -> float:
        """Predicted memory at the start of the backward for `batch` images."""
        return self.state_bytes + self.fixed_bytes + self.per_image_bytes * batch


def _state_bytes(model: DiT, trainable: list[torch.nn.Parameter]) -> int:
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + sum(3 * p.numel() * p.element_size() for p in trainable)  # grad + AdamW's two moments


def measure(
    spec: ModelSpec, batch: int, amp: torch.dtype | None, compile_backend: str | None, phases: tuple[str, ...] = PHASES
) -> list[MemoryRow]:
    torch.manual_seed(0)
    model = build_model(spec.config(), seed=0)
    model.check_inputs = False
    if compile_backend:
        compile_blocks(model, compile_backend)
    diffusion = diffusion_on(torch.device("cpu"), spec.learn_sigma)
    generator = torch.Generator().manual_seed(0)
    label = f"{spec.label()}"
    rows: list[MemoryRow] = []

    def saved(task_mode: str, exclude: list[torch.Tensor]) -> tuple[int, int]:
        """(per image, fixed) saved bytes, from one forward at `batch` and one at 2 x `batch`."""

        def loss(x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, ids) -> torch.Tensor:
            with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                return diffusion.training_losses(lambda xt, tt: model(xt, tt, y, ids), x0, t)["loss"].mean()

        totals = []
        for n in (batch, 2 * batch):
            inputs = input_maker(spec, n, torch.device("cpu"), task_mode, 8, generator)()
            totals.append(saved_activation_bytes(lambda inputs=inputs: loss(*inputs), exclude))
        per_image = (totals[1] - totals[0]) // batch
        return per_image, totals[0] - per_image * batch

    model.train()
    if "train" in phases:
        params = list(model.parameters())
        rows.append(MemoryRow(label, "train", *saved("none", params), _state_bytes(model, params)))
    bank = AdapterBank.attach(model, bench_tasks(8), method="affiner", rank=8)
    with torch.no_grad():  # U, a, b start at zero: give them values, as after some training
        for p in bank.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    params = list(model.parameters())
    trainable = bank.parameters()
    state = _state_bytes(model, trainable)
    for phase, mode, lean in (
        ("affiner", "single", True),
        ("affiner-autograd", "single", False),
        ("mixed-train", "mixed", True),
    ):
        if phase not in phases:
            continue
        bank.set_lean_backward(lean)
        rows.append(MemoryRow(label, phase, *saved(mode, params), state))
    return rows


def report(rows: list[MemoryRow], specs: dict[str, ModelSpec]) -> str:
    lines = [
        "| model | phase | saved MiB per image | saved MiB per step | state GiB (weights, grads, AdamW) "
        "| predicted GiB at the GPU batch | vs train |",
        "|---|---|---|---|---|---|---|",
    ]
    by_label = {s.label(): s for s in specs.values()}
    for r in rows:
        gpu_batch = by_label[r.model].train_batch
        train = next((x for x in rows if x.model == r.model and x.phase == "train"), None)
        vs = f"{r.at_batch(gpu_batch) / train.at_batch(gpu_batch):.2f}x" if train else "-"
        lines.append(
            f"| {r.model} | {r.phase} | {r.per_image_bytes / 2**20:.1f} | {r.fixed_bytes / 2**20:.1f} "
            f"| {r.state_bytes / 2**30:.2f} "
            f"| {r.at_batch(gpu_batch) / 2**30:.1f} (batch {gpu_batch}) | {vs} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="T,S,B,XL", help=f"comma list of {','.join(SPECS)}")
    parser.add_argument("--batch", type=int, default=1, help="measured at this batch and twice it")
    parser.add_argument("--fp32", action="store_true", help="no autocast (default: bf16 autocast)")
    parser.add_argument("--compile", default=None, metavar="BACKEND", help="compile each block (aot_eager, inductor)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    args = parser.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    bad = [n for n in names if n not in SPECS]
    if bad:
        parser.error(f"--models {bad}: allowed {list(SPECS)}")
    phases = tuple(p for p in args.phases.split(",") if p)
    if unknown := [p for p in phases if p not in PHASES]:
        parser.error(f"--phases {unknown}: allowed {list(PHASES)}")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    specs = {n: SPECS[n] for n in names}
    amp = None if args.fp32 else torch.bfloat16
    rows: list[MemoryRow] = []
    for spec in specs.values():
        rows += measure(spec, args.batch, amp, args.compile, phases)
        print(f"measured {spec.label()}", file=sys.stderr, flush=True)
    print(
        f"torch {torch.__version__}, {'fp32' if amp is None else 'bf16 autocast'}, "
        f"compile {args.compile or 'none'}, measured at batches {args.batch} and {2 * args.batch}\n"
    )
    print(report(rows, specs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
