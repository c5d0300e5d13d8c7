"""The README's "Generate a set" and "Serve your tasks" blocks, run as written (bash, in a folder laid out like
a demo run: runs/demo/backbone, runs/demo/adapters with tasks emoji and icons); the serve block on a free port."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from diffscaler.adapters import TaskInfo
from tests.support.cluster import free_ports
from tests.support.serving import condition_task, make_adapters, make_backbone

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def demo_folder(tmp_path):
    backbone = tmp_path / "runs/demo/backbone/backbone.safetensors"
    backbone.parent.mkdir(parents=True)
    make_backbone(backbone)
    make_adapters(backbone, tmp_path / "runs/demo/adapters", tasks=[TaskInfo("emoji"), TaskInfo("icons")])
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "ray_jobs").symlink_to(ROOT / "ray_jobs")
    return tmp_path


def run_block(block: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a throwaway local cluster, as the tests' own
    return subprocess.run(["bash", "-ec", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_readme_generate_a_set(demo_folder):
    done = run_block(readme_block("Generate a set"), demo_folder, 300)
    assert done.returncode == 0, done.stderr[-3000:]
    index = json.loads((demo_folder / "runs/gen/index.json").read_text())
    assert index["num_samples"] == 128 and index["class_names"] == ["emoji", "icons"]
    assert "wrote train-000000.tar" in done.stderr


def test_readme_serve_your_tasks(demo_folder):
    import numpy as np
    from PIL import Image

    from tests.support.shards import rgba_folder

    # the demo's emoji-mask task (mask maps), a picture with alpha and a ready mask for it
    backbone = demo_folder / "runs/demo/backbone/backbone.safetensors"
    make_adapters(backbone, demo_folder / "runs/demo/adapters", tasks=[condition_task("emoji-mask", "mask")], seed=4)
    (demo_folder / "my-emoji.png").write_bytes(
        (rgba_folder(demo_folder / "pictures", n=1) / "img_000.png").read_bytes()
    )
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 2:6] = 255
    Image.fromarray(mask, "L").save(demo_folder / "my-mask.png")
    (port,) = free_ports(1)
    block = readme_block("Serve your tasks").replace("8000", str(port))
    done = run_block(block, demo_folder, 300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    objects, text, decoder = [], done.stdout, json.JSONDecoder()
    while (start := text.find("{")) >= 0:  # curl prints the answers back to back; Ray's log lines in between
        try:
            obj, end = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            text = text[start + 1 :]
            continue
        objects.append(obj)
        text = text[start + end :]
    served = next(o for o in objects if "serving" in o)
    assert served["tasks"] == ["emoji", "emoji-mask", "icons"]
    listed = next(o for o in objects if isinstance(o.get("tasks"), list) and o["tasks"] and "method" in o["tasks"][0])
    assert [t["name"] for t in listed["tasks"]] == ["emoji", "emoji-mask", "icons"]
    assert listed["tasks"][1]["condition"] == {"kind": "mask", "channels": 1, "size": 8}
    assert next(o for o in objects if "added" in o)["tasks"] == ["emoji", "emoji-mask", "icons"]
    shown = sorted(p.name for p in demo_folder.glob("*.png"))
    assert shown == [
        *(f"emoji-{k}.png" for k in range(4)),
        "emoji-mask.png",
        "icons.png",
        "my-emoji.png",
        "my-mask.png",
    ]
    for name in ("icons.png", "emoji-mask.png"):
        assert (demo_folder / name).read_bytes()[:4] == b"\x89PNG"
    masked = json.loads((demo_folder / "emoji-mask.json").read_text())
    assert len(masked["images"]) == 2 and masked["condition"]["given"] == "image"
    assert "serve: stopping" in done.stderr
