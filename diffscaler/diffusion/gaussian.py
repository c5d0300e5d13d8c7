"""Gaussian diffusion: linear beta schedule, epsilon prediction, the simple MSE loss (+ the
variational-bound term when sigma is learned: improved-DDPM's hybrid loss), and respaced DDPM /
DDIM sampling.

Per-sample seeds: every random draw of sample i (its starting noise and each step's noise) comes
from a generator seeded by (seed, i), so image i is the same whatever the batch size, the task mix
or the number of workers that produce it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffscaler.config import DiffusionConfig

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> model output


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    # DiT / ADM scale the 1000-step endpoints for other step counts.
    scale = 1000 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


@dataclass(frozen=True)
class Schedule:
    """Betas over a (possibly respaced) subset of the training timesteps."""

    betas: torch.Tensor  # (S,) float64
    timesteps: torch.Tensor  # (S,) the original training timestep each index stands for

    def __post_init__(self) -> None:
        alphas = 1.0 - self.betas
        ac = torch.cumprod(alphas, 0)
        ac_prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "alphas_cumprod_prev", ac_prev)
        # Square roots taken in float64, as the reference does, and cast to float32 only when gathered:
        # sqrt(1 - alphabar) from a float32 alphabar loses ~1e-4 relative near t=0 (1 - 0.9999).
        object.__setattr__(self, "sqrt_alphas_cumprod", torch.sqrt(ac))
        object.__setattr__(self, "sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - ac))
        object.__setattr__(self, "sqrt_recip_alphas_cumprod", torch.sqrt(1.0 / ac))
        object.__setattr__(self, "sqrt_recipm1_alphas_cumprod", torch.sqrt(1.0 / ac - 1))
        post_var = self.betas * (1.0 - ac_prev) / (1.0 - ac)
        object.__setattr__(self, "posterior_variance", post_var)
        # log of posterior variance, with the t=0 entry (0) replaced by the next one (as in ADM)
        clipped = torch.cat([post_var[1:2], post_var[1:]]) if len(post_var) > 1 else self.betas.clone()
        object.__setattr__(self, "posterior_log_variance_clipped", torch.log(clipped))
        object.__setattr__(self, "posterior_mean_coef1", self.betas * torch.sqrt(ac_prev) / (1.0 - ac))
        object.__setattr__(self, "posterior_mean_coef2", (1.0 - ac_prev) * torch.sqrt(alphas) / (1.0 - ac))
        object.__setattr__(self, "log_betas", torch.log(self.betas))
        # fixed "large" variance: beta, with the posterior's at t=0 (as in DiT's fixed-sigma runs)
        fixed = torch.cat([post_var[1:2], self.betas[1:]]) if len(post_var) > 1 else self.betas
        object.__setattr__(self, "log_fixed_variance", torch.log(fixed))
        object.__setattr__(self, "_on_device", {})

    def gather(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Table `name` at indices t (N,) -> (N, 1, ..., 1) float32 on t's device.

        Device copies are made once and kept: a host-to-device copy per call would sync the GPU
        several times per training step.
        """
        key = (name, t.device)
        table = self._on_device.get(key)
        if table is None:
            table = getattr(self, name).float().to(t.device)
            self._on_device[key] = table
        return table[t].view(-1, *([1] * (ndim - 1)))

    @property
    def num_steps(self) -> int:
        return len(self.betas)


