"""One program per output folder (DIR/.lock): a second one refuses naming the holder; a dead one's lock is taken over.

No Ray: every refusal happens before a program connects.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffscaler import runlock
from diffscaler.runlock import LOCK_NAME, RunFolderError, RunLock

ROOT = Path(__file__).resolve().parents[1]
HOLD = (
    "import sys; from diffscaler.runlock import RunLock; RunLock(sys.argv[1], 'holder-program').acquire(); "
    "print('locked', flush=True); sys.stdin.read()"
)


@pytest.fixture
def held(tmp_path):
    """A folder whose lock another process holds; yields (folder, that process)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_run_refuses_naming_the_holder_and_a_killed_holder_is_taken_over(held):
    out, proc = held
    with pytest.raises(RunFolderError) as err:
        RunLock(out, "second").acquire()
    msg = str(err.value)
    assert "holder-program" in msg and f"pid {proc.pid}" in msg and socket.gethostname() in msg
    assert "started 20" in msg  # the holder's start time

    proc.kill()  # SIGKILL: no clean-up ran, the JSON is left behind; the kernel dropped the flock
    proc.wait(timeout=30)
    assert (out / LOCK_NAME).is_file()
    said: list[str] = []
    with RunLock(out, "third", log=said.append):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(RunFolderError, match="third"):  # the same folder twice in one process too
            RunLock(out, "fourth").acquire()
    assert len(said) == 1 and "stale" in said[0] and f"pid {proc.pid}" in said[0]
    assert not (out / LOCK_NAME).exists()  # released: nothing left behind


def test_a_folder_inside_or_around_a_held_one_is_refused_and_a_stale_one_is_not(held, tmp_path):
    """`ray_jobs.finetune --out X/adapters` while a pipeline holds X would replace its adapters; so would a
    pipeline on X while a program holds X/adapters. A lock file left by a run that died blocks neither."""
    out, proc = held
    for inner in (out / "adapters", out / "sweep" / "tune"):
        with pytest.raises(RunFolderError, match="inside") as err:
            RunLock(inner, "inner").acquire()
        assert "holder-program" in str(err.value) and f"pid {proc.pid}" in str(err.value)
        assert not (inner / LOCK_NAME).exists()  # refused: nothing of ours left behind
    with pytest.raises(RunFolderError, match="around") as err:
        RunLock(tmp_path, "outer").acquire()  # the folder that holds X
    assert str(out) in str(err.value) and f"pid {proc.pid}" in str(err.value)
    with RunLock(tmp_path / "elsewhere", "sibling"):  # beside it: no conflict
        pass

    proc.kill()  # its X/.lock stays behind, unlocked
    proc.wait(timeout=30)
    assert (out / LOCK_NAME).is_file()
    with RunLock(out / "adapters", "inner"):
        pass
    with RunLock(tmp_path, "outer"):
        pass


def test_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    stale = {"host": socket.gethostname(), "pid": pid, "started_at": "2026-01-01T00:00:00", "program": "old"}
    (out / LOCK_NAME).write_text(json.dumps(stale))
    said: list[str] = []
    with RunLock(out, "new", log=said.append):
        pass
    assert len(said) == 1 and f"pid {pid}" in said[0] and "no longer running" in said[0]


def test_without_flock_the_recorded_holder_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "_flock", lambda fd: None)  # a file system without flock
    out = tmp_path / "run"
    out.mkdir()

    def write(**holder):
        (out / LOCK_NAME).write_text(json.dumps({"started_at": "2026-01-01T00:00:00", "program": "p", **holder}))

    write(host=socket.gethostname(), pid=os.getppid())  # alive on this host
    with pytest.raises(RunFolderError, match=f"pid {os.getppid()}"):
        RunLock(out).acquire()
    write(host="some-other-node", pid=1)  # cannot be checked from here
    with pytest.raises(RunFolderError, match="some-other-node.*delete"):
        RunLock(out).acquire()
    write(host=socket.gethostname(), pid=dead_pid())
    said: list[str] = []
    with RunLock(out, log=said.append):
        pass
    assert said and "stale" in said[0]


