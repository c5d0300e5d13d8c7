"""Spot nodes that disappear, on real multi-node Ray clusters on this machine (issue 15).

Each test starts its own cluster (`ray.cluster_utils.Cluster`: a head and worker nodes, each a real
raylet with its own worker processes) in its own temp folder, and shuts it down in the same test.
The removable node is made to hold some of the stage's work by resources alone: every request takes
1 CPU and each node has 1 CPU, so work that runs concurrently is spread over the nodes. Mid-stage the
node is removed without grace (its raylet and workers SIGKILLed, as a spot reclaim does); the stage
must finish with the lost work retried on a node that remains or is started, and - where the stage is
deterministic - give the same results as an undisturbed run on the same cluster.

    (a) parallel fine-tunes   a Ray task lost with its node is retried (max_retries): same adapters
    (b) Tune sweep            a trial lost with its node restarts from its last rung checkpoint
    (c) evaluation            the FID actor on the node is replaced, its chunk retried: same FID
    (d) pretraining           Ray Train restarts the gang from the last checkpoint: bit-exact steps

The autoscaler: a head started with `autoscaling_config` and Ray's fake multi-node provider
(`RAY_FAKE_CLUSTER=1`, the provider `ray.cluster_utils.AutoscalingCluster` uses; that class itself runs
`ray stop --force`, which would kill every Ray cluster on the machine, so the same config is started
here through `Cluster`) launches real local nodes of the declared types when requests are pending.

Machine: 2 cores shared with other jobs, so every node has at most 1 logical CPU and the models are
tiny. Cleanup kills only processes naming this test's temp folder (the fake provider's nodes are not
children of any process `Cluster` tracks).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffscaler.train.finetune import FinetuneInputError
from diffscaler.train.pretrain_checkpoint import RAY_SNAPSHOT
from tests.support.cluster import cluster_processes, free_ports
from tests.support.finetune import TWO_TASKS, make_work, tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]


# ------------------------------------------------------------------------------------------------
# Clusters
# ------------------------------------------------------------------------------------------------


STARTUP_TRIES = 3  # a node's raylet must register within Ray's fixed 30 s; on a loaded 2-core machine it may not


def startup_timeout(err: BaseException) -> bool:
    return "timed out during startup" in str(err)


@contextlib.contextmanager
def spot_cluster(head_cpus: float, spot_nodes: int = 0, autoscaling: dict | None = None) -> Iterator:
    """(cluster, [spot nodes]): a Cluster whose head has `head_cpus` CPUs, plus `spot_nodes` 1-CPU spot nodes
    (and the autoscaler when `autoscaling` is a config whose provider is fake_multinode); this process is
    connected to it. A node that times out starting makes the whole cluster start again, up to STARTUP_TRIES
    times. Connects back to the session's `ray_local` cluster on exit if this test found one (a driver joins
    one cluster at a time)."""
    import ray

    had_session_cluster = ray.is_initialized()
    if had_session_cluster:
        ray.shutdown()
    started = False  # once the test runs, its errors are its own: never start over then
    try:
        for attempt in range(1, STARTUP_TRIES + 1):
            try:
                with _one_cluster(head_cpus, autoscaling) as cluster:
                    nodes = [add_spot_node(cluster) for _ in range(spot_nodes)]
                    started = True
                    yield cluster, nodes
                    return
            except Exception as err:
                if started or not startup_timeout(err) or attempt == STARTUP_TRIES:
                    raise
                print(f"spot_cluster: a node timed out starting (try {attempt}); starting over")
    finally:
        if had_session_cluster:  # as conftest's ray_local starts it
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)


@contextlib.contextmanager
def _one_cluster(head_cpus: float, autoscaling: dict | None) -> Iterator:
    """One try: the head, connected. On exit: disconnect, shut down every node, SIGKILL whatever still names
    the temp folder (the autoscaler's nodes, a node that timed out starting), remove the folder."""
    import ray
    from ray.cluster_utils import Cluster

    temp = tempfile.mkdtemp(prefix="ds-spot-", dir="/tmp")  # short: Ray's socket paths are limited to 107 bytes
    gcs, dash = free_ports(2)
    head_args = {
        "num_cpus": head_cpus,
        "temp_dir": temp,
        "include_dashboard": False,
        "dashboard_port": dash,
        "gcs_server_port": gcs,
    }
    if autoscaling is not None:
        node_ip = ray._private.services.get_node_ip_address()
        autoscaling = json.loads(json.dumps(autoscaling))
        autoscaling["provider"]["gcs_address"] = f"{node_ip}:{gcs}"  # else the provider assumes port 6379
        path = Path(temp) / "autoscaling.json"
        path.write_text(json.dumps(autoscaling))
        head_args["autoscaling_config"] = str(path)
    cluster = None
    config_env = os.environ.get("DIFFSCALER_AUTOSCALER_CONFIG")
    if autoscaling is not None:  # where diffscaler.cluster reads the node types
        os.environ["DIFFSCALER_AUTOSCALER_CONFIG"] = str(path)
    try:
        # shutdown_at_exit=False: with it, every Node installs signal handlers, which only the main thread may
        # do, so a replacement node could not be added from NodeReclaimer's thread (cleanup is ours, below)
        cluster = Cluster(initialize_head=True, head_node_args=head_args, shutdown_at_exit=False)
        ray.init(address=cluster.address, log_to_driver=True)
        yield cluster
    finally:
        if config_env is None:
            os.environ.pop("DIFFSCALER_AUTOSCALER_CONFIG", None)
        else:
            os.environ["DIFFSCALER_AUTOSCALER_CONFIG"] = config_env
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for pid in cluster_processes(-1, temp):  # the autoscaler's nodes, started by its monitor process
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def add_spot_node(cluster):
    """A 1-CPU worker node carrying the custom resource `spot`."""
    return cluster.add_node(num_cpus=1, resources={"spot": 1})


def add_replacement_node(cluster) -> None:
    """A new spot node mid-stage. One that times out starting is left to finish joining (its raylet runs on;
    the stage waits for it): only the stage's outcome is tested."""
    try:
        add_spot_node(cluster)
    except Exception as err:
        if not startup_timeout(err):
            raise
        print(f"the replacement node is slow to start: {err}")


def alive_spot_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("spot")]


