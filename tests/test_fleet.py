"""fleet-sim end to end: a small fleet of real TPM-backed agents, the report and the plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

FLEET_SIM = str(Path(sys.executable).parent / "fleet-sim")
REQUIRED = ("devices", "enrolled", "connected", "messages_sent", "messages_received",
            "messages_lost", "renewals", "recoveries", "revoked_disconnected",
            "cold_start_p50_s", "cold_start_p95_s", "reconnect_all_s", "mode")


def test_a_small_fleet_survives_a_broker_restart_and_loses_nothing(tmp_path: Path) -> None:
    report_path, plot = tmp_path / "report.json", tmp_path / "fleet.png"
    result = subprocess.run(
        [FLEET_SIM, "--devices", "3", "--scenario", "broker-restart",
         "--json", str(report_path), "--plot", str(plot)],
        capture_output=True, text=True, timeout=90, check=False,
        env={"TSS2_LOG": "all+none", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert set(REQUIRED) <= set(report), set(REQUIRED) - set(report)
    assert report["mode"] == "tpm"
    # manufactured TPMs, an attesting factory line, est-server with key_attestation = required
    assert report["key_attestation"] == "required"
    assert report["certificates_attested"] == report["certificates_issued"] >= 3
    assert report["devices"] == report["enrolled"] == report["connected"] == 3
    assert report["messages_lost"] == 0 and report["failures"] == []
    assert report["messages_received"] >= report["messages_sent"] > 0
    assert report["reconnect_all_s"] is not None and report["cold_start_p95_s"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS" in result.stdout
