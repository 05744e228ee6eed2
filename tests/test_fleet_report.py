"""``device-pki report``: fleet identity health from a registry whose history is known."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import pki
from provisioning.fleet_report import fleet_report
from provisioning.registry import DeviceState, IssuanceKind, Registry, open_registry, serial_hex

DEVICE_PKI = str(Path(sys.executable).parent / "device-pki")
NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)


class Fleet:
    def __init__(self, paths: pki.PKIPaths, registry: Registry) -> None:
        self.factory = pki.read_authority(paths.factory_ca)
        self.device_ca = pki.read_authority(paths.device_ca)
        self.registry = registry
        self.serials: dict[str, str] = {}

    def device(self, device_id: str, state: DeviceState = DeviceState.ACTIVE) -> None:
        boot = self.factory.issue_client(device_id, _key(), 365 * DAY, NOW - 30 * DAY)
        self.registry.register_device(device_id, boot)
        if state is not DeviceState.ACTIVE:
            self.registry.set_state(device_id, state)

    def issue(self, device_id: str, kind: IssuanceKind, start: dt.timedelta,
              lifetime: dt.timedelta) -> None:
        """A certificate from ``NOW - start`` for ``lifetime``, issued then; it supersedes
        the device's previous one."""
        cert = self.device_ca.issue_client(device_id, _key(), lifetime, NOW - start)
        previous = self.serials.get(device_id)
        self.registry.record_issuance(device_id, cert, kind, (previous,) if previous else (),
                                      NOW - start)
        self.serials[device_id] = serial_hex(cert.serial_number)


def _key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


@dataclass(frozen=True)
class Registered:
    """The fleet's PKI and where its registry is: the PKI's SQLite file, or PostgreSQL."""

    paths: pki.PKIPaths
    registry: Path | str

    @property
    def options(self) -> list[str]:
        return ["--pki", str(self.paths.base), "--registry", str(self.registry)]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Registered:
    paths = pki.init_pki(tmp_path_factory.mktemp("fleet-pki"))
    location: Path | str = paths.registry
    if request.param == "postgresql":
        location = request.getfixturevalue("postgres").new_database("fleet")
    with open_registry(location) as registry, registry.transaction():
        f = Fleet(paths, registry)
        for device_id in ("renews", "soon", "stranded", "recovered", "reenrolled", "new"):
            f.device(device_id)
        f.device("paused", DeviceState.SUSPENDED)
        f.device("retired", DeviceState.DECOMMISSIONED)
        f.issue("renews", IssuanceKind.ENROLL, 20 * DAY, 30 * DAY)
        f.issue("renews", IssuanceKind.RENEW, 1 * DAY, 30 * DAY)  # good for 29 days
        f.issue("soon", IssuanceKind.ENROLL, 1 * DAY, 3 * DAY)  # expires in 2 days
        f.issue("stranded", IssuanceKind.ENROLL, 10 * DAY, 5 * DAY)  # expired 5 days ago
        f.issue("recovered", IssuanceKind.ENROLL, 20 * DAY, 5 * DAY)
        f.issue("recovered", IssuanceKind.RECOVER, 2 * DAY, 30 * DAY)
        f.issue("reenrolled", IssuanceKind.ENROLL, 40 * DAY, 5 * DAY)
        f.issue("reenrolled", IssuanceKind.BOOTSTRAP_REENROLL, 10 * DAY, 10.5 * DAY)
        f.issue("paused", IssuanceKind.ENROLL, 1 * DAY, 3 * DAY)  # suspended: not counted
        registry.hold("unknown-1", f.factory.issue_client("unknown-1", _key(), DAY))
    return Registered(paths, location)


def report(fleet: Registered, *options: str) -> dict[str, Any]:
    result = subprocess.run([DEVICE_PKI, "report", *fleet.options, "--json", *options],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def devices(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(row["device_id"] for row in rows)


def test_report_counts_states_expiry_recoveries_and_devices_never_renewed(
        fleet: Registered) -> None:
    week = report(fleet)
    assert week["devices_by_state"] == {"active": 6, "suspended": 1, "decommissioned": 1}
    assert week["pending_requests"] == 1
    assert week["within_seconds"] == 7 * 86400
    # within 7 days: "soon" (2 days) and "reenrolled" (half a day); "paused" is suspended
    assert devices(week["expiring"]) == ["reenrolled", "soon"]
    # expired with nothing newer: "stranded" only ("recovered"'s expired one is superseded)
    assert devices(week["expired"]) == ["stranded"]
    assert [(c["device_id"], c["kind"], c["count"]) for c in week["came_back"]] == [
        ("recovered", "recover", 1)]  # the bootstrap re-enrollment was 10 days ago
    assert week["issuances_since"] == {"enroll": 2, "renew": 1, "recover": 1,
                                       "bootstrap-reenroll": 0}
    assert devices(week["never_renewed"]) == ["recovered", "reenrolled", "soon", "stranded"]
    assert week["never_enrolled"] == ["new"]

    month = report(fleet, "--since", "30d", "--within", "1d")
    assert devices(month["expiring"]) == ["reenrolled"]
    assert sorted((c["device_id"], c["kind"]) for c in month["came_back"]) == [
        ("recovered", "recover"), ("reenrolled", "bootstrap-reenroll")]
    assert month["issuances_since"]["enroll"] == 5
    since = (dt.datetime.now(dt.UTC) - 15 * DAY).isoformat()
    assert report(fleet, "--since", since)["issuances_since"]["bootstrap-reenroll"] == 1


def test_report_for_people_and_its_argument_errors(fleet: Registered) -> None:
    text = subprocess.run([DEVICE_PKI, "report", *fleet.options],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert "expiring within 7d: 2" in text and "never renewed: 4" in text
    bad = subprocess.run([DEVICE_PKI, "report", *fleet.options, "--since", "soon"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "expected a duration" in bad.stderr


def test_a_negative_window_is_refused(fleet: Registered) -> None:
    with open_registry(fleet.registry) as registry, pytest.raises(ValueError):
        fleet_report(registry, NOW, -DAY, NOW)
