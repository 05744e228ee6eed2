"""A broker outage across a rotation: the new credential is kept, one renewal, no loss.

Before: the switch rolled back whenever the new link had not connected within 60 s and
deleted the new generation; the device then renewed again, rolled back to its expired
certificate, recovered, re-enrolled with its bootstrap: four certificates for one outage.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from broker_config import revocation
from device_agent.agent import SWITCH_TIMEOUT
from provisioning import pki
from provisioning.registry import CertKind
from simulator.monitor import TelemetryMonitor
from simulator.processes import SoftwareTPM

from .conftest import ClientFiles, factory_device, rendered_broker
from .est_support import running_est_server

pytestmark = pytest.mark.integration


def sleep_until(moment: dt.datetime) -> None:
    time.sleep(max(0.0, (moment - dt.datetime.now(dt.UTC)).total_seconds()))


@pytest.mark.timeout(480)
def test_a_broker_outage_over_a_due_renewal_keeps_the_new_credential(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, backend: ClientFiles,
) -> None:
    with rendered_broker(pki_dir) as own, \
            running_est_server(tmp_path / "est", pki_dir, certificate_lifetime="200s") as est, \
            TelemetryMonitor(port=own.port, cafile=pki_dir.server_trust, cert=backend.cert,
                             key=backend.key) as monitor:
        # renewal late in the lifetime (0.9): the second certificate's own renewal is due
        # only after the broker is back and the link's backoff (up to 60 s) has run out
        device = factory_device(tmp_path / "dev", "outage-1", swtpm, pki_dir, est,
                                own.mosquitto, fraction=0.9)
        with device as agent:
            first = agent.wait_for(lambda s: s.get("connected") and s.get("generation") == 1,
                                   30, "enrollment")
            renew_at = dt.datetime.fromisoformat(first["renew_at"])
            expires = dt.datetime.fromisoformat(first["cert_not_after"])
            sleep_until(renew_at - dt.timedelta(seconds=8))
            own.mosquitto.stop()  # from before the renewal until past the first's expiry
            agent.wait_for(lambda s: s.get("generation") == 2, 40, "renewal while away")
            # past the switch timeout and past the first certificate's expiry
            sleep_until(max(expires, renew_at + dt.timedelta(seconds=SWITCH_TIMEOUT))
                        + dt.timedelta(seconds=8))
            during = agent.status()
            own.mosquitto.start()
            # the queue drained (telemetry keeps flowing, so one or two may be in flight)
            back = agent.wait_for(lambda s: s.get("connected") and s.get("outbox_depth", 99) < 5,
                                  80, "reconnection and delivery")
            with est.registry() as registry:  # before the second one's own renewal is due
                issued = [r.kind for r in registry.certificates("outage-1")]
            assert agent.stop() == 0
        last = agent.status()["last_seq"]
        assert monitor.wait_until(lambda: not monitor.missing("outage-1", 1, last), 30), \
            monitor.missing("outage-1", 1, last)[:20]
    assert issued == [CertKind.BOOTSTRAP, CertKind.OPERATIONAL, CertKind.OPERATIONAL], issued
    assert (during["generation"], back["generation"]) == (2, 2)
    credentials = tmp_path / "dev" / "state" / "credentials"
    assert sorted(p.name for p in credentials.iterdir() if not p.is_symlink()) == \
        ["gen-000001", "gen-000002"]  # nothing deleted, nothing failed
    assert "rolling back" not in agent.log_text()


def test_a_brokers_expired_alert_for_a_valid_certificate_is_the_brokers_problem(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths,
) -> None:
    """Mosquitto with an expired CRL answers every client "certificate expired".

    Before: the agent took the alert as its own expiry and recovered through its
    bootstrap again and again (generation 1 to 4 in ten seconds). Now the EST server's
    clock is asked for a second opinion; the certificate is valid, so it stays.
    Hour-long certificates: a scheduled renewal (the session server's 20 s certificates
    fall due at ~13 s) must not be counted as churn on a slow machine.
    """
    with rendered_broker(pki_dir) as own, \
            running_est_server(tmp_path / "est", pki_dir, certificate_lifetime="1h") as est:
        authority = pki.read_authority(pki_dir.device_ca)
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        lapsing = pki.build_crl(authority, [], 2, now, lifetime=dt.timedelta(seconds=2))
        own.mosquitto.stop()
        # the shipped installer: a stopped broker's CRL directory holds this CRL alone
        revocation.install_crl(own.layout, lapsing.public_bytes(serialization.Encoding.PEM))
        time.sleep(3)
        own.mosquitto.start()  # reads only the CRL that has now passed nextUpdate
        device = factory_device(tmp_path / "dev", "crl-victim", swtpm, pki_dir,
                                est, own.mosquitto)
        with device as agent:
            status = agent.wait_for(
                lambda s: any("broker's CRL may have expired" in e for e in s["errors"]),
                40, "the second opinion")
            time.sleep(5)  # time enough for the old churn: a recovery every few seconds
            status = agent.status()
        with est.registry() as registry:
            issued = [r.kind for r in registry.certificates("crl-victim")]
    assert issued == [CertKind.BOOTSTRAP, CertKind.OPERATIONAL], issued
    assert status["generation"] == 1 and not status["connected"]
