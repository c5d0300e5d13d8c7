"""ray_jobs.evaluate checks its backbone, adapters and shards before it joins Ray, and takes adapters as a
fine-tune's output folder, its files by glob, or the bank file. No Ray: joining it is stubbed out."""

from __future__ import annotations

from pathlib import Path

import pytest

import diffscaler.cluster
from diffscaler.data import make_shards
from ray_jobs.evaluate import main
from tests.support.shards import make_image_folder, quiet


class Joined(Exception):
    """Raised where the program would connect to Ray: every check before it passed."""


@pytest.fixture
def setup(backbone_and_adapters, tmp_path, monkeypatch):
    backbone, ad = backbone_and_adapters
    for task in ("a", "b"):
        src = make_image_folder(tmp_path / "src" / task, {"": 8}, size=(16, 16))
        make_shards(
            f"folder:{src}", str(tmp_path / "shards" / task), size=16, samples_per_shard=8, eval_fraction=0.5, log=quiet
        )
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data:\n  image_size: 16\n  shards_root: {tmp_path / 'shards'}\n  targets: [a, b]\neval:\n  num_samples: 2\n"
    )

    def joined(*a, **k):
        raise Joined

    monkeypatch.setattr(diffscaler.cluster, "connect_ray", joined)
    return ["--config", str(cfg), "--backbone", str(backbone), "--out", str(tmp_path / "eval")], ad


def test_adapter_folder_files_and_bank_are_accepted(setup):
    argv, ad = setup
    for adapters in ([str(ad)], [str(p) for p in sorted(ad.glob("*.safetensors"))], [str(ad / "bank.json")]):
        with pytest.raises(Joined):
            main([*argv, "--adapters", *adapters, "eval.num_samples=4"])  # overrides after the list still work


def test_bad_backbone_or_adapters_are_reported_before_ray(setup, tmp_path, capsys):
    argv, ad = setup
    missing = [a if a != argv[3] else str(tmp_path / "none.safetensors") for a in argv]
    assert main([*missing, "--adapters", str(ad)]) == 2
    assert "backbone file not found" in capsys.readouterr().err
    assert main([*argv, "--adapters", str(ad), "data.targets=[a]"]) == 2  # b has no shards to score it on
    assert "task 'b' is not in data.targets" in capsys.readouterr().err
    # eval.num_reference above the eval split's 4 images is a cap, not an error (README, issue 27 item 5)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main([*[a if a != argv[3] else str(bad) for a in argv], "--adapters", str(ad)]) == 2
    assert "not a plain state dict" in capsys.readouterr().err
    assert not (Path(argv[5]) / "fid.json").exists()
