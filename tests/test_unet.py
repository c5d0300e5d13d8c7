"""The U-Net baseline (issue 24): diffusers' UNet2DModel behind model.arch unet, about DiT-T/4's size, and
the per-task adapters that apply to convolutions (BitFit, DiffFit-style scale + bias, full), zero at init.

    .venv/bin/python -m pytest tests/test_unet.py -q --timeout 300
"""

from __future__ import annotations

import pytest
import torch

from diffscaler.adapters.bank import TaskInfo
from diffscaler.adapters.conv import CONV_METHODS, ConvBank
from diffscaler.config import ConfigError, ModelConfig, load_config, validate_model
from diffscaler.diffusion.gaussian import GaussianDiffusion
from diffscaler.models.dit import build_model
from diffscaler.unet import build_unet

MICRO = ModelConfig(arch="unet", name="UNet-T", input_size=16, num_classes=3)
TASKS = [TaskInfo("a"), TaskInfo("b", num_classes=2, conditional=True)]


def test_arch_field_is_validated_and_what_a_unet_cannot_take_is_refused_by_name():
    validate_model(MICRO)
    bad = {
        "model.arch=cnn": "model.arch",
        "model.arch=unet": "model.name",  # DiT-T/4 is not a U-Net preset
    }
    for override, field in bad.items():
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, [override])
    with pytest.raises(ConfigError, match=r"model\.input_size"):
        validate_model(ModelConfig(arch="unet", name="UNet-T", input_size=18))
    unet = ["model.arch=unet", "model.name=UNet-T"]
    with pytest.raises(ConfigError, match=r"finetune\.methods: 'affiner' does not apply to a U-Net"):
        load_config(None, [*unet, "finetune.methods=[affiner]"])
    load_config(None, [*unet, "finetune.methods=[difffit, bitfit, full]"])  # the pipeline runs it now
    with pytest.raises(ConfigError, match=r"finetune\.lr_from_sweep"):
        load_config(None, [*unet, "finetune.methods=[difffit]", "finetune.lr_from_sweep=true"])


def test_unet_t_is_about_dit_t4s_size():
    unet = build_unet(ModelConfig(arch="unet", name="UNet-T", input_size=32, num_classes=22), seed=0)
    dit = build_model(ModelConfig(name="DiT-T/4", input_size=32, num_classes=22), seed=0)
    assert abs(unet.num_parameters() / dit.num_parameters() - 1) < 0.1


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return x, t


@pytest.mark.parametrize("method", CONV_METHODS)
def test_an_untrained_adapter_is_the_backbone_and_a_mixed_batch_is_each_tasks_own(method):
    model = build_unet(MICRO, seed=0).eval()
    x, t = _batch()
    null = torch.full((6,), -1)
    with torch.no_grad():
        ref = model(x, t, null)
        bank = ConvBank.attach(model, TASKS, method=method)
        ids = torch.tensor([0, 1, 1, 0, 1, 0])
        labels = torch.tensor([0, 0, 1, -1, -1, 0])  # task a's one row, task b's two, the null row
        exact = dict(atol=0, rtol=0) if method != "full" else dict(atol=1e-5, rtol=0)  # full: per-task matmuls
        torch.testing.assert_close(model(x, t, labels, task_ids=ids), ref, **exact)
        torch.testing.assert_close(model(x, t, null, task_ids=0), ref, **exact)
        torch.testing.assert_close(model(x, t, null), ref, atol=0, rtol=0)  # no ids: the bare backbone
        for p in bank.parameters():  # train-like perturbation: tasks now differ
            p.add_(0.05 * torch.randn_like(p))
        mixed = model(x, t, labels, task_ids=ids)
        for task in (0, 1):
            rows = (ids == task).nonzero().squeeze(1)
            alone = model(x[rows], t[rows], labels[rows], task_ids=task)
            torch.testing.assert_close(mixed[rows], alone, atol=1e-5, rtol=1e-5)
        zeros = torch.zeros(6, dtype=torch.long)
        assert (model(x, t, zeros, task_ids=0) - model(x, t, zeros, task_ids=1)).abs().max() > 1e-4
        torch.testing.assert_close(model(x, t, null), ref, atol=0, rtol=0)  # the backbone is untouched
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".base." in n)


