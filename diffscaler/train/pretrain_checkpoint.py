"""What a pretraining checkpoint folder holds, how to read it back, and the backbone export.

One folder per checkpoint, `<storage_path>/<run_name>/checkpoint_step00000200/`; every rank writes
its part into a temp folder and reports it, and Ray Train merges the parts:

    latest, step00000200/...   DeepSpeed: module states, ZeRO optimizer partitions (one per rank)
    trainer_state.json         rank 0: step, data position, EMA update count, world size, config
    ema.safetensors            rank 0: whole fp32 EMA weights + buffers in DiT key layout
    rng_rank<K>.json           rank K: its torch / CUDA / numpy / python RNG states
    skipped_rank<K>.json       rank K: bad samples it dropped so far, per shard (data.skip_bad_samples)
    metrics.jsonl              rank 0: the metrics history up to this step
    samples.png                rank 0: EMA sample grid, when the step is also a sample step

    export_backbone("runs/ray/pretrain/checkpoint_step00000200", "out/backbone.safetensors")
    export_backbone(..., weights="raw")   # the trained weights themselves (DeepSpeed's zero_to_fp32)

The export does not depend on the world size that trained: the EMA is saved whole, and raw weights
are consolidated from the ZeRO partitions by DeepSpeed's own offline tool. Our files are JSON and
safetensors; DeepSpeed's `.pt` files are read only by DeepSpeed.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffscaler.artifacts import save_backbone
from diffscaler.atomic import write_text_atomic
from diffscaler.config import ModelConfig, from_dict
from diffscaler.data import storage

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.png"
STATE_FORMAT = "diffscaler-pretrain-state"
STATE_FORMAT_VERSION = 1
CHECKPOINT_DIR = re.compile(r"^checkpoint_step(\d{8})$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_step{step:08d}"


def deepspeed_tag(step: int) -> str:
    return f"step{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


def skipped_file(rank: int) -> str:
    return f"skipped_rank{rank}.json"


SKIPPED_FILE = re.compile(r"^skipped_rank\d+\.json$")


def read_skipped(checkpoint_dir: str) -> tuple[int, dict[str, int]]:
    """(bad samples dropped by all ranks up to this checkpoint, {shard: count}); (0, {}) if none were."""
    total, files = 0, {}
    for name in storage.list_names(checkpoint_dir):
        if SKIPPED_FILE.match(name):
            part = json.loads(storage.read_bytes(storage.join(checkpoint_dir, name)))
            total += int(part["count"])
            for url, n in part["files"].items():
                files[url] = files.get(url, 0) + int(n)
    return total, dict(sorted(files.items()))


@dataclass(frozen=True)
class TrainerState:
    """Everything besides DeepSpeed's own files that a resumed run needs (trainer_state.json)."""

    step: int  # optimizer steps completed
    micro_step: int  # data position: micro-batches each rank has consumed (the reader's stream index)
    images_seen: int  # images over all ranks
    ema_updates: int  # EMA updates applied (drives its decay warm-up)
    ema_decay: float  # pretrain.ema_decay the EMA was built with
    world_size: int  # Ray Train workers = DeepSpeed ranks
    zero_stage: int  # ZeRO stage of the DeepSpeed files
    precision: str  # fp32 | bf16
    global_batch_size: int  # images per optimizer step
    grad_accum_steps: int  # micro-batches per optimizer step
    deepspeed_tag: str  # DeepSpeed's tag (sub-folder) inside the checkpoint
    run_name: str  # Ray run name
    model: dict[str, Any]  # ModelConfig as a dict
    shards: dict[str, Any]  # {"url", "content_hash", "num_samples", "class_names"}
    config: dict[str, Any] = field(default_factory=dict)  # the whole ExperimentConfig
    format: str = STATE_FORMAT
    format_version: int = STATE_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> TrainerState:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        if data.get("format") != STATE_FORMAT:
            raise ValueError(f"{where}: not a DiffScaler pretraining state (format={data.get('format')!r})")
        if data.get("format_version", 0) > STATE_FORMAT_VERSION:
            raise ValueError(f"{where}: format version {data['format_version']} is newer than this code reads")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, self.model, "trainer_state.model")


