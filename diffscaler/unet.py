"""The U-Net baseline's constructor: diffusers' UNet2DModel (imported through the torchvision shim) in the
core's `ClassUNet` (diffscaler.models.unet, which imports no diffusers itself: see its docstring).

    model = build_unet(ModelConfig(arch="unet", name="UNet-T", input_size=32, num_classes=22), seed=0)
"""

from __future__ import annotations

import torch

from diffscaler.config import ModelConfig
from diffscaler.models.unet import ClassUNet
from diffscaler.vae import import_diffusers


def build_unet(config: ModelConfig, seed: int | None = None) -> ClassUNet:
    """A ClassUNet with diffusers' initialisation (seeded when `seed` is given)."""
    unet_class = import_diffusers().UNet2DModel
    if seed is None:
        return ClassUNet(config, unet_class)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClassUNet(config, unet_class)
