"""The evaluate stage: FID/KID of every fine-tuned method per task (plus the sweep's winners, and the
floor and no-adapter reference rows) with the Ray actor pool (diffscaler.eval.FidEvaluator) -> fid.json.

Valid when fid.json was computed from exactly the current adapter files, backbone and eval settings
(recorded in it as `pipeline_inputs`) and every request succeeded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from diffscaler.artifacts import AdapterLoadError, read_adapter_file
from diffscaler.eval import FidEvaluator, format_table, request_for_task, write_fid_json
from diffscaler.stages.base import Run, Stage, StageCheck, StageFailed
from diffscaler.stages.finetune import adapter_files, require_adapters
from diffscaler.stages.inputs import require_targets_and_backbone
from diffscaler.stages.sweep import swept_adapters

REAL_LABEL = "floor (real)"  # the reference rows of fid.json: real held-out images, and the bare backbone
NO_ADAPTER_LABEL = "no adapter"


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def evaluated_adapters(run: Run) -> dict[str, dict[str, str]]:
    """{label: {task: adapter}}: every fine-tune method, plus the sweep's winners when the sweep runs."""
    out = adapter_files(run)
    if run.cfg.finetune.lr_from_sweep:  # the fine-tunes already use the swept lr: its winners add nothing
        return out
    winners = {}
    for task, path in swept_adapters(run).items():
        try:  # only winners for this backbone: a sweep of an earlier backbone is history, not a result
            meta, _ = read_adapter_file(path)
        except (AdapterLoadError, OSError):
            continue
        if run.backbone.is_file() and meta.get("backbone_hash") == run.backbone_hash():
            winners[task] = path
    if winners:
        out[f"{run.cfg.adapter.method} (swept)"] = winners
    return out


def eval_inputs(run: Run) -> dict[str, Any]:
    """What fid.json was computed from: backbone, adapter file digests, the evaluation settings."""
    files = {f"{m}/{t}": file_digest(p) if Path(p).is_file() else None
             for m, tasks in evaluated_adapters(run).items() for t, p in tasks.items()}  # fmt: skip
    d = run.cfg.diffusion
    return {"backbone_hash": run.backbone_hash() if run.backbone.is_file() else None, "adapters": files,
            "eval": dataclasses.asdict(run.cfg.eval), "sampler": [d.sampler, d.ddim_eta, d.cfg_scale]}  # fmt: skip


class _ProgressLog:
    """A line each time another tenth of the generated images is scored: a long evaluation (the
    comparison's 40 rows; its wall time is in bench/QUALITY.md) shows where it is."""

    def __init__(self, run: Run, total_images: int):
        self.run, self.total = run, max(1, total_images)
        self.scored = 0
        self.next_tenth = 1

    def __call__(self, event: dict[str, Any]) -> None:
        if event["kind"] != "sample" or event["event"] != "done":
            return
        self.scored += int(event["count"])
        if self.scored * 10 >= self.next_tenth * self.total:
            self.next_tenth = self.scored * 10 // self.total + 1
            self.run.log(f"evaluate: {self.scored}/{self.total} generated images sampled and featurized")


class EvaluateStage(Stage):
    name = "evaluate"

    def preflight(self, run: Run) -> None:
        require_targets_and_backbone(run)
        require_adapters(run)

    def check(self, run: Run) -> StageCheck:
        path = run.layout.fid_json
        try:
            doc = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return StageCheck(False, f"no {path.name} yet")
        if doc.get("pipeline_inputs") != eval_inputs(run):
            return StageCheck(False, f"{path.name} was computed from other adapters or settings")
        failed = [r for r in doc.get("results", []) if r.get("status") != "ok"]
        if failed:
            return StageCheck(False, f"{path.name} has {len(failed)} failed request(s)")
        return StageCheck(True, f"{path.name} is current ({len(doc.get('results', []))} scores)")

    def run(self, run: Run) -> dict[str, Any]:
        cfg = run.cfg
        requests = [request_for_task(cfg, task, path, label=label)
                    for label, tasks in evaluated_adapters(run).items() for task, path in tasks.items()]  # fmt: skip
        if cfg.eval.reference_rows:  # the rows that make the others readable: the floor and no adapter
            for t in cfg.data.targets:
                requests += [request_for_task(cfg, t.name, None, label=REAL_LABEL, source="real"),
                             request_for_task(cfg, t.name, None, label=NO_ADAPTER_LABEL)]  # fmt: skip
        inputs = eval_inputs(run)
        with FidEvaluator(str(run.backbone), cfg) as evaluator:
            generated = sum(r.num_samples or cfg.eval.num_samples for r in requests if r.source == "generated")
            results = evaluator.evaluate(requests, progress=_ProgressLog(run, generated))
        write_fid_json(results, run.layout.fid_json, extra={"pipeline_inputs": inputs})
        run.log(format_table(results))
        failed = [r for r in results if r.status != "ok"]
        if failed:
            raise StageFailed("; ".join(f"{r.label}/{r.task}: {r.error}" for r in failed)
                              + f" (scores that worked are in {run.layout.fid_json})")  # fmt: skip
        return {"fid_json": str(run.layout.fid_json), "feature_network": cfg.eval.feature_network,
                "num_samples": cfg.eval.num_samples,
                "fid": {f"{r.label}/{r.task}": r.fid for r in results}}  # fmt: skip

    def outputs(self, run: Run) -> dict[str, Any]:
        return {"fid_json": str(run.layout.fid_json)}
