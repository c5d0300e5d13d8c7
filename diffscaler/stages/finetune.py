"""The finetune stage: one adapter per (method, target) on the frozen backbone, as Ray tasks
(diffscaler.train.finetune). With finetune.lr_from_sweep each swept method trains at the sweep's lr.

Valid when every adapter carries this backbone's hash and its fine-tune fingerprint (the library's own
plan); a run trains only what is missing or stale (everything with force).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from diffscaler.config import ExperimentConfig
from diffscaler.stages.base import InputError, Run, Stage, StageCheck, StageFailed
from diffscaler.stages.inputs import require_targets_and_backbone
from diffscaler.stages.sweep import swept_lrs
from diffscaler.train.finetune import (
    FinetuneInputError,
    FinetuneSummary,
    finetune_variants,
    plan_finetunes,
    run_finetunes,
)


def adapter_files(run: Run) -> dict[str, dict[str, str]]:
    """{method: {task: adapter file}} for every configured method and task (files may not exist yet)."""
    methods, folder = run.cfg.finetune.methods, run.layout.adapters_dir
    return {
        v.label: {t.name: str(v.out_dir(folder, methods) / f"{t.name}.safetensors") for t in run.cfg.data.targets}
        for v in finetune_variants(run.cfg)
    }


def require_adapters(run: Run) -> None:
    """A stage that reads the adapters, in a run without 'finetune': every adapter file must be there."""
    if "finetune" in run.selected:
        return
    missing = [p for tasks in adapter_files(run).values() for p in tasks.values() if not Path(p).is_file()]
    if missing:
        raise InputError(
            f"'evaluate' needs adapters, {len(missing)} missing (first: {missing[0]}); "
            "add 'finetune' to pipeline.stages"
        )


class FinetuneStage(Stage):
    name = "finetune"

    def config(self, run: Run) -> ExperimentConfig:
        """The config the fine-tunes run with: with finetune.lr_from_sweep, each swept method's lr is the
        sweep's choice (finetune.method_lrs of the config win where both name a method)."""
        if not run.cfg.finetune.lr_from_sweep:
            return run.cfg
        lrs = {**swept_lrs(run), **run.cfg.finetune.method_lrs}
        return dataclasses.replace(run.cfg, finetune=dataclasses.replace(run.cfg.finetune, method_lrs=lrs))

    def preflight(self, run: Run) -> None:
        require_targets_and_backbone(run)

    def check(self, run: Run) -> StageCheck:
        if not run.backbone.is_file():
            return StageCheck(False, "no backbone yet")
        try:
            plan = plan_finetunes(self.config(run), run.backbone, run.layout.adapters_dir)
        except FinetuneInputError as err:
            return StageCheck(False, str(err))
        if plan.jobs:
            return StageCheck(False, f"{len(plan.jobs)} of {len(plan.jobs) + len(plan.reused)} adapter(s) to train")
        return StageCheck(True, f"{len(plan.reused)} adapter(s) up to date for backbone {plan.backbone_hash[:19]}...")

    def train(self, run: Run) -> FinetuneSummary:
        """Every fine-tune that is not up to date (ray_jobs.finetune calls this and prints the table)."""
        return run_finetunes(
            self.config(run), run.backbone, run.layout.adapters_dir, force=self.name in run.force, log=run.log
        )

    def run(self, run: Run) -> dict[str, Any]:
        summary = self.train(run)
        failed = [r for r in summary.rows if r.status == "failed"]
        if failed:
            raise StageFailed(
                f"{len(failed)} fine-tune(s) failed: "
                + "; ".join(f"{r.method}/{r.task}: {r.reason}" for r in failed)
                + f" (the others are kept in {run.layout.adapters_dir}; rerun to retry only these)"
            )
        return {
            "summary": str(Path(summary.out_dir) / "summary.json"),
            "banks": summary.banks,
            "adapters": adapter_files(run),
        }

    def outputs(self, run: Run) -> dict[str, Any]:
        return {"summary": str(run.layout.adapters_dir / "summary.json"), "adapters": adapter_files(run)}
