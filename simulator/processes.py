"""Real processes on 127.0.0.1 for tests, the demo and the fleet simulator.

Each component is a context manager that starts the real program on free
ports in its own directory, waits until it answers, and on exit terminates
it, then kills it if it lingers. A missing program is an error that names
the Debian package to install, never a silent skip.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.errors import IdentityError

if TYPE_CHECKING:
    from .manufacturer import Manufacturer


def debian_packages() -> dict[str, list[str]]:
    """Each Debian package scripts/setup.sh installs, with what of it the project calls."""
    text = resources.files("simulator").joinpath("debian-packages.txt").read_text()
    packages: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            packages[fields[0]] = fields[1:]
    return packages


def package_of(item: str) -> str:
    """The Debian package that provides ``item`` (a program, or ``lib:FILE``)."""
    for package, items in debian_packages().items():
        if item in items:
            return package
    raise LookupError(f"{item} is in no package of simulator/debian-packages.txt")


class ComponentError(IdentityError):
    """A real component could not be found, started or made ready."""


# Where Debian keeps the programs of a versioned server, off PATH (postgresql-NN's initdb,
# pg_ctl): looked at first, so that they match each other; the newest version wins.
VERSIONED_BIN = ("/usr/lib/postgresql/*/bin",)


def _versioned(program: str) -> str | None:
    def version(path: str) -> tuple[int, ...]:
        return tuple(int(part) for part in Path(path).parent.parent.name.split(".")
                     if part.isdigit())

    found = [path for pattern in VERSIONED_BIN for path in glob.glob(f"{pattern}/{program}")]
    return max(found, key=version) if found else None


def require(program: str) -> str:
    """Path of ``program``, or an error saying which Debian package provides it."""
    package = package_of(program)
    path = (_versioned(program) or shutil.which(program)
            or shutil.which(program, path="/usr/sbin:/sbin"))
    if path is None:
        raise ComponentError(f"{program} not found: apt-get install {package} (or run make setup)")
    return path


def require_library(name: str) -> str:
    """Path of the library ``name`` under /usr/lib, or an error naming its package."""
    package = package_of(f"lib:{name}")
    found = sorted(glob.glob(f"/usr/lib/*/{name}"))
    if not found:
        raise ComponentError(f"{name} not found: apt-get install {package} (or run make setup)")
    return found[0]


PORT_ATTEMPTS = 5  # ports a first start tries before it gives up
TCP_LISTEN = "0A"  # the state column of /proc/net/tcp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair() -> int:
    """A port P with P+1 also free (swtpm's server and control ports)."""
    for _ in range(50):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise ComponentError("no pair of adjacent free ports on 127.0.0.1")


def listening(process: subprocess.Popen[bytes] | None, *ports: int) -> bool:
    """Whether ``process`` itself listens on every one of the TCP ``ports``.

    A connection test would also pass when another program got the port
    first, and the clients would then talk to that program.
    """
    if process is None:
        return False
    sockets: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if fields[3] == TCP_LISTEN and port in ports:
                    sockets[f"socket:[{fields[9]}]"] = port
    fds = Path(f"/proc/{process.pid}/fd")
    try:
        held = {sockets.get(os.readlink(fd)) for fd in fds.iterdir()}
    except OSError:  # it exited meanwhile, or an fd closed while read
        return False
    return set(ports) <= held


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               process: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise ComponentError(f"{what} exited with {process.returncode} before ready:\n{tail}")
        if check():
            return
        time.sleep(0.02)
    raise ComponentError(f"{what} not ready after {timeout:.0f}s")


class Process:
    """One child process with its output in a log file; always reaped."""

    def __init__(self, name: str, argv: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        if not os.path.isabs(self.argv[0]):
            require(self.argv[0])
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **(self.env or {})}, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def log_offset(self) -> int:
        """Where the log ends now; pass it to :meth:`log_since` after an action."""
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log, encoding="utf-8", errors="replace") as log:
            log.seek(offset)
            return log.read()

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.running():
            assert self.popen is not None
            self.popen.send_signal(signum)

    def stop(self, timeout: float = 5.0, signum: int = signal.SIGTERM) -> int | None:
        """Terminate, then kill after ``timeout``; returns the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        return self.popen.returncode


class DBusSession:
    """A private D-Bus session bus for tpm2-abrmd instances and their clients."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.address = f"unix:path={directory / 'bus'}"
        self.process = Process(
            "dbus-daemon",
            ["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={self.address}"],
            directory / "dbus.log",
        )

    def __enter__(self) -> DBusSession:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process.start()
        wait_until(lambda: (self.directory / "bus").exists(), 10, "dbus-daemon",
                   self.process.popen, self.process.log)
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.stop()

    def has_name(self, name: str) -> bool:
        result = subprocess.run(
            [require("dbus-send"), f"--bus={self.address}", "--print-reply",
             "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
             "org.freedesktop.DBus.NameHasOwner", f"string:{name}"],
            capture_output=True, text=True, timeout=5, check=False,
        )
        return "boolean true" in result.stdout


