"""A real local cluster (`ray start --head` on loopback) and the real `ray job submit` client run the
micro pipeline as a job, the way a user runs it on cluster.yaml's cluster.

The cluster lives in its own temp folder; afterwards this test stops exactly the processes it started
(the `ray start` process tree and anything naming its temp folder) - never `ray stop`, which would
kill every Ray cluster on the machine, other tests' included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.cluster import cluster_processes, free_ports
from tests.support.pipeline import ALL_STAGES, check_full_run, micro_config

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
EXCLUDES = [".git", ".venv", "shards", "runs"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_cluster(head: subprocess.Popen, temp_dir: str) -> set[int]:
    """SIGTERM, then SIGKILL, this cluster's processes only; returns any still alive (should be none)."""
    targets = cluster_processes(head.pid, temp_dir)
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            head.poll()  # reap our own child
            targets = {p for p in targets if alive(p)} | cluster_processes(head.pid, temp_dir)
            if not targets:
                break
            time.sleep(0.5)
    head.poll()
    return {p for p in targets if alive(p)} | cluster_processes(head.pid, temp_dir)


def wait_for_job_server(url: str, head: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"the job server at {url} did not come up in {timeout:.0f} s: {log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_runs_the_pipeline_on_a_local_cluster(tmp_path):
    # A short temp folder: Ray's unix sockets live under it and their paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="ds-ray-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, metrics, env_agent, node_mgr, obj_mgr = free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)  # the job must find its cluster through --address only
    log = tmp_path / "ray-start.log"
    with open(log, "w") as log_file:
        head = subprocess.Popen(
            [
                str(VENV_BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(gcs),
                "--temp-dir",
                temp_dir,
                "--num-cpus",
                "2",
                "--num-gpus",
                "0",
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(dash),
                "--ray-client-server-port",
                str(client),
                "--dashboard-agent-listen-port",
                str(agent),
                "--dashboard-agent-grpc-port",
                str(agent_grpc),
                "--metrics-export-port",
                str(metrics),
                "--runtime-env-agent-port",
                str(env_agent),
                "--node-manager-port",
                str(node_mgr),
                "--object-manager-port",
                str(obj_mgr),
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "run"
    submission = f"pipeline-test-{os.getpid()}"
    try:
        wait_for_job_server(address, head, log)
        cfg = micro_config(tmp_path, ALL_STAGES, finetune={"methods": ["affiner", "lora"]})
        submit = subprocess.run(
            [
                str(VENV_BIN / "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--submission-id",
                submission,
                "--working-dir",
                str(ROOT),
                "--runtime-env-json",
                json.dumps({"excludes": EXCLUDES}),
                "--",
                "python",
                "-m",
                "ray_jobs.pipeline",
                "--config",
                str(cfg),
                "--out",
                str(out),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=1500,
        )
        from ray.job_submission import JobStatus, JobSubmissionClient

        logs = submit.stdout + submit.stderr
        info = JobSubmissionClient(address).get_job_info(submission)  # the job server's own record
        assert info.status == JobStatus.SUCCEEDED, (info.status, info.message, logs[-5000:])
        assert info.entrypoint.startswith("python -m ray_jobs.pipeline")
        assert submit.returncode == 0, logs[-5000:]
        assert "[pipeline] (6/6) report: done" in logs  # the job's progress lines reach the client
        check_full_run(out)
    finally:
        left = stop_cluster(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the test cluster still alive: {sorted(left)}"
