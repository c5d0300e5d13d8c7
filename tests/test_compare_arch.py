"""bench/compare_arch.py: the DiT-vs-U-Net table from two runs' fid.json (tiny hand-made files)."""

from __future__ import annotations

import json

import pytest

from bench.compare_arch import main


def _row(task, label, fid, kid=0.1, method=None):
    return {
        "task": task,
        "label": label,
        "method": label.split(" seed ")[0] if method is None else method,
        "status": "ok",
        "fid": fid,
        "kid_mean": kid,
        "feature_network": "efficientnet-lite0",
        "num_generated": 8,
        "num_reference": 8,
    }


def _write(path, rows):
    path.write_text(json.dumps({"results": rows}))
    return path


def test_the_table_pairs_each_task_and_method_and_judges_by_the_seed_spread(tmp_path, capsys):
    dit = _write(
        tmp_path / "dit.json",
        [
            _row("emoji", "full", 100.0),
            _row("emoji", "full seed 1", 102.0),
            _row("emoji", "difffit", 150.0),
            _row("emoji", "affiner", 90.0),  # DiT-only method: not in the table
            _row("emoji", "no adapter", 200.0, method=""),
            _row("icons", "full", 80.0),
            _row("tiles", "bitfit", 100.0),
            _row("tiles", "bitfit seed 1", 104.0),
            _row("textiles", "bitfit", 100.0),
            _row("textiles", "bitfit seed 1", 104.0),
        ],
    )
    unet = _write(
        tmp_path / "unet.json",
        [
            _row("emoji", "full", 120.0),
            _row("emoji", "full seed 1", 121.0),
            _row("emoji", "difffit", 149.0),
            _row("emoji", "no adapter", 210.0, method=""),
            _row("tiles", "bitfit", 120.0),  # one seed against DiT's 102 ± 2.8: beyond twice that
            _row("textiles", "bitfit", 105.0),  # inside it
        ],
    )
    assert main([str(dit), str(unet)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in lines if line.startswith("| ")}
    assert "| win |" in rows[("emoji", "full")]  # 101 ± 1.4 against 120.5 ± 0.7: beyond the spread
    assert "+99.0" in rows[("emoji", "full")] and "+89.5" in rows[("emoji", "full")]  # gains over no adapter
    assert "| ? |" in rows[("emoji", "difffit")]  # one seed each: no verdict
    assert "| win (est.) |" in rows[("tiles", "bitfit")]  # the U-Net's one seed taken to spread as the DiT's
    assert "| tie (est.) |" in rows[("textiles", "bitfit")]
    assert ("emoji", "affiner") not in rows and ("icons", "full") not in rows  # only what both ran
    assert "200.0 | 210.0" in rows[("emoji", "no adapter")]


def test_an_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(SystemExit, match="bad.json: not a readable fid.json"):
        main([str(bad), str(bad)])


def test_a_run_of_the_other_arch_is_refused_by_name(tmp_path):
    for name, arch in (("dit", "dit"), ("unet", "unet")):
        (tmp_path / name).mkdir()
        _write(tmp_path / name / "fid.json", [_row("emoji", "full", 100.0)])
        (tmp_path / name / "config.json").write_text(json.dumps({"model": {"arch": arch}}))
    dit, unet = str(tmp_path / "dit" / "fid.json"), str(tmp_path / "unet" / "fid.json")
    assert main([dit, unet]) == 0
    with pytest.raises(SystemExit, match=r"unet/fid.json: a model.arch=unet run .* where the dit run goes"):
        main([unet, dit])


def test_compare_unet_has_compare_yamls_data_and_budgets():
    from diffscaler.config import load_config

    unet = load_config("ray_jobs/configs/compare-unet.yaml")
    # make compare-unet takes its DiT side from either run: both must hold the U-Net run's budgets
    for dit in (load_config("ray_jobs/configs/compare.yaml"), load_config("ray_jobs/configs/compare-matched.yaml")):
        _same_data_and_budgets(dit, unet)
    assert "sweep" not in unet.pipeline.stages


def _same_data_and_budgets(dit, unet):
    assert unet.model.arch == "unet" and dit.model.arch == "dit"
    assert unet.model.input_size == dit.model.input_size and unet.model.num_classes == dit.model.num_classes
    assert unet.data == dit.data and unet.eval == dit.eval and unet.diffusion == dit.diffusion
    for key in ("steps", "global_batch_size", "grad_accum_steps", "lr", "warmup_steps", "ema_decay", "seed"):
        assert getattr(unet.pretrain, key) == getattr(dit.pretrain, key), key
    for key in ("steps", "batch_size", "warmup_steps", "grad_clip", "seed", "mixed"):
        assert getattr(unet.finetune, key) == getattr(dit.finetune, key), key
    assert set(unet.finetune.methods) == {"full", "difffit", "bitfit"} <= set(dit.finetune.methods)
