"""Gaussian diffusion (pure torch): schedule, losses, DDPM/DDIM sampling with per-sample seeds."""

from diffscaler.diffusion.gaussian import GaussianDiffusion, SampleNoise, per_sample_seed
from diffscaler.diffusion.sampling import generate, sample_images

__all__ = ["GaussianDiffusion", "SampleNoise", "generate", "per_sample_seed", "sample_images"]
