"""FID requests: what to score (a task's adapter, the bare backbone, a task's real images) and against
which shards. `diffscaler.eval.resolve` fills in the defaults and checks them before any work.

    request_for_task(cfg, "emoji", "adapters/emoji.safetensors")   # against emoji's eval split
    request_for_task(cfg, None)                                    # bare backbone, pretraining set
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffscaler.config import ExperimentConfig
from diffscaler.data.build import dataset_dir, pretrain_dataset_dir
from diffscaler.eval.stats import EvalInputError


@dataclass(frozen=True)
class EvalRequest:
    task: str | None  # task name in cfg.data.targets; None = bare backbone on the pretraining set
    adapter_path: str | None = None  # <task>.safetensors (JSON beside it); None = bare backbone
    shards_dir: str = ""  # dataset folder; its eval split is the reference ("" = from cfg.data)
    num_samples: int | None = None  # generated images (None = cfg.eval.num_samples)
    seed: int | None = None  # base of the per-sample seeds (None = cfg.eval.seed)
    steps: int | None = None  # sampler steps (None = cfg.eval.sampling_steps)
    sampler: str | None = None  # ddim | ddpm (None = cfg.diffusion.sampler)
    cfg_scale: float | None = None  # guidance scale (None = cfg.diffusion.cfg_scale)
    num_reference: int | None = None  # reference images (None = cfg.eval.num_reference; 0 = all)
    label: str = ""  # free text echoed in the result (trial id, method)
    # generated: sample the model (no adapter_path with a task: the bare backbone's samples over its classes,
    # scored against the task: the comparison's "no adapter" row); real: the floor - the task's real images
    # of the other split, as many as num_samples allows, scored against the reference split
    source: str = "generated"
    # An adapter of a conditional task samples image k with map k mod N of the reference split's maps and is
    # scored for condition fidelity against them; False samples it without any map (the "no condition" row,
    # still scored against the same maps: what the map buys). Ignored for tasks without a condition.
    conditioned: bool = True
    condition_scale: float | None = None  # guidance on the map (None = diffusion.condition_scale, else 1)


def task_names(cfg: ExperimentConfig) -> list[str]:
    return [t.name for t in cfg.data.targets]


def accuracy_classes(cfg: ExperimentConfig) -> tuple[dict[str, int], list[str]]:
    """The task-accuracy classifier's classes: ({task: class}, [the first task of each class]). A class is a
    source of the targets, so targets built from the same images (emoji and its edge or mask task) are one
    class, not classes that a classifier on image features cannot tell apart."""
    sources = list(dict.fromkeys(t.source_name for t in cfg.data.targets))
    class_of = {t.name: sources.index(t.source_name) for t in cfg.data.targets}
    first = [next(t.name for t in cfg.data.targets if t.source_name == s) for s in sources]
    return class_of, first


def request_for_task(
    cfg: ExperimentConfig, task: str | None, adapter_path: str | None = None, **overrides: Any
) -> EvalRequest:
    """A request whose reference is the task's shard folder under cfg.data.shards_root."""
    if task is None:
        return EvalRequest(task=None, adapter_path=adapter_path, shards_dir=pretrain_dataset_dir(cfg.data), **overrides)
    if task not in task_names(cfg):
        where = f"adapter {adapter_path}: " if adapter_path else ""
        raise EvalInputError(f"{where}task {task!r} is not in data.targets {task_names(cfg)}; no shards to score it on")
    return EvalRequest(task=task, adapter_path=adapter_path, shards_dir=dataset_dir(cfg.data, task), **overrides)


def requests_for_adapter_dir(cfg: ExperimentConfig, adapters_dir: str, **overrides: Any) -> list[EvalRequest]:
    """One request per `<task>.safetensors` in `adapters_dir` (task read from the JSON beside it)."""
    folder = Path(adapters_dir)
    if not folder.is_dir():
        raise EvalInputError(f"adapter folder not found: {folder}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EvalInputError(f"{folder}: no <task>.safetensors adapter files")
    out = []
    for f in files:
        meta_path = f.with_suffix(".json")
        if not meta_path.is_file():
            raise EvalInputError(f"{f}: its config {meta_path.name} is missing beside it")
        try:
            task = json.loads(meta_path.read_text())["task"]
        except (json.JSONDecodeError, KeyError) as err:
            raise EvalInputError(f"{meta_path}: not an adapter config ({err})") from None
        out.append(request_for_task(cfg, task, str(f), **overrides))
    return out
