"""The condition path: how a task's spatial map (edges, a mask, depth) enters the frozen DiT.

Our design (the paper does not document how its maps enter the model). Each conditional task owns

    ConditionEmbedding   (affiner, difffit, lora, bitfit, full): a patch embedding of the map, added to the
                         token embeddings (h = x_embedder(x) + pos + E_t(map)); optionally also to each
                         later block's input through per-block, per-channel gates g_t,i (start at 1):
                         h_i += g_t,i ⊙ E_t(map). Its output layer starts at zero, so an untrained
                         conditional task is the backbone exactly, whatever the map.
    ControlBranch        (controlnet, the baseline; PixArt-α's ControlNet-Transformer design): a trainable
                         copy of the first N blocks, fed with h + E_t(map); the output of copy i goes
                         through a zero-initialised linear layer and is added to frozen block i's output.

E_t is the backbone's patch size on a pixel-resolution map (a p x p stride-p conv). For a latent (VAE)
backbone the map stays at pixel resolution, `factor` = map side / the DiT's input side (8 for the SD
VAE) times larger, and a small strided stem (3x3 convs, stride 2, SiLU) brings it to the latent grid
first: log2(factor) stride-2 convs, then the p x p conv to the token width.

Maps are float (N, C, S, S) in [-1, 1], as the readers and `diffscaler.data.conditions.maps_to_unit`
give them. The embedding does not depend on t: `AdapterBank.embed_condition` computes it once per
sampling call (a `ConditionTokens`), and each step only adds it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from diffscaler.models.dit import BlockInjection, DiTBlock

STEM_WIDTH = 16  # channels of the latent stem's first conv; doubled by each stride-2 conv, at most STEM_MAX
STEM_MAX = 128


def stem_factor(map_size: int, input_size: int) -> int:
    """The map's pixels per DiT input cell: 1 for a pixel backbone, the VAE's factor (a power of two) for a
    latent one. ValueError when the map's side does not fit the model."""
    factor, rest = divmod(map_size, input_size)
    if rest or factor < 1 or factor & (factor - 1):
        raise ValueError(
            f"a {map_size} px condition map does not fit a DiT of input side {input_size}: "
            "the map's side must be the input side times a power of two (1 for pixels, "
            "8 for an SD VAE's latents)"
        )
    return factor


