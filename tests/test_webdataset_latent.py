"""Users' WebDataset shards with their own maps, encoded for a latent backbone (issue 21): the README's DiT-XL/2
conditional command run as written at toy size (a tiny random VAE, DiT-T/4 on 4x8x8 latents of 16 px images),
the maps stored beside the latents at pixel resolution; a sample without its map named by shard and key; a
rewritten shard or other keys re-encoded."""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from diffscaler.config import load_config
from diffscaler.data.index import in_eval_split
from diffscaler.data.sources import centre_square, prepare_image
from tests.support.pipeline import micro_config

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # pixels; the tiny VAE downsamples by 2 -> 4 x 8 x 8 latents
KEYS = [f"room-{i:03d}" for i in range(16)]
EVAL_FRACTION = 0.25  # micro_config's


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_rooms(folder: Path, seed: int = 0, drop_map: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Two shards of 8 samples, each a 24x20 RGB png (not square: the centre crop matters), its 8-bit grey
    depth.png of the same size, and a cls; `drop_map` names a sample written without its map.
    Returns {key: (image, depth)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for shard in range(2):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as sink:
            for key in KEYS[8 * shard : 8 * shard + 8]:
                image = np.kron(rng.integers(0, 256, (5, 6, 3)), np.ones((4, 4, 1))).astype(np.uint8)  # (20, 24, 3)
                depth = rng.integers(0, 256, (20, 24), dtype=np.uint8)
                sample = {"__key__": key, "png": _png(image), "cls": str(len(data) % 2)}
                if key != drop_map:
                    sample["depth.png"] = _png(depth)
                sink.write(sample)
                data[key] = (image, depth)
    return data


def expected_map(depth: np.ndarray) -> np.ndarray:
    """The map as the README says it is stored: the image's centre square, nearest neighbour to SIZE px."""
    im = Image.fromarray(depth)
    return np.asarray(im.resize((SIZE, SIZE), Image.Resampling.NEAREST, box=centre_square(*im.size)))


def readme_conditional_command() -> list[str]:
    """The README's DiT-XL/2 conditional command: the pipeline's argv after `python -m ray_jobs.pipeline`."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Fine-tune the public DiT-XL/2") :]
    section = section[: section.index("\n## ", 1)]
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if "key:" in b]
    assert len(blocks) == 1, "the DiT-XL/2 section has one conditional sh block"
    argv = shlex.split(blocks[0].replace("\\\n", " "))
    return argv[argv.index("ray_jobs.pipeline") + 1 :]


def test_the_readme_conditional_targets_validate_on_the_dit_xl_config():
    """The README's line, on the config it names (the real DiT-XL weights are not here): webdataset + data.vae +
    key: validates - refused before this work ("not encoded through data.vae")."""
    argv = readme_conditional_command()
    config = argv[argv.index("--config") + 1]
    overrides = [a for a in argv if "=" in a]
    cfg = load_config(str(ROOT / config), overrides)
    (task,) = cfg.data.targets
    assert task.webdataset and task.condition == "key:depth.png" and task.label_key == "none"
    assert cfg.data.vae and cfg.model.in_channels == 4
    from diffscaler.config import ConfigError

    with pytest.raises(ConfigError, match=r"image_key: 'npy': with data.vae the shards stage encodes your images"):
        npy = overrides[-1].replace("label_key:", "image_key: npy, label_key:")
        load_config(str(ROOT / config), [*overrides[:-1], npy])


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--source", "webdataset:/data/rooms-wds"], "shards make encodes WebDataset shards through --vae PATH"),
        (["--source", "emoji", "--label-key", "cls"], "--label-key: label_key and image_key are for webdataset:"),
        (["--source", "emoji", "--condition", "key:depth.png"], "--condition 'key:depth.png': shards make computes"),
        (["--source", "webdataset:/x", "--vae", "/v", "--image-key", "npy"], "--image-key: 'npy': with data.vae"),
    ],
)
def test_shards_make_refuses_webdataset_flags_that_cannot_work(argv, words, tmp_path, capsys, refuse_ray):
    from diffscaler.cli import main as cli_main

    assert cli_main(["shards", "make", "--out", str(tmp_path / "out"), *argv]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_readme_depth_map_target_runs_as_written_encoded_fine_tuned_and_evaluated(ray_local, tmp_path, capsys):
    from diffscaler.cli import main as cli_main
    from diffscaler.data import load_index, read_split
    from diffscaler.vae import save_tiny_vae
    from ray_jobs.pipeline import main as pipeline_main

    rooms = write_rooms(tmp_path / "rooms-wds")
    vae = save_tiny_vae(tmp_path / "vae")
    backbone = tmp_path / "latent.safetensors"
    init = ["init-backbone", "--model", "DiT-T/4", "--input-size", "8", "--in-channels", "4", "--num-classes", "3"]
    assert cli_main([*init, "--seed", "0", "--out", str(backbone)]) == 0
    stages = ["shards", "finetune", "evaluate"]
    config = micro_config(
        tmp_path,
        stages,
        model={"input_size": SIZE // 2, "in_channels": 4},
        data={"image_size": SIZE},
        pipeline={"stages": stages},
    )
    paths = {
        "ray_jobs/configs/dit-xl-256.yaml": str(config),
        "/shared/runs/xl-depth": str(tmp_path / "run"),
        "/shared/weights/DiT-XL-2-256x256.pt": str(backbone),
        "/shared/weights/sd-vae-ft-ema": str(vae),
        "/data/rooms-wds": str(tmp_path / "rooms-wds"),
    }
    argv = []
    for arg in readme_conditional_command():
        for old, new in paths.items():
            arg = arg.replace(old, new)
        argv.append(arg)
    capsys.readouterr()
    assert pipeline_main(argv) == 0, capsys.readouterr().err

    run = tmp_path / "run"
    index = load_index(str(run / "shards" / "rooms-depth"))
    assert index.latent and index.pixel_size == SIZE and index.data["latent"]["shape"] == [4, SIZE // 2, SIZE // 2]
    assert index.data["condition"] == {"kind": "key:depth.png", "params": {}}
    assert index.data["members"]["condition"] == "cond.png" and index.data["members"]["condition_channels"] == 1
    assert index.data["read_with"] == {"image_key": "", "label_key": "none"}
    assert index.data["source_files"]["files"] == 2 and index.class_names == ["unconditional"]
    # the eval split by key hash; images cropped and resized as a folder's, maps nearest-resized from the same square
    want_eval = [k for k in KEYS if in_eval_split(k, EVAL_FRACTION)]
    assert 0 < len(want_eval) < len(KEYS) and index.num_samples("eval") == len(want_eval)
    for split, keys in (("train", [k for k in KEYS if k not in want_eval]), ("eval", want_eval)):
        pixels, _labels, maps = read_split(index.url, split, pixels=True, conditions=True)
        assert maps.shape == (len(keys), 1, SIZE, SIZE) and maps.dtype == np.uint8
        for n, key in enumerate(keys):
            image, depth = rooms[key]
            np.testing.assert_array_equal(pixels[n], prepare_image(Image.fromarray(image), SIZE), err_msg=key)
            np.testing.assert_array_equal(maps[n, 0], expected_map(depth), err_msg=key)

    meta = json.loads((run / "adapters" / "rooms-depth.json").read_text())
    assert meta["condition_extractor"]["kind"] == "key:depth.png" and meta["condition_extractor"]["size"] == SIZE
    summary = json.loads((run / "adapters" / "summary.json").read_text())
    assert {r["task"]: r["status"] for r in summary["rows"]} == {"rooms-depth": "ok"}
    # evaluated as a conditional latent task: generated with the eval split's maps, decoded, FID; no extractor
    rows = {r["label"]: r for r in json.loads((run / "fid.json").read_text())["results"] if r["task"] == "rooms-depth"}
    own = rows["affiner"]
    assert own["status"] == "ok" and own["fid"] is not None and own["conditioned"] and own["fidelity"] is None
    assert own["condition"] == "key:depth.png" and own["num_reference"] == len(want_eval)


def _config(tmp_path: Path, vae: Path, shards: Path, *extra: str, label_key: str = "none"):
    spec = f'{{name: rooms-depth, source: "webdataset:{shards}", label_key: {label_key}, condition: "key:depth.png"}}'
    return load_config(
        None,
        [
            f"data.shards_root={tmp_path / 'root'}",
            f"data.targets=[{spec}]",
            f"data.image_size={SIZE}",
            f"data.vae={vae}",
            "data.samples_per_shard=6",
            f"data.eval_fraction={EVAL_FRACTION}",
            "data.pretrain_source=emoji",
            *extra,
        ],
    )


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_missing_map_is_named_and_a_rewritten_shard_or_other_keys_re_encode(ray_local, tmp_path):
    from diffscaler.cli import main as cli_main
    from diffscaler.data import DatasetError, load_index
    from diffscaler.data.build import build_all
    from diffscaler.stages.base import Run
    from diffscaler.stages.shards import ShardsStage
    from diffscaler.vae import save_tiny_vae

    shards = tmp_path / "rooms-wds"
    write_rooms(shards, drop_map="room-011")
    vae = save_tiny_vae(tmp_path / "vae")
    cfg = _config(tmp_path, vae, shards)
    with pytest.raises(DatasetError) as err:
        build_all(cfg.data, ["rooms-depth"])
    assert f"{shards / '00001.tar'}: sample 'room-011': missing member .depth.png" in str(err.value)
    assert "data.skip_bad_samples=true" in str(err.value)
    assert not (tmp_path / "root" / "rooms-depth").exists()  # refused before anything is written

    # data.skip_bad_samples: left out and counted
    skipping = _config(tmp_path, vae, shards, "data.skip_bad_samples=true")
    run = Run.for_program(skipping, "shards", tmp_path / "out")
    stage = ShardsStage(only=["rooms-depth"])
    stage.preflight(run)
    stage.run(run)
    index = load_index(str(tmp_path / "root" / "rooms-depth"))
    assert index.data["num_samples"] == 15 and len(index.data["skipped_inputs"]) == 1
    assert "room-011" in index.data["skipped_inputs"][0]["ref"] and stage.check(run).valid
    first = index.content_hash

    # the shard rewritten with its map: noticed from its size and mtime, re-encoded
    write_rooms(shards)
    assert "changed since the build" in stage.check(run).reason
    stage.run(run)
    index = load_index(str(tmp_path / "root" / "rooms-depth"))
    assert index.data["num_samples"] == 16 and not index.data["skipped_inputs"] and index.content_hash != first
    assert stage.check(run).valid

    # other keys: labels from cls now
    relabelled_cfg = _config(tmp_path, vae, shards, "data.skip_bad_samples=true", label_key="cls")
    relabelled = Run.for_program(relabelled_cfg, "shards", tmp_path / "out")
    assert "read_with" in stage.check(relabelled).reason
    stage.run(relabelled)
    built = load_index(str(tmp_path / "root" / "rooms-depth"))
    assert built.class_names == ["0", "1"]

    # by hand: the same shards, byte for byte
    by_hand = [
        "shards",
        "make",
        "--source",
        f"webdataset:{shards}",
        "--out",
        str(tmp_path / "by-hand"),
        "--vae",
        str(vae),
        "--size",
        str(SIZE),
        "--samples-per-shard",
        "6",
        "--eval-fraction",
        str(EVAL_FRACTION),
        "--label-key",
        "cls",
        "--condition",
        "key:depth.png",
        "--skip-bad",
    ]
    assert cli_main(by_hand) == 0
    assert load_index(str(tmp_path / "by-hand")).content_hash == built.content_hash
