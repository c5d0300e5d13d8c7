"""`diffscaler serve` (issue 22) on a real local Ray cluster, real Ray Serve and a real HTTP client (requests)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from diffscaler.config import load_config
from tests.support.cluster import free_ports
from tests.support.serving import condition_tasks, live_actor_pids, make_adapters, make_backbone, setup_models
from tests.support.shards import rgba_folder

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
SERVE = [
    "serve.cpus_per_replica=0.5",
    "serve.sampling_steps=2",
    "serve.max_steps=40",
    "serve.max_resident_tasks=3",
    "serve.max_batch_size=16",
    "serve.batch_wait_s=0.05",
    "serve.max_images_per_request=8",
]


def decode(item: dict) -> np.ndarray:
    from diffscaler.data.pngcodec import decode_png

    return decode_png(base64.b64decode(item["png_base64"]))


@pytest.fixture(scope="module")
def server(ray_local, tmp_path_factory):
    """(base URL, adapters folder, backbone) of the app on a fresh Serve proxy; the folder is this module's own."""
    from ray import serve

    from diffscaler.serving.app import build_app

    root = tmp_path_factory.mktemp("serve")
    backbone, adapters = setup_models(root)
    (port,) = free_ports(1)
    # no watching here: the reload test reads what its own POST /v1/reload found (the watcher could find it first)
    cfg = load_config(None, [*SERVE, f"serve.port={port}", "serve.watch_interval_s=0"])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(backbone), str(adapters), cfg), name="diffscaler", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", adapters, backbone
    finally:
        serve.shutdown()


def post(url: str, body, **kw) -> requests.Response:
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(url + "/v1/generate", data=data, timeout=120, **kw)


def test_generate_returns_the_generation_jobs_images_as_json_or_png(server):
    from diffscaler.serving.runtime import ImageRow, TaskRuntime

    url, adapters, backbone = server
    r = post(url, {"task": "b", "num": 4, "seed": 11, "steps": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(im["class"], im["index"]) for im in body["images"]] == [(0, 0), (1, 0), (2, 0), (0, 1)]  # classes in turn
    rows = [ImageRow("b", im["class"], im["index"], 11) for im in body["images"]]
    assert [im["seed"] for im in body["images"]] == [row.noise_seed for row in rows]
    expected = TaskRuntime.load(backbone, adapters, max_resident=4, log=lambda _m: None).images(rows, steps=3)
    for im, want in zip(body["images"], expected):
        assert np.abs(decode(im).astype(int) - want).max() <= 1
    png = post(url, {"task": "b", "class": 2, "num": 1, "seed": 11, "steps": 3}, headers={"Accept": "image/png"})
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    assert int(png.headers["x-seed"]) == rows[2].noise_seed  # class 2, index 0: the same image as above
    assert r.json()["adapter_hash"].startswith("sha256:")


def test_the_same_request_gives_the_same_images_whatever_it_is_batched_with(server):
    url, _, _ = server
    requests_ = [
        {"task": t, "num": n, "seed": s}
        for t, n, s in [("a", 3, 1), ("b", 2, 2), ("c", 4, 3), ("d", 1, 4), ("a", 2, 5), ("c", 1, 6)]
    ]
    alone = [post(url, q).json() for q in requests_]
    before = requests.get(url + "/v1/stats", timeout=30).json()
    with ThreadPoolExecutor(len(requests_)) as pool:
        together = list(pool.map(lambda q: post(url, q).json(), requests_))
    after = requests.get(url + "/v1/stats", timeout=30).json()
    assert after["mixed_batches"] > before["mixed_batches"]  # tasks met in one batch
    assert after["batches"] - before["batches"] < sum(q["num"] for q in requests_)
    for a, b in zip(alone, together):
        assert [i["seed"] for i in a["images"]] == [i["seed"] for i in b["images"]]
        for x, y in zip(a["images"], b["images"]):
            assert np.abs(decode(x).astype(int) - decode(y)).max() <= 1
    assert after["page_ins"] >= 1 and after["resident"] == 3  # 4 tasks over 3 resident slots: paged in and out


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"task": "zebra"}, 404, "unknown task 'zebra'; served tasks: a, b, c, d"),
        ("{not json", 400, "malformed JSON"),
        ({"task": "a", "num": 0}, 400, "field 'num': 0 is out of range [1, 8]"),
        ({"task": "a", "num": 9}, 400, "field 'num': 9 is out of range [1, 8]"),
        ({"task": "a", "steps": -1}, 400, "field 'steps'"),
        ({"task": "a", "steps": 41}, 400, "field 'steps'"),
        ({"task": "b", "class": 3}, 400, "field 'class': 3 is out of range for task 'b'"),
        ({"task": "a", "class": 1}, 400, "field 'class'"),
        ({"task": "a", "seed": "x"}, 400, "field 'seed': expected an integer"),
        ({"task": "a", "guidance": -1}, 400, "field 'guidance'"),
        ({"task": "a", "prompt": "x"}, 400, "field 'prompt': not a request field"),
        ({"num": 2}, 400, "field 'task'"),
    ],
)
def test_bad_requests_name_the_field_and_unknown_tasks_list_the_served(server, body, status, words):
    url, _, _ = server
    r = post(url, body)
    assert r.status_code == status and words in r.json()["error"], r.text


