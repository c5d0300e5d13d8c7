"""WebDataset shards made by other tools (written here by webdataset.ShardWriter itself): indexed, checked,
read with exact per-rank counts, resumed exactly, trained on; bad input named by file and key.

.venv/bin/python -m pytest tests/test_data_foreign.py -q            # the Ray test: -m ray
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from diffscaler.cli import main as cli_main
from diffscaler.data import DatasetError, ShardError, ShardReader, check_dataset, load_index, read_split
from diffscaler.data.indexer import index_shards
from diffscaler.data.samples import iter_samples

SIZE = 16


def quiet(_message: str) -> None:
    pass


def encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {"quality": 95}))
    return buf.getvalue()


def write_wds(folder: Path, samples: list[dict], per_shard: int, prefix: str = "part") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)
    return folder


def noise(rng, n: int, shape=(SIZE, SIZE, 3)) -> list[np.ndarray]:
    # Blocky noise: survives JPEG well enough that every decoded sample is still unique.
    return [
        np.kron(rng.integers(0, 256, (shape[0] // 4, shape[1] // 4, 3)), np.ones((4, 4, 1))).astype(np.uint8)
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def jpg_json(tmp_path_factory) -> Path:
    """img2dataset-like: .jpg + .json (label field) + .txt, keys with a dot in the folder part; 53 samples
    in shards of 10 (the last one short)."""
    rng = np.random.default_rng(0)
    samples = [
        {
            "__key__": f"crawl.v2/part{i // 20}/{i:09d}",
            "jpg": encoded(im, "JPEG"),
            "json": {"label": i % 3, "url": f"http://x/{i}.jpg"},
            "txt": f"caption {i}",
        }
        for i, im in enumerate(noise(rng, 53))
    ]
    return write_wds(tmp_path_factory.mktemp("jpg") / "pets", samples, 10)


@pytest.fixture(scope="module")
def webp_cls(tmp_path_factory) -> Path:
    """hub *-wds like: .webp + .cls; every other sample is written as `.WEBP`, so its image member comes
    before its `.cls` (sorted: 'WEBP' < 'cls' < 'webp') - members in both orders in one shard."""
    rng = np.random.default_rng(1)
    samples = [
        {"__key__": f"{i:06d}", ("WEBP" if i % 2 else "webp"): encoded(im, "WEBP"), "cls": i % 4}
        for i, im in enumerate(noise(rng, 47))
    ]
    return write_wds(tmp_path_factory.mktemp("webp") / "icons", samples, 8)


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    rng = np.random.default_rng(2)
    samples = [
        {"__key__": f"lat{i:05d}", "npy": rng.standard_normal((4, 8, 8)).astype(np.float32), "cls": i % 2}
        for i in range(41)
    ]
    return write_wds(tmp_path_factory.mktemp("npy") / "latents", samples, 9)


def ids(batch) -> list[bytes]:
    return [x.numpy().tobytes() for x in batch["image"]]


def truth_jpg(folder: Path) -> dict[bytes, int]:
    """The expected (image, label) of every train sample, decoded here with Pillow and json directly."""
    out = {}
    index = load_index(str(folder))
    for shard in index.shards("train"):
        with tarfile.open(shard.url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                label = json.loads(members[name[: -len("jpg")] + "json"])["label"]
                chw = (pixels.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0).tobytes()
                out[chw] = label
    return out


def test_jpg_json_shards_index_check_and_read_exactly(jpg_json, capsys):
    rc = cli_main(["shards", "index", str(jpg_json), "--label-key", "json:label", "--eval-shards", "1"])
    assert rc == 0, capsys.readouterr().err
    index = load_index(str(jpg_json))
    assert index.version == 2 and index.image_size == SIZE and index.class_names == ["0", "1", "2"]
    assert index.data["members"]["image"] == "jpg" and index.data["members"]["label"] == "json:label"
    assert [s.num_samples for s in index.shards("train")] == [10] * 5 and index.num_samples("eval") == 3
    report = check_dataset(str(jpg_json))
    assert report.ok, report.problems
    truth = truth_jpg(jpg_json)
    assert len(truth) == 50
    per_rank = []
    for rank in range(3):  # 50 samples, 3 ranks, batch 4: 16 each, 4 batches, every rank
        reader = ShardReader(str(jpg_json), batch_size=4, rank=rank, world_size=3, hflip=False, shuffle_buffer=8)
        batches = list(reader.epoch(1))
        assert len(batches) == reader.batches_per_epoch == 4
        for b in batches:
            assert b["image"].shape == (4, 3, SIZE, SIZE) and [truth[i] for i in ids(b)] == b["label"].tolist()
        per_rank.append({i for b in batches for i in ids(b)})
    assert all(len(r) == 16 for r in per_rank) and not (per_rank[0] & per_rank[1] or per_rank[1] & per_rank[2])
    images, labels = read_split(str(jpg_json), "eval")
    assert images.shape == (3, SIZE, SIZE, 3) and labels.tolist() == [50 % 3, 51 % 3, 52 % 3]


def test_webp_cls_members_in_either_order_resume_exactly(webp_cls):
    index = index_shards(str(webp_cls), eval_shards=1, log=quiet)  # label: cls, found in every sample
    assert index.data["members"]["label"] == "cls" and index.data["members"]["image"] == "webp"
    assert index.num_samples("train") == 40 and index.class_names == ["0", "1", "2", "3"]
    assert check_dataset(str(webp_cls)).ok
    kwargs = dict(batch_size=3, rank=1, world_size=2, shuffle_buffer=6, seed=4, hflip=True)
    reader = ShardReader(str(webp_cls), **kwargs)
    n = reader.batches_per_epoch
    assert n == 6
    stream = reader.stream(0)
    straight = [next(stream) for _ in range(2 * n + 2)]
    assert all(0 <= v < 4 for b in straight for v in b["label"].tolist())
    for start in (2, n, n + 3):
        resumed = ShardReader(str(webp_cls), loader_workers=2, **kwargs).stream(start)
        got = [next(resumed) for _ in range(2 * n + 2 - start)]
        assert all(torch.equal(a[k], b[k]) for a, b in zip(got, straight[start:]) for k in ("image", "label"))
    # Lossless webp: the pixels read are the pixels written, in either member order.
    images, labels = read_split(str(webp_cls), "train")
    rng = np.random.default_rng(1)
    written = noise(rng, 47)
    assert all(np.array_equal(images[i], written[i]) for i in range(40))
    assert labels.tolist() == [i % 4 for i in range(40)]


def test_npy_latents_read_as_stored_with_exact_rank_counts(latents):
    index = index_shards(str(latents), eval_fraction=0, log=quiet)
    assert index.latent and index.channels == 4 and index.image_size == 8 and index.num_samples("train") == 41
    assert check_dataset(str(latents)).ok
    counts = []
    for rank in range(2):
        reader = ShardReader(str(latents), batch_size=5, rank=rank, world_size=2, hflip=False, shuffle_buffer=10)
        batches = list(reader.epoch(0))
        assert all(b["image"].shape == (5, 4, 8, 8) and b["image"].dtype == torch.float32 for b in batches)
        counts.append(len(batches))
    assert counts == [4, 4]
    stored, labels = read_split(str(latents), "train")
    rng = np.random.default_rng(2)
    expect = np.stack([rng.standard_normal((4, 8, 8)).astype(np.float32) for _ in range(41)])
    assert np.array_equal(stored, expect) and labels.tolist() == [i % 2 for i in range(41)]


def test_no_label_is_unconditional_and_mixed_sizes_need_size(tmp_path):
    rng = np.random.default_rng(3)
    big = [np.asarray(Image.fromarray(im).resize((24, 20))) for im in noise(rng, 12)]
    folder = write_wds(
        tmp_path / "raw",
        [{"__key__": f"{i:04d}", "png": encoded(im, "PNG")} for i, im in enumerate(big[:6] + noise(rng, 6))],
        4,
    )
    with pytest.raises(DatasetError, match=r"sizes .*24x20.*pass --size N"):
        index_shards(str(folder), log=quiet)
    index = index_shards(str(folder), size=SIZE, log=quiet)
    assert index.class_names == ["unconditional"] and index.data["members"]["resize"] is True
    batch = next(iter(ShardReader(str(folder), batch_size=4, hflip=False).epoch(0)))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["label"].tolist() == [0] * 4


def test_shard_pattern_index_elsewhere_through_fsspec_and_pipe(jpg_json, tmp_path):
    pattern = str(jpg_json / "part-{000000..000004}.tar")
    with pytest.raises(DatasetError, match="needs --out"):
        index_shards(pattern, log=quiet)
    out = tmp_path / "idx"
    index_shards(pattern, str(out), label_key="json:label", eval_fraction=0, log=quiet)
    assert [s.url for s in load_index(str(out)).shards("train")][0] == str(jpg_json / "part-000000.tar")
    local = list(ShardReader(str(out), batch_size=5, hflip=False).epoch(0))
    index_shards(
        f"pipe:cat {jpg_json}/part-{{000000..000004}}.tar",
        str(tmp_path / "pipe"),
        label_key="json:label",
        eval_fraction=0,
        log=quiet,
    )
    piped = list(ShardReader(str(tmp_path / "pipe"), batch_size=5, hflip=False).epoch(0))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(local, piped)) and len(local) == 10
    import fsspec

    fs = fsspec.filesystem("memory")
    try:
        for p in sorted(jpg_json.glob("part-00000[0-4].tar")):
            fs.pipe_file(f"/foreign/{p.name}", p.read_bytes())
        index_shards("memory://foreign", label_key="json:label", eval_fraction=0, log=quiet)
        remote = list(ShardReader("memory://foreign", batch_size=5, hflip=False).epoch(0))
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(local, remote))
        assert check_dataset("memory://foreign").ok
    finally:
        fs.rm("/foreign", recursive=True)


# ------------------------------------------------------------------------------------------------
# Bad input: named by file and key
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def faulty(tmp_path) -> Path:
    """Three shards of 6: one truncated, one with an undecodable jpg, one with a sample lacking its image."""
    rng = np.random.default_rng(5)
    images = noise(rng, 18)
    samples = []
    for i, im in enumerate(images):
        sample = {"__key__": f"s{i:03d}", "jpg": encoded(im, "JPEG"), "cls": i % 2}
        if i == 8:
            sample["jpg"] = b"\xff\xd8 not a jpeg"
        if i == 15:
            del sample["jpg"]
            sample["txt"] = "no image"
        samples.append(sample)
    folder = write_wds(tmp_path / "faulty", samples, 6)
    first = folder / "part-000000.tar"
    first.write_bytes(first.read_bytes()[:3000])  # cut inside a member of an early sample
    return folder


def test_bad_samples_are_named_by_file_and_key_or_left_out(faulty, capsys):
    rc = cli_main(["shards", "index", str(faulty), "--label-key", "cls"])
    err = capsys.readouterr().err
    assert rc == 1 and not (faulty / "index.json").exists()
    assert "part-000000.tar: sample 's00" in err and "truncated" in err
    assert "part-000001.tar: sample 's008': unreadable image .jpg" in err
    assert "part-000002.tar: sample 's015': missing member(s)" in err
    index = index_shards(str(faulty), skip_bad=True, eval_fraction=0, log=quiet)
    assert [s.name for s in index.shards("train")] == ["part-000001.tar", "part-000002.tar"]
    assert [s.num_samples for s in index.shards("train")] == [5, 5] and len(index.data["skipped_inputs"]) == 3
    assert check_dataset(str(faulty)).ok
    seen = [i for b in ShardReader(str(faulty), batch_size=5, hflip=False).epoch(0) for i in ids(b)]
    assert len(set(seen)) == 10


def test_reader_names_a_sample_that_went_bad_after_indexing(webp_cls, tmp_path):
    folder = tmp_path / "icons"
    shutil.copytree(webp_cls, folder)
    index_shards(str(folder), eval_fraction=0, log=quiet)
    shard = folder / "part-000002.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.startswith("000019."):
                data = b"RIFF broken" if "webp" in m.name.lower() else data
                if m.name.endswith(".cls"):
                    continue  # 000019 keeps only a broken image
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(ShardError, match=r"part-000002.tar: sample '000019': (missing member|unreadable image)"):
        list(ShardReader(str(folder), batch_size=4, shuffle=False).epoch(0))
    reader = ShardReader(str(folder), batch_size=4, shuffle=False, skip_bad=True)
    assert len(list(reader.epoch(0))) == 11 and reader.skipped == 1
    assert "part-000002.tar: sample '000019'" in reader.skipped_messages[0]
    report = check_dataset(str(folder))
    assert any("part-000002.tar: sample '000019'" in p for p in report.problems)


# ------------------------------------------------------------------------------------------------
# Trained on through the real stages
# ------------------------------------------------------------------------------------------------


def test_finetune_stage_trains_on_foreign_webp_shards(webp_cls, tmp_path):
    from diffscaler.train.finetune import plan_finetunes
    from diffscaler.train.finetune_loop import AdapterRun, AdapterRunSpec
    from tests.support.finetune import make_backbone, tiny_config

    shards = tmp_path / "shards"
    shutil.copytree(webp_cls, shards / "icons")
    index_shards(str(shards / "icons"), eval_shards=1, log=quiet)
    backbone = tmp_path / "backbone.safetensors"
    make_backbone(backbone)
    cfg = tiny_config(shards, "[{name: icons, conditional: true}]", "finetune.steps=3")
    (task,) = plan_finetunes(cfg, backbone, tmp_path / "out", force=True).jobs[0].spec.tasks
    assert task.num_classes == 4
    spec = AdapterRunSpec((task,), "affiner", 4, 0.01, 3, str(backbone), cfg.to_dict(), str(tmp_path / "a.jsonl"))
    before = [p.detach().clone() for p in AdapterRun(spec).params]
    run = AdapterRun(spec)
    try:
        run.train_until(3)
        assert run.step == 3 and any(not torch.equal(a, b) for a, b in zip(before, run.params, strict=True))
        assert 0 < run.validation_loss()["icons"] < 10
    finally:
        run.close()


@pytest.mark.slow  # ~110 s: the default suite stays near 15 min; CI runs it in `make test-slow`
@pytest.mark.ray
@pytest.mark.timeout(420)
def test_index_on_ray_then_pretrain_on_jpg_and_latent_shards(ray_local, jpg_json, latents, tmp_path):
    from diffscaler.artifacts import load_backbone
    from diffscaler.train.pretrain import run_pretrain
    from tests.support.pretrain import tiny_cfg

    pets = tmp_path / "pets"
    shutil.copytree(jpg_json, pets)
    index = index_shards(str(pets), label_key="json:label", parallel=True, log=quiet)  # one Ray task per shard
    assert index.num_samples("train") + index.num_samples("eval") == 53 and check_dataset(str(pets)).ok
    serial = index_shards(str(pets), str(tmp_path / "serial"), label_key="json:label", log=quiet)
    for split in ("train", "eval"):  # the per-sample split does not depend on Ray
        assert [e["num_samples"] for e in serial.data["splits"][split]["shards"]] == [
            e["num_samples"] for e in index.data["splits"][split]["shards"]
        ]
    common = ["pretrain.steps=2", "pretrain.checkpoint_every=2", "pretrain.sample_every=0", "model.num_classes=3"]
    cfg = tiny_cfg(tmp_path, "jpg", *common, f"model.input_size={SIZE}")
    result = run_pretrain(cfg, tmp_path / "out-jpg", str(pets))
    assert result.step == 2 and load_backbone(result.backbone)[1]["provenance"]["skipped_samples"] == 0

    lat = tmp_path / "latents"
    shutil.copytree(latents, lat)
    index_shards(str(lat), parallel=True, log=quiet)
    cfg = tiny_cfg(tmp_path, "npy", *common, "model.input_size=8", "model.in_channels=4", "model.name=DiT-T/2")
    result = run_pretrain(cfg, tmp_path / "out-npy", str(lat))
    model, meta = load_backbone(result.backbone)
    assert result.step == 2 and model.config.in_channels == 4


def test_reindexing_with_other_labels_size_or_split_changes_the_data_hash(jpg_json, tmp_path):
    """Issue 27 item 2: the fine-tune (and pretrain checkpoints, reference statistics) are keyed on
    DatasetIndex.data_hash; re-indexing the same shard bytes another way must change it."""
    from diffscaler.config import load_config
    from diffscaler.train.finetune import resolve_tasks

    out = tmp_path / "pets"
    unlabelled = index_shards(str(jpg_json), str(out), label_key="none", log=quiet)
    cfg = load_config(
        None,
        [f"data.shards_root={tmp_path}", "data.targets=[{name: pets, conditional: true}]", f"data.image_size={SIZE}"],
    )
    before = resolve_tasks(cfg)[0]
    assert before.num_classes == 1 and before.data_hash == unlabelled.data_hash
    hashes = {unlabelled.data_hash}
    relabelled = index_shards(str(jpg_json), str(out), label_key="json:label", log=quiet)
    assert relabelled.content_hash == unlabelled.content_hash  # the same shard bytes, read another way
    hashes.add(relabelled.data_hash)
    for kwargs in ({"eval_shards": 2}, {"eval_shards": 2, "size": SIZE // 2}):
        hashes.add(index_shards(str(jpg_json), str(out), label_key="json:label", log=quiet, **kwargs).data_hash)
    assert len(hashes) == 4
    after = resolve_tasks(
        load_config(
            None,
            [
                f"data.shards_root={tmp_path}",
                f"data.image_size={SIZE // 2}",
                "data.targets=[{name: pets, conditional: true}]",
            ],
        )
    )[0]
    assert after.num_classes == 3 and after.data_hash != before.data_hash


def test_without_eval_shards_a_per_sample_split_by_key_hash_is_the_default(jpg_json, tmp_path):
    """Issue 27 item 4: indexed shards get an eval split by default, sample by sample, from the key alone."""
    from diffscaler.data.index import in_eval_split

    index = index_shards(str(jpg_json), str(tmp_path / "a"), label_key="json:label", log=quiet)
    assert index.data["eval_split"] == {"by": "key_hash", "fraction": 0.1}
    n_train, n_eval = index.num_samples("train"), index.num_samples("eval")
    assert n_train + n_eval == 53 and 1 <= n_eval <= 12
    assert check_dataset(str(tmp_path / "a")).problems == []
    keys = {sp: [] for sp in ("train", "eval")}
    for sp in keys:
        for shard in index.shards(sp):
            keys[sp] += [s["__key__"] for s in iter_samples(shard.url) if not shard.skips(s["__key__"])]
    assert not set(keys["train"]) & set(keys["eval"]) and len(keys["train"]) + len(keys["eval"]) == 53
    assert all(in_eval_split(k, 0.1) for k in keys["eval"]) and not any(in_eval_split(k, 0.1) for k in keys["train"])
    images, labels = read_split(str(tmp_path / "a"), "eval")
    assert len(images) == n_eval and labels.tolist() == [int(k[-9:]) % 3 for k in keys["eval"]]
    seen = sum(len(b["label"]) for b in ShardReader(str(tmp_path / "a"), "train", batch_size=4, hflip=False).epoch(0))
    assert seen == n_train // 4 * 4
    # Same keys, same split, whatever the shards' grouping or order; 0 keeps every sample for training.
    again = index_shards(str(jpg_json), str(tmp_path / "b"), label_key="json:label", log=quiet)
    assert again.data["splits"] == index.data["splits"]
    none = index_shards(str(jpg_json), str(tmp_path / "c"), label_key="json:label", eval_fraction=0, log=quiet)
    assert none.num_samples("train") == 53 and none.num_samples("eval") == 0
    with pytest.raises(ValueError, match=r"--eval-fraction must be in \[0, 1\), got 1.0"):
        index_shards(str(jpg_json), str(tmp_path / "d"), eval_fraction=1.0, log=quiet)


def test_webdataset_targets_are_validated_before_anything_runs():
    from diffscaler.config import ConfigError, load_config

    def targets(spec: str, *more: str):
        return load_config(None, [f"data.targets=[{spec}]", *more])

    task = targets('{name: pets, source: "webdataset:/data/pets-wds", label_key: "json:label"}').data.targets[0]
    assert task.webdataset and task.label_key == "json:label"
    refused = {
        '{name: p, source: "webdataset:/x", label_key: txt}': r"label_key: 'txt': use cls, json:FIELD .* a txt member "
        r"holds free text \(captions\), not a class label",
        '{name: p, source: "webdataset:/x", condition: canny}': r"'canny' is computed when shards are built from "
        r"images; webdataset: shards are indexed as they are",
        '{name: p, source: "folder:/x", label_key: cls}': r"label_key and image_key are for webdataset: sources",
        '{name: p, source: "folder:/x", condition: "key:depth.png"}': r"reads a member of your own WebDataset shards",
        '{name: p, source: "webdataset:"}': r"webdataset: needs the shards",
    }
    for spec, words in refused.items():
        with pytest.raises(ConfigError, match=words):
            targets(spec)
    with pytest.raises(ValueError, match=r"--label-key 'txt': .* a txt member holds free text \(captions\)"):
        index_shards("/nonexistent", label_key="txt", log=quiet)
    # with data.vae the shards stage encodes the images (tests/test_webdataset_latent.py); npy latents it cannot
    assert targets('{name: p, source: "webdataset:/x", condition: "key:depth.png"}', "data.vae=/v").data.vae == "/v"
    with pytest.raises(ConfigError, match=r"npy latents are not encoded again"):
        targets('{name: p, source: "webdataset:/x", image_key: npy}', "data.vae=/v")
    with pytest.raises(ConfigError, match=r"data.pretrain_source: webdataset: sources are fine-tuning targets only"):
        targets("{name: p}", "data.pretrain_source=webdataset:/x")


def test_the_shards_stage_indexes_a_webdataset_target_and_reindexes_when_it_changes(jpg_json, tmp_path):
    """Issue 27 item 3 (and 1, 2 for shards): users' shards are a pipeline target; the shards stage indexes
    them where they lie, checks them on reruns and re-indexes after a change, naming it."""
    from diffscaler.config import load_config
    from diffscaler.stages.base import Run
    from diffscaler.stages.shards import ShardsStage

    shards = tmp_path / "pets-wds"
    shutil.copytree(jpg_json, shards, ignore=shutil.ignore_patterns("index.json"))  # an earlier test indexed it
    spec = f'{{name: pets, source: "webdataset:{shards}", label_key: "none"}}'
    cfg = load_config(
        None,
        [
            f"data.shards_root={tmp_path / 'root'}",
            f"data.targets=[{spec}]",
            f"data.image_size={SIZE}",
            "data.pretrain_source=emoji",
        ],
    )
    run = Run.for_program(cfg, "shards", tmp_path / "out")
    stage = ShardsStage(only=["pets"])
    stage.preflight(run)
    assert "no complete build" in stage.check(run).reason
    stage.run(run)  # one dataset: indexed on the driver, no Ray
    index = load_index(str(tmp_path / "root" / "pets"))
    assert index.source == f"webdataset:{shards}" and index.class_names == ["unconditional"]
    assert index.shards("train")[0].url == str(shards / "part-000000.tar") and not (shards / "index.json").exists()
    assert index.num_samples("eval") > 0 and stage.check(run).valid and check_dataset(index.url).ok
    first = index.data_hash
    # Other labels: re-indexed, and the data a fine-tune is keyed on changes.
    relabelled = load_config(
        None,
        [
            f"data.shards_root={tmp_path / 'root'}",
            f"data.image_size={SIZE}",
            f"data.targets=[{spec.replace('none', 'json:label')}]",
        ],
    )
    run2 = Run.for_program(relabelled, "shards", tmp_path / "out")
    assert "index_options" in stage.check(run2).reason
    stage.run(run2)
    index = load_index(str(tmp_path / "root" / "pets"))
    assert index.class_names == ["0", "1", "2"] and index.data_hash != first and stage.check(run2).valid
    # A rewritten shard: the stage notices it from its size and mtime, not by reading it.
    tar = shards / "part-000004.tar"
    tar.write_bytes(tar.read_bytes() + b"\0" * 512)
    assert "changed since the build" in stage.check(run2).reason
    # Missing shards: a clear error before any work.
    gone = load_config(
        None,
        [
            f"data.shards_root={tmp_path / 'root2'}",
            f"data.image_size={SIZE}",
            f'data.targets=[{{name: q, source: "webdataset:{tmp_path / "nope"}"}}]',
        ],
    )
    with pytest.raises(Exception, match=r"data.targets: dataset 'q'"):
        ShardsStage(only=["q"]).preflight(Run.for_program(gone, "shards", tmp_path / "out2"))
