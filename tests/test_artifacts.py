import json

import pytest
import torch

from diffscaler.adapters import AdapterBank, AdapterLoadError
from diffscaler.artifacts import (
    BackboneLoadError,
    load_adapters,
    load_backbone,
    save_adapter,
    save_backbone,
)
from diffscaler.config import ModelConfig
from diffscaler.models import DiT
from tests.support.models import TASKS, backbone, inputs, randomize


def test_backbone_round_trip_is_bit_exact(tmp_path):
    model = backbone()
    digest = save_backbone(model, tmp_path / "backbone.safetensors", provenance={"step": 3})
    loaded, meta = load_backbone(tmp_path / "backbone.safetensors", expect=model.config)
    assert meta["content_hash"] == digest and meta["provenance"]["step"] == 3
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))


def test_backbone_errors(tmp_path):
    model = backbone()
    path = tmp_path / "backbone.safetensors"
    save_backbone(model, path)
    with pytest.raises(BackboneLoadError, match="name file='DiT-T/8' config='DiT-S/2'"):
        load_backbone(path, expect=ModelConfig(name="DiT-S/2", input_size=16))
    other = backbone()
    with torch.no_grad():
        other.blocks[0].attn.qkv.weight.add_(1)
    from safetensors.torch import save_file

    from diffscaler.artifacts import backbone_state

    save_file(backbone_state(other), str(path))  # weights replaced behind the JSON's back
    with pytest.raises(BackboneLoadError, match="content hash"):
        load_backbone(path)
    with pytest.raises(BackboneLoadError, match="not found"):
        load_backbone(tmp_path / "missing.safetensors")


def test_public_dit_checkpoint_layout_round_trips(tmp_path):
    cfg = ModelConfig(name="DiT-T/2", input_size=8, in_channels=4, num_classes=7, learn_sigma=True)
    torch.manual_seed(0)
    ref = DiT(cfg)
    torch.save(ref.state_dict(), tmp_path / "DiT-T-2-64x64.pt")  # the layout of facebookresearch/DiT
    model, meta = load_backbone(tmp_path / "DiT-T-2-64x64.pt")
    assert model.config.name == "DiT-T/2" and model.config.learn_sigma and model.config.num_classes == 7
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True))
    keys = set(ref.state_dict())
    for k in (
        "x_embedder.proj.weight",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.2.weight",
        "y_embedder.embedding_table.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.proj.weight",
        "blocks.1.mlp.fc1.weight",
        "blocks.1.mlp.fc2.weight",
        "blocks.1.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.linear.weight",
        "pos_embed",
    ):
        assert k in keys


def test_reference_training_checkpoint_loads_its_ema_weights_under_weights_only(tmp_path):
    """facebookresearch/DiT train.py saves {"model", "ema", "opt", "args"}, args an argparse.Namespace."""
    import argparse

    cfg = ModelConfig(name="DiT-T/2", input_size=8, in_channels=4, num_classes=7, learn_sigma=True)
    torch.manual_seed(0)
    raw, ema = DiT(cfg), DiT(cfg)
    opt = torch.optim.AdamW(raw.parameters(), lr=1e-4)
    raw(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 3])).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="DiT-T/2", image_size=64, num_classes=7, global_batch_size=256, results_dir="r")
    path = tmp_path / "0400000.pt"
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)
    model, meta = load_backbone(path)
    assert model.config == cfg
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), model.state_dict().values(), strict=True))


def test_a_pickle_that_is_not_a_plain_state_dict_is_refused_without_torch_advice(tmp_path):
    from fractions import Fraction

    for name, write in [
        ("object.pt", lambda p: torch.save({"ema": {"w": torch.ones(1)}, "x": Fraction(1, 3)}, p)),
        ("corrupt.pt", lambda p: p.write_bytes(b"\x80\x02garbage" * 8)),
        ("truncated.pt", lambda p: p.write_bytes(_torch_bytes()[:200])),
    ]:
        path = tmp_path / name
        write(path)
        with pytest.raises(BackboneLoadError, match="not a plain state dict") as err:
            load_backbone(path)
        assert "weights_only=False" not in str(err.value) and "Re-running" not in str(err.value)
        assert str(path) in str(err.value)
    with pytest.raises(BackboneLoadError, match="fractions.Fraction"):  # names what it would have had to unpickle
        load_backbone(tmp_path / "object.pt")


def _torch_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.ones(64)}, buf)
    return buf.getvalue()


