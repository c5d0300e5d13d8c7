"""The micro experiment (three image folders and a config that runs every stage in seconds) and what a
finished pipeline leaves in its run folder."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import numpy as np
import yaml

from diffscaler.config import ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
MICRO_MODEL = ModelConfig(name="DiT-T/4", input_size=16, num_classes=3)
ALL_STAGES = ["shards", "pretrain", "finetune", "sweep", "evaluate", "report"]


def make_image_folders(root: Path) -> dict[str, Path]:
    """pre/ (3 class folders x 12 images) and two flat target folders (12 images each), 20x20 PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def image(color: tuple[int, int, int], k: int) -> Image.Image:
        a = np.full((20, 20, 3), 255, np.uint8)
        x, y = rng.integers(0, 10, 2)
        a[y : y + 8 + k % 3, x : x + 8] = color
        return Image.fromarray(a)

    folders = {}
    for cls, color in [("a", (200, 30, 30)), ("b", (30, 200, 30)), ("c", (30, 30, 200))]:
        (root / "pre" / cls).mkdir(parents=True, exist_ok=True)
        for k in range(12):
            image(color, k).save(root / "pre" / cls / f"{k}.png")
    folders["pre"] = root / "pre"
    for task, color in [("red", (250, 0, 0)), ("blue", (0, 0, 250))]:
        (root / task).mkdir(parents=True, exist_ok=True)
        for k in range(12):
            image(color, k).save(root / task / f"{k}.png")
        folders[task] = root / task
    return folders


def micro_config(tmp: Path, stages: list[str], **sections: dict) -> Path:
    """Write a micro experiment YAML under `tmp` (image folders made once); returns its path."""
    src = tmp / "src"
    if not src.exists():
        make_image_folders(src)
    cfg = {
        "model": {"name": MICRO_MODEL.name, "input_size": 16, "num_classes": 3},
        "diffusion": {"num_timesteps": 100, "sampling_steps": 2},
        "adapter": {"rank": 2},
        "data": {
            "image_size": 16,
            "samples_per_shard": 16,
            "eval_fraction": 0.25,
            "shuffle_buffer": 8,
            "pretrain_source": f"folder:{src / 'pre'}",
            "targets": [
                {"name": "red", "source": f"folder:{src / 'red'}"},
                {"name": "blue", "source": f"folder:{src / 'blue'}"},
            ],
        },
        "pretrain": {
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "global_batch_size": 8,
            "steps": 4,
            "warmup_steps": 0,
            "log_every": 2,
            "checkpoint_every": 4,
            "sample_every": 0,
        },
        "finetune": {
            "methods": ["affiner"],
            "steps": 2,
            "batch_size": 4,
            "warmup_steps": 0,
            "log_every": 1,
            "cpus_per_task": 0.5,
        },
        "sweep": {
            "ranks": [2, 4],
            "num_samples": 2,
            "max_steps": 4,
            "rung_steps": 2,
            "fid_samples": 4,
            "cpus_per_trial": 0.5,
            "datasets": ["red"],
        },
        "eval": {
            "num_samples": 6,
            "num_actors": 1,
            "cpus_per_actor": 0.5,
            "batch_size": 8,
            "sampling_steps": 2,
            "kid_subset_size": 3,
        },
        "serve": {"max_steps": 100},  # within diffusion.num_timesteps (its default, 250, is not)
        "pipeline": {"stages": stages},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    path = tmp / f"micro-{len(list(tmp.glob('micro-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def manifest(out: Path) -> dict:
    return json.loads((out / "pipeline.json").read_text())


def statuses(out: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in manifest(out)["stages"].items()}


def check_full_run(out: Path) -> None:
    """What a finished micro pipeline leaves in its run folder (shared with the `ray job submit` test)."""
    m = json.loads((out / "pipeline.json").read_text())
    assert m["status"] == "done", m["error"]
    for name in ALL_STAGES:
        assert m["stages"][name]["status"] in ("done", "skipped"), (name, m["stages"][name])
        assert m["stages"][name]["wall_s"] is not None
    assert (out / "backbone" / "backbone.safetensors").is_file() and (out / "backbone" / "metrics.jsonl").is_file()
    for method, tasks in m["stages"]["finetune"]["outputs"]["adapters"].items():
        assert set(tasks) == {"red", "blue"}, method
        assert all(Path(p).is_file() for p in tasks.values())
    best = json.loads((out / "sweep" / "best.json").read_text())["datasets"]
    assert set(best) == {"red"}
    fid = json.loads((out / "fid.json").read_text())
    labels = {(r["task"], r["label"]) for r in fid["results"]}
    assert labels == {
        ("red", "affiner"),
        ("blue", "affiner"),
        ("red", "lora"),
        ("blue", "lora"),
        ("red", "affiner (swept)"),
        ("red", "floor (real)"),
        ("blue", "floor (real)"),
        ("red", "no adapter"),
        ("blue", "no adapter"),
    }
    assert all(r["status"] == "ok" and r["fid"] is not None for r in fid["results"])
    report = (out / "report.md").read_text()
    parts = (
        "efficientnet-lite0",
        "6 generated images",
        "| lora |",
        "## Wall time per stage",
        "| pretrain |",
        "## Sweep (Ray Tune)",
        "samples_mixed.png",
        "loss_curves.png",
    )
    for part in parts:
        assert part in report, part
    for png in ("samples_red.png", "samples_blue.png", "samples_mixed.png", "samples_backbone.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 0


def save_micro_backbone(path: Path, model_cfg=MICRO_MODEL) -> Path:
    """A random micro backbone file (pipeline.backbone) for runs without the pretrain stage."""
    from diffscaler.artifacts import save_backbone
    from diffscaler.models import build_model

    save_backbone(build_model(model_cfg, seed=0), path, provenance={"stage": "test"})
    return path


def make_pipeline_argv(target: str) -> list[str]:
    """The arguments of the `ray_jobs.pipeline` command a make target runs, as `make -n` prints it (set-up
    skipped)."""
    printed = subprocess.run(
        ["make", "-n", "-o", "setup", target], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.replace("\\\n", " ")  # a recipe continued over lines
    line = next(line for line in printed.splitlines() if "-m ray_jobs.pipeline" in line)
    argv = shlex.split(line)
    return argv[argv.index("ray_jobs.pipeline") + 1 :]


def config_of_argv(argv: list[str]):
    """(the experiment config, the --out folder) of a pipeline command line."""
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return load_config(ROOT / config, overrides), argv[argv.index("--out") + 1]
