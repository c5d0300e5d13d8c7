"""The condition path of a conditional task (issue 21, the model side): zero init for every method, mixed
conditional + unconditional batches row by row, condition guidance, the adapter files, and bad inputs."""

import json

import pytest
import torch

from diffscaler.adapters import AdapterBank, AdapterLoadError, TaskInfo
from diffscaler.artifacts import load_adapters, read_adapter_file, read_adapter_meta, save_adapter
from diffscaler.config import ADAPTER_METHODS, ModelConfig
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.diffusion.sampling import generate, sample_images
from diffscaler.models import DiT
from tests.support.models import backbone, inputs, perturb, randomize

EDGES = TaskInfo("edges", condition="canny", condition_channels=1, condition_extractor={"kind": "canny", "low": 100})
DEPTH = TaskInfo("depth", num_classes=3, conditional=True, condition="key:depth.png", condition_channels=3)
PLAIN = TaskInfo("plain")
COND_TASKS = [EDGES, PLAIN, DEPTH]  # ids 0, 1, 2: conditional, unconditional, conditional (3 channels)


def maps(n=6, channels=3, side=16, seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, side, side, generator=g) * 2 - 1  # (N, C, S, S) in [-1, 1]


def latent_backbone() -> DiT:
    torch.manual_seed(0)
    return perturb(DiT(ModelConfig(name="DiT-T/8", input_size=16, in_channels=4, num_classes=5)), 0.05)


def latent_tasks(factor=4):
    side = 16 * factor  # the map stays at pixel resolution: a VAE's factor times the latent side
    return [
        TaskInfo(
            t.name,
            t.num_classes,
            t.conditional,
            condition=t.condition,
            condition_channels=t.condition_channels,
            condition_size=side if t.condition else 0,
        )
        for t in COND_TASKS
    ]


@pytest.mark.parametrize("method", ADAPTER_METHODS)
@pytest.mark.parametrize("space", ["pixel", "latent"])
@pytest.mark.parametrize("blocks", [False, True], ids=["tokens", "every-block"])
def test_an_untrained_conditional_task_is_the_backbone_whatever_the_map(method, space, blocks):
    model = backbone().eval() if space == "pixel" else latent_backbone().eval()
    tasks = COND_TASKS if space == "pixel" else latent_tasks()
    side = 16 if space == "pixel" else 64
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, model.in_channels, 16, 16, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    null = torch.full((6,), -1)
    ref = model(x, t, torch.full((6,), 5))
    bank = AdapterBank.attach(model, tasks, method=method, rank=4, condition_blocks=blocks)
    assert bank.condition_parameters_per_task("edges") > 0 and bank.condition_parameters_per_task("plain") == 0
    ids = torch.tensor([0, 1, 2, 0, 2, 1])
    off = model(x, t, null, ids, condition_mask=torch.zeros(6, dtype=torch.bool))
    for seed in (5, 6):  # whatever the map: bit for bit the output without one
        m = maps(side=side, seed=seed) * (seed - 5)  # an all-zero map and a random one
        assert torch.equal(model(x, t, null, ids, condition=m), off), method
        assert torch.equal(
            model(x[:2], t[:2], null[:2], 0, condition=m[:2, :1]),
            model(x[:2], t[:2], null[:2], 0, condition_mask=torch.zeros(2, dtype=torch.bool)),
        )
    assert torch.allclose(off, ref, atol=1e-6)  # and the bank at init is the backbone (the tests of test_adapters)
    if method in ("lora", "controlnet"):  # no folded scale: exactly the backbone
        assert torch.equal(model(x, t, null, 0, condition=maps(side=side)[:, :1]), ref)


