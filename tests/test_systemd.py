"""sd_notify against real datagram sockets, and the shipped unit file against systemd-analyze."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from device_agent.systemd import Notifier
from simulator.processes import require

UNIT = "device-agent.service"
CHILD = """
from device_agent.systemd import Notifier
n = Notifier()
sent = [n.ready(), n.status("connected,\\n outbox 3"), n.watchdog(), n.reloading(),
        n.extend_timeout(2.5), n.stopping()]
print(all(sent), n.watchdog_interval)
"""


def receiver(address: str | bytes) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(10)
    return sock


def receive(sock: socket.socket) -> tuple[str, int]:
    """One datagram and the sender's pid, as systemd sees them (SCM_CREDENTIALS)."""
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pids = [struct.unpack("3i", cdata)[0] for level, kind, cdata in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    return data.decode(), pids[0]


def run_child(notify_socket: str, **extra: str) -> tuple[str, int]:
    env = {**os.environ, "NOTIFY_SOCKET": notify_socket, **extra}
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                           text=True, timeout=60, check=True)
    return child.stdout.strip(), child.returncode


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    address = str(tmp_path / "notify")
    with receiver(address) as sock:
        yield address, sock


def test_child_process_notifies_a_path_socket(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    out, _ = run_child(address, WATCHDOG_USEC="30000000")
    assert out == "True 30.0"
    messages = [receive(sock) for _ in range(6)]
    assert len({pid for _, pid in messages}) == 1 and messages[0][1] != os.getpid()
    texts = [text for text, _ in messages]
    assert texts[:3] == ["READY=1", "STATUS=connected, outbox 3", "WATCHDOG=1"]
    assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", texts[3])
    assert texts[4:] == ["EXTEND_TIMEOUT_USEC=2500000", "STOPPING=1"]


def test_abstract_socket() -> None:
    name = f"device-agent-test-{uuid.uuid4().hex}"
    with receiver(b"\0" + name.encode()) as sock:
        out, _ = run_child("@" + name)
        assert out == "True None"
        assert receive(sock)[0] == "READY=1"


def test_watchdog_interval_parsing() -> None:
    pid = str(os.getpid())
    assert Notifier({}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 30.0
    assert Notifier({"WATCHDOG_USEC": "1500", "WATCHDOG_PID": pid}).watchdog_interval == 0.0015
    assert Notifier({"WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "-5"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}).watchdog_interval is None


def test_watchdog_pid_of_another_process_neither_times_nor_pings(
        path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    other = str(os.getpid() + 1)
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000",
                         "WATCHDOG_PID": other})
    assert notifier.watchdog_interval is None
    assert notifier.watchdog() is False
    assert notifier.ready() is True
    assert receive(sock)[0] == "READY=1"
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(4096)


def test_watchdog_pid_of_this_process_pings(path_socket: tuple[str, socket.socket]) -> None:
    address, sock = path_socket
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "30000000",
                         "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval == 30.0
    assert notifier.watchdog() is True
    assert receive(sock) == ("WATCHDOG=1", os.getpid())


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert [notifier.ready(), notifier.status("x"), notifier.watchdog(), notifier.stopping(),
            notifier.reloading()] == [False] * 5


def test_send_failure_is_logged_not_raised(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, logger="device_agent.systemd"):
        assert notifier.ready() is False
    assert "sd_notify READY failed" in caplog.text


def test_unsupported_address_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="device_agent.systemd"):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled and notifier.ready() is False
    assert "vsock" in caplog.text


def systemd_analyze() -> str:
    return require("systemd-analyze")


@pytest.mark.parametrize("package,unit", [("device_agent", UNIT),
                                          ("provisioning", "est-server.service"),
                                          ("provisioning", "factory-ca.service")])
def test_unit_security_exposure_is_at_most_2(tmp_path: Path, package: str, unit: str) -> None:
    target = tmp_path / unit
    target.write_bytes(resources.files(package).joinpath("data", unit).read_bytes())
    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager",
                             str(target)],
                            capture_output=True, text=True, timeout=120, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    """verify insists that ExecStart's binary exists, so it runs against a throwaway root.

    The root holds the host's unit library (for the targets the unit names),
    /bin/kill, and a stand-in /usr/bin/device-agent; any warning fails the test.
    """
    verify_in_root(tmp_path / "root", "device_agent", (UNIT,), ("device-agent",))


def test_unit_keeps_the_agreed_contract() -> None:
    text = resources.files("device_agent").joinpath("data", UNIT).read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30", "Restart=on-failure",
                 "ExecStart=/usr/bin/device-agent run --config /etc/device-agent/agent.toml",
                 "ExecReload=/bin/kill -HUP $MAINPID", "User=device-agent",
                 "SupplementaryGroups=tss", "DeviceAllow=/dev/tpmrm0 rw",
                 "DevicePolicy=closed", "StateDirectoryMode=0700",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"):
        assert line in text.splitlines(), line


BACK_OFFICE_UNITS = ("est-server.service", "factory-ca.service", "device-crl-refresh.service",
                     "device-crl-refresh.timer")


def test_back_office_units_verify_cleanly(tmp_path: Path) -> None:
    """The server package's units, against a throwaway root like the agent's."""
    verify_in_root(tmp_path / "root", "provisioning", BACK_OFFICE_UNITS,
                   ("est-server", "factory-ca", "device-pki", "broker-config"))


def verify_in_root(root: Path, package: str, units: tuple[str, ...],
                   commands: tuple[str, ...]) -> None:
    """``systemd-analyze verify`` insists that Exec binaries exist: a throwaway root with the
    host's unit library, /bin/kill and stand-ins for ``commands``; any output fails."""
    shutil.copytree(Path("/usr/lib/systemd/system"), root / "usr/lib/systemd/system",
                    symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    for command in commands:
        (root / "usr/bin" / command).write_text("#!/bin/sh\n")
        (root / "usr/bin" / command).chmod(0o755)
    (root / "bin").mkdir()
    shutil.copy2(require("kill"), root / "bin/kill")
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name in units:
        (unit_dir / name).write_bytes(resources.files(package).joinpath("data", name).read_bytes())
    result = subprocess.run([systemd_analyze(), "verify", "--man=no", f"--root={root}",
                             *(f"/etc/systemd/system/{name}" for name in units)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