def test_tasks_healthz_and_reload_of_new_removed_foreign_and_corrupt_adapters(server, tmp_path):
    url, adapters, backbone = server
    assert requests.get(url + "/healthz", timeout=30).json()["status"] == "ok"
    listed = {t["name"]: t for t in requests.get(url + "/v1/tasks", timeout=30).json()["tasks"]}
    assert sorted(listed) == ["a", "b", "c", "d"]
    assert (listed["b"]["classes"], listed["d"]["rank"], listed["a"]["method"]) == (3, 1, "affiner")
    from diffscaler.adapters import TaskInfo

    # a new task written as the fine-tune stage writes it (atomically), one of another backbone, a corrupt one
    staging = tmp_path / "new"
    make_adapters(backbone, staging, tasks=[TaskInfo("e", rank=2)], seed=5)
    other = tmp_path / "other.safetensors"
    make_backbone(other, seed=9)
    make_adapters(other, tmp_path / "foreign", tasks=[TaskInfo("f")])
    for name, src in (("e", staging), ("f", tmp_path / "foreign")):
        for ext in (".safetensors", ".json"):
            shutil.copy(src / f"{name}{ext}", adapters / f".{name}{ext}.tmp")
            os.replace(adapters / f".{name}{ext}.tmp", adapters / f"{name}{ext}")
    shutil.copy(staging / "e.json", adapters / "g.json")
    (adapters / "g.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    try:
        summary = requests.post(url + "/v1/reload", timeout=60).json()
        assert summary["added"] == ["e"] and summary["tasks"] == ["a", "b", "c", "d", "e"]
        refused = {os.path.basename(f): why for f, why in summary["refused"].items()}
        assert "only works on the backbone it was trained on" in refused["f.safetensors"]
        assert "truncated or corrupt" in refused["g.safetensors"]
        assert post(url, {"task": "e", "num": 2}).status_code == 200
        assert post(url, {"task": "a", "num": 1}).status_code == 200  # the others keep serving
        assert post(url, {"task": "f"}).status_code == 404
        os.remove(adapters / "c.safetensors")
        os.remove(adapters / "c.json")
        summary = requests.post(url + "/v1/reload", timeout=60).json()
        assert summary["removed"] == ["c"]
        r = post(url, {"task": "c"})
        assert r.status_code == 404 and "served tasks: a, b, d, e" in r.json()["error"]
    finally:
        for stem in "efg":
            for ext in (".safetensors", ".json"):
                (adapters / f"{stem}{ext}").unlink(missing_ok=True)
        make_adapters(backbone, tmp_path / "again")  # put c back as it was (same seed: the same tensors)
        for ext in (".safetensors", ".json"):
            shutil.copy(tmp_path / "again" / f"c{ext}", adapters / f"c{ext}")
        requests.post(url + "/v1/reload", timeout=60)


# ------------------------------------------------------------------------------------------------
# Two replicas watching one adapters folder: a change reaches every replica with no POST
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def replicas(server, tmp_path):
    """(base URL, adapters folder, backbone) of a 2-replica app watching its own copy of the adapters every 0.5 s."""
    from ray import serve

    from diffscaler.serving.app import build_app

    url, _adapters, backbone = server
    adapters = tmp_path / "adapters"
    make_adapters(backbone, adapters)
    cfg = load_config(
        None, [*SERVE, "serve.num_replicas=2", "serve.cpus_per_replica=0.25", "serve.watch_interval_s=0.5"]
    )
    serve.run(build_app(str(backbone), str(adapters), cfg), name="multi", route_prefix="/multi")
    try:
        yield url + "/multi", adapters, backbone
    finally:
        serve.delete("multi")


def every_replica(url: str, agree, replicas: int = 2, timeout: float = 60.0) -> dict[str, dict]:
    """The latest /v1/tasks of each replica once `replicas` distinct ones answered and `agree(view)` holds for each
    (Serve routes each GET to one replica: asking again reaches the others); AssertionError naming the views."""
    views: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = requests.get(url + "/v1/tasks", timeout=30).json()
        views[view["replica"]] = view
        if len(views) == replicas and all(agree(v) for v in views.values()):
            return views
        time.sleep(0.1)
    raise AssertionError(f"not every replica agreed within {timeout} s: {json.dumps(views)[:2000]}")


def served(view: dict) -> list[str]:
    return [t["name"] for t in view["tasks"]]


def put_atomically(src_folder, name: str, folder) -> None:
    """<name>.safetensors then <name>.json into `folder`, each by rename, as the fine-tune stage writes them."""
    for ext in (".safetensors", ".json"):
        shutil.copy(src_folder / f"{name}{ext}", folder / f".{name}{ext}.tmp")
        os.replace(folder / f".{name}{ext}.tmp", folder / f"{name}{ext}")


def test_every_replica_serves_a_new_changed_or_removed_adapter_without_a_reload(replicas, tmp_path):
    from diffscaler.adapters import TaskInfo

    url, adapters, backbone = replicas
    views = every_replica(url, lambda v: served(v) == ["a", "b", "c", "d"])
    assert len({v["digest"] for v in views.values()}) == 1
    old_a = {t["name"]: t["adapter_hash"] for t in next(iter(views.values()))["tasks"]}["a"]

    # new: e as the fine-tune stage writes it; f of another backbone and a corrupt g are refused on every replica
    make_adapters(backbone, tmp_path / "new", tasks=[TaskInfo("e", rank=2)], seed=5)
    put_atomically(tmp_path / "new", "e", adapters)
    other = tmp_path / "other.safetensors"
    make_backbone(other, seed=9)
    make_adapters(other, tmp_path / "foreign", tasks=[TaskInfo("f")])
    put_atomically(tmp_path / "foreign", "f", adapters)
    shutil.copy(tmp_path / "new" / "e.json", adapters / "g.json")
    (adapters / "g.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")

    def refused(view: dict) -> set[str]:
        return {os.path.basename(f) for f in view["refused"]}

    views = every_replica(
        url, lambda v: served(v) == ["a", "b", "c", "d", "e"] and refused(v) == {"f.safetensors", "g.safetensors"}
    )
    assert len({v["digest"] for v in views.values()}) == 1
    why = next(iter(views.values()))["refused"]
    assert any("only works on the backbone it was trained on" in r for r in why.values())
    assert any("truncated or corrupt" in r for r in why.values())
    assert all(post(url, {"task": t, "num": 1}).status_code == 200 for t in "eaeb")  # e and the others serve

    # changed: a rewritten with other tensors; every replica serves the new version
    make_adapters(backbone, tmp_path / "changed", seed=3)
    with ThreadPoolExecutor(6) as pool:  # requests in flight while the replicas re-read: none of them fails
        busy = [pool.submit(post, url, {"task": t, "num": 2, "steps": 8}) for t in "abdabd"]
        time.sleep(0.2)
        put_atomically(tmp_path / "changed", "a", adapters)
        assert [f.result().status_code for f in busy] == [200] * 6
    views = every_replica(url, lambda v: {t["name"]: t["adapter_hash"] for t in v["tasks"]}["a"] != old_a)
    assert len({v["digest"] for v in views.values()}) == 1
    assert old_a not in {post(url, {"task": "a"}).json()["adapter_hash"] for _ in range(6)}

    # removed: c stops being served everywhere; every request for it is a 404 listing the served tasks
    os.remove(adapters / "c.safetensors")
    os.remove(adapters / "c.json")
    every_replica(url, lambda v: "c" not in served(v))
    for _ in range(8):
        r = post(url, {"task": "c"})
        assert r.status_code == 404 and "served tasks: a, b, d, e" in r.json()["error"], r.text


def test_a_half_written_adapter_is_refused_on_every_replica_and_served_once_complete(replicas, tmp_path):
    from diffscaler.adapters import TaskInfo

    url, adapters, backbone = replicas
    every_replica(url, lambda v: served(v) == ["a", "b", "c", "d"])
    make_adapters(backbone, tmp_path / "new", tasks=[TaskInfo("h")], seed=6)
    data = (tmp_path / "new" / "h.safetensors").read_bytes()
    shutil.copy(tmp_path / "new" / "h.json", adapters / "h.json")
    with open(adapters / "h.safetensors", "wb") as f:  # a writer that does not rename: half the file, then a pause
        f.write(data[: len(data) // 2])
        f.flush()
        every_replica(url, lambda v: any(k.endswith("h.safetensors") for k in v["refused"]) and "h" not in served(v))
        r = post(url, {"task": "h"})
        assert r.status_code == 404 and "served tasks: a, b, c, d" in r.json()["error"]
        time.sleep(0.01)  # a later mtime even on a coarse clock
        f.write(data[len(data) // 2 :])
    views = every_replica(url, lambda v: "h" in served(v) and not v["refused"])
    assert len({v["digest"] for v in views.values()}) == 1
    assert post(url, {"task": "h", "num": 2}).status_code == 200


def test_the_catalog_fingerprint_digest_and_a_rewritten_json(tmp_path):
    """No Ray: what the watcher compares (names, sizes, mtimes) and what a rewrite of either file of a task does."""
    from diffscaler.artifacts import load_backbone
    from diffscaler.serving.runtime import AdapterCatalog

    backbone, adapters = setup_models(tmp_path)
    model, meta = load_backbone(backbone)
    one, two = (AdapterCatalog(adapters, meta["content_hash"], model.config, log=lambda _m: None) for _ in "12")
    one.scan()
    two.scan()
    assert one.digest() == two.digest() and one.generation == 1
    before = one.fingerprint()
    assert one.fingerprint() == before and one.scan().summary()["updated"] == [] and one.generation == 1
    task = json.loads((adapters / "b.json").read_text())
    task["class_names"] = ["x", "y", "z"]
    time.sleep(0.01)
    (adapters / "b.json").write_text(json.dumps(task))  # the JSON alone rewritten: a change to read
    assert one.fingerprint() != before
    assert one.scan().updated == ["b"] and one.entries["b"].describe()["class_names"] == ["x", "y", "z"]
    assert one.digest() == two.digest()  # the same tensors: the same served adapters
    os.remove(adapters / "d.safetensors")
    assert one.scan().removed == ["d"] and one.digest() != two.digest() and one.generation == 3


def test_a_saturated_deployment_answers_503(server):
    from ray import serve

    from diffscaler.serving.app import build_app

    url, adapters, backbone = server
    cfg = load_config(
        None, [*SERVE, "serve.max_ongoing_requests=1", "serve.max_queued_requests=1", "serve.max_batch_size=1"]
    )
    serve.run(build_app(str(backbone), str(adapters), cfg), name="small", route_prefix="/small")
    try:
        slow = {"task": "a", "num": 8, "steps": 40}
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: post(url + "/small", slow).status_code, range(6)))
        assert 503 in codes and 200 in codes, codes
        assert set(codes) <= {200, 503}
    finally:
        serve.delete("small")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_killed_replica_is_replaced_and_later_requests_succeed(server):
    url, _, _ = server
    assert post(url, {"task": "a"}).status_code == 200
    (pid,) = live_actor_pids("ServeReplica:diffscaler:TaskServer")
    os.kill(pid, signal.SIGKILL)
    deadline, ok = time.monotonic() + 240, False
    while time.monotonic() < deadline and not ok:
        with contextlib.suppress(requests.RequestException):
            ok = post(url, {"task": "b", "num": 2}).status_code == 200
        time.sleep(1)
    assert ok, "no successful request within 240 s of killing the replica"
    assert live_actor_pids("ServeReplica:diffscaler:TaskServer") != [pid]


def test_diffscaler_serve_refuses_bad_input_before_ray(tmp_path, refuse_ray, capsys):
    import socket

    from diffscaler.cli import main

    backbone, adapters = setup_models(tmp_path)
    other = tmp_path / "other.safetensors"
    make_backbone(other, seed=4)
    assert main(["serve", "--backbone", str(other), "--adapters", str(adapters)]) == 2
    err = capsys.readouterr().err
    assert "no adapter fits the backbone" in err and "only works on the backbone it was trained on" in err
    assert main(["serve", "--backbone", str(backbone), "--adapters", str(tmp_path / "none")]) == 2
    assert "not a folder" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--backbone", str(backbone), "--adapters", str(adapters), f"serve.port={port}"]) == 2
    assert f"serve.port {port}: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--backbone", str(backbone), "--adapters", str(adapters), "serve.max_batch_size=0"]) == 2
    assert "serve.max_batch_size" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Tasks with a condition map: an image (the task's extractor makes the map) or a ready map per request
# ------------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def cond_server(server, tmp_path_factory):
    """(base URL, adapters, backbone, images folder) of a second app on the proxy: edges (canny maps), plain (no
    map) and masked (mask maps, 2 classes) over 2 resident slots, so adapters with a condition path page in."""
    from ray import serve

    from diffscaler.serving.app import build_app

    url, _adapters, backbone = server
    root = tmp_path_factory.mktemp("serve_cond")
    make_adapters(backbone, root / "adapters", tasks=condition_tasks(), seed=2)
    cfg = load_config(None, [*SERVE, "serve.max_resident_tasks=2"])
    serve.run(build_app(str(backbone), str(root / "adapters"), cfg), name="cond", route_prefix="/cond")
    try:
        yield url + "/cond", root / "adapters", backbone, rgba_folder(root / "pictures")
    finally:
        serve.delete("cond")


def picture(folder, k: int) -> bytes:
    return (folder / f"img_{k:03d}.png").read_bytes()


def reference_images(backbone, adapter, rows, maps, steps: int, mask=None) -> np.ndarray:
    """What `diffscaler sample` computes for these rows: a bank loaded from the one adapter file, maps given."""
    import torch

    from diffscaler.artifacts import load_adapters, load_backbone
    from diffscaler.config import DiffusionConfig
    from diffscaler.data.conditions import maps_to_unit
    from diffscaler.diffusion.gaussian import GaussianDiffusion
    from diffscaler.diffusion.sampling import generate, to_uint8

    model, meta = load_backbone(backbone)
    load_adapters(model, [adapter], backbone_hash=meta["content_hash"])
    x = generate(
        model,
        GaussianDiffusion.from_config(DiffusionConfig(), learn_sigma=model.config.learn_sigma),
        labels=torch.tensor([r.label for r in rows]),
        indices=range(len(rows)),
        seed=0,
        task_ids=0,
        steps=steps,
        sample_seeds=[r.noise_seed for r in rows],
        condition=torch.from_numpy(maps_to_unit(maps)),
        condition_mask=mask,
    )
    return to_uint8(x)


def test_a_conditional_task_takes_an_image_or_a_ready_map_as_sample_does(cond_server):
    from PIL import Image

    from diffscaler.data.conditions import adapter_condition, encode_map, maps_from_images, spec_from_record
    from diffscaler.serving.runtime import ImageRow

    url, adapters, backbone, pictures = cond_server
    r = post(url, {"task": "edges", "num": 2, "seed": 5, "steps": 3, "condition": b64(picture(pictures, 0))})
    assert r.status_code == 200, r.text
    body = r.json()
    meta = json.loads((adapters / "edges.json").read_text())
    # the map is the one `diffscaler sample --condition` extracts from the same picture (the first of the folder)
    want = maps_from_images(pictures, spec_from_record(adapter_condition(meta)), 8, limit=1)  # (1, 1, 8, 8)
    assert body["condition"]["kind"] == "canny" and body["condition"]["given"] == "image"
    used = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["condition"]["map_png_base64"]))))
    assert (used == want[0, 0]).all() and 0 < (want == 255).sum() < want.size  # edges, not a blank map
    rows = [ImageRow("edges", 0, im["index"], 5) for im in body["images"]]
    expected = reference_images(backbone, adapters / "edges.safetensors", rows, np.repeat(want, 2, axis=0), steps=3)
    got = np.stack([decode(im) for im in body["images"]])
    assert np.abs(got.astype(int) - expected).max() <= 1
    # the same map given ready: the same images; another picture's map, or none, or guidance on it: others
    ready = {"task": "edges", "num": 2, "seed": 5, "steps": 3, "condition": b64(encode_map(want[0]))}
    again = post(url, {**ready, "condition_is_map": True}).json()
    assert again["condition"]["given"] == "map"
    assert all(np.abs(decode(a).astype(int) - decode(b)).max() <= 1 for a, b in zip(body["images"], again["images"]))
    for change in ({"condition": b64(picture(pictures, 3))}, {"condition_scale": 3.0}):
        other = post(url, {**ready, **change, "condition_is_map": "condition_scale" in change}).json()
        assert max(np.abs(decode(a).astype(int) - decode(b)).max() for a, b in zip(body["images"], other["images"])) > 8
    bare = post(url, {"task": "edges", "num": 2, "seed": 5, "steps": 3, "unconditioned": True}).json()
    assert bare["condition"] == {"kind": "canny", "given": "none", "map_png_base64": None}
    import torch

    expected = reference_images(
        backbone, adapters / "edges.safetensors", rows, np.zeros((2, 1, 8, 8), np.uint8), 3, torch.zeros(2, dtype=bool)
    )
    assert np.abs(np.stack([decode(im) for im in bare["images"]]).astype(int) - expected).max() <= 1
    listed = {t["name"]: t for t in requests.get(url + "/v1/tasks", timeout=30).json()["tasks"]}
    assert listed["edges"]["condition"] == {"kind": "canny", "channels": 1, "size": 8}
    assert listed["masked"]["condition"]["kind"] == "mask" and listed["plain"]["condition"] is None


