"""Conditional tasks through the toolkit (issue 21): maps given at sampling time, mixed batches of conditional
and unconditional tasks, and the sample command's bad inputs, refused before anything is sampled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffscaler.config import DataConfig
from diffscaler.data.conditions import (
    ConditionError,
    ConditionSpec,
    batch_maps,
    maps_from_files,
    maps_from_images,
    spec_from_record,
)
from tests.support.shards import rgba_folder

DATA = DataConfig()
CANNY = ConditionSpec.from_config("canny", DATA)
MASK = ConditionSpec.from_config("mask", DATA)


def test_maps_from_images_are_the_shards_maps(rgba: Path, tmp_path):
    """--condition DIR extracts each image's map exactly as the shards stage stores it (same crop and resize)."""
    from diffscaler.data import make_shards, read_split

    for spec in (CANNY, MASK):
        out = tmp_path / spec.kind
        make_shards(
            f"folder:{rgba}",
            str(out),
            size=16,
            samples_per_shard=64,
            eval_fraction=0.0,
            condition=spec,
            log=lambda *_: None,
        )
        from_shards = read_split(str(out), "train", conditions=True)[2]  # (N, 1, 16, 16), split order
        mine = maps_from_images(rgba, spec_from_record({**spec.record(), "channels": 1, "size": 16}), 16)
        assert mine.shape == (12, 1, 16, 16) and mine.dtype == np.uint8
        # the split's order is seeded; every stored map is one of the folder's maps, and all of them are there
        assert sorted(m.tobytes() for m in from_shards) == sorted(m.tobytes() for m in mine)
    assert maps_from_images(rgba, CANNY, 16, limit=3).shape == (3, 1, 16, 16)


@pytest.fixture(scope="module")
def rgba(tmp_path_factory) -> Path:
    return rgba_folder(tmp_path_factory.mktemp("rgba") / "shapes")


def test_maps_from_images_name_the_file_and_the_problem(rgba, tmp_path):
    opaque = tmp_path / "opaque"
    opaque.mkdir()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(opaque / "green.png")
    with pytest.raises(ConditionError, match=r"green\.png: the image has no alpha channel"):
        maps_from_images(opaque, MASK, 16)
    with pytest.raises(ConditionError, match="no extractor here"):
        maps_from_images(rgba, ConditionSpec("key:depth.png", {}, "depth.png", 1), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConditionError, match="no image files"):
        maps_from_images(tmp_path / "empty", CANNY, 16)
    with pytest.raises(ConditionError, match="not a folder"):
        maps_from_images(tmp_path / "nope", CANNY, 16)
    (opaque / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConditionError, match=r"broken\.png: unreadable map"):
        maps_from_images(opaque, CANNY, 16)


def test_ready_maps_of_the_wrong_size_or_channels_are_named(tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    grey = np.zeros((16, 16), np.uint8)
    grey[4:8] = 255
    Image.fromarray(grey, "L").save(ok / "a.png")
    maps = maps_from_files(ok, 1, 16)
    assert maps.shape == (1, 1, 16, 16) and (maps[0, 0] == grey).all()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8), "RGB").save(ok / "b.png")
    with pytest.raises(ConditionError, match=r"b\.png: a 3-channel map \(mode RGB\), the task takes 1-channel"):
        maps_from_files(ok, 1, 16)
    assert maps_from_files(ok, 1, 16, limit=1).shape == (1, 1, 16, 16)  # only the first file is read
    big = tmp_path / "big"
    big.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(big / "a.png")
    with pytest.raises(ConditionError, match=r"a\.png: a 32x32 map, the task takes 16x16 maps"):
        maps_from_files(big, 1, 16)
    with pytest.raises(ConditionError, match="a 1-channel map"):
        maps_from_files(big, 3, 32)


def test_batch_maps_cycle_each_tasks_maps_and_zero_the_rows_without():
    a = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    c = np.full((3, 3, 4, 4), 7, np.uint8)
    per_sample = [0, 1, 2, 0, 1, 2, 0]
    maps, has = batch_maps([a, None, c], per_sample)
    assert maps.shape == (7, 3, 4, 4) and has.tolist() == [True, False, True] * 2 + [True]
    assert (maps[0, 0] == a[0, 0]).all() and (maps[3, 0] == a[1, 0]).all() and (maps[6, 0] == a[0, 0]).all()
    assert (maps[0, 1:] == 0).all() and (maps[1] == 0).all() and (maps[2] == 7).all()  # padded, zeros, as given
    with pytest.raises(ConditionError, match=r"different sizes \[4, 8\]"):
        batch_maps([a, np.zeros((1, 1, 8, 8), np.uint8)], [0, 1])