class SoftwareTPM:
    """swtpm behind its own tpm2-abrmd: the TCTI a device would get from /dev/tpmrm0.

    ``max_transients=3`` makes tpm2-abrmd enforce the kernel resource manager's
    per-connection limit. Without a bus there is no resource manager and
    ``tcti`` is the raw swtpm one, as on a device that lacks both. With a
    ``manufacturer``, ``swtpm_setup`` makes the state first: EKs and EK
    certificates in NV, as a real TPM ships.
    """

    def __init__(self, directory: Path, bus: DBusSession | None, name: str = "tpm",
                 max_transients: int | None = None,
                 manufacturer: Manufacturer | None = None) -> None:
        self.directory = directory
        self.manufacturer = manufacturer  # if set: EKs and EK certificates before first start
        self.bus = bus
        self.name = name
        self.max_transients = max_transients
        self.state = directory / "state"
        self.port: int | None = None  # chosen at the first start, see _first_start
        self.swtpm = Process("swtpm", ["swtpm"], directory / "swtpm.log")
        self.abrmd: Process | None = None

    def _use_port(self, port: int) -> None:
        self.port = port
        self.swtpm.argv = [
            "swtpm", "socket", "--tpm2",
            "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
            "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
            "--flags", "not-need-init,startup-clear",
            "--tpmstate", f"dir={self.state}",
        ]
        if self.bus is None:
            return
        abrmd = ["tpm2-abrmd", "--session", f"--dbus-name={self.bus_name}",
                 f"--tcti={self.swtpm_tcti}", "--allow-root"]
        if self.max_transients is not None:
            abrmd.append(f"--max-transients={self.max_transients}")
        self.abrmd = Process("tpm2-abrmd", abrmd, self.directory / "abrmd.log",
                             env={"DBUS_SESSION_BUS_ADDRESS": self.bus.address})

    @property
    def _port(self) -> int:
        if self.port is None:
            raise ComponentError("the software TPM has no port before its first start")
        return self.port

    @property
    def bus_name(self) -> str:
        return f"com.intel.tss2.Tabrmd.{self.name.replace('-', '_')}{self._port}"

    @property
    def swtpm_tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self._port}"

    @property
    def tcti(self) -> str:
        return f"tabrmd:bus_type=session,bus_name={self.bus_name}" if self.bus else self.swtpm_tcti

    def __enter__(self) -> SoftwareTPM:
        self.state.mkdir(parents=True, exist_ok=True)
        if self.manufacturer is not None and not any(self.state.iterdir()):
            self.manufacturer.manufacture(self.state)
        self.start()
        return self

    def start(self) -> None:
        if self.port is None:
            self._first_start()
        else:
            self._start_swtpm()
        if self.abrmd is not None and self.bus is not None:
            bus = self.bus
            self.abrmd.start()
            wait_until(lambda: bus.has_name(self.bus_name), 10, "tpm2-abrmd",
                       self.abrmd.popen, self.abrmd.log)

    def _first_start(self) -> None:
        """First start: ports chosen now, and again if another process took them first.

        A port is free only when it is probed; whatever connects or listens on
        127.0.0.1 meanwhile (a client's source port, another TPM of a batch) can
        take it before swtpm binds, and swtpm then exits. Restarts keep the port:
        clients hold the TCTI.
        """
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self._use_port(free_port_pair())
            try:
                self._start_swtpm()
                return
            except ComponentError:
                if self.swtpm.running() or attempt == PORT_ATTEMPTS:
                    raise

    def _start_swtpm(self) -> None:
        port = self._port
        self.swtpm.start()
        wait_until(lambda: listening(self.swtpm.popen, port, port + 1), 10, "swtpm",
                   self.swtpm.popen, self.swtpm.log)

    def stop(self) -> None:
        if self.abrmd is not None:
            self.abrmd.stop()
        self.swtpm.stop()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs to reach this TPM through its resource manager."""
        return {"DBUS_SESSION_BUS_ADDRESS": self.bus.address} if self.bus else {}


class Mosquitto:
    """A Mosquitto broker running a rendered configuration."""

    def __init__(self, directory: Path, config: Path, port: int) -> None:
        self.directory = directory
        self.config = config
        self.port = port
        self.process = self._process()

    def _process(self) -> Process:
        return Process("mosquitto", ["mosquitto", "-c", str(self.config)],
                       self.directory / "mosquitto.log")

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def start(self) -> None:
        self.process = self._process().start()
        wait_until(lambda: listening(self.process.popen, self.port), 10, "mosquitto",
                   self.process.popen, self.process.log)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (it saves its persistence file and removes its pid file), then kill."""
        self.process.stop(timeout)

    def restart(self) -> None:
        self.stop()
        self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
