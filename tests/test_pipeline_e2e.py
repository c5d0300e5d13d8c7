"""All six stages on the micro config, in this process's Ray session: every output and the report exist,
and a second run skips everything but the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffscaler.config import load_config
from diffscaler.pipeline import run_pipeline
from tests.test_pipeline import micro_config, statuses

ALL_STAGES = ["shards", "pretrain", "finetune", "sweep", "evaluate", "report"]


def check_full_run(out: Path) -> None:
    """What a finished micro pipeline leaves in its run folder (shared with the `ray job submit` test)."""
    m = json.loads((out / "pipeline.json").read_text())
    assert m["status"] == "done", m["error"]
    for name in ALL_STAGES:
        assert m["stages"][name]["status"] in ("done", "skipped"), (name, m["stages"][name])
        assert m["stages"][name]["wall_s"] is not None
    assert (out / "backbone" / "backbone.safetensors").is_file() and (out / "backbone" / "metrics.jsonl").is_file()
    for method, tasks in m["stages"]["finetune"]["outputs"]["adapters"].items():
        assert set(tasks) == {"red", "blue"}, method
        assert all(Path(p).is_file() for p in tasks.values())
    best = json.loads((out / "sweep" / "best.json").read_text())["datasets"]
    assert set(best) == {"red"}
    fid = json.loads((out / "fid.json").read_text())
    labels = {(r["task"], r["label"]) for r in fid["results"]}
    assert labels == {("red", "affiner"), ("blue", "affiner"), ("red", "lora"), ("blue", "lora"),
                      ("red", "affiner (swept)"), ("red", "floor (real)"), ("blue", "floor (real)"),
                      ("red", "no adapter"), ("blue", "no adapter")}  # fmt: skip
    assert all(r["status"] == "ok" and r["fid"] is not None for r in fid["results"])
    report = (out / "report.md").read_text()
    parts = (
        "efficientnet-lite0",
        "6 generated images",
        "| lora |",
        "## Wall time per stage",
        "| pretrain |",
        "## Sweep (Ray Tune)",
        "samples_mixed.png",
        "loss_curves.png",
    )
    for part in parts:
        assert part in report, part
    for png in ("samples_red.png", "samples_blue.png", "samples_mixed.png", "samples_backbone.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 0


@pytest.mark.ray
def test_whole_pipeline_then_a_rerun_that_skips_every_stage(ray_local, tmp_path):
    cfg = load_config(micro_config(tmp_path, ALL_STAGES, finetune={"methods": ["affiner", "lora"]}))
    out = tmp_path / "run"
    lines: list[str] = []
    run_pipeline(cfg, out, log=lines.append)
    check_full_run(out)
    assert all(s == "done" for s in statuses(out).values())
    progress = [line for line in lines if "generated images sampled and featurized" in line]
    assert progress and progress[-1].startswith("evaluate: ") and progress[-1].split()[1].split("/")[0] == (
        progress[-1].split()[1].split("/")[1])  # the last line says all of them

    run_pipeline(cfg, out)
    assert statuses(out) == {**dict.fromkeys(ALL_STAGES[:-1], "skipped"), "report": "done"}
    check_full_run(out)
