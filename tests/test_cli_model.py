"""The model CLI contract: model-info, init-backbone, sample (single and mixed tasks)."""

import json

import numpy as np
import pytest
import torch

from diffscaler.adapters import AdapterBank, TaskInfo
from diffscaler.artifacts import load_backbone, save_adapter, save_backbone
from diffscaler.cli import main
from tests.support.models import perturb, randomize


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_model_info_json_matches_the_paper(capsys):
    code, out, _ = run(
        capsys, "model-info", "--model", "DiT-XL/2", "--input-size", "32", "--in-channels", "4", "--json"
    )
    info = json.loads(out)
    assert code == 0 and round(info["params"] / 1e6) == 675 and round(info["gflops_per_forward"], 1) == 118.6


def test_init_backbone_then_sample_mixed_tasks(tmp_path, capsys):
    path = tmp_path / "b.safetensors"
    code, out, _ = run(
        capsys,
        "init-backbone",
        "--model",
        "DiT-T/8",
        "--input-size",
        "16",
        "--in-channels",
        "3",
        "--num-classes",
        "10",
        "--seed",
        "0",
        "--out",
        str(path),
    )
    assert code == 0 and json.loads(out)["content_hash"].startswith("sha256:")
    model, _ = load_backbone(path)
    with torch.no_grad():  # a fresh backbone outputs exactly zero: give it something to say
        perturb(model, 0.05)
    digest = save_backbone(model, path)
    bank = AdapterBank.attach(model, [TaskInfo("a"), TaskInfo("b", num_classes=2, conditional=True)], rank=2)
    randomize(bank, 0.3)
    for task in ("a", "b"):
        save_adapter(bank, task, tmp_path / "ad", backbone_hash=digest)
    common = [
        "--backbone",
        str(path),
        "--adapters",
        str(tmp_path / "ad/a.safetensors"),
        str(tmp_path / "ad/b.safetensors"),
        "--num",
        "3",
        "--seed",
        "5",
        "--steps",
        "3",
    ]
    code, out, err = run(
        capsys, "sample", *common, "--task", "a,b", "--batch-size", "4", "--out", str(tmp_path / "mixed")
    )
    assert code == 0, err
    mixed = np.load(tmp_path / "mixed/samples.npz")
    assert mixed["images"].shape == (6, 16, 16, 3)
    assert list(mixed["task"]) == ["a", "b"] * 3  # interleaved: every batch mixes the tasks
    assert (tmp_path / "mixed/grid.png").stat().st_size > 0
    code, _, err = run(capsys, "sample", *common, "--task", "a,b", "--batch-size", "1", "--out", str(tmp_path / "b1"))
    assert code == 0, err
    assert np.abs(np.load(tmp_path / "b1/samples.npz")["images"].astype(int) - mixed["images"].astype(int)).max() <= 1
    # the tasks really differ (adapters reach the samples)
    assert np.abs(mixed["images"][0::2].astype(int) - mixed["images"][1::2].astype(int)).max() > 10


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["model-info", "--model", "DiT-XL/3"], "not a preset"),
        (["model-info", "--model", "DiT-B/4", "--input-size", "30"], "not divisible by the patch size 4"),
        (["init-backbone", "--model", "DiT-T/4", "--out", "x.pt"], "ends in .safetensors"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_sample_errors(tmp_path, capsys):
    path = tmp_path / "b.safetensors"
    run(capsys, "init-backbone", "--model", "DiT-T/8", "--input-size", "16", "--out", str(path))
    code, _, err = run(capsys, "sample", "--backbone", str(path), "--task", "x", "--out", str(tmp_path / "o"))
    assert code == 2 and "needs --adapters" in err
    code, _, err = run(capsys, "sample", "--backbone", str(tmp_path / "none.safetensors"), "--out", str(tmp_path))
    assert code == 2 and "not found" in err


def test_sample_refuses_unknown_tasks_and_an_out_that_is_a_file_before_sampling(
    backbone_and_adapters, tmp_path, capsys, monkeypatch
):
    import diffscaler.cli_model as cli_model

    path, ad = backbone_and_adapters
    calls = []
    monkeypatch.setattr(cli_model, "sample_images", lambda *a, **k: calls.append(1) or np.zeros((1, 16, 16, 3)))
    common = ["sample", "--backbone", str(path), "--adapters", str(ad / "a.safetensors"), "--steps", "2"]
    code, _, err = run(capsys, *common, "--task", "a,nosuch", "--out", str(tmp_path / "o"))
    assert code == 2 and "--task: nosuch not among the adapters' tasks ['a']" in err
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, *common, "--task", "a", "--out", str(tmp_path / "file"))
    assert code == 2 and "is a file, not a folder" in err
    assert calls == []  # refused before any image was sampled


def test_adapters_are_taken_as_folder_files_or_bank(backbone_and_adapters, capsys, tmp_path):
    from diffscaler.adapters.bank import AdapterLoadError
    from diffscaler.artifacts import adapter_files

    _path, ad = backbone_and_adapters
    files = [ad / "a.safetensors", ad / "b.safetensors"]
    assert (ad / "bank.safetensors").is_file() and (ad / "bank.json").is_file()
    assert adapter_files([ad]) == files  # the bank beside them is not an adapter
    assert adapter_files(sorted(ad.glob("*.safetensors"))) == files  # DIR/*.safetensors, bank included by the glob
    assert adapter_files([ad / "bank.json"]) == files == adapter_files([ad / "bank.safetensors"])
    assert adapter_files([ad / "b.safetensors", ad]) == files[::-1]  # once each, first mention first
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterLoadError, match="no <task>.safetensors"):
        adapter_files([tmp_path / "empty"])
    (ad / "b.safetensors").unlink()
    with pytest.raises(AdapterLoadError, match=r"per-task file\(s\) .*b.safetensors.* are not beside it"):
        adapter_files([ad / "bank.json"])


def test_sample_takes_an_adapter_folder(backbone_and_adapters, tmp_path, capsys):
    path, ad = backbone_and_adapters
    code, out, err = run(
        capsys,
        "sample",
        "--backbone",
        str(path),
        "--adapters",
        str(ad),
        "--num",
        "1",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 0, err
    assert json.loads(out)["tasks"] == ["a", "b"]
