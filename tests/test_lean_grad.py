"""The Affiner's lean backward (a's gradient from the output, W x never saved) against plain
autograd: the same gradients, and less memory kept for the backward (counted, not timed)."""

import statistics

import numpy as np
import pytest
import torch

from bench.activation_memory import saved_activation_bytes
from diffscaler.adapters import AdapterBank, TaskInfo
from diffscaler.adapters.lean_grad import EXACT_CHANNELS, lean_affine_linear
from diffscaler.config import ModelConfig
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.models import DiT
from diffscaler.models.compile import compile_blocks
from tests.support.models import TASKS, backbone, inputs, perturb, randomize


def reference(x, w, b, a, shift, down, up, s):
    """The method's equation with plain autograd (per-sample parameters broadcast over tokens)."""
    per_sample = a.dim() == 2
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (-1,) if per_sample else (-1,)
    p = x @ w.T
    y = p + p * a.view(view) + (b + shift).view(view)
    if down is None:
        return y
    if per_sample:
        x3 = x.reshape(x.shape[0], -1, x.shape[-1])
        z = torch.bmm(torch.relu(torch.bmm(x3, down.transpose(1, 2))), up.transpose(1, 2)) * s.view(-1, 1, 1)
        return y + z.reshape(y.shape)
    return y + torch.relu(x @ down.T) @ up.T * s


