"""The speed benchmarks' code paths at a tiny size on the CPU, and the fast paths added for speed
against the reference equation. No timings are asserted (speed targets live in bench/ tables)."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import adapter_cost, condition_cost, gpu_speed
from bench.workloads import PHASES
from diffscaler.adapters import AdapterBank, ScaleShiftLinear, TaskInfo
from diffscaler.config import ModelConfig
from diffscaler.models import DiT
from tests.support.models import perturb


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only spin against each other on a shared CPU
    yield
    torch.set_num_threads(before)


def test_gpu_speed_smoke_runs_every_phase_with_one_graph_per_variant(tmp_path, one_thread):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # dynamo's "eager" backend traces every block variant (fullgraph: a graph break fails the phase)
    code = gpu_speed.main(
        ["--cpu-smoke", "--out", str(tmp_path), "--compile-backend", "eager", "--warmup", "1", "--repeats", "1"]
    )
    lines = [json.loads(line) for line in (tmp_path / "gpu_speed.jsonl").read_text().splitlines()]
    rows = lines[1:]
    assert code == 0, [r["error"] for r in rows if r["error"]]
    assert "measured_bf16_matmul_tflops" in lines[0]["header"]
    assert [r["phase"] for r in rows] == list(PHASES)
    assert all(r["images_per_s"] > 0 and not r["error"] for r in rows)
    checks = {r["phase"]: r["check_rel_err"] for r in rows}
    # compiled vs eager; the other paths (bf16 autocast) against the single-task path
    assert checks["sample-bare"] == 0.0 and checks["sample-unmerged"] == 0.0
    for phase in ("sample-mixed", "sample-merged"):
        assert checks[phase] < 2e-2, (phase, checks[phase])
    # All blocks share each phase's graph; only in the four Affiner steps does the first block get its
    # own (its input needs no gradient). Per-block graphs would make GPU compile time grow with depth.
    affiner_steps = [p for p in PHASES if p.startswith("affiner") or p == "mixed-train"]
    assert counters["stats"]["unique_graphs"] <= len(PHASES) + len(affiner_steps)
    table = (tmp_path / "gpu_speed.md").read_text()
    assert "| model | phase | batch |" in table and "affiner images/s / train images/s" in table
    torch._dynamo.reset()


def test_adapter_cost_prints_the_ratios(capsys, one_thread):
    code = adapter_cost.main(
        [
            "--model",
            "DiT-T/8:16:3:2:2",
            "--num-classes",
            "10",
            "--warmup",
            "0",
            "--repeats",
            "1",
            "--cpu-clock",
            "process",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    for _, _, what in adapter_cost.RATIOS:  # every ratio printed with a number
        assert re.search(re.escape(what) + r"\s+\d+\.\d\dx", out), what


def test_condition_cost_prints_the_ratios_and_the_parameter_shares(capsys, one_thread):
    code = condition_cost.main(
        ["--model", "DiT-T/8:16:3:32:4", "--steps", "1", "--warmup", "0", "--repeats", "1", "--cpu-clock", "process"]
    )
    out = capsys.readouterr().out
    assert code == 0
    for _, _, what in condition_cost.RATIOS:  # every ratio printed with a number
        assert re.search(re.escape(what) + r"\s+\d+\.\d{3}x", out), what
    for label in ("DiT-T/8 16x16x3, 32 px maps", "DiT-XL/2 32x32x4, 256 px maps"):  # a latent stem (factor 2, 8)
        assert re.search(re.escape(label) + r"\s+[\d,]+(\s+[\d,]+\s+\d+\.\d\d %){3}", out), label


def test_adapter_cost_methods_table_counts_peak_memory(capsys, one_thread):
    args = ["--methods", "--model", "DiT-T/8:16:3:2:2", "--num-classes", "10", "--warmup", "0", "--repeats", "1"]
    assert adapter_cost.main(args) == 0
    out = capsys.readouterr().out
    variants = adapter_cost.METHOD_VARIANTS
    rows = {cols[0]: cols for cols in map(str.split, out.splitlines()) if cols and cols[0] in variants}
    assert set(rows) == set(adapter_cost.METHOD_VARIANTS)
    assert rows["full"][3] == "1.00x" and rows["full"][5] == "1.00x"
    for name, cols in rows.items():  # the step's own allocations counted: peak above what persists
        assert float(cols[4]) > float(cols[6]), name


# ------------------------------------------------------------------------------------------------
# Fast paths against the equation: y = (1 + a_t) ⊙ (W x) + b̂ + b_t + s_t · U_t · relu(D_t · x)
# ------------------------------------------------------------------------------------------------


def affiner_layer(in_f=12, out_f=10, tasks=3, rank=4) -> ScaleShiftLinear:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f).requires_grad_(False)
    layer = ScaleShiftLinear(base, "affiner", tasks, rank, 1.0, torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name in ("scale", "shift", "up", "branch_scale"):
            getattr(layer, name).normal_(0, 0.3)
    return layer


def reference(layer: ScaleShiftLinear, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The equation, sample by sample, in float64."""
    w, b = layer.base.weight.double(), layer.base.bias.double()
    rows = []
    for xi, t in zip(x.double(), ids.tolist(), strict=True):
        wx = xi @ w.T
        branch = F.relu(xi @ layer.down[t].double().T) @ layer.up[t].double().T
        rows.append(
            (1 + layer.scale[t].double()) * wx + b + layer.shift[t].double() + layer.branch_scale[t].double() * branch
        )
    return torch.stack(rows)


