"""The workloads the speed benchmarks time: a backbone training step, an Affiner fine-tune step
(lean backward; plain autograd and recomputed blocks as A/B), a mixed-task step, and the sampling
forward pass (bare, unmerged, mixed, merged).

Shared by `bench.adapter_cost` (issue 2's micro-benchmark, CPU or GPU) and `bench.gpu_speed`
(issue 8's table). Everything runs the project's own model, adapters and loss: there is no separate
fast model. Speed comes only from how they are run: bf16 autocast over fp32 master weights,
`torch.compile` of each DiT block (one graph shared by all blocks), fused AdamW, SDPA attention.

    from bench.workloads import ModelSpec, RunSettings, measure_model
    rows = measure_model(ModelSpec("DiT-T/4", 32, 3, 16, 16), RunSettings(device=torch.device("cpu")))
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from diffscaler.adapters import AdapterBank, TaskInfo
from diffscaler.config import ModelConfig
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.models import DiT, build_model, model_macs
from diffscaler.models.compile import compile_blocks

# Phases in the order they run on one model (the backbone phases come before the bank is attached).
PHASES = (
    "train",  # full backbone step: forward, loss, backward, AdamW over every parameter
    "sample-bare",  # sampling forward of the plain backbone
    "affiner",  # Affiner step, backbone frozen, one task (int task id: the single-task path)
    "affiner-autograd",  # the same step with plain autograd (keeps W x): the lean backward's A/B
    "affiner-ckpt",  # the Affiner step with every block recomputed in the backward (memory for speed)
    "mixed-train",  # the same step on a batch mixing all tasks (sorted by task: grouped matmuls)
    "sample-unmerged",  # sampling forward, one task's Affiner unmerged
    "sample-mixed",  # sampling forward, a batch mixing all tasks
    "sample-merged",  # sampling forward, one task merged into W (the rank-r side path stays)
)
TRAIN_PHASES = ("train", "affiner", "affiner-autograd", "affiner-ckpt", "mixed-train")
TASK_CLASSES = 10  # classes of each benchmark task (conditional tasks)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # DiT preset, e.g. "DiT-XL/2"
    input_size: int  # latent (or pixel) side
    in_channels: int  # 4 for VAE latents, 3 for pixels
    train_batch: int  # images per step for train / affiner / mixed-train
    sample_batch: int  # images per sampling forward
    num_classes: int = 1000  # backbone classes (ImageNet-sized label table)
    learn_sigma: bool = True  # DiT's hybrid loss (doubles output channels)

    def config(self) -> ModelConfig:
        return ModelConfig(
            name=self.name,
            input_size=self.input_size,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            learn_sigma=self.learn_sigma,
        )

    def macs(self) -> int:
        """Multiply-adds per image of one forward pass (the DiT paper's GFLOPs)."""
        return model_macs(self.config())

    def label(self) -> str:
        return f"{self.name} {self.input_size}x{self.input_size}x{self.in_channels}"


@dataclass(frozen=True)
class RunSettings:
    device: torch.device
    amp_dtype: torch.dtype | None = None  # bf16 autocast over fp32 weights; None = plain fp32
    compile_backend: str | None = None  # "inductor" on GPU, "aot_eager" for a cheap CPU check, None = eager
    fullgraph: bool = False  # a graph break is an error (checks); off on the GPU, where one phase must not sink a run
    warmup: int = 2  # untimed calls first (the first one compiles)
    repeats: int = 5  # timed calls; the median is reported
    num_tasks: int = 8  # tasks in the bank (the mixed batch uses all of them)
    rank: int = 8  # Affiner rank
    check: bool = True  # compare compiled against eager, mixed against single, merged against unmerged
    cpu_clock: str = "wall"  # CPU timing: "wall" or "process" (CPU time; see time_calls)
    sdpa_backend: str | None = None  # force one SDPA kernel: "cudnn", "flash", "efficient", "math"; None = torch picks
    group_mixed: bool = True  # mixed batches sorted by task, one grouped matmul (False: per-sample epilogue)
    compile_mode: str | None = None  # inductor mode, e.g. "reduce-overhead" (CUDA graphs), "max-autotune"
    seed: int = 0


@dataclass
class Row:
    model: str  # spec label
    phase: str  # one of PHASES
    batch: int
    times_s: list[float] = field(default_factory=list)  # each timed call, seconds
    first_call_s: float = float("nan")  # the first warm-up call (compile included), seconds
    peak_mem_bytes: int | None = None  # CUDA peak allocated during the phase
    check_rel_err: float | None = None  # see RunSettings.check; relative L2 error
    check_what: str = ""
    error: str = ""  # set when the phase failed (e.g. out of memory) or was skipped

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median of the timed calls: differences smaller than this are noise."""
        if len(self.times_s) < 2:
            return float("nan")
        return (max(self.times_s) - min(self.times_s)) / self.median_s

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s if self.times_s else float("nan")

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "phase": self.phase,
            "batch": self.batch,
            "times_s": self.times_s,
            "median_s": self.median_s,
            "images_per_s": self.images_per_s,
            "first_call_s": self.first_call_s,
            "peak_mem_bytes": self.peak_mem_bytes,
            "check_rel_err": self.check_rel_err,
            "check_what": self.check_what,
            "error": self.error,
        }


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    step: Callable,
    make_inputs: Callable[[], tuple],
    device: torch.device,
    warmup: int,
    repeats: int,
    cpu_clock: str = "wall",
) -> tuple[float, list[float]]:
    """(first warm-up call in s, [timed calls in s]); each call gets fresh random inputs.

    On CUDA the timed calls are queued back to back between events (no host sync inside the loop,
    as in a real training loop), their inputs drawn beforehand. On the CPU with `cpu_clock`: "wall",
    or "process" (this process's CPU time: on a shared machine, wall time also counts the neighbours;
    with one torch thread the two agree on a quiet machine).
    """
    first = float("nan")
    for i in range(warmup):
        inputs = make_inputs()
        _sync(device)
        start = time.perf_counter()
        step(*inputs)
        _sync(device)
        if i == 0:
            first = time.perf_counter() - start
    if device.type == "cuda":
        batches = [make_inputs() for _ in range(repeats)]
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in batches]
        _sync(device)
        for inputs, (begin, end) in zip(batches, events, strict=True):
            begin.record()
            step(*inputs)
            end.record()
        _sync(device)
        return first, [begin.elapsed_time(end) / 1e3 for begin, end in events]
    clock = {"wall": time.perf_counter, "process": time.process_time}[cpu_clock]
    times = []
    for _ in range(repeats):
        inputs = make_inputs()
        start = clock()
        step(*inputs)
        times.append(clock() - start)
    return first, times


def matmul_ceiling_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matrix-product rate (TFLOP/s, median), random operands: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    _, times = time_calls(lambda: a @ b, lambda: (), device, warmup=3, repeats=repeats)
    return 2 * n**3 / statistics.median(times) / 1e12


# ------------------------------------------------------------------------------------------------
# Model set-up
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def perturb_(params: Sequence[torch.Tensor], std: float, seed: int) -> None:
    """Add small noise: adaLN-Zero and the Affiner's U, a, b start at exactly zero, and zeros time
    faster than real weights."""
    generators: dict[torch.device, torch.Generator] = {}
    for p in params:  # drawn on the parameter's device: XL has 675 M of them
        g = generators.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
        p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype), alpha=std)


def diffusion_on(device: torch.device, learn_sigma: bool) -> GaussianDiffusion:
    """The project's diffusion, with its schedule tables moved to `device` once.

    `_gather` copies each table host-to-device on every call otherwise: a synchronous copy that
    drains the GPU queue several times per training step.
    """
    diffusion = GaussianDiffusion(learn_sigma=learn_sigma)
    schedule = diffusion.schedule
    for name, value in list(vars(schedule).items()):
        if isinstance(value, torch.Tensor):
            object.__setattr__(schedule, name, value.to(device))
    return diffusion


def bench_tasks(num_tasks: int) -> list[TaskInfo]:
    return [TaskInfo(f"task{i}", num_classes=TASK_CLASSES, conditional=True) for i in range(num_tasks)]


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------


SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")


def _autocast(settings: RunSettings):
    return torch.autocast(
        settings.device.type, dtype=settings.amp_dtype or torch.float32, enabled=settings.amp_dtype is not None
    )


def _sdpa(settings: RunSettings):
    """The forced SDPA kernel around a whole step (the backward, and checkpoint recomputes, included)."""
    if settings.sdpa_backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if settings.sdpa_backend not in SDPA_BACKENDS:
        raise ValueError(f"sdpa_backend {settings.sdpa_backend!r}: allowed {list(SDPA_BACKENDS)}")
    return sdpa_kernel(
        {
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }[settings.sdpa_backend]
    )


def train_step(
    model: DiT, diffusion: GaussianDiffusion, optimizer: torch.optim.Optimizer, settings: RunSettings
) -> Callable:
    """One optimizer step on (x0, t, y, task_ids): the loss the trainers use (hybrid when sigma is learned)."""

    def step(x0: torch.Tensor, t: torch.Tensor, y: torch.Tensor, task_ids) -> None:
        with _sdpa(settings):
            with _autocast(settings):
                losses = diffusion.training_losses(lambda xt, tt: model(xt, tt, y, task_ids), x0, t)
                loss = losses["loss"].mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sample_step(model: DiT, settings: RunSettings) -> Callable:
    """One sampling forward pass (one denoising step's model call)."""

    @torch.no_grad()
    def step(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, task_ids) -> torch.Tensor:
        with _sdpa(settings), _autocast(settings):
            return model(x, t, y, task_ids)

    return step


def input_maker(
    spec: ModelSpec, batch: int, device: torch.device, task_mode: str, num_tasks: int, generator: torch.Generator
) -> Callable[[], tuple]:
    """Fresh random (x, t, y, task_ids) per call. task_mode: "none" (backbone labels), "single"
    (task 0 as an int: the single-task path), "mixed" (ids spread evenly over all tasks, shuffled),
    "zeros" (a tensor of task 0: the mixed path on a single-task batch, for checks)."""

    def make() -> tuple:
        x = torch.randn(batch, spec.in_channels, spec.input_size, spec.input_size, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        high = spec.num_classes if task_mode == "none" else TASK_CLASSES
        y = torch.randint(0, high, (batch,), generator=generator)
        ids: torch.Tensor | int | None = None
        if task_mode == "single":
            ids = 0
        elif task_mode == "mixed":
            ids = (torch.randperm(batch, generator=generator) % num_tasks).to(device)
        elif task_mode == "zeros":
            ids = torch.zeros(batch, dtype=torch.long, device=device)
        return x.to(device), t.to(device), y.to(device), ids

    return make


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref).clamp(min=1e-30))


# ------------------------------------------------------------------------------------------------
# One model, every phase
# ------------------------------------------------------------------------------------------------


def measure_model(
    spec: ModelSpec,
    settings: RunSettings,
    phases: Sequence[str] = PHASES,
    on_row: Callable[[Row], None] = lambda row: None,
    out_of_time: Callable[[], bool] = lambda: False,
) -> list[Row]:
    """Build `spec`, run `phases` in PHASES order, return one Row per phase (failed ones carry `error`)."""
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"unknown phases {unknown}; allowed: {list(PHASES)}")
    device = settings.device
    generator = torch.Generator().manual_seed(settings.seed)
    with device:  # initialise on the device (fast for XL); buffers made from numpy move with .to()
        model = build_model(spec.config(), seed=settings.seed).to(device)
    model.check_inputs = False  # the input checks sync with the host
    perturb_(list(model.parameters()), 0.02, seed=settings.seed + 1)
    if settings.compile_backend:
        compile_blocks(model, settings.compile_backend, settings.fullgraph, settings.compile_mode)
    diffusion = diffusion_on(device, spec.learn_sigma)
    rows: list[Row] = []
    reference: dict[str, tuple[tuple, torch.Tensor]] = {}  # fixed inputs and outputs for the checks

    def run(
        phase: str, step: Callable, make: Callable[[], tuple], batch: int, check: Callable[[Row], None] | None = None
    ) -> None:
        row = Row(spec.label(), phase, batch)
        if phase not in phases:
            return
        if out_of_time():
            row.error = "skipped: time budget spent"
        else:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                row.first_call_s, row.times_s = time_calls(
                    step, make, device, settings.warmup, settings.repeats, settings.cpu_clock
                )
                if device.type == "cuda":
                    row.peak_mem_bytes = torch.cuda.max_memory_allocated(device)
                if check is not None and settings.check:
                    check(row)
            except torch.cuda.OutOfMemoryError as exc:
                row.error = f"out of memory: {str(exc).splitlines()[0][:120]}"
            except Exception as exc:  # one broken phase must not lose the rest of the table
                row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        rows.append(row)
        on_row(row)

    def sample_check(
        name: str, step: Callable, make: Callable[[], tuple], against: str | None = None, what: str = ""
    ) -> Callable[[Row], None]:
        """Compiled vs eager on fixed inputs; and, with `against`, vs another phase's output."""

        def check(row: Row) -> None:
            if against is not None and against in reference:
                inputs, ref = reference[against]
                if name == "sample-mixed":  # the same single-task batch, through the mixed path
                    inputs = (*inputs[:3], torch.zeros(len(inputs[0]), dtype=torch.long, device=device))
                row.check_rel_err, row.check_what = relative_error(step(*inputs), ref), what
            else:
                inputs = make()
                out = step(*inputs)
                if settings.compile_backend:
                    with torch.compiler.set_stance("force_eager"):
                        ref = step(*inputs)
                    row.check_rel_err, row.check_what = relative_error(out, ref), "compiled vs eager"
                reference[name] = (inputs, out)

        return check

    batch_t, batch_s = spec.train_batch, spec.sample_batch
    # -- the backbone ------------------------------------------------------------------------------
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    run(
        "train",
        train_step(model, diffusion, optimizer, settings),
        input_maker(spec, batch_t, device, "none", settings.num_tasks, generator),
        batch_t,
    )
    del optimizer
    model.zero_grad(set_to_none=True)
    model.eval()
    make = input_maker(spec, batch_s, device, "none", settings.num_tasks, generator)
    step = sample_step(model, settings)
    run("sample-bare", step, make, batch_s, sample_check("sample-bare", step, make))

    # -- the Affiner bank --------------------------------------------------------------------------
    bank = AdapterBank.attach(model, bench_tasks(settings.num_tasks), method="affiner", rank=settings.rank)
    bank.group_mixed_batches = settings.group_mixed
    perturb_(bank.parameters(), 0.02, seed=settings.seed + 2)
    model.train()
    optimizer = torch.optim.AdamW(bank.parameters(), lr=1e-4, fused=device.type == "cuda")
    step = train_step(model, diffusion, optimizer, settings)
    single = input_maker(spec, batch_t, device, "single", settings.num_tasks, generator)
    run("affiner", step, single, batch_t)
    bank.set_lean_backward(False)
    run("affiner-autograd", step, single, batch_t)
    bank.set_lean_backward(True)
    model.set_grad_checkpointing(True)
    run("affiner-ckpt", step, single, batch_t)
    model.set_grad_checkpointing(False)
    run("mixed-train", step, input_maker(spec, batch_t, device, "mixed", settings.num_tasks, generator), batch_t)
    del optimizer
    model.zero_grad(set_to_none=True)
    model.eval()
    step = sample_step(model, settings)
    make = input_maker(spec, batch_s, device, "single", settings.num_tasks, generator)
    run("sample-unmerged", step, make, batch_s, sample_check("sample-unmerged", step, make))
    make = input_maker(spec, batch_s, device, "mixed", settings.num_tasks, generator)
    run(
        "sample-mixed",
        step,
        make,
        batch_s,
        sample_check(
            "sample-mixed", step, make, against="sample-unmerged", what="mixed path (all ids 0) vs single-task path"
        ),
    )
    bank.merge(0)
    make = input_maker(spec, batch_s, device, "single", settings.num_tasks, generator)
    run(
        "sample-merged",
        step,
        make,
        batch_s,
        sample_check("sample-merged", step, make, against="sample-unmerged", what="merged vs unmerged"),
    )
    bank.unmerge()
    del model, bank
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def ratio(rows: Sequence[Row], model: str, num: str, den: str) -> float:
    """median time of phase `num` / median time of phase `den`, per image (batches may differ)."""
    by_phase = {r.phase: r for r in rows if r.model == model and r.times_s}
    if num not in by_phase or den not in by_phase:
        return math.nan
    a, b = by_phase[num], by_phase[den]
    return (a.median_s / a.batch) / (b.median_s / b.batch)
