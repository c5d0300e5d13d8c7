import numpy as np
import torch

from diffscaler.config import ModelConfig
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.diffusion.gaussian import SampleNoise, per_sample_seed
from diffscaler.diffusion.sampling import sample_images
from diffscaler.models import DiT
from tests.test_model import perturb


def test_linear_schedule_matches_ddpm():
    d = GaussianDiffusion(1000, 1e-4, 0.02)
    assert abs(float(d.schedule.betas[0]) - 1e-4) < 1e-12 and abs(float(d.schedule.betas[-1]) - 0.02) < 1e-12
    ac = d.schedule.alphas_cumprod
    assert torch.all(ac[1:] < ac[:-1]) and float(ac[-1]) < 1e-4


def test_respaced_schedule_keeps_alphas_cumprod():
    d = GaussianDiffusion()
    s = d.respaced(10)
    assert s.num_steps == 10
    assert torch.allclose(s.alphas_cumprod, d.schedule.alphas_cumprod[s.timesteps], rtol=1e-10)


def test_training_loss_is_mse_on_noise_and_adds_vb_with_learned_sigma():
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 999])
    noise = torch.randn_like(x0)
    d = GaussianDiffusion()
    perfect = d.training_losses(lambda xt, tt: noise, x0, t, noise)
    assert torch.allclose(perfect["loss"], torch.zeros(3))
    d2 = GaussianDiffusion(learn_sigma=True)
    out = d2.training_losses(lambda xt, tt: torch.cat([noise, torch.zeros_like(noise)], 1), x0, t, noise)
    assert torch.allclose(out["mse"], torch.zeros(3)) and torch.all(out["vb"] > 0)
    assert torch.allclose(out["loss"], out["mse"] + out["vb"])


def test_per_sample_seeds_are_distinct_and_stable():
    seeds = {per_sample_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert per_sample_seed(3, 7) == per_sample_seed(3, 7)
    a = SampleNoise(0, [5, 6], (2, 2, 2), "cpu").initial()
    b = SampleNoise(0, [6], (2, 2, 2), "cpu").initial()
    assert torch.equal(a[1], b[0])


def _model():
    torch.manual_seed(0)
    return perturb(DiT(ModelConfig(name="DiT-T/8", input_size=16, num_classes=5)), 0.05).eval()


def test_images_do_not_depend_on_batch_size_or_worker_split():
    model, d = _model(), GaussianDiffusion()
    labels = [0, 1, 2, 3, 4, 0, 1]
    for sampler, eta in (("ddim", 0.0), ("ddpm", 0.0), ("ddim", 1.0)):
        whole = sample_images(model, d, num=7, seed=11, labels=labels, batch_size=7, steps=4, sampler=sampler,
                              eta=eta)
        small = sample_images(model, d, num=7, seed=11, labels=labels, batch_size=2, steps=4, sampler=sampler,
                              eta=eta)
        # a "second worker" producing samples 4..6 on its own
        part = sample_images(model, d, num=3, seed=11, labels=labels[4:], start_index=4, batch_size=3, steps=4,
                             sampler=sampler, eta=eta)
        assert whole.shape == (7, 16, 16, 3) and whole.dtype == np.uint8
        assert np.abs(whole.astype(int) - small.astype(int)).max() <= 1
        assert np.abs(whole[4:].astype(int) - part.astype(int)).max() <= 1
        other_seed = sample_images(model, d, num=7, seed=12, labels=labels, batch_size=7, steps=4, sampler=sampler)
        assert np.abs(whole.astype(int) - other_seed.astype(int)).max() > 10


def test_sampling_with_guidance_runs_and_stays_in_range():
    model, d = _model(), GaussianDiffusion()
    imgs = sample_images(model, d, num=4, seed=0, labels=[0, 1, 2, 3], steps=3, cfg_scale=4.0)
    assert imgs.shape == (4, 16, 16, 3)
