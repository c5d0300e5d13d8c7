"""The stage contract: the registry's order, each stage's check on an empty run folder, and a new stage
added by one module's worth of code (one object in the registry, no name anywhere else) that the pipeline
runs, records and skips on the rerun. No Ray."""

from __future__ import annotations

import json
from typing import Any

import pytest

from diffscaler.config import load_config
from diffscaler.pipeline import Pipeline, PipelineInputError, run_pipeline
from diffscaler.stages import STAGES, Run, Stage, StageCheck, stage_order
from tests.support.pipeline import ALL_STAGES, micro_config, statuses


def test_registry_holds_every_stage_in_order_and_runs_them_all_when_none_is_named(tmp_path):
    assert tuple(s.name for s in STAGES) == tuple(ALL_STAGES)
    assert stage_order(load_config(None)) == tuple(ALL_STAGES)
    assert load_config(None).pipeline.stages == ()  # the default: every stage, in the registry's order
    assert Pipeline(load_config(None), tmp_path / "out").selected == tuple(ALL_STAGES)
    swept_first = stage_order(load_config(None, ["finetune.lr_from_sweep=true"]))
    assert swept_first == ("shards", "pretrain", "sweep", "finetune", "evaluate", "report")


def test_every_stage_finds_an_empty_run_folder_invalid_and_says_why(tmp_path):
    run = Run.in_folder(load_config(micro_config(tmp_path, list(ALL_STAGES))), tmp_path / "out")
    for stage in STAGES:
        check = stage.check(run)
        assert not check.valid and check.reason, stage.name


class ToyStage(Stage):
    """A stage written for this test: counts its runs in DIR/toy.json, valid while the config's seed matches."""

    name = "toy"

    def needs_ray(self, run: Run) -> bool:
        return False

    def path(self, run: Run):
        return run.layout.root / "toy.json"

    def check(self, run: Run) -> StageCheck:
        try:
            doc = json.loads(self.path(run).read_text())
        except FileNotFoundError:
            return StageCheck(False, "no toy.json yet")
        if doc["seed"] != run.cfg.pretrain.seed:
            return StageCheck(False, "toy.json of another seed")
        return StageCheck(True, f"toy.json current ({doc['runs']} run(s))")

    def run(self, run: Run) -> dict[str, Any]:
        runs = json.loads(self.path(run).read_text())["runs"] + 1 if self.path(run).is_file() else 1
        self.path(run).write_text(json.dumps({"seed": run.cfg.pretrain.seed, "runs": runs}))
        return self.outputs(run)

    def outputs(self, run: Run) -> dict[str, Any]:
        return {"toy_json": str(self.path(run))}


def test_a_stage_added_to_the_registry_runs_is_recorded_and_is_skipped_on_the_rerun(tmp_path, refuse_ray):
    stages = (*STAGES, ToyStage())  # the one thing a new stage registers
    out = tmp_path / "out"
    cfg = load_config(micro_config(tmp_path, ["toy"]))
    lines: list[str] = []
    Pipeline(cfg, out, stages=stages, log=lines.append).run()
    assert statuses(out) == {**dict.fromkeys(ALL_STAGES, "not selected"), "toy": "done"}
    assert json.loads((out / "toy.json").read_text())["runs"] == 1
    assert any("[pipeline] (1/1) toy: done in" in line for line in lines)

    Pipeline(cfg, out, stages=stages).run()
    assert statuses(out)["toy"] == "skipped"
    assert json.loads((out / "toy.json").read_text())["runs"] == 1

    Pipeline(load_config(micro_config(tmp_path, ["toy"]), ["pretrain.seed=7"]), out, stages=stages).run()
    assert statuses(out)["toy"] == "done" and json.loads((out / "toy.json").read_text())["runs"] == 2
    Pipeline(cfg, out, stages=stages, force=["toy"]).run()
    assert json.loads((out / "toy.json").read_text())["runs"] == 3
    # the stock registry does not know the toy stage, and says so before any stage runs
    with pytest.raises(PipelineInputError, match=r"unknown stage\(s\) \['toy'\]"):
        run_pipeline(cfg, out, force=["toy"])
    with pytest.raises(PipelineInputError, match=r"pipeline.stages: unknown stage\(s\) \['toy'\]"):
        run_pipeline(cfg, out)
