"""First boot, renewals and refusals: the real agent against the real EST server.

Certificates here live 20 seconds, so a renewal comes every 13 to 14 seconds.
"""

from __future__ import annotations

import json
import queue
import ssl
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from provisioning import pki
from provisioning.registry import DeviceState
from simulator.monitor import TelemetryMonitor
from simulator.processes import Mosquitto, SoftwareTPM

from .conftest import ClientFiles, factory_device
from .est_support import ESTServer

pytestmark = pytest.mark.integration


def test_first_boot_enrolls_with_the_bootstrap_identity_and_publishes(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, enrollment_server: ESTServer,
    broker: Mosquitto, monitor: TelemetryMonitor,
) -> None:
    device = factory_device(tmp_path, "boot-1", swtpm, pki_dir, enrollment_server, broker)
    assert not (device.config.paths.state_dir / "credentials").exists()
    with device as agent:
        status = agent.wait_for(lambda s: s.get("connected"), 30, "enrollment and connection")
        assert monitor.wait_until(lambda: len(monitor.seqs("boot-1")) >= 3, 20)
        assert agent.process is not None
        lingering = credential_jobs_of(agent.process.pid)
    assert status["generation"] == 1
    assert lingering == []  # the job started ahead of the daemon's imports did the enrollment
    with enrollment_server.registry() as registry:
        issued = [c for c in registry.certificates("boot-1") if c.kind == "operational"]
    assert [c.serial for c in issued] == [status["cert_serial"]]


def test_two_renewals_rotate_the_tpm_key_and_lose_no_message(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, enrollment_server: ESTServer,
    broker: Mosquitto, monitor: TelemetryMonitor,
) -> None:
    device = factory_device(tmp_path, "renew-1", swtpm, pki_dir, enrollment_server, broker)
    keys: dict[int, str] = {}

    def record(status: dict) -> bool:
        if status.get("generation") and status.get("connected"):
            keys[status["generation"]] = status["key_sha256"]
        return len(keys) >= 3

    with device as agent:
        agent.wait_for(record, 75, "two renewals")
        assert agent.stop() == 0
    final = agent.status()
    assert len(set(keys.values())) == len(keys) >= 3
    assert final["outbox_depth"] == 0
    last = final["last_seq"]
    assert monitor.wait_until(lambda: not monitor.missing("renew-1", 1, last), 20), \
        monitor.missing("renew-1", 1, last)
    credentials = device.config.paths.state_dir / "credentials"
    # every generation is kept (pruned only beyond a count), none was set aside
    assert sorted(p.name for p in credentials.iterdir() if not p.is_symlink()) == \
        [f"gen-{n:06d}" for n in range(1, final["generation"] + 1)]


def test_est_refusal_is_reported_and_retried_with_backoff(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, enrollment_server: ESTServer,
    broker: Mosquitto,
) -> None:
    device = factory_device(tmp_path, "refused-1", swtpm, pki_dir, enrollment_server, broker)
    with enrollment_server.registry() as registry:
        registry.set_state("refused-1", DeviceState.SUSPENDED, "test")
    with device as agent:
        status = agent.wait_for(lambda s: s["state"] == "stranded", 30, "the refusal")
        time.sleep(6)
        assert agent.running()
        with enrollment_server.registry() as registry:
            attempts = [e for e in registry.audit_log("refused-1") if e.decision == "refused"]
    assert status["generation"] is None and "suspended" in status["why"]
    assert status["last_renewal"]["work"] == "enroll"  # the health keys (issue 18)
    assert status["last_renewal"]["outcome"] == "refused"
    assert status["last_renewal"]["detail"].startswith("403")
    assert status["credential_jobs"].get("enroll:refused", 0) >= 1
    assert 1 <= len(attempts) <= 6  # backoff, not one attempt per loop turn
    credentials = device.config.paths.state_dir / "credentials"
    assert not credentials.exists() or not any(p.name.startswith("gen-")
                                               for p in credentials.iterdir())


