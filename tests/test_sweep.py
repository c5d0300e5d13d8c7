"""The Ray Tune sweep over adapter rank and learning rate: ASHA, FID on the best trials, resume, bad input."""

from __future__ import annotations

import csv
import json

import pytest

from diffscaler.artifacts import load_adapters, load_backbone, read_adapter_file
from diffscaler.config import ConfigError, swept_datasets
from diffscaler.data import make_shards
from diffscaler.train.finetune import FinetuneInputError
from diffscaler.train.sweep import plan_sweep, run_sweep
from tests.support.finetune import TWO_TASKS as TASKS
from tests.support.finetune import make_work, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("sweep"))


def sweep_config(work, *overrides: str):
    return tiny_config(
        work.shards,
        TASKS,
        "sweep.ranks=[2,4]",
        "sweep.num_samples=4",
        "sweep.max_steps=4",
        "sweep.rung_steps=2",
        "sweep.reduction_factor=2",
        "sweep.datasets=[ta]",
        "sweep.fid_samples=8",
        "eval.num_actors=1",
        "eval.batch_size=8",
        "eval.sampling_steps=2",
        f"eval.cache_dir={work.root / 'fid-cache'}",
        *overrides,
    )


def test_bad_search_spaces_fail_before_any_trial(work):
    with pytest.raises(FinetuneInputError, match=r"sweep.ranks: rank 256 is larger than the layer width 192"):
        plan_sweep(sweep_config(work, "sweep.ranks=[4,256]"), work.backbone)
    with pytest.raises(FinetuneInputError, match=r"sweep.grace_period 3 \(rungs\) must be in \[1, 2\]"):
        plan_sweep(sweep_config(work, "sweep.grace_period=3"), work.backbone)
    with pytest.raises(ConfigError, match=r"sweep.ranks: the search space is empty"):
        sweep_config(work, "sweep.ranks=[]")
    with pytest.raises(ConfigError, match=r"need 0 < lr_min <= lr_max, got \[0.1, 0.001\]"):
        sweep_config(work, "sweep.lr_min=0.1", "sweep.lr_max=0.001")
    # sweep.datasets matters to the sweep only: a name missing from data.targets is skipped, and with none
    # left the first target is swept (a config's sweep section survives a data.targets override).
    assert swept_datasets(sweep_config(work, "sweep.datasets=[nope]")) == (("ta",), ("nope",))
    assert swept_datasets(sweep_config(work, "sweep.datasets=[tb,nope]")) == (("tb",), ("nope",))
    assert swept_datasets(sweep_config(work, "sweep.datasets=[]")) == (("ta", "tb"), ())
    assert [t.name for t in plan_sweep(sweep_config(work, "sweep.datasets=[nope]"), work.backbone).tasks] == ["ta"]
    no_eval = work.root / "no-eval-shards"
    make_shards(
        f"folder:{work.root / 'images' / 'tb'}",
        str(no_eval / "tb"),
        size=16,
        samples_per_shard=8,
        eval_fraction=0.0,
        log=lambda m: None,
    )
    cfg = tiny_config(no_eval, "[tb]", "sweep.max_steps=4", "sweep.rung_steps=2")
    with pytest.raises(FinetuneInputError, match=r"task 'tb': the eval split at .* is empty"):
        plan_sweep(cfg, work.backbone)
    # Methods without a rank sweep the learning rate only, whatever sweep.ranks says.
    assert plan_sweep(sweep_config(work, "adapter.method=bitfit", "sweep.ranks=[999]"), work.backbone).ranks == (8,)


@pytest.mark.ray
def test_asha_sweep_of_four_trials_names_a_best_trial_and_resumes(ray_local, work):
    out = work.root / "sweep-out"
    cfg = sweep_config(work)
    messages: list[str] = []
    result = run_sweep(cfg, work.backbone, out, log=messages.append)
    print("\n".join(messages))
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert len(rows) == 4 and {r["dataset"] for r in rows} == {"ta"}
    assert {r["status"] for r in rows} <= {"completed", "stopped"}
    assert any(r["status"] == "completed" and r["steps"] == "4" for r in rows)
    assert all(r["rank"] in ("2", "4") and 1e-4 <= float(r["lr"]) <= 1e-2 for r in rows)
    scored = [r for r in rows if r["fid"]]
    assert len(scored) == 2 and all(r["fid_feature_network"] == "efficientnet-lite0" for r in scored)

    best = json.loads((out / "best.json").read_text())["datasets"]["ta"]
    winner = next(r for r in rows if r["trial_id"] == best["trial_id"])
    assert best["selected_by"] == "fid" and float(winner["fid"]) == best["fid"]
    assert best["fid"] == min(float(r["fid"]) for r in scored) and best["fid_samples"] == 8
    assert (best["rank"], best["lr"]) == (int(winner["rank"]), float(winner["lr"]))
    assert best["backbone_hash"] == work.hash and best["experiment"].endswith(f"sweep-ta-{best['sweep_fingerprint']}")
    meta, _ = read_adapter_file(out / "adapters" / "ta.safetensors")  # the winner, copied
    assert (meta["task"], meta["rank"], meta["backbone_hash"]) == ("ta", best["rank"], work.hash)
    assert meta["finetune"]["lr"] == best["lr"] and meta["finetune"]["steps"] == best["steps"]
    model, _ = load_backbone(work.backbone)
    load_adapters(model, [out / "adapters" / "ta.safetensors"], work.hash)
    assert result.best["ta"]["trial_id"] == best["trial_id"]

    # The same command again restores the finished experiment (fixed name + storage): nothing retrains.
    messages.clear()
    again = run_sweep(cfg, work.backbone, out, log=messages.append)
    assert any("restoring experiment" in m for m in messages)
    assert sorted(r.trial_id for r in again.trials) == sorted(r["trial_id"] for r in rows)
    assert again.best["ta"]["trial_id"] == best["trial_id"]