# ------------------------------------------------------------------------------------------------
# Fine-tunes: conditional tasks train with their maps (pixel and latent backbones, alone and mixed)
# ------------------------------------------------------------------------------------------------


def _quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def cond_shards(rgba, tmp_path_factory) -> dict[str, Path]:
    """Pixel shards of the RGBA shapes with mask maps and with canny maps, and without maps."""
    from diffscaler.data import make_shards

    root = tmp_path_factory.mktemp("cond-shards")
    out = {}
    for name, spec in (("mask", MASK), ("canny", CANNY), ("plain", None)):
        make_shards(
            f"folder:{rgba}",
            str(root / name),
            size=16,
            samples_per_shard=8,
            eval_fraction=0.25,
            condition=spec,
            log=_quiet,
        )
        out[name] = root / name
    return out


def _task(name: str, folder: Path):
    from diffscaler.data import load_index
    from diffscaler.train.finetune_loop import TaskData, condition_record

    index = load_index(str(folder))
    return TaskData(name, str(folder), False, index.num_classes, (), index.data_hash, condition_record(index))


def _run(tasks, backbone: Path, steps: int = 2, **finetune):
    from dataclasses import replace

    from diffscaler.config import ExperimentConfig
    from diffscaler.train.finetune_loop import AdapterRun, AdapterRunSpec

    cfg = ExperimentConfig()
    cfg = replace(
        cfg, finetune=replace(cfg.finetune, batch_size=4, **finetune), data=replace(cfg.data, shuffle_buffer=4)
    )
    return AdapterRun(AdapterRunSpec(tuple(tasks), "affiner", 2, 1e-2, steps, str(backbone), cfg.to_dict()))


def _backbone(path: Path, **model) -> Path:
    from diffscaler.artifacts import save_backbone
    from diffscaler.config import ModelConfig
    from diffscaler.models import build_model
    from tests.support.models import perturb

    dit = build_model(ModelConfig(**{"name": "DiT-T/4", "input_size": 16, "num_classes": 3, **model}), seed=0)
    with torch.no_grad():  # a fresh DiT outputs exactly zero (its last layer starts at zero): no gradient upstream
        perturb(dit, 0.05)
    save_backbone(dit, path)
    return path


def test_a_conditional_fine_tune_trains_its_condition_path_and_records_its_extractor(cond_shards, tmp_path):
    backbone = _backbone(tmp_path / "b.safetensors")
    run = _run([_task("shapes-mask", cond_shards["mask"])], backbone, steps=3)
    path = run.bank.condition_path["0"]
    before = {k: v.clone() for k, v in path.state_dict().items()}
    run.train_until(3)
    assert any(not torch.equal(before[k], v) for k, v in path.state_dict().items())  # the maps reached it
    assert np.isfinite(run.validation_loss()["shapes-mask"])
    meta = json.loads(Path(run.save_adapters(tmp_path / "ad")["shapes-mask"]).with_suffix(".json").read_text())
    assert meta["condition_extractor"] == {**MASK.record(), "channels": 1, "size": 16}
    assert run.trainable_parameters("shapes-mask") > run.bank.condition_parameters_per_task("shapes-mask") > 0


def test_mixed_fine_tune_of_conditional_and_unconditional_tasks(cond_shards, tmp_path):
    backbone = _backbone(tmp_path / "b.safetensors")
    tasks = [
        _task("edges", cond_shards["canny"]),
        _task("plain", cond_shards["plain"]),
        _task("mask", cond_shards["mask"]),
    ]
    run = _run(tasks, backbone, steps=2)
    run.train_until(2)
    val = run.validation_loss()
    assert set(val) == {"edges", "plain", "mask"} and all(np.isfinite(v) for v in val.values())
    files = run.save_adapters(tmp_path / "ad")
    metas = {t: json.loads(Path(f).with_suffix(".json").read_text()) for t, f in files.items()}
    assert metas["edges"]["condition_extractor"]["kind"] == "canny" and "condition_extractor" not in metas["plain"]


