"""FID results: one `EvalResult` per request (every score names its feature network and sample counts),
the printed table and fid.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from diffscaler.atomic import write_text_atomic


@dataclass(frozen=True)
class EvalResult:
    task: str | None  # None = bare backbone
    adapter: str  # adapter file ("" = bare backbone)
    label: str
    status: str  # "ok" | "failed"
    error: str  # the reason when failed
    fid: float | None  # Fréchet distance on `feature_network` features
    kid_mean: float | None  # KID (polynomial kernel, torch-fidelity), mean over subsets
    kid_std: float | None
    feature_network: str  # every score names its feature network...
    num_generated: int  # ...and its sample counts
    num_reference: int
    seconds: float  # wall-clock s from the request's first job to its score
    sample_seconds: float  # actor s spent sampling (summed over chunks)
    feature_seconds: float  # actor s spent in the feature network (generated images)
    seed: int
    steps: int
    sampler: str
    cfg_scale: float
    dataset: str  # shard folder of the reference
    dataset_hash: str  # its index.json content hash
    image_size: int  # side of the compared images
    method: str  # adapter method ("" for the bare backbone)
    rank: int  # adapter rank (0 for the bare backbone)
    features: np.ndarray | None = field(default=None, repr=False, compare=False)  # (N, D) if asked
    # share of the images a nearest-centroid classifier (feature network, fitted on every target's reference
    # images) assigns to this task's dataset; None when not computed
    task_accuracy: float | None = None
    source: str = "generated"  # generated | real (the floor row)
    reference_split: str = "eval"  # the split the images were scored against
    # Spatial conditions (a conditional task's adapter): the kind, whether the images were sampled with maps,
    # and condition fidelity on the generated images against the maps they were given (edge_f1 with 1-px
    # tolerance for canny, mask_iou for mask; None for key: maps, which have no extractor here).
    condition: str = ""  # "" (none) | canny | mask | key:<member>
    conditioned: bool = False
    condition_scale: float = 1.0
    fidelity_metric: str = ""
    fidelity: float | None = None  # mean over the generated images
    fidelity_std: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, features=None))
        d.pop("features")
        return d


def format_table(results: Sequence[EvalResult]) -> str:
    """A fixed-width table: one row per result, units and feature network in the header."""
    net = sorted({r.feature_network for r in results})
    head = (
        f"{'task':<14} {'label':<12} {'method':<8} {'rank':>4} {'FID':>9} {'KID':>10} {'±':>8} "
        f"{'gen':>5} {'ref':>5} {'s':>7}  status"
    )
    lines = [
        f"FID / KID on {', '.join(net)} features (not comparable with Inception FID unless that is the network)",
        head,
        "-" * len(head),
    ]
    conditional = any(r.condition for r in results)
    if conditional:  # condition fidelity on the generated images: edge F1 (canny) or IoU (mask)
        lines[1] = lines[1].replace("  status", " fidelity  status")
        lines[2] = "-" * len(lines[1])
    for r in results:
        fid = f"{r.fid:9.3f}" if r.fid is not None else f"{'-':>9}"
        kid = f"{r.kid_mean:10.5f}" if r.kid_mean is not None else f"{'-':>10}"
        std = f"{r.kid_std:8.5f}" if r.kid_std is not None else f"{'-':>8}"
        status = r.status if r.status == "ok" else f"FAILED: {r.error[:80]}"
        fidelity = ""
        if conditional:
            fidelity = f" {r.fidelity:8.3f}" if r.fidelity is not None else f" {'-':>8}"
        lines.append(
            f"{(r.task or '(backbone)'):<14} {r.label[:12]:<12} {r.method or '-':<8} {r.rank:>4} {fid} {kid} "
            f"{std} {r.num_generated:>5} {r.num_reference:>5} {r.seconds:>7.1f}{fidelity}  {status}"
        )
    return "\n".join(lines)


def write_fid_json(results: Sequence[EvalResult], path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """`{"results": [...], "by_task": {key: result}, **extra}` written atomically (temp name, rename).

    The key is the task name ("(backbone)" for the bare backbone); a task scored several times (methods,
    trials) is keyed "label/task" instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.to_dict() for r in results]
    names = [r["task"] or "(backbone)" for r in rows]
    keys = [f"{r['label']}/{n}" if names.count(n) > 1 else n for r, n in zip(rows, names)]
    if len(set(keys)) < len(keys):  # same task and label twice: fall back to positions
        keys = [f"{i}:{k}" for i, k in enumerate(keys)]
    doc = {
        "format": "diffscaler-fid",
        "format_version": 1,
        "units": {
            "fid": "Fréchet distance on the named feature network's features",
            "kid_mean": "MMD² (poly kernel)",
            "seconds": "s wall-clock",
            "sample_seconds": "actor s",
            "feature_seconds": "actor s",
        },
        **(extra or {}),
        "results": rows,
        "by_task": dict(zip(keys, rows)),
    }
    write_text_atomic(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