def operands(per_sample: bool, branch: bool, x_shape: tuple, dead: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kw = {"dtype": torch.float64}
    out_f, in_f, rank = 40, x_shape[-1], 3  # 40 > EXACT_CHANNELS: most channels take the division
    lead = (x_shape[0],) if per_sample else ()
    a = torch.randn(*lead, out_f, generator=g, **kw) * 0.3
    a.view(-1, out_f)[:, :dead] = -1 + 1e-9  # channels the task switched off: 1 + a ~ 0
    leaves = {
        "x": torch.randn(*x_shape, generator=g, **kw),
        "a": a,
        "shift": torch.randn(*lead, out_f, generator=g, **kw),
        "down": torch.randn(*lead, rank, in_f, generator=g, **kw) if branch else None,
        "up": torch.randn(*lead, out_f, rank, generator=g, **kw) if branch else None,
        "s": (torch.rand(*(lead or (1,)), generator=g, **kw) + 0.5).reshape(lead) if branch else None,
    }
    leaves = {k: None if v is None else v.requires_grad_() for k, v in leaves.items()}
    w, b = torch.randn(out_f, in_f, generator=g, **kw), torch.randn(out_f, generator=g, **kw)
    grad_y = torch.randn(*x_shape[:-1], out_f, generator=g, **kw)
    return leaves, w, b, grad_y


@pytest.mark.parametrize("per_sample", [False, True], ids=["one-task", "per-sample"])
@pytest.mark.parametrize("branch", [True, False], ids=["affiner", "difffit"])
@pytest.mark.parametrize("x_shape", [(4, 7, 12), (4, 12)], ids=["tokens", "vector"])
def test_lean_gradients_equal_autograd_to_float64_rounding(per_sample, branch, x_shape):
    leaves, w, b, grad_y = operands(per_sample, branch, x_shape)
    args = [leaves[k] for k in ("x", "a", "shift", "down", "up", "s")]
    inputs_ = [t for t in args if t is not None]
    y_lean = lean_affine_linear(args[0], w, b, *args[1:])
    y_ref = reference(args[0], w, b, *args[1:])
    assert torch.equal(y_lean, y_ref) or torch.allclose(y_lean, y_ref, rtol=1e-14, atol=1e-14)
    lean = torch.autograd.grad(y_lean, inputs_, grad_y)
    ref = torch.autograd.grad(y_ref, inputs_, grad_y)
    for name, got, want in zip([k for k, v in leaves.items() if v is not None], lean, ref, strict=True):
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-12, (name, err)


def test_more_switched_off_channels_than_exact_ones_stay_finite_and_the_rest_exact():
    leaves, w, b, grad_y = operands(True, True, (3, 5, 12), dead=EXACT_CHANNELS + 4)
    with torch.no_grad():
        leaves["a"][:, : EXACT_CHANNELS + 4] = -1.0  # 1 + a == 0 exactly: no division may blow up
    args = [leaves[k] for k in ("x", "a", "shift", "down", "up", "s")]
    (grad_a,) = torch.autograd.grad(lean_affine_linear(args[0], w, b, *args[1:]), [leaves["a"]], grad_y)
    (want,) = torch.autograd.grad(reference(args[0], w, b, *args[1:]), [leaves["a"]], grad_y)
    assert torch.isfinite(grad_a).all()
    live = slice(EXACT_CHANNELS + 4, None)
    assert torch.allclose(grad_a[:, live], want[:, live], rtol=1e-10, atol=1e-10)


def test_lean_rejects_a_trainable_base():
    leaves, w, b, _ = operands(False, False, (2, 12))
    with pytest.raises(ValueError, match="frozen base"):
        lean_affine_linear(leaves["x"], w.requires_grad_(), b, leaves["a"], leaves["shift"])


def _train_grads(model, bank, task_ids, lean: bool, autocast: bool = False) -> dict[str, torch.Tensor]:
    bank.set_lean_backward(lean)
    model.zero_grad(set_to_none=True)
    x, t, y, _ = inputs()
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = diffusion.training_losses(lambda xt, tt: model(xt, tt, y, task_ids), x, t, noise=torch.ones_like(x))
    loss["loss"].mean().backward()
    return trainable_grads(model)


@pytest.mark.parametrize("method", ["affiner", "difffit"])
@pytest.mark.parametrize("task_ids", [1, torch.tensor([0, 1, 2, 1, 0, 2])], ids=["single", "mixed"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["stored", "recomputed"])
def test_a_training_step_gets_the_same_gradients_lean_or_not(method, task_ids, checkpointing):
    model = backbone().train()
    bank = AdapterBank.attach(model, TASKS, method=method, rank=4)
    randomize(bank)
    model.task_embedder.dropout_prob = 0.0
    plain = _train_grads(model, bank, task_ids, False)
    model.set_grad_checkpointing(checkpointing)  # blocks recomputed in the backward: one unpack only
    lean = _train_grads(model, bank, task_ids, True)
    assert lean.keys() == plain.keys() and len(lean) > 0
    for name in lean:
        err = float((lean[name] - plain[name]).norm() / plain[name].norm().clamp(min=1e-30))
        assert err < 1e-4, (name, err)


def test_under_bf16_autocast_lean_is_as_close_to_fp32_as_autograd_is():
    model = backbone().train()
    bank = AdapterBank.attach(model, TASKS, method="affiner", rank=4)
    randomize(bank)
    model.task_embedder.dropout_prob = 0.0
    exact = _train_grads(model, bank, 1, lean=False)
    lean = _train_grads(model, bank, 1, lean=True, autocast=True)
    plain = _train_grads(model, bank, 1, lean=False, autocast=True)

    def error(grads, name):
        return float((grads[name] - exact[name]).norm() / exact[name].norm())

    # a's gradient carries y's bf16 rounding instead of W x's: noise of the same size, no bias. A
    # systematic slip (a term rounded unlike the forward) moves every layer's error, so the medians;
    # single layers whose exact gradient nearly cancels are noisy either way: only bounded loosely.
    for part in ("scale", "shift", "down", "up", "branch_scale"):
        names = [n for n in exact if n.endswith("." + part)]
        e_lean, e_plain = [error(lean, n) for n in names], [error(plain, n) for n in names]
        assert statistics.median(e_lean) < 1.5 * statistics.median(e_plain) + 1e-3, (part, e_lean, e_plain)
        assert max(e_lean) < 2 * max(e_plain) + 1e-2, (part, e_lean, e_plain)


def test_the_lean_step_keeps_less_for_the_backward_than_autograd_and_the_full_step():
    model = backbone().train()
    x, t, y, _ = inputs()
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)
    params = list(model.parameters())

    def forward(task_ids):
        return lambda: diffusion.training_losses(lambda xt, tt: model(xt, tt, y, task_ids), x, t)["loss"].mean()

    full = saved_activation_bytes(forward(None), params)
    bank = AdapterBank.attach(model, [TaskInfo("a", 5, True), TaskInfo("b", 5, True)], method="affiner", rank=4)
    randomize(bank)
    params = list(model.parameters())
    lean = saved_activation_bytes(forward(1), params)
    bank.set_lean_backward(False)
    plain = saved_activation_bytes(forward(1), params)
    # plain autograd keeps W x of every adapted layer: its output width per row, fp32 here
    n, length = x.shape[0], model.grid_size**2
    pre_scale = sum(
        layer.base.out_features * (length if "adaLN" not in path else 1) * n * 4 for path, layer in bank.layers.items()
    )
    assert plain - lean >= 0.9 * pre_scale, (plain, lean, pre_scale)
    assert lean <= full, (lean, full)


def test_compiled_blocks_trace_the_lean_backward_and_match_eager():
    import torch._dynamo

    model = backbone().train()
    bank = AdapterBank.attach(model, TASKS, method="affiner", rank=4)
    randomize(bank)
    model.task_embedder.dropout_prob = 0.0
    eager = {ids_name: _train_grads(model, bank, ids, True) for ids_name, ids in (("one", 1), ("mixed", inputs()[3]))}
    torch._dynamo.reset()
    # AOT autograd traces forward and backward of the Function into one joint graph (as inductor does
    # on the GPU); fullgraph: a graph break fails
    compile_blocks(model, "aot_eager", fullgraph=True)
    try:
        for ids_name, ids in (("one", 1), ("mixed", inputs()[3])):
            compiled = _train_grads(model, bank, ids, True)
            for name, want in eager[ids_name].items():
                err = float((compiled[name] - want).norm() / want.norm().clamp(min=1e-30))
                assert err < 1e-5, (ids_name, name, err)
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# Mixed batches sorted by task: one grouped matmul over the tasks' folded weights
# ------------------------------------------------------------------------------------------------


def grouped_backbone():
    """256 tokens a sample: enough rows that folding T weight copies pays (T * width <= N * L)."""
    torch.manual_seed(0)
    return perturb(DiT(ModelConfig(name="DiT-T/2", input_size=32, num_classes=5)), 0.05)


def grouped_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 32, 32, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    return x, t, torch.tensor([0, 0, 2, 0, 0, 1]), torch.tensor([2, 0, 1, 0, 2, 1])  # ids unsorted


@pytest.fixture
def grouped_mm_calls(monkeypatch):
    calls = []
    original = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    return calls


@pytest.mark.parametrize("method", ["affiner", "difffit"])
def test_a_sorted_mixed_batch_equals_per_task_runs_in_the_callers_order(method, grouped_mm_calls):
    model = grouped_backbone().eval()
    bank = AdapterBank.attach(model, TASKS, method=method, rank=4)
    randomize(bank)
    x, t, y, ids = grouped_inputs()
    with torch.no_grad():
        mixed = model(x, t, y, ids)
        assert grouped_mm_calls, "the grouped path did not run"
        for task in range(3):
            rows = (ids == task).nonzero().flatten()
            assert torch.allclose(mixed[rows], model(x[rows], t[rows], y[rows], task), atol=1e-5), (method, task)
        bank.group_mixed_batches = False
        assert torch.allclose(mixed, model(x, t, y, ids), atol=1e-5)


def grouped_training():
    """A model wide enough to group, a randomized Affiner bank, the mixed batch, and its loss."""
    model = grouped_backbone().train()
    bank = AdapterBank.attach(model, TASKS, method="affiner", rank=4)
    randomize(bank)
    model.task_embedder.dropout_prob = 0.0
    x, t, y, ids = grouped_inputs()
    diffusion = GaussianDiffusion(learn_sigma=model.config.learn_sigma)

    def loss() -> torch.Tensor:
        fixed_noise = torch.ones_like(x)
        return diffusion.training_losses(lambda xt, tt: model(xt, tt, y, ids), x, t, noise=fixed_noise)["loss"].mean()

    return model, bank, (x, t, y, ids), loss


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grouped_training_gradients_equal_the_per_sample_path_and_autograd(grouped_mm_calls):
    model, bank, _, loss = grouped_training()

    def grads(lean: bool, grouped: bool) -> dict[str, torch.Tensor]:
        bank.set_lean_backward(lean)
        bank.group_mixed_batches = grouped
        model.zero_grad(set_to_none=True)
        loss().backward()
        return trainable_grads(model)

    grouped = grads(lean=True, grouped=True)
    assert grouped_mm_calls, "the grouped path did not run"
    for other in (grads(lean=True, grouped=False), grads(lean=False, grouped=False)):
        for name, want in other.items():
            err = float((grouped[name] - want).norm() / want.norm().clamp(min=1e-30))
            assert err < 1e-4, (name, err)


def test_compiled_blocks_trace_the_grouped_path_and_match_eager():
    import torch._dynamo

    model, _, (x, t, y, ids), loss = grouped_training()

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the grouped matmul's traced form wants bf16
            loss().backward()
            with torch.no_grad():
                sample = model.eval()(x, t, y, ids).float()
        model.train()
        return sample, trainable_grads(model)

    eager_sample, eager = step()
    torch._dynamo.reset()
    graphs: list[str] = []  # each traced block graph, its subgraphs (the autograd.Function's) included

    def recording_aot_eager(gm: torch.fx.GraphModule, example_inputs):
        graphs.extend(str(m.graph) for m in gm.modules() if isinstance(m, torch.fx.GraphModule))
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    # What compile_blocks does, with a backend that keeps the graphs. No counting wrapper around
    # torch._grouped_mm here: dynamo decides what it may trace by the function object itself.
    for block in model.blocks:
        block.compile(backend=recording_aot_eager, dynamic=False, fullgraph=True)
    try:
        sample, compiled = step()
        assert sum("_grouped_mm" in g for g in graphs) >= 2, "no compiled graph (train, sample) took the grouped path"
        assert float((sample - eager_sample).norm() / eager_sample.norm()) < 1e-2
        for name, want in eager.items():
            err = float((compiled[name] - want).norm() / want.norm().clamp(min=1e-30))
            assert err < 2e-2, (name, err)
    finally:
        torch._dynamo.reset()


def test_images_keep_their_pixels_whether_or_not_their_batch_is_grouped(grouped_mm_calls):
    """Grouping depends on the batch (T x width <= N x tokens); an image must not: batch 6 runs grouped,
    batch 1 per sample, and the images agree to one level of 255, as across batch sizes elsewhere."""
    from diffscaler.diffusion.sampling import sample_images

    model = grouped_backbone().eval()
    bank = AdapterBank.attach(model, TASKS, method="affiner", rank=4)
    randomize(bank)
    _, _, labels, ids = grouped_inputs()
    kw = dict(num=6, seed=3, labels=labels.tolist(), task_ids=ids.tolist(), steps=3)
    grouped = sample_images(model, GaussianDiffusion(), batch_size=6, **kw)
    assert grouped_mm_calls
    grouped_mm_calls.clear()
    one_by_one = sample_images(model, GaussianDiffusion(), batch_size=1, **kw)
    assert not grouped_mm_calls
    assert np.abs(grouped.astype(int) - one_by_one.astype(int)).max() <= 1