def spot_nodes_settle_at(count: int, timeout_s: float = 90.0) -> int:
    """The number of alive spot nodes once it is `count`, or when `timeout_s` has passed. The GCS marks a
    SIGKILLed node dead only after its health checks fail, which can come after the stage has already
    recovered (a lost actor or task is seen at once, through its broken connection)."""
    deadline = time.monotonic() + timeout_s
    while (alive := len(alive_spot_nodes())) != count and time.monotonic() < deadline:
        time.sleep(1.0)
    return alive


class NodeReclaimer(threading.Thread):
    """Removes `node` (no grace: a spot reclaim) once `ready()` holds, then runs `after` (say, add a
    replacement node). Polls until `stop` is set; `removed_at` stays None when it never fired."""

    def __init__(self, cluster, node, ready: Callable[[], bool], after: Callable[[], None] | None = None):
        super().__init__(daemon=True)
        self.cluster, self.node, self.ready, self.after = cluster, node, ready, after
        self.stop = threading.Event()
        self.removed_at: float | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    ready = self.ready()
                except (OSError, ValueError, LookupError):  # a file the stage is writing right now
                    ready = False
                if ready:
                    self.removed_at = time.time()
                    self.cluster.remove_node(self.node, allow_graceful=False)
                    if self.after is not None:
                        self.after()
                    return
                time.sleep(0.2)
        except BaseException as err:  # reported by finish()
            self.error = err

    def finish(self) -> float:
        self.stop.set()
        self.join(timeout=120)
        assert self.error is None, f"removing the node failed: {self.error!r}"
        assert self.removed_at is not None, "the stage ended before its work reached the node to remove"
        return self.removed_at


