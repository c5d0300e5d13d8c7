"""The one line of an exception worth showing a user.

A Ray failure's text starts with generic lines (the task, the worker, a traceback) and ends with the
user's own error; the last non-empty line is the one that names the cause. A full disk is named as
such, with the file whose write failed, however deep in a chain (a Ray task's error) it sits.
"""

from __future__ import annotations

import errno
import os

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full file system, or the user's quota on it


def no_space_message(err: BaseException) -> str | None:
    """The text "no space left on device at PATH" (or "disk quota exceeded at PATH") when `err`, its cause, its
    context or a Ray task error's `cause` is a full-disk OSError; None otherwise."""
    stack, seen = [err], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
            return f"{what} at {e.filename}" if e.filename else what
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def naming_the_file(err: OSError, path: str | os.PathLike) -> OSError:
    """A full-disk `err` raised by a write call (which names no file) as one that names `path`."""
    if err.errno not in NO_SPACE or err.filename:
        return err
    return OSError(err.errno, os.strerror(err.errno), str(path))


def last_error_line(err: BaseException, limit: int = 400) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:limit]


def rust_os_error(err: Exception, path: str | os.PathLike) -> OSError | None:
    """The OSError that a Rust-backed writer (safetensors) reports only in its text, "... (os error 28)", as an
    OSError naming `path`; None when the text holds none."""
    import re

    found = re.search(r"\(os error (\d+)\)", str(err))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))