@pytest.mark.ray
def test_a_trial_no_node_can_hold_is_an_error_not_a_hang(ray_local, work, tmp_path, capsys):
    from ray_jobs.sweep import main

    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{name: DiT-T/4, input_size: 16, num_classes: 3}}\n"
        f"data: {{image_size: 16, shards_root: {work.shards}, targets: [ta]}}\n"
        "finetune: {batch_size: 6}\n"
        "sweep: {max_steps: 4, rung_steps: 2, cpus_per_trial: 4}\n"
    )
    code = main(["--config", str(config), "--backbone", str(work.backbone), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "each of the 4 request(s) needs 4 CPU and 0 GPU, but no node has that" in capsys.readouterr().err
    assert not (tmp_path / "o" / "tune").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_an_interrupted_sweep_resumes_from_its_rung_checkpoints(ray_local, work, tmp_path):
    """Kill the sweep driver mid-run (a separate process on the same cluster); rerunning restores the
    experiment and the interrupted trials continue from their last rung instead of starting over."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {name: DiT-T/4, input_size: 16, num_classes: 3}\n"
        f"data: {{image_size: 16, shards_root: {work.shards}, targets: [{{name: ta, conditional: true}}]}}\n"
        "finetune: {batch_size: 6, log_every: 2, warmup_steps: 2}\n"
        "sweep: {ranks: [2, 4], num_samples: 2, max_steps: 20, rung_steps: 2, grace_period: 10}\n"
    )
    out = tmp_path / "sweep"
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "ray_jobs.sweep",
        "--config",
        str(config),
        "--backbone",
        str(work.backbone),
        "--out",
        str(out),
        "--no-fid",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        # Some trial finished its second rung (num_to_keep=2 deletes older checkpoints: match any later one).
        while not [p for p in out.glob("tune/*/*/checkpoint_*") if not p.name.endswith("_000000")]:
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled before rung 2"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "best.json").exists()

    from diffscaler.config import load_config

    messages: list[str] = []
    result = run_sweep(load_config(config), work.backbone, out, run_fid=False, log=messages.append)
    assert any("restoring experiment" in m for m in messages)
    assert len(result.trials) == 2 and all(r.status == "completed" and r.steps == 20 for r in result.trials)
    resumed = 0
    for trial_dir in out.glob("tune/*/sweep_trial_*"):
        reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        steps = [r["step"] for r in reports]
        # Tune records a trial's checkpoint in its experiment state only at the next snapshot, forced once
        # a trial has num_to_keep=2 unrecorded ones: the one rung reported after the last snapshot before
        # the kill may be trained again (CI saw [2, 2, 4, ...]), never more.
        assert steps == sorted(steps) and sorted(set(steps)) == list(range(2, 21, 2)), steps
        assert len(steps) - len(set(steps)) <= 1, steps
        # Restored from a rung checkpoint: Tune's iteration count went on, and so did the adapter's step.
        resumed += reports[-1]["iterations_since_restore"] < reports[-1]["training_iteration"] == 10
    assert resumed >= 1
    assert result.best["ta"]["steps"] == 20


def test_python_m_tune_sweep_still_runs_the_sweep_program():
    """The program moved to ray_jobs/sweep.py; `python -m tune.sweep` (older scripts) runs the same main."""
    import subprocess
    import sys
    from pathlib import Path

    import ray_jobs.sweep
    import tune.sweep

    assert tune.sweep.main is ray_jobs.sweep.main
    out = subprocess.run(
        [sys.executable, "-m", "tune.sweep", "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    assert "--backbone" in out and "ray_jobs.sweep" in out
