"""DiT (Peebles & Xie, 2023), pure torch; it knows nothing of adapters.

State-dict keys follow facebookresearch/DiT (`x_embedder.proj`, `t_embedder.mlp.0/2`,
`y_embedder.embedding_table`, `blocks.N.attn.qkv`, `blocks.N.attn.proj`, `blocks.N.mlp.fc1/fc2`,
`blocks.N.adaLN_modulation.1`, `final_layer.adaLN_modulation.1`, `final_layer.linear`, `pos_embed`),
so public checkpoints load as they are (see `diffscaler.artifacts.load_public_dit`).

Every linear layer is a `TaskLinear`: a plain `nn.Linear` whose forward also takes `route`, one
opaque per-sample argument that `DiT.denoise` threads to every linear and the backbone ignores.
Adapters (`diffscaler.adapters`) swap target layers for wrappers with the same call signature and
install their own forward, which gives `route` its meaning (task ids) and calls `denoise`: the ids
reach the wrappers explicitly, without hidden state. `denoise` also takes an optional `BlockInjection`,
one object per forward that may add to the token stream (a task's condition map, a ControlNet's block
outputs); the backbone calls it without knowing what it adds.

Everything that adds into the residual stream starts at zero (adaLN-Zero gates, final layer), so a
fresh model outputs exactly zero and every block is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from diffscaler.config import MODEL_NAME_PATTERN, ModelConfig, validate_model

# Per-sample routing that `denoise` passes, untouched, to every linear layer (the backbone's layers
# ignore it; adapter wrappers read task ids from it). None for the backbone alone.
Route = Any


class BlockInjection:
    """What `denoise` lets a caller add to the token stream (a spatial condition's tokens, a ControlNet's
    outputs), one object per forward. The backbone calls it and knows nothing of what it adds; the
    identity by default."""

    def start(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h  # h (N, L, D) the token embeddings, c (N, D) the conditioning vector

    def before_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return h  # block i's input (N, L, D)

    def after_block(self, i: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h  # block i's output (N, L, D)


# ------------------------------------------------------------------------------------------------
# Size presets
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTSize:
    depth: int  # transformer blocks
    hidden_size: int  # token width D
    num_heads: int  # attention heads (D must divide)


DIT_SIZES = {
    "T": DiTSize(depth=6, hidden_size=192, num_heads=3),  # tiny: for CPU tests and the demo
    "S": DiTSize(depth=12, hidden_size=384, num_heads=6),
    "B": DiTSize(depth=12, hidden_size=768, num_heads=12),
    "L": DiTSize(depth=24, hidden_size=1024, num_heads=16),
    "XL": DiTSize(depth=28, hidden_size=1152, num_heads=16),
}


def parse_preset(name: str) -> tuple[DiTSize, int]:
    """`"DiT-XL/2"` -> (DiTSize(28, 1152, 16), patch 2)."""
    match = MODEL_NAME_PATTERN.fullmatch(name)  # the one preset pattern (config validates with it too)
    if match is None:
        raise ValueError(f"unknown model preset {name!r}; allowed: DiT-{{T,S,B,L,XL}}/{{2,4,8}}")
    return DIT_SIZES[match.group(1)], int(match.group(2))


# ------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------


class TaskLinear(nn.Linear):
    """nn.Linear that accepts (and ignores) a route, so adapters can replace it in place."""

    def forward(self, x: torch.Tensor, route: Route = None) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x (N, L, D); shift, scale (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class AdaLNModulation(nn.Sequential):
    """SiLU then linear. A Sequential so state-dict keys are DiT's `adaLN_modulation.1.*`."""

    def __init__(self, hidden_size: int, num_chunks: int):
        super().__init__(nn.SiLU(), TaskLinear(hidden_size, num_chunks * hidden_size))

    @property
    def linear(self) -> nn.Module:
        return self[1]

    def forward(self, c: torch.Tensor, route: Route = None) -> torch.Tensor:  # type: ignore[override]
        return self[1](self[0](c), route)  # (N, chunks*D)


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies (256) then a 2-layer MLP, as in DiT."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.ModuleList(
            [TaskLinear(frequency_embedding_size, hidden_size), nn.SiLU(), TaskLinear(hidden_size, hidden_size)]
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

    def forward(self, t: torch.Tensor, route: Route = None) -> torch.Tensor:
        h = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        h = h.to(self.mlp[0].weight.dtype)
        h = self.mlp[0](h, route)  # (N, D)
        return self.mlp[2](self.mlp[1](h), route)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row `num_classes` is the null class used by classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def drop_labels(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        drop = torch.rand(y.shape, device=y.device, generator=generator) < self.dropout_prob
        return torch.where(drop, torch.full_like(y, self.null_label), y)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)  # (N, D)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = TaskLinear(dim, 3 * dim)  # fused Q, K, V
        self.proj = TaskLinear(dim, dim)

    def forward(self, x: torch.Tensor, route: Route = None) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x, route).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, L, D/H)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, L, D/H)
        out = out.transpose(1, 2).reshape(n, length, dim)  # (N, L, D)
        return self.proj(out, route)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = TaskLinear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = TaskLinear(hidden, dim)

    def forward(self, x: torch.Tensor, route: Route = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x, route)), route)  # (N, L, D)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor, route: Route = None) -> torch.Tensor:
        # x (N, L, D); c (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c, route).chunk(
            6, dim=1
        )  # each (N, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), route)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp), route)
        return x  # (N, L, D)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = TaskLinear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor, route: Route = None) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c, route).chunk(2, dim=1)  # each (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale), route)  # (N, L, p*p*C_out)