class ConditionStem(nn.Module):
    """Map (N, C, S, S) -> tokens (N, L, D) on the DiT's token grid; the last conv starts at zero."""

    def __init__(self, channels: int, hidden_size: int, patch_size: int, factor: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = channels
        if factor > 1:
            layers += [nn.Conv2d(channels, STEM_WIDTH, 3, padding=1), nn.SiLU()]
            width = STEM_WIDTH
            for _ in range(factor.bit_length() - 1):  # log2(factor) halvings
                nxt = min(2 * width, STEM_MAX)
                layers += [nn.Conv2d(width, nxt, 3, stride=2, padding=1), nn.SiLU()]
                width = nxt
        self.stem = nn.Sequential(*layers)  # (N, W, S/f, S/f); empty for a pixel backbone
        self.proj = nn.Conv2d(width, hidden_size, kernel_size=patch_size, stride=patch_size)
        nn.init.zeros_(self.proj.weight)  # zero output: the task is the backbone until it trains
        nn.init.zeros_(self.proj.bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        h = self.stem(cond.to(self.proj.weight.dtype))  # (N, W, S/f, S/f)
        return self.proj(h).flatten(2).transpose(1, 2)  # (N, L, D)


class ConditionEmbedding(nn.Module):
    """One task's map embedding, and its per-block gates when the map also enters each block's input."""

    def __init__(self, channels: int, hidden_size: int, patch_size: int, factor: int, depth: int, into_blocks: bool):
        super().__init__()
        self.embed = ConditionStem(channels, hidden_size, patch_size, factor)
        # (depth - 1, D) gates of blocks 1.. (block 0's input is the token embedding itself)
        self.gates = nn.Parameter(torch.ones(depth - 1, hidden_size)) if into_blocks else None


class ControlBranch(nn.Module):
    """One task's ControlNet: its map stem, trainable copies of the first N frozen blocks and the zero
    linears that add each copy's output to the frozen block's."""

    def __init__(self, channels: int, hidden_size: int, patch_size: int, factor: int, blocks: Sequence[DiTBlock]):
        super().__init__()
        self.embed = ConditionStem(channels, hidden_size, patch_size, factor)
        self.blocks = nn.ModuleList(copy.deepcopy(b) for b in blocks)  # start as the frozen blocks
        self.outs = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in blocks)
        for lin in self.outs:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.requires_grad_(True)


@dataclass(frozen=True)
class ConditionTokens:
    """A batch's maps, embedded (once per sampling call: the embedding does not depend on t)."""

    ids: torch.Tensor  # (N,) long: each row's task
    mask: torch.Tensor  # (N,) bool: rows whose task takes a map and that use it
    tokens: torch.Tensor | None  # (N, L, D) each row's embedded map, exact zeros off `mask`; None: no row has one

    def __len__(self) -> int:
        return self.ids.shape[0]

    def take(self, order: torch.Tensor) -> ConditionTokens:
        return ConditionTokens(self.ids[order], self.mask[order], None if self.tokens is None else self.tokens[order])

    def without_map(self) -> ConditionTokens:
        """The same rows with no map (the unconditioned branch of condition guidance)."""
        return ConditionTokens(self.ids, torch.zeros_like(self.mask), None)

    @staticmethod
    def cat(parts: Sequence[ConditionTokens]) -> ConditionTokens:
        like = next((p.tokens for p in parts if p.tokens is not None), None)
        tokens = (
            None
            if like is None
            else torch.cat(
                [p.tokens if p.tokens is not None else like.new_zeros(len(p), *like.shape[1:]) for p in parts]
            )
        )
        return ConditionTokens(torch.cat([p.ids for p in parts]), torch.cat([p.mask for p in parts]), tokens)


class TokenInjection(BlockInjection):
    """ConditionEmbedding's forward: the tokens into the token embeddings (and gated into blocks 1..)."""

    def __init__(self, cond: ConditionTokens, gates: torch.Tensor | None):
        self.tokens = cond.tokens  # (N, L, D)
        self.gates = gates  # (N, depth - 1, D) each row's task's gates, or None

    def start(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return h + self.tokens.to(h.dtype)  # (N, L, D)

    def before_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        if self.gates is None or i == 0:
            return h
        return h + (self.gates[:, i - 1].unsqueeze(1) * self.tokens).to(h.dtype)  # (N, L, D)


class ControlInjection(BlockInjection):
    """ControlBranch's forward over a batch: each task's copies run on its own rows that use a map."""

    def __init__(self, cond: ConditionTokens, branches: dict[int, ControlBranch]):
        n = len(cond)
        self.runs: list[tuple[ControlBranch, torch.Tensor | None]] = []  # (branch, rows or None = every row)
        for t, branch in branches.items():
            use = cond.mask & (cond.ids == t)
            rows = use.nonzero().flatten()
            if rows.numel() == 0:
                continue
            self.runs.append((branch, None if rows.numel() == n else rows))
        self.tokens = cond.tokens
        self.hc: list[torch.Tensor] = []

    def start(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.hc = [
            (h if rows is None else h[rows]) + (self.tokens if rows is None else self.tokens[rows]).to(h.dtype)
            for _, rows in self.runs
        ]  # each (N_t, L, D)
        return h

    def after_block(self, i: int, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for k, (branch, rows) in enumerate(self.runs):
            if i >= len(branch.blocks):
                continue
            self.hc[k] = branch.blocks[i](self.hc[k], c if rows is None else c[rows])  # (N_t, L, D)
            out = branch.outs[i](self.hc[k]).to(h.dtype)  # (N_t, L, D)
            h = h + out if rows is None else h.index_add(0, rows, out)
        return h
