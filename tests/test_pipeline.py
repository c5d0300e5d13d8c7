"""The pipeline's orchestration: bad input before any stage, skip-if-valid, resume after a failure or Ctrl-C.

Real stages throughout (shards as Ray tasks, fine-tunes as Ray tasks, the report), on a micro config:
a 16x16 DiT-T/4 and three synthetic image folders. The full six-stage run is in test_pipeline_e2e.py
and, through `ray job submit`, in test_pipeline_cluster.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffscaler.config import ModelConfig, load_config
from diffscaler.pipeline import PipelineInputError, PipelineStageError, resolve_run_config, run_pipeline
from diffscaler.stages.manifest import Manifest
from tests.support.pipeline import MICRO_MODEL, manifest, micro_config, save_micro_backbone, statuses

ROOT = Path(__file__).resolve().parents[1]


def mtimes(*paths: Path) -> list[int]:
    return [p.stat().st_mtime_ns for p in paths]


# ------------------------------------------------------------------------------------------------
# Paths and bad input (no Ray: nothing may start)
# ------------------------------------------------------------------------------------------------


def test_relative_storage_paths_go_inside_the_run_folder(tmp_path):
    cfg = load_config(
        micro_config(tmp_path, ["report"]),
        ["data.shards_root=shards", "eval.cache_dir=/abs/cache", "pretrain.storage_path=s3://bucket/ray"],
    )
    run = resolve_run_config(cfg, tmp_path / "out")
    assert run.data.shards_root == str(tmp_path / "out" / "shards")
    assert run.eval.cache_dir == "/abs/cache"
    assert run.pretrain.storage_path == "s3://bucket/ray"


def run_expecting_input_error(cfg_path: Path, out: Path, overrides=(), match: str = "") -> str:
    with pytest.raises(PipelineInputError, match=match) as err:
        run_pipeline(load_config(cfg_path, list(overrides)), out)
    assert not (out / "pipeline.json").exists(), "bad input must be found before any stage (and any manifest)"
    return str(err.value)


def test_stages_out_of_order(tmp_path):
    msg = run_expecting_input_error(micro_config(tmp_path, ["finetune", "shards"]), tmp_path / "out", match="order")
    assert "['shards', 'finetune']" in msg


def test_unknown_stage_is_bad_input_with_exit_status_2_before_anything_is_written(tmp_path, capsys):
    from ray_jobs.pipeline import main

    cfg = micro_config(tmp_path, ["shards", "pretrian"])
    known = r"stages are \['shards', 'pretrain', 'finetune', 'sweep', 'evaluate', 'report'\]"
    with pytest.raises(PipelineInputError, match=r"pipeline.stages: unknown stage\(s\) \['pretrian'\]; " + known):
        run_pipeline(load_config(cfg), tmp_path / "out")  # the stage registry knows the names, not config
    assert main(["--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "pretrian" in err and "'report'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["unknown", "empty", "missing"])
def test_unknown_empty_or_missing_source_is_bad_input_before_ray(kind, tmp_path, capsys, refuse_ray):
    """Found on the driver, as `diffscaler shards make` reports them, not inside a Ray task."""
    from ray_jobs.shards import main as shards_main

    (tmp_path / "empty").mkdir()
    source, words = {
        "unknown": ("nosuch", "unknown source 'nosuch'"),
        "empty": (f"folder:{tmp_path / 'empty'}", "no images found"),
        "missing": (f"folder:{tmp_path / 'nope'}", "not a folder"),
    }[kind]
    cfg = micro_config(tmp_path, ["shards", "pretrain"])
    msg = run_expecting_input_error(cfg, tmp_path / "out", [f"data.pretrain_source={source}"], match=words)
    assert "data.pretrain_source" in msg
    msg = run_expecting_input_error(
        cfg, tmp_path / "out", [f"data.targets=[{{name: red, source: '{source}'}}]"], match=words
    )
    assert "data.targets: dataset 'red'" in msg
    assert shards_main(["--config", str(cfg), f"data.pretrain_source={source}"]) == 2
    assert words in capsys.readouterr().err


def test_dataset_without_shards_when_shards_stage_is_off(tmp_path):
    backbone = save_micro_backbone(tmp_path / "b.safetensors")
    msg = run_expecting_input_error(
        micro_config(tmp_path, ["finetune"]), tmp_path / "out", [f"pipeline.backbone={backbone}"], match="no shards"
    )
    assert "'red'" in msg and str(tmp_path / "out" / "shards" / "red") in msg


def test_shards_built_with_other_parameters_when_shards_stage_is_off(tmp_path):
    from diffscaler.data import build_all

    backbone = save_micro_backbone(tmp_path / "b.safetensors")
    cfg_path = micro_config(tmp_path, ["finetune"])
    cfg = resolve_run_config(load_config(cfg_path), tmp_path / "out")
    build_all(cfg.data, ["red", "blue"], parallel=False)  # built with limit 0
    msg = run_expecting_input_error(
        cfg_path, tmp_path / "out", [f"pipeline.backbone={backbone}", "data.limit=5"], match="other parameters"
    )
    assert "limit built=0 config=5" in msg


def test_a_changed_folder_target_is_rebuilt_and_the_reason_names_the_change(tmp_path):
    """Issue 27 item 1: deleting a class folder and adding another must not leave 'built as configured'."""
    import shutil

    from diffscaler.data import build_all, load_index
    from diffscaler.stages.base import Run
    from diffscaler.stages.shards import ShardsStage

    cfg_path = micro_config(tmp_path, ["shards"])
    mine = tmp_path / "mine"
    shutil.copytree(tmp_path / "src" / "pre", mine)  # classes a, b, c
    override = f'data.targets=[{{name: mine, source: "folder:{mine}", conditional: true}}]'
    cfg = resolve_run_config(load_config(cfg_path, [override]), tmp_path / "out")
    build_all(cfg.data, ["mine"], parallel=False)
    run = Run.for_program(cfg, "shards", tmp_path / "out")
    assert ShardsStage(only=["mine"]).check(run).valid
    assert load_index(str(tmp_path / "out" / "shards" / "mine")).class_names == ["a", "b", "c"]

    shutil.rmtree(mine / "c")
    shutil.copytree(mine / "b", mine / "d")
    check = ShardsStage(only=["mine"]).check(run)
    assert not check.valid
    assert f"the files of folder:{mine} changed since the build" in check.reason
    assert "36 files then, 36 now" in check.reason
    # The pipeline without the shards stage refuses the stale shards, naming the change.
    backbone = save_micro_backbone(tmp_path / "b.safetensors")
    msg = run_expecting_input_error(
        micro_config(tmp_path, ["finetune"]),
        tmp_path / "out",
        [override, f"pipeline.backbone={backbone}"],
        match="changed since the build",
    )
    assert "add 'shards' to pipeline.stages" in msg
    ShardsStage(only=["mine"]).run(run)  # one dataset: build_all builds it on the driver, no Ray
    assert load_index(str(tmp_path / "out" / "shards" / "mine")).class_names == ["a", "b", "d"]
    assert ShardsStage(only=["mine"]).check(run).valid
    # A rewritten file (same name, other size) is a change too.
    (mine / "a" / "0.png").write_bytes((mine / "b" / "1.png").read_bytes() + b"\0")
    assert not ShardsStage(only=["mine"]).check(run).valid


def test_split_sizes_are_checked_before_any_stage(tmp_path):
    """Issue 27 item 5: counts are known from the catalog (or the index) before anything runs."""
    from diffscaler.data import build_all
    from diffscaler.data.build import dataset_parameters, planned_counts
    from diffscaler.data.writer import is_up_to_date

    backbone = save_micro_backbone(tmp_path / "b.safetensors")
    cfg_path = micro_config(tmp_path, ["shards", "finetune"])
    # 12 images per target, eval_fraction 0.25: 9 train, 3 eval - from the folder, nothing built yet
    msg = run_expecting_input_error(
        cfg_path,
        tmp_path / "out",
        [f"pipeline.backbone={backbone}", "finetune.batch_size=16"],
        match="fewer train images than one batch",
    )
    assert "task 'red': 9 train and 3 eval images" in msg and "finetune.batch_size 16" in msg
    assert not (tmp_path / "out" / "shards").exists()
    sweep = micro_config(tmp_path, ["shards", "sweep"])
    msg = run_expecting_input_error(
        sweep,
        tmp_path / "out",
        [f"pipeline.backbone={backbone}", "data.eval_fraction=0", "sweep.datasets=[blue]"],
        match="need an eval split",
    )
    assert "task 'blue': 12 train and 0 eval images" in msg
    # Built shards are counted from their index.
    cfg = resolve_run_config(load_config(cfg_path, ["data.limit=6", "data.eval_fraction=0.1"]), tmp_path / "out")
    build_all(cfg.data, ["red", "blue"], parallel=False)
    assert planned_counts(cfg.data, "red") == {"train": 5, "eval": 1} and is_up_to_date(
        str(tmp_path / "out" / "shards" / "red"), dataset_parameters(cfg.data, "red")
    )
    evaluate = micro_config(tmp_path, ["evaluate"])
    msg = run_expecting_input_error(
        evaluate,
        tmp_path / "out",
        [f"pipeline.backbone={backbone}", "data.limit=6", "data.eval_fraction=0.1"],
        match="at least 2 reference images",
    )
    assert "5 train and 1 eval images" in msg


def test_a_left_checkpoint_of_other_shards_is_refused_before_any_stage(tmp_path):
    """A checkpoint left in pretrain.storage_path was trained on other shards: with the shards stage off (the
    shards on disk are the ones pretraining reads) the pipeline refuses to resume it in preflight, naming the
    shards hash; with the shards stage on, the same check is left to pretraining (the shards may be rebuilt)."""
    from dataclasses import asdict

    from diffscaler.data import build_all, load_index
    from diffscaler.data.build import pretrain_dataset_dir
    from diffscaler.pipeline import Pipeline
    from diffscaler.train.pretrain_checkpoint import RAY_SNAPSHOT, STATE_FILE, TrainerState, checkpoint_dir_name

    cfg_path = micro_config(tmp_path, ["pretrain"])
    cfg = resolve_run_config(load_config(cfg_path), tmp_path / "out")
    build_all(cfg.data, ["pre"], parallel=False)
    built = load_index(pretrain_dataset_dir(cfg.data)).content_hash
    p = cfg.pretrain
    folder = Path(p.storage_path) / p.run_name / checkpoint_dir_name(2)
    folder.mkdir(parents=True)
    state = TrainerState(
        step=2,
        micro_step=2,
        images_seen=2 * p.global_batch_size,
        ema_updates=2,
        ema_decay=p.ema_decay,
        world_size=p.num_workers,
        zero_stage=p.zero_stage,
        precision="fp32",
        global_batch_size=p.global_batch_size,
        grad_accum_steps=p.grad_accum_steps,
        deepspeed_tag="step00000002",
        run_name=p.run_name,
        model=asdict(cfg.model),
        shards={"content_hash": "sha256:other"},
        config=cfg.to_dict(),
    )
    (folder / STATE_FILE).write_text(state.to_json())
    (folder.parent / RAY_SNAPSHOT).write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": folder.name}})
    )
    with pytest.raises(PipelineInputError, match="not a checkpoint of this run") as err:
        Pipeline(load_config(cfg_path), tmp_path / "out").preflight()
    assert f"shards (content hash): checkpoint 'sha256:other', config '{built}'" in str(err.value)
    Pipeline(load_config(cfg_path, ["pipeline.stages=[shards,pretrain]"]), tmp_path / "out").preflight()


def test_backbone_that_does_not_match_the_model_config(tmp_path):
    other = save_micro_backbone(tmp_path / "b8.safetensors", ModelConfig(name="DiT-T/8", input_size=16, num_classes=3))
    msg = run_expecting_input_error(
        micro_config(tmp_path, ["shards", "finetune"]),
        tmp_path / "out",
        [f"pipeline.backbone={other}"],
        match="does not match",
    )
    assert "name file='DiT-T/8' config='DiT-T/4'" in msg
    # the public checkpoint path is checked the same way
    import torch

    from diffscaler.models import build_model

    pt = tmp_path / "dit.pt"
    torch.save(build_model(ModelConfig(name="DiT-T/4", input_size=32, num_classes=3), seed=0).state_dict(), pt)
    msg = run_expecting_input_error(
        micro_config(tmp_path, ["shards", "finetune"]),
        tmp_path / "out",
        [f"pipeline.backbone={pt}"],
        match="input_size",
    )
    # no backbone at all while pretrain is not run
    msg = run_expecting_input_error(
        micro_config(tmp_path, ["shards", "finetune"]), tmp_path / "out", match="no backbone"
    )
    assert "add 'pretrain'" in msg
    run_expecting_input_error(
        micro_config(tmp_path, ["shards"]), tmp_path / "out", ["pipeline.backbone=/nope.pt"], match="not found"
    )


def test_a_truncated_backbone_is_bad_input_of_the_pipeline_and_of_ray_jobs_finetune(tmp_path, capsys, refuse_ray):
    """backbone.safetensors cut short (a copy that did not finish), its JSON whole: exit status 2 and one line
    naming the file, before Ray (it used to surface as a SafetensorError traceback inside a Ray task)."""
    from ray_jobs.finetune import main as finetune_main
    from ray_jobs.pipeline import main as pipeline_main

    backbone = save_micro_backbone(tmp_path / "b.safetensors")
    backbone.write_bytes(backbone.read_bytes()[:-1000])
    cfg = micro_config(tmp_path, ["shards", "finetune"])
    assert pipeline_main(["--config", str(cfg), "--out", str(tmp_path / "out"), f"pipeline.backbone={backbone}"]) == 2
    assert finetune_main(["--config", str(cfg), "--backbone", str(backbone), "--out", str(tmp_path / "ft")]) == 2
    err = capsys.readouterr().err
    assert err.count(f"{backbone}: not a readable safetensors file") == 2 and "Traceback" not in err, err
    assert not (tmp_path / "out" / "pipeline.json").exists() and not (tmp_path / "ft").exists()


def test_a_given_backbone_needs_no_pretraining_set(tmp_path):
    """With pipeline.backbone (the public DiT-XL/2 flow) the pretraining source is never read or encoded: a
    source that does not exist there is no error; without a given backbone it is refused before any stage."""
    from diffscaler.pipeline import Pipeline
    from diffscaler.stages import ShardsStage

    missing = ["data.pretrain_source=folder:/nonexistent/pre"]
    run_expecting_input_error(
        micro_config(tmp_path, ["shards", "pretrain"]), tmp_path / "out", missing, match="/nonexistent/pre"
    )
    backbone = save_micro_backbone(tmp_path / "b.safetensors")
    cfg = load_config(micro_config(tmp_path, ["shards", "finetune"]), [*missing, f"pipeline.backbone={backbone}"])
    pipeline = Pipeline(cfg, tmp_path / "out2")
    pipeline.preflight()  # no error: only the targets are built
    assert ShardsStage().names(pipeline.ctx) == ["red", "blue"]


def test_evaluate_needs_adapters_when_finetune_is_off(tmp_path):
    backbone = save_micro_backbone(tmp_path / "b.safetensors")
    msg = run_expecting_input_error(
        micro_config(tmp_path, ["shards", "evaluate"]),
        tmp_path / "out",
        [f"pipeline.backbone={backbone}"],
        match="needs adapters",
    )
    assert "red.safetensors" in msg


def test_public_dit_checkpoint_is_imported_once_and_reported(tmp_path):
    """pipeline.backbone=X.pt: the pretrain stage imports it to safetensors (no Ray); a rerun skips it."""
    import torch

    from diffscaler.artifacts import load_backbone
    from diffscaler.models import build_model

    pt = tmp_path / "DiT-T-4-16.pt"
    torch.save(build_model(MICRO_MODEL, seed=3).state_dict(), pt)
    out = tmp_path / "out"
    run_expecting_input_error(
        micro_config(tmp_path, ["shards", "finetune"]), out, [f"pipeline.backbone={pt}"], match="add 'pretrain'"
    )
    cfg = load_config(micro_config(tmp_path, ["pretrain", "report"]), [f"pipeline.backbone={pt}"])
    run_pipeline(cfg, out)
    assert statuses(out)["pretrain"] == "done" and statuses(out)["report"] == "done"
    model, meta = load_backbone(out / "backbone" / "backbone.safetensors", expect=MICRO_MODEL)
    assert meta["provenance"]["source"] == str(pt)
    report = (out / "report.md").read_text()
    assert "samples_backbone.png" in report and "No adapters yet" in report and "Not evaluated yet" in report
    before = mtimes(out / "backbone" / "backbone.safetensors")
    run_pipeline(cfg, out)
    assert statuses(out)["pretrain"] == "skipped"
    assert mtimes(out / "backbone" / "backbone.safetensors") == before


FILL_BUT_ONE_PAGE = """
import os, sys
st = os.statvfs(sys.argv[1])
with open(os.path.join(sys.argv[1], "filler"), "wb") as f:
    f.write(bytes((st.f_bavail - 1) * st.f_frsize))
