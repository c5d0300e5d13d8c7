"""Spatial condition maps on the data side (diffscaler.data.conditions): computed at shard time (canny, the alpha
mask) or read from the user's own shards (key:<member>), stored beside the image, read with the same crop and
flip, recorded in index.json; bad input named before any work.

.venv/bin/python -m pytest tests/test_conditions.py -q          # the latent (VAE) test: -m ray
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from diffscaler.cli import main as cli_main
from diffscaler.config import ConfigError, DataConfig, TaskSpec, load_config
from diffscaler.data import (
    DatasetError,
    MixedTaskReader,
    ShardError,
    ShardReader,
    check_dataset,
    load_index,
    make_shards,
    read_split,
)
from diffscaler.data.build import check_sources, dataset_condition
from diffscaler.data.conditions import CONDITION_MEMBER, ConditionSpec, canny_edges
from diffscaler.data.indexer import index_shards
from diffscaler.data.samples import iter_samples
from diffscaler.data.writer import build_parameters, is_up_to_date
from tests.support.shards import make_image_folder, quiet, rewrite_member, rgba_folder

SIZE = 16
DATA = DataConfig()
CANNY = ConditionSpec.from_config("canny", DATA)
MASK = ConditionSpec.from_config("mask", DATA)


@pytest.fixture(scope="module")
def rgba(tmp_path_factory) -> Path:
    return rgba_folder(tmp_path_factory.mktemp("rgba") / "shapes")


@pytest.fixture(scope="module")
def canny_shards(rgba, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("canny") / "ds"
    make_shards(
        f"folder:{rgba}", str(out), size=SIZE, samples_per_shard=4, eval_fraction=0.25, condition=CANNY, log=quiet
    )
    return out


def stored(folder: Path, split: str = "*") -> dict[str, dict[str, np.ndarray]]:
    """{source image id: {"png": uint8 (S, S, 3), "cond.png": uint8 (S, S)}} as written in the split's shards."""
    out = {}
    for shard in sorted(folder.glob(f"{split}-*.tar")):
        for sample in iter_samples(str(shard)):
            ref = json.loads(sample["json"])["id"]
            out[ref] = {m: np.asarray(Image.open(io.BytesIO(sample[m]))) for m in ("png", CONDITION_MEMBER)}
    return out


def test_condition_kinds_and_extractor_fields_are_validated():
    cfg = load_config(
        None,
        [
            "data.targets=[{name: e, source: emoji, condition: canny}, {name: m, source: icons, "
            "condition: mask}, {name: d, source: 'webdataset:/x', condition: key:depth.png}]"
        ],
    )
    assert [t.condition for t in cfg.data.targets] == ["canny", "mask", "key:depth.png"]
    assert dataset_condition(cfg.data, "m") == MASK and dataset_condition(cfg.data, "openclipart") is None
    with pytest.raises(
        ConfigError,
        match=r"data\.targets\[0\]\.condition: 'sobel' is not a condition kind; allowed: "
        r"canny, mask, key:<member>",
    ):
        load_config(None, ["data.targets=[{name: e, source: emoji, condition: sobel}]"])
    with pytest.raises(ConfigError, match=r"condition: mask is the alpha foreground, and source 'tiles' has no alpha"):
        load_config(None, ["data.targets=[{name: t, source: tiles, condition: mask}]"])
    with pytest.raises(ConfigError, match=r"'key:depth\.npy': key:<member> names an image member"):
        load_config(None, ["data.targets=[{name: d, source: 'webdataset:/x', condition: 'key:depth.npy'}]"])
    with pytest.raises(ConfigError, match=r"data\.canny_high: must be >= data\.canny_low"):
        load_config(None, ["data.canny_low=300"])
    with pytest.raises(ConfigError, match=r"data\.mask_alpha_threshold: must be in \[1, 255\]"):
        load_config(None, ["data.mask_alpha_threshold=0"])


def test_grey_map_png_round_trip_fast_decoder_and_pillow():
    from diffscaler.data.conditions import encode_map
    from diffscaler.data.pngcodec import decode_png_batch

    rng = np.random.default_rng(0)
    maps = [
        rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8),
        np.zeros((SIZE, SIZE), np.uint8),
        np.kron(rng.integers(0, 2, (4, 4)), np.full((4, 4), 255)).astype(np.uint8),
    ]
    blobs = [encode_map(m) for m in maps]  # each row filter (none / sub / up) is chosen by one of these
    assert all(Image.open(io.BytesIO(b)).mode == "L" for b in blobs)
    assert (decode_png_batch(blobs, grey=True) == np.stack(maps)).all()
    assert all((np.asarray(Image.open(io.BytesIO(b))) == m).all() for b, m in zip(blobs, maps))