def test_adapter_save_load_round_trips_bit_exactly_into_a_mixed_bank(tmp_path):
    model = backbone().eval()
    digest = save_backbone(model, tmp_path / "backbone.safetensors")
    bank = AdapterBank.attach(model, TASKS, rank=4)
    randomize(bank)
    for task in TASKS:
        save_adapter(bank, task.name, tmp_path / "adapters", backbone_hash=digest)
    meta = json.loads((tmp_path / "adapters" / "b.json").read_text())
    assert meta["method"] == "affiner" and meta["rank"] == 4 and meta["num_classes"] == 3
    x, t, y, ids = inputs()
    expected = model(x, t, y, ids)
    fresh, m = load_backbone(tmp_path / "backbone.safetensors")
    files = [tmp_path / "adapters" / f"{n}.safetensors" for n in ("c", "a", "b")]  # another order
    bank2 = load_adapters(fresh, files, backbone_hash=m["content_hash"])
    fresh.eval()
    remap = torch.tensor([1, 2, 0])  # a->1, b->2, c->0
    assert torch.equal(fresh(x, t, y, remap[ids]), expected)
    for task in TASKS:
        for k, v in bank.task_state(task.name).items():
            assert torch.equal(v, bank2.task_state(task.name)[k])


def test_adapter_load_errors(tmp_path):
    model = backbone()
    bank = AdapterBank.attach(model, TASKS[:1], rank=4)
    save_adapter(bank, "a", tmp_path, backbone_hash="sha256:aaa")
    with pytest.raises(AdapterLoadError, match="trained on backbone 'sha256:aaa'"):
        load_adapters(backbone(), [tmp_path / "a.safetensors"], backbone_hash="sha256:bbb")
    other = DiT(ModelConfig(name="DiT-T/4", input_size=16, num_classes=5))
    with pytest.raises(AdapterLoadError, match="name adapter='DiT-T/8' backbone='DiT-T/4'"):
        load_adapters(other, [tmp_path / "a.safetensors"], backbone_hash=None)
    lora = AdapterBank.attach(backbone(), [TASKS[2]], method="lora", rank=4)
    save_adapter(lora, "c", tmp_path, backbone_hash="sha256:aaa")
    with pytest.raises(AdapterLoadError, match="disagree on method"):
        load_adapters(backbone(), [tmp_path / "a.safetensors", tmp_path / "c.safetensors"], backbone_hash=None)
    (tmp_path / "c.json").unlink()
    with pytest.raises(AdapterLoadError, match="c.json is missing"):
        load_adapters(backbone(), [tmp_path / "c.safetensors"], backbone_hash=None)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_weight_files_get_the_umask_mode_like_their_json(tmp_path, umask):
    """safetensors creates its files 0600: on a shared file system others read the JSONs but not the weights."""
    import os
    import stat

    old = os.umask(umask)
    try:
        save_backbone(backbone(), tmp_path / "backbone.safetensors")
        bank = AdapterBank.attach(backbone(), TASKS, method="affiner", rank=2)
        save_adapter(bank, TASKS[0].name, tmp_path / "adapters", "sha256:x")
    finally:
        os.umask(old)
    files = [
        tmp_path / "backbone.safetensors",
        tmp_path / "backbone.json",
        tmp_path / "adapters" / f"{TASKS[0].name}.safetensors",
        tmp_path / "adapters" / f"{TASKS[0].name}.json",
    ]
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o666 & ~umask}


def test_a_truncated_weights_file_with_its_json_intact_is_named_when_its_meta_is_read(tmp_path):
    """A copy that did not finish: the JSON is whole, the tensors are not. Found by every preflight (they read the
    meta), and by a loader, as a clear error instead of safetensors' own SafetensorError."""
    from diffscaler.artifacts import read_adapter_file, read_adapter_meta, read_backbone_meta

    path = tmp_path / "backbone.safetensors"
    save_backbone(backbone(), path)
    bank = AdapterBank.attach(backbone(), TASKS, method="affiner", rank=2)
    adapter, _ = save_adapter(bank, TASKS[0].name, tmp_path / "adapters", "sha256:x")
    for file in (path, adapter):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    for call in (read_backbone_meta, load_backbone):
        with pytest.raises(BackboneLoadError, match=rf"{path}: not a readable safetensors file .*truncated"):
            call(path)
    for call in (read_adapter_meta, read_adapter_file):
        with pytest.raises(AdapterLoadError, match=rf"{adapter}: not a readable safetensors file .*truncated"):
            call(adapter)


def test_a_pickle_that_would_call_os_system_is_refused_naming_it(tmp_path):
    """torch 2.13 words a blocked module's global differently ("unsupported GLOBAL posix.system whose module posix
    is blocked"); the refusal names it either way, and nothing runs."""
    import os

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "x": Payload()}, path)
    with pytest.raises(BackboneLoadError, match=r"holds a pickled (posix|nt)\.system object"):
        load_backbone(path)
    assert not marker.exists()
