"""ShardReader / MixedTaskReader / read_split: values, rank and worker splits, resume, bad samples.

.venv/bin/python -m pytest tests/test_data_reader.py -q
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffscaler.data import DatasetError, MixedTaskReader, ShardError, ShardReader, make_shards, read_split
from diffscaler.data.reader import epoch_chunks
from tests.support.shards import corrupt_png_of, make_image_folder, quiet, rewrite_member

SIZE = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """80 train + 9 eval samples of 3 classes in 16-sample shards (the last one short)."""
    root = tmp_path_factory.mktemp("reader")
    src = make_image_folder(root / "imgs", {"a": 40, "b": 30, "c": 19})
    out = root / "ds"
    index = make_shards(f"folder:{src}", str(out), size=SIZE, samples_per_shard=16, eval_fraction=0.1, log=quiet)
    assert index.num_samples("train") == 80 and [s.num_samples for s in index.shards("train")] == [16] * 5
    return out


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """77 train samples in shards of 8 (the last holds 5): counts that divide by nothing used below."""
    root = tmp_path_factory.mktemp("uneven")
    src = make_image_folder(root / "imgs", {"x": 50, "y": 36}, seed=3)
    out = root / "ds"
    make_shards(f"folder:{src}", str(out), size=SIZE, samples_per_shard=8, eval_fraction=0.1, log=quiet)
    return out


def sample_ids(batch) -> list[bytes]:
    """Identify samples by their pixels (every source image is distinct noise)."""
    pixels = ((batch["image"] + 1) * 127.5).round().to(torch.uint8)
    return [p.numpy().tobytes() for p in pixels]


def all_train_ids(path: Path) -> dict[bytes, int]:
    images, labels = read_split(str(path), "train")
    return {im.transpose(2, 0, 1).tobytes(): int(lab) for im, lab in zip(images, labels)}


def collect(reader: ShardReader, epoch: int) -> list[dict]:
    return list(reader.epoch(epoch))


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("image", "label", "task_id")
    )


def test_batches_have_shapes_values_and_true_labels(dataset):
    reader = ShardReader(str(dataset), "train", batch_size=8, hflip=False, task_id=3, shuffle_buffer=16)
    truth = all_train_ids(dataset)
    batches = collect(reader, 0)
    assert len(batches) == reader.batches_per_epoch == 10
    for batch in batches:
        assert batch["image"].shape == (8, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
        assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
        assert batch["label"].dtype == torch.int64 and batch["task_id"].tolist() == [3] * 8
        assert [truth[i] for i in sample_ids(batch)] == batch["label"].tolist()
    seen = [i for b in batches for i in sample_ids(b)]
    assert sorted(seen) == sorted(truth)  # one epoch, one rank: every sample exactly once


def test_epochs_reshuffle_and_hflip_mirrors_some_images(dataset):
    plain = ShardReader(str(dataset), batch_size=8, hflip=False, shuffle_buffer=16)
    assert [sample_ids(b) for b in collect(plain, 0)] != [sample_ids(b) for b in collect(plain, 1)]
    flipped = ShardReader(str(dataset), batch_size=8, hflip=True, shuffle_buffer=16)
    a, b = collect(plain, 0)[0]["image"], collect(flipped, 0)[0]["image"]
    mirrored = [torch.equal(b[i], a[i].flip(-1)) and not torch.equal(b[i], a[i]) for i in range(8)]
    same = [torch.equal(b[i], a[i]) for i in range(8)]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored) and any(same)


@pytest.mark.parametrize("batch_size", [4, 6])
def test_two_ranks_two_workers_disjoint_complete_equal(uneven, dataset, batch_size):
    for path in (dataset, uneven):
        truth = all_train_ids(path)
        per_rank = []
        for rank in range(2):
            reader = ShardReader(
                str(path),
                batch_size=batch_size,
                rank=rank,
                world_size=2,
                loader_workers=2,
                hflip=False,
                shuffle_buffer=8,
                seed=5,
            )
            batches = collect(reader, 2)
            assert len(batches) == reader.batches_per_epoch  # from index.json alone, the same on both ranks
            assert all(b["image"].shape[0] == batch_size for b in batches)
            ids = [i for b in batches for i in sample_ids(b)]
            assert len(ids) == len(set(ids))
            per_rank.append(set(ids))
        n = len(truth)
        expected_each = (n // 2) // batch_size * batch_size
        assert len(per_rank[0]) == len(per_rank[1]) == expected_each
        assert not per_rank[0] & per_rank[1]  # disjoint
        assert (per_rank[0] | per_rank[1]) <= set(truth)
        if n % (2 * batch_size) == 0:
            assert per_rank[0] | per_rank[1] == set(truth)  # complete when nothing must be dropped


def test_loader_workers_change_speed_not_batches(uneven):
    kwargs = dict(batch_size=4, rank=1, world_size=2, seed=2, shuffle_buffer=8)
    assert same_batches(
        collect(ShardReader(str(uneven), **kwargs), 1), collect(ShardReader(str(uneven), loader_workers=2, **kwargs), 1)
    )


def test_chunks_cover_each_rank_range_exactly():
    counts = [7] * 11 + [3]
    for world in (1, 2, 3):
        covered = []
        for rank in range(world):
            chunks = epoch_chunks(counts, epoch=4, seed=1, rank=rank, world_size=world, batch_size=5, shuffle_buffer=12)
            assert sum(c.num_batches for c in chunks) == (sum(counts) // world) // 5
            covered += [(s.shard, p) for c in chunks for s in c.segments for p in range(s.lo, s.hi)]
        assert len(covered) == len(set(covered)) == world * ((sum(counts) // world) // 5) * 5


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_step_yields_the_same_batches(uneven, workers):
    reader = ShardReader(str(uneven), batch_size=4, loader_workers=workers, shuffle_buffer=8, seed=9)
    n = reader.batches_per_epoch
    stream = reader.stream(0)
    uninterrupted = [next(stream) for _ in range(n + 5)]
    for start in (3, n - 1, n + 2):
        resumed = ShardReader(str(uneven), batch_size=4, loader_workers=workers, shuffle_buffer=8, seed=9).stream(start)
        got = [next(resumed) for _ in range(n + 5 - start)]
        assert same_batches(got, uninterrupted[start:])


def test_bad_sample_stops_or_is_skipped_and_counted(dataset, tmp_path):
    broken = tmp_path / "ds"
    shutil.copytree(dataset, broken)
    rewrite_member(broken / "train-000002.tar", corrupt_png_of("00000035"))
    with pytest.raises(ShardError, match=r"train-000002.tar: sample '00000035': unreadable image"):
        collect(ShardReader(str(broken), batch_size=8), 0)
    with pytest.raises(ShardError, match=r"train-000002.tar: sample '00000035'"):
        collect(ShardReader(str(broken), batch_size=8, loader_workers=2, shuffle_buffer=8), 0)
    reader = ShardReader(str(broken), batch_size=8, skip_bad=True, loader_workers=2, shuffle_buffer=16, hflip=False)
    batches = collect(reader, 0)
    assert all(b["image"].shape[0] == 8 for b in batches) and len(batches) == 10  # batches stay full
    ids = [i for b in batches for i in sample_ids(b)]
    assert len(set(ids)) == 79 and reader.skipped == 1  # the bad one is gone, a good one filled in
    assert "train-000002.tar: sample '00000035'" in reader.skipped_messages[0]
    assert {Path(url).name: n for url, n in reader.skipped_files.items()} == {"train-000002.tar": 1}


def test_truncated_shard_stops_with_file_and_key_or_counts_lost_samples(dataset, tmp_path):
    broken = tmp_path / "ds"
    shutil.copytree(dataset, broken)
    shard = broken / "train-000004.tar"
    shard.write_bytes(shard.read_bytes()[:20000])  # a few samples survive, the rest is cut off
    with pytest.raises(ShardError, match=r"train-000004.tar: sample '000000\d\d': truncated"):
        collect(ShardReader(str(broken), batch_size=8, shuffle_buffer=0), 0)
    reader = ShardReader(str(broken), batch_size=8, skip_bad=True, shuffle=False, hflip=False)
    ids = [i for b in collect(reader, 0) for i in sample_ids(b)]
    assert len(ids) == 80 and len(set(ids)) + reader.skipped == 80 and reader.skipped > 8
    assert "train-000004.tar" in reader.skipped_messages[0] and "truncated" in reader.skipped_messages[0]


def test_too_little_data_is_an_error_and_few_shards_a_warning(dataset, uneven):
    with pytest.raises(DatasetError, match=r"split 'eval' has 9 samples.*2 rank\(s\) x batch 8 needs at least 16"):
        ShardReader(str(dataset), "eval", batch_size=8, world_size=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ShardReader(str(dataset), "eval", batch_size=2, world_size=2, loader_workers=2)
    assert any("eval-000000.tar" in str(w.message) and "4 readers" in str(w.message) for w in caught)


def test_mixed_task_reader_interleaves_tasks_and_resumes(dataset, uneven):
    mixed = MixedTaskReader.from_dirs([(str(dataset), 0), (str(uneven), 1)], batch_size=7, shuffle_buffer=8)
    batch = next(mixed.stream(0))
    assert batch["image"].shape == (7, 3, SIZE, SIZE)
    assert batch["task_id"].tolist() == [0, 0, 0, 0, 1, 1, 1]
    stream = mixed.stream(0)
    run = [next(stream) for _ in range(25)]
    resumed = MixedTaskReader.from_dirs([(str(dataset), 0), (str(uneven), 1)], batch_size=7, shuffle_buffer=8)
    again = resumed.stream(20)
    assert same_batches([next(again) for _ in range(5)], run[20:])


def test_read_split_and_fsspec_reader_match_local(dataset):
    images, labels = read_split(str(dataset), "eval")
    assert images.shape == (9, SIZE, SIZE, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert read_split(str(dataset), "eval", limit=4)[0].shape[0] == 4
    import fsspec

    fs = fsspec.filesystem("memory")
    try:
        for p in dataset.iterdir():
            fs.pipe_file(f"/reader-test/{p.name}", p.read_bytes())
        local = collect(ShardReader(str(dataset), batch_size=8, shuffle_buffer=16), 1)
        remote = collect(ShardReader("memory://reader-test", batch_size=8, shuffle_buffer=16), 1)
        assert same_batches(local, remote)
        file_url = collect(ShardReader(f"file://{dataset}", batch_size=8, shuffle_buffer=16), 1)
        assert same_batches(local, file_url)
    finally:
        fs.rm("/reader-test", recursive=True)
