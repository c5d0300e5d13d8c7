"""DiT backbone (pure torch)."""

from diffscaler.models.dit import DIT_SIZES, DiT, TaskLinear, build_model, model_macs, parse_preset

__all__ = ["DIT_SIZES", "DiT", "TaskLinear", "build_model", "model_macs", "parse_preset"]
