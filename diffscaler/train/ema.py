"""Exponential moving average of the trainable weights, in fp32, correct under every ZeRO stage.

    ema = EmaWeights(engine.module, decay=0.999)   # after deepspeed.initialize
    ema.update()                                   # after each optimizer step, on every rank
    full = ema.full_state()                        # collective: every rank calls it
    ema.load_full_state(full, num_updates)         # on resume, on every rank

Stages 0-2 keep whole weights on every rank, so every rank keeps the whole EMA (identical on all,
no communication). Under ZeRO-3 a rank holds only its partition of each parameter
(`param.ds_tensor`, flat, padded at the end), so it keeps the EMA of exactly that partition: the
update needs no communication and EMA memory shrinks with the world size, as the weights do.
`full_state` all-gathers the partitions (one flat collective) to rebuild whole tensors, and
`load_full_state` cuts each rank's partition back out, so the saved EMA is independent of the world
size. Frozen parameters and buffers are not averaged.

The decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates: with a fixed 0.9999 a
short run's EMA would still be mostly the random initialisation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def effective_decay(decay: float, num_updates: int) -> float:
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


class EmaWeights:
    """fp32 EMA of `module`'s trainable parameters (whole, or this rank's ZeRO-3 partitions)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("EMA: the module has no trainable parameters")
        self.decay = decay
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        # DeepSpeed ZeRO-3 marks every parameter it partitions with `ds_tensor`.
        self.partitioned = all(hasattr(p, "ds_tensor") for p in self.params)
        self.shadow = [self._local(p).detach().float().clone() for p in self.params]
        self.num_updates = 0

    def _local(self, param: torch.nn.Parameter) -> torch.Tensor:
        # (partition_numel,) flat under ZeRO-3; the whole tensor otherwise
        return param.ds_tensor if self.partitioned else param.data

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - effective_decay(self.decay, self.num_updates)
        current = [self._local(p).float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)
        self.num_updates += 1

    @torch.no_grad()
    def full_state(self) -> dict[str, torch.Tensor]:
        """Whole fp32 EMA tensors on CPU, keyed like `module.named_parameters()`. Collective under ZeRO-3."""
        if not self.partitioned:
            return {n: s.detach().cpu().clone() for n, s in zip(self.names, self.shadow)}
        world = dist.get_world_size()
        local = torch.cat([s.reshape(-1) for s in self.shadow])  # same length on every rank
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        gathered = [g.cpu() for g in gathered]
        out, offset = {}, 0
        for name, param, shadow in zip(self.names, self.params, self.shadow):
            size = shadow.numel()
            self._check_layout(name, param, size, world)
            whole = torch.cat([g[offset : offset + size] for g in gathered])  # (world * size,) padded
            out[name] = whole[: param.ds_numel].view(param.ds_shape).clone()
            offset += size
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        """Set the EMA from whole tensors (as `full_state` returns); each rank keeps its own part."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[:3]}")
        rank = dist.get_rank() if self.partitioned else 0
        world = dist.get_world_size() if self.partitioned else 1
        for i, (name, param) in enumerate(zip(self.names, self.params)):
            whole = state[name].float()
            if not self.partitioned:
                if whole.shape != self.shadow[i].shape:
                    raise ValueError(f"EMA {name}: shape {tuple(whole.shape)}, model has {tuple(self.shadow[i].shape)}")
                self.shadow[i].copy_(whole)
                continue
            size = self.shadow[i].numel()
            self._check_layout(name, param, size, world)
            flat = whole.reshape(-1)
            if flat.numel() != param.ds_numel:
                raise ValueError(f"EMA {name}: {flat.numel()} elements, model has {param.ds_numel}")
            part = torch.zeros(size, dtype=torch.float32)
            lo, hi = min(rank * size, flat.numel()), min((rank + 1) * size, flat.numel())
            part[: hi - lo] = flat[lo:hi]
            self.shadow[i].copy_(part)
        self.num_updates = num_updates

    @staticmethod
    def _check_layout(name: str, param: torch.nn.Parameter, size: int, world: int) -> None:
        # ZeRO-3 gives rank r the flat range [r * size, (r + 1) * size) of every parameter,
        # zero-padded at the end, with size = ceil(numel / world) over all ranks.
        expected = -(-param.ds_numel // world)
        if size != expected:
            raise RuntimeError(
                f"EMA {name}: partition holds {size} elements, expected ceil({param.ds_numel} / {world}) = "
                f"{expected}; parameters must be partitioned over all ranks"
            )
