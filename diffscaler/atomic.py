"""Atomic local file writes: a temporary name beside the target, then one rename, so a reader (or a rerun
after a crash) finds the old file or the new one, never half of one. Remote URLs (s3://, gs://) go
through `diffscaler.data.storage.write_bytes_atomic`.

    with atomic_path("runs/x/grid.png") as tmp:   # tmp keeps the suffix: writers that pick the format by it
        save_png(grid, tmp)
    write_text_atomic("runs/x/fid.json", text)
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from diffscaler.errors import naming_the_file


def process_umask() -> int:
    """This process's umask (Linux reads it from /proc; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_umask_mode(path: str | os.PathLike) -> None:
    """Give a file we wrote the mode `open()` would have (0666 minus the umask): safetensors creates its
    files 0600, so on a shared file system other users could read a run's JSONs but not its weights."""
    os.chmod(path, 0o666 & ~process_umask())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write; renamed onto `path` when the block ends, removed if it raises.
    The file gets the process's umask mode, whatever mode its writer created it with."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and thread: two writers of the same file (a shared cache) never share a temporary name
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        with_umask_mode(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a full disk: name the file being written (the write call's error names none)
        if (named := naming_the_file(err, path)) is not err:
            raise named from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def copy_file_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
