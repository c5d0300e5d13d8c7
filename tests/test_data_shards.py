"""Shard writing, index.json and `diffscaler shards check`: determinism, layout, sources, bad input.

.venv/bin/python -m pytest tests/test_data_shards.py -q
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from diffscaler.cli import main as cli_main
from diffscaler.data import (
    BUNDLED_SOURCES,
    DatasetError,
    SourceMissingError,
    check_dataset,
    load_index,
    make_shards,
    read_split,
)
from diffscaler.data.pngcodec import decode_png, decode_png_batch, encode_png
from diffscaler.data.sources import (
    Catalog,
    CrawlTileSource,
    EmojiSource,
    FashionMnistSource,
    OpenClipartSource,
    SilkIconSource,
    SourceItem,
    select_balanced,
    split_train_eval,
)
from diffscaler.data.tarformat import RawSample, iter_raw_samples
from tests.support.shards import corrupt_png_of, make_image_folder, quiet, rewrite_member


def dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    rc = cli_main(args)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


# ------------------------------------------------------------------------------------------------
# PNG codec
# ------------------------------------------------------------------------------------------------


def test_png_codec_round_trip_matches_pillow():
    rng = np.random.default_rng(1)
    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (16, 1, 3))
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), smooth, smooth.transpose(1, 0, 2).copy()]
    blobs = [encode_png(im) for im in images]
    for image, blob in zip(images, blobs):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(blob))), image)  # a standard PNG
        assert np.array_equal(decode_png(blob), image)
    assert np.array_equal(decode_png_batch(blobs), np.stack(images))
    # A Pillow-written PNG (adaptive filters, incl. Paeth) goes through the Pillow fallback.
    buf = io.BytesIO()
    Image.fromarray(images[0]).save(buf, format="PNG")
    assert np.array_equal(decode_png(buf.getvalue()), images[0])
    assert [encode_png(im) for im in images] == blobs  # deterministic


# ------------------------------------------------------------------------------------------------
# Sources, selection, image preparation
# ------------------------------------------------------------------------------------------------


def test_balanced_selection_and_stratified_split_are_deterministic():
    items = [SourceItem(f"a{i}", 0) for i in range(50)] + [SourceItem(f"b{i}", 1) for i in range(3)]
    items += [SourceItem(f"c{i}", 2) for i in range(20)]
    catalog = Catalog(("a", "b", "c"), tuple(items))
    chosen = select_balanced(catalog, 15, seed=0)
    counts = np.bincount([it.label for it in chosen], minlength=3)
    assert counts.tolist() == [6, 3, 6]  # b has only 3; the others share the rest equally
    assert chosen == select_balanced(catalog, 15, seed=0)
    assert chosen != select_balanced(catalog, 15, seed=1)
    train, evals = split_train_eval(select_balanced(catalog, 0, 0), 0.1, seed=0)
    assert len(evals) == 7 and len(train) == 66
    assert not {it.ref for it in train} & {it.ref for it in evals}
    eval_counts = np.bincount([it.label for it in evals], minlength=3)
    assert eval_counts[0] == 5 and eval_counts[2] == 2  # proportional to class sizes


def test_folder_source_with_class_dirs_composites_and_crops(tmp_path):
    root = tmp_path / "pets"
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    # Transparent everywhere except a centred red square: the background must come out white.
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 10:30] = (255, 0, 0, 255)
    Image.fromarray(rgba, "RGBA").save(root / "cats" / "a.png")
    # Wide image: green centre square, blue side bands; the centre crop keeps only green.
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :] = (0, 0, 255)
    wide[:, 20:40] = (0, 255, 0)
    Image.fromarray(wide).save(root / "cats" / "b.jpg", quality=100)
    Image.fromarray(np.full((9, 9), 77, np.uint8), "L").save(root / "dogs" / "grey.png")
    Image.fromarray(np.full((9, 9), 3, np.uint8), "P").save(root / "dogs" / "palette.gif")

    out = tmp_path / "shards"
    index = make_shards(f"folder:{root}", str(out), size=8, samples_per_shard=2, eval_fraction=0.0, log=quiet)
    assert index.class_names == ["cats", "dogs"]
    assert index.data["splits"]["train"]["class_counts"] == [2, 2]
    images, labels = read_split(str(out), "train")
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8
    by_id = {}
    for shard in index.shards("train"):
        for sample in iter_raw_samples(Path(shard.url).read_bytes(), shard.url):
            by_id[json.loads(sample.members["json"])["id"]] = decode_png(sample.members["png"])
    assert (by_id["cats/a.png"][0, 0] == 255).all()  # corner: transparent -> white
    assert tuple(by_id["cats/a.png"][4, 4]) == (255, 0, 0)
    assert by_id["cats/b.jpg"][..., 1].min() > 200 and by_id["cats/b.jpg"][..., 2].max() < 60  # crop kept green
    grey = by_id["dogs/grey.png"]
    assert (grey == 77).all()  # grey -> RGB with equal channels
    assert check_dataset(str(out)).ok


def test_flat_folder_is_one_class_and_mixed_layout_is_an_error(tmp_path):
    flat = make_image_folder(tmp_path / "flat", {"": 5})
    index = make_shards(f"folder:{flat}", str(tmp_path / "out"), size=8, eval_fraction=0.2, log=quiet)
    assert index.class_names == ["flat"] and index.num_samples("train") == 4 and index.num_samples("eval") == 1
    make_image_folder(flat, {"sub": 2})
    with pytest.raises(ValueError, match="top level.*class folders"):
        make_shards(f"folder:{flat}", str(tmp_path / "out2"), size=8, log=quiet)


def test_empty_source_and_missing_packages_name_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty dataset"):
        make_shards(f"folder:{tmp_path / 'empty'}", str(tmp_path / "out"), log=quiet)
    missing = tmp_path / "nowhere"
    cases = [
        (OpenClipartSource(root=str(missing)), "openclipart-png"),
        (EmojiSource(font_path=str(missing)), "fonts-noto-color-emoji"),
        (SilkIconSource(module_path=str(missing)), "libicon-famfamfam-silk-perl"),
        (CrawlTileSource(sheet_path=str(missing)), "crawl-tiles-data"),
        (FashionMnistSource(root=str(missing)), "dataset-fashion-mnist"),
    ]
    for source, package in cases:
        with pytest.raises(SourceMissingError, match=package):
            source.catalog()


@pytest.mark.parametrize("source", BUNDLED_SOURCES)
def test_bundled_source_installs_and_decodes(source, tmp_path):
    out = tmp_path / source
    index = make_shards(source, str(out), size=16, samples_per_shard=4, eval_fraction=0.25, limit=8, log=quiet)
    assert index.num_samples("train") == 6 and index.num_samples("eval") == 2
    images, labels = read_split(str(out), "train")
    assert images.shape == (6, 16, 16, 3)
    assert images.std() > 1.0  # real pictures, not blank canvases
    assert (labels >= 0).all() and (labels < index.num_classes).all()
    expected_classes = {"openclipart": 22, "fashion-mnist": 10, "textiles": 3}.get(source, 1)
    assert index.num_classes == expected_classes
    assert check_dataset(str(out)).ok


# ------------------------------------------------------------------------------------------------
# Determinism, layout, atomicity
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_80(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("src") / "imgs", {"a": 40, "b": 25, "c": 15})


def test_rerun_is_byte_identical_with_any_worker_count(folder_80, tmp_path):
    kwargs = dict(size=8, samples_per_shard=16, eval_fraction=0.1, log=quiet)
    first = make_shards(f"folder:{folder_80}", str(tmp_path / "one"), **kwargs)
    again = make_shards(f"folder:{folder_80}", str(tmp_path / "one"), **kwargs)  # rerun in place
    other = make_shards(f"folder:{folder_80}", str(tmp_path / "two"), workers=2, **kwargs)
    assert first.content_hash == again.content_hash == other.content_hash
    assert dir_bytes(tmp_path / "one") == dir_bytes(tmp_path / "two")
    changed = make_shards(f"folder:{folder_80}", str(tmp_path / "three"), seed=1, **kwargs)
    assert changed.content_hash != first.content_hash


def test_shard_layout_is_webdataset(folder_80, tmp_path):
    out = tmp_path / "ds"
    index = make_shards(f"folder:{folder_80}", str(out), size=8, samples_per_shard=16, log=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["eval-000000.tar", "index.json"] + [
        f"train-{i:06d}.tar" for i in range(5)
    ]
    assert [s.num_samples for s in index.shards("train")] == [16, 16, 16, 16, 8]
    with tarfile.open(out / "train-000000.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names[:3] == ["00000000.cls", "00000000.json", "00000000.png"]
    keys = [n.split(".")[0] for n in names]
    assert keys == sorted(keys) and len(names) == 3 * 16  # adjacent, ascending
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}
    data = json.loads((out / "index.json").read_text())
    for field in ("format_version", "tool", "source", "image_size", "class_names", "content_hash", "splits"):
        assert field in data
    import webdataset as wds  # the reference reader understands the shards as they are

    samples = list(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False).decode("rgb8"))
    assert len(samples) == 16 and samples[0]["png"].shape == (8, 8, 3) and samples[0]["cls"] in (0, 1, 2)


def test_failed_rebuild_leaves_no_complete_looking_dataset_and_skip_bad_records(folder_80, tmp_path):
    out = tmp_path / "ds"
    make_shards(f"folder:{folder_80}", str(out), size=8, log=quiet)
    broken = tmp_path / "broken"
    make_image_folder(broken, {"a": 3, "b": 3})
    (broken / "b" / "zz_bad.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match="b/zz_bad.png"):
        make_shards(f"folder:{broken}", str(out), size=8, log=quiet)
    assert not (out / "index.json").exists()  # the old index went first: the folder is not complete
    with pytest.raises(DatasetError, match="index.json: not found"):
        load_index(str(out))
    index = make_shards(f"folder:{broken}", str(out), size=8, skip_bad=True, log=quiet)
    assert [s["ref"] for s in index.data["skipped_inputs"]] == ["b/zz_bad.png"]
    assert index.data["num_samples"] == 6
    assert not any(".tmp-" in p.name for p in out.iterdir())
    assert check_dataset(str(out)).ok  # the earlier, larger build's extra shards are gone


# ------------------------------------------------------------------------------------------------
# fsspec URLs
# ------------------------------------------------------------------------------------------------


def test_fsspec_memory_and_file_urls_round_trip(folder_80, tmp_path):
    local = make_shards(f"folder:{folder_80}", str(tmp_path / "local"), size=8, samples_per_shard=16, log=quiet)
    url = "memory://diffscaler-test/ds"
    try:
        remote = make_shards(f"folder:{folder_80}", url, size=8, samples_per_shard=16, log=quiet)
        assert remote.content_hash == local.content_hash
        fs = fsspec.filesystem("memory")
        assert (
            fs.cat_file("/diffscaler-test/ds/train-000000.tar")
            == (tmp_path / "local" / "train-000000.tar").read_bytes()
        )
        assert check_dataset(url).ok
        images, _ = read_split(url, "eval")
        assert np.array_equal(images, read_split(str(tmp_path / "local"), "eval")[0])
        # an input folder given as a URL works too
        file_url = f"file://{tmp_path / 'local_via_url'}"
        via_file = make_shards(f"folder:file://{folder_80}", file_url, size=8, samples_per_shard=16, log=quiet)
        assert check_dataset(file_url).ok and via_file.num_samples("train") == local.num_samples("train")
    finally:
        fsspec.filesystem("memory").rm("/diffscaler-test", recursive=True)


# ------------------------------------------------------------------------------------------------
# `diffscaler shards make` / `check`
# ------------------------------------------------------------------------------------------------


def test_cli_make_contract(folder_80, tmp_path, capsys):
    out = tmp_path / "cli"
    rc, text = run_cli(
        [
            "shards",
            "make",
            "--source",
            f"folder:{folder_80}",
            "--out",
            str(out),
            "--size",
            "16",
            "--samples-per-shard",
            "10",
            "--eval-fraction",
            "0.25",
            "--limit",
            "40",
        ],
        capsys,
    )
    assert rc == 0, text
    index = load_index(str(out))
    assert index.image_size == 16 and index.num_samples("train") == 30 and index.num_samples("eval") == 10
    assert run_cli(["shards", "check", str(out)], capsys)[0] == 0
    rc, text = run_cli(["shards", "make", "--source", "nope", "--out", str(out)], capsys)
    assert rc == 2 and "unknown source 'nope'" in text


def _drop_png_of(key):
    def transform(s: RawSample):
        if s.key == key:
            del s.members["png"]
        return s

    return transform


@pytest.mark.parametrize("fault", ["truncated", "missing_member", "corrupt_png", "count_mismatch", "missing_shard"])
def test_check_reports_each_fault_with_file_and_key(fault, folder_80, tmp_path, capsys):
    out = tmp_path / "ds"
    make_shards(f"folder:{folder_80}", str(out), size=8, samples_per_shard=16, log=quiet)
    shard = out / "train-000001.tar"
    if fault == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2 + 100])
        expect = ["train-000001.tar", "truncated"]
    elif fault == "missing_member":
        rewrite_member(shard, _drop_png_of("00000020"))
        expect = ["train-000001.tar", "'00000020'", "missing member(s) .png"]
    elif fault == "corrupt_png":
        rewrite_member(shard, corrupt_png_of("00000021"))
        expect = ["train-000001.tar", "'00000021'", "unreadable image"]
    elif fault == "count_mismatch":
        data = json.loads((out / "index.json").read_text())
        data["splits"]["train"]["shards"][1]["num_samples"] = 17
        data["splits"]["train"]["num_samples"] += 1
        (out / "index.json").write_text(json.dumps(data))
        expect = ["train-000001.tar", "has 16 samples, index.json says 17"]
    else:
        shard.unlink()
        expect = ["train-000001.tar", "missing"]
    rc, text = run_cli(["shards", "check", str(out)], capsys)
    assert rc == 1
    for fragment in expect:
        assert fragment in text, text