"""


def _user_tmpfs_works(folder: Path) -> bool:
    """Whether this machine lets an unprivileged user mount a tmpfs in its own user + mount namespace."""
    folder.mkdir()
    try:
        done = subprocess.run(
            ["unshare", "-Urm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_full_disk_is_named_once_and_the_manifest_says_failed(tmp_path):
    """A real full file system: a 512 KiB tmpfs mounted on the run folder in a user + mount namespace
    (`unshare -Urm`, no privileges needed). The pretrain stage imports a 16 MB public checkpoint into it.
    1. The backbone's write fails: one line names the file, the manifest (written after the partial file is
       removed) says failed. It used to end in chained tracebacks, the program's own line never printed.
    2. The disk full but for one page (the lock takes it): config.json cannot be written, nor a second copy of
       pipeline.json; the old one is overwritten in place and says failed, not running.
    3. `diffscaler init-backbone` into the full disk: one line naming the file."""
    if not _user_tmpfs_works(tmp_path / "probe"):
        pytest.skip("no unprivileged user + mount namespaces here (unshare -Urm): no small file system to fill")
    import torch

    from diffscaler.models import build_model

    pt = tmp_path / "DiT-T-4-16.pt"
    torch.save(build_model(MICRO_MODEL, seed=3).state_dict(), pt)
    cfg, out, res = micro_config(tmp_path, ["pretrain"]), tmp_path / "out", tmp_path / "res"
    out.mkdir()
    res.mkdir()
    run = f"{sys.executable} -m ray_jobs.pipeline --config {cfg} --out {out} pipeline.backbone={pt}"
    script = (
        f"mount -t tmpfs -o size=512k tmpfs {out} && cd {ROOT} && "
        f"{{ {run} 2>{res}/a.err; echo $? >{res}/a.rc; cp {out}/pipeline.json {res}/a.json; "
        f"{sys.executable} -c '{FILL_BUT_ONE_PAGE}' {out}; "
        f"{run} 2>{res}/b.err; echo $? >{res}/b.rc; cp {out}/pipeline.json {res}/b.json; "
        f"{sys.executable} -m diffscaler.cli init-backbone --model DiT-T/4 --input-size 16 --in-channels 3 "
        f"--num-classes 3 --out {out}/b.safetensors 2>{res}/c.err; echo $? >{res}/c.rc; }}"
    )
    subprocess.run(["unshare", "-Urm", "sh", "-c", script], check=True, timeout=300)

    a_err, b_err = (res / "a.err").read_text(), (res / "b.err").read_text()
    backbone = out / "backbone" / "backbone.safetensors"
    assert (res / "a.rc").read_text().strip() == "1"
    assert "Traceback" not in a_err and "Errno" not in a_err, a_err
    assert a_err.strip().splitlines()[-2] == (
        f"ray_jobs.pipeline: stage 'pretrain' failed: no space left on device at {backbone}"
    )
    a = json.loads((res / "a.json").read_text())
    assert a["status"] == "failed" and a["stages"]["pretrain"]["status"] == "failed"
    assert a["stages"]["pretrain"]["reason"] == f"no space left on device at {backbone}"

    assert (res / "b.rc").read_text().strip() == "1"
    assert "Traceback" not in b_err and f"no space left on device at {out / 'config.json'}" in b_err, b_err
    b = json.loads((res / "b.json").read_text())
    assert b["status"] == "failed" and b["error"] == f"no space left on device at {out / 'config.json'}"
    assert b["started_at"] != a["started_at"] or b["wall_s"] != a["wall_s"]  # this run's record, not the last one's
    # the command line too: one line, no traceback
    assert (res / "c.rc").read_text().strip() == "1"
    assert (res / "c.err").read_text() == (
        f"diffscaler init-backbone: error: no space left on device at {out / 'b.safetensors'}\n"
    )


# ------------------------------------------------------------------------------------------------
# Skip-if-valid and resume after a failure (real Ray stages)
# ------------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_skip_valid_stages_and_resume_after_a_failed_stage(ray_local, tmp_path):
    backbone = save_micro_backbone(tmp_path / "backbone.safetensors")
    out = tmp_path / "run"
    full = load_config(micro_config(tmp_path, ["shards", "finetune", "report"]), [f"pipeline.backbone={backbone}"])
    lines: list[str] = []

    # 1. a fresh run: every selected stage runs, the manifest says so with wall times
    run_pipeline(full, out, log=lines.append)
    m = manifest(out)
    assert m["status"] == "done"
    assert statuses(out) == {
        "shards": "done",
        "pretrain": "not selected",
        "finetune": "done",
        "sweep": "not selected",
        "evaluate": "not selected",
        "report": "done",
    }
    for name in ("shards", "finetune", "report"):
        assert m["stages"][name]["wall_s"] > 0
        assert any(line.startswith("[pipeline]") and name in line and "started" in line for line in lines)
        assert any(name in line and "done in" in line for line in lines)
    # with pipeline.backbone given, the pretraining set is neither checked nor built
    assert set(m["stages"]["shards"]["outputs"]) == {"red", "blue"}
    assert not (out / "shards" / "pre").exists()
    adapters = {t: out / "adapters" / f"{t}.safetensors" for t in ("red", "blue")}
    assert all(p.is_file() for p in adapters.values())
    report = (out / "report.md").read_text()
    for image in ("samples_red.png", "samples_blue.png", "samples_mixed.png", "loss_curves.png"):
        assert image in report and (out / image).is_file()
    assert "| affiner | 2 |" in report  # trainable parameters per method, with the rank

    # 2. the same command again: nothing is redone
    indexes = {n: out / "shards" / n / "index.json" for n in ("red", "blue")}
    before = mtimes(*adapters.values(), *indexes.values())
    run_pipeline(full, out)
    assert statuses(out)["shards"] == "skipped" and statuses(out)["finetune"] == "skipped"
    assert mtimes(*adapters.values(), *indexes.values()) == before

    # 3. red's adapter is lost and its shards corrupted; without the shards stage its fine-tune fails
    for ext in (".safetensors", ".json"):
        adapters["red"].with_suffix(ext).unlink()
    for tar in (out / "shards" / "red").glob("train-*.tar"):
        tar.write_bytes(b"\0" * 100)
    blue_before = mtimes(adapters["blue"], indexes["blue"])
    partial = load_config(micro_config(tmp_path, ["finetune", "report"]), [f"pipeline.backbone={backbone}"])
    with pytest.raises(PipelineStageError, match="red") as err:
        run_pipeline(partial, out)
    assert err.value.stage == "finetune"
    m = manifest(out)
    assert m["status"] == "failed" and m["stages"]["finetune"]["status"] == "failed"
    assert "red" in m["stages"]["finetune"]["reason"]
    assert m["stages"]["report"]["status"] == "pending"  # never reached
    assert m["stages"]["shards"]["status"] == "skipped"  # kept from the run before
    assert mtimes(adapters["blue"]) == blue_before[:1], "a failing fine-tune must not touch the finished ones"

    # 4. the full command again: only red's shards are rebuilt and only red's adapter is trained
    run_pipeline(full, out)
    m = manifest(out)
    assert m["status"] == "done" and statuses(out)["shards"] == "done" and statuses(out)["finetune"] == "done"
    assert "red: shards check failed" in m["stages"]["shards"]["reason"]
    assert mtimes(adapters["blue"], indexes["blue"]) == blue_before
    assert adapters["red"].is_file()


def interrupt_during_finetune(cfg_path: Path, out: Path, overrides: list[str], sig: int, env: dict) -> str:
    """Run the pipeline program, send `sig` once its fine-tunes run; returns its output (exit status checked)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.pipeline", "--config", str(cfg_path), "--out", str(out), *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and proc.poll() is None:
            found = Manifest.load(out / "pipeline.json")
            if found is not None and found.stages["finetune"].status == "running":
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(3)  # the fine-tune tasks are submitted and running
        proc.send_signal(sig)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, output[-3000:]
    assert "interrupted" in output
    return output


