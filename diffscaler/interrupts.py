"""Interrupts a long run survives cleanly: SIGTERM (`ray job stop`, a scheduler's kill) raises
KeyboardInterrupt like Ctrl-C, so the pipeline records "interrupted" and keeps finished stages; and Ctrl-C
keeps working after Ray Train and Tune, which install their own SIGINT handlers inside fit() and leave
them behind. Signal handlers can only be set from the main thread: elsewhere both are no-ops.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


class SigtermAsInterrupt:
    """`install()` makes SIGTERM raise KeyboardInterrupt; `restore()` puts back the handler found first.
    Install again after `ray.init`, which sets Ray's own SIGTERM handler (it aborts the process)."""

    def __init__(self) -> None:
        self._before: Any = None

    def install(self) -> None:
        if _in_main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
            self._before = self._before or previous

    def restore(self) -> None:
        if self._before is not None and _in_main_thread():
            signal.signal(signal.SIGTERM, self._before)
            self._before = None


@contextlib.contextmanager
def sigint_handler_kept() -> Iterator[None]:
    """The SIGINT handler of the caller is the one in force afterwards, whatever the body installed."""
    before = signal.getsignal(signal.SIGINT) if _in_main_thread() else None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)
