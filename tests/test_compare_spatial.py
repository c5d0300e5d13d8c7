"""`make compare-spatial` and `make compare-spatial-mixed` (issue 21's Spatial control table): the commands the
Makefile runs, as `make -n` prints them, give valid experiments with the settings bench/QUALITY.md reports."""

from __future__ import annotations

import pytest

from tests.support.pipeline import ROOT, config_of_argv, make_pipeline_argv


def test_compare_spatial_trains_every_method_on_three_conditional_targets_with_two_seeds():
    cfg, out = config_of_argv(make_pipeline_argv("compare-spatial"))
    assert out == "runs/compare-spatial"
    assert {t.name: (t.source, t.condition) for t in cfg.data.targets} == {
        "emoji-canny": ("emoji", "canny"),
        "icons-canny": ("icons", "canny"),
        "emoji-mask": ("emoji", "mask"),
    }
    methods = ("affiner", "controlnet", "full", "lora", "difffit")
    assert cfg.finetune.methods == methods and cfg.sweep.methods == methods
    assert all(cfg.finetune.extra_seeds[m] == (1,) for m in methods)
    assert cfg.finetune.lr_from_sweep and cfg.sweep.datasets == ("emoji-mask",)
    assert cfg.pipeline.stages.index("sweep") < cfg.pipeline.stages.index("finetune")


def test_compare_spatial_mixed_trains_two_conditional_and_two_unconditional_tasks_together():
    cfg, out = config_of_argv(make_pipeline_argv("compare-spatial-mixed"))
    assert out == "runs/compare-spatial-mixed"
    assert cfg.finetune.mixed and cfg.finetune.methods == ("affiner",) and cfg.finetune.extra_seeds == {"affiner": (1,)}
    assert [(t.name, t.condition) for t in cfg.data.targets] == [
        ("emoji-canny", "canny"),
        ("emoji-mask", "mask"),
        ("icons", ""),
        ("tiles", ""),
    ]
    assert cfg.finetune.batch_size == 4 * 16 and cfg.finetune.lr == 1.0e-3  # 16 of each task, the sweep's lr
    assert cfg.pipeline.backbone == "runs/compare-spatial/backbone/backbone.safetensors"
    assert "sweep" not in cfg.pipeline.stages and "pretrain" not in cfg.pipeline.stages


@pytest.mark.parametrize("target", ["compare-spatial", "compare-spatial-mixed"])
def test_the_readme_names_the_spatial_targets(target):
    assert f"make {target}" in (ROOT / "README.md").read_text()
