import numpy as np
import torch

from diffscaler.config import ModelConfig
from diffscaler.diffusion import GaussianDiffusion
from diffscaler.diffusion.gaussian import SampleNoise, per_sample_seed
from diffscaler.diffusion.sampling import sample_images
from diffscaler.models import DiT
from tests.support.models import perturb


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
    # KL >= 0; with float64 tables a perfect eps at t=999 (beta ~ posterior variance) gives exactly 0
    assert torch.allclose(out["mse"], torch.zeros(3)) and torch.all(out["vb"][:2] > 0) and torch.all(out["vb"] >= 0)
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
        whole = sample_images(model, d, num=7, seed=11, labels=labels, batch_size=7, steps=4, sampler=sampler, eta=eta)
        small = sample_images(model, d, num=7, seed=11, labels=labels, batch_size=2, steps=4, sampler=sampler, eta=eta)
        # a "second worker" producing samples 4..6 on its own
        part = sample_images(
            model, d, num=3, seed=11, labels=labels[4:], start_index=4, batch_size=3, steps=4, sampler=sampler, eta=eta
        )
        assert whole.shape == (7, 16, 16, 3) and whole.dtype == np.uint8
        assert np.abs(whole.astype(int) - small.astype(int)).max() <= 1
        assert np.abs(whole[4:].astype(int) - part.astype(int)).max() <= 1
        other_seed = sample_images(model, d, num=7, seed=12, labels=labels, batch_size=7, steps=4, sampler=sampler)
        assert np.abs(whole.astype(int) - other_seed.astype(int)).max() > 10


def test_sampling_with_guidance_runs_and_stays_in_range():
    model, d = _model(), GaussianDiffusion()
    imgs = sample_images(model, d, num=4, seed=0, labels=[0, 1, 2, 3], steps=3, cfg_scale=4.0)
    assert imgs.shape == (4, 16, 16, 3)


# ------------------------------------------------------------------------------------------------
# Against the reference (facebookresearch/DiT diffusion/), its formulas written here in numpy float64
# ------------------------------------------------------------------------------------------------


def _reference_space_timesteps(num_timesteps: int, section_counts: list[int]) -> set[int]:
    """diffusion/respace.py space_timesteps, for integer section counts."""
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx, taken_steps = 0.0, []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


def test_respacing_picks_the_reference_timesteps_for_every_step_count():
    from diffscaler.diffusion.gaussian import space_timesteps

    differ = [n for n in range(1, 1001) if space_timesteps(1000, n) != sorted(_reference_space_timesteps(1000, [n]))]
    assert differ == []
    d = GaussianDiffusion()
    for n in (21, 23, 31, 250):
        assert d.respaced(n).timesteps.tolist() == sorted(_reference_space_timesteps(1000, [n]))


def _reference_tables(betas: np.ndarray) -> dict[str, np.ndarray]:
    """diffusion/gaussian_diffusion.py GaussianDiffusion.__init__ (float64 throughout)."""
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "sqrt_ac": np.sqrt(ac),
        "sqrt_1mac": np.sqrt(1.0 - ac),
        "sqrt_recip": np.sqrt(1.0 / ac),
        "sqrt_recipm1": np.sqrt(1.0 / ac - 1),
        "log_var_clipped": np.log(np.append(post_var[1], post_var[1:])),
        "coef1": betas * np.sqrt(ac_prev) / (1.0 - ac),
        "coef2": (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        "log_betas": np.log(betas),
    }


def test_schedule_arithmetic_matches_the_reference_float64_tables():
    d = GaussianDiffusion(learn_sigma=True)
    ref = _reference_tables(np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    t = torch.tensor([0, 1, 2, 500, 999])
    tn = t.numpy()
    rng = np.random.default_rng(0)
    x0, noise = rng.uniform(-1, 1, (5, 3, 4, 4)), rng.standard_normal((5, 3, 4, 4))

    def rel(got: torch.Tensor, want: np.ndarray) -> float:
        return float(np.max(np.abs(got.double().numpy() - want) / np.maximum(np.abs(want), 1e-3)))

    b = (slice(None), None, None, None)
    x_t = ref["sqrt_ac"][tn][b] * x0 + ref["sqrt_1mac"][tn][b] * noise  # q_sample
    assert rel(d.q_sample(torch.tensor(x0).float(), t, torch.tensor(noise).float()), x_t) < 1e-6

    # predicted x0 and the VB term (KL to the posterior; t=0 would be the decoder NLL) with v = 0
    eps = rng.standard_normal((5, 3, 4, 4))
    x0_pred = ref["sqrt_recip"][tn][b] * x_t - ref["sqrt_recipm1"][tn][b] * eps
    out = torch.cat([torch.tensor(eps).float(), torch.zeros(5, 3, 4, 4)], 1)
    _mean, _logvar, got_x0 = d.p_mean_variance(d.schedule, out, torch.tensor(x_t).float(), t, clip_denoised=False)
    assert rel(got_x0[:3], x0_pred[:3]) < 1e-6  # small t: where float32 alphabar lost ~1e-4
    assert rel(got_x0, x0_pred) < 1e-5  # t=999: x_t / 0.006 - 158 eps cancels in float32, as in the reference
    true_mean = ref["coef1"][tn][b] * x0 + ref["coef2"][tn][b] * x_t
    true_logvar = ref["log_var_clipped"][tn][b]
    mean = ref["coef1"][tn][b] * x0_pred + ref["coef2"][tn][b] * x_t
    logvar = 0.5 * ref["log_betas"][tn][b] + 0.5 * ref["log_var_clipped"][tn][b]
    kl = 0.5 * (-1.0 + logvar - true_logvar + np.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * np.exp(-logvar))
    vb_ref = kl.mean(axis=(1, 2, 3)) / np.log(2.0)
    vb = d._vb_terms(d.schedule, out, torch.tensor(x0).float(), torch.tensor(x_t).float(), t)
    assert rel(vb[1:], vb_ref[1:]) < 2e-6, (vb[1:].double().numpy() - vb_ref[1:]) / vb_ref[1:]
