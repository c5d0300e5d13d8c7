import pytest
import torch

from diffscaler.adapters import AdapterBank, TaskInfo
from diffscaler.config import ADAPTER_METHODS, ModelConfig
from diffscaler.models import DiT
from tests.support.models import TASKS, backbone, inputs, randomize


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_at_init_every_task_equals_the_backbone(method):
    model = backbone().eval()
    x, t, _, ids = inputs()
    null = torch.full((6,), 5)
    ref = model(x, t, null)
    AdapterBank.attach(model, TASKS, method=method, rank=4)
    # label -1 = the backbone's null row, so task and backbone see the same condition
    assert not model.task_embedder.training  # attach keeps the model's eval mode
    assert torch.allclose(model(x, t, torch.full((6,), -1), ids), ref, atol=1e-6)
    # every task's own learned rows start as the null row too
    assert torch.allclose(model(x, t, torch.zeros(6, dtype=torch.long), ids), ref, atol=1e-6)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
@pytest.mark.parametrize("train_mode", [False, True])
def test_mixed_batch_equals_per_task_runs_row_by_row(method, train_mode):
    model = backbone()
    bank = AdapterBank.attach(model, TASKS, method=method, rank=4)
    randomize(bank)
    model.train(train_mode)
    model.task_embedder.dropout_prob = 0.0  # dropout is random per call; the rest is deterministic
    x, t, y, ids = inputs()
    mixed = model(x, t, y, ids)
    for task in range(3):
        rows = (ids == task).nonzero().flatten()
        single = model(x[rows], t[rows], y[rows], task)  # int id: the single-task fast path
        assert torch.allclose(mixed[rows], single, atol=1e-5), (method, task)


def test_only_adapter_parameters_train_and_gradients_reach_only_tasks_in_the_batch():
    model = backbone()
    bank = AdapterBank.attach(model, TASKS, method="affiner", rank=4)
    randomize(bank)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in bank.parameters()}
    x, t, y, ids = inputs()
    keep = ids != 2  # task c absent
    model.train()
    model(x[keep], t[keep], y[keep], ids[keep]).square().mean().backward()
    for p in bank.parameters():
        assert p.grad is not None
        assert torch.count_nonzero(p.grad[2]) == 0  # absent task: exactly zero
        assert torch.count_nonzero(p.grad[0]) > 0
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("method", ["affiner", "difffit", "bitfit", "lora", "full"])
def test_merged_equals_unmerged_and_unmerge_restores_exactly(method):
    model = backbone().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = AdapterBank.attach(model, TASKS, method=method, rank=4)
    randomize(bank)
    x, t, y, _ = inputs()
    y = torch.zeros_like(y)
    unmerged = model(x, t, y, 2)
    bank.merge("c")
    assert torch.allclose(model(x, t, y, 2), unmerged, atol=1e-5)
    bank.unmerge()
    for path, layer in bank.layers.items():
        assert torch.equal(layer.base.weight, before[f"{path}.weight"])
    assert torch.equal(model(x, t, y, 2), unmerged)


def test_trainable_counts_and_ranks():
    model = backbone()
    bank = AdapterBank.attach(model, [TaskInfo("a", rank=2), TaskInfo("b")], method="affiner", rank=4)
    d, blocks = model.hidden_size, len(model.blocks)
    per_block_out = 3 * d + d + 4 * d + d + 6 * d  # qkv, proj, fc1, fc2, adaLN outputs
    per_block_in = d + d + d + 4 * d + d

    def expect(r):
        return 2 * blocks * per_block_out + blocks * r * (per_block_in + per_block_out) + 5 * blocks + d

    assert bank.trainable_parameters_per_task("a") == expect(2)
    assert bank.trainable_parameters_per_task("b") == expect(4)
    assert bank.trainable_parameters_per_task("b") / bank.backbone_parameters() < 0.1
    # the padded rank of task a stays exactly zero under training
    model.train()
    x, t, y, _ = inputs()
    model(x, t, torch.zeros_like(y), torch.tensor([0, 1, 0, 1, 0, 1])).square().mean().backward()
    layer = bank.layers["blocks.0.attn.qkv"]
    assert torch.count_nonzero(layer.down.grad[0, 2:]) == 0 and torch.count_nonzero(layer.up.grad[0, :, 2:]) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "prefix"}, "not one of"),
        ({"targets": ("qkv", "conv")}, "allowed"),
        ({"rank": 1000}, "larger than layer"),
    ],
)
def test_bad_bank_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterBank.attach(backbone(), TASKS, **kwargs)


