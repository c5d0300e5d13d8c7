"""The multi-task bank file: every task's adapter of one method in one safetensors file.

    DIR/bank.safetensors   tensors keyed "<task>/<tensor key of that task's adapter file>"
    DIR/bank.json          {"format": "diffscaler-adapter-bank", "format_version": 1, "method", "backbone_hash",
                            "tasks": [<the per-task adapter JSON>, ...]}   (bank order = list order)

It is assembled from the per-task files `<task>.safetensors` + `<task>.json` (which stay the unit a
fine-tune writes and a rerun checks), so loading the bank gives exactly the tensors of the per-task
files: `load_bank(model, "DIR/bank.json", hash)` equals `artifacts.load_adapters(model, [files], hash)`.
Pure torch + safetensors; no Ray.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from diffscaler.adapters import AdapterBank, AdapterLoadError, TaskInfo
from diffscaler.artifacts import BANK_FORMAT, BANK_FORMAT_VERSION, read_adapter_file, read_format_json, write_file_pair
from diffscaler.models.dit import DiT

BANK_STEM = "bank"


def save_bank(adapter_files: Sequence[str | Path], out_dir: str | Path, stem: str = BANK_STEM) -> tuple[Path, Path]:
    """Bundle per-task adapter files (one method, one backbone) into `<out_dir>/<stem>.safetensors` + `.json`."""
    if not adapter_files:
        raise ValueError("save_bank: no adapter files given")
    metas: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    for f in adapter_files:
        meta, state = read_adapter_file(f)
        metas.append(meta)
        tensors.update({f"{meta['task']}/{k}": v for k, v in state.items()})
    for key in ("method", "backbone_hash", "targets"):
        values = {json.dumps(m[key]) for m in metas}
        if len(values) > 1:
            raise ValueError(
                f"save_bank: adapters disagree on {key} ({sorted(values)}); one bank holds one "
                "method, one target set and one backbone"
            )
    names = [m["task"] for m in metas]
    if len(set(names)) != len(names):
        raise ValueError(f"save_bank: task names repeat: {names}")
    manifest = {
        "format": BANK_FORMAT,
        "format_version": BANK_FORMAT_VERSION,
        "method": metas[0]["method"],
        "backbone_hash": metas[0]["backbone_hash"],
        "tasks": metas,
    }
    st_path = Path(out_dir) / f"{stem}.safetensors"
    write_file_pair(tensors, st_path, manifest, {"format": BANK_FORMAT})  # JSON last: never a manifest alone
    js_path = st_path.with_suffix(".json")
    return st_path, js_path


def read_bank(path: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """(manifest, {task: that task's adapter tensors}) from `bank.json` or `bank.safetensors`."""
    p = Path(path)
    js_path, st_path = p.with_suffix(".json"), p.with_suffix(".safetensors")
    for need in (js_path, st_path):
        if not need.is_file():
            raise AdapterLoadError(f"bank file not found: {need}")
    manifest = read_format_json(js_path, BANK_FORMAT, BANK_FORMAT_VERSION, "adapter bank", AdapterLoadError)
    flat = load_file(str(st_path))
    states: dict[str, dict[str, torch.Tensor]] = {m["task"]: {} for m in manifest["tasks"]}
    for key, value in flat.items():
        task, _, inner = key.partition("/")
        if task not in states:
            raise AdapterLoadError(f"{st_path}: tensor {key!r} belongs to no task listed in {js_path.name}")
        states[task][inner] = value
    return manifest, states


def load_bank(model: DiT, path: str | Path, backbone_hash: str | None, tasks: Sequence[str] = ()) -> AdapterBank:
    """Attach the bank file's tasks (all, or `tasks` in that order) to `model`."""
    manifest, states = read_bank(path)
    if backbone_hash is not None and manifest["backbone_hash"] != backbone_hash:
        raise AdapterLoadError(
            f"{path}: trained on backbone {manifest['backbone_hash']!r}, but the loaded "
            f"backbone is {backbone_hash!r}; adapters only work on their own backbone"
        )
    by_name = {m["task"]: m for m in manifest["tasks"]}
    wanted = list(tasks) or list(by_name)
    unknown = [t for t in wanted if t not in by_name]
    if unknown:
        raise AdapterLoadError(f"{path}: no task(s) {unknown}; the bank holds {list(by_name)}")
    metas = [by_name[t] for t in wanted]
    model_meta = metas[0].get("model", {})
    for key in ("name", "input_size", "in_channels", "learn_sigma"):
        if model_meta.get(key) != getattr(model.config, key):
            raise AdapterLoadError(
                f"{path}: model {key}={model_meta.get(key)!r} differs from the backbone's "
                f"{getattr(model.config, key)!r}"
            )
    infos = [
        TaskInfo(m["task"], m["num_classes"], m["conditional"], m["rank"], tuple(m.get("class_names", ())))
        for m in metas
    ]
    bank = AdapterBank.attach(
        model, infos, method=manifest["method"], rank=max(t.rank for t in infos), targets=tuple(metas[0]["targets"])
    )
    for i, m in enumerate(metas):
        bank.load_task_state(i, states[m["task"]], f"{path}[{m['task']}]")
    return bank
