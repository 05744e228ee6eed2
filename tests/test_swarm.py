"""fleet-sim --swarm: simulated devices in one process against the real back office."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from broker_config.mosquitto import BrokerSettings, render_acl, render_conf
from device_agent.identity import is_service_identity
from simulator.swarm import CLIENT_LOG, QUIET

FLEET_SIM = str(Path(sys.executable).parent / "fleet-sim")


@pytest.mark.integration
def test_a_small_swarm_enrolls_renews_survives_a_broker_restart_and_loses_nothing(
        tmp_path: Path) -> None:
    report_path = tmp_path / "swarm.json"
    result = subprocess.run(
        [FLEET_SIM, "--swarm", "50", "--scenario", "broker-restart", "--keystore", "file",
         "--duration", "20", "--lifetime", "30", "--json", str(report_path)],
        capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["simulation"] is True and "SIMULATION" in result.stdout
    assert report["devices"] == report["enrolled"] == report["connected"] == 50
    assert report["lost"] == 0 and report["failures"] == []
    assert report["received"] >= report["sent"] > 50 * 15
    assert report["renewals"] > 0, "30 s certificates renew within 20 s of steady telemetry"
    assert report["reconnect_all_s"] is not None and report["reconnects_per_s_after_restart"]
    assert report["monitor"]["fell_behind"] is False
    assert report["monitor"]["subscribers"] == 4
    for key in ("enrollments_per_s", "connects_per_s", "renewals_per_s", "broker_rss_mb_peak",
                "broker_cpu_pct", "est_server_cpu_pct", "cpu_pct_peak", "saturated_first",
                "mqtt_client_log"):
        assert key in report


def test_the_broker_grants_each_back_end_worker_the_back_end_rights() -> None:
    settings = BrokerSettings(port=8883, client_ca=Path("/ca"), certfile=Path("/c"),
                              keyfile=Path("/k"), data_dir=Path("/d"), backend_identity="backend",
                              backend_workers=3, max_queued_messages=100_000)
    acl = render_acl(settings)
    for name in ("backend", "backend-2", "backend-3"):
        assert f"user {name}\ntopic read devices/+/telemetry/#" in acl
    assert "backend-4" not in acl
    assert "max_queued_messages 100000\n" in render_conf(settings, Path("/acl"))
    assert "max_queued_messages" not in render_conf(
        BrokerSettings(port=8883, client_ca=Path("/ca"), certfile=Path("/c"),
                       keyfile=Path("/k"), data_dir=Path("/d")), Path("/acl"))


def test_back_end_worker_names_are_never_a_device_s() -> None:
    assert is_service_identity("backend-2") and is_service_identity("backend")
    assert not is_service_identity("backend-x") and not is_service_identity("sim-001")
    with pytest.raises(ValueError, match="backend_workers"):
        BrokerSettings(port=8883, client_ca=Path("/ca"), certfile=Path("/c"),
                       keyfile=Path("/k"), data_dir=Path("/d"), backend_workers=0)


def test_what_the_devices_mqtt_clients_log_is_counted_not_printed() -> None:
    """paho logs a socket error for each device when the broker restarts (62 lines in a
    10,000-device storm): the report counts them by message; the console (whatever the
    root logger prints to) stays readable."""
    printed: list[logging.LogRecord] = []

    class Console(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            printed.append(record)

    console = Console(logging.DEBUG)
    logging.getLogger().addHandler(console)
    before = CLIENT_LOG.counts["failed to receive on socket"]
    try:
        for _ in range(3):
            QUIET.error("failed to receive on socket: EOF occurred in violation of protocol")
        QUIET.debug("sending PUBLISH")
    finally:
        logging.getLogger().removeHandler(console)
    assert CLIENT_LOG.counts["failed to receive on socket"] - before == 3
    assert "sending PUBLISH" not in CLIENT_LOG.counts
    assert printed == []
