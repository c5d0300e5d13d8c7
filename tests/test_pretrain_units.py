"""Pretraining pieces that need no cluster: DeepSpeed config, warm-up, EMA, logs, checkpoint files."""

from __future__ import annotations

import json

import pytest
import torch

from diffscaler.config import ExperimentConfig, PretrainConfig
from diffscaler.train.deepspeed_setup import (
    build_optimizer,
    deepspeed_config,
    micro_batch_size,
    resolve_precision,
    warmup_factor,
    warmup_scheduler,
)
from diffscaler.train.ema import EmaWeights, effective_decay
from diffscaler.train.pretrain_checkpoint import (
    STATE_FILE,
    TrainerState,
    capture_rng,
    checkpoint_dir_name,
    latest_checkpoint,
    read_state,
    restore_rng,
)
from diffscaler.train.train_log import (
    MetricsLog,
    device_peak_flops,
    follow_progress,
    format_line,
    read_jsonl,
    training_flops_per_image,
)


def test_deepspeed_config_follows_pretrain_section():
    p = PretrainConfig(num_workers=4, global_batch_size=64, grad_accum_steps=2, grad_clip=0.5, zero_stage=3)
    cfg = deepspeed_config(p, world_size=4, use_gpu=True)
    assert micro_batch_size(p) == 8
    sizes = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"])
    assert sizes == (64, 8, 2)
    assert cfg["gradient_clipping"] == 0.5 and cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]  # auto = bf16 on GPU
    assert "optimizer" not in cfg  # a torch AdamW object is passed instead (no fused-op JIT)
    cpu = deepspeed_config(PretrainConfig(zero_stage=2), world_size=2, use_gpu=False)
    assert not cpu["bf16"]["enabled"] and cpu["zero_optimization"] == {
        "stage": 2,
        "contiguous_gradients": True,
        "overlap_comm": False,
        "reduce_scatter": True,
    }
    assert resolve_precision("bf16", use_gpu=False) == "bf16"
    with pytest.raises(ValueError, match="num_workers=2"):
        deepspeed_config(PretrainConfig(), world_size=3, use_gpu=False)


def test_warmup_is_linear_then_constant_and_weight_decay_skips_vectors():
    assert [warmup_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, PretrainConfig(lr=0.1, weight_decay=0.05))
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    sched = warmup_scheduler(2)(opt)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.05, 0.1, 0.1])


def test_ema_tracks_trainable_parameters_only_with_decay_warmup():
    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    ema = EmaWeights(model, decay=0.9)
    assert ema.names == ["weight"] and not ema.partitioned
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()  # decay min(0.9, 1/10) = 0.1: the EMA moves 90 % of the way
    assert effective_decay(0.9, 0) == pytest.approx(0.1)
    torch.testing.assert_close(ema.full_state()["weight"], start + 0.9)
    other_model = torch.nn.Linear(2, 2)
    other_model.bias.requires_grad_(False)
    other = EmaWeights(other_model, decay=0.9)
    other.load_full_state(ema.full_state(), ema.num_updates)
    torch.testing.assert_close(other.full_state()["weight"], ema.full_state()["weight"])
    assert other.num_updates == 1
    assert effective_decay(0.999, 10_000) == 0.999


def test_peak_flops_are_named():
    assert device_peak_flops(0.0, True, "NVIDIA H100 80GB HBM3") == (989e12, "H100 dense bf16 peak 989 TFLOP/s")
    flops, source = device_peak_flops(0.0, False)
    assert flops == 1e12 and "nominal CPU" in source
    assert device_peak_flops(2.5, True, "NVIDIA H100")[0] == 2.5e12
    assert training_flops_per_image(100) == 600


def _state(step: int) -> TrainerState:
    cfg = ExperimentConfig()
    return TrainerState(
        step=step,
        micro_step=step,
        images_seen=32 * step,
        ema_updates=step,
        ema_decay=0.99,
        world_size=2,
        zero_stage=2,
        precision="fp32",
        global_batch_size=32,
        grad_accum_steps=1,
        deepspeed_tag=f"step{step:08d}",
        run_name="r",
        model=cfg.to_dict()["model"],
        shards={"content_hash": "sha256:x"},
    )


