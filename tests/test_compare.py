"""The comparison table's parts: the scratch method, per-method learning rates and seeds, the floor and
no-adapter rows, the task accuracy, and the report's table; then the whole flow on the micro pipeline.

    .venv/bin/python -m pytest tests/test_compare.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffscaler.artifacts import is_task_model, load_backbone, read_trained_meta
from diffscaler.config import ConfigError, load_config
from diffscaler.eval.stats import nearest_centroid_accuracy
from diffscaler.train.finetune import finetune_variants, method_lr, plan_finetunes
from diffscaler.train.finetune_loop import AdapterRun, AdapterRunSpec
from tests.support.finetune import make_work, tiny_config

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


def test_per_method_lrs_seeds_and_lr_grid_parse_and_bad_values_name_the_field():
    cfg = load_config(
        None,
        [
            "finetune.methods=[affiner, full, scratch]",
            "finetune.method_lrs={full: 1.0e-4}",
            "finetune.extra_seeds={affiner: [1, 2]}",
            "sweep.lrs=[1.0e-3, 1.0e-2]",
        ],
    )
    assert method_lr(cfg, "full") == 1e-4 and method_lr(cfg, "affiner") == cfg.finetune.lr
    assert cfg.sweep.lrs == (1e-3, 1e-2)
    labels = [(v.label, v.seed, v.subdir) for v in finetune_variants(cfg)]
    assert labels == [
        ("affiner", 0, ""),
        ("full", 0, ""),
        ("scratch", 0, ""),
        ("affiner seed 1", 1, "affiner-seed1"),
        ("affiner seed 2", 2, "affiner-seed2"),
    ]
    bad = {
        "finetune.method_lrs={nosuch: 1.0e-3}": "finetune.method_lrs",
        "finetune.method_lrs={full: -1.0}": "finetune.method_lrs.full",
        "finetune.extra_seeds={lora: [1]}": "finetune.extra_seeds",
        "sweep.lrs=[0.0]": "sweep.lrs",
        "sweep.methods=[nosuch]": "sweep.methods",
        "eval.reference_split=test": "eval.reference_split",
        "finetune.methods=[scratch, nosuch]": "finetune.methods",
    }
    for override, field in bad.items():
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config(None, [override])


# ------------------------------------------------------------------------------------------------
# scratch: the same DiT from random init, every parameter, on the task alone
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("compare"))


def test_scratch_trains_every_parameter_of_a_fresh_model_and_saves_a_task_model(work, tmp_path):
    cfg = tiny_config(work.shards, "[{name: ta, conditional: true}, {name: tb}]", "finetune.methods=[scratch]")
    plan = plan_finetunes(cfg, work.backbone, tmp_path)
    (job,) = [j for j in plan.jobs if j.key == "scratch/tb"]
    run = AdapterRun(AdapterRunSpec.from_dict(job.spec.to_dict()))
    backbone, _ = load_backbone(work.backbone)
    assert run.bank is None and run.model.config.num_classes == 1  # the task's own (unconditional) class
    fresh = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    # not the backbone: a fresh init (the backbone's zero tensors were perturbed by make_backbone)
    assert not torch.equal(fresh["final_layer.linear.weight"], backbone.final_layer.linear.weight)
    run.train_until(3)
    moved = [n for n, p in run.model.named_parameters() if p.requires_grad and not torch.equal(p, fresh[n])]
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert set(moved) == set(trainable) - {"y_embedder.embedding_table.weight"} or set(moved) == set(trainable)
    assert run.trainable_parameters("tb") == sum(p.numel() for p in run.model.parameters() if p.requires_grad)

    extra = {"tb": {"finetune": {"fingerprint": job.fingerprint}}}
    files = run.save_adapters(tmp_path / "scratch", per_task_extra=extra)
    path = Path(files["tb"])
    assert is_task_model(path) and not is_task_model(work.backbone)
    meta = read_trained_meta(path)
    assert meta["method"] == "scratch" and meta["task"] == "tb" and meta["backbone_hash"] == work.hash
    assert meta["trainable_params"] > 0.9 * meta["backbone_params"]
    model, _ = load_backbone(path)  # a whole model, loadable on its own
    for n, p in model.named_parameters():
        assert torch.equal(p, dict(run.model.named_parameters())[n])
    run.close()


def test_scratch_has_no_mixed_form(work, tmp_path):
    from diffscaler.train.finetune import FinetuneInputError

    cfg = tiny_config(work.shards, "[{name: ta}, {name: tb}]", "finetune.methods=[scratch]", "finetune.mixed=true")
    with pytest.raises(FinetuneInputError, match="scratch"):
        plan_finetunes(cfg, work.backbone, tmp_path)


def test_extra_seeds_and_method_lrs_give_their_own_runs_folders_and_fingerprints(work, tmp_path):
    cfg = tiny_config(
        work.shards,
        "[{name: tb}]",
        "finetune.methods=[affiner, full]",
        "finetune.method_lrs={full: 1.0e-4}",
        "finetune.extra_seeds={affiner: [7]}",
    )
    plan = plan_finetunes(cfg, work.backbone, tmp_path)
    jobs = {j.key: j for j in plan.jobs}
    assert set(jobs) == {"affiner/tb", "full/tb", "affiner seed 7/tb"}
    assert jobs["full/tb"].spec.lr == 1e-4 and jobs["affiner/tb"].spec.lr == cfg.finetune.lr
    assert Path(jobs["affiner seed 7/tb"].out_dir) == tmp_path.resolve() / "affiner-seed7"
    assert jobs["affiner seed 7/tb"].spec.config["finetune"]["seed"] == 7
    assert jobs["affiner seed 7/tb"].fingerprint != jobs["affiner/tb"].fingerprint


# ------------------------------------------------------------------------------------------------
# Task accuracy and the report's table
# ------------------------------------------------------------------------------------------------


def test_nearest_centroid_accuracy():
    centroids = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    feats = np.array([[1.0, 1.0], [9.0, 0.5], [0.5, 1.0], [0.2, 8.0]])
    assert nearest_centroid_accuracy(feats, centroids, 0) == pytest.approx(0.5)
    assert nearest_centroid_accuracy(feats, centroids, 1) == pytest.approx(0.25)
    assert nearest_centroid_accuracy(feats[:1], centroids, 2) == 0.0


def _fid_row(task, label, method, fid, kid, acc, source="generated"):
    return {
        "task": task,
        "label": label,
        "method": method,
        "fid": fid,
        "kid_mean": kid,
        "kid_std": 0.01,
        "task_accuracy": acc,
        "status": "ok",
        "feature_network": "efficientnet-lite0",
        "num_generated": 16,
        "num_reference": 40,
        "source": source,
        "reference_split": "train",
    }


def test_report_table_has_reference_rows_task_accuracy_and_averages(work, tmp_path):
    from diffscaler.report import ReportInputs, _fid_section

    cfg = tiny_config(work.shards, "[{name: ta}, {name: tb}]")
    rows = []
    for task, base in (("ta", 100.0), ("tb", 50.0)):
        rows += [
            _fid_row(task, "floor (real)", "real", base / 10, 0.001, 0.9, "real"),
            _fid_row(task, "no adapter", "", base * 3, 0.5, 0.1),
            _fid_row(task, "affiner", "affiner", base, 0.1, 0.8),
        ]
    fid_json = tmp_path / "fid.json"
    fid_json.write_text(json.dumps({"results": rows}))
    text = "\n".join(_fid_section(ReportInputs(cfg, tmp_path, adapters={"affiner": {}}, fid_json=fid_json)))
    assert "floor (real)" in text and "no adapter" in text and "task acc." in text and "train split" in text
    averages = text[text.index("Averages") :]
    assert "| affiner | 2 | 75.00 | 0.1000 ± 0.0100 | 0.80 |" in averages
    assert "| floor (real) | 2 | 7.50 |" in averages and "| no adapter | 2 | 225.00 |" in averages
    # reference rows come first in each task's block
    block = text[text.index("| ta |") :]
    assert block.index("floor (real)") < block.index("no adapter") < block.index("| affiner |")


# ------------------------------------------------------------------------------------------------
# The whole flow: sweep per method first, fine-tunes at the swept lr, reference rows, the table
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~85 s: the default suite stays near 15 min; CI runs it in `make test-slow`
@pytest.mark.ray
def test_comparison_flow_on_the_micro_pipeline(ray_local, tmp_path):
    from diffscaler.pipeline import run_pipeline
    from tests.support.pipeline import micro_config

    stages = ["shards", "pretrain", "sweep", "finetune", "evaluate", "report"]
    cfg = load_config(
        micro_config(
            tmp_path,
            stages,
            finetune={"methods": ["affiner", "scratch"], "lr_from_sweep": True, "extra_seeds": {"affiner": [1]}},
            sweep={
                "methods": ["affiner", "scratch"],
                "lrs": [1.0e-3, 1.0e-2],
                "ranks": [2],
                "num_samples": 1,
                "max_steps": 2,
                "rung_steps": 2,
                "fid_candidates": 0,
            },
        )
    )
    out = tmp_path / "run"
    run_pipeline(cfg, out)
    manifest = json.loads((out / "pipeline.json").read_text())
    assert manifest["status"] == "done", manifest["error"]
    assert manifest["stages"]["sweep"]["finished_at"] <= manifest["stages"]["finetune"]["started_at"]

    best = json.loads((out / "sweep" / "best.json").read_text())
    swept = {m: rows["red"]["lr"] for m, rows in best["methods"].items()}
    assert set(swept) == {"affiner", "scratch"} and all(lr in (1e-3, 1e-2) for lr in swept.values())
    for label, folder in (
        ("affiner", out / "adapters"),
        ("scratch", out / "adapters" / "scratch"),
        ("affiner seed 1", out / "adapters" / "affiner-seed1"),
    ):
        for task in ("red", "blue"):
            meta = read_trained_meta(folder / f"{task}.safetensors")
            assert meta["finetune"]["lr"] == swept[label.split()[0]], (label, task)
    assert is_task_model(out / "adapters" / "scratch" / "red.safetensors")

    fid = json.loads((out / "fid.json").read_text())
    labels = {(r["task"], r["label"]) for r in fid["results"]}
    assert labels == {
        (t, lab)
        for t in ("red", "blue")
        for lab in ("affiner", "scratch", "affiner seed 1", "floor (real)", "no adapter")
    }
    for r in fid["results"]:
        assert r["status"] == "ok" and r["fid"] is not None and 0.0 <= r["task_accuracy"] <= 1.0, r
    report = (out / "report.md").read_text()
    for part in (
        "| red | floor (real) |",
        "| blue | no adapter |",
        "| red | scratch |",
        "Averages over the tasks",
        "methods_red.png",
        "task acc.",
    ):
        assert part in report, part
    assert (out / "methods_blue.png").stat().st_size > 0

    run_pipeline(cfg, out)  # a rerun: the sweep's lrs give the same fingerprints, nothing retrains
    statuses = {k: v["status"] for k, v in json.loads((out / "pipeline.json").read_text())["stages"].items()}
    assert statuses == {**dict.fromkeys(stages[:-1], "skipped"), "report": "done"}
