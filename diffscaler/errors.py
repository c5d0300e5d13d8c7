"""The one line of an exception worth showing a user.

A Ray failure's text starts with generic lines (the task, the worker, a traceback) and ends with the
user's own error; the last non-empty line is the one that names the cause.
"""

from __future__ import annotations


def last_error_line(err: BaseException, limit: int = 400) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:limit]