@pytest.mark.parametrize("method", ["affiner", "lora", "full", "controlnet"])
@pytest.mark.parametrize("blocks", [False, True], ids=["tokens", "every-block"])
def test_a_mixed_conditional_and_unconditional_batch_equals_per_task_runs_row_by_row(method, blocks):
    model = backbone().eval()
    bank = AdapterBank.attach(model, COND_TASKS, method=method, rank=4, condition_blocks=blocks)
    randomize(bank)
    x, t, y, _ = inputs()
    y = torch.tensor([0, 0, 2, 0, 1, 0])
    ids = torch.tensor([0, 1, 2, 0, 2, 1])
    cond = maps()
    cond[ids == 0, 1:] = 0  # the 1-channel task's rows: padded with zero channels, as the readers do
    use = torch.tensor([True, True, True, False, True, True])  # row 3: task 0 without its map
    mixed = model(x, t, y, ids, condition=cond, condition_mask=use)
    for task, channels in ((0, 1), (1, 0), (2, 3)):
        rows = (ids == task).nonzero().flatten()
        for r in rows.tolist():
            kw = {"condition": cond[r : r + 1, : channels or 1], "condition_mask": use[r : r + 1]}
            single = model(x[r : r + 1], t[r : r + 1], y[r : r + 1], task, **kw)
            assert torch.allclose(mixed[r : r + 1], single, atol=1e-5), (method, task, r)
    # a trained map changes its task's rows, and only theirs
    other = cond.clone()
    other[:, :, :8] = -other[:, :, :8]
    moved = model(x, t, y, ids, condition=other, condition_mask=use)
    changed = (moved - mixed).flatten(1).abs().amax(1) > 1e-4
    assert changed.tolist() == [True, False, True, False, True, False]
    # the map embedded once (ConditionTokens) gives the same output as the raw map
    tokens = bank.embed_condition(cond, ids, use)
    assert torch.equal(model(x, t, y, ids, condition=tokens), mixed)


@pytest.mark.parametrize("blocks", [False, True], ids=["tokens", "every-block"])
def test_a_batch_sorted_by_task_for_grouped_matmuls_keeps_each_rows_map(blocks):
    torch.manual_seed(0)
    model = perturb(DiT(ModelConfig(name="DiT-T/2", input_size=16, num_classes=5)), 0.05).eval()  # 64 tokens
    bank = AdapterBank.attach(model, COND_TASKS, method="affiner", rank=4, condition_blocks=blocks)
    randomize(bank)
    g = torch.Generator().manual_seed(3)
    n = 12
    x, t = torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 1000, (n,), generator=g)
    ids = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2, 2, 0, 1])
    y = torch.where(ids == 2, 1, 0)
    assert bank.groups_batch(x, model.grid_size**2)  # the batch is sorted by task inside the forward
    cond = maps(n)
    mixed = model(x, t, y, ids, condition=cond)
    for task, channels in ((0, 1), (1, 3), (2, 3)):
        rows = (ids == task).nonzero().flatten()
        single = model(x[rows], t[rows], y[rows], task, condition=cond[rows, :channels])
        assert torch.allclose(mixed[rows], single, atol=1e-5), task


def test_the_condition_path_trains_its_own_parameters_and_condition_dropout_drops_maps():
    model = backbone()
    bank = AdapterBank.attach(model, COND_TASKS, method="affiner", rank=4, condition_blocks=True)
    path = bank.condition_path
    assert {id(p) for p in path.parameters()} <= {id(p) for p in bank.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in bank.parameters()}
    x, t, y, _ = inputs()
    ids = torch.tensor([0, 1, 0, 1, 0, 1])  # task 2 absent
    model.train()
    model.task_embedder.dropout_prob = 0.0
    model(x, t, torch.zeros_like(y), ids, condition=maps()[:, :1]).square().mean().backward()
    assert path["0"].embed.proj.weight.grad.abs().sum() > 0  # the zero-init output layer learns first
    assert path["2"].embed.proj.weight.grad is None or path["2"].embed.proj.weight.grad.abs().sum() == 0
    # dropout: in training a share of the conditional rows get no map (seeded: the same rows again)
    with torch.no_grad():
        path["0"].embed.proj.weight.normal_()
    bank.condition_dropout = 0.5
    torch.manual_seed(0)
    dropped = model(x, t, torch.zeros_like(y), ids, condition=maps()[:, :1])
    bank.condition_dropout = 0.0
    full = model(x, t, torch.zeros_like(y), ids, condition=maps()[:, :1])
    none = model(x, t, torch.zeros_like(y), ids, condition_mask=torch.zeros(6, dtype=torch.bool))
    rows = [r for r in range(6) if ids[r] == 0]
    as_none = [bool(torch.allclose(dropped[r], none[r])) for r in rows]
    as_full = [bool(torch.allclose(dropped[r], full[r])) for r in rows]
    assert all(a != b for a, b in zip(as_none, as_full, strict=True))
    model.eval()  # no dropout in eval mode
    bank.condition_dropout = 0.99
    assert torch.equal(model(x, t, torch.zeros_like(y), ids, condition=maps()[:, :1]), full.detach()) or torch.allclose(
        model(x, t, torch.zeros_like(y), ids, condition=maps()[:, :1]), full, atol=1e-6
    )


