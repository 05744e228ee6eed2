"""The shipped CRL refresh, run the way its timer would, and a watch on the broker's CRL.

``device-crl-refresh.service`` (provisioning/data) is what keeps the broker's
copy of the Device CA's CRL inside its ``nextUpdate``: Mosquitto refuses every
client once it holds an expired CRL. The tests and the soak run the unit's own
``ExecStart`` lines (parsed here, so a change to the unit is what they test),
and :class:`CRLWatch` measures how long the broker held an expired CRL.
"""

from __future__ import annotations

import datetime as dt
import shlex
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from cryptography import x509

from .periodic import Periodic

BIN = Path(sys.executable).parent
UNIT = "device-crl-refresh.service"


def service_commands(pki_dir: Path, broker_dir: Path, bin_dir: Path = BIN) -> list[list[str]]:
    """The shipped unit's ExecStart lines, as this virtualenv would run them.

    ``${PKI_DIR}`` and ``${BROKER_DIR}`` (from /etc/default/device-crl-refresh on a
    host) are filled in; ``/usr/bin/<program>`` becomes ``bin_dir/<program>`` and the
    ``+`` prefix (full privileges) is dropped.
    """
    text = resources.files("provisioning").joinpath("data", UNIT).read_text()
    commands = []
    for line in text.splitlines():
        if line.startswith("ExecStart="):
            command = line.removeprefix("ExecStart=").lstrip("+")
            command = command.replace("${PKI_DIR}", str(pki_dir))
            argv = shlex.split(command.replace("${BROKER_DIR}", str(broker_dir)))
            if not argv[0].startswith("/usr/bin/"):
                raise ValueError(f"{UNIT}: ExecStart runs {argv[0]}, not a packaged program")
            commands.append([str(bin_dir / Path(argv[0]).name), *argv[1:]])
    if not commands:
        raise ValueError(f"{UNIT} has no ExecStart line")
    return commands


class CRLRefresher:
    """A thread running the unit's commands every ``period`` seconds, as the timer does.

    Like a oneshot unit, a failing command ends that run (the next runs on time); every
    run's outcome is counted and a failure's output kept for the report.
    """

    def __init__(self, commands: list[list[str]], period: float, log: Path) -> None:
        self.commands, self.period, self.log = commands, period, log
        self.runs = self.failures = 0
        self.last_failure = ""
        self._periodic = Periodic("crl-refresh", period, self._run, join_timeout=60)

    def __enter__(self) -> CRLRefresher:
        self._periodic.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._periodic.stop()

    def run_once(self) -> bool:
        with open(self.log, "a") as out:
            for argv in self.commands:
                result = subprocess.run(argv, stdout=out, stderr=subprocess.PIPE, text=True,
                                        timeout=60, check=False)
                if result.returncode != 0:
                    out.write(result.stderr)
                    self.last_failure = f"{Path(argv[0]).name} {argv[1]}: {result.stderr.strip()}"
                    return False
        return True

    def _run(self) -> None:
        ok = self.run_once()
        self.runs += 1
        self.failures += not ok


def next_update(path: Path) -> dt.datetime | None:
    """The CRL file's nextUpdate; None when it is missing or unreadable (mid-replace)."""
    try:
        return x509.load_pem_x509_crl(path.read_bytes()).next_update_utc
    except (OSError, ValueError):
        return None


def crl_probe(port: int, trust: Path, cert: Path, key: Path,
              timeout: float = 0.5) -> Callable[[], bool | None]:
    """A TLS handshake with a valid client certificate of the Device CA: True when the
    broker refuses it as expired (what Mosquitto says of every client once the CRL it
    loaded is past nextUpdate), False when it waits for our CONNECT, None when there
    is no broker to ask. It never sends CONNECT, so it takes no client's session."""
    context = ssl.create_default_context(cafile=str(trust))
    context.load_cert_chain(str(cert), str(key))

    def probe() -> bool | None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.settimeout(timeout)
                tls.recv(1)  # under TLS 1.3 the verdict on our certificate comes now
        except ssl.SSLError as exc:
            return "EXPIRED" in str(exc).upper()
        except TimeoutError:
            return False  # admitted: the broker waits for CONNECT
        except OSError:
            return None
        return False

    return probe


class CRLWatch:
    """How long the broker held an expired CRL (``lapsed_s``; ``windows`` those stretches,
    seconds on ``clock``): asked of the broker itself with ``probe`` when given, as it
    may hold an older CRL than its file (a reload that never happened); and how long
    its installed file was past nextUpdate while it ran (``file_lapsed_s``)."""

    def __init__(self, crl: Path, broker_running: Callable[[], bool],
                 clock: Callable[[], float], period: float = 0.5,
                 probe: Callable[[], bool | None] | None = None) -> None:
        self.crl, self.broker_running, self.clock, self.period = crl, broker_running, clock, period
        self.probe = probe
        self.lapsed_s = self.file_lapsed_s = 0.0
        self.windows: list[tuple[float, float]] = []
        self._last = time.monotonic()
        self._periodic = Periodic("crl-watch", period, self._look, first=self._start)

    def __enter__(self) -> CRLWatch:
        self._periodic.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._periodic.stop()

    def _start(self) -> None:
        self._last = time.monotonic()

    def _look(self) -> None:
        last, now = self._last, time.monotonic()
        expires = next_update(self.crl)
        file_lapsed = (expires is not None and self.broker_running()
                       and dt.datetime.now(dt.UTC) > expires)
        self.file_lapsed_s += (now - last) if file_lapsed else 0.0
        held = self.probe() if self.probe is not None else file_lapsed
        if held:
            self.lapsed_s += now - last
            at = self.clock()
            if self.windows and at - self.windows[-1][1] <= 3 * self.period:
                self.windows[-1] = (self.windows[-1][0], at)
            else:
                self.windows.append((at - (now - last), at))
        self._last = now
