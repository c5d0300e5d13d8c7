"""The generation job (issue 22): Ray Data actors, mixed-task batches, shards `shards check` accepts, resume."""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest

from diffscaler.config import load_config
from tests.support.serving import live_actor_pids, setup_models

GEN = ["generate.sampling_steps=2", "generate.images_per_task=4", "generate.cpus_per_actor=0.5"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return setup_models(tmp_path_factory.mktemp("gen_models"))


def read_samples(out) -> dict[tuple[str, int, int], dict]:
    """{(task, class, index): {"png": image, "cond": map or None, "json": meta, "cls": label}} of a generated
    folder."""
    from PIL import Image

    from diffscaler.data.pngcodec import decode_png

    index = json.loads((out / "index.json").read_text())
    found = {}
    for entry in index["splits"]["train"]["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[: -len(".json")]
            meta = json.loads(members[name])
            cond = members.get(key + ".cond.png")
            found[(meta["task"], meta["class"], meta["index"])] = {
                "png": decode_png(members[key + ".png"]),
                "cond": None if cond is None else np.asarray(Image.open(io.BytesIO(cond))),  # grey (S, S)
                "json": meta,
                "cls": int(members[key + ".cls"]),
            }
    return found


def read_set(out) -> dict[tuple[str, int, int], np.ndarray]:
    """{(task, class, index): image} of a generated folder, with each sample's json checked against its cls."""
    found = read_samples(out)
    class_names = json.loads((out / "index.json").read_text())["class_names"]
    for s in found.values():
        assert class_names[s["cls"]] == s["json"]["class_name"]
    return {k: s["png"] for k, s in found.items()}


def test_plan_interleaves_tasks_and_splits_conditional_tasks_over_classes():
    from diffscaler.serving.generate import TaskPlan, plan_rows

    cfg = load_config(None, ["generate.images_per_task=4", "generate.samples_per_shard=5"])
    rows = plan_rows([TaskPlan("a", 1, (), "h"), TaskPlan("b", 3, (), "h")], cfg.generate)
    assert [(r["task"], r["cls"], r["index"]) for r in rows[:4]] == [("a", 0, 0), ("b", 0, 0), ("a", 0, 1), ("b", 1, 0)]
    assert [r["label"] for r in rows if r["task"] == "b"] == [1, 2, 3, 1]  # a is class 0, b/0..b/2 are 1..3
    assert [r["shard"] for r in rows] == [0] * 5 + [1] * 3
    per_class = plan_rows([TaskPlan("b", 3, (), "h")], load_config(None, ["generate.images_per_class=2"]).generate)
    assert [(r["cls"], r["index"]) for r in per_class] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_images_do_not_depend_on_actors_batch_size_or_mix(ray_local, models, tmp_path):
    from diffscaler.data.check import check_dataset
    from diffscaler.serving.generate import generate_set

    backbone, adapters = models
    logs: list[str] = []
    one = load_config(None, [*GEN, "generate.num_actors=1", "generate.batch_size=16", "generate.samples_per_shard=6"])
    index = generate_set(one, str(backbone), str(adapters), str(tmp_path / "one"), log=logs.append)
    report = check_dataset(str(tmp_path / "one"))
    assert report.ok, report.problems
    assert index["num_samples"] == 16 and len(index["splits"]["train"]["shards"]) == 3
    assert index["class_names"] == ["a", "b/0", "b/1", "b/2", "c", "d"]
    assert sum("wrote train-" in line for line in logs) == 3  # progress per shard
    # two actors, another batch size, only two of the tasks in another order: the same images
    two = load_config(None, [*GEN, "generate.num_actors=2", "generate.batch_size=3", "generate.tasks=[d, b]"])
    generate_set(two, str(backbone), str(adapters), str(tmp_path / "two"))
    first, second = read_set(tmp_path / "one"), read_set(tmp_path / "two")
    assert set(second) == {k for k in first if k[0] in ("b", "d")}
    for key, image in second.items():
        assert np.abs(image.astype(int) - first[key]).max() <= 1, key
    assert len({first[k].tobytes() for k in first}) == len(first)  # every image differs from the others


class Stop(BaseException):
    """The driver dies between shards, as a killed job would."""


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_rerun_keeps_finished_shards_and_writes_only_the_missing(ray_local, models, tmp_path):
    from diffscaler.data.check import check_dataset
    from diffscaler.serving.generate import generate_set

    backbone, adapters = models
    out = tmp_path / "set"
    cfg = load_config(None, [*GEN, "generate.batch_size=2", "generate.samples_per_shard=4"])

    def stop_after_first(done: int, _total: int) -> None:
        if done == 1:
            raise Stop

    with pytest.raises(Stop):
        generate_set(cfg, str(backbone), str(adapters), str(out), on_shard=stop_after_first)
    first = out / "train-000000.tar"
    stamp = (first.stat().st_ino, first.stat().st_mtime_ns)
    assert not (out / "index.json").exists()
    logs: list[str] = []
    generate_set(cfg, str(backbone), str(adapters), str(out), log=logs.append)
    assert any("resuming, 1 shard(s) already written" in line for line in logs), logs
    assert sum("wrote train-" in line for line in logs) == 3
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == stamp  # kept, not written again
    assert check_dataset(str(out)).ok
    assert not list(out.glob("*.done.json"))
    logs.clear()
    generate_set(cfg, str(backbone), str(adapters), str(out), log=logs.append)
    assert "nothing to do" in logs[-1]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_actor_is_replaced_and_its_shard_redone(ray_local, models, tmp_path):
    from diffscaler.data.check import check_dataset
    from diffscaler.serving.generate import generate_set

    backbone, adapters = models
    cfg = load_config(None, [*GEN, "generate.batch_size=2", "generate.samples_per_shard=4"])
    killed = []

    def kill_an_actor(_done: int, _total: int) -> None:
        for pid in live_actor_pids("GenerateActor")[:1]:
            if not killed:
                os.kill(pid, signal.SIGKILL)  # kill -9 of a generating actor while shards remain
                killed.append(pid)

    out = tmp_path / "set"
    generate_set(cfg, str(backbone), str(adapters), str(out), on_shard=kill_an_actor)
    assert killed and check_dataset(str(out)).ok
    clean = tmp_path / "clean"
    generate_set(cfg, str(backbone), str(adapters), str(clean))
    a, b = read_set(out), read_set(clean)
    assert set(a) == set(b) and all(np.abs(a[k].astype(int) - b[k]).max() <= 1 for k in a)


def test_bad_input_is_refused_before_ray(models, tmp_path, refuse_ray, capsys):
    from ray_jobs.generate import main

    backbone, adapters = models
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generate: {images_per_task: 2}\n")
    assert (
        main(
            [
                "--config",
                str(cfg),
                "--backbone",
                str(backbone),
                "--adapters",
                str(adapters),
                "--out",
                str(tmp_path / "o"),
                "generate.tasks=[a, zebra]",
            ]
        )
        == 2
    )
    assert "['zebra'] not among the adapters" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    other = tmp_path / "other.safetensors"
    from tests.support.serving import make_backbone

    make_backbone(other, seed=3)
    assert (
        main(
            ["--config", str(cfg), "--backbone", str(other), "--adapters", str(adapters), "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "only works on the backbone it was trained on" in capsys.readouterr().err
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "index.json").write_text(json.dumps({"source": "emoji"}))
    assert (
        main(
            [
                "--config",
                str(cfg),
                "--backbone",
                str(backbone),
                "--adapters",
                str(adapters),
                "--out",
                str(tmp_path / "shards"),
            ]
        )
        == 2
    )
    assert "not a generated set" in capsys.readouterr().err


def test_an_out_folder_in_use_is_refused_naming_its_holder(models, tmp_path, refuse_ray, capsys):
    from diffscaler.runlock import run_lock
    from ray_jobs.generate import main

    backbone, adapters = models
    with run_lock(tmp_path / "o", "another generate"):
        tiny = str(Path(__file__).resolve().parents[1] / "ray_jobs/configs/tiny.yaml")
        assert (
            main(
                [
                    "--config",
                    tiny,
                    "--backbone",
                    str(backbone),
                    "--adapters",
                    str(adapters),
                    "--out",
                    str(tmp_path / "o"),
                    "generate.images_per_task=2",
                ]
            )
            == 2
        )
    assert "is in use by another generate" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Tasks with a condition map: maps from a split of the task's shards, stored beside each image
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cond_models(models, tmp_path_factory):
    """(backbone, adapters: edges (canny), plain, masked (mask, 2 classes), shards root with edges' and masked's
    8 px shards: 12 pictures, 3 in the eval split)."""
    from diffscaler.config import DataConfig
    from diffscaler.data import make_shards
    from diffscaler.data.conditions import ConditionSpec
    from tests.support.serving import condition_tasks, make_adapters
    from tests.support.shards import rgba_folder

    backbone, _ = models
    root = tmp_path_factory.mktemp("gen_cond")
    make_adapters(backbone, root / "adapters", tasks=condition_tasks(), seed=3)
    pictures = rgba_folder(root / "pictures")
    for task, kind in (("edges", "canny"), ("masked", "mask")):
        spec = ConditionSpec.from_config(kind, DataConfig())
        make_shards(
            f"folder:{pictures}", str(root / "shards" / task), size=8, eval_fraction=0.25, condition=spec, log=print
        )
    return backbone, root / "adapters", root / "shards"


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_conditional_tasks_take_maps_from_their_shards_and_store_them_beside_the_images(
    ray_local, cond_models, tmp_path
):
    from diffscaler.data import read_split
    from diffscaler.data.check import check_dataset
    from diffscaler.serving.generate import generate_set
    from diffscaler.serving.runtime import ImageRow, TaskRuntime

    backbone, adapters, shards = cond_models
    base = [*GEN, "generate.images_per_task=5", f"data.shards_root={shards}"]
    one = load_config(None, [*base, "generate.batch_size=16", "generate.samples_per_shard=6"])
    index = generate_set(one, str(backbone), str(adapters), str(tmp_path / "one"))
    assert check_dataset(str(tmp_path / "one")).ok
    assert index["condition"] is None and index["generate"]["conditions"]["edges"]["num_maps"] == 3  # mixed set
    got = read_samples(tmp_path / "one")
    runtime = TaskRuntime.load(backbone, adapters, max_resident=3, log=lambda _m: None)
    for task in ("edges", "masked"):
        _images, _labels, maps, keys = read_split(str(shards / task), "eval", conditions=True, keys=True)
        assert len(maps) == 3  # 5 images over 3 maps: image k takes map k mod 3
        mine = sorted((k for k in got if k[0] == task), key=lambda k: (k[2], k[1]))  # the task's images in order
        assert len(mine) == 5
        for k, key in enumerate(mine):
            sample = got[key]
            assert (sample["cond"] == maps[k % 3, 0]).all(), (task, k)
            assert sample["json"]["condition"]["source_key"] == keys[k % 3]
            assert sample["json"]["condition"]["kind"] == ("canny" if task == "edges" else "mask")
            assert sample["json"]["condition"]["split"] == "eval"
            row = ImageRow(task, key[1], key[2], 0, maps[k % 3])
            assert np.abs(sample["png"].astype(int) - runtime.images([row], steps=2)[0]).max() <= 1
    assert all(s["cond"] is None and "condition" not in s["json"] for k, s in got.items() if k[0] == "plain")
    # two actors, another batch size, edges alone: the same images and maps; the set records the condition
    two = load_config(None, [*base, "generate.num_actors=2", "generate.batch_size=3", "generate.tasks=[edges]"])
    index = generate_set(two, str(backbone), str(adapters), str(tmp_path / "two"))
    assert index["condition"]["kind"] == "canny" and index["members"]["condition"] == "cond.png"
    assert check_dataset(str(tmp_path / "two")).ok  # every sample's map decodes at its image's size
    alone = read_samples(tmp_path / "two")
    assert set(alone) == {k for k in got if k[0] == "edges"}
    for key, sample in alone.items():
        assert (
            np.abs(sample["png"].astype(int) - got[key]["png"]).max() <= 1
            and (sample["cond"] == got[key]["cond"]).all()
        )
    images, _labels, stored = read_split(str(tmp_path / "two"), "train", conditions=True)  # a conditional dataset
    assert stored.shape == (5, 1, 8, 8)


def test_a_conditional_task_without_shards_for_its_maps_is_refused_before_ray(
    cond_models, tmp_path, refuse_ray, capsys
):
    from ray_jobs.generate import main

    backbone, adapters, shards = cond_models
    cfg = tmp_path / "c.yaml"
    cfg.write_text("generate: {images_per_task: 2}\n")
    argv = [
        "--config",
        str(cfg),
        "--backbone",
        str(backbone),
        "--adapters",
        str(adapters),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*argv, f"data.shards_root={tmp_path / 'nothing'}", "generate.tasks=[plain, edges]"]) == 2
    err = capsys.readouterr().err
    assert "task 'edges' takes canny condition maps" in err and "no shards to take condition maps from" in err
    assert not (tmp_path / "o").exists()
    # shards whose maps are of another kind (masked's mask maps where edges takes canny)
    (tmp_path / "swapped").mkdir()
    os.symlink(shards / "masked", tmp_path / "swapped" / "edges")
    assert main([*argv, f"data.shards_root={tmp_path / 'swapped'}", "generate.tasks=[edges]"]) == 2
    assert "trained with canny maps, the shards at" in capsys.readouterr().err
    assert main([*argv, f"data.shards_root={shards}", "generate.tasks=[edges]", "generate.condition_split=test"]) == 2
    assert "generate.condition_split" in capsys.readouterr().err