def test_controlnet_copies_the_first_blocks_and_leaves_the_frozen_ones_alone():
    model = backbone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bank = AdapterBank.attach(model, COND_TASKS, method="controlnet", controlnet_blocks=2)
    branch = bank.condition_path["0"]
    assert len(branch.blocks) == 2 and bank.controlnet_blocks == 2
    for i in range(2):
        for (k, a), b in zip(branch.blocks[i].state_dict().items(), model.blocks[i].state_dict().values(), strict=True):
            assert torch.equal(a, b), k
    assert not bank.layers and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    d = model.hidden_size
    copies = sum(p.numel() for p in model.blocks[:2].parameters())
    stem = d * 1 * 8 * 8 + d  # patch 8, one channel
    assert bank.condition_parameters_per_task("edges") == copies + 2 * (d * d + d) + stem
    # trainable: only the copies, their zero linears, the stems and the task rows
    model.train()
    x, t, y, _ = inputs()
    model(x, t, torch.zeros_like(y), torch.tensor([0, 1, 0, 1, 0, 1]), condition=maps()[:, :1]).sum().backward()
    assert all(p.grad is None for p in model.blocks.parameters())
    assert branch.outs[0].weight.grad.abs().sum() > 0


def test_condition_parameter_counts():
    model = backbone()
    bank = AdapterBank.attach(model, COND_TASKS, method="affiner", rank=4, condition_blocks=True)
    d, depth = model.hidden_size, len(model.blocks)
    assert bank.condition_parameters_per_task("edges") == d * 1 * 64 + d + (depth - 1) * d
    assert bank.condition_parameters_per_task("depth") == d * 3 * 64 + d + (depth - 1) * d
    plain = AdapterBank.attach(backbone(), [EDGES, PLAIN, DEPTH], method="affiner", rank=4)
    assert bank.trainable_parameters_per_task("edges") == (
        plain.trainable_parameters_per_task("edges") + (depth - 1) * d
    )
    assert plain.trainable_parameters_per_task("plain") + d * 64 + d == plain.trainable_parameters_per_task("edges")


def count_rows(model):
    """Rows of every denoising pass (the bank's forward calls the backbone's denoise once per forward)."""
    calls = []
    inner = model.denoise

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return inner(x, *args, **kwargs)

    model.denoise = counting
    return calls


def test_condition_guidance_scale_one_is_one_pass_and_the_scales_combine_as_documented():
    model = backbone().eval()
    bank = AdapterBank.attach(model, COND_TASKS, method="affiner", rank=4)
    randomize(bank)
    diffusion = GaussianDiffusion()
    ids = torch.tensor([0, 1, 2, 0])
    labels = torch.tensor([0, 0, 1, 0])
    cond = maps(4)
    kw = {"labels": labels, "indices": range(4), "seed": 0, "task_ids": ids, "steps": 2, "condition": cond}
    calls = count_rows(model)
    plain = generate(model, diffusion, **kw)
    assert set(calls) == {4}  # scale 1: no extra pass
    calls.clear()
    guided = generate(model, diffusion, **kw, condition_scale=3.0)
    assert set(calls) == {8}
    calls.clear()
    generate(model, diffusion, **kw, condition_scale=3.0, cfg_scale=2.0)
    assert set(calls) == {12}
    # the unconditional task's row (1) is left as it is; conditional rows move
    # (1e-4: the guided batch has twice the rows, so the matmuls block differently; 5e-5 seen on an AVX-512 Xeon)
    assert torch.allclose(guided[1], plain[1], atol=1e-4)
    assert not torch.allclose(guided[0], plain[0], atol=1e-3)
    # the guidance formula on one forward
    from diffscaler.diffusion.sampling import guided_forward

    x, t = torch.randn(4, 3, 16, 16), torch.full((4,), 500)
    tokens = bank.embed_condition(cond, ids)
    with torch.no_grad():
        e_c = model(x, t, labels, ids, condition=tokens)
        e_u = model(x, t, labels, ids, condition=tokens.without_map())
        out = guided_forward(model, x, t, labels, ids, tokens, 1.0, 2.5)
    assert torch.allclose(out, e_u + 2.5 * (e_c - e_u), atol=1e-5)


