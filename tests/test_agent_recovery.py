"""Devices that come back after their certificate expired: the real agent finds its way back.

Certificates live 8 seconds here; a device is stopped with telemetry still queued
(its broker out of reach), kept off past expiry, and started again. Every device is
provisioned with the recovery listener by the factory (the first by the shipped
``device-provision`` command); only speed knobs are turned afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.config import AgentConfig
from provisioning import pki
from simulator.device import AgentProcess
from simulator.monitor import TelemetryMonitor
from simulator.processes import SoftwareTPM, require_library

from .conftest import ClientFiles, RenderedBroker, factory_device, fast_agent, rendered_broker
from .est_support import ESTServer, running_est_server

pytestmark = pytest.mark.integration

FAKETIME = "faketime/libfaketime.so.1"
DEVICE_PROVISION = str(Path(sys.executable).parent / "device-provision")
LATE = 0.9  # renewal fraction: the device is switched off before it renews


@pytest.fixture
def own_broker(pki_dir: pki.PKIPaths) -> Iterator[RenderedBroker]:
    with rendered_broker(pki_dir) as broker:
        yield broker


def recovery_server(directory: Path, pki_dir: pki.PKIPaths, grace: str) -> Iterator[ESTServer]:
    with running_est_server(directory, pki_dir, recovery=True, certificate_lifetime="8s",
                            recovery_grace=grace) as server:
        yield server


@pytest.fixture
def within_grace(tmp_path: Path, pki_dir: pki.PKIPaths) -> Iterator[ESTServer]:
    yield from recovery_server(tmp_path / "est", pki_dir, "1h")


@pytest.fixture
def past_grace(tmp_path: Path, pki_dir: pki.PKIPaths) -> Iterator[ESTServer]:
    yield from recovery_server(tmp_path / "est", pki_dir, "1s")


def go_offline_past_expiry(agent: AgentProcess, broker: RenderedBroker) -> int:
    """Run, lose the broker, queue telemetry, stop; wait until the certificate expired."""
    agent.start()
    first = agent.wait_for(lambda s: s.get("connected"), 30, "enrollment")
    broker.mosquitto.stop()
    agent.wait_for(lambda s: (s.get("outbox_depth") or 0) >= 5, 20, "queued telemetry")
    assert agent.stop() == 0
    queued = agent.status()["outbox_depth"]
    assert queued >= 5
    expires = first["cert_not_after"]
    while time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) <= expires[:19]:
        time.sleep(0.5)
    time.sleep(1.5)
    broker.mosquitto.start()
    return queued


def come_back(agent: AgentProcess, monitor: TelemetryMonitor) -> tuple[dict, float]:
    """Start again; wait for the new credential and every message; the seconds until the
    first delivered telemetry after the return."""
    device = agent.device_id
    before = len(monitor.seqs(device))
    started = time.monotonic()
    agent.start()
    assert monitor.wait_until(lambda: len(monitor.seqs(device)) > before, 60), agent.log_text()
    first_delivery = time.monotonic() - started
    status = agent.wait_for(lambda s: (s.get("generation") or 0) >= 2 and s.get("connected"),
                            30, "recovery")
    assert agent.stop() == 0, agent.log_text()[-3000:]
    final = agent.status()
    last = final["last_seq"]
    assert final["outbox_depth"] == 0
    assert monitor.wait_until(lambda: not monitor.missing(device, 1, last), 20), \
        monitor.missing(device, 1, last)
    return status, first_delivery


def decisions(est: ESTServer, device: str) -> list[tuple[str, str, str]]:
    with est.registry() as registry:
        return [(e.action, e.decision, e.reason) for e in registry.audit_log(device)]


def test_a_device_from_the_shipped_factory_command_recovers_and_delivers_what_it_queued(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, within_grace: ESTServer,
    own_broker: RenderedBroker, backend: ClientFiles,
) -> None:
    """``device-provision --recovery-url`` as shipped, then the test-speed knobs only: the
    device finds the recovery listener where the command put it, no bootstrap re-enrollment."""
    directory = tmp_path / "dev"
    provisioned = subprocess.run(
        [DEVICE_PROVISION, "--pki", str(pki_dir.base),
         "--registry", str(within_grace.registry_path), "--est-url", within_grace.base_url,
         "--recovery-url", within_grace.recovery_url,
         "--broker", f"127.0.0.1:{own_broker.port}", "--device-id", "back-1",
         "--tcti", swtpm.tcti, "--out", str(directory / "etc"),
         "--state-dir", str(directory / "state"), "--api-socket", str(directory / "api.sock")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **swtpm.env, "TSS2_LOG": "all+none"})
    assert provisioned.returncode == 0, provisioned.stderr
    written = AgentConfig.load(directory / "etc" / "agent.toml")
    assert written.est.recovery_url == within_grace.recovery_url
    agent = fast_agent(directory / "etc" / "agent.toml", swtpm.env, LATE)
    assert agent.config.renewal.fraction == LATE  # and nothing but the speed knobs changed:
    assert dataclasses.replace(agent.config, mqtt=written.mqtt,
                               renewal=written.renewal) == written
    with TelemetryMonitor(port=own_broker.port, cafile=pki_dir.server_trust, cert=backend.cert,
                          key=backend.key) as monitor:
        go_offline_past_expiry(agent, own_broker)
        _, seconds = come_back(agent, monitor)
    print(f"\nrecovery path: {seconds:.2f} s from return to first delivered telemetry")
    log = decisions(within_grace, "back-1")
    recovered = [d for d in log if d[0] == "recovery"]
    assert len(recovered) == 1 and recovered[0][1] == "issued", log
    assert [d[1] for d in log if d[0] == "simpleenroll"] == ["issued"], log  # first boot only


def test_past_the_grace_window_the_bootstrap_certificate_brings_it_back(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, past_grace: ESTServer,
    own_broker: RenderedBroker, backend: ClientFiles,
) -> None:
    agent = factory_device(tmp_path / "dev", "back-2", swtpm, pki_dir, past_grace,
                           own_broker.mosquitto, LATE, recovery_url=past_grace.recovery_url)
    with TelemetryMonitor(port=own_broker.port, cafile=pki_dir.server_trust, cert=backend.cert,
                          key=backend.key) as monitor:
        go_offline_past_expiry(agent, own_broker)
        _, seconds = come_back(agent, monitor)
    print(f"\nbootstrap fallback: {seconds:.2f} s from return to first delivered telemetry")
    log = decisions(past_grace, "back-2")
    assert [d[:2] for d in log if d[0] == "recovery"] == [("recovery", "refused")], log
    assert [d[1] for d in log if d[0] == "simpleenroll"] == ["issued", "issued"], log
    assert "falling back to the bootstrap certificate" in agent.log_text()


def test_a_device_whose_clock_reads_1970_still_recovers(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, within_grace: ESTServer,
    own_broker: RenderedBroker, backend: ClientFiles,
) -> None:
    agent = factory_device(tmp_path / "dev", "back-3", swtpm, pki_dir, within_grace,
                           own_broker.mosquitto, LATE, recovery_url=within_grace.recovery_url)
    with TelemetryMonitor(port=own_broker.port, cafile=pki_dir.server_trust, cert=backend.cert,
                          key=backend.key) as monitor:
        go_offline_past_expiry(agent, own_broker)
        agent = AgentProcess(agent.config_path, {
            **agent.env, "LD_PRELOAD": require_library(FAKETIME),
            "FAKETIME": "@1970-01-02 00:00:00", "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        status, _ = come_back(agent, monitor)
    assert status["clock_offset_s"] > 50 * 365 * 86400
    assert "using the EST server's time" in agent.log_text()
    assert [d[1] for d in decisions(within_grace, "back-3") if d[0] == "recovery"] == ["issued"]


def test_the_brokers_expired_alert_starts_recovery_when_the_clock_lags(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, within_grace: ESTServer,
    own_broker: RenderedBroker, backend: ClientFiles,
) -> None:
    agent = factory_device(tmp_path / "dev", "back-4", swtpm, pki_dir, within_grace,
                           own_broker.mosquitto, LATE, recovery_url=within_grace.recovery_url)
    with TelemetryMonitor(port=own_broker.port, cafile=pki_dir.server_trust, cert=backend.cert,
                          key=backend.key) as monitor:
        go_offline_past_expiry(agent, own_broker)
        # thirty seconds slow: by its own clock the certificate stays valid for the whole
        # return (six seconds used to run out under load, and the clock decided alone)
        agent = AgentProcess(agent.config_path, {
            **agent.env, "LD_PRELOAD": require_library(FAKETIME), "FAKETIME": "-30",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        come_back(agent, monitor)
    assert "certificate expired" in agent.log_text()
    assert [d[1] for d in decisions(within_grace, "back-4") if d[0] == "recovery"] == ["issued"]
