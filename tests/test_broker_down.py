"""Revocations while the broker is down or has crashed (issue 14's soak found these).

Before: ``device-pki revoke-device``/``suspend --broker`` exited 1 with the
registry already changed and no ban ever applied, and the shipped CRL refresh
failed on every run while the broker was stopped or had left its pid file behind.
Now the CRL waits in the broker's directory for its start and the refresh (the
shipped unit's own commands) makes the broker's bans follow the registry.
Judged by the broker's own state (its plugin's clients and roles) and TLS
handshakes, never by printed text.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from broker_config import revocation
from broker_config.deploy import BrokerLayout
from provisioning.registry import DeviceState, open_registry
from simulator.crl_refresh import service_commands
from simulator.processes import Mosquitto, free_port

from .conftest import ClientFiles
from .test_broker_crl import (
    CONNACK_ACCEPTED,
    DEVICE_PKI,
    Office,
    broker_parent,  # noqa: F401 - fixture
    connack,
    office,  # noqa: F401 - fixture
    refused,
    render,
    run,
)

pytestmark = pytest.mark.integration


def state(back: Office, device_id: str) -> DeviceState:
    with open_registry(back.paths.registry) as registry:
        device = registry.device(device_id)
    assert device is not None
    return device.state


def refresh(back: Office, out: Path) -> None:
    """One run of device-crl-refresh.service, its ExecStart lines as shipped."""
    for argv in service_commands(back.paths.base, out):
        run(*argv)


def crash(mosquitto: Mosquitto) -> None:
    """SIGKILL: the broker leaves its pid file behind, as a crash does."""
    popen = mosquitto.process.popen
    assert popen is not None
    os.kill(popen.pid, signal.SIGKILL)
    popen.wait(10)


def test_a_device_suspended_or_revoked_while_the_broker_is_down_stays_out(
    office: Office, broker_parent: Path,  # noqa: F811
) -> None:
    dev: ClientFiles = office.device("down-1")
    port, out = free_port(), broker_parent / "broker"
    render(office, out, port)
    layout = BrokerLayout(out)
    trust = office.paths.server_trust
    common = ["--pki", office.paths.base, "--broker", out]
    mosquitto = Mosquitto(broker_parent, out / "mosquitto.conf", port)
    with mosquitto:
        assert connack(port, trust, dev) == CONNACK_ACCEPTED
        mosquitto.stop()

        # suspended while the broker is down: the registry changes, the command succeeds
        run(DEVICE_PKI, "suspend", "down-1", *common)
        assert state(office, "down-1") is DeviceState.SUSPENDED
        mosquitto.start()
        refresh(office, out)
        assert revocation.banned(out) == {"down-1"}

        run(DEVICE_PKI, "activate", "down-1", *common)
        assert revocation.banned(out) == set()

        # revoked while it is down: the CRL is read at its start, the ban follows
        mosquitto.stop()
        run(DEVICE_PKI, "revoke-device", "down-1", "--reason", "keyCompromise", *common)
        mosquitto.start()
        assert refused(port, trust, dev)
        refresh(office, out)
        assert revocation.banned(out) == {"down-1"}

        # a crashed broker's pid file is not a running broker: the refresh still succeeds
        crash(mosquitto)
        assert layout.pid_file.exists()
        run(DEVICE_PKI, "activate", "down-1", *common)
        refresh(office, out)
        mosquitto.start()
        refresh(office, out)
        assert revocation.banned(out) == set()  # the ban followed the state back


def test_an_installed_crl_bites_on_the_next_handshake_without_a_reload(
    office: Office, broker_parent: Path,  # noqa: F811
) -> None:
    """Before: a CRL written without a reload (the broker was starting, or the signal was
    lost) was the installed file but not the broker's until a later refresh reloaded it.
    Now the next handshake reads it from the broker's hashed CRL directory, and the
    broker is never reloaded (a reload drops offline sessions, test_broker_sessions)."""
    dev = office.device("down-2")
    port, out = free_port(), broker_parent / "broker"
    render(office, out, port)
    layout = BrokerLayout(out)
    with Mosquitto(broker_parent, out / "mosquitto.conf", port) as mosquitto:
        refresh(office, out)
        assert connack(port, office.paths.server_trust, dev) == CONNACK_ACCEPTED
        popen = mosquitto.process.popen
        assert popen is not None
        office.revoke(dev)
        revocation.install_crl(layout, office.paths.crl.read_bytes())
        assert refused(port, office.paths.server_trust, dev)
        assert popen.poll() is None and mosquitto.process.popen is popen


def test_a_broker_rendered_before_the_crl_directory_is_still_reloaded(
    office: Office, broker_parent: Path,  # noqa: F811
) -> None:
    """An upgrade that leaves the broker's old configuration (no ``capath``) must not leave
    it with a CRL that never reaches it: the refresh reloads such a broker, as before."""
    dev = office.device("down-3")
    port, out = free_port(), broker_parent / "broker"
    render(office, out, port)
    layout = BrokerLayout(out)
    conf = layout.conf.read_text()  # what a render before the CRL directory wrote
    layout.conf.write_text(conf.replace(f"capath {layout.crl_dir}\n", ""))
    assert not revocation.reads_crl_dir(layout)
    with Mosquitto(broker_parent, out / "mosquitto.conf", port):
        refresh(office, out)
        assert connack(port, office.paths.server_trust, dev) == CONNACK_ACCEPTED
        office.revoke(dev)
        refresh(office, out)
        time.sleep(0.5)  # the reload is applied at the end of the broker's loop turn
        assert refused(port, office.paths.server_trust, dev)
