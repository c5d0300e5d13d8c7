"""All six stages on the micro config, in this process's Ray session: every output and the report exist,
and a second run skips everything but the report."""

from __future__ import annotations

import pytest

from diffscaler.config import load_config
from diffscaler.pipeline import run_pipeline
from tests.support.pipeline import ALL_STAGES, check_full_run, micro_config, statuses


@pytest.mark.ray
def test_whole_pipeline_then_a_rerun_that_skips_every_stage(ray_local, tmp_path):
    cfg = load_config(micro_config(tmp_path, ALL_STAGES, finetune={"methods": ["affiner", "lora"]}))
    out = tmp_path / "run"
    lines: list[str] = []
    run_pipeline(cfg, out, log=lines.append)
    check_full_run(out)
    assert all(s == "done" for s in statuses(out).values())
    progress = [line for line in lines if "generated images sampled and featurized" in line]
    assert (
        progress
        and progress[-1].startswith("evaluate: ")
        and progress[-1].split()[1].split("/")[0] == (progress[-1].split()[1].split("/")[1])
    )  # the last line says all of them

    run_pipeline(cfg, out)
    assert statuses(out) == {**dict.fromkeys(ALL_STAGES[:-1], "skipped"), "report": "done"}
    check_full_run(out)
