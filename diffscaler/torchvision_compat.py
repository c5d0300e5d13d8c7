"""The one way this project imports torch-fidelity: `import_torch_fidelity()`.

Why this module exists: PyPI's torchvision 0.28.0 (the release that matches torch 2.13.0) is a CUDA
build. Beside the CPU torch its compiled library `_C.so` does not load, and `import torchvision`
then fails in `torchvision/_meta_registrations.py` with
`RuntimeError: operator torchvision::nms does not exist` (that file registers meta kernels for the
C++ ops that were never loaded). torch-fidelity imports torchvision at import time but only uses
pure-Python parts of it (transforms, datasets, the vgg16 definition).

The fix, active only when needed: before the first torchvision import, try loading torchvision's
compiled library ourselves. If it loads (a matching CPU build, or any CUDA machine) nothing is
changed. Only if it fails do we register an empty module under `torchvision._meta_registrations`, so
the import skips the meta kernels of ops that do not exist; torchvision's C++ ops (nms, roi_align)
then raise torchvision's own "Couldn't load custom C++ ops" error if anyone calls them.

Every import of torch_fidelity in diffscaler goes through `import_torch_fidelity()`, and diffusers through
`diffscaler.vae.import_diffusers` (which calls `ensure_torchvision_importable()` first).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
import types
from typing import Any

_STUB_NAME = "torchvision._meta_registrations"
_state: dict[str, Any] = {"checked": False, "stubbed": False, "reason": ""}


def _compiled_library_loads() -> tuple[bool, str]:
    """Try to load torchvision's `_C` library without importing torchvision (whose import is what fails)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True, "torchvision is not installed (nothing to patch)"
    folder = list(spec.submodule_search_locations)[0]
    candidates = sorted(glob.glob(os.path.join(folder, "_C.*so")) + glob.glob(os.path.join(folder, "_C.pyd")))
    if not candidates:
        return False, f"no compiled library _C in {folder}"
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError) as err:
        return False, f"{candidates[0]} does not load beside torch {torch.__version__}: {err}"
    return True, f"{candidates[0]} loaded"


def ensure_torchvision_importable() -> bool:
    """Make `import torchvision` work; returns True when the empty-module workaround was needed."""
    if _state["checked"]:
        return bool(_state["stubbed"])
    _state["checked"] = True
    if "torchvision" in sys.modules:  # already imported successfully by someone else: leave it alone
        _state["reason"] = "torchvision was already imported"
        return False
    ok, reason = _compiled_library_loads()
    _state["reason"] = reason
    if not ok:
        # torchvision's compiled ops are unusable here; skip registering meta kernels for them.
        doc = "empty: torchvision's C++ ops are unavailable here (see diffscaler.torchvision_compat)"
        sys.modules[_STUB_NAME] = types.ModuleType(_STUB_NAME, doc)
        _state["stubbed"] = True
    return bool(_state["stubbed"])


def workaround_status() -> dict[str, Any]:
    """Whether the workaround is active and why (for logs and tests)."""
    return {"stubbed": bool(_state["stubbed"]), "reason": _state["reason"], "checked": bool(_state["checked"])}


def import_torch_fidelity() -> types.ModuleType:
    """`import torch_fidelity`, after making torchvision importable beside a CPU torch."""
    ensure_torchvision_importable()
    import torch_fidelity

    return torch_fidelity
