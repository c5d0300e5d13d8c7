import pytest
import torch

from diffscaler.config import ModelConfig
from diffscaler.models import DiT, model_macs
from tests.support.models import perturb


def tiny(**kw) -> DiT:
    torch.manual_seed(0)
    return DiT(ModelConfig(name=kw.pop("name", "DiT-T/8"), input_size=kw.pop("input_size", 16), **kw))


def batch(model: DiT, n: int = 4):
    c, s = model.config.in_channels, model.config.input_size
    g = torch.Generator().manual_seed(2)
    return (
        torch.randn(n, c, s, s, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randint(0, model.config.num_classes, (n,), generator=g),
    )


def test_fresh_model_outputs_exactly_zero_and_blocks_are_identity():
    model = tiny(learn_sigma=True)
    x, t, y = batch(model)
    assert torch.equal(model(x, t, y), torch.zeros(4, 6, 16, 16))
    h = torch.randn(4, model.grid_size**2, model.hidden_size)
    c = torch.randn(4, model.hidden_size)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)


def test_patchify_unpatchify_round_trip():
    model = tiny(name="DiT-T/4", input_size=32, in_channels=3)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


@pytest.mark.parametrize(("name", "size", "channels"), [("DiT-T/2", 8, 4), ("DiT-T/4", 24, 3), ("DiT-T/8", 64, 1)])
def test_any_square_size_and_channel_count(name, size, channels):
    model = perturb(tiny(name=name, input_size=size, in_channels=channels))
    x, t, y = batch(model, 2)
    assert model(x, t, y).shape == (2, channels, size, size)


def test_paper_counts_for_xl2():
    cfg = ModelConfig(name="DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    with torch.device("meta"):
        model = DiT(cfg)
    assert round(model.num_parameters() / 1e6) == 675
    assert round(model_macs(cfg) / 1e9, 1) == 118.6


def test_label_dropout_only_in_training_and_cfg_guides_all_channels():
    model = perturb(tiny(in_channels=4, learn_sigma=True))
    x, t, y = batch(model)
    model.eval()
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, model.config.num_classes))
    guided = model.forward_with_cfg(x, t, y, 3.0)
    eps = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])
    assert torch.allclose(guided[:, :4], eps, atol=1e-5)  # all 4 channels, not 3
    assert torch.allclose(guided[:, 4:], cond[:, 4:], atol=1e-6)


def test_grad_checkpointing_gives_the_same_gradients():
    model = perturb(tiny())
    x, t, y = batch(model)
    model.y_embedder.dropout_prob = 0.0
    model.train()
    model(x, t, y).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x, t, y).square().mean().backward()
    for a, p in zip(ref, model.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-6)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda x, t, y: (x[:, :2], t, y), "this model takes"),
        (lambda x, t, y: (x.index_fill(0, torch.tensor([1]), float("nan")), t, y), "NaN"),
        (lambda x, t, y: (x, t, y + 100), "class labels must be in"),
        (lambda x, t, y: (x, t[:2], y), "must have shape"),
    ],
)
def test_bad_inputs_are_clear_errors(mutate, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        model(*mutate(*batch(model)))


def test_task_ids_without_adapters_is_an_error():
    model = tiny()
    x, t, y = batch(model)
    with pytest.raises(ValueError, match="no adapters"):
        model(x, t, y, task_ids=torch.zeros(4, dtype=torch.long))
