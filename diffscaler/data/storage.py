"""Paths that are local folders or fsspec URLs (`s3://`, `gs://`, `memory://`, `file://`), one API.

Writes are atomic: bytes go to a hidden temp name beside the target, then a rename. On object stores
the rename is a copy + delete, and a reader never sees a partial object either way.
"""

from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.core import url_to_fs

from diffscaler.errors import naming_the_file

TEMP_MARK = ".tmp-"  # temp files are `.<name>.tmp-<random>`; `shards check` reports leftovers


def join(base: str, *names: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *names]) if "://" in base else os.path.join(base, *names)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, path inside it) for a local path or any fsspec URL."""
    return url_to_fs(str(url))


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    return fs.cat_file(path)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def list_names(url: str) -> list[str]:
    """Base names of the files directly inside folder `url` (empty if it does not exist)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def write_bytes_atomic(url: str, data: bytes) -> None:
    fs, path = filesystem(url)
    parent, _, name = path.rstrip("/").rpartition("/")
    fs.makedirs(parent or "/", exist_ok=True)
    tmp = f"{parent}/.{name}{TEMP_MARK}{uuid.uuid4().hex[:12]}"
    try:
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    except BaseException as err:
        if fs.exists(tmp):
            fs.rm(tmp)
        if isinstance(err, OSError) and (named := naming_the_file(err, url)) is not err:
            raise named from None  # a full disk, naming the file (the write call's error names none)
        raise


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path)