def test_mixed_batches_of_conditional_and_unconditional_requests_give_the_same_images(cond_server):
    from diffscaler.data.conditions import encode_map

    url, _, _, pictures = cond_server
    edge_map = np.zeros((8, 8), np.uint8)
    edge_map[2:6, 3] = 255
    requests_ = [
        {"task": "edges", "num": 2, "seed": 1, "condition": b64(picture(pictures, 0))},
        {"task": "plain", "num": 2, "seed": 2},
        {"task": "masked", "num": 3, "seed": 3, "condition": b64(picture(pictures, 1))},
        {"task": "edges", "num": 1, "seed": 4, "condition": b64(encode_map(edge_map)), "condition_is_map": True},
        {"task": "plain", "num": 1, "seed": 5},
        {"task": "masked", "num": 1, "seed": 6, "unconditioned": True},
    ]
    alone = [post(url, q).json() for q in requests_]
    before = requests.get(url + "/v1/stats", timeout=30).json()
    with ThreadPoolExecutor(len(requests_)) as pool:
        together = list(pool.map(lambda q: post(url, q).json(), requests_))
    after = requests.get(url + "/v1/stats", timeout=30).json()
    assert after["mixed_condition_batches"] > before["mixed_condition_batches"]  # maps and no maps in one batch
    assert after["batches"] - before["batches"] < sum(q["num"] for q in requests_)
    assert after["page_ins"] > before["page_ins"]  # 3 tasks over 2 slots: condition paths paged in and out
    for a, b in zip(alone, together):
        assert [i["seed"] for i in a["images"]] == [i["seed"] for i in b["images"]]
        for x, y in zip(a["images"], b["images"]):
            assert np.abs(decode(x).astype(int) - decode(y)).max() <= 1


