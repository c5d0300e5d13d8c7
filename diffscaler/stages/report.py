"""The report stage: report.md and its PNGs - sample grids, the FID table, parameters, wall time per stage,
loss curves - from the other stages' outputs (diffscaler.report.write_report). Never skipped.

With eval.gpus_per_actor > 0 the report runs as one Ray task on a GPU node, shaped like an FID actor:
its grids sample the backbone (a DiT-XL/2 takes minutes per grid on a CPU driver).
"""

from __future__ import annotations

from typing import Any

import ray

from diffscaler.report import ReportInputs, StageRow, write_report
from diffscaler.stages.base import Run, Stage, StageCheck
from diffscaler.stages.evaluate import evaluated_adapters
from diffscaler.stages.inputs import require_backbone
from diffscaler.train.finetune import check_fits


class ReportStage(Stage):
    name = "report"

    def needs_ray(self, run: Run) -> bool:
        return False  # joined in run() only when the report goes to a GPU node

    def preflight(self, run: Run) -> None:
        require_backbone(run)

    def check(self, run: Run) -> StageCheck:
        return StageCheck(False, "always rewritten from the other stages' outputs")

    def run(self, run: Run) -> dict[str, Any]:
        records = run.manifest.stages.values() if run.manifest is not None else ()
        stages = tuple(
            StageRow(r.name, r.status, r.wall_s, r.reason) for r in records if r.name != self.name
        )  # its own time is not known while it runs
        layout = run.layout
        inputs = ReportInputs(
            cfg=run.cfg,
            out_dir=layout.root,
            backbone=run.backbone,
            adapters=evaluated_adapters(run),
            fid_json=layout.fid_json,
            pretrain_metrics=layout.backbone_dir / "metrics.jsonl",
            finetune_logs=layout.adapters_dir / "logs",
            sweep_dir=layout.sweep_dir,
            stages=stages,
        )
        e = run.cfg.eval
        if e.gpus_per_actor > 0:  # one Ray task on a GPU node writes the report into --out (a shared file system)
            run.connect()
            gpus, cpus = min(1.0, e.gpus_per_actor), e.cpus_per_actor
            check_fits(cpus, gpus, "report (eval.gpus_per_actor, eval.cpus_per_actor)")
            files = ray.get(ray.remote(num_gpus=gpus, num_cpus=cpus)(write_report).remote(inputs))
        else:
            files = write_report(inputs)
        return {"report": str(files[0]), "images": [str(p) for p in files[1:]]}
