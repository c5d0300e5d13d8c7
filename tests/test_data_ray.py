"""The Ray program `python -m ray_jobs.shards`: every configured dataset built as a Ray task.

.venv/bin/python -m pytest tests/test_data_ray.py -q -m ray
"""

from __future__ import annotations

import pytest
import yaml

from diffscaler.config import load_config
from diffscaler.data import check_dataset, dataset_dir, dataset_jobs, load_index
from ray_jobs import shards as shards_job
from tests.support.shards import make_image_folder


@pytest.mark.ray
def test_ray_program_builds_pretrain_and_target_shards(ray_local, tmp_path, capsys):
    pets = make_image_folder(tmp_path / "pets", {"cat": 12, "dog": 12})
    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {
                    "shards_root": str(tmp_path / "shards"),
                    "pretrain_source": f"folder:{pets}",
                    "targets": [{"name": "icons"}, {"name": "floor", "source": "tiles"}],
                    "samples_per_shard": 8,
                    "limit": 20,
                    "image_size": 16,
                }
            }
        )
    )
    cfg = load_config(config)
    assert dataset_jobs(cfg.data) == {"pets": f"folder:{pets}", "icons": "icons", "floor": "tiles"}
    assert shards_job.main(["--config", str(config)]) == 0
    out = capsys.readouterr().out
    hashes = {}
    for name in ("pets", "icons", "floor"):
        path = dataset_dir(cfg.data, name)
        report = check_dataset(path)
        assert report.ok, report.problems
        index = load_index(path)
        assert index.num_samples("train") + index.num_samples("eval") == 20 and index.image_size == 16
        assert name in out and index.content_hash in out
        hashes[name] = index.content_hash
    assert load_index(dataset_dir(cfg.data, "pets")).class_names == ["cat", "dog"]
    # A rerun keeps up-to-date datasets; a changed parameter rebuilds only what the override touches.
    assert shards_job.main(["--config", str(config), "--only", "icons", "data.seed=1"]) == 0
    assert load_index(dataset_dir(cfg.data, "icons")).content_hash != hashes["icons"]
    assert load_index(dataset_dir(cfg.data, "floor")).content_hash == hashes["floor"]
    assert shards_job.main(["--config", str(config), "--only", "nope"]) == 2