def train_lines(path: Path) -> int:
    try:
        return sum(json.loads(line)["kind"] == "train" for line in path.read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return 0


def same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert set(ta) == set(tb)
    for name in ta:
        assert torch.equal(ta[name], tb[name]), f"{a.name}: {name} differs from the undisturbed run"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return make_work(tmp_path_factory.mktemp("spot"))


# ------------------------------------------------------------------------------------------------
# (a) parallel fine-tunes
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_finetune_lost_with_its_node_is_retried_and_gives_the_same_adapter(work, tmp_path):
    """A 0-CPU head and two 1-CPU spot nodes: the two fine-tunes (1 CPU each) run one per node. The node
    of one is removed mid-training; its task is retried on the remaining node and every adapter equals
    the undisturbed run's, bit for bit."""
    from diffscaler.train.finetune import run_finetunes

    cfg = tiny_config(work.shards, TWO_TASKS, "finetune.steps=150", "finetune.log_every=1", "finetune.cpus_per_task=1")
    with spot_cluster(head_cpus=0, spot_nodes=2) as (cluster, (doomed, _)):
        calm = run_finetunes(cfg, work.backbone, tmp_path / "calm", log=print)
        assert [r.status for r in calm.rows] == ["ok", "ok"]

        out = tmp_path / "spot"
        logs = [out / "logs" / "affiner" / f"{t}.jsonl" for t in ("ta", "tb")]
        # both are training (so one of them is on the doomed node) and neither is done
        reclaimer = NodeReclaimer(
            cluster, doomed, lambda: all(train_lines(p) >= 2 for p in logs) and not list(out.glob("*.safetensors"))
        )
        reclaimer.start()
        try:
            spot = run_finetunes(cfg, work.backbone, out, log=print)
        finally:
            removed_at = reclaimer.finish()
        assert spot_nodes_settle_at(1) == 1
    assert [(r.task, r.status) for r in spot.rows] == [("ta", "ok"), ("tb", "ok")], [r.reason for r in spot.rows]
    retried = [r for r in spot.rows if r.started_at > removed_at]
    assert len(retried) == 1, "exactly the fine-tune of the removed node ran again, after the removal"
    assert retried[0].finished_at > removed_at and retried[0].steps == 150
    for r_calm, r_spot in zip(calm.rows, spot.rows, strict=True):
        same_tensors(Path(r_calm.adapter), Path(r_spot.adapter))
        assert (r_spot.final_loss, r_spot.val_loss) == (r_calm.final_loss, r_calm.val_loss)
    assert [json.loads(line)["step"] for line in logs[0].read_text().splitlines()][-1] == 150


# ------------------------------------------------------------------------------------------------
# (b) Tune sweep
# ------------------------------------------------------------------------------------------------


def sweep_cfg(work):
    # grace_period = every rung: ASHA stops nothing, so the sweep is deterministic
    return tiny_config(
        work.shards,
        TWO_TASKS,
        "sweep.ranks=[2,4]",
        "sweep.num_samples=2",
        "sweep.max_steps=40",
        "sweep.rung_steps=8",
        "sweep.grace_period=5",
        "sweep.datasets=[ta]",
        "sweep.cpus_per_trial=1",
        "finetune.log_every=2",
    )


def trial_reports(out: Path) -> dict[str, list[dict]]:
    return {
        d.name: [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.strip()]
        for d in out.glob("tune/*/sweep_trial_*")
        if (d / "result.json").is_file()
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_trial_lost_with_its_node_resumes_from_its_rung_checkpoint(work, tmp_path):
    """Two trials (1 CPU each) on two 1-CPU spot nodes; once both have a rung checkpoint, one node is
    removed. The lost trial restarts from its last checkpoint on the remaining node; every trial ends
    with the same validation loss as in the undisturbed sweep."""
    from diffscaler.train.sweep import run_sweep

    cfg = sweep_cfg(work)
    with spot_cluster(head_cpus=0, spot_nodes=2) as (cluster, (doomed, _)):
        calm = run_sweep(cfg, work.backbone, tmp_path / "calm", run_fid=False, log=print)
        assert [r.status for r in calm.trials] == ["completed", "completed"]

        out = tmp_path / "spot"

        def both_trials_have_a_rung() -> bool:  # (result.json is written late: the checkpoints tell)
            trials = list(out.glob("tune/*/sweep_trial_*"))
            return (
                len(trials) == 2
                and all(list(t.glob("checkpoint_*")) for t in trials)
                and not list(out.glob("tune/*/sweep_trial_*/checkpoint_000004"))
            )

        reclaimer = NodeReclaimer(cluster, doomed, both_trials_have_a_rung)
        reclaimer.start()
        try:
            spot = run_sweep(cfg, work.backbone, out, run_fid=False, log=print)
        finally:
            reclaimer.finish()
        assert spot_nodes_settle_at(1) == 1
    assert [(r.status, r.steps, r.error) for r in spot.trials] == [("completed", 40, "")] * 2
    restored = 0
    for name, reports in trial_reports(out).items():
        steps = [r["step"] for r in reports]
        assert steps == sorted(set(steps)) and steps[-1] == 40, (name, steps)  # no rung trained twice
        restored += reports[-1]["iterations_since_restore"] < reports[-1]["training_iteration"] == 5
    assert restored == 1, "the trial of the removed node continued from its rung checkpoint"
    by_config = {(r.rank, r.lr): r for r in calm.trials}
    assert sorted(by_config) == sorted((r.rank, r.lr) for r in spot.trials)  # the seeded search: same configs
    for r in spot.trials:
        c = by_config[(r.rank, r.lr)]
        assert (r.val_loss, r.best_val_loss, r.rungs) == (c.val_loss, c.best_val_loss, c.rungs)
    assert spot.best["ta"]["rank"] == calm.best["ta"]["rank"] and spot.best["ta"]["lr"] == calm.best["ta"]["lr"]
    same_tensors(Path(spot.best["ta"]["adapter"]), Path(calm.best["ta"]["adapter"]))


# ------------------------------------------------------------------------------------------------
# (c) evaluation
# ------------------------------------------------------------------------------------------------


def raylet_pid(node) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def parent_pid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_fid_actor_lost_with_its_node_is_replaced_on_a_new_node_and_the_score_is_the_same(tmp_path):
    """Two FID actors (1 CPU each) on two 1-CPU spot nodes; when a chunk is submitted to the actor on the
    doomed node, that node is removed and a new spot node started. The pool replaces the actor (it can only
    start on the new node), retries the chunk, and the scores equal the undisturbed evaluation's."""
    from diffscaler.eval import FidEvaluator, request_for_task
    from tests.support.evaluation import setup_project

    project = setup_project(tmp_path / "project")
    base = project["cfg"]
    cfg = replace(base, eval=replace(base.eval, num_samples=48, batch_size=4, cpus_per_actor=1.0, num_actors=2))
    requests = [request_for_task(cfg, "dots", project["adapter"], label="affiner"), request_for_task(cfg, None)]
    with spot_cluster(head_cpus=0, spot_nodes=2) as (cluster, (doomed, _)):
        with FidEvaluator(project["backbone"], cfg, num_actors=2) as ev:
            calm = ev.evaluate(requests)
        assert [r.status for r in calm] == ["ok", "ok"]

        with FidEvaluator(project["backbone"], cfg, num_actors=2) as ev:
            doomed_raylet = raylet_pid(doomed)
            on_doomed = threading.Event()
            events: list[dict] = []

            def progress(event: dict) -> None:
                events.append(event)
                if (
                    event["event"] == "submitted"
                    and not on_doomed.is_set()
                    and parent_pid(ev.actor_pid(event["slot"])) == doomed_raylet
                ):
                    on_doomed.set()  # (an actor's worker process is a child of its node's raylet)

            reclaimer = NodeReclaimer(cluster, doomed, on_doomed.is_set, after=lambda: add_replacement_node(cluster))
            reclaimer.start()
            try:
                spot = ev.evaluate(requests, progress=progress)
            finally:
                reclaimer.finish()
            replaced = ev.actors_replaced
        assert spot_nodes_settle_at(2) == 2  # the survivor and the new node
    print("retries:", [(e["attempt"], e["reason"]) for e in events if e["event"] == "retry"])  # shown on a failure
    assert [r.status for r in spot] == ["ok", "ok"], [r.error for r in spot]
    assert replaced >= 1 and [e["event"] for e in events].count("retry") >= 1
    for a, b in zip(calm, spot, strict=True):
        assert (b.num_generated, b.num_reference) == (a.num_generated, a.num_reference)
        assert b.fid == pytest.approx(a.fid, rel=1e-6, abs=0), (a.fid, b.fid)
        assert b.kid_mean == pytest.approx(a.kid_mean, rel=1e-6, abs=1e-9)


# ------------------------------------------------------------------------------------------------
# (d) pretraining
# ------------------------------------------------------------------------------------------------


def ray_recorded_a_checkpoint(run_dir: Path) -> bool:
    """True once Ray Train's own snapshot names a checkpoint: the one a restarted gang resumes from. A checkpoint
    folder on disk is not enough: a node lost after the folder is persisted but before the controller records
    it restarts the gang from scratch (CI saw exactly that). Not `resume_checkpoint`: on a snapshot caught
    mid-write it falls back to the highest folder on disk, the very signal this replaces."""
    try:
        snapshot = json.loads((run_dir / RAY_SNAPSHOT).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return False  # not written yet, or caught mid-write
    return isinstance(snapshot, dict) and snapshot.get("latest_checkpoint_result") is not None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pretraining_restarts_from_its_checkpoint_when_a_workers_node_is_lost(tmp_path, monkeypatch):
    """Two Ray Train workers (1 CPU each) on a 1-CPU head and a 1-CPU spot node; after the step-4 checkpoint
    the spot node is removed and a new one started. Train restarts the gang from the last checkpoint and the
    run ends at step 12; the steps trained again reproduce the lost ones' losses bit for bit (the kill-worker
    test's criterion)."""
    from diffscaler.train.pretrain import run_pretrain
    from tests.support.pretrain import COLORS, events, make_pretrain_shards, read_jsonl, tiny_cfg

    # waiting for the gang's placement group while the new node starts is not a failure
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    shards = make_pretrain_shards(tmp_path / "data", COLORS)
    cfg = tiny_cfg(tmp_path, "spot", "pretrain.steps=12", "pretrain.max_failures=2", "pretrain.sample_every=0")
    run_dir = tmp_path / "ray" / "spot"
    with spot_cluster(head_cpus=1, spot_nodes=1) as (cluster, (doomed,)):
        reclaimer = NodeReclaimer(
            cluster,
            doomed,
            lambda: ray_recorded_a_checkpoint(run_dir),
            after=lambda: add_replacement_node(cluster),
        )
        reclaimer.start()
        try:
            result = run_pretrain(cfg, tmp_path / "out", shards)
        finally:
            reclaimer.finish()
        assert spot_nodes_settle_at(1) == 1
    assert result.step == 12
    out = tmp_path / "out"
    resume = events(out, "resume")
    assert len(resume) >= 1 and resume[0]["step"] in (4, 8), resume
    metrics = {m["step"]: m for m in read_jsonl(out / "metrics.jsonl")}
    assert sorted(metrics) == list(range(1, 13))
    repeated = [d for r in resume for d in r["discarded"]]
    for before in repeated:
        assert metrics[before["step"]]["loss"] == before["loss"], before  # bit-exact resume


# ------------------------------------------------------------------------------------------------
# The autoscaler (fake multi-node provider: real local nodes of the declared types)
# ------------------------------------------------------------------------------------------------


def autoscaling_config(head_cpus: float, spot_cpus: float = 1, max_workers: int = 2) -> dict:
    """A cluster.yaml-style config: the head, and one spot node type scaling from zero."""
    return {
        "cluster_name": "spot-test",
        "max_workers": max_workers,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            "cpu_spot_1x": {
                "resources": {"CPU": spot_cpus, "spot": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_workers,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@pytest.fixture
def fake_autoscaler(monkeypatch):
    # read by the autoscaler's monitor process, which the head starts with this environment
    monkeypatch.setenv("RAY_FAKE_CLUSTER", "1")
    monkeypatch.setenv("AUTOSCALER_UPDATE_INTERVAL_S", "1")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_autoscaler_starts_spot_nodes_from_zero_for_the_finetunes_and_refuses_what_no_type_holds(
    work, tmp_path, fake_autoscaler
):
    """Head 1 CPU, spot type 1 CPU (0 to 2 nodes). A fine-tune request of 2 CPUs fits no node type: refused up
    front, before any node starts. Four 1-CPU fine-tunes: one fits the head, the pending ones make the
    autoscaler start spot nodes; all finish."""
    from diffscaler.train.finetune import run_finetunes

    with spot_cluster(head_cpus=1, autoscaling=autoscaling_config(head_cpus=1)):
        assert alive_spot_nodes() == []
        too_big = tiny_config(work.shards, TWO_TASKS, "finetune.cpus_per_task=2")
        t0 = time.perf_counter()
        with pytest.raises(FinetuneInputError, match=r"needs 2 CPU and 0 GPU, but no node has that"):
            run_finetunes(too_big, work.backbone, tmp_path / "refused", log=print)
        assert time.perf_counter() - t0 < 30 and alive_spot_nodes() == []  # up front: nothing was started
        assert not (tmp_path / "refused" / "summary.json").exists()

        cfg = tiny_config(
            work.shards, TWO_TASKS, "finetune.steps=60", "finetune.cpus_per_task=1", "finetune.methods=[affiner,lora]"
        )
        summary = run_finetunes(cfg, work.backbone, tmp_path / "adapters", log=print)
        spot_nodes = alive_spot_nodes()
    assert [r.status for r in summary.rows] == ["ok"] * 4, [r.reason for r in summary.rows]
    assert 1 <= len(spot_nodes) <= 2, "the autoscaler started nodes of the declared spot type"
    assert all(n["Resources"]["CPU"] == 1 for n in spot_nodes)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_autoscaler_from_a_zero_cpu_head_starts_a_spot_node_for_a_finetune(work, tmp_path, fake_autoscaler):
    """cluster.yaml's shape: the head takes no work (CPU 0), every worker type scales from zero."""
    from diffscaler.train.finetune import run_finetunes

    with spot_cluster(head_cpus=0, autoscaling=autoscaling_config(head_cpus=0)):
        assert alive_spot_nodes() == []
        cfg = tiny_config(work.shards, "[{name: ta, conditional: true}]", "finetune.cpus_per_task=1")
        summary = run_finetunes(cfg, work.backbone, tmp_path / "adapters", log=print)
        spot_nodes = alive_spot_nodes()
    assert [r.status for r in summary.rows] == ["ok"] and len(spot_nodes) == 1