def test_mask_is_the_alpha_through_the_same_crop_and_resize(rgba, tmp_path):
    index = make_shards(
        f"folder:{rgba}", str(tmp_path / "m16"), size=SIZE, samples_per_shard=5, condition=MASK, log=quiet
    )
    assert index.data["condition"] == {"kind": "mask", "params": {"alpha_threshold": 32, "white_threshold": 24}}
    assert index.data["members"] == {"condition": CONDITION_MEMBER, "condition_channels": 1}
    assert index.condition == MASK and check_dataset(index.url).problems == []
    # 20x16 -> 16: the centre square, no resampling: the map is the source's alpha, columns 2..17, thresholded
    maps = stored(Path(index.url))
    assert len(maps) == 12
    for ref, item in maps.items():
        alpha = np.asarray(Image.open(rgba / ref))[:, 2:18, 3]
        assert (item["cond.png"] == np.where(alpha >= 32, 255, 0)).all(), ref
        assert (item["png"][alpha == 0] == 255).all()  # the image composited on white where the map is 0
    # 20x16 -> 8: the alpha resampled exactly as Pillow resamples it alone (same box, Lanczos, reducing gap)
    small = make_shards(f"folder:{rgba}", str(tmp_path / "m8"), size=8, samples_per_shard=5, condition=MASK, log=quiet)
    for ref, item in stored(Path(small.url)).items():
        alpha = (
            Image.open(rgba / ref)
            .getchannel("A")
            .resize((8, 8), Image.Resampling.LANCZOS, box=(2, 0, 18, 16), reducing_gap=3.0)
        )
        assert (item["cond.png"] == np.where(np.asarray(alpha) >= 32, 255, 0)).all(), ref


def test_canny_maps_are_stored_read_and_flipped_with_their_images(canny_shards):
    index = load_index(str(canny_shards))
    assert index.data["condition"] == {"kind": "canny", "params": {"blur": 0.0, "high": 200.0, "low": 100.0}}
    assert check_dataset(str(canny_shards)).problems == []
    train = stored(canny_shards, "train")
    for item in train.values():
        assert (item["cond.png"] == canny_edges(item["png"], 100, 200)).all()
    # still plain WebDataset: webdataset reads image and map as they are
    urls = [str(p) for p in sorted(canny_shards.glob("train-*.tar"))]
    pairs = list(wds.WebDataset(urls, shardshuffle=False).decode("l8").to_tuple("png", "cond.png"))
    assert len(pairs) == len(train) and all(m.shape == (SIZE, SIZE) and set(np.unique(m)) <= {0, 255} for _, m in pairs)
    # the reader: each row's map is its own image's, mirrored exactly where the image is
    reader = ShardReader(str(canny_shards), "train", batch_size=9, seed=3, hflip=True, shuffle_buffer=9)
    batch = next(reader.epoch(0))
    assert batch["condition"].shape == (9, 1, SIZE, SIZE) and batch["condition"].dtype == torch.float32
    assert batch["has_condition"].all() and set(batch["condition"].unique().tolist()) <= {-1.0, 1.0}
    flips = 0
    for image, cond in zip(batch["image"], batch["condition"]):
        pixels = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        edge = np.where(cond[0].numpy() > 0, 255, 0)
        match = [
            (k, f)
            for k, item in train.items()
            for f in (False, True)
            if (pixels == (item["png"][:, ::-1] if f else item["png"])).all()
        ]
        assert len(match) == 1
        key, flipped = match[0]
        flips += flipped
        assert (edge == (train[key]["cond.png"][:, ::-1] if flipped else train[key]["cond.png"])).all()
    assert 0 < flips < 9
    # read_split: the split's maps, image for image (what evaluation samples with)
    images, labels, maps = read_split(str(canny_shards), "eval", conditions=True)
    evals = list(stored(canny_shards, "eval").values())  # in shard order, as read_split reads
    assert maps.shape == (len(images), 1, SIZE, SIZE) == (3, 1, SIZE, SIZE) and maps.dtype == np.uint8
    assert all((m[0] == e["cond.png"]).all() and (im == e["png"]).all() for m, im, e in zip(maps, images, evals))