@pytest.mark.parametrize("method", CONV_METHODS)
def test_a_merged_task_samples_as_its_adapter_and_unmerge_restores_the_backbone_exactly(method):
    model = build_unet(MICRO, seed=0).eval()
    bank = ConvBank.attach(model, TASKS, method=method)
    x, t = _batch(4)
    y = torch.tensor([0, 1, -1, 0])
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.05 * torch.randn_like(p))
        before = {n: b.clone() for n, b in model.named_parameters() if ".base." in n}
        adapted = model(x, t, y, task_ids=1)
        bare = model(x, t, y.clamp(max=-1))
        bank.merge("b")
        torch.testing.assert_close(model(x, t, y, task_ids=1), adapted, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            model(x, t, y, task_ids=torch.ones(4, dtype=torch.long)), adapted, atol=1e-4, rtol=1e-4
        )
        for other in ({"task_ids": 0}, {"task_ids": torch.tensor([1, 0, 1, 1])}, {}):  # would get b's weights
            with pytest.raises(RuntimeError, match="task 1 is merged"):
                model(x, t, y.clamp(max=0) if other else y.clamp(max=-1), **other)  # labels every task has
        bank.unmerge()
        for n, b in model.named_parameters():
            if ".base." in n:
                torch.testing.assert_close(b, before[n], atol=0, rtol=0)
        torch.testing.assert_close(model(x, t, y.clamp(max=-1)), bare, atol=0, rtol=0)


def test_methods_that_do_not_apply_to_a_unet_are_refused_by_name():
    for method in ("affiner", "lora"):
        with pytest.raises(ValueError, match=f"{method}.*does not apply to a U-Net"):
            ConvBank.attach(build_unet(MICRO, seed=0), TASKS, method=method)
    with pytest.raises(ValueError, match="a DiT takes"):
        ConvBank.attach(build_model(ModelConfig(name="DiT-T/4", input_size=16, num_classes=3)), TASKS)
    model = build_unet(MICRO, seed=0)
    ConvBank.attach(model, TASKS, method="bitfit")
    with pytest.raises(ValueError, match="already has adapters"):
        ConvBank.attach(model, TASKS, method="bitfit")
    with pytest.raises(ValueError, match="outside its task's classes"):
        x, t = _batch(2)
        model(x, t, torch.tensor([0, 1]), task_ids=torch.tensor([0, 0]))  # task a has one class


def test_shares_are_counted_on_the_bank_and_scale_bias_stay_small():
    counts = {}
    for method in CONV_METHODS:
        bank = ConvBank.attach(build_unet(MICRO, seed=0), [TaskInfo("a")], method=method)
        counts[method] = bank.trainable_parameters_per_task(0)
        assert counts[method] == sum(p[0].numel() for p in bank.parameters())
    backbone = bank.backbone_parameters()
    assert counts["bitfit"] < counts["difffit"] < 0.01 * backbone < counts["full"]