@pytest.mark.ray
def test_a_latent_backbone_fine_tunes_with_pixel_resolution_maps(ray_local, rgba, tmp_path):
    from diffscaler.data.encode import encode_shards
    from diffscaler.vae import save_tiny_vae

    vae = save_tiny_vae(tmp_path / "vae")
    encode_shards(
        f"folder:{rgba}",
        str(tmp_path / "latents"),
        str(vae),
        size=16,
        samples_per_shard=8,
        eval_fraction=0.25,
        batch_size=4,
        condition=MASK,
        log=_quiet,
    )
    backbone = _backbone(tmp_path / "b.safetensors", name="DiT-T/2", input_size=8, in_channels=4)
    task = _task("latent-mask", tmp_path / "latents")
    assert task.condition["size"] == 16  # the map stays at pixel resolution: 2x the latent side
    run = _run([task], backbone, steps=2)
    run.train_until(2)
    assert np.isfinite(run.validation_loss()["latent-mask"])


# ------------------------------------------------------------------------------------------------
# diffscaler sample with conditional tasks
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cond_adapters(tmp_path_factory) -> tuple[Path, Path]:
    """A perturbed 16 px backbone and three adapters: edges (canny), plain (no map), mask."""
    from diffscaler.adapters import AdapterBank, TaskInfo
    from diffscaler.artifacts import load_backbone, save_adapter
    from tests.support.models import randomize

    root = tmp_path_factory.mktemp("cond-adapters")
    path = _backbone(root / "b.safetensors", name="DiT-T/8")
    model, meta = load_backbone(path)

    def info(name: str, spec: ConditionSpec | None) -> TaskInfo:
        if spec is None:
            return TaskInfo(name)
        record = {**spec.record(), "channels": 1, "size": 16}
        return TaskInfo(name, condition=spec.kind, condition_channels=1, condition_size=16, condition_extractor=record)

    bank = AdapterBank.attach(model, [info("edges", CANNY), info("plain", None), info("mask", MASK)], rank=2)
    randomize(bank, 0.3)
    for t in ("edges", "plain", "mask"):
        save_adapter(bank, t, root / "ad", backbone_hash=meta["content_hash"])
    return path, root / "ad"


def _sample(capsys, backbone: Path, adapters: Path, out: Path, *argv: str) -> tuple[int, str]:
    from diffscaler.cli import main

    code = main(
        [
            "sample",
            "--backbone",
            str(backbone),
            "--adapters",
            str(adapters),
            "--steps",
            "2",
            "--seed",
            "3",
            "--out",
            str(out),
            *argv,
        ]
    )
    return code, capsys.readouterr().err


def test_sample_mixed_conditional_and_unconditional_tasks_row_by_row(cond_adapters, rgba, tmp_path, capsys):
    backbone, ad = cond_adapters
    code, err = _sample(
        capsys,
        backbone,
        ad,
        tmp_path / "mixed",
        "--task",
        "edges,plain,mask",
        "--condition",
        str(rgba),
        "--num",
        "3",
        "--batch-size",
        "9",
    )
    assert code == 0, err
    mixed = np.load(tmp_path / "mixed" / "samples.npz")
    assert list(mixed["task"]) == ["edges", "plain", "mask"] * 3
    assert mixed["has_condition"].tolist() == [True, False, True] * 3
    edges = maps_from_images(rgba, CANNY, 16, limit=3)
    masks = maps_from_images(rgba, MASK, 16, limit=3)
    assert (mixed["condition"][0::3] == edges).all() and (mixed["condition"][2::3] == masks).all()
    assert (mixed["condition"][1::3] == 0).all()
    assert (tmp_path / "mixed" / "conditions.png").stat().st_size > 0  # the maps where grid.png has their images
    # image k depends on (seed, k, task, class, map) only: other batch splits (tasks and maps mixed otherwise,
    # one image a batch) give the same images
    for batch in ("1", "2"):
        code, err = _sample(
            capsys,
            backbone,
            ad,
            tmp_path / batch,
            "--task",
            "edges,plain,mask",
            "--condition",
            str(rgba),
            "--num",
            "3",
            "--batch-size",
            batch,
        )
        assert code == 0, err
        again = np.load(tmp_path / batch / "samples.npz")
        assert np.abs(again["images"].astype(int) - mixed["images"].astype(int)).max() <= 1, batch
        assert (again["condition"] == mixed["condition"]).all()
    code, err = _sample(
        capsys,
        backbone,
        ad,
        tmp_path / "scaled",
        "--task",
        "edges",
        "--num",
        "2",
        "--condition",
        str(rgba),
        "--condition-scale",
        "3",
    )
    assert code == 0, err
    scaled = np.load(tmp_path / "scaled" / "samples.npz")["images"]
    code, err = _sample(
        capsys, backbone, ad, tmp_path / "unscaled", "--task", "edges", "--num", "2", "--condition", str(rgba)
    )
    assert code == 0, err
    unscaled = np.load(tmp_path / "unscaled" / "samples.npz")["images"]
    assert np.abs(scaled.astype(int) - unscaled.astype(int)).max() > 1  # guidance on the map changes them