def test_bad_task_ids_and_labels():
    model = backbone()
    AdapterBank.attach(model, TASKS)
    x, t, y, ids = inputs()
    with pytest.raises(ValueError, match=r"task ids must be in \[0, 3\)"):
        model(x, t, y, ids + 1)
    with pytest.raises(ValueError, match="out of range for task"):
        model(x, t, y + 1, ids)
    with pytest.raises(ValueError, match="shape"):
        model(x, t, y, ids[:3])
    with pytest.raises(ValueError, match="integers"):
        model(x, t, y, ids.float())


def test_merged_model_refuses_other_tasks_instead_of_silently_using_the_merged_one():
    model = backbone().eval()
    bank = AdapterBank.attach(model, TASKS, rank=4)
    randomize(bank)
    bank.merge("a")
    x, t, y, ids = inputs()
    y = torch.zeros_like(y)
    with pytest.raises(RuntimeError, match="task 0 is merged"):
        model(x, t, y, ids)
    with pytest.raises(RuntimeError, match="task 0 is merged"):
        model(x, t, y, 2)
    with pytest.raises(RuntimeError, match="unmerge"):
        model(x, t, y)  # the backbone alone is not available while a task is folded in
    assert model(x, t, y, torch.zeros(6, dtype=torch.long)).shape == x.shape


FAMILIES = {
    "affiner": {"ScaleShiftLinear"},
    "difffit": {"ScaleShiftLinear"},
    "bitfit": {"ScaleShiftLinear"},
    "lora": {"LowRankLinear"},
    "full": {"DeltaLinear"},
    "controlnet": set(),
}  # wraps no layer: its block copies are a conditional task's condition path


@pytest.mark.parametrize("method", ADAPTER_METHODS)
def test_the_backbone_knows_nothing_of_its_adapters(method):
    from diffscaler.adapters import attached_bank

    model = backbone()
    keys = set(model.state_dict())
    assert attached_bank(model) is None and not hasattr(model, "task_embedder")
    bank = AdapterBank.attach(model, TASKS, method=method, rank=4)
    assert attached_bank(model) is bank  # the bank's forward is the model's forward now
    # each wrapper keeps its base layer; its class is its method's family; keys stay DiT's plus the parts
    assert {type(layer).__name__ for layer in bank.layers.values()} == FAMILIES[method]
    wrapped = {f"{path}.{w}" for path in bank.layers for w in ("weight", "bias")}
    base_keys = {k.replace(".base.", ".") for k in model.state_dict() if ".base." in k}
    assert base_keys == wrapped and wrapped <= keys
    assert "task_embedder.rows" in model.state_dict()
    with pytest.raises(ValueError, match="already has adapters"):
        AdapterBank.attach(model, TASKS, method=method, rank=4)


def test_sampling_a_bank_of_many_slots_folds_only_the_tasks_in_the_batch(monkeypatch):
    """Without grad, a mixed batch groups when its own tasks fit (P * width <= N * tokens), however many slots
    the bank has (serving's max_resident_tasks), and equals each task's own single-task run."""
    import diffscaler.adapters.layers as layers

    torch.manual_seed(0)
    model = DiT(ModelConfig(name="DiT-T/2", input_size=16, num_classes=5))
    bank = AdapterBank.attach(model, [TaskInfo(f"t{i}") for i in range(16)], rank=2)
    randomize(bank)
    model.eval()
    calls = []
    original = layers.grouped_scaled_linear
    monkeypatch.setattr(layers, "grouped_scaled_linear", lambda *a: calls.append(a[2].shape[0]) or original(*a))
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(12, 3, 16, 16, generator=g), torch.randint(0, 1000, (12,), generator=g)
    y, ids = torch.zeros(12, dtype=torch.long), torch.tensor([3, 11, 3, 7, 11, 3, 7, 7, 3, 11, 7, 3])
    with torch.no_grad():
        mixed = model(x, t, y, task_ids=ids)
        assert calls and set(calls) == {3}  # 3 folded copies of 16 slots (16 * 192 > 12 * 64 would not group)
        calls.clear()
        for task in (3, 7, 11):
            rows = ids == task
            single = model(x[rows], t[rows], y[rows], task_ids=task)
            torch.testing.assert_close(mixed[rows], single, rtol=1e-4, atol=1e-4)
