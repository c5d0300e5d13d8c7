"""Backbone pretraining on a real local Ray cluster with real DeepSpeed engines (2 CPU workers).

Data: 96 synthetic 32x32 images in 4 classes (a coloured square per class), written as real shards.
Each Ray run costs ~15-30 s on 2 cores (worker start, DeepSpeed init); the runs are shared by
module-scoped fixtures so the file stays at a few minutes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffscaler.artifacts import load_backbone
from diffscaler.config import ConfigError, load_config
from diffscaler.data.index import DatasetError
from tests.support.pretrain import TINY, events, make_pretrain_shards, read_jsonl, tiny_cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_pretrain_shards(tmp_path_factory.mktemp("pretrain-data"))


@pytest.fixture(scope="module")
def zero2_run(ray_local, shards, tmp_path_factory):
    """ZeRO-2, 8 steps, checkpoints at 4 and 8."""
    from diffscaler.train.pretrain import run_pretrain

    tmp = tmp_path_factory.mktemp("zero2")
    cfg = tiny_cfg(tmp, "z2")
    result = run_pretrain(cfg, tmp / "out", shards)
    return tmp, cfg, result


# ------------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_zero2_trains_exports_and_resumes(zero2_run, shards):
    from diffscaler.diffusion import GaussianDiffusion
    from diffscaler.diffusion.sampling import sample_images
    from diffscaler.train.pretrain import run_pretrain

    tmp, cfg, result = zero2_run
    out = tmp / "out"
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for m in metrics:
        assert set(m) >= {"step", "loss", "lr", "images_per_s", "mfu"}
        assert m["images_per_s"] > 0 and 0 < m["mfu"] < 1
    # A fresh DiT predicts zero noise (loss ~1); a few high-lr steps must bring the loss down.
    first, last = metrics[0]["loss"], np.mean([m["loss"] for m in metrics[-3:]])
    assert last < 0.8 * first, [round(m["loss"], 3) for m in metrics]
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step00000004.png", "step00000008.png"]
    assert Path(result.checkpoint, "samples.png").is_file()

    # The export loads, names its provenance, and samples.
    model, meta = load_backbone(result.backbone, expect=cfg.model)
    prov = meta["provenance"]
    assert (prov["step"], prov["weights"], prov["world_size"], prov["zero_stage"]) == (8, "ema", 2, 2)
    assert prov["run_name"] == "z2" and meta["content_hash"] == result.content_hash
    images = sample_images(
        model, GaussianDiffusion.from_config(cfg.diffusion), num=4, seed=0, labels=[0, 1, 2, 3], steps=4
    )
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8

    # Rerun with the same storage path and run name, for 4 more steps: resumes at step 8.
    cfg12 = tiny_cfg(tmp, "z2", "pretrain.steps=12")
    resumed = run_pretrain(cfg12, out, shards)
    assert resumed.step == 12
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 13))  # one line per step, no repeats
    resume = events(out, "resume")
    assert len(resume) == 1 and resume[0]["step"] == 8 and resume[0]["checkpoint"].endswith("checkpoint_step00000008")
    assert np.mean([m["loss"] for m in metrics[8:]]) < 0.8 * first  # the curve continues, no jump back
    assert load_backbone(resumed.backbone)[1]["provenance"]["step"] == 12


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_zero3_worker_killed_restarts_exactly_from_last_checkpoint(zero2_run, shards, tmp_path):
    """Rank 1 exits hard at step 7; Ray restarts the group from the step-4 checkpoint; the run ends.

    Exactness: the losses of the repeated steps 5-6 equal those logged before the crash, which needs
    the DeepSpeed ZeRO-3 shards, the partitioned EMA, every rank's RNG states and the data position to
    be restored. The ZeRO-3 EMA (gathered from partitions) matches the ZeRO-2 run's (whole tensors).
    """
    from diffscaler.train.pretrain import run_pretrain
    from diffscaler.train.pretrain_checkpoint import export_backbone, load_ema_state

    cfg = tiny_cfg(tmp_path, "z3", "pretrain.zero_stage=3")
    out = tmp_path / "out"
    result = run_pretrain(cfg, out, shards, fail_at_step=7)
    assert result.step == 8
    assert (tmp_path / "ray" / "z3" / "injected_failure_step00000007.json").is_file()
    resume = events(out, "resume")
    assert len(resume) == 1 and resume[0]["step"] == 4  # the last checkpoint before the failure
    repeated = [d["step"] for d in resume[0]["discarded"]]
    assert repeated == [5, 6] and len(repeated) <= cfg.pretrain.checkpoint_every
    metrics = {m["step"]: m for m in read_jsonl(out / "metrics.jsonl")}
    assert sorted(metrics) == list(range(1, 9))
    for before in resume[0]["discarded"]:
        assert metrics[before["step"]]["loss"] == before["loss"]  # bit-exact resume

    # ZeRO-3 EMA gathered from partitions vs ZeRO-2 EMA kept whole: same training, same weights.
    z2_tmp, _cfg2, _result2 = zero2_run
    z2_state = load_ema_state(str(z2_tmp / "ray" / "z2" / "checkpoint_step00000008"))  # (the test above goes on)
    z3_state = load_backbone(result.backbone)[0].state_dict()
    for name, tensor in z2_state.items():
        torch.testing.assert_close(z3_state[name], tensor, atol=1e-4, rtol=1e-3, msg=name)
    # Raw weights, consolidated offline from the ZeRO-3 partitions, differ from the EMA ones.
    raw_hash = export_backbone(result.checkpoint, tmp_path / "raw" / "backbone.safetensors", weights="raw")
    raw, meta = load_backbone(tmp_path / "raw" / "backbone.safetensors", expect=cfg.model)
    assert meta["provenance"]["weights"] == "raw" and raw_hash != result.content_hash
    assert set(raw.state_dict()) == set(z3_state)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(ray_local, shards, tmp_path):
    from diffscaler.train.pretrain import NonFiniteLossError, run_pretrain
    from diffscaler.train.pretrain_checkpoint import latest_checkpoint

    # lr 1e30: the first AdamW step moves every weight by ~1e30, the second forward overflows.
    # (Smaller "too high" rates are not enough: DeepSpeed skips steps whose gradient norm is inf,
    # and the loss then stays huge but finite.) Checkpoint every step.
    cfg = tiny_cfg(
        tmp_path,
        "nan",
        "pretrain.lr=1.0e+30",
        "pretrain.grad_clip=0.0",
        "pretrain.checkpoint_every=1",
        "pretrain.sample_every=0",
        "pretrain.max_failures=1",
    )
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as info:
        run_pretrain(cfg, tmp_path / "out", shards)
    bad_step = int(info.value.args[0].split("at step ")[1].split(" ")[0])
    assert bad_step == 2
    found = latest_checkpoint(str(tmp_path / "ray" / "nan"))
    assert found is not None and found[1].step == bad_step - 1  # the last good one is the latest
    assert f"last good checkpoint is step {bad_step - 1}" in str(info.value)
    # The automatic restart (max_failures=1) stopped at once on the marker instead of training again.
    starts = events(tmp_path / "out", "start") + events(tmp_path / "out", "resume")
    assert len(starts) == 1


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_an_infinite_gradient_norm_stops_the_run_like_a_nan_loss(ray_local, shards, tmp_path):
    """lr 1e6: step 2's update blows the weights up (loss ~1e15), and from step 3 on the gradient norm is
    inf; DeepSpeed skips every such update, so the loss stays huge but finite and the run used to end with
    exit status 0 and an exported backbone of those weights."""
    from diffscaler.train.pretrain import NonFiniteLossError, run_pretrain

    cfg = tiny_cfg(
        tmp_path,
        "inf-grad",
        "pretrain.lr=1.0e+6",
        "pretrain.steps=6",
        "pretrain.checkpoint_every=2",
        "pretrain.sample_every=0",
    )
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is inf at step 3 .*last good checkpoint is step 2"):
        run_pretrain(cfg, tmp_path / "out", shards)
    assert not (tmp_path / "out" / "backbone.safetensors").exists()
    assert len(events(tmp_path / "out", "start") + events(tmp_path / "out", "resume")) == 1  # no restart replayed it


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_the_driver_names_the_step_ray_resumes_from_not_the_highest_folder(ray_local, shards, tmp_path):
    """`ray job stop` can land after a checkpoint folder was persisted but before Ray's controller recorded it in
    its snapshot: the next launch resumes from the snapshot's checkpoint (step 2 here), while the highest folder
    says 4. The driver used to announce "resuming from step 4"."""
    from diffscaler.train.pretrain import plan_run, run_pretrain
    from diffscaler.train.pretrain_checkpoint import RAY_SNAPSHOT, checkpoint_dir_name

    def cfg(steps: int):
        return tiny_cfg(
            tmp_path, "stop", f"pretrain.steps={steps}", "pretrain.checkpoint_every=2", "pretrain.sample_every=0"
        )

    out, run_dir = tmp_path / "out", tmp_path / "ray" / "stop"
    run_pretrain(cfg(2), out, shards)
    snapshot_at_2 = (run_dir / RAY_SNAPSHOT).read_bytes()  # Ray's own record, as it was after step 2
    run_pretrain(cfg(4), out, shards)
    assert (run_dir / checkpoint_dir_name(4)).is_dir()
    (run_dir / RAY_SNAPSHOT).write_bytes(snapshot_at_2)  # the folder of step 4 persisted, its record not
    assert plan_run(cfg(5), out, shards).resume_step == 2
    assert run_pretrain(cfg(5), out, shards).step == 5
    assert events(out, "resume")[-1]["step"] == 2  # where the workers did resume


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_bad_input_fails_before_any_worker_starts(ray_local, zero2_run, shards, tmp_path):
    from diffscaler.train.pretrain import check_cluster, plan_run, run_pretrain

    with pytest.raises(ConfigError, match="pretrain.zero_stage"):
        tiny_cfg(tmp_path, "bad", "pretrain.zero_stage=4")
    with pytest.raises(ConfigError, match=r"pretrain.global_batch_size: 9 is not divisible"):
        tiny_cfg(tmp_path, "bad", "pretrain.global_batch_size=9")

    cases = [
        ("pretrain.use_gpu", ["pretrain.use_gpu=true"]),
        ("pretrain.cpus_per_worker", ["pretrain.cpus_per_worker=4.0"]),
        ("model.input_size", ["model.input_size=64"]),
        ("model.num_classes", ["model.num_classes=3"]),
    ]
    for field, overrides in cases:
        with pytest.raises(ConfigError, match=field):
            run_pretrain(tiny_cfg(tmp_path, "bad", *overrides), tmp_path / "out", shards)
    with pytest.raises(DatasetError, match="pretrain.global_batch_size=512"):
        run_pretrain(tiny_cfg(tmp_path, "bad", "pretrain.global_batch_size=512"), tmp_path / "out", shards)
    with pytest.raises(DatasetError, match="index.json"):
        run_pretrain(tiny_cfg(tmp_path, "bad"), tmp_path / "out", str(tmp_path / "no-shards"))

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="pretrain.storage_path"):
        run_pretrain(tiny_cfg(tmp_path, "bad", f"pretrain.storage_path={blocker / 'ray'}"), tmp_path / "out", shards)
    with pytest.raises(ConfigError, match="--out"):
        run_pretrain(tiny_cfg(tmp_path, "bad"), blocker / "out", shards)
    assert not (tmp_path / "ray" / "bad").exists()  # Ray Train never started a run

    # Resuming a run with settings its checkpoint cannot continue under is refused up front.
    z2_tmp, _cfg, _result = zero2_run
    with pytest.raises(ConfigError, match=r"pretrain.num_workers: checkpoint 2, config 1"):
        plan_run(tiny_cfg(z2_tmp, "z2", "pretrain.num_workers=1"), tmp_path / "out", shards)
    check_cluster(tiny_cfg(tmp_path, "ok"))  # the good config fits this cluster


def test_cli_reports_config_errors_without_starting_ray(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ray_jobs.pretrain",
            "--config",
            str(TINY),
            "--out",
            str(tmp_path / "out"),
            "pretrain.zero_stage=4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pretrain.zero_stage" in proc.stderr and "Started a local Ray" not in proc.stderr


def test_tiny_config_is_the_cpu_default():
    cfg = load_config(TINY)
    p = cfg.pretrain
    assert (cfg.model.name, cfg.model.input_size, cfg.data.pretrain_source) == ("DiT-T/2", 16, "openclipart")
    assert (p.num_workers, p.use_gpu, p.zero_stage, p.cpus_per_worker) == (2, False, 2, 1.0)
    assert p.steps % p.checkpoint_every == 0 and p.sample_every >= 0 and p.precision == "auto"


def test_gpu_config_loads():
    cfg = load_config(REPO / "ray_jobs" / "configs" / "gpu.yaml")
    assert cfg.pretrain.use_gpu and cfg.pretrain.precision in ("auto", "bf16")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_skipped_samples_are_counted_and_a_bad_shard_is_not_retried(ray_local, shards, tmp_path):
    import shutil

    from diffscaler.data.tarformat import iter_raw_samples
    from diffscaler.train.pretrain import PretrainDataError, run_pretrain
    from tests.support.shards import corrupt_png_of, rewrite_member

    broken = tmp_path / "shards"
    shutil.copytree(shards, broken)
    shard = broken / "train-000003.tar"
    key = next(iter(iter_raw_samples(shard.read_bytes(), str(shard)))).key
    rewrite_member(shard, corrupt_png_of(key))

    # Skipped: one epoch (96 samples, batch 8) reads the bad sample exactly once; the count and the
    # file land in backbone.json, the metrics, the events and the result (the summary line's source).
    cfg = tiny_cfg(
        tmp_path,
        "skip",
        "pretrain.steps=12",
        "pretrain.checkpoint_every=6",
        "pretrain.sample_every=0",
        "data.skip_bad_samples=true",
    )
    result = run_pretrain(cfg, tmp_path / "out", str(broken))
    prov = load_backbone(result.backbone)[1]["provenance"]
    assert prov["skipped_samples"] == 1 and {Path(k).name: v for k, v in prov["skipped_files"].items()} == {
        "train-000003.tar": 1
    }
    assert result.skipped_samples == 1 and len(result.skipped_files) == 1
    assert read_jsonl(tmp_path / "out" / "metrics.jsonl")[-1]["skipped_samples"] == 1
    assert events(tmp_path / "out", "checkpoint")[-1]["skipped_samples"] == 1

    # Not skipped: the same sample fails every retry, so the run stops at once with the shard error
    # instead of replaying max_failures times.
    cfg = tiny_cfg(
        tmp_path,
        "strict",
        "pretrain.steps=12",
        "pretrain.checkpoint_every=6",
        "pretrain.sample_every=0",
        "pretrain.max_failures=2",
    )
    with pytest.raises(PretrainDataError, match=rf"train-000003.tar: sample '{key}': unreadable image") as err:
        run_pretrain(cfg, tmp_path / "out2", str(broken))
    assert "skip_bad_samples" in str(err.value) and "shards check" in str(err.value)
    starts = events(tmp_path / "out2", "start") + events(tmp_path / "out2", "resume")
    assert len(starts) == 1  # the automatic restarts stopped on the marker before training again