def test_sample_unconditioned_changes_only_the_conditional_rows(cond_adapters, rgba, tmp_path, capsys):
    backbone, ad = cond_adapters
    code, err = _sample(
        capsys, backbone, ad, tmp_path / "mixed", "--task", "edges,plain,mask", "--condition", str(rgba), "--num", "3"
    )
    assert code == 0, err
    mixed = np.load(tmp_path / "mixed" / "samples.npz")
    # the map reaches the image; unconditional rows do not change when the others lose their maps
    code, err = _sample(
        capsys, backbone, ad, tmp_path / "bare", "--task", "edges,plain,mask", "--num", "3", "--unconditioned"
    )
    assert code == 0, err
    bare = np.load(tmp_path / "bare" / "samples.npz")
    assert not bare["has_condition"].any()
    assert np.abs(bare["images"][1::3].astype(int) - mixed["images"][1::3].astype(int)).max() <= 1
    assert np.abs(bare["images"][0::3].astype(int) - mixed["images"][0::3].astype(int)).max() > 10


def test_sample_takes_ready_maps_and_a_folder_per_task(cond_adapters, rgba, tmp_path, capsys):
    backbone, ad = cond_adapters
    ready = tmp_path / "ready"
    ready.mkdir()
    edges = maps_from_images(rgba, CANNY, 16, limit=2)
    for k, m in enumerate(edges):
        Image.fromarray(m[0], "L").save(ready / f"{k}.png")
    code, err = _sample(
        capsys,
        backbone,
        ad,
        tmp_path / "o",
        "--task",
        "edges,mask",
        "--num",
        "2",
        "--condition-maps",
        f"edges={ready}",
        "--condition",
        f"mask={rgba}",
    )
    assert code == 0, err
    out = np.load(tmp_path / "o" / "samples.npz")
    assert (out["condition"][0::2] == edges).all()
    assert (out["condition"][1::2] == maps_from_images(rgba, MASK, 16, limit=2)).all()


def test_sample_refuses_bad_conditions_before_sampling(cond_adapters, rgba, tmp_path, capsys, monkeypatch):
    import diffscaler.cli_model as cli_model
    import diffscaler.diffusion.sampling as sampling

    backbone, ad = cond_adapters
    calls = []

    def fake(*_args, **_kwargs):
        calls.append(1)
        return np.zeros((1, 16, 16, 3))

    for module in (sampling, cli_model):  # wherever the command looks it up
        if hasattr(module, "sample_images"):
            monkeypatch.setattr(module, "sample_images", fake)
    opaque, big = tmp_path / "opaque", tmp_path / "big"
    opaque.mkdir()
    big.mkdir()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(opaque / "green.png")
    Image.fromarray(np.zeros((32, 32), np.uint8), "L").save(big / "m.png")
    cases = [
        ((), "task 'edges' is conditioned on canny maps: give --condition DIR"),
        (("--condition-maps", str(big)), "m.png: a 32x32 map, the task takes 16x16 maps"),
        (("--condition", f"plain={rgba}"), "task(s) ['plain'] take no condition map"),
        (("--condition", str(rgba), "--condition-maps", str(big)), "both --condition and --condition-maps"),
    ]
    for argv, message in cases:
        code, err = _sample(capsys, backbone, ad, tmp_path / "o", "--task", "edges,plain", *argv)
        assert code == 2 and message in err, (argv, err)
    code, err = _sample(capsys, backbone, ad, tmp_path / "o", "--task", "mask", "--condition", str(opaque))
    assert code == 2 and "green.png: the image has no alpha channel" in err and "(task 'mask')" in err, err
    code, err = _sample(capsys, backbone, ad, tmp_path / "o", "--task", "plain", "--condition", str(rgba))
    assert code == 2 and "none of the tasks ['plain'] takes a condition map" in err, err
    assert calls == [] and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# A resident bank (serving, the generation job) pages conditional adapters into its slots
# ------------------------------------------------------------------------------------------------