def test_sample_images_takes_uint8_maps_and_does_not_depend_on_the_batch_mix():
    model = backbone().eval()
    bank = AdapterBank.attach(model, COND_TASKS, method="affiner", rank=4)
    randomize(bank)
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(0)
    u8 = (torch.rand(4, 3, 16, 16, generator=g) > 0.5).to(torch.uint8) * 255
    kw = {"num": 4, "seed": 1, "labels": [0, 0, 1, 0], "task_ids": [0, 1, 2, 0], "steps": 2, "conditions": u8.numpy()}
    together = sample_images(model, diffusion, batch_size=4, **kw)
    apart = sample_images(model, diffusion, batch_size=1, **kw)
    assert (abs(together.astype(int) - apart.astype(int)) <= 1).all()
    masked = sample_images(model, diffusion, batch_size=4, condition_mask=[False] * 4, **kw)
    assert (masked[1] == together[1]).all() or (abs(masked[1].astype(int) - together[1].astype(int)) <= 1).all()
    assert (masked[0] != together[0]).any()


def test_bad_condition_inputs_get_clear_errors():
    model = backbone().eval()
    AdapterBank.attach(model, COND_TASKS, method="affiner", rank=4)
    x, t, y, _ = inputs()
    y = torch.zeros_like(y)
    ids = torch.tensor([0, 1, 2, 0, 2, 1])
    with pytest.raises(ValueError, match=r"task 'edges' takes a condition map \(canny.*condition_mask False"):
        model(x, t, y, ids)
    with pytest.raises(ValueError, match=r"take \(3, 16, 16\)"):
        model(x, t, y, ids, condition=maps(channels=1))
    with pytest.raises(ValueError, match=r"take \(1, 16, 16\) \(or 3: the bank's widest\)"):
        model(x[:2], t[:2], y[:2], 0, condition=maps(2, channels=2))
    one = AdapterBank.attach(backbone(), [EDGES]).model
    with pytest.raises(ValueError, match=r"take \(1, 16, 16\): 16 px"):
        one(x[:2], t[:2], y[:2], 0, condition=maps(2, channels=3))
    with pytest.raises(ValueError, match=r"take \(3, 16, 16\)"):
        model(x, t, y, ids, condition=maps(side=32))
    with pytest.raises(ValueError, match=r"one map per row"):
        model(x, t, y, ids, condition=maps(4))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model(x, t, y, ids, condition=maps() * 255)
    bad = maps()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(x, t, y, ids, condition=bad)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        model(x, t, y, ids, condition=maps(), condition_mask=torch.ones(6))
    with pytest.raises(ValueError, match="needs task_ids"):
        model(x, t, y, None, condition=maps())
    # the explicit unconditioned output needs no map; an unconditional task ignores any map it is given
    off = torch.zeros(6, dtype=torch.bool)
    assert model(x, t, y, ids, condition_mask=off).shape == x.shape
    plain = model(x[:1], t[:1], y[:1], 1)
    assert torch.equal(model(x[:1], t[:1], y[:1], 1, condition=torch.full((1, 7, 3, 3), 99.0)), plain)
    with pytest.raises(ValueError, match="different sides"):
        AdapterBank.attach(
            backbone(), [EDGES, TaskInfo("m", condition="mask", condition_channels=1, condition_size=32)]
        )
    with pytest.raises(ValueError, match="power of two"):
        AdapterBank.attach(backbone(), [TaskInfo("m", condition="mask", condition_channels=1, condition_size=24)])
    with pytest.raises(ValueError, match="kind and channels together"):
        TaskInfo("m", condition="mask")
    with pytest.raises(ValueError, match="blocks to copy"):
        AdapterBank.attach(backbone(), [EDGES], method="controlnet", controlnet_blocks=7)
    with pytest.raises(ValueError, match="condition map needs task ids"):
        generate(
            backbone(),
            GaussianDiffusion(),
            labels=torch.zeros(2, dtype=torch.long),
            indices=range(2),
            seed=0,
            steps=1,
            condition=maps(2),
        )