def read_state(checkpoint_dir: str) -> TrainerState:
    url = storage.join(checkpoint_dir, STATE_FILE)
    try:
        text = storage.read_bytes(url).decode()
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint_dir}: no {STATE_FILE}; not a DiffScaler pretraining checkpoint") from None
    return TrainerState.from_json(text, url)


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


def resume_checkpoint(run_dir: str) -> tuple[str, TrainerState] | None:
    """The checkpoint Ray Train hands the workers when the run starts again, or None (a fresh start).

    That is the latest one in Ray's own snapshot (`checkpoint_manager_snapshot.json` in the run folder), not the
    highest folder on disk: a driver stopped (`ray job stop`) after a checkpoint folder was persisted but before
    the controller recorded it leaves a newer folder that Ray does not resume from. No snapshot: Ray starts
    from scratch whatever folders there are. A snapshot of a shape this code does not know (another Ray
    version, which Ray itself refuses): the highest folder, as a best guess.
    """
    try:
        snapshot = json.loads(storage.read_bytes(storage.join(run_dir, RAY_SNAPSHOT)))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return latest_checkpoint(run_dir)
    if not isinstance(snapshot, dict) or "latest_checkpoint_result" not in snapshot:
        return latest_checkpoint(run_dir)
    latest = snapshot["latest_checkpoint_result"]
    if latest is None:
        return None  # the run reported no checkpoint yet
    name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    if not isinstance(name, str) or not CHECKPOINT_DIR.match(name):
        return latest_checkpoint(run_dir)
    url = storage.join(run_dir, name)
    return url, read_state(url)


def latest_checkpoint(run_dir: str) -> tuple[str, TrainerState] | None:
    """The highest-step complete checkpoint folder of a run (local folder or URL), or None.

    A folder counts as complete once trainer_state.json is in it (rank 0 writes it last).
    """
    steps = sorted((int(m.group(1)), name) for name in storage.list_names(run_dir) if (m := CHECKPOINT_DIR.match(name)))
    for _step, name in reversed(steps):
        url = storage.join(run_dir, name)
        if storage.exists(storage.join(url, STATE_FILE)):
            return url, read_state(url)
    return None


# ------------------------------------------------------------------------------------------------
# RNG states (per rank, JSON)
# ------------------------------------------------------------------------------------------------


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    out: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": {
            "keys": np_state[1].tolist(),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = _b64(torch.cuda.get_rng_state())
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def write_json(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, sort_keys=True))


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------


def load_ema_state(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as load_safetensors

    return load_safetensors(storage.read_bytes(storage.join(checkpoint_dir, EMA_FILE)))


def raw_state(checkpoint_dir: str, state: TrainerState) -> dict[str, torch.Tensor]:
    """The trained (non-EMA) weights, consolidated from any ZeRO stage by DeepSpeed's offline tool."""
    if "://" in checkpoint_dir:
        raise ValueError(f"{checkpoint_dir}: raw export reads DeepSpeed files from a local folder; copy it first")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    params = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=state.deepspeed_tag)
    buffers = {k: v for k, v in load_ema_state(checkpoint_dir).items() if k not in params}
    return {**{k: v.float() for k, v in params.items()}, **buffers}


def export_backbone(checkpoint_dir: str, out_path: str | Path, weights: str = "ema") -> str:
    """Write a consolidated `backbone.safetensors` + `backbone.json` from a checkpoint; returns its hash."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    state = read_state(checkpoint_dir)
    tensors = load_ema_state(checkpoint_dir) if weights == "ema" else raw_state(checkpoint_dir, state)
    skipped, skipped_files = read_skipped(checkpoint_dir)
    provenance = {
        "stage": "pretrain",
        "run_name": state.run_name,
        "step": state.step,
        "images_seen": state.images_seen,
        "weights": weights,
        "ema_decay": state.ema_decay if weights == "ema" else None,
        "world_size": state.world_size,
        "zero_stage": state.zero_stage,
        "precision": state.precision,
        "global_batch_size": state.global_batch_size,
        "shards": state.shards,
        "skipped_samples": skipped,  # bad samples dropped (data.skip_bad_samples=true), all ranks, whole run
        "skipped_files": skipped_files,  # {shard: count}
        "checkpoint": str(checkpoint_dir),
    }
    return save_backbone(tensors, out_path, config=state.model_config, provenance=provenance)