def test_micro_pretrain_then_fine_tune_trains_only_the_adapter():
    """Plain torch (the pipeline's Ray Train + DeepSpeed stages do not run the U-Net yet): a few pretraining
    steps on class-conditional noise targets, then a DiffFit-style fine-tune over the frozen result."""
    torch.manual_seed(0)
    diffusion = GaussianDiffusion(num_timesteps=100)
    model = build_unet(MICRO, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0 = torch.randn(8, 3, 16, 16).clamp(-1, 1)
    y = torch.arange(8) % 3
    for _ in range(3):
        t = diffusion.sample_timesteps(8)
        loss = diffusion.training_losses(lambda xt, tt: model(xt, tt, y), x0, t)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    bank = ConvBank.attach(model, [TaskInfo("target")], method="difffit")
    opt = torch.optim.AdamW(bank.parameters(), lr=1e-2)
    ids = torch.zeros(8, dtype=torch.long)
    for _ in range(3):
        t = diffusion.sample_timesteps(8)
        loss = diffusion.training_losses(
            lambda xt, tt: model(xt, tt, torch.zeros(8, dtype=torch.long), task_ids=ids), x0, t
        )["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    adapted = dict(model.named_parameters())
    for name, before in frozen.items():  # wrapped layers moved under `.base`; same tensors
        now = (
            adapted.get(name)
            if name in adapted
            else adapted[name.rsplit(".", 1)[0] + ".base." + name.rsplit(".", 1)[1]]
        )
        torch.testing.assert_close(now, before, atol=0, rtol=0)
    assert any(p.abs().sum() > 0 for p in bank.parameters()[:-1])  # the scales and biases trained


def test_a_unet_adapter_round_trips_through_its_files_and_fits_no_dit(tmp_path):
    from diffscaler.adapters.bank import AdapterBank, AdapterLoadError
    from diffscaler.artifacts import load_adapters, load_backbone, save_adapter, save_backbone

    digest = save_backbone(build_unet(MICRO, seed=0), tmp_path / "unet.safetensors")
    model, meta = load_backbone(tmp_path / "unet.safetensors")
    assert meta["model"]["arch"] == "unet" and meta["content_hash"] == digest
    bank = ConvBank.attach(model, TASKS, method="difffit")
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (tmp_path / "a").mkdir()
    path, _ = save_adapter(bank, "b", tmp_path / "a", digest)
    fresh, _ = load_backbone(tmp_path / "unet.safetensors")
    loaded = load_adapters(fresh, [path], digest)
    x, t = _batch(4)
    y = torch.tensor([0, 1, -1, 1])
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, y, task_ids=0), model(x, t, y, task_ids=1), atol=0, rtol=0)
    assert loaded.trainable_parameters_per_task("b") == bank.trainable_parameters_per_task(1)

    dit_cfg = ModelConfig(name="DiT-T/4", input_size=16, num_classes=3)
    dit_digest = save_backbone(build_model(dit_cfg, seed=0), tmp_path / "dit.safetensors")
    dit, _ = load_backbone(tmp_path / "dit.safetensors")
    with pytest.raises(AdapterLoadError, match="'unet' backbone .* do not load onto each other"):
        load_adapters(dit, [path], None)
    dit_bank = AdapterBank.attach(dit, [TaskInfo("a")], method="bitfit")
    (tmp_path / "d").mkdir()
    dit_path, _ = save_adapter(dit_bank, "a", tmp_path / "d", dit_digest)
    unet, _ = load_backbone(tmp_path / "unet.safetensors")
    with pytest.raises(AdapterLoadError, match="'dit' backbone .* do not load onto each other"):
        load_adapters(unet, [dit_path], None)


def test_a_unet_samples_merged_through_the_cli_and_serve_and_generate_refuse_it_by_name(tmp_path, refuse_ray, capsys):
    """`diffscaler sample --merge` gives the unmerged images; serving and generation page tasks into the DiT's
    bank, so a U-Net backbone is refused there, naming the arch and the command that samples it, before Ray."""
    import numpy as np

    from diffscaler.artifacts import load_backbone, save_adapter, save_backbone
    from diffscaler.cli import main
    from ray_jobs.generate import main as generate

    digest = save_backbone(build_unet(MICRO, seed=0), tmp_path / "unet.safetensors")
    model, _ = load_backbone(tmp_path / "unet.safetensors")
    bank = ConvBank.attach(model, TASKS, method="difffit")
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (tmp_path / "adapters").mkdir()
    save_adapter(bank, "a", tmp_path / "adapters", digest)
    images = {}
    for out, merge in (("plain", []), ("merged", ["--merge"])):
        args = ["--backbone", str(tmp_path / "unet.safetensors"), "--adapters", str(tmp_path / "adapters")]
        assert (
            main(["sample", *args, "--task", "a", "--num", "2", "--steps", "3", "--out", str(tmp_path / out), *merge])
            == 0
        )
        images[out] = np.load(tmp_path / out / "samples.npz")["images"].astype(int)
    assert np.abs(images["plain"] - images["merged"]).max() <= 1  # float rounding of the folded weights
    capsys.readouterr()

    backbone, adapters = str(tmp_path / "unet.safetensors"), str(tmp_path / "adapters")
    assert main(["serve", "--backbone", backbone, "--adapters", adapters]) == 2
    assert "a U-Net backbone (model.arch unet); serving and generation run DiT" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generate: {images_per_task: 2}\n")
    argv = ["--config", str(cfg), "--backbone", backbone, "--adapters", adapters, "--out", str(tmp_path / "o")]
    assert generate(argv) == 2
    assert "diffscaler sample --backbone" in capsys.readouterr().err and not (tmp_path / "o").exists()