def test_commands_are_answered_through_the_response_topic(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, enrollment_server: ESTServer,
    broker: Mosquitto, backend: ClientFiles,
) -> None:
    device = factory_device(tmp_path, "cmd-1", swtpm, pki_dir, enrollment_server, broker)
    answers: queue.Queue[tuple[bytes, bytes]] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="backend",
                         protocol=mqtt.MQTTv5)
    context = ssl.create_default_context(cafile=str(pki_dir.server_trust))
    context.load_cert_chain(str(backend.cert), str(backend.key))
    client.tls_set_context(context)
    client.on_message = lambda _c, _u, m: answers.put(
        (m.payload, getattr(m.properties, "CorrelationData", b"")))
    with device as agent:
        first = agent.wait_for(lambda s: s.get("connected"), 30, "connection")
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            client.subscribe("devices/cmd-1/responses/#", qos=1)
            time.sleep(0.5)
            for name, correlation in (("ping", b"c-1"), ("renew-now", b"c-2")):
                properties = Properties(PacketTypes.PUBLISH)
                properties.ResponseTopic = "devices/cmd-1/responses/backend"
                properties.CorrelationData = correlation
                client.publish(f"devices/cmd-1/commands/{name}", b"{}", qos=1,
                               properties=properties)
            replies = [answers.get(timeout=10), answers.get(timeout=10)]
            renewed = agent.wait_for(lambda s: (s.get("generation") or 0) > first["generation"],
                                     20, "the renewal asked for")
        finally:
            client.disconnect()
            client.loop_stop()
            client._reset_sockets()  # noqa: SLF001 - see tests/test_broker.py close()
    by_correlation = {c: json.loads(p) for p, c in replies}
    assert by_correlation[b"c-1"]["ok"] and "pong" in by_correlation[b"c-1"]
    assert by_correlation[b"c-2"] == {"ok": True, "accepted": "renew"}
    assert renewed["key_sha256"] != first["key_sha256"]


HEAVY_LIBRARIES = ("cryptography", "tpm2_pytss")


def credential_jobs_of(pid: int) -> list[int]:
    """The credential job processes ``pid`` has running."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == pid and b"device_agent.credential_job" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def mapped_libraries(pid: int) -> set[str]:
    """Which of HEAVY_LIBRARIES have a file mapped into process ``pid`` (their C parts)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name in HEAVY_LIBRARIES if f"/{name}/" in maps}


def test_the_daemon_never_loads_the_tpm_binding_or_cryptography(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, enrollment_server: ESTServer,
    broker: Mosquitto,
) -> None:
    """Issue 15: key generation, CSRs and EST run in a credential job of their own; the
    daemon keeps TLS (through the OpenSSL provider), paho, the outbox and the API. Checked
    after a first enrollment and a renewal, by what the process has mapped."""
    device = factory_device(tmp_path, "light-1", swtpm, pki_dir, enrollment_server, broker,
                            fraction=0.3)
    with device as agent:
        status = agent.wait_for(lambda s: s.get("connected") and s.get("generation") == 2,
                                45, "enrollment, then a renewal")
        assert agent.process is not None
        pid = agent.process.pid
        loaded = mapped_libraries(pid)
        rss_kb = int(next(line.split()[1] for line in
                          Path(f"/proc/{pid}/status").read_text().splitlines()
                          if line.startswith("VmRSS:")))
    assert status["key_sha256"] and status["cert_serial"]
    assert loaded == set(), f"the daemon loaded {loaded}"
    assert status["last_renewal"]["work"] == "renew"  # the health keys (issue 18)
    assert status["last_renewal"]["outcome"] == "issued"
    assert status["connects"] >= 2 and status["reconnects"] == status["connects"] - 1
    assert status["tpm_errors"] == 0
    print(f"\ndaemon RSS after enrollment and a renewal: {rss_kb / 1024:.1f} MB")
