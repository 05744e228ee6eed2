"""The shipped CRL refresh keeps a broker admitting healthy devices past every nextUpdate.

A PKI made by ``device-pki init --crl-lifetime 10s``; a broker rendered by
``broker-config render`` and run by the real Mosquitto; the refresh is the
shipped unit's own ExecStart lines (simulator.crl_refresh), run as its timer
would, only faster. Without it the same broker refuses every device once its
CRL passes nextUpdate, which is what the test shows last, so it can fail.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from broker_config.deploy import BrokerLayout
from provisioning import pki
from simulator.crl_refresh import CRLRefresher, service_commands
from simulator.processes import Mosquitto, free_port

from .test_broker_crl import DEVICE_PKI, Office, certificate, connack, refused, render, run

pytestmark = pytest.mark.integration
CRL_LIFETIME_S = 10
WATCH_S = 60.0


@pytest.fixture
def short_office(tmp_path: Path) -> Office:
    run(DEVICE_PKI, "init", tmp_path / "pki", "--crl-lifetime", f"{CRL_LIFETIME_S}s")
    paths = pki.PKIPaths(tmp_path / "pki")
    (tmp_path / "clients").mkdir()
    return Office(paths, pki.read_authority(paths.device_ca), tmp_path / "clients")


@pytest.fixture
def broker_home() -> Iterator[Path]:
    parent = Path(tempfile.mkdtemp(prefix="broker-refresh-"))
    parent.chmod(0o755)  # noqa: S103 - holds only the broker's own directory
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_the_shipped_refresh_keeps_a_ten_second_crl_from_lapsing(
        short_office: Office, broker_home: Path, tmp_path: Path,
        record_property: pytest.RecordProperty) -> None:
    office = short_office
    healthy = [office.device(f"healthy-{n}") for n in range(3)]
    revoked = office.device("revoked")
    office.revoke(revoked)
    port, out = free_port(), broker_home / "broker"
    render(office, out, port)
    installed = BrokerLayout(out).crl
    trust = office.paths.server_trust
    period = CRL_LIFETIME_S / 4

    with Mosquitto(broker_home, out / "mosquitto.conf", port):
        rounds = 0
        with CRLRefresher(service_commands(office.paths.base, out), period,
                          tmp_path / "refresh.log") as refresher:
            started = time.monotonic()
            while time.monotonic() - started < WATCH_S:
                assert [connack(port, trust, device) for device in healthy] == [0] * 3, rounds
                assert refused(port, trust, revoked)
                rounds += 1
                time.sleep(1.0)
        crl = x509.load_pem_x509_crl(installed.read_bytes())
        assert certificate(revoked).serial_number in {e.serial_number for e in crl}
        assert refresher.failures == 0, refresher.last_failure
        assert refresher.runs >= WATCH_S / CRL_LIFETIME_S  # it spanned several lifetimes
        record_property("admitted_rounds", rounds)
        print(f"\n{rounds} rounds over {WATCH_S:.0f}s, {refresher.runs} refreshes, "
              f"CRL lifetime {CRL_LIFETIME_S}s")

        # the refresh stopped: once the installed CRL is past nextUpdate, nobody gets in
        assert crl.next_update_utc is not None
        time.sleep(max(0.0, (crl.next_update_utc - dt.datetime.now(dt.UTC)).total_seconds())
                   + 1.5)
        assert all(refused(port, trust, device) for device in healthy)