def _png(array: np.ndarray) -> str:
    from diffscaler.data.pngcodec import encode_png

    return b64(encode_png(array.astype(np.uint8)))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"task": "plain", "condition": _png(np.zeros((8, 8)))}, "field 'condition': task 'plain' takes no condition"),
        ({"task": "edges"}, "field 'condition': task 'edges' is conditioned on canny maps (1 channel(s), 8x8 px)"),
        ({"task": "edges", "condition": "not base64!"}, "field 'condition': not valid base64"),
        ({"task": "edges", "condition": b64(b"GIF89a not an image")}, "field 'condition' (an image to extract"),
        ({"task": "edges", "condition": [1, 2]}, "field 'condition': expected a base64 PNG string"),
        (
            {"task": "edges", "condition": _png(np.zeros((16, 16))), "condition_is_map": True},
            "field 'condition' (a ready map) for task 'edges': a 16x16 map, the task takes 8x8",
        ),
        (
            {"task": "edges", "condition": _png(np.zeros((8, 8, 3))), "condition_is_map": True},
            "a 3-channel map (mode RGB), the task takes 1-channel",
        ),
        ({"task": "edges", "condition_is_map": True}, "field 'condition_is_map'"),
        ({"task": "edges", "condition_is_map": 1, "condition": "AA=="}, "field 'condition_is_map': expected true"),
        ({"task": "edges", "unconditioned": True, "condition": "AA=="}, "field 'unconditioned'"),
        ({"task": "edges", "unconditioned": True, "condition_scale": -1}, "field 'condition_scale'"),
    ],
)
def test_bad_conditions_are_400_naming_the_field(cond_server, body, words):
    r = post(cond_server[0], body)
    assert r.status_code == 400 and words in r.json()["error"], r.text