def _paged_against_loaded(backbone: Path, adapters: Path, names: list[str], max_resident: int):
    """(the resident runtime, mixed-batch images of rows over `names` (edges, plain, mask), what a bank loaded
    from the files gives row by row, maps and mask alike); the runtime also ran the rows one by one (asserted)."""
    from diffscaler.artifacts import load_adapters, load_backbone
    from diffscaler.config import DiffusionConfig
    from diffscaler.data.conditions import maps_to_unit
    from diffscaler.diffusion.gaussian import GaussianDiffusion
    from diffscaler.diffusion.sampling import generate, to_uint8
    from diffscaler.serving.runtime import ImageRow, TaskRuntime

    rng = np.random.default_rng(0)
    m1, m2 = ((rng.random((2, 1, 16, 16)) > 0.6) * 255).astype(np.uint8)
    rows = [
        ImageRow("edges", 0, 0, 3, m1),
        ImageRow("plain", 0, 0, 3),
        ImageRow("mask", 0, 0, 3, m2),
        ImageRow("edges", 0, 1, 3, m2),
        ImageRow("mask", 0, 1, 3, None, unconditioned=True),
    ]
    runtime = TaskRuntime.load(backbone, adapters, max_resident=max_resident, log=_quiet)
    mixed = runtime.images(rows, steps=2)
    one_by_one = np.concatenate([runtime.images([r], steps=2) for r in reversed(rows)])[::-1]
    model, meta = load_backbone(backbone)
    load_adapters(model, [adapters / f"{n}.safetensors" for n in names], backbone_hash=meta["content_hash"])
    maps = np.stack([r.condition if r.condition is not None else np.zeros((1, 16, 16), np.uint8) for r in rows])
    x = generate(
        model,
        GaussianDiffusion.from_config(DiffusionConfig(), learn_sigma=model.config.learn_sigma),
        labels=torch.zeros(len(rows), dtype=torch.long),
        indices=range(len(rows)),
        seed=0,
        task_ids=torch.tensor([names.index(r.task) for r in rows]),
        steps=2,
        sample_seeds=[r.noise_seed for r in rows],
        condition=torch.from_numpy(maps_to_unit(maps)),
        condition_mask=torch.tensor([r.condition is not None for r in rows]),
    )
    expected = to_uint8(x)
    assert np.abs(one_by_one.astype(int) - expected).max() <= 1
    other = runtime.images([ImageRow("edges", 0, 0, 3, m2)], steps=2)
    assert np.abs(other.astype(int) - mixed[:1]).max() > 8  # the map is used
    return runtime, mixed, expected


def test_a_paged_bank_with_condition_paths_equals_the_bank_loaded_from_files(cond_adapters):
    """Tasks with and without maps over fewer slots than tasks (paged in and out, a slot's condition path built,
    reused and dropped): row by row the images of a bank loaded from the files, maps and mask alike."""
    from diffscaler.serving.runtime import ImageRow

    backbone, adapters = cond_adapters
    runtime, mixed, expected = _paged_against_loaded(backbone, adapters, ["edges", "plain", "mask"], 2)
    assert np.abs(mixed.astype(int) - expected).max() <= 1
    assert runtime.stats["page_ins"] >= 3 and len(runtime.resident()) == 2
    with pytest.raises(ValueError, match="task 'plain' takes no condition map"):
        runtime.images([ImageRow("plain", 0, 0, 3, np.zeros((1, 16, 16), np.uint8))], steps=2)
    with pytest.raises(ValueError, match="task 'edges' is conditioned on canny maps"):
        runtime.images([ImageRow("edges", 0, 0, 3)], steps=2)


@pytest.mark.parametrize("layout", [{"method": "controlnet", "controlnet_blocks": 1}, {"condition_blocks": True}])
def test_paged_controlnet_and_block_gated_condition_paths_equal_the_loaded_bank(tmp_path, layout):
    """The other ways a map enters the bank page in too: a ControlNet branch per slot, per-block gates."""
    from diffscaler.adapters import AdapterBank, TaskInfo
    from diffscaler.artifacts import load_backbone, save_adapter
    from tests.support.models import randomize

    path = _backbone(tmp_path / "b.safetensors", name="DiT-T/8")
    model, meta = load_backbone(path)

    def info(name: str, spec: ConditionSpec) -> TaskInfo:
        record = {**spec.record(), "channels": 1, "size": 16}
        return TaskInfo(name, condition=spec.kind, condition_channels=1, condition_size=16, condition_extractor=record)

    bank = AdapterBank.attach(model, [info("edges", CANNY), TaskInfo("plain"), info("mask", MASK)], rank=2, **layout)
    randomize(bank, 0.3)
    for t in ("edges", "plain", "mask"):
        save_adapter(bank, t, tmp_path / "ad", backbone_hash=meta["content_hash"])
    _runtime, mixed, expected = _paged_against_loaded(path, tmp_path / "ad", ["edges", "plain", "mask"], 1)
    assert np.abs(mixed.astype(int) - expected).max() <= 1
