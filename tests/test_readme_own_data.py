"""The README's own-data flow, run as written: `diffscaler shards index` on users' WebDataset shards, then the
pipeline with a `webdataset:` target, and the same command with a `folder:` target. Paths are the test's, the
config is the micro one with a given backbone (the README's tiny.yaml pretrains for minutes); a rerun after the
data changed must retrain, not reuse (issue 27 items 1-3)."""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from diffscaler.cli import main as cli_main
from diffscaler.data import load_index
from ray_jobs.pipeline import main as pipeline_main
from tests.support.pipeline import manifest, micro_config, save_micro_backbone

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """The sh block of the README's own-data section, one argv per command (continuations joined)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own data") :]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def write_pets(folder: Path) -> Path:
    """An img2dataset-like set: jpg + json {"label"} + txt, 3 classes, 36 samples in 4 shards."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=9, verbose=0) as sink:
        for i in range(36):
            a = np.full((20, 20, 3), 255, np.uint8)
            a[4:14, 4:14] = [(220, 40, 40), (40, 220, 40), (40, 40, 220)][i % 3] + rng.integers(0, 30, 3)
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="JPEG", quality=95)
            sink.write({"__key__": f"{i:06d}", "jpg": buf.getvalue(), "json": {"label": i % 3}, "txt": f"pet {i}"})
    return folder


def finetune_status(out: Path) -> str:
    summary = json.loads((out / "adapters" / "summary.json").read_text())
    return {row["task"]: row["status"] for row in summary["rows"]}["pets"]


@pytest.mark.ray
def test_the_readme_own_data_flow_runs_as_written_and_reruns_after_a_change(ray_local, tmp_path):
    index_cmd, pipeline_cmd = readme_commands()
    pets = write_pets(tmp_path / "pets-wds")
    paths = {"/data/pets-wds": str(pets), "shards/pets": str(tmp_path / "by-hand"), "runs/pets": str(tmp_path / "run")}

    def as_written(argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            for old, new in paths.items():
                arg = arg.replace(old, new)
            out.append(arg)
        return out

    assert index_cmd[:3] == [".venv/bin/diffscaler", "shards", "index"]
    assert cli_main(as_written(index_cmd)[1:]) == 0
    by_hand = load_index(str(tmp_path / "by-hand"))
    assert by_hand.class_names == ["0", "1", "2"] and by_hand.num_samples("eval") > 0

    backbone = save_micro_backbone(tmp_path / "b.safetensors")
    paths["ray_jobs/configs/tiny.yaml"] = str(micro_config(tmp_path, ["shards", "finetune"]))
    extra = [f"pipeline.backbone={backbone}", "finetune.batch_size=4"]
    assert pipeline_cmd[:3] == [".venv/bin/python", "-m", "ray_jobs.pipeline"]
    argv = as_written(pipeline_cmd)[3:] + extra
    assert pipeline_main(argv) == 0
    run = tmp_path / "run"
    index = load_index(str(run / "shards" / "pets"))
    assert index.source == f"webdataset:{pets}" and index.class_names == ["0", "1", "2"]
    assert finetune_status(run) == "ok" and json.loads((run / "adapters" / "pets.json").read_text())["num_classes"] == 3

    # Re-indexed with other labels: the fine-tune retrains instead of reusing the 3-class adapter.
    relabelled = [a.replace('label_key: "json:label"', 'label_key: "none"') for a in argv]
    assert pipeline_main(relabelled) == 0
    assert manifest(run)["stages"]["shards"]["status"] == "done" and finetune_status(run) == "ok"
    assert json.loads((run / "adapters" / "pets.json").read_text())["num_classes"] == 1

    # The same command with a folder target; then a class folder replaced: rebuilt and retrained.
    folder = tmp_path / "pets-folder"
    for k in range(3):
        (folder / f"c{k}").mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (20, 20), (80 * k, 200 - 60 * k, 40 + i)).save(folder / f"c{k}" / f"{i}.png")
    as_folder = [
        a.replace(f'source: "webdataset:{pets}", label_key: "json:label"', f'source: "folder:{folder}"') for a in argv
    ]
    assert pipeline_main(as_folder) == 0
    assert load_index(str(run / "shards" / "pets")).class_names == ["c0", "c1", "c2"]
    shutil.rmtree(folder / "c2")
    shutil.copytree(folder / "c1", folder / "c3")
    assert pipeline_main(as_folder) == 0
    assert manifest(run)["stages"]["shards"]["status"] == "done" and finetune_status(run) == "ok"
    assert load_index(str(run / "shards" / "pets")).class_names == ["c0", "c1", "c3"]
