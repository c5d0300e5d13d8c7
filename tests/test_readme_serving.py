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
from tests.support.serving import make_adapters, make_backbone

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
    assert served["tasks"] == ["emoji", "icons"]
    listed = next(o for o in objects if isinstance(o.get("tasks"), list) and o["tasks"] and "method" in o["tasks"][0])
    assert [t["name"] for t in listed["tasks"]] == ["emoji", "icons"]
    assert next(o for o in objects if "added" in o)["tasks"] == ["emoji", "icons"]
    assert sorted(p.name for p in demo_folder.glob("*.png")) == [*(f"emoji-{k}.png" for k in range(4)), "icons.png"]
    assert (demo_folder / "icons.png").read_bytes()[:4] == b"\x89PNG"
    assert "serve: stopping" in done.stderr
