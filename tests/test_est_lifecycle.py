"""The EST server's process life and its hold-for-approval policy, on real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provisioning import pki

from .est_support import (
    EST_SERVER,
    ESTServer,
    bootstrap_identity,
    enroll,
    new_key,
    running_est_server,
    stop,
)

pytestmark = pytest.mark.integration
DEVICE_PKI = str(Path(sys.executable).parent / "device-pki")


def events(server: ESTServer, name: str) -> list[dict[str, object]]:
    lines = server.log.read_text().splitlines()
    return [e for e in (json.loads(line) for line in lines if line.startswith("{"))
            if e["event"] == name]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pki_cli(server: ESTServer, *args: str) -> str:
    return subprocess.run([DEVICE_PKI, *args, "--registry", str(server.registry_path)],
                          check=True, capture_output=True, text=True, timeout=30).stdout


def test_unknown_devices_wait_for_an_operator(est_pki: pki.PKIPaths, factory_ca: pki.Authority,
                                              tmp_path: Path) -> None:
    with running_est_server(tmp_path / "srv", est_pki, unknown_devices="pending",
                            pending_retry_after=1) as server:
        newcomer = bootstrap_identity(tmp_path, factory_ca, "newcomer")
        stranger = bootstrap_identity(tmp_path, factory_ca, "stranger")
        for _ in range(2):
            held = enroll(server, newcomer, new_key())
            assert (held.status, held.headers.get("Retry-After"), held.text) == \
                (202, "1", "held until an operator approves the device")
        assert enroll(server, stranger, new_key()).status == 202
        listed = pki_cli(server, "pending")
        assert listed.startswith("newcomer\t2 request(s)") and "stranger\t1 request(s)" in listed

        pki_cli(server, "approve", "newcomer")
        pki_cli(server, "reject", "stranger")
        assert enroll(server, newcomer, new_key()).status == 200
        refused = enroll(server, stranger, new_key())
        assert (refused.status, refused.text) == (403, "an operator rejected device stranger")


def test_sigterm_stops_every_worker_and_exits_cleanly(est_pki: pki.PKIPaths,
                                                      tmp_path: Path) -> None:
    with running_est_server(tmp_path / "srv", est_pki) as server:
        [ready] = events(server, "ready")
        workers = ready["pids"]
        assert isinstance(workers, list) and len(workers) == 2
        started = time.monotonic()
        assert stop(server.process) == 0
        assert time.monotonic() - started < 10
        assert not any(alive(pid) for pid in workers)
        assert len(events(server, "stopped")) == 3  # two workers, then the supervisor


def test_a_dead_worker_is_replaced(est_pki: pki.PKIPaths, factory_ca: pki.Authority,
                                   tmp_path: Path) -> None:
    with running_est_server(tmp_path / "srv", est_pki) as server:
        [ready] = events(server, "ready")
        victim = ready["pids"][0]  # type: ignore[index]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while len(events(server, "listening")) < 3:
            assert time.monotonic() < deadline, server.log.read_text()
            time.sleep(0.05)
        assert events(server, "worker_exited")[0]["code"] == -signal.SIGKILL
        boot = bootstrap_identity(tmp_path, factory_ca, "after-restart")
        with server.registry() as registry:
            registry.register_device(boot.device_id, boot.certificate)
        assert all(enroll(server, boot, new_key()).status == 200 for _ in range(4))


def test_a_bad_configuration_is_one_line_and_a_failure(tmp_path: Path) -> None:
    config = tmp_path / "est.toml"
    config.write_text('[pki]\ndirectory = "nowhere"\n[server]\nport = 8443\nwrokers = 2\n')
    result = subprocess.run([EST_SERVER, "--config", str(config)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == f"est-server: {config}: server.wrokers: unknown key"
