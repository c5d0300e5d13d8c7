"""Kept for callers of the old place: the torchvision shim is `diffscaler.torchvision_compat` (a ground-floor
module: vae.py needs it as much as the evaluator)."""

from diffscaler.torchvision_compat import ensure_torchvision_importable, import_torch_fidelity, workaround_status

__all__ = ["ensure_torchvision_importable", "import_torch_fidelity", "workaround_status"]