def grads(layer: ScaleShiftLinear, out: torch.Tensor, probe: torch.Tensor) -> dict[str, torch.Tensor]:
    names = ("scale", "shift", "down", "up", "branch_scale")
    got = torch.autograd.grad((out.double() * probe).sum(), [getattr(layer, n) for n in names])
    return dict(zip(names, got, strict=True))


@pytest.mark.parametrize("task", [0, 2])
def test_every_affiner_path_equals_the_equation_and_its_gradients(task):
    layer = affiner_layer()
    x = torch.randn(5, 7, 12, generator=torch.Generator().manual_seed(2))  # (N, L, in)
    ids = torch.full((5,), task)
    ref = reference(layer, x, ids)
    probe = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref_grads = grads(layer, ref, probe)

    train_single = layer(x, task)  # grad mode: (1 + a) as an epilogue, branch as a side path
    train_mixed = layer(x, ids)
    for out in (train_single, train_mixed):
        assert torch.allclose(out.double(), ref, atol=1e-5)
        for name, g in grads(layer, out, probe).items():
            assert torch.allclose(g, ref_grads[name], atol=1e-4), name
    with torch.no_grad():
        folded = layer(x, task)  # sampling: a_t folded into W, b_t into the bias
        layer.merge(task)
        merged = layer(x, task)
        layer.unmerge()
    for out in (folded, merged):
        assert torch.allclose(out.double(), ref, atol=1e-5)


def test_training_scale_keeps_small_values_and_bf16_under_autocast():
    layer = affiner_layer()
    x = torch.randn(64, 16, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        layer.scale.zero_()
        layer.shift.zero_()
        layer.up.zero_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = layer(x, 0)  # grad mode: the training path
        with torch.no_grad():
            layer.scale[0] = 0.05  # 1 + a in bf16 (8 bits) is 1.046875: a would act as 0.047
        scaled = layer(x, 0)
        mixed = layer(x, torch.zeros(64, dtype=torch.long))
    assert scaled.dtype == torch.bfloat16 and mixed.dtype == torch.bfloat16  # fp32 parameters do not promote
    wx = F.linear(x, layer.base.weight)  # (N, L, out) fp32
    for out in (scaled, mixed):
        # the bf16 output moves by a ⊙ (W x) (each element rounded to its nearest bf16 step)
        delta = out.float() - plain.float()
        estimate = float((delta.detach() * wx).sum() / (wx * wx).sum())
        assert abs(estimate - 0.05) < 1e-3, estimate


def test_model_gradients_single_task_path_equal_mixed_path():
    torch.manual_seed(0)
    model = perturb(DiT(ModelConfig(name="DiT-T/8", input_size=16, num_classes=5)), 0.05)
    bank = AdapterBank.attach(model, [TaskInfo("a"), TaskInfo("b", num_classes=3, conditional=True)], rank=4)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    model.train()
    model.task_embedder.dropout_prob = 0.0
    g = torch.Generator().manual_seed(6)
    x, t, y = torch.randn(3, 3, 16, 16, generator=g), torch.randint(0, 1000, (3,), generator=g), torch.tensor([0, 2, 1])

    def run(ids):
        model.zero_grad(set_to_none=True)
        out = model(x, t, y, ids)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in bank.parameters()]

    out_single, grads_single = run(1)  # epilogue path
    out_mixed, grads_mixed = run(torch.ones(3, dtype=torch.long))
    assert torch.allclose(out_single, out_mixed, atol=1e-5)
    for a, b in zip(grads_single, grads_mixed, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