@pytest.mark.ray
def test_ctrl_c_and_sigterm_keep_finished_stages_and_a_rerun_continues(ray_local, tmp_path):
    """SIGINT (Ctrl-C) after pretraining - whose Ray Train run leaves its own SIGINT handler behind - and
    SIGTERM (`ray job stop`) while the fine-tunes run: exit 130, the manifest says interrupted, finished
    stages stay valid and are skipped by the next run."""
    import ray

    out = tmp_path / "run"
    long_finetune = micro_config(tmp_path, ["shards", "pretrain", "finetune"], finetune={"steps": 100000})
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # join the session's cluster

    def wait_for_free_cpus() -> None:  # the interrupted driver's tasks die with it
        deadline = time.monotonic() + 60
        while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)

    interrupt_during_finetune(long_finetune, out, [], signal.SIGINT, env)
    m = manifest(out)
    assert m["status"] == "interrupted"
    assert m["stages"]["shards"]["status"] == "done" and m["stages"]["pretrain"]["status"] == "done"
    assert m["stages"]["finetune"]["status"] == "interrupted"
    backbone = out / "backbone" / "backbone.safetensors"
    before = mtimes(backbone)
    wait_for_free_cpus()

    interrupt_during_finetune(long_finetune, out, [], signal.SIGTERM, env)
    assert statuses(out)["shards"] == "skipped" and statuses(out)["pretrain"] == "skipped"
    assert statuses(out)["finetune"] == "interrupted" and manifest(out)["status"] == "interrupted"
    assert mtimes(backbone) == before
    wait_for_free_cpus()

    run_pipeline(load_config(micro_config(tmp_path, ["shards", "pretrain", "finetune"])), out)
    assert statuses(out) == {
        "shards": "skipped",
        "pretrain": "skipped",
        "finetune": "done",
        "sweep": "not selected",
        "evaluate": "not selected",
        "report": "not selected",
    }
    assert (out / "adapters" / "red.safetensors").is_file() and mtimes(backbone) == before