# ------------------------------------------------------------------------------------------------
# Position embedding (fixed 2-D sin-cos, as in MAE / DiT)
# ------------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)  # (grid*grid, D)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ------------------------------------------------------------------------------------------------
# DiT
# ------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Diffusion transformer. `forward(x, t, y)`: the backbone; an attached adapter bank replaces the
    forward with one that takes `task_ids` and calls `denoise` (see `diffscaler.adapters`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        validate_model(config)
        self.config = config
        size, patch = parse_preset(config.name)
        if size.hidden_size % size.num_heads:
            raise ValueError(f"{config.name}: width {size.hidden_size} not divisible by {size.num_heads} heads")
        self.patch_size = patch
        self.in_channels = config.in_channels
        self.out_channels = config.in_channels * (2 if config.learn_sigma else 1)
        self.hidden_size = size.hidden_size
        self.grid_size = config.input_size // patch
        self.grad_checkpointing = False
        # Input checks (NaN, label and task-id ranges) need a host sync; benchmarks may turn them off.
        self.check_inputs = True

        self.x_embedder = PatchEmbed(patch, config.in_channels, size.hidden_size)
        self.t_embedder = TimestepEmbedder(size.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, size.hidden_size, config.class_dropout_prob)
        pos = torch.from_numpy(get_2d_sincos_pos_embed(size.hidden_size, self.grid_size)).float()
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=True)  # (1, L, D), fixed
        self.blocks = nn.ModuleList([DiTBlock(size.hidden_size, size.num_heads) for _ in range(size.depth)])
        self.final_layer = FinalLayer(size.hidden_size, patch, self.out_channels)
        self.initialize_weights()

    # -- init -------------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch and the output start at exactly zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation.linear.weight)
            nn.init.zeros_(block.adaLN_modulation.linear.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation.linear.weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation.linear.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # -- shapes -----------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), the layout `final_layer` emits."""
        n, c, h, w = x.shape
        p = self.patch_size
        x = x.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W)."""
        c, p, g = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    # -- forward ----------------------------------------------------------------------------------
    def check_batch(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """Shapes and finite values of one batch (labels are checked by whoever embeds them)."""
        n = x.shape[0]
        expected = (self.in_channels, self.config.input_size, self.config.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x has shape {tuple(x.shape)}; this model takes (N, {', '.join(map(str, expected))})")
        if t.shape != (n,) or y.shape != (n,):
            raise ValueError(f"t and y must have shape ({n},); got {tuple(t.shape)} and {tuple(y.shape)}")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values")

    def embed_labels(self, y: torch.Tensor) -> torch.Tensor:
        """Backbone class labels (N,) -> (N, D); -1 or `num_classes` is the null class (guidance)."""
        if self.check_inputs and y.numel() and (int(y.min()) < -1 or int(y.max()) > self.y_embedder.num_classes):
            raise ValueError(
                f"class labels must be in [0, {self.y_embedder.num_classes}] "
                f"({self.y_embedder.num_classes} or -1 = null); got [{int(y.min())}, {int(y.max())}]"
            )
        y = torch.where(y < 0, self.y_embedder.null_label, y)
        if self.training and self.y_embedder.dropout_prob > 0:
            y = self.y_embedder.drop_labels(y)
        return self.y_embedder(y)  # (N, D)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, task_ids: None = None) -> torch.Tensor:
        """x (N, C, H, W), t (N,) timesteps, y (N,) labels of the backbone's classes -> (N, C_out, H, W)."""
        if task_ids is not None:
            raise ValueError("task_ids were given but this model has no adapters attached")
        if self.check_inputs:
            self.check_batch(x, t, y)
        return self.denoise(x, t, self.embed_labels(y))

    def denoise(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        label_emb: torch.Tensor,
        route: Route = None,
        inject: BlockInjection | None = None,
    ) -> torch.Tensor:
        """x (N, C, H, W), t (N,), label embeddings (N, D) -> (N, C_out, H, W); `route` goes to every linear,
        `inject` (optional) adds to the token stream at the token embedding and around each block."""
        h = self.x_embedder(x) + self.pos_embed  # (N, L, D)
        c = self.t_embedder(t, route) + label_emb  # (N, D)
        if inject is not None:
            h = inject.start(h, c)  # (N, L, D)
        for i, block in enumerate(self.blocks):
            if inject is not None:
                h = inject.before_block(i, h)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, c, route, use_reentrant=False)
            else:
                h = block(h, c, route)  # (N, L, D)
            if inject is not None:
                h = inject.after_block(i, h, c)
        h = self.final_layer(h, c, route)  # (N, L, p*p*C_out)
        return self.unpatchify(h)  # (N, C_out, H, W)

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float, *route: Any
    ) -> torch.Tensor:
        """Classifier-free guidance on ALL output channels of the noise prediction; label -1 is the null
        class (the backbone's and every task's). `route`: passed on to `forward` (an adapter bank's takes
        task ids: an int, or (N,) ids, doubled with the batch).

        (The reference applies it to 3 of 4 latent channels; here every predicted-noise channel is
        guided and, with learned sigma, the variance channels come from the conditional half.)
        """
        if cfg_scale == 1.0:
            return self.forward(x, t, y, *route)
        n = x.shape[0]
        route2 = [torch.cat([r, r]) if isinstance(r, torch.Tensor) else r for r in route]
        out = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, -1)]), *route2)
        cond, uncond = out[:n], out[n:]  # each (N, C_out, H, W)
        eps_c, rest = cond[:, : self.in_channels], cond[:, self.in_channels :]
        eps_u = uncond[:, : self.in_channels]
        eps = eps_u + cfg_scale * (eps_c - eps_u)
        return torch.cat([eps, rest], dim=1)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        self.grad_checkpointing = enabled

    # -- counts -----------------------------------------------------------------------------------
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def flops_per_forward(self) -> int:
        """Multiply-adds per image for one forward pass (the DiT paper's GFLOPs convention)."""
        return model_macs(self.config)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> D-dim tokens (a strided conv, as timm's PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, L, D)


def model_macs(config: ModelConfig) -> int:
    """Analytic multiply-adds of one forward pass per image (attention matmuls included)."""
    size, p = parse_preset(config.name)
    d, length = size.hidden_size, (config.input_size // p) ** 2
    out_c = config.in_channels * (2 if config.learn_sigma else 1)
    per_block = (
        length * d * 3 * d  # qkv
        + 2 * length * length * d  # q @ k^T and attn @ v
        + length * d * d  # out projection
        + 2 * length * d * 4 * d  # mlp fc1 + fc2
        + d * 6 * d  # adaLN modulation (per image, not per token)
    )
    embed = length * p * p * config.in_channels * d + 256 * d + d * d
    final = d * 2 * d + length * d * p * p * out_c
    return size.depth * per_block + embed + final


def build_model(config: ModelConfig, seed: int | None = None) -> DiT:
    if seed is not None:
        torch.manual_seed(seed)
    return DiT(config)
