"""The U-Net baseline (issue 24) through the same pipeline as the DiT: shards, pretrain (Ray Train +
DeepSpeed), finetune (full, DiffFit-style, BitFit on its convolutions), evaluate (FID/KID rows) and report,
on the micro config with `model.arch: unet`; and what a U-Net cannot take is refused before Ray.

    .venv/bin/python -m pytest tests/test_pipeline_unet.py -q --timeout 900 -m 'slow or not slow'
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffscaler.adapters.bank import AdapterLoadError
from diffscaler.artifacts import load_adapters, load_backbone
from diffscaler.config import ConfigError, load_config
from diffscaler.pipeline import PipelineInputError, run_pipeline
from tests.support.pipeline import manifest, micro_config, save_micro_backbone, statuses

UNET_STAGES = ["shards", "pretrain", "finetune", "evaluate", "report"]
UNET_MODEL = {"arch": "unet", "name": "UNet-T", "input_size": 16, "num_classes": 3}
UNET_METHODS = ["full", "difffit", "bitfit"]


def unet_config(tmp_path, stages=UNET_STAGES, **sections):
    finetune = {"methods": UNET_METHODS, **sections.pop("finetune", {})}
    return micro_config(tmp_path, stages, model=UNET_MODEL, finetune=finetune, **sections)


@pytest.mark.ray
@pytest.mark.slow  # 160-330 s on the 2-core machine under other load: past the default suite's ~2 min
def test_a_unet_experiment_runs_every_stage_and_its_adapters_fit_only_a_unet(ray_local, tmp_path):
    cfg = load_config(unet_config(tmp_path))
    out = tmp_path / "run"
    run_pipeline(cfg, out)
    assert statuses(out) == {**dict.fromkeys(UNET_STAGES, "done"), "sweep": "not selected"}

    backbone = out / "backbone" / "backbone.safetensors"
    meta = json.loads(backbone.with_suffix(".json").read_text())
    assert meta["model"]["arch"] == "unet" and meta["model"]["name"] == "UNet-T"
    model, _ = load_backbone(backbone)
    assert type(model).__name__ == "ClassUNet"

    adapters = manifest(out)["stages"]["finetune"]["outputs"]["adapters"]
    assert {m: set(tasks) for m, tasks in adapters.items()} == dict.fromkeys(UNET_METHODS, {"red", "blue"})
    files = [Path(p) for tasks in adapters.values() for p in tasks.values()]
    for method, tasks in adapters.items():
        for p in tasks.values():
            adapter_meta = json.loads(Path(p).with_suffix(".json").read_text())
            assert adapter_meta["method"] == method and adapter_meta["model"]["arch"] == "unet"

    fid = json.loads((out / "fid.json").read_text())
    labels = {(r["task"], r["label"]) for r in fid["results"]}
    assert labels == {
        *((t, m) for m in UNET_METHODS for t in ("red", "blue")),
        ("red", "floor (real)"),
        ("blue", "floor (real)"),
        ("red", "no adapter"),
        ("blue", "no adapter"),
    }
    assert all(r["status"] == "ok" and r["fid"] is not None for r in fid["results"])
    report = (out / "report.md").read_text()
    assert "| difffit |" in report and "| bitfit |" in report
    assert (out / "samples_red.png").stat().st_size > 0

    # A U-Net adapter on a DiT (and the reverse) is refused by name, not by a shape error.
    dit_backbone = save_micro_backbone(tmp_path / "dit.safetensors")
    dit, dit_meta = load_backbone(dit_backbone)
    with pytest.raises(AdapterLoadError, match="'unet' backbone .* do not load onto each other"):
        load_adapters(dit, [files[0]], backbone_hash=None)


def test_what_a_unet_cannot_take_is_refused_before_ray(tmp_path, refuse_ray):
    with pytest.raises(PipelineInputError, match="the sweep runs the DiT only"):
        run_pipeline(load_config(unet_config(tmp_path, stages=["shards", "pretrain", "sweep"])), tmp_path / "a")
    with pytest.raises(ConfigError, match=r"finetune\.methods: 'affiner' does not apply to a U-Net"):
        load_config(unet_config(tmp_path, finetune={"methods": ["affiner"]}))
    path = unet_config(tmp_path)
    edges = ["data.targets=[{name: red, source: 'folder:%s', condition: mask}]" % (tmp_path / "src" / "red")]
    with pytest.raises(ConfigError, match=r"condition.*U-Net baseline .* takes none"):
        load_config(path, edges)
