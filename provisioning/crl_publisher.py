"""The EST worker's CRL publisher: a supersede reaches the published CRL within a second.

Every renewal, recovery and bootstrap re-enrollment revokes the device's older
certificates in the registry. Publishing the CRL inside the request would make
each answer wait for the Device CA's signature and, worse, for the next second
(a CRL's thisUpdate must go up, and it has one-second resolution), so a burst
of renewals would be answered one per second. Instead the request only asks
(:meth:`CRLPublisher.request`), and one thread per worker publishes: requests
that arrive while it signs are served by its next CRL, which reads the
registry afresh under the CRL's lock (``pki.publish_crl``). Several workers
and ``device-pki`` publish in turn on that lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager

from device_agent.errors import IdentityError

from .registry import Registry

log = logging.getLogger(__name__)

Publish = Callable[[Registry], object]


class CRLPublisher:
    """One thread that publishes when asked, with its own registry connection.

    A failed publication is logged and tried again after a growing pause (up
    to ``max_pause`` seconds); the refresh timer republishes in any case.
    """

    def __init__(self, open_registry: Callable[[], AbstractContextManager[Registry]],
                 publish: Publish, on_error: Callable[[str], None] | None = None,
                 max_pause: float = 60.0) -> None:
        self._open = open_registry
        self._publish = publish
        self._on_error = on_error or (lambda text: log.error("CRL not published: %s", text))
        self._max_pause = max_pause
        self._lock = threading.Lock()
        self._pending = False
        self._wanted = threading.Event()
        self._stopping = threading.Event()
        self.published = 0
        self._thread = threading.Thread(target=self._run, name="crl-publisher", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Publish soon; cheap, never blocks."""
        with self._lock:
            self._pending = True
        self._wanted.set()

    def close(self, timeout: float = 10.0) -> None:
        """Publish what was asked for, then stop."""
        self._stopping.set()
        self._wanted.set()
        self._thread.join(timeout)

    def _take(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, False
        return pending

    def _run(self) -> None:
        failures = 0
        try:
            with self._open() as registry:
                while True:
                    self._wanted.wait()
                    self._wanted.clear()
                    if not self._take():
                        if self._stopping.is_set():
                            return
                        continue
                    try:
                        self._publish(registry)
                    except IdentityError as exc:
                        failures += 1
                        self._on_error(str(exc))
                        self.request()
                        if self._stopping.wait(min(self._max_pause, 2.0 ** failures)):
                            return
                        continue
                    failures = 0
                    self.published += 1
        except IdentityError as exc:
            self._on_error(f"cannot open the registry: {exc}")