def test_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunLock(f)
    with pytest.raises(RunFolderError, match="inside .*file, which is a file"):
        RunLock(f / "sub")


def _config(tmp_path: Path) -> str:
    path = tmp_path / "c.yaml"
    path.write_text("pretrain:\n  steps: 2\n")
    return str(path)


PROGRAMS = {
    "ray_jobs.pipeline": lambda cfg, out: ["--config", cfg, "--out", out],
    "ray_jobs.pretrain": lambda cfg, out: ["--config", cfg, "--out", out],
    "ray_jobs.finetune": lambda cfg, out: ["--config", cfg, "--backbone", "b.safetensors", "--out", out],
    "ray_jobs.sweep": lambda cfg, out: ["--config", cfg, "--backbone", "b.safetensors", "--out", out],
    "ray_jobs.evaluate": lambda cfg, out: [
        "--config",
        cfg,
        "--backbone",
        "b.safetensors",
        "--include-backbone",
        "--out",
        out,
    ],
}


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_every_program_refuses_a_folder_in_use_before_anything_starts(program, held, tmp_path, capsys, refuse_ray):
    import importlib

    out, proc = held
    main = importlib.import_module(program).main
    t0 = time.perf_counter()
    assert main(PROGRAMS[program](_config(tmp_path), str(out))) == 2
    err = capsys.readouterr().err
    assert "in use by holder-program" in err and f"pid {proc.pid}" in err, err
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("program", list(PROGRAMS))
def test_every_program_refuses_an_out_that_is_a_file(program, tmp_path, capsys, refuse_ray):
    import importlib

    f = tmp_path / "out.txt"
    f.write_text("not a folder")
    assert importlib.import_module(program).main(PROGRAMS[program](_config(tmp_path), str(f))) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert f.read_text() == "not a folder"


def test_the_shards_programs_lock_their_folders_and_a_refused_run_leaves_no_folders(held, tmp_path, capsys, refuse_ray):
    """`ray_jobs.shards` and `diffscaler shards make` into a run folder in use (a pipeline's shards) are refused,
    naming the holder, and leave nothing behind: they used to rewrite the running pipeline's shards."""
    from diffscaler.cli import main as cli_main
    from ray_jobs.shards import main as shards_main
    from tests.support.pipeline import make_image_folders

    out, proc = held
    src = make_image_folders(tmp_path / "src")["red"]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  pretrain_source: folder:{src}\n  targets: []\n")
    assert shards_main(["--config", str(cfg), f"data.shards_root={out / 'shards'}"]) == 2
    assert cli_main(["shards", "make", "--source", f"folder:{src}", "--out", str(out / "shards" / "red")]) == 2
    err = capsys.readouterr().err
    assert err.count("in use by holder-program") == 2 and f"pid {proc.pid}" in err, err
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no shards/, no shards/red/


def test_cli_outputs_under_a_file_are_clear_errors(tmp_path, capsys):
    from diffscaler.cli import main as cli_main
    from tests.support.pipeline import make_image_folders

    src = make_image_folders(tmp_path / "src")["red"]
    f = tmp_path / "file"
    f.write_text("x")
    assert cli_main(["shards", "make", "--source", f"folder:{src}", "--out", str(f)]) == 2
    assert (
        cli_main(
            [
                "init-backbone",
                "--model",
                "DiT-T/8",
                "--input-size",
                "16",
                "--in-channels",
                "3",
                "--num-classes",
                "2",
                "--out",
                str(f / "x.safetensors"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert f"--out {f}: is a file, not a folder" in err and f"--out {f / 'x.safetensors'}: {f} is a file" in err, err
    assert f.read_text() == "x"
