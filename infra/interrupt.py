"""Ctrl-C and SIGTERM that lose nothing: a stop is *requested* and taken at the next safe point.

A signal landing in the middle of an optimiser step or of an attack batch leaves the state half-updated; saving
that state makes a resumed run differ from an uninterrupted one. :func:`stop_at_safe_points` turns the first
SIGINT / SIGTERM into a request that the loop honours between two units of work (a :class:`StopRequest` is true
once a stop was asked for);
a second Ctrl-C stops at once (nothing is saved then beyond what is already on disk). Whoever stops raises
:class:`Interrupted` with an exact account of what was kept, which the CLI prints.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import Any, Iterator

log = logging.getLogger("robust_jem")


class Interrupted(KeyboardInterrupt):
    """A run stopped by a signal at a safe point. ``kept`` says what is on disk and how to continue."""

    def __init__(self, kept: str) -> None:
        super().__init__(kept)
        self.kept = kept


class StopRequest:
    """Whether a stop was requested (by the signal handler), and by which signal."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __bool__(self) -> bool:
        return self.requested


@contextlib.contextmanager
def stop_at_safe_points() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set the yielded request instead of raising; a second SIGINT raises
    :class:`KeyboardInterrupt` at once. Outside the main thread (no signals there) the request never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt("second interrupt: stopping at once")
        request.signum = signum
        log.warning("%s received: stopping after the current step (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (a scheduler's polite kill) like Ctrl-C inside the block, so the same clean-up runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
