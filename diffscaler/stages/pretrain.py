"""The pretrain stage: the backbone, trained with Ray Train + DeepSpeed (diffscaler.train.pretrain), or a
public facebookresearch/DiT .pt (pipeline.backbone) imported once to backbone.safetensors.

Valid when the backbone's hash verifies, its model config matches, and it was trained for pretrain.steps
on the current shards (or imported from the given .pt); a given .safetensors is read in place.
"""

from __future__ import annotations

from typing import Any

import diffscaler.train.pretrain as pretrain_lib
from diffscaler.artifacts import BackboneLoadError, load_backbone, load_public_dit, save_backbone
from diffscaler.config import ConfigError
from diffscaler.data import dataset_jobs, load_index, storage
from diffscaler.data.build import pretrain_dataset_dir
from diffscaler.stages.base import InputError, Run, Stage, StageCheck
from diffscaler.stages.inputs import require_built
from diffscaler.train.pretrain_checkpoint import resume_checkpoint


class PretrainStage(Stage):
    name = "pretrain"

    def needs_ray(self, run: Run) -> bool:
        return not run.given_backbone  # importing a given backbone needs no cluster

    def preflight(self, run: Run) -> None:
        if run.given_backbone:
            return  # checked by check_run_inputs
        try:
            jobs = dataset_jobs(run.cfg.data)
        except ValueError as err:
            raise InputError(str(err)) from None
        require_built(run, [next(iter(jobs))])  # the pretraining set comes first
        # a Ray Train checkpoint left in storage must resume with this config (pretrain's own rule); without
        # the shards stage the shards on disk are the ones pretraining reads, so their hash is checked too
        p = run.cfg.pretrain
        try:
            found = resume_checkpoint(storage.join(p.storage_path, p.run_name))  # the one Ray resumes from
            if found is not None:
                index = None
                if "shards" not in run.selected:  # require_built above: the index is there
                    index = load_index(pretrain_dataset_dir(run.cfg.data))
                pretrain_lib.check_resumable(
                    found[1], run.cfg, found[0], index and index.content_hash, index and index.data_hash
                )
        except (BackboneLoadError, ConfigError) as err:
            raise InputError(str(err)) from None

    def check(self, run: Run) -> StageCheck:
        given, cfg = run.given_backbone, run.cfg
        if given.endswith(".safetensors"):
            return StageCheck(True, f"pipeline.backbone given: {given}")
        path = run.layout.backbone_file
        try:
            _model, meta = load_backbone(path, expect=cfg.model)  # verifies the content hash
        except BackboneLoadError as err:
            return StageCheck(False, f"no valid backbone yet ({err})")
        prov = meta.get("provenance", {})
        if given:  # a public .pt imported into DIR/backbone
            if prov.get("source") != given:
                return StageCheck(False, f"{path} was not imported from {given}")
            return StageCheck(True, f"{given} already imported to {path}")
        if meta["model"].get("num_classes") != cfg.model.num_classes:
            return StageCheck(
                False, f"{path} has num_classes {meta['model'].get('num_classes')}, config {cfg.model.num_classes}"
            )
        if prov.get("step") != cfg.pretrain.steps:
            return StageCheck(
                False, f"{path} was trained {prov.get('step')} steps, pretrain.steps is {cfg.pretrain.steps}"
            )
        index = load_index(pretrain_dataset_dir(cfg.data))
        if (prov.get("shards", {}).get("content_hash"), prov.get("shards", {}).get("data_hash")) != (
            index.content_hash,
            index.data_hash,
        ):
            return StageCheck(False, f"{path} was trained on other shards than {pretrain_dataset_dir(cfg.data)}")
        return StageCheck(True, f"{path} valid ({prov.get('step')} steps, hash {meta['content_hash'][:19]}...)")

    def train(self, run: Run, shards: str | None = None, weights: str = "ema") -> pretrain_lib.PretrainResult:
        """Pretrain (or resume) into the layout's backbone folder; ray_jobs.pretrain calls this too."""
        return pretrain_lib.run_pretrain(run.cfg, run.layout.backbone_dir, shards, weights=weights)

    def run(self, run: Run) -> dict[str, Any]:
        if run.given_backbone.endswith(".pt"):
            return self.import_public(run)
        result = self.train(run)
        return {
            "backbone": str(result.backbone),
            "content_hash": result.content_hash,
            "metrics": str(result.metrics),
            "checkpoint": str(result.checkpoint),
            "steps": result.step,
            "weights": result.weights,
            "skipped_samples": result.skipped_samples,
        }

    def import_public(self, run: Run) -> dict[str, Any]:
        """A facebookresearch/DiT .pt becomes DIR/backbone/backbone.safetensors once (no pickle afterwards)."""
        given, target = run.given_backbone, run.layout.backbone_file
        model, meta = load_public_dit(given, expect=run.cfg.model)
        provenance = {"stage": "import", "source": given, "format": meta["format"]}
        digest = save_backbone(model, target, provenance=provenance)
        return {"backbone": str(target), "content_hash": digest, "source": given}

    def outputs(self, run: Run) -> dict[str, Any]:
        return {"backbone": str(run.backbone), "content_hash": run.backbone_hash()}