@pytest.mark.parametrize("method", ["affiner", "controlnet"])
def test_a_conditional_adapter_round_trips_with_its_condition_path_and_record(tmp_path, method):
    model = backbone().eval()
    bank = AdapterBank.attach(model, COND_TASKS, method=method, rank=4, condition_blocks=True)
    randomize(bank)
    x, t, y, _ = inputs()
    y = torch.tensor([0, 0, 2, 0, 1, 0])
    ids = torch.tensor([0, 1, 2, 0, 2, 1])
    want = model(x, t, y, ids, condition=maps())
    files = [save_adapter(bank, task.name, tmp_path, "sha256:x")[0] for task in COND_TASKS]
    meta = read_adapter_meta(files[0])
    assert meta["format_version"] == 2 and read_adapter_meta(files[1])["format_version"] == 1
    assert meta["condition"] == {
        "kind": "canny",
        "channels": 1,
        "size": 16,
        "blocks": True,
        "controlnet_blocks": bank.controlnet_blocks,
        "extractor": {"kind": "canny", "low": 100},
        "params": bank.condition_parameters_per_task("edges"),
    }
    assert read_adapter_meta(files[1])["condition"] is None
    loaded = load_adapters(backbone().eval(), files, "sha256:x")
    assert loaded.tasks[0].condition_extractor == {"kind": "canny", "low": 100}
    assert torch.equal(loaded.model(x, t, y, ids, condition=maps()), want)
    # onto a bank whose task takes no map: refused, naming the file and the reason
    other = AdapterBank.attach(backbone(), [PLAIN], method=method, rank=4)
    with pytest.raises(AdapterLoadError, match=r"edges\.safetensors: the adapter carries a condition path.*no cond"):
        other.load_task_state(0, read_adapter_file(files[0])[1], files[0])
    # a map size this backbone's input cannot take, and disagreeing conditional tasks
    js = files[0].with_suffix(".json")
    record = json.loads(js.read_text())
    record["condition"]["size"] = 24
    js.write_text(json.dumps(record))
    with pytest.raises(AdapterLoadError, match=r"edges\.safetensors: its condition path \(canny\) cannot run here"):
        load_adapters(backbone(), files, "sha256:x")
    record["condition"]["size"] = 16
    record["condition"]["blocks"] = False
    js.write_text(json.dumps(record))
    with pytest.raises(AdapterLoadError, match="disagree on condition blocks"):
        load_adapters(backbone(), files, "sha256:x")


def test_the_bank_file_keeps_the_condition_path(tmp_path):
    from diffscaler.bank_file import load_bank, save_bank

    model = backbone().eval()
    bank = AdapterBank.attach(model, COND_TASKS, method="affiner", rank=4)
    randomize(bank)
    x, t, y, _ = inputs()
    y = torch.tensor([0, 0, 2, 0, 1, 0])
    ids = torch.tensor([0, 1, 2, 0, 2, 1])
    files = [save_adapter(bank, task.name, tmp_path, "sha256:x")[0] for task in COND_TASKS]
    st, _ = save_bank(files, tmp_path)
    loaded = load_bank(backbone().eval(), st, "sha256:x")
    assert torch.equal(loaded.model(x, t, y, ids, condition=maps()), model(x, t, y, ids, condition=maps()))
