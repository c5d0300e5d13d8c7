"""FID/KID evaluation: a Ray actor pool that samples (task, adapter) requests, scored with torch-fidelity.

    from diffscaler.eval import FidEvaluator, request_for_task, format_table
    with FidEvaluator("runs/backbone/backbone.safetensors", cfg) as ev:   # after ray.init()
        print(format_table(ev.evaluate([request_for_task(cfg, "emoji", "adapters/emoji.safetensors")])))

    python -m ray_jobs.evaluate --config ray_jobs/configs/tiny.yaml --backbone FILE --adapters DIR --out DIR2

Modules: features (feature networks registered with torch-fidelity), stats (reference-statistics cache,
FID/KID), pool (`FidEvaluator`), fidelity (condition fidelity of spatially conditioned tasks: edge F1,
mask IoU, ceiling and mismatched rows). torch-fidelity is imported only through diffscaler.torchvision_compat.
Importing this package is cheap: names load on first use (torch, Ray and torch-fidelity are heavy).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FidEvaluator": "pool",
    "FidWorker": "pool",
    "EvalRequest": "pool",
    "EvalResult": "pool",
    "request_for_task": "pool",
    "requests_for_adapter_dir": "pool",
    "format_table": "pool",
    "write_fid_json": "pool",
    "EvalInputError": "stats",
    "ReferenceStats": "stats",
    "reference_stats": "stats",
    "fid_from_features": "stats",
    "kid_from_features": "stats",
    "frechet_distance": "stats",
    "feature_statistics": "stats",
    "FeatureWeightsError": "features",
    "build_feature_extractor": "features",
    "extract_features": "features",
    "import_torch_fidelity": "torchvision_compat",
    "FidelityScore": "fidelity",
    "condition_fidelity": "fidelity",
    "mismatched_fidelity": "fidelity",
    "reference_rows": "fidelity",
    "edge_f1": "fidelity",
    "mask_iou": "fidelity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'diffscaler.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"diffscaler.eval.{_EXPORTS[name]}"), name)
