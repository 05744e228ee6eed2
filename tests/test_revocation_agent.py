"""`device-pki revoke --broker`: a running TPM-backed agent is cut off and stays out."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from provisioning import pki
from provisioning.registry import CertKind, DeviceState, IssuanceKind
from simulator.processes import SoftwareTPM

from .conftest import RenderedBroker, factory_device, rendered_broker
from .est_support import ESTServer

pytestmark = pytest.mark.integration


def device_pki(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "provisioning.cli", *map(str, args)]


@pytest.fixture
def own_broker(pki_dir: pki.PKIPaths, enrollment_server: ESTServer
               ) -> Iterator[RenderedBroker]:
    """A broker holding the CRL of the enrollment server's registry (the session's PKI is
    shared by servers with registries of their own, each publishing its own CRL)."""
    assert enrollment_server.crl is not None
    published = subprocess.run(
        device_pki("crl", "--pki", pki_dir.base, "--registry", enrollment_server.registry_path,
                   "--crl", enrollment_server.crl),
        capture_output=True, text=True, timeout=60, check=False)
    assert published.returncode == 0, published.stderr
    with rendered_broker(pki_dir, enrollment_server.crl) as broker:
        yield broker


def test_revoking_a_certificate_ends_the_session_and_only_a_new_certificate_returns(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths,
    enrollment_server: ESTServer,
    own_broker: RenderedBroker,
) -> None:
    """`device-pki revoke SERIAL`: one certificate, the device stays active. The session
    ends at once and the revoked certificate never gets in again; the agent asks the EST
    server (403: revoked) and comes back through its bootstrap certificate with a new
    TPM key. (To keep a device out, `revoke-device`: the test below.)"""
    # a renewal in the middle would bring a new, unrevoked certificate: renew late
    agent = factory_device(tmp_path / "dev", "revoked-1", swtpm, pki_dir, enrollment_server,
                           own_broker.mosquitto, fraction=0.9)
    broker_log = own_broker.mosquitto.process
    with agent:
        status = agent.wait_for(lambda s: s.get("connected"), 30, "connection")
        revoked = status["cert_serial"]
        offset = broker_log.log_offset()
        started = time.monotonic()
        result = subprocess.run(
            device_pki("revoke", revoked, "--reason", "keyCompromise", "--pki", pki_dir.base,
                       "--registry", enrollment_server.registry_path,
                       "--crl", enrollment_server.crl, "--broker", own_broker.layout.base),
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        ended = "Client revoked-1 been disconnected by administrative action"
        while ended not in broker_log.log_since(offset):
            assert time.monotonic() - started < 10, broker_log.log_since(offset)
            time.sleep(0.01)
        cut_off = time.monotonic() - started
        back = agent.wait_for(lambda s: s.get("connected") and s["cert_serial"] != revoked,
                              30, "return with a new certificate")
    print(f"\ndevice-pki revoke to disconnection: {cut_off * 1000:.0f} ms; back with a new "
          f"certificate after {time.monotonic() - started:.1f} s")
    assert back["link"]["connects"] == 1  # the new credential's link: first connect
    with enrollment_server.registry() as registry:
        record = registry.certificate(revoked, pki_dir_name(pki_dir))
        kinds = [i.kind for i in registry.issuances("revoked-1")]
        device = registry.device("revoked-1")
    assert record is not None and record.revocation_reason == "keyCompromise"
    assert kinds == [IssuanceKind.ENROLL, IssuanceKind.BOOTSTRAP_REENROLL]
    assert device is not None and device.state is DeviceState.ACTIVE


def pki_dir_name(paths: pki.PKIPaths) -> x509.Name:
    return pki.load_certs(paths.device_ca / "ca.pem")[0].subject


def test_revoke_device_mid_renewal_leaves_nothing_valid_until_activate(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths,
    enrollment_server: ESTServer, own_broker: RenderedBroker,
) -> None:
    """The renewal is held inside the EST server (the test holds the registry's write
    lock) when `device-pki revoke-device` starts; whichever takes the lock first, the
    device ends with no valid certificate, cut off, its bootstrap refused; `activate`
    brings it back through the bootstrap certificate and lifts the broker's ban.

    Before: `revoke` left the device active, the renewal's certificate valid, the
    bootstrap path open, and the ban on the broker for good.
    """
    device_id = "revoked-2"
    agent = factory_device(tmp_path / "dev", device_id, swtpm, pki_dir, enrollment_server,
                           own_broker.mosquitto, fraction=0.4)
    registry_path = enrollment_server.registry_path
    # the registry's CRL, which its EST server also publishes to after every supersede
    common = ["--pki", pki_dir.base, "--registry", registry_path,
              "--crl", enrollment_server.crl, "--broker", own_broker.layout.base]
    with agent:
        agent.wait_for(lambda s: s.get("connected"), 30, "connection")
        hold = sqlite3.connect(registry_path, isolation_level=None, timeout=10)
        hold.execute("BEGIN IMMEDIATE")
        try:
            agent.wait_for(lambda s: s.get("state") == "renewing", 15, "a renewal")
            time.sleep(1.0)  # its request reaches the server and waits for the lock
            revoking = subprocess.Popen(
                device_pki("revoke-device", device_id, "--reason", "keyCompromise", *common),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
        finally:
            hold.execute("ROLLBACK")
            hold.close()
        out, err = revoking.communicate(timeout=60)
        assert revoking.returncode == 0, err
        print(f"\n{out.strip()}")

        with enrollment_server.registry() as registry:
            device = registry.device(device_id)
            records = [r for r in registry.certificates(device_id)
                       if r.kind is CertKind.OPERATIONAL]
            issued_before = len(registry.issuances(device_id))
        assert device is not None and device.state is DeviceState.SUSPENDED
        now = dt.datetime.now(dt.UTC)
        unexpired = {int(r.serial, 16) for r in records
                     if dt.datetime.fromisoformat(r.not_after) > now}
        assert unexpired and all(r.revoked for r in records
                                 if int(r.serial, 16) in unexpired)
        installed = x509.load_pem_x509_crl(own_broker.layout.crl.read_bytes())
        assert unexpired <= {entry.serial_number for entry in installed}
        renewal = "issued, then revoked" if len(records) == 2 else "refused"
        print(f"the held renewal was {renewal}")

        agent.wait_for(lambda s: not s.get("connected"), 10, "disconnection")
        # it falls back to its bootstrap certificate, which is refused while suspended
        deadline = time.monotonic() + 30
        while True:
            with enrollment_server.registry() as registry:
                refused = [e for e in registry.audit_log(device_id)
                           if e.action == "simpleenroll" and e.status == 403]
                issued_now = len(registry.issuances(device_id))
            if refused:
                break
            assert time.monotonic() < deadline, agent.log_text()[-3000:]
            time.sleep(0.2)
        assert issued_now == issued_before
        assert not agent.status().get("connected")

        activated = subprocess.run(device_pki("activate", device_id, *common),
                                   capture_output=True, text=True, timeout=60, check=False)
        assert activated.returncode == 0, activated.stderr
        back = agent.wait_for(lambda s: s.get("connected") and int(s["cert_serial"], 16)
                              not in unexpired, 40, "re-enrollment after activate")
        acked = back["link"]["acked"]
        agent.wait_for(lambda s: s["link"]["acked"] > acked + 2, 15, "publishes accepted")
    with enrollment_server.registry() as registry:
        kinds = [i.kind for i in registry.issuances(device_id)]
    assert kinds[-1] is IssuanceKind.BOOTSTRAP_REENROLL
