"""One program at a time per output folder: an exclusive lock file DIR/.lock.

    with run_lock(out_dir, program="ray_jobs.pretrain"):
        ...   # a second program on the same folder raises RunFolderError naming this one

The lock is `fcntl.flock` on DIR/.lock, which the kernel drops when the holder dies however it
dies (SIGKILL, OOM, a lost node's NFS lease), so a stale lock never blocks forever. The file holds
JSON {host, pid, started_at, program} for the refusal message. A file left behind by a holder that
died is taken over, with a message. On a file system without flock (some FUSE mounts) the JSON
alone decides: a holder on this host whose pid is gone is stale; one on another host is refused.

Nested locks on the same folder in one process are refused too (flock locks belong to the open
file, not the process), which is what we want: two pipelines in one process would mix up as well.
So is a run in a folder inside a held one, or around one (up to NESTED_DEPTH levels below): a
`ray_jobs.finetune --out X/adapters` while a pipeline runs in X would replace its adapters.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffscaler.errors import naming_the_file, no_space_message

LOCK_NAME = ".lock"
NESTED_DEPTH = 2  # levels below a folder searched for a held lock (X/adapters, X/sweep/tune, ...)


class RunFolderError(RuntimeError):
    """The output folder cannot be used: it is a file, cannot be created, or another run holds it."""


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """`path` as an absolute folder path, or RunFolderError when it exists and is not a folder."""
    p = Path(path).expanduser().resolve()
    for parent in (p, *p.parents):  # a file anywhere up the path makes mkdir fail with a bare OSError
        if parent.exists():
            if not parent.is_dir():
                what = "is" if parent == p else f"is inside {parent}, which is"
                raise RunFolderError(f"{flag} {path}: {what} a file, not a folder; give a folder path")
            break
    return p


def _holder_text(info: dict[str, Any]) -> str:
    if not info:
        return "another process (its details are not written yet)"
    return (
        f"{info.get('program', '?')} (host {info.get('host', '?')}, pid {info.get('pid', '?')}, "
        f"started {info.get('started_at', '?')})"
    )


def _read_info(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 65536):
        raw += chunk
    try:
        info = json.loads(raw.decode() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _flock(fd: int) -> bool | None:
    """True: locked; False: another open file holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


class RunLock:
    """Holds DIR/.lock from `acquire()` (or `with`) to `release()`; see the module docstring."""

    def __init__(
        self, out_dir: str | Path, program: str = "", *, flag: str = "--out", log: Callable[[str], None] | None = None
    ):
        self.out_dir, self.flag = out_dir, flag
        self.program = program or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.root = check_out_dir(out_dir, flag)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # folders acquire() made, deepest first: removed on release if still empty

    def acquire(self) -> Path:
        """Create the folder and take the lock; returns the absolute folder. Raises RunFolderError."""
        self._created = [d for d in (self.root, *self.root.parents) if not d.exists()]
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(f"{self.flag} {self.out_dir}: cannot create the folder: {err}") from None
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "program": self.program,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            self._fd = _acquire(self.path, me, self.out_dir, self.flag, self.log)
        except RunFolderError:
            self._remove_created()
            raise
        # after taking ours: of two runs nested in each other that start together, neither goes on
        if held := _held_nearby(self.root):
            other, info = held
            self.release()
            where = "inside" if other in self.root.parents else "around"
            raise RunFolderError(
                f"{self.flag} {self.out_dir} is {where} {other}, which is in use by {_holder_text(info)}: the two "
                "runs would mix up their files; wait for it to finish or stop it, or choose another folder"
            )
        return self.root

    def release(self) -> None:
        """Drop the lock; the folders acquire() created go too when nothing was written in them (a run
        refused by a neighbour's lock or by bad input leaves no empty folders behind)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink()  # while still locked: an opener that raced us finds the inode gone and retries
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first; rmdir refuses a folder with anything in it
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> Path:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _held_nearby(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """(folder, holder) of a lock held on a folder above `root`, or up to NESTED_DEPTH levels below it."""
    below = [root.glob("/".join(["*"] * depth + [LOCK_NAME])) for depth in range(1, NESTED_DEPTH + 1)]
    candidates = [parent / LOCK_NAME for parent in root.parents] + [p for found in below for p in found]
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # none there (the common case), or unreadable: not ours to judge
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return path.parent, _read_info(fd)
            except OSError:  # no flock on this file system: the recorded holder decides, on this host
                info = _read_info(fd)
                if info.get("host") == socket.gethostname() and _pid_alive(info.get("pid")):
                    return path.parent, info
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)  # a stale file of a run that died
        finally:
            os.close(fd)
    return None


def run_lock(
    out_dir: str | Path, program: str = "", *, flag: str = "--out", log: Callable[[str], None] | None = None
) -> RunLock:
    """`with run_lock(DIR, "ray_jobs.x"):` holds DIR/.lock for the block (RunFolderError if it cannot)."""
    return RunLock(out_dir, program, flag=flag, log=log)


def _acquire(path: Path, me: dict[str, Any], out_dir: str | Path, flag: str, log: Callable[[str], None]) -> int:
    for _attempt in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise RunFolderError(f"{flag} {out_dir}: cannot create the lock file {path}: {err}") from None
        locked = _flock(fd)
        # The holder before us may have unlinked the file between our open and our flock; then what
        # we opened is a name nobody else can see: start over on the current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        old = _read_info(fd)
        if locked is False:
            os.close(fd)
            raise RunFolderError(
                f"{flag} {out_dir} is in use by {_holder_text(old)}; wait for it to finish or stop it, "
                "or choose another folder"
            )
        if locked is None and old:  # no kernel lock here: decide by the recorded holder
            if old.get("host") != me["host"]:
                os.close(fd)
                raise RunFolderError(
                    f"{flag} {out_dir} is in use by {_holder_text(old)} (this file system has no flock, so it "
                    f"cannot be checked from here); if that run is gone, delete {path}"
                )
            if _pid_alive(old.get("pid")):
                os.close(fd)
                raise RunFolderError(
                    f"{flag} {out_dir} is in use by {_holder_text(old)}; wait or choose another folder"
                )
        if old:
            log(f"{flag} {out_dir}: taking over the stale lock of {_holder_text(old)}, which is no longer running")
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        except OSError as err:  # a full disk, typically: the folder cannot take a run's files either
            path.unlink(missing_ok=True)  # ours (we hold its flock): leave no lock file behind
            os.close(fd)
            why = no_space_message(naming_the_file(err, path)) or str(err)
            raise RunFolderError(f"{flag} {out_dir}: cannot write the lock file: {why}") from None
        return fd
    raise RunFolderError(f"{flag} {out_dir}: could not take {path} (it keeps being replaced)")