def test_a_missing_or_broken_map_is_named_by_file_and_key(canny_shards, tmp_path):
    import shutil

    copy = tmp_path / "ds"
    shutil.copytree(canny_shards, copy)
    shard = copy / "train-000001.tar"
    key = next(iter_samples(str(shard)))["__key__"]

    def drop(s):
        if s.key == key:
            del s.members[CONDITION_MEMBER]
        return s

    rewrite_member(shard, drop)
    problems = check_dataset(str(copy)).problems
    assert any("train-000001.tar" in p and repr(key) in p and "missing member .cond.png" in p for p in problems)
    reader = ShardReader(str(copy), "train", batch_size=9, shuffle=False, hflip=False)
    with pytest.raises(ShardError, match=rf"train-000001\.tar: sample '{key}': missing member \.cond\.png"):
        list(reader.epoch(0))
    skipping = ShardReader(str(copy), "train", batch_size=4, shuffle=False, hflip=False, skip_bad=True)
    assert sum(len(b["label"]) for b in skipping.epoch(0)) == 8 and skipping.skipped == 1


def key_shards(folder: Path, n: int = 10, missing: int = -1, wrong_size: int = -1, colour_at: int = -1) -> Path:
    """WebDataset shards (webdataset.ShardWriter) of 20x16 images with a `depth.png` map each: 16-bit grey
    (RGB at `colour_at`), absent at `missing`, 10x8 px at `wrong_size`."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "part-%06d.tar"), maxcount=5, verbose=0) as sink:
        for i in range(n):
            image = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
            depth = (np.arange(20)[None, :] * 3000 + np.arange(16)[:, None] * 100 + i).astype(np.uint16)
            sample = {"__key__": f"s{i:04d}", "png": _png(Image.fromarray(image)), "cls": str(i % 2).encode()}
            if i == colour_at:
                sample["depth.png"] = _png(Image.fromarray(image[:, ::-1].copy()))
            elif i == wrong_size:
                sample["depth.png"] = _png(Image.fromarray(depth[::2, ::2].copy()))
            elif i != missing:
                sample["depth.png"] = _png(Image.fromarray(depth))
            sink.write(sample)
    return folder


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_key_member_maps_are_indexed_cropped_like_the_image_and_read(tmp_path):
    folder = key_shards(tmp_path / "grey")
    # the README's command, with the last shard as the eval split
    assert (
        cli_main(["shards", "index", str(folder), "--size", "16", "--condition", "key:depth.png", "--eval-shards", "1"])
        == 0
    )
    index = load_index(str(folder))
    assert index.data["condition"] == {"kind": "key:depth.png", "params": {}}
    assert index.data["members"]["condition"] == "depth.png" and index.condition.channels == 1
    assert check_dataset(str(folder)).problems == []
    images, _labels, maps = read_split(str(folder), "train", conditions=True)
    assert maps.shape == (5, 1, SIZE, SIZE)
    # 20x16 -> 16: the image's centre-square crop, no resampling; 16-bit depth scaled to 8 bits
    depth = (np.arange(20)[None, :] * 3000 + np.arange(16)[:, None] * 100).astype(np.float64)
    for i, m in enumerate(maps):
        want = np.clip((depth[:, 2:18] + i) * (255.0 / 65535.0), 0, 255).astype(np.uint8)
        assert (m[0] == want).all()
    batch = next(ShardReader(str(folder), "train", batch_size=5, hflip=False, shuffle=False).epoch(0))
    assert torch.equal(batch["condition"], torch.from_numpy(maps.astype(np.float32) / 127.5 - 1))
    # one colour map makes the dataset's maps 3-channel (grey ones read as RGB)
    colour = index_shards(
        str(key_shards(tmp_path / "colour", colour_at=3)),
        size=SIZE,
        condition="key:depth.png",
        eval_fraction=0,
        log=quiet,
    )
    assert colour.condition.channels == 3
    assert read_split(colour.url, "train", conditions=True)[2].shape == (10, 3, SIZE, SIZE)
    # maps of 1 and 3 channels, and no map, in one mixed batch: zero channels, zero rows, has_condition
    mixed = MixedTaskReader(
        [
            ShardReader(str(folder), "train", 2, hflip=False, task_id=0),
            ShardReader(colour.url, "train", 2, hflip=False, task_id=1),
            ShardReader(str(_plain(tmp_path)), "train", 2, task_id=2),
        ]
    )
    b = next(mixed.stream())
    assert b["condition"].shape == (6, 3, SIZE, SIZE) and b["has_condition"].tolist() == [True] * 4 + [False] * 2
    assert (b["condition"][:2, 1:] == 0).all() and (b["condition"][4:] == 0).all()
    assert b["task_id"].tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match=r"--condition 'canny': indexed shards carry their own maps"):
        index_shards(str(folder), condition="canny", log=quiet)


def _plain(tmp_path: Path) -> Path:
    out = tmp_path / "plain"
    make_shards(f"folder:{make_image_folder(tmp_path / 'rgb', {'a': 6})}", str(out), size=SIZE, log=quiet)
    return out


def test_a_key_map_missing_or_of_another_size_is_named_by_shard_and_key(tmp_path, capsys):
    folder = key_shards(tmp_path / "bad", missing=2, wrong_size=7)
    with pytest.raises(DatasetError) as err:
        index_shards(str(folder), size=SIZE, condition="key:depth.png", log=quiet)
    text = str(err.value)
    assert "2 bad sample(s)" in text and not (folder / "index.json").exists()
    assert f"{folder}/part-000000.tar: sample 's0002': missing member .depth.png (the condition map key:" in text
    assert f"{folder}/part-000001.tar: sample 's0007': condition map .depth.png is 10x8 px, its image 20x16" in text
    assert cli_main(["shards", "index", str(folder), "--size", "16", "--condition", "key:depth.png"]) == 1
    assert "sample 's0002': missing member .depth.png" in capsys.readouterr().err
    # with skip_bad (data.skip_bad_samples, --skip-bad) the two are left out and counted
    index = index_shards(str(folder), size=SIZE, condition="key:depth.png", skip_bad=True, eval_fraction=0, log=quiet)
    assert index.num_samples("train") == 8 and len(index.data["skipped_inputs"]) == 2
    assert read_split(str(folder), "train", conditions=True)[2].shape == (8, 1, SIZE, SIZE)


def test_mask_on_a_source_without_alpha_is_refused_before_any_work(tmp_path, capsys):
    opaque = make_image_folder(tmp_path / "opaque", {"a": 4, "b": 4})
    out = tmp_path / "ds"
    make_shards(f"folder:{opaque}", str(out), size=8, log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(
        DatasetError,
        match=rf"source 'folder:{opaque}': condition mask is the alpha foreground, and "
        rf"source 'folder:{opaque}' has no alpha channel",
    ):
        make_shards(f"folder:{opaque}", str(out), size=8, condition=MASK, log=quiet)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written is lost
    task = TaskSpec("mine", f"folder:{opaque}", condition="mask")
    data = DataConfig(shards_root=str(tmp_path / "root"), targets=(task,))
    with pytest.raises(
        DatasetError,
        match=r"data\.targets: dataset 'mine' \(condition mask\): condition mask is the "
        r"alpha foreground",
    ):
        check_sources(data, ["mine"])
    assert not (tmp_path / "root").exists()
    assert (
        cli_main(["shards", "make", "--source", "fashion-mnist", "--out", str(tmp_path / "f"), "--condition", "mask"])
        == 2
    )
    assert "--condition: mask is the alpha foreground, and source 'fashion-mnist'" in capsys.readouterr().err
    # a key: map is read from WebDataset shards: an image source cannot give it
    data = DataConfig(targets=(TaskSpec("mine", f"folder:{opaque}", condition="key:depth.png"),))
    with pytest.raises(DatasetError, match=r"shards index DIR --condition key:depth\.png"):
        check_sources(data, ["mine"])


def test_a_changed_condition_rebuilds_and_old_unconditional_indexes_stay_valid(canny_shards):
    params = dict(size=SIZE, samples_per_shard=4, eval_fraction=0.25, limit=0, seed=0)
    source = load_index(str(canny_shards)).source
    args = (source, *params.values())
    assert is_up_to_date(str(canny_shards), build_parameters(*args, condition=CANNY))
    assert not is_up_to_date(str(canny_shards), build_parameters(*args))  # unconditional now
    assert not is_up_to_date(str(canny_shards), build_parameters(*args, condition=MASK))
    other = ConditionSpec.from_config("canny", DataConfig(canny_low=50))
    assert not is_up_to_date(str(canny_shards), build_parameters(*args, condition=other))
    assert build_parameters(*args)["condition"] is None  # an index without the field reads as unconditional


def test_readme_shards_make_with_a_condition(tmp_path, capsys):
    out = tmp_path / "shards" / "emoji-edges"
    # as the README writes it, with --out in a temp folder
    assert (
        cli_main(
            [
                "shards",
                "make",
                "--source",
                "emoji",
                "--out",
                str(out),
                "--size",
                "16",
                "--limit",
                "40",
                "--condition",
                "canny",
            ]
        )
        == 0
    )
    index = load_index(str(out))
    assert index.condition == CANNY and check_dataset(str(out)).problems == []


@pytest.mark.ray
def test_latent_shards_carry_the_map_at_pixel_resolution(ray_local, rgba, tmp_path):
    from diffscaler.data.encode import encode_shards
    from diffscaler.vae import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae")
    out = tmp_path / "latents"
    index = encode_shards(
        f"folder:{rgba}",
        str(out),
        str(vae),
        size=SIZE,
        samples_per_shard=4,
        eval_fraction=0.25,
        batch_size=4,
        condition=MASK,
        log=quiet,
    )
    assert index.latent and index.image_size == SIZE // 2 and index.condition == MASK
    assert index.data["members"]["condition"] == CONDITION_MEMBER and check_dataset(str(out)).problems == []
    pixel = make_shards(
        f"folder:{rgba}",
        str(tmp_path / "pixels"),
        size=SIZE,
        samples_per_shard=4,
        eval_fraction=0.25,
        condition=MASK,
        log=quiet,
    )

    def by_id(folder):
        return {
            json.loads(s["json"])["id"]: s
            for sh in sorted(Path(folder).glob("train-*.tar"))
            for s in iter_samples(str(sh))
        }

    latent_samples, pixel_samples = by_id(out), by_id(pixel.url)
    assert {k: s[CONDITION_MEMBER] for k, s in latent_samples.items()} == {
        k: s[CONDITION_MEMBER] for k, s in pixel_samples.items()
    }  # the same maps, not encoded
    # the reader: where the stored latent of the mirrored image is picked, the map is mirrored in pixel space
    reader = ShardReader(str(out), "train", batch_size=9, seed=1, hflip=True, shuffle_buffer=9)
    batch = next(reader.epoch(0))
    assert batch["image"].shape == (9, 4, SIZE // 2, SIZE // 2) and batch["condition"].shape == (9, 1, SIZE, SIZE)
    from diffscaler.data.samples import decode_latent

    flips = 0
    for latent, cond in zip(batch["image"].numpy(), batch["condition"].numpy()):
        for s in latent_samples.values():
            mask = np.asarray(Image.open(io.BytesIO(s[CONDITION_MEMBER])))
            for member, want in (("npy", mask), ("flip.npy", mask[:, ::-1])):
                if np.array_equal(latent, decode_latent(s[member]).astype(np.float32)):
                    assert (np.where(cond[0] > 0, 255, 0) == want).all()
                    flips += member == "flip.npy"
    assert 0 < flips < 9


def test_pipeline_refuses_a_mask_without_alpha_before_ray_and_names_a_changed_condition(tmp_path, refuse_ray):
    from diffscaler.data import build_all
    from diffscaler.pipeline import PipelineInputError, resolve_run_config, run_pipeline
    from tests.support.pipeline import micro_config

    red = f"folder:{tmp_path / 'src' / 'red'}"
    cfg_path = micro_config(tmp_path, ["shards", "pretrain"])  # opaque RGB folders
    refused = r"data\.targets: dataset 'red' \(condition mask\): condition mask is the alpha foreground, and source"
    refused += rf" '{red}' has no alpha"
    with pytest.raises(PipelineInputError, match=refused):
        run_pipeline(
            load_config(cfg_path, [f"data.targets=[{{name: red, source: '{red}', condition: mask}}]"]), tmp_path / "out"
        )
    assert not (tmp_path / "out" / "pipeline.json").exists()
    # built without a map, configured with canny, shards stage off: the changed condition is named
    cfg_path = micro_config(tmp_path, ["finetune"])
    build_all(resolve_run_config(load_config(cfg_path), tmp_path / "out").data, ["red"], parallel=False)
    with pytest.raises(
        PipelineInputError,
        match=r"dataset 'red' .* was built with other parameters .*condition "
        r"built=None config=\{'kind': 'canny'",
    ):
        run_pipeline(
            load_config(cfg_path, [f"data.targets=[{{name: red, source: '{red}', condition: canny}}]"]),
            tmp_path / "out",
        )


def test_maps_given_for_a_task_must_fit_its_channels_and_size():
    from diffscaler.data.conditions import ConditionError, check_map_shape

    check_map_shape(np.zeros((2, 1, SIZE, SIZE), np.uint8), 1, SIZE, "--condition-maps DIR")
    with pytest.raises(
        ConditionError,
        match=r"--condition-maps DIR: condition maps are \(2, 3, 16, 16\), the task "
        r"takes \(N, 1, 16, 16\)",
    ):
        check_map_shape(np.zeros((2, 3, SIZE, SIZE), np.uint8), 1, SIZE, "--condition-maps DIR")
    with pytest.raises(ConditionError, match=r"maps are \(2, 1, 8, 8\), the task takes \(N, 1, 16, 16\)"):
        check_map_shape(np.zeros((2, 1, 8, 8), np.uint8), 1, SIZE, "maps")
