"""The pipeline's stages, one module each, and their order (the registry).

    from diffscaler.stages import STAGES, Run
    run = Run.in_folder(cfg, "runs/demo")
    for stage in STAGES: print(stage.name, stage.check(run))

Adding a stage: write `diffscaler/stages/<name>.py` with a `Stage` subclass (see `base.py`: preflight,
check, run, outputs) and add one line to STAGES below. STAGES is the one list of stage names: the
pipeline checks `pipeline.stages` and `--force` against it before anything runs or is written.
"""

from __future__ import annotations

from collections.abc import Sequence

from diffscaler.config import ExperimentConfig
from diffscaler.stages.base import InputError, Run, RunLayout, Stage, StageCheck, StageFailed, resolve_run_config
from diffscaler.stages.evaluate import EvaluateStage
from diffscaler.stages.finetune import FinetuneStage
from diffscaler.stages.pretrain import PretrainStage
from diffscaler.stages.report import ReportStage
from diffscaler.stages.shards import ShardsStage
from diffscaler.stages.sweep import SweepStage

STAGES: tuple[Stage, ...] = (
    ShardsStage(),
    PretrainStage(),
    FinetuneStage(),
    SweepStage(),
    EvaluateStage(),
    ReportStage(),
)


def stage_order(cfg: ExperimentConfig, stages: Sequence[Stage] = STAGES) -> tuple[str, ...]:
    """The order stages run in: the sweep first when the fine-tunes take their learning rates from it."""
    names = [s.name for s in stages]
    if cfg.finetune.lr_from_sweep and "sweep" in names and "finetune" in names:
        names.remove("sweep")
        names.insert(names.index("finetune"), "sweep")
    return tuple(names)


__all__ = [
    "STAGES",
    "InputError",
    "Run",
    "RunLayout",
    "Stage",
    "StageCheck",
    "StageFailed",
    "resolve_run_config",
    "stage_order",
]
