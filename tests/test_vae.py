"""The latent path: a tiny random AutoencoderKL saved with diffusers' save_pretrained, loaded the way a user's
weights are; encode/decode against diffusers called directly; latent shards encoded on Ray; bad input.

.venv/bin/python -m pytest tests/test_vae.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffscaler.vae import VaeError, check_latent_backbone, load_vae, save_tiny_vae, vae_identity

SIZE = 16  # pixels; the tiny VAE downsamples by 2 -> 4 x 8 x 8 latents


def quiet(_message: str) -> None:
    pass


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    return Path(save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-vae"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """13 blocky-noise RGB images in two class folders."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(13):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(exist_ok=True)
        im = np.kron(rng.integers(0, 256, (SIZE // 4, SIZE // 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
        Image.fromarray(im).save(cls / f"{i:03d}.png")
    return root


def test_encode_decode_match_diffusers_called_directly(tiny_vae):
    from diffusers import AutoencoderKL

    vae = load_vae(tiny_vae)
    direct = AutoencoderKL.from_pretrained(str(tiny_vae), local_files_only=True).eval()
    images = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        want_z = direct.encode(x).latent_dist.mean * direct.config.scaling_factor
        want_x = direct.decode(want_z / direct.config.scaling_factor).sample.clamp(-1, 1)
    z = vae.encode(images)
    assert z.shape == (3, 4, SIZE // 2, SIZE // 2) and vae.scaling_factor == direct.config.scaling_factor == 0.5
    torch.testing.assert_close(z, want_z, rtol=0, atol=1e-6)
    torch.testing.assert_close(vae.decode(z), want_x, rtol=0, atol=1e-6)
    ident = vae.identity
    assert ident["hash"].startswith("sha256:") and ident["latent_channels"] == 4 and ident["downsample"] == 2
    assert vae_identity(tiny_vae) == ident  # from the files alone, no model built


def test_single_weights_file_with_its_config(tiny_vae, tmp_path):
    weights = tmp_path / "my-vae.safetensors"
    shutil.copy(tiny_vae / "diffusion_pytorch_model.safetensors", weights)
    with pytest.raises(VaeError, match="needs its config.json"):
        load_vae(weights)
    vae = load_vae(weights, config=tiny_vae / "config.json")
    assert vae.hash == load_vae(tiny_vae).hash


def test_bad_vae_paths_are_named(tiny_vae, tmp_path):
    with pytest.raises(VaeError, match=r"/nowhere/vae: no such file or folder; give a local diffusers"):
        load_vae("/nowhere/vae")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VaeError, match=r"empty: folder holds none of diffusion_pytorch_model.safetensors"):
        load_vae(empty)
    unet = tmp_path / "unet"
    shutil.copytree(tiny_vae, unet)
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    with pytest.raises(VaeError, match=r"config.json: not an AutoencoderKL config \(class 'UNet2DModel'"):
        load_vae(unet)
    other = tmp_path / "other"
    shutil.copytree(tiny_vae, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["block_out_channels"] = [8, 32]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(VaeError, match="does not match its config"):
        load_vae(other)


def test_latent_channels_that_differ_from_the_backbone(tiny_vae, tmp_path):
    three = Path(save_tiny_vae(tmp_path / "three", latent_channels=3))
    vae = load_vae(three)
    check_latent_backbone(load_vae(tiny_vae), 4, SIZE // 2, SIZE, "backbone b.safetensors")
    with pytest.raises(
        VaeError,
        match=r"backbone b.safetensors: the backbone takes 4x8x8 inputs, the VAE .* makes "
        r"3x8x8 latents of 16x16 images",
    ):
        check_latent_backbone(vae, 4, SIZE // 2, SIZE, "backbone b.safetensors")


@pytest.mark.ray
def test_latent_shards_equal_in_memory_encoding_and_resume(ray_local, tiny_vae, image_folder, tmp_path):
    from diffscaler.data import ShardReader, check_dataset, read_split
    from diffscaler.data.encode import encode_shards
    from diffscaler.data.sources import get_source, prepare_image

    out = str(tmp_path / "latents")
    index = encode_shards(
        f"folder:{image_folder}",
        out,
        str(tiny_vae),
        size=SIZE,
        samples_per_shard=4,
        eval_fraction=0.25,
        batch_size=3,
        log=quiet,
    )
    assert index.latent and index.channels == 4 and index.image_size == SIZE // 2 and index.pixel_size == SIZE
    assert index.data["latent"]["shape"] == [4, 8, 8] and index.data["latent"]["dtype"] == "float16"
    vae = load_vae(tiny_vae)
    assert index.vae_hash == vae.hash and index.data["latent"]["vae"]["scaling_factor"] == 0.5
    assert check_dataset(out).problems == []
    # pretraining on these latents with another VAE configured is refused before Ray, naming both
    from diffscaler.config import ConfigError, load_config
    from diffscaler.train.pretrain import plan_run

    other = save_tiny_vae(tmp_path / "other-vae", seed=1)
    pre = load_config(
        None,
        [
            "model.in_channels=4",
            f"model.input_size={SIZE // 2}",
            f"data.vae={other}",
            "pretrain.sample_every=0",
            "pretrain.global_batch_size=2",
            "pretrain.num_workers=1",
            f"pretrain.storage_path={tmp_path / 'ray'}",
        ],
    )
    with pytest.raises(ConfigError, match=rf"encoded with VAE {index.vae_hash}, data.vae is sha256:"):
        plan_run(pre, tmp_path / "pre", out)

    latents, labels = read_split(out, "train")  # (N, 4, 8, 8) float32 from fp16
    pixels, labels2 = read_split(out, "train", pixels=True)  # the images that were encoded
    assert latents.shape == (index.num_samples("train"), 4, 8, 8) and pixels.shape[1:] == (SIZE, SIZE, 3)
    assert (labels == labels2).all()
    src = get_source(f"folder:{image_folder}")
    refs = [json.loads(s)["id"] for s in _json_members(index, "train")]
    want_pixels = np.stack([prepare_image(src.load(r), SIZE) for r in refs])
    assert (pixels == want_pixels).all()
    want = vae.encode(want_pixels).numpy().astype(np.float16).astype(np.float32)
    # equal up to fp16 storage: one fp16 step at most (the batch a row was encoded in changes float rounding)
    np.testing.assert_allclose(latents, want, rtol=2**-10, atol=2**-14)
    fp16_close = lambda a, b: np.allclose(a, b, rtol=2**-10, atol=2**-14)  # noqa: E731

    # hflip picks the stored latent of the flipped image, never a mirrored latent
    flipped = vae.encode(want_pixels[:, :, ::-1].copy()).numpy().astype(np.float16).astype(np.float32)
    reader = ShardReader(out, "train", batch_size=len(latents), seed=0, hflip=True, shuffle_buffer=1)
    batch = next(iter(reader.epoch(0)))["image"].numpy()
    for row in batch:
        assert any(fp16_close(row, w) for w in (*want, *flipped))
    assert any(any(fp16_close(row, f) for f in flipped) for row in batch)
    assert not any(any(fp16_close(row, w[..., ::-1]) for w in want) for row in batch)  # no mirrored latent

    # Resume: an interrupted run (index gone, sidecars of finished shards present) re-encodes nothing kept
    first = Path(out) / "train-000000.tar"
    (Path(out) / "train-000000.tar.done.json").write_text(json.dumps({"plan": "stale"}))
    kept = Path(out) / "train-000001.tar"
    entry = next(e for e in index.data["splits"]["train"]["shards"] if e["name"] == kept.name)
    (Path(out) / "train-000001.tar.done.json").write_text(
        json.dumps(
            {
                "entry": entry,
                "class_counts": _class_counts(out, kept.name),
                "skipped": [],
                "plan": _plan_hash_of(index, out, "train", 1),
            }
        )
    )
    (Path(out) / "index.json").unlink()
    mtime = kept.stat().st_mtime_ns
    messages: list[str] = []
    again = encode_shards(
        f"folder:{image_folder}",
        out,
        str(tiny_vae),
        size=SIZE,
        samples_per_shard=4,
        eval_fraction=0.25,
        batch_size=3,
        log=messages.append,
        progress_every=2,
    )
    assert any("resuming, 1 of" in m for m in messages)
    # progress inside a shard, not only once it is written (a large shard said nothing for minutes)
    first_written = next(i for i, m in enumerate(messages) if "encoded train-000000.tar" in m)
    assert any(" encoded 2/" in m and "images/s" in m for m in messages[:first_written]), messages
    assert kept.stat().st_mtime_ns == mtime and first.exists()
    assert again.content_hash == index.content_hash
    assert not list(Path(out).glob("*.done.json"))


def _json_members(index, split):
    from diffscaler.data.samples import iter_samples

    return [s["json"] for shard in index.shards(split) for s in iter_samples(shard.url)]


def _class_counts(out, name):
    from diffscaler.data.samples import iter_samples

    counts = [0, 0]
    for s in iter_samples(str(Path(out) / name)):
        counts[int(s["cls"])] += 1
    return counts


def _plan_hash_of(index, out, split, number):
    from diffscaler.data.encode import _plan_hash, latent_parameters
    from diffscaler.data.sources import SourceItem

    d = index.data
    params = latent_parameters(
        d["source"], d["pixel_size"], d["samples_per_shard"], d["eval_fraction"], d["limit"], d["seed"], d["vae_hash"]
    )
    from diffscaler.data.samples import iter_samples

    shard = Path(out) / f"{split}-{number:06d}.tar"
    items = [SourceItem(json.loads(s["json"])["id"], int(s["cls"])) for s in iter_samples(str(shard))]
    return _plan_hash(params, split, number, items)


# ------------------------------------------------------------------------------------------------
# The latent path end to end through the pipeline, and the mismatches refused before any work
# ------------------------------------------------------------------------------------------------


def _latent_backbone(tmp_path, capsys, in_channels=4, input_size=SIZE // 2) -> Path:
    from diffscaler.cli import main as cli_main

    path = tmp_path / f"latent-{in_channels}x{input_size}.safetensors"
    assert (
        cli_main(
            [
                "init-backbone",
                "--model",
                "DiT-T/4",
                "--input-size",
                str(input_size),
                "--in-channels",
                str(in_channels),
                "--num-classes",
                "3",
                "--seed",
                "0",
                "--out",
                str(path),
            ]
        )
        == 0
    )
    capsys.readouterr()
    return path


def _latent_config(tmp_path, tiny_vae, backbone, stages, **data):
    from diffscaler.config import load_config
    from tests.support.pipeline import micro_config

    path = micro_config(
        tmp_path,
        stages,
        model={"input_size": SIZE // 2, "in_channels": 4},
        data={"image_size": SIZE, "vae": str(tiny_vae), **data},
        pipeline={"stages": stages, "backbone": str(backbone)},
    )
    return load_config(path)


def test_pipeline_refuses_a_vae_or_size_that_does_not_fit_the_backbone(tiny_vae, tmp_path, capsys):
    from diffscaler.pipeline import Pipeline, PipelineInputError

    backbone = _latent_backbone(tmp_path, capsys)
    three = save_tiny_vae(tmp_path / "three", latent_channels=3)
    with pytest.raises(PipelineInputError, match=r"takes 4x8x8 inputs, data.vae .* makes 3x8x8 latents"):
        Pipeline(_latent_config(tmp_path, tiny_vae, backbone, ["shards"], vae=three), tmp_path / "r1").preflight()
    with pytest.raises(
        PipelineInputError,
        match=r"latents of data.image_size=32 images \(downsampling 2\): set "
        r"data.image_size=16",
    ):
        Pipeline(_latent_config(tmp_path, tiny_vae, backbone, ["shards"], image_size=32), tmp_path / "r2").preflight()
    with pytest.raises(PipelineInputError, match=r"data.vae: VAE /nowhere: no such file or folder"):
        Pipeline(_latent_config(tmp_path, tiny_vae, backbone, ["shards"], vae="/nowhere"), tmp_path / "r3").preflight()
    with pytest.raises(PipelineInputError, match=r"model.in_channels 4: .* set data.vae=PATH"):
        Pipeline(_latent_config(tmp_path, tiny_vae, backbone, ["shards"], vae=""), tmp_path / "r4").preflight()


@pytest.mark.ray
def test_latent_pipeline_encode_finetune_evaluate_then_sample_decoded(ray_local, tiny_vae, tmp_path, capsys):
    """encode (shards stage, data.vae) -> fine-tune -> FID on decoded samples, then `diffscaler sample --vae`;
    pixel shards for the latent backbone, latent shards for a pixel backbone, another VAE: refused."""
    from diffscaler.cli import main as cli_main
    from diffscaler.data import dataset_dir, load_index, make_shards
    from diffscaler.pipeline import run_pipeline
    from diffscaler.train.finetune import FinetuneInputError, plan_finetunes

    backbone = _latent_backbone(tmp_path, capsys)
    cfg = _latent_config(tmp_path, tiny_vae, backbone, ["shards", "finetune", "evaluate", "report"])
    out = tmp_path / "run"
    run_pipeline(cfg, out)
    manifest = json.loads((out / "pipeline.json").read_text())
    assert manifest["status"] == "done", manifest["error"]
    run_cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
    shards_root = Path(run_cfg["data"]["shards_root"]) if run_cfg else tmp_path / "shards"
    red = load_index(str(shards_root / "red"))
    assert red.latent and red.vae_hash == load_vae(tiny_vae).hash and red.channels == 4
    fid = json.loads((out / "fid.json").read_text())
    assert fid["results"] and all(r["status"] == "ok" and r["fid"] is not None for r in fid["results"])
    adapters = manifest["stages"]["finetune"]["outputs"]["adapters"]["affiner"]
    # the report's grids are decoded images, as wide as the grid of the real (encoded) images beside them
    from PIL import Image

    assert "decoded through" in (out / "report.md").read_text()
    with Image.open(out / "samples_red.png") as generated, Image.open(out / "real_red.png") as real:
        assert generated.mode == real.mode == "RGB" and generated.width == real.width

    code = cli_main(
        [
            "sample",
            "--backbone",
            str(backbone),
            "--adapters",
            adapters["red"],
            "--vae",
            str(tiny_vae),
            "--num",
            "3",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "samples"),
        ]
    )
    assert code == 0
    images = np.load(tmp_path / "samples" / "samples.npz")["images"]
    assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.uint8  # decoded, not latents
    capsys.readouterr()
    assert cli_main(["sample", "--backbone", str(backbone), "--num", "1", "--out", str(tmp_path / "s2")]) == 2
    assert "is a latent backbone (4 channels); its samples become images only through" in capsys.readouterr().err

    from dataclasses import replace

    run = replace(cfg, data=replace(cfg.data, shards_root=str(shards_root)))
    # pixel shards given to the latent backbone
    pixels = replace(run, data=replace(run.data, shards_root=str(tmp_path / "pixel-shards"), vae=""))
    for t in pixels.data.targets:
        make_shards(
            t.source,
            dataset_dir(pixels.data, t.name),
            size=SIZE // 2,
            samples_per_shard=16,
            eval_fraction=0.25,
            log=quiet,
        )
    with pytest.raises(FinetuneInputError, match=r"hold 8x8 RGB images, the backbone takes 4x8x8 latents: encode"):
        plan_finetunes(pixels, backbone, tmp_path / "ft1")
    # latent shards given to a pixel backbone
    pixel_backbone = _latent_backbone(tmp_path, capsys, in_channels=3)
    with pytest.raises(FinetuneInputError, match=r"hold 4x8x8 latents, the backbone takes 8x8 RGB images"):
        plan_finetunes(replace(run, data=replace(run.data, vae="")), pixel_backbone, tmp_path / "ft2")
    # shards of another VAE than data.vae
    other = save_tiny_vae(tmp_path / "other-vae", seed=1)
    with pytest.raises(FinetuneInputError, match=r"were encoded with VAE sha256:.*, data.vae is sha256:"):
        plan_finetunes(replace(run, data=replace(run.data, vae=other)), backbone, tmp_path / "ft3")


def test_the_readme_prepares_a_vae_with_diffusers_in_the_venv(tiny_vae, tmp_path):
    """The README's snippet, run as written in a fresh interpreter of the venv, the Hugging Face id and the shared
    folder replaced by a local folder and a temporary one (no internet here)."""
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    found = re.search(r"```python\n(# \.venv/bin/python, on the machine with internet\n.*?)```", readme, re.S)
    snippet = found.group(1)
    assert '"stabilityai/sd-vae-ft-ema"' in snippet and '"/shared/weights/sd-vae-ft-ema"' in snippet
    out = tmp_path / "prepared-vae"
    code = snippet.replace('"stabilityai/sd-vae-ft-ema"', repr(str(tiny_vae))).replace(
        '"/shared/weights/sd-vae-ft-ema"', repr(str(out))
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert load_vae(out).hash == load_vae(tiny_vae).hash
