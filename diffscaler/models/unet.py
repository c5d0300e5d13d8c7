"""The CNN baseline: diffusers' `UNet2DModel` (the pinned diffusers, not a hand-written U-Net),
class-conditional through its class embedding, behind the DiT's call `model(x, t, y) -> eps`.

    model = diffscaler.unet.build_unet(ModelConfig(arch="unet", name="UNet-T", input_size=32, num_classes=22))
    eps = model(x, t, y)     # x (N, C, H, W), t (N,), y (N,) labels (-1 = the null row) -> (N, C_out, H, W)

`UNet-T` (block channels 32/64/128, two ResNet layers per level, attention at 16 and 8 px for a 32 px
input) is about the size of DiT-T/4 (`python -m bench.param_shares` prints both). The class table has
one extra null row, the target of label dropout (classifier-free guidance), as the DiT's has.

Per-task adapters over it (bias, scale, full): `diffscaler.adapters.conv`. This core module takes diffusers'
class as an argument: importing diffusers needs the torchvision shim (`diffscaler.vae.import_diffusers`), which
lies above the pure-torch core, so `diffscaler.unet.build_unet` passes it in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffscaler.config import ModelConfig, validate_model
from diffscaler.models.dit import DiT


@dataclass(frozen=True)
class UNetSize:
    block_out_channels: tuple[int, ...]  # channels per resolution level (each after the first halves the side)
    layers_per_block: int  # ResNet layers per level
    norm_groups: int  # GroupNorm groups (divides every level's channels)


UNET_SIZES = {
    "UNet-T": UNetSize((32, 64, 128), 2, 16),  # ~4.0 M at 22 classes: DiT-T/4's 4.2 M
    "UNet-S": UNetSize((64, 128, 256), 2, 32),
}
# Attention at the two lower levels (as DDPM's 32 px U-Net), plain ResNet blocks at full resolution.
DOWN_BLOCKS = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
UP_BLOCKS = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
HEAD_DIM = 32


class ClassUNet(nn.Module):
    """A class-conditional UNet2DModel with the DiT's forward signature and label conventions."""

    def __init__(self, config: ModelConfig, unet_class: type[nn.Module]):
        """`unet_class`: diffusers' UNet2DModel (diffscaler.unet.build_unet imports it)."""
        super().__init__()
        validate_model(config)
        if config.arch != "unet":
            raise ValueError(f"ClassUNet needs model.arch 'unet', got {config.arch!r}")
        self.config = config
        size = UNET_SIZES[config.name]
        out_channels = config.in_channels * (2 if config.learn_sigma else 1)
        self.unet = unet_class(
            sample_size=config.input_size,
            in_channels=config.in_channels,
            out_channels=out_channels,
            block_out_channels=size.block_out_channels,
            layers_per_block=size.layers_per_block,
            down_block_types=DOWN_BLOCKS,
            up_block_types=UP_BLOCKS,
            norm_num_groups=size.norm_groups,
            attention_head_dim=HEAD_DIM,
            num_class_embeds=config.num_classes + 1,  # + the null row
        )
        self.in_channels = config.in_channels
        self.null_label = config.num_classes
        self.dropout_prob = config.class_dropout_prob
        self.check_inputs = True

    def embed_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Labels the class table takes: -1 -> the null row; in training, label dropout to it."""
        y = torch.where(y < 0, self.null_label, y)
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout_prob
            y = torch.where(drop, self.null_label, y)
        return y

    def check_batch(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.input_size
        if x.ndim != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(f"input of shape {tuple(x.shape)}; this U-Net takes (N, {c}, {s}, {s})")
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(f"t {tuple(t.shape)} and y {tuple(y.shape)} must both be ({x.shape[0]},)")
        if bool((y >= self.config.num_classes).any()) or bool((y < -1).any()):
            raise ValueError(f"labels must be in [-1, {self.config.num_classes - 1}] (-1 = the null row)")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, task_ids: None = None) -> torch.Tensor:
        """x (N, C, H, W), t (N,) timesteps, y (N,) labels -> (N, C_out, H, W)."""
        if task_ids is not None:
            raise ValueError("task_ids were given but this model has no adapters attached")
        if self.check_inputs:
            self.check_batch(x, t, y)
        return self.unet(x, t, class_labels=self.embed_labels(y)).sample

    # Classifier-free guidance exactly as the DiT's (label -1 = the null row; task ids passed on to forward).
    forward_with_cfg = DiT.forward_with_cfg

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """diffusers' own activation checkpointing of its blocks."""
        if enabled:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
