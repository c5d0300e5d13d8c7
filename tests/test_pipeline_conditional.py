"""A conditional target through every stage (issue 21), and the README's conditional flow as written.

The micro experiment (tests/support/pipeline.py: a 16x16 DiT-T/4, folders of 20x20 PNGs) gains a target
whose maps are the alpha foreground of small RGBA images (`condition: mask`)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from diffscaler.config import load_config
from diffscaler.pipeline import run_pipeline
from tests.support.pipeline import ALL_STAGES, micro_config
from tests.support.shards import rgba_folder

ROOT = Path(__file__).resolve().parents[1]


def conditional_config(tmp: Path, stages: list[str], **sections: dict) -> Path:
    shapes = rgba_folder(tmp / "src-rgba" / "shapes", n=16)
    targets = [
        {"name": "red", "source": f"folder:{tmp / 'src' / 'red'}"},
        {"name": "shapes-mask", "source": f"folder:{shapes}", "condition": "mask"},
    ]
    path = micro_config(tmp, stages, **sections)  # makes src/ first
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["targets"] = targets
    cfg["sweep"].update(datasets=["shapes-mask"], ranks=[2], num_samples=1)  # the sweep takes a conditional task
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_a_conditional_target_through_every_stage(ray_local, tmp_path):
    cfg = load_config(conditional_config(tmp_path, ALL_STAGES))
    out = tmp_path / "run"
    lines: list[str] = []
    run_pipeline(cfg, out, log=lines.append)
    m = json.loads((out / "pipeline.json").read_text())
    assert m["status"] == "done", m["error"]

    meta = json.loads((out / "adapters" / "shapes-mask.json").read_text())
    assert meta["condition_extractor"] == {
        "kind": "mask",
        "params": {"alpha_threshold": 32, "white_threshold": 24},
        "channels": 1,
        "size": 16,
    }
    assert "condition_extractor" not in json.loads((out / "adapters" / "red.json").read_text())
    swept = json.loads((out / "sweep" / "best.json").read_text())["datasets"]
    assert set(swept) == {"shapes-mask"}

    fid = json.loads((out / "fid.json").read_text())
    rows = {(r["task"], r["label"]): r for r in fid["results"]}
    assert all(r["status"] == "ok" and r["fid"] is not None for r in rows.values())
    own = rows[("shapes-mask", "affiner")]
    assert own["condition"] == "mask" and own["conditioned"] and own["fidelity_metric"] == "mask_iou"
    assert 0.0 <= own["fidelity"] <= 1.0
    bare = rows[("shapes-mask", "no condition")]
    assert bare["condition"] == "mask" and not bare["conditioned"] and bare["fidelity"] is not None
    assert rows[("red", "affiner")]["condition"] == "" and rows[("red", "affiner")]["fidelity"] is None
    assert ("red", "no condition") not in rows
    ref = fid["condition_reference"]["shapes-mask"]
    assert ref["metric"] == "mask_iou" and 0 < ref["mismatched"]["mean"] < ref["ceiling"]["mean"] <= 1.0
    assert any("shapes-mask condition fidelity (mask_iou" in line for line in lines)

    report = (out / "report.md").read_text()
    for part in (
        "### Condition fidelity",
        "ceiling (real, own maps)",
        "mismatched maps (chance)",
        "no condition",
        "condition_shapes-mask.png",
        "map | generated | real",
        "IoU",
        "condition path params",
        f"| shapes-mask | affiner | mask | {meta['condition_params']:,} |",
    ):
        assert part in report, part
    from PIL import Image

    grid = np.asarray(Image.open(out / "condition_shapes-mask.png"))
    assert grid.shape[0] > 2 * grid.shape[1]  # 3 columns (map, generated, real), 8 rows
    assert not (out / "condition_red.png").exists()


def readme_block() -> list[list[str]]:
    """The README's conditional commands: one argv per command, the `$T` it sets expanded."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"### A conditional target end to end\n.*?```sh\n(.*?)```", readme, re.S).group(1)
    commands = [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert commands[0][0].startswith("T=")
    t = commands[0][0][2:]
    return [[t if a == "$T" else a for a in argv] for argv in commands[1:]]


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_readme_conditional_flow_as_written(ray_local, tmp_path, monkeypatch, capsys):
    """The README block run command by command in this process (its Ray session), with tiny.yaml replaced by
    the micro config (few images and steps), runs/ by a temporary folder, runs/demo's backbone by a micro one
    and my-pictures by a folder of images."""
    import importlib

    from diffscaler.cli import main as cli_main
    from tests.support.pipeline import save_micro_backbone

    cfg = micro_config(tmp_path, ["shards"], data={"limit": 24, "shards_root": str(tmp_path / "shards")})
    (tmp_path / "runs" / "demo" / "backbone").mkdir(parents=True)
    save_micro_backbone(tmp_path / "runs" / "demo" / "backbone" / "backbone.safetensors")
    rgba_folder(tmp_path / "my-pictures", n=3)
    monkeypatch.chdir(tmp_path)  # runs/..., my-pictures: relative to where the user stands
    commands = readme_block()
    assert [c[:3] for c in commands[:2]] == [["python", "-m", "ray_jobs.shards"], ["python", "-m", "ray_jobs.finetune"]]
    for argv in commands:
        argv = [str(cfg) if a == "ray_jobs/configs/tiny.yaml" else a for a in argv]
        if argv[0] == "python":
            code = importlib.import_module(argv[2]).main(argv[3:])
        else:
            assert argv[0] == ".venv/bin/diffscaler"
            code = cli_main(argv[1:])
        assert code == 0, (argv, capsys.readouterr().err[-3000:])
    samples = np.load(tmp_path / "runs" / "cond" / "samples" / "samples.npz")
    assert list(samples["task"]) == ["emoji-edges", "tiles"] * 4
    assert samples["has_condition"].tolist() == [True, False] * 4
    assert samples["condition"].shape == (8, 1, 16, 16) and samples["condition"][0::2].max() == 255
    fid = json.loads((tmp_path / "runs" / "cond" / "eval" / "fid.json").read_text())
    labels = {(r["task"], r["label"]) for r in fid["results"]}
    assert ("emoji-edges", "no condition") in labels and "emoji-edges" in fid["condition_reference"]
    edges = next(r for r in fid["results"] if r["task"] == "emoji-edges" and r["conditioned"])
    assert edges["fidelity_metric"] == "edge_f1" and edges["fidelity"] is not None
    _wait_for_free_cpus(ray_local)


def _wait_for_free_cpus(ray, timeout_s: float = 60.0) -> None:
    """The programs' actors are killed on exit, their CPUs come back a moment later: wait for them, so the
    session's next test (one that checks two Ray tasks run at once) finds the whole cluster."""
    import time

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources().get("CPU", 0.0) - 1e-6:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"CPUs still held {timeout_s:.0f} s after the programs ended: "
                f"{ray.available_resources()} of {ray.cluster_resources()}"
            )
        time.sleep(0.5)
