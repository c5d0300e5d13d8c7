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

from diffscaler import artifacts
from diffscaler.artifacts import (
    AdapterLoadError,
    BackboneLoadError,
    load_backbone,
    read_adapter_file,
    read_adapter_meta,
    read_backbone_meta,
)
from diffscaler.eval.pool import FidEvaluator, ProgressFn, condition_references, format_condition_reference
from diffscaler.eval.requests import EvalRequest, request_for_task
from diffscaler.eval.resolve import resolve_request
from diffscaler.eval.results import EvalResult, format_table, write_fid_json
from diffscaler.eval.stats import EvalInputError
from diffscaler.stages.base import Run, Stage, StageCheck, StageFailed
from diffscaler.stages.finetune import adapter_files, require_adapters
from diffscaler.stages.inputs import require_targets_and_backbone
from diffscaler.stages.sweep import swept_adapters

REAL_LABEL = "floor (real)"  # the reference rows of fid.json: real held-out images, and the bare backbone
NO_ADAPTER_LABEL = "no adapter"
NO_CONDITION_LABEL = "no condition"  # a conditional task's (first method's) adapter sampled without its map


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
    files = {
        f"{m}/{t}": file_digest(p) if Path(p).is_file() else None
        for m, tasks in evaluated_adapters(run).items()
        for t, p in tasks.items()
    }
    d = run.cfg.diffusion
    guidance = float(getattr(d, "condition_scale", 1.0))  # on condition maps; 1 = none (older fid.json: absent)
    return {
        "backbone_hash": run.backbone_hash() if run.backbone.is_file() else None,
        "adapters": files,
        "eval": dataclasses.asdict(run.cfg.eval),
        "sampler": [d.sampler, d.ddim_eta, d.cfg_scale, *([guidance] if guidance != 1.0 else [])],
    }


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
        requests = [
            request_for_task(cfg, task, path, label=label)
            for label, tasks in evaluated_adapters(run).items()
            for task, path in tasks.items()
        ]
        first = next(iter(adapter_files(run).values()), {})
        conditional = [t.name for t in cfg.data.targets if t.condition]
        if cfg.eval.reference_rows:  # the rows that make the others readable: the floor and no adapter
            for t in cfg.data.targets:
                requests += [
                    request_for_task(cfg, t.name, None, label=REAL_LABEL, source="real"),
                    request_for_task(cfg, t.name, None, label=NO_ADAPTER_LABEL),
                ]
            # what the map buys: the same adapter sampled without it
            requests += [
                request_for_task(cfg, t, first[t], label=NO_CONDITION_LABEL, conditioned=False)
                for t in conditional
                if t in first
            ]
        inputs = eval_inputs(run)
        generated = sum(r.num_samples or cfg.eval.num_samples for r in requests if r.source == "generated")
        results, _replaced = self.score(run, requests, progress=_ProgressLog(run, generated))
        extra = {"pipeline_inputs": inputs}
        if conditional:  # fidelity's ceiling (real images vs their own maps) and chance (vs other images' maps)
            extra["condition_reference"] = condition_references(cfg, conditional)
            for line in format_condition_reference(extra["condition_reference"]):
                run.log(f"evaluate: {line}")
        write_fid_json(results, run.layout.fid_json, extra=extra)
        run.log(format_table(results))
        failed = [r for r in results if r.status != "ok"]
        if failed:
            raise StageFailed(
                "; ".join(f"{r.label}/{r.task}: {r.error}" for r in failed)
                + f" (scores that worked are in {run.layout.fid_json})"
            )
        return {
            "fid_json": str(run.layout.fid_json),
            "feature_network": cfg.eval.feature_network,
            "num_samples": cfg.eval.num_samples,
            "fid": {f"{r.label}/{r.task}": r.fid for r in results},
        }

    def outputs(self, run: Run) -> dict[str, Any]:
        return {"fid_json": str(run.layout.fid_json)}

    # -- what `ray_jobs.evaluate` calls: adapters it is given instead of the run's fine-tunes --------

    def requests(self, run: Run, adapters: list[str], include_backbone: bool) -> list[EvalRequest]:
        """A request per adapter that `adapters` names (folders, files, a bank) and, with `include_backbone`, the
        bare backbone on the pretraining set; the backbone, every adapter, the shards and the feature network
        checked before any Ray connection (EvalInputError names the problem)."""
        # here, not at the top: the feature networks import torch-fidelity, which only a scoring process needs
        from diffscaler.eval.features import FeatureWeightsError, resolve_weights_path

        cfg = run.cfg
        if not adapters and not include_backbone:
            raise EvalInputError("nothing to score: give --adapters DIR and/or --include-backbone")
        try:
            path = run.backbone
            meta = load_backbone(path)[1] if path.suffix == ".pt" else read_backbone_meta(path)
            # absolute paths: the actors' working directory may not be the driver's
            metas = {str(f.resolve()): read_adapter_meta(f) for f in artifacts.adapter_files(adapters)}
            requests = [request_for_task(cfg, m["task"], f) for f, m in metas.items()]
            # a conditional task's adapter is scored with its maps, and again without them (what the map buys)
            requests += [
                request_for_task(cfg, m["task"], f, label=NO_CONDITION_LABEL, conditioned=False)
                for f, m in metas.items()
                if m.get("condition_extractor")
            ]
            resolve_weights_path(cfg.eval.feature_network, cfg.eval.feature_weights_path)
        except (BackboneLoadError, AdapterLoadError, FeatureWeightsError) as err:
            raise EvalInputError(str(err)) from None
        if include_backbone:
            requests.append(request_for_task(cfg, None))
        for i, req in enumerate(requests):
            resolve_request(req, cfg, meta, f"request {i} ({req.task or 'backbone'})")  # adapter fits, shards exist
        return requests

    def score(
        self, run: Run, requests: list[EvalRequest], progress: ProgressFn | None = None
    ) -> tuple[list[EvalResult], int]:
        """Score `requests` on the FID actor pool, joining the cluster first: (results, actor restarts)."""
        run.connect()
        with FidEvaluator(str(run.backbone), run.cfg) as evaluator:
            return evaluator.evaluate(requests, progress=progress), evaluator.actors_replaced