def test_latest_checkpoint_is_the_highest_complete_one(tmp_path):
    for step, complete in ((4, True), (8, True), (12, False)):
        folder = tmp_path / checkpoint_dir_name(step)
        folder.mkdir()
        if complete:
            (folder / STATE_FILE).write_text(_state(step).to_json())
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    url, state = latest_checkpoint(str(tmp_path))
    assert url.endswith("checkpoint_step00000008") and state == read_state(url) == _state(8)
    assert latest_checkpoint(str(tmp_path / "nothing")) is None
    (tmp_path / checkpoint_dir_name(8) / STATE_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a DiffScaler pretraining state"):
        read_state(str(tmp_path / checkpoint_dir_name(8)))


def test_rng_states_round_trip_through_json():
    torch.manual_seed(3)
    saved = json.loads(json.dumps(capture_rng()))
    expected = torch.rand(4)
    torch.manual_seed(99)
    restore_rng(saved)
    torch.testing.assert_close(torch.rand(4), expected)


def test_metrics_log_keeps_one_line_per_step_across_a_restart(tmp_path):
    log = MetricsLog(tmp_path, start_step=0, total_steps=6, print_lines=False)
    for step in range(1, 6):
        log.log({"step": step, "loss": 1.0 / step, "lr": 0.1, "images_per_s": 10.0, "mfu": 0.01})
    log.close()
    history = read_jsonl(tmp_path / "metrics.jsonl")[:2]  # what the step-2 checkpoint carried
    resumed = MetricsLog(tmp_path, start_step=2, total_steps=6, print_lines=False, history=history)
    assert [r["step"] for r in resumed.discarded] == [3, 4, 5]
    resumed.log({"step": 3, "loss": 0.3, "lr": 0.1, "images_per_s": 10.0, "mfu": 0.01})
    resumed.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # cut by a kill
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_progress_bar_follows_the_metrics_file(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    record = {"step": 5, "loss": 0.5, "lr": 1e-3, "images_per_s": 20.0, "mfu": 0.01, "grad_norm": 0.2}
    with follow_progress(path, total_steps=10, enabled=True):
        path.write_text(json.dumps(record) + "\n")
        import time

        time.sleep(1.5)
    assert "5/10" in capsys.readouterr().err
    line = format_line(record, 10)
    assert line == "pretrain: step 5/10, loss 0.5000, lr 1.00e-03, 20.0 images/s, MFU 1.00%, grad-norm 0.200"


def test_standalone_pretrain_keeps_its_checkpoints_inside_out(tmp_path, monkeypatch):
    """A relative pretrain.storage_path is inside --out: a new --out never resumes another run's checkpoint."""
    import diffscaler.train.pretrain as pretrain
    from ray_jobs.pretrain import main

    seen = []

    def fake_run(cfg, out, shards=None, weights="ema"):
        seen.append(cfg.pretrain.storage_path)
        raise pretrain.PretrainError("stop here")

    monkeypatch.setattr(pretrain, "run_pretrain", fake_run)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("pretrain:\n  storage_path: runs/ray\n")
    assert main(["--config", "c.yaml", "--out", "new"]) == 1
    assert main(["--config", "c.yaml", "--out", "new", f"pretrain.storage_path={tmp_path / 'abs'}"]) == 1
    assert main(["--config", "c.yaml", "--out", "new", "pretrain.storage_path=s3://bucket/ray"]) == 1
    assert seen == [str(tmp_path / "new" / "runs" / "ray"), str(tmp_path / "abs"), "s3://bucket/ray"]


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    """Same model, shards, seeds and schedule, or the resume is refused naming each difference."""
    from dataclasses import asdict, replace

    from diffscaler.config import ConfigError, load_config
    from diffscaler.train.pretrain import NAN_MARKER, check_resumable

    base = ["pretrain.num_workers=2", "pretrain.steps=8", "pretrain.lr=0.002", "model.num_classes=4"]
    cfg = load_config(None, base)
    run_dir = tmp_path / "run"
    where = str(run_dir / checkpoint_dir_name(4))
    state = replace(
        _state(4),
        world_size=2,
        zero_stage=cfg.pretrain.zero_stage,
        ema_decay=cfg.pretrain.ema_decay,
        global_batch_size=cfg.pretrain.global_batch_size,
        model=asdict(cfg.model),
        shards={"content_hash": "sha256:aaa"},
        config=cfg.to_dict(),
    )
    check_resumable(state, cfg, where, "sha256:aaa")  # its own run
    check_resumable(state, load_config(None, [*base, "pretrain.steps=12"]), where, "sha256:aaa")

    def refused(overrides: list[str], shards_hash: str = "sha256:aaa") -> str:
        with pytest.raises(ConfigError, match="not a checkpoint of this run") as err:
            check_resumable(state, load_config(None, [*base, *overrides]), where, shards_hash)
        return str(err.value)

    assert "shards (content hash): checkpoint 'sha256:aaa', config 'sha256:bbb'" in refused([], "sha256:bbb")
    assert "model.class_dropout_prob: checkpoint 0.1, config 0.2" in refused(["model.class_dropout_prob=0.2"])
    assert "pretrain.seed: checkpoint 0, config 1" in refused(["pretrain.seed=1"])
    assert "data.seed: checkpoint 0, config 5" in refused(["data.seed=5"])
    assert "pretrain.lr: checkpoint 0.002, config 0.001" in refused(["pretrain.lr=0.001"])
    assert "pretrain.warmup_steps" in refused(["pretrain.warmup_steps=3"])
    assert "at step 4, past the config's 3" in refused(["pretrain.steps=3"])
    both = refused(["pretrain.seed=1", "data.seed=5"])
    assert "pretrain.seed" in both and "data.seed" in both  # every difference at once

    # After a divergence the last good checkpoint may continue with a lower lr (the documented way on).
    run_dir.mkdir()
    (run_dir / NAN_MARKER).write_text(json.dumps({"last_checkpoint": 4, "step": 5}))
    check_resumable(state, load_config(None, [*base, "pretrain.lr=0.001"]), where, "sha256:aaa")
    (run_dir / NAN_MARKER).write_text(json.dumps({"last_checkpoint": 2, "step": 3}))  # an older divergence
    refused(["pretrain.lr=0.001"])


def test_nonfinite_message_without_a_checkpoint_does_not_name_step_0():
    from diffscaler.train.pretrain import nonfinite_message

    p = PretrainConfig(lr=0.5, checkpoint_every=50)
    none = nonfinite_message(p, 3, float("nan"), 0, "runs/ray/pretrain")
    assert "step 0" not in none and "No checkpoint was written yet" in none and "lr (now 0.5)" in none
    some = nonfinite_message(p, 53, float("inf"), 50, "runs/ray/pretrain")
    assert "The last good checkpoint is step 50 in runs/ray/pretrain" in some and "continue from it" in some
