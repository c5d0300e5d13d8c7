"""The report stage's own choices: how many CPU threads sample its grids, and how it names the model's input.

No Ray: `write_report` on real backbone files (random weights) and, for the latent case, a tiny random VAE.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffscaler.artifacts import save_backbone
from diffscaler.config import load_config
from diffscaler.models import build_model
from diffscaler.report import ReportInputs, write_report


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("model", "size", "threads"), [("DiT-T/4", 16, 1), ("DiT-S/4", 32, 2)])
def test_grids_are_sampled_on_one_thread_only_for_a_tiny_backbone(
    model, size, threads, tmp_path, monkeypatch, two_threads
):
    """The report used to force one thread whatever the model: half the wall time of a DiT-XL/2 run."""
    import diffscaler.report as report

    cfg = load_config(
        None,
        [f"model.name={model}", f"model.input_size={size}", f"data.image_size={size}", "diffusion.sampling_steps=1"],
    )
    backbone = tmp_path / "backbone.safetensors"
    save_backbone(build_model(cfg.model, seed=0), backbone)
    seen: list[int] = []
    real = report.sample_images

    def counting_threads(*args, **kwargs):  # the real sampler, noting the threads it runs on
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "sample_images", counting_threads)
    write_report(ReportInputs(cfg, tmp_path, backbone=backbone))
    assert seen == [threads] and torch.get_num_threads() == 2  # and the process's setting is back


def test_a_latent_backbone_input_is_named_in_latent_cells(tmp_path):
    """Latent backbones take latent cells, not pixels: '8x8 px' for a 16 px image's latents was wrong."""
    from diffscaler.vae import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae")  # downsamples 2: 16 px images -> 4x8x8 latents
    cfg = load_config(
        None,
        [
            "model.name=DiT-T/4",
            "model.input_size=8",
            "model.in_channels=4",
            "data.image_size=16",
            f"data.vae={vae}",
            "diffusion.sampling_steps=1",
        ],
    )
    backbone = tmp_path / "backbone.safetensors"
    save_backbone(build_model(cfg.model, seed=0), backbone)
    write_report(ReportInputs(cfg, tmp_path, backbone=backbone))
    report = Path(tmp_path / "report.md").read_text()
    assert report.count("8x8 latent cells (16x16 px images)") == 2 and "8x8 px" not in report  # backbone, config


@pytest.mark.parametrize("with_map", [False, True])
def test_the_fid_table_has_a_condition_fidelity_column_only_when_a_task_has_a_map(with_map, tmp_path):
    """A run without conditional tasks showed an empty 'condition fidelity' column on every row."""
    import json

    def row(task: str, label: str, fidelity: float | None) -> dict:
        r = {"task": task, "label": label, "method": label, "status": "ok", "feature_network": "inception"}
        r |= {"num_generated": 8, "num_reference": 8, "fid": 10.0, "kid_mean": 0.1, "kid_std": 0.01}
        return r | ({"fidelity": fidelity, "fidelity_metric": "mask_iou"} if fidelity is not None else {})

    rows = [row("a", "affiner", None), row("b", "affiner", 0.75 if with_map else None)]
    fid_json = tmp_path / "fid.json"
    fid_json.write_text(json.dumps({"results": rows}))
    cfg = load_config(None, ["model.name=DiT-T/4", "model.input_size=16", "data.image_size=16"])
    text = write_report(ReportInputs(cfg, tmp_path / "r", fid_json=fid_json))[0].read_text()
    header = next(line for line in text.splitlines() if line.startswith("| task | method | lr |"))
    assert ("condition fidelity" in header) is with_map
    table = [line for line in text.splitlines() if line.startswith("| a | affiner") or line.startswith("| b | affiner")]
    assert len(table) == 2 and all(line.count("|") == header.count("|") for line in table)
    assert ("0.750 IoU" in table[1]) is with_map


def test_the_report_shows_each_fine_tunes_speed_per_cpu_against_pretraining(tmp_path):
    """Issue 26: the real jobs' images/s per CPU, fine-tune against pretraining, in the report."""
    import json

    from diffscaler.adapters import AdapterBank, TaskInfo
    from diffscaler.artifacts import load_backbone, save_adapter

    cfg = load_config(
        None, ["model.name=DiT-T/4", "model.input_size=16", "data.image_size=16", "pretrain.num_workers=2"]
    )
    backbone = tmp_path / "backbone.safetensors"
    save_backbone(build_model(cfg.model, seed=0), backbone)
    model, meta = load_backbone(backbone)
    bank = AdapterBank.attach(model, [TaskInfo("a")], method="affiner", rank=2)
    adapter, _ = save_adapter(
        bank, "a", tmp_path / "adapters", meta["content_hash"], {"finetune": {"images_per_s": 45.0}}
    )
    metrics = tmp_path / "metrics.jsonl"  # the first tenth of the steps (warm-up) is left out of the median
    rates = [(10, 5.0), (20, 60.0), (30, 60.0), (40, 64.0), (50, 50.0), (100, 60.0)]
    metrics.write_text("".join(json.dumps({"step": s, "loss": 0.1, "images_per_s": r}) + "\n" for s, r in rates))
    inputs = ReportInputs(cfg, tmp_path / "r", adapters={"affiner": {"a": str(adapter)}}, pretrain_metrics=metrics)
    text = write_report(inputs)[0].read_text()
    assert "**30.0 images/s per CPU**" in text  # median 60 over 2 workers x 1 CPU
    assert "| affiner | a | 45.0 | 1.50x |" in text, text[text.index("## Training speed") :]


def test_the_sweep_section_lists_every_swept_method(tmp_path):
    """With sweep.methods, best.json holds each method's winner: the report lists them all (it showed only
    the first method's)."""
    import json

    row = {"rank": 1, "lr": 1e-3, "val_loss": 0.0569, "steps": 60, "selected_by": "val_loss", "trial_id": "t0"}
    best = {
        "datasets": {"emoji": {**row, "method": "affiner"}},
        "methods": {
            "affiner": {"emoji": {**row, "method": "affiner"}},
            "full": {"emoji": {**row, "method": "full", "rank": 8, "lr": 1e-4, "trial_id": "t1"}},
        },
    }
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "best.json").write_text(json.dumps(best))
    cfg = load_config(None, ["model.name=DiT-T/4", "model.input_size=16", "data.image_size=16"])
    text = write_report(ReportInputs(cfg, tmp_path / "r", sweep_dir=tmp_path / "sweep"))[0].read_text()
    table = text[text.index("## Sweep (Ray Tune)") :]
    assert "| dataset | method | rank | lr |" in table
    assert "| emoji | affiner | 1 | 0.001 |" in table and "| emoji | full | 8 | 0.0001 |" in table
