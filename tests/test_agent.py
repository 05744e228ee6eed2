"""The real device-agent process against real swtpm, tpm2-abrmd and Mosquitto.

These devices start with an operational credential already in place; enrollment
and renewal over EST are in test_agent_enrollment.py.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.config import AgentConfig, render_toml
from provisioning import pki
from simulator.device import AgentProcess
from simulator.monitor import TelemetryMonitor
from simulator.processes import DBusSession, Mosquitto, SoftwareTPM

from .conftest import ClientFiles, rendered_broker, seed_operational, write_agent_config

pytestmark = pytest.mark.integration


def connected(status: dict) -> bool:
    return bool(status.get("connected"))


def published_at_least(n: int) -> object:
    return lambda status: (status.get("last_seq") or 0) >= n


def test_telemetry_reaches_an_independent_subscriber(
    operational_device: AgentProcess, monitor: TelemetryMonitor,
) -> None:
    with operational_device as agent:
        agent.wait_for(connected, 20, "broker connection")
        device = agent.device_id
        assert monitor.wait_until(lambda: len(monitor.seqs(device)) >= 5, 20)
    seqs = monitor.seqs(device)
    assert seqs[:5] == [1, 2, 3, 4, 5]


def test_local_api_publishes_through_the_agent(
    operational_device: AgentProcess, monitor: TelemetryMonitor,
) -> None:
    with operational_device as agent:
        agent.wait_for(connected, 20, "broker connection")
        result = subprocess.run(
            [sys.executable, "-m", "device_agent.cli", "--config", str(agent.config_path),
             "publish", "--topic", "telemetry", "--data", '{"engine_rpm": 900}'],
            capture_output=True, text=True, timeout=20, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert '"ok": true' in result.stdout
        seq = int(result.stdout.split('"seq": ')[1].rstrip("}\n"))
        assert monitor.wait_until(lambda: seq in monitor.seqs(agent.device_id), 10)
        socket_mode = agent.config.api.socket.stat().st_mode & 0o777 if agent.config.api.socket \
            else None
    assert socket_mode == 0o660


def test_no_message_lost_across_a_broker_restart(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, device_ca: pki.Authority,
    backend: ClientFiles,
) -> None:
    with rendered_broker(pki_dir) as own:
        config = write_agent_config(tmp_path / "dev", "restart-dev", swtpm.tcti, pki_dir, own.port)
        seed_operational(config, swtpm.tcti, device_ca)
        with TelemetryMonitor(port=own.port, cafile=pki_dir.server_trust, cert=backend.cert,
                              key=backend.key) as watch, AgentProcess(config, swtpm.env) as agent:
            agent.wait_for(published_at_least(5), 20, "first messages")
            own.mosquitto.stop()
            time.sleep(2)  # telemetry keeps going into the outbox while the broker is down
            own.mosquitto.start()
            agent.wait_for(lambda s: connected(s) and (s.get("last_seq") or 0) >= 25, 60,
                           "reconnection")
            assert agent.stop() == 0
            status = agent.status()
            last = status["last_seq"]
            assert status["outbox_depth"] == 0
            assert watch.wait_until(lambda: not watch.missing("restart-dev", 1, last), 20), \
                watch.missing("restart-dev", 1, last)
    assert (status["link"] or {})["connects"] >= 2


def test_no_message_lost_across_kill_9_and_restart(
    operational_device: AgentProcess, monitor: TelemetryMonitor,
) -> None:
    agent = operational_device.start()
    try:
        agent.wait_for(published_at_least(10), 30, "ten messages")
        agent.kill()
        killed_at = agent.status().get("last_seq", 0)
        agent.start()
        agent.wait_for(lambda s: (s.get("last_seq") or 0) >= killed_at + 10, 30, "ten more")
    finally:
        assert agent.stop() == 0
    status = agent.status()
    assert status["outbox_depth"] == 0
    last = status["last_seq"]
    assert monitor.wait_until(lambda: not monitor.missing(agent.device_id, 1, last), 10)


def test_sigterm_drains_and_exits_cleanly(operational_device: AgentProcess) -> None:
    agent = operational_device.start()
    agent.wait_for(published_at_least(3), 20, "messages")
    assert agent.stop() == 0
    assert "stopped; 0 message(s) left in the outbox" in agent.log_text()


def test_corrupt_outbox_is_kept_aside_and_the_agent_runs(
    operational_device: AgentProcess,
) -> None:
    state = operational_device.config.paths.state_dir
    (state / "outbox.db").write_bytes(b"this is not a database" * 100)
    with operational_device as agent:
        status = agent.wait_for(connected, 20, "broker connection")
    kept = [p.name for p in state.iterdir() if p.name.startswith("outbox.db.corrupt-")]
    assert kept and (state / kept[0]).read_bytes() == b"this is not a database" * 100
    assert any("outbox database corrupt" in e for e in status["errors"])


@pytest.mark.parametrize(("change", "message"), [
    (("port = ", "port = \"x\" #"), "[mqtt] port: must be an integer"),
    (("[device]", "[device]\ncolour = \"red\""), "[device] colour: unknown key"),
    # named and final, not a traceback: a state directory that is a file, no trust file
    (("state_dir = ", 'state_dir = "/etc/passwd" #'), "[paths] state_dir: /etc/passwd"),
    (("server_trust = ", 'server_trust = "/nonexistent/trust.pem" #'),
     "[paths] server_trust: /nonexistent/trust.pem is not a readable file"),
])
def test_invalid_config_is_refused_with_the_key_named(
    operational_device: AgentProcess, change: tuple[str, str], message: str,
) -> None:
    path = operational_device.config_path
    path.write_text(path.read_text().replace(*change, 1))
    result = subprocess.run([sys.executable, "-m", "device_agent.cli", "--config", str(path),
                             "run"], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (operational_device.config.paths.state_dir / "outbox.db").exists()


def test_broker_refusing_the_certificate_is_reported_and_retried_with_backoff(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, broker: Mosquitto,
) -> None:
    stranger = pki.new_root("Device CA", pki.CA_LIFETIME, ecdsa=True)
    config = write_agent_config(tmp_path / "dev", "refused-dev", swtpm.tcti, pki_dir,
                                broker.port)
    seed_operational(config, swtpm.tcti, stranger)
    with AgentProcess(config, swtpm.env) as agent:
        agent.wait_for(lambda s: (s.get("link") or {}).get("connect_failures", 0) >= 3, 40,
                       "refusals")
        early = agent.status()["link"]["connect_failures"]
        time.sleep(6)
        status = agent.status()
        assert agent.running()
    assert not status["connected"]
    assert status["link"]["connects"] == 0
    # the broker's "unknown CA" alert, or the bare EOF when its close wins the race
    assert status["link"]["last_error"].startswith("broker did not admit us")
    # backoff: attempts spread out instead of one per tick
    assert status["link"]["connect_failures"] - early <= 6
    assert status["outbox_depth"] > 0  # telemetry kept, not dropped


def test_unreadable_key_blob_is_reported_and_nothing_deleted(
    operational_device: AgentProcess,
) -> None:
    credentials = operational_device.config.paths.state_dir / "credentials"
    (credentials / "current" / "key.tss").write_bytes(b"garbage")
    with operational_device as agent:
        status = agent.wait_for(lambda s: bool(s.get("errors")), 20, "an error")
        time.sleep(1)
        assert agent.running()
    assert "not a TSS2 private key" in " ".join(status["errors"])
    kept = [p for p in credentials.iterdir() if p.name.startswith("broken-gen-000001-")]
    assert len(kept) == 1 and (kept[0] / "key.tss").read_bytes() == b"garbage"
    assert (kept[0] / "cert.pem").exists()


# --- systemd ---------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[Path, socket.socket]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    try:
        yield path, sock
    finally:
        sock.close()


def notifications(sock: socket.socket, seconds: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            seen += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            continue
    return seen


def test_watchdog_pings_while_healthy_and_stop_when_the_tpm_goes_away(
    tmp_path: Path, dbus: DBusSession, pki_dir: pki.PKIPaths, device_ca: pki.Authority,
    broker: Mosquitto, notify_socket: tuple[Path, socket.socket],
) -> None:
    path, sock = notify_socket
    with SoftwareTPM(tmp_path / "tpm", dbus, "watchdog") as tpm:
        config = write_agent_config(tmp_path / "dev", "watchdog-dev", tpm.tcti, pki_dir,
                                    broker.port)
        seed_operational(config, tpm.tcti, device_ca)
        env = {**tpm.env, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "600000"}
        with AgentProcess(config, env) as agent:
            healthy = notifications(sock, 4)
            tpm.stop()
            notifications(sock, 1)  # what was already on its way
            after = notifications(sock, 3)
            status = agent.status()
    assert "READY=1" in healthy
    assert healthy.count("WATCHDOG=1") >= 5
    assert "WATCHDOG=1" not in after
    assert any("watchdog withheld" in e for e in status["errors"])


def test_status_command_prints_identity_expiry_connection_and_outbox(
    operational_device: AgentProcess,
) -> None:
    with operational_device as agent:
        agent.wait_for(connected, 20, "broker connection")
        result = subprocess.run(
            [sys.executable, "-m", "device_agent.cli", "--config", str(agent.config_path),
             "status"], capture_output=True, text=True, timeout=20, check=False)
    assert result.returncode == 0, result.stderr
    for expected in (agent.device_id, "operational", "expires", "connected", "outbox"):
        assert expected in result.stdout


def test_status_json_and_the_metrics_textfile_carry_the_health_fields(
    operational_device: AgentProcess, tmp_path: Path,
) -> None:
    path = operational_device.config_path
    config = AgentConfig.load(path)
    prom = tmp_path / "textfile_collector" / "device_agent.prom"
    prom.parent.mkdir()
    path.write_text(render_toml(dataclasses.replace(
        config, metrics=dataclasses.replace(config.metrics, textfile=prom, interval=1.0))))
    with operational_device as agent:
        agent.wait_for(connected, 20, "broker connection")
        deadline = time.monotonic() + 10
        while "device_agent_connected 1" not in (prom.read_text() if prom.exists() else ""):
            assert time.monotonic() < deadline, "no textfile saying connected"
            time.sleep(0.2)
        result = subprocess.run(
            [sys.executable, "-m", "device_agent.cli", "--config", str(path), "status",
             "--json"], capture_output=True, text=True, timeout=20, check=False)
        text = prom.read_text()
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    not_after = dt.datetime.fromisoformat(status["cert_not_after"])
    expected = (not_after - dt.datetime.now(dt.UTC)).total_seconds()
    assert 0 < status["cert_expires_in_s"] and abs(status["cert_expires_in_s"] - expected) < 30
    assert status["tpm_errors"] == 0
    assert status["connects"] == 1 and status["reconnects"] == 0
    assert status["last_renewal"] is None  # seeded credential: no job has run
    assert isinstance(status["outbox_depth"], int)
    values = dict(line.rsplit(" ", 1) for line in text.splitlines()
                  if line.startswith("device_agent_") and "{" not in line)
    assert abs(float(values["device_agent_certificate_expiry_seconds"]) - expected) < 30
    assert values["device_agent_tpm_errors_total"] == "0"
    assert values["device_agent_reconnects_total"] == "0"
    assert int(values["device_agent_outbox_depth"]) >= 0


def test_agent_config_written_by_the_tests_loads(operational_device: AgentProcess) -> None:
    assert AgentConfig.load(operational_device.config_path).device.id == \
        operational_device.device_id


def test_sighup_reloads_a_valid_config_and_keeps_the_running_one_on_a_broken_one(
    operational_device: AgentProcess,
) -> None:
    path = operational_device.config_path
    original = path.read_text()
    with operational_device as agent:
        agent.wait_for(connected, 20, "broker connection")
        path.write_text(original.replace("keepalive = 10", "keepalive = 12"))
        agent.process.send_signal(signal.SIGHUP)
        agent.wait_for(lambda s: "configuration reloaded" in agent.log_text()
                       and s.get("connected"), 20, "reload and reconnection")
        path.write_text(original.replace("port = ", 'port = "broken" #', 1))
        agent.process.send_signal(signal.SIGHUP)
        status = agent.wait_for(lambda s: any("reload refused" in e for e in s["errors"]), 20,
                                "the refused reload")
        assert agent.running() and status["connected"]
    assert "[mqtt] port: must be an integer" in " ".join(status["errors"])


def test_a_reload_is_applied_whole_or_not_at_all(operational_device: AgentProcess) -> None:
    """[outbox] cannot change under a running outbox: the whole reload is refused."""
    path = operational_device.config_path
    original = path.read_text()
    with operational_device as agent:
        agent.wait_for(connected, 20, "broker connection")
        path.write_text(original.replace("keepalive = 10", "keepalive = 12")
                        .replace("max_messages = 100000", "max_messages = 50"))
        agent.process.send_signal(signal.SIGHUP)
        status = agent.wait_for(lambda s: any("reload refused" in e for e in s["errors"]), 20,
                                "the refused reload")
        assert any("[outbox] change only with a restart" in e for e in status["errors"])
        assert "configuration reloaded" not in agent.log_text()  # keepalive not applied either
        assert agent.running()


def test_a_reload_that_shortens_the_telemetry_interval_takes_effect_at_once(
    operational_device: AgentProcess,
) -> None:
    """Found under real systemd: the next tick stayed on the old interval's schedule."""
    path = operational_device.config_path
    config = AgentConfig.load(path)
    slow = dataclasses.replace(config, mqtt=dataclasses.replace(config.mqtt,
                                                                telemetry_interval=3600.0))
    path.write_text(render_toml(slow))
    with operational_device as agent:
        status = agent.wait_for(lambda s: connected(s) and s.get("last_seq"), 20,
                                "first telemetry")
        first = status["last_seq"]
        path.write_text(render_toml(config))  # back to 0.2 s
        agent.process.send_signal(signal.SIGHUP)
        agent.wait_for(published_at_least(first + 3), 10, "telemetry on the new interval")
