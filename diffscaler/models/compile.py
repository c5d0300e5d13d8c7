"""Regional compilation of a DiT: each block compiled in place with torch.compile.

The blocks share one code object, so one graph per variant (train / no-grad, one task / a sorted
mixed batch / per sample, merged) serves all of them, and compile time does not grow with depth.
Used by the fine-tune loop (`finetune.compile`) and by the speed benchmarks.

    compile_blocks(model, "inductor")          # GPU: bf16 kernels fused by inductor
"""

from __future__ import annotations

import torch

from diffscaler.models.dit import DiT

# aot_eager / eager: trace checks without code generation; aot_eager_decomp_partition: inductor's
# decompositions and saved-tensor choices, run eagerly (bench.activation_memory)
COMPILE_BACKENDS = ("inductor", "aot_eager", "aot_eager_decomp_partition", "eager")


def raise_recompile_limits(limit: int = 64) -> None:
    """Each variant is a distinct block graph and each model size another: more than dynamo's default
    of 8 per code object, past which it silently runs eager."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 8 * limit))


def compile_blocks(model: DiT, backend: str = "inductor", fullgraph: bool = False, mode: str | None = None) -> None:
    """Compile each block of `model` in place (static shapes). `mode`: inductor's ("max-autotune",
    "reduce-overhead" = CUDA graphs, ...); None = its default. State-dict keys do not change."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"compile backend {backend!r}: allowed {list(COMPILE_BACKENDS)}")
    raise_recompile_limits()
    for block in model.blocks:
        block.compile(backend=backend, dynamic=False, fullgraph=fullgraph, mode=mode)


def resolve_compile(setting: str, device: torch.device) -> str | None:
    """finetune.compile -> a backend or None: "auto" compiles with inductor on a GPU only (on the
    CPU the first calls' compile time outweighs a short fine-tune)."""
    if setting == "auto":
        return "inductor" if device.type == "cuda" else None
    return None if setting == "off" else setting
