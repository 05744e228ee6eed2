"""sd_notify without libsystemd: tell systemd we are ready, alive, reloading, stopping.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket
named by $NOTIFY_SOCKET (``@name`` is Linux's abstract namespace). Outside
systemd the variable is unset and every call does nothing, so the agent calls
these unconditionally. A failed send is logged and reported as False, never
raised: a hiccup talking to PID 1 must not take down the loop it reports on.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

SEND_TIMEOUT = 1.0


class Notifier:
    """The service side of systemd's notification protocol, read from the environment."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds within which systemd expects a ping, or None when it expects none.

        None also when $WATCHDOG_PID names another process: the watchdog is
        meant for the main process, not for a child that inherited the variable.
        """
        if not self._watchdog_usec or not self._watchdog_pid_matches():
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            log.warning("ignoring WATCHDOG_USEC=%r: not an integer", self._watchdog_usec)
            return None
        return usec / 1_000_000 if usec > 0 else None

    def ready(self) -> bool:
        """Start-up is complete: systemd starts dependents and the watchdog clock."""
        return self.notify("READY=1")

    def status(self, text: str) -> bool:
        """One line for ``systemctl status``."""
        return self.notify("STATUS=" + " ".join(text.split()))

    def watchdog(self) -> bool:
        """The agent is healthy; only the process systemd watches may say so."""
        if not self._watchdog_pid_matches():
            return False
        return self.notify("WATCHDOG=1")

    def stopping(self) -> bool:
        """Shutdown has begun, so a slow drain is not mistaken for a hang."""
        return self.notify("STOPPING=1")

    def reloading(self) -> bool:
        """Configuration reload has begun; call ``ready()`` when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time for the current start or stop (enrollment can be slow)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False if not sent."""
        if self._address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(message, self._address)
        except OSError as exc:
            log.warning("sd_notify %s failed: %s", assignments[0].partition("=")[0], exc)
            return False
        return True

    def _watchdog_pid_matches(self) -> bool:
        if not self._watchdog_pid:
            return True
        try:
            return int(self._watchdog_pid) == os.getpid()
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", self._watchdog_pid)
            return False


def _address(value: str) -> str | bytes | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value:
        log.warning("ignoring NOTIFY_SOCKET=%r: only AF_UNIX paths and @abstract names "
                    "are supported", value)
    return None