class GaussianDiffusion:
    def __init__(
        self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, learn_sigma: bool = False
    ):
        self.num_timesteps = num_timesteps
        self.learn_sigma = learn_sigma
        betas = torch.from_numpy(linear_betas(num_timesteps, beta_start, beta_end))
        self.schedule = Schedule(betas, torch.arange(num_timesteps))

    @classmethod
    def from_config(cls, cfg: DiffusionConfig, learn_sigma: bool = False) -> GaussianDiffusion:
        return cls(cfg.num_timesteps, cfg.beta_start, cfg.beta_end, learn_sigma)

    # -- forward process --------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        s, nd = self.schedule, x0.dim()
        return s.gather("sqrt_alphas_cumprod", t, nd) * x0 + s.gather("sqrt_one_minus_alphas_cumprod", t, nd) * noise

    def sample_timesteps(
        self, n: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device, generator=generator)

    # -- loss -------------------------------------------------------------------------------------
    def training_losses(
        self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses (N,): `loss` = `mse` (+ `vb` when sigma is learned)."""
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model_fn(x_t, t)  # (N, C or 2C, H, W)
        c = x0.shape[1]
        eps = out[:, :c]
        mse = ((eps.float() - noise.float()) ** 2).mean(dim=(1, 2, 3))  # (N,)
        terms = {"mse": mse}
        if self.learn_sigma:
            # The VB term trains only the variance: the mean goes through a stop-gradient (IDDPM).
            frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
            terms["vb"] = self._vb_terms(self.schedule, frozen, x0, x_t, t)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def _vb_terms(
        self, s: Schedule, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        nd = x0.dim()
        true_mean = s.gather("posterior_mean_coef1", t, nd) * x0 + s.gather("posterior_mean_coef2", t, nd) * x_t
        true_logvar = s.gather("posterior_log_variance_clipped", t, nd)
        mean, logvar, _ = self.p_mean_variance(s, out, x_t, t, clip_denoised=False)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)  # bits per dim, (N,)

    # -- reverse process --------------------------------------------------------------------------
    def p_mean_variance(
        self, s: Schedule, out: torch.Tensor, x_t: torch.Tensor, idx: torch.Tensor, clip_denoised: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, log-variance and predicted x0 of p(x_{prev} | x_t); `idx` indexes `s`."""
        nd = x_t.dim()
        c = x_t.shape[1]
        eps = out[:, :c].float()
        if self.learn_sigma:
            # Output v in [-1, 1] interpolates between log beta and the posterior's log variance.
            min_log = s.gather("posterior_log_variance_clipped", idx, nd)
            max_log = s.gather("log_betas", idx, nd)
            frac = (out[:, c:].float() + 1) / 2
            logvar = frac * max_log + (1 - frac) * min_log
        else:
            logvar = s.gather("log_fixed_variance", idx, nd).expand_as(x_t)
        # x0 = x_t / sqrt(alphabar) - sqrt(1 / alphabar - 1) eps, from the float64 tables (the reference's)
        recip = s.gather("sqrt_recip_alphas_cumprod", idx, nd)
        recipm1 = s.gather("sqrt_recipm1_alphas_cumprod", idx, nd)
        x0 = recip * x_t - recipm1 * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean = s.gather("posterior_mean_coef1", idx, nd) * x0 + s.gather("posterior_mean_coef2", idx, nd) * x_t
        return mean, logvar, x0

    def respaced(self, steps: int) -> Schedule:
        """A schedule over `steps` evenly spaced training timesteps (ADM's respacing)."""
        use = space_timesteps(self.num_timesteps, steps)
        ac = self.schedule.alphas_cumprod
        last, betas = 1.0, []
        for i in use:
            betas.append(1 - ac[i].item() / last)
            last = ac[i].item()
        return Schedule(torch.tensor(betas, dtype=torch.float64), torch.tensor(use))

    def sample(
        self,
        model_fn: ModelFn,
        noise_source: SampleNoise,
        *,
        steps: int,
        sampler: str = "ddim",
        eta: float = 0.0,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """Run the reverse process from `noise_source`'s starting noise; returns x_0 (N, C, H, W)."""
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        s = self.respaced(steps)
        x = noise_source.initial()
        n = x.shape[0]
        for k, i in enumerate(reversed(range(s.num_steps))):
            idx = torch.full((n,), i, device=x.device, dtype=torch.long)
            t = s.timesteps.to(x.device)[idx]  # the model sees original timesteps
            with torch.no_grad():
                out = model_fn(x, t)
            mean, logvar, x0 = self.p_mean_variance(s, out, x, idx, clip_denoised)
            if sampler == "ddpm":
                z = noise_source.step(k) if i > 0 else torch.zeros_like(x)
                x = mean + torch.exp(0.5 * logvar) * z
            else:
                x = self._ddim_step(s, out, x, x0, idx, i, eta, noise_source, k)
        return x

    def _ddim_step(
        self,
        s: Schedule,
        out: torch.Tensor,
        x: torch.Tensor,
        x0: torch.Tensor,
        idx: torch.Tensor,
        i: int,
        eta: float,
        noise_source: SampleNoise,
        k: int,
    ) -> torch.Tensor:
        nd = x.dim()
        ac = s.gather("alphas_cumprod", idx, nd)
        ac_prev = s.gather("alphas_cumprod_prev", idx, nd)
        # eps re-derived from the (possibly clipped) x0, from the float64 tables (the reference's)
        recip = s.gather("sqrt_recip_alphas_cumprod", idx, nd)
        recipm1 = s.gather("sqrt_recipm1_alphas_cumprod", idx, nd)
        eps = (recip * x - x0) / recipm1
        sigma = eta * ((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)).sqrt()
        mean = x0 * ac_prev.sqrt() + (1 - ac_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i > 0:
            return mean + sigma * noise_source.step(k)
        return mean


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The training timesteps a `steps`-step sampler uses, exactly as the reference's `space_timesteps`
    (ADM / facebookresearch/DiT respace.py, one section) picks them: a fractional stride accumulated
    in float and rounded (Python's round) at each step. Rounding a linspace instead picks a timestep one
    off for 278 of the counts 1..1000 (21, 23, 31, ...)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {num_timesteps}], got {steps}")
    stride = 1 if steps <= 1 else (num_timesteps - 1) / (steps - 1)
    taken, cur = [], 0.0
    for _ in range(steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


class SampleNoise:
    """All random draws of a batch, each sample's from its own (seed, index) generator."""

    def __init__(
        self,
        seed: int,
        indices: Sequence[int],
        shape: tuple[int, ...],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
        sample_seeds: Sequence[int] | None = None,
    ):
        """`sample_seeds` (one 63-bit seed per sample) replaces the (seed, index) derivation."""
        self.shape = shape  # (C, H, W)
        self.device = device
        self.dtype = dtype
        seeds = sample_seeds if sample_seeds is not None else [per_sample_seed(seed, i) for i in indices]
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def _draw(self) -> torch.Tensor:
        # Generated on the CPU so the numbers do not depend on the device either.
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device, self.dtype)

    def initial(self) -> torch.Tensor:
        return self._draw()  # (N, C, H, W)

    def step(self, k: int) -> torch.Tensor:
        return self._draw()  # draws advance each sample's own generator in step order


def per_sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of run `seed` (SeedSequence: well mixed, no collisions)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------------------
# Gaussian helpers (for the VB term)
# ------------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] discretised to 256 bins (ADM)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
