"""A daemon thread calling a function every ``period`` seconds until stopped: what the
simulator's samplers and watches run on."""

from __future__ import annotations

import threading
from collections.abc import Callable


class Periodic:
    """``tick()`` every ``period`` seconds on a daemon thread named ``name``, from start
    (or ``with``) until stop, which waits up to ``join_timeout`` seconds for the thread.

    ``first``, if given, runs on the thread as it starts, before the first wait (a
    sample at time zero, a baseline to measure from), unless already stopped. The
    first ``tick`` comes one ``period`` after the start. An exception in either ends
    the thread, reported by :func:`threading.excepthook`; the caller keeps what was
    recorded until then.
    """

    def __init__(self, name: str, period: float, tick: Callable[[], object], *,
                 first: Callable[[], object] | None = None,
                 join_timeout: float = 10.0) -> None:
        self.period = period
        self._tick, self._first, self._join_timeout = tick, first, join_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._join_timeout)

    def __enter__(self) -> Periodic:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        if self._first is not None and not self._stop.is_set():
            self._first()
        while not self._stop.wait(self.period):
            self._tick()
