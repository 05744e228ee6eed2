"""simplereenroll is not a mint (issue 13): one credential renewing in a loop, on the real server.

Before: a credential renewed as often as it liked (1,944 certificates in 30 s) and every
certificate it got stayed valid, so revoking the serial an operator knew left the rest
usable. Now each renewal supersedes the device's older certificates and a device has a
daily budget of renewals (429 with Retry-After beyond it).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from provisioning import pki
from provisioning.registry import (
    CertKind,
    IssuanceKind,
    certificate_fingerprint,
    public_key_fingerprint,
    serial_hex,
    timestamp,
)

from .est_support import (
    ESTServer,
    Identity,
    bootstrap_identity,
    enroll,
    new_key,
    running_est_server,
    save_identity,
)
from .test_registry import SCHEMA_1

pytestmark = pytest.mark.integration
BUDGET = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           est_pki: pki.PKIPaths) -> Iterator[ESTServer]:
    """Week-long certificates, so a budget of 5 renewals a day is a valid configuration."""
    with running_est_server(tmp_path_factory.mktemp("renewal-server"), est_pki,
                            certificate_lifetime="7d", renewals_per_day=BUDGET) as running:
        yield running


def enrolled(server: ESTServer, factory: pki.Authority, directory: Path,
             device_id: str) -> Identity:
    """A registered device with its first operational certificate, saved as generation 0."""
    boot = bootstrap_identity(directory, factory, device_id)
    with server.registry() as registry:
        registry.register_device(device_id, boot.certificate)
    key = new_key()
    reply = enroll(server, boot, key)
    assert reply.status == 200, reply.text
    [cert] = reply.certificates()
    return save_identity(directory, "gen-0", device_id, cert, key)


def serial(cert: x509.Certificate) -> str:
    return serial_hex(cert.serial_number)


def test_renewing_in_a_loop_gets_the_budget_and_leaves_one_certificate_live(
    server: ESTServer, factory_ca: pki.Authority, tmp_path: Path,
) -> None:
    current = enrolled(server, factory_ca, tmp_path, "minter")
    issued = [current.certificate]
    statuses, waits = [], []
    for generation in range(1, BUDGET + 4):  # always with the newest credential
        key = new_key()
        reply = enroll(server, current, key, "simplereenroll")
        statuses.append(reply.status)
        if reply.status == 200:
            [cert] = reply.certificates()
            issued.append(cert)
            current = save_identity(tmp_path, f"gen-{generation}", "minter", cert, key)
        else:
            waits.append(int(reply.headers["Retry-After"]))

    assert statuses == [200] * BUDGET + [429] * 3
    assert all(86000 < wait <= 86400 for wait in waits), waits
    with server.registry() as registry:
        operational = [r for r in registry.certificates("minter")
                       if r.kind is CertKind.OPERATIONAL]
        issuances = registry.issuances("minter")
        audit = [(e.action, e.decision, e.status) for e in registry.audit_log("minter")]
    assert [r.serial for r in operational] == [serial(c) for c in issued]
    assert [(r.status, r.revocation_reason) for r in operational] == \
        [("revoked", "superseded")] * BUDGET + [("issued", None)]
    assert [(i.kind, i.serial) for i in issuances] == \
        [(IssuanceKind.ENROLL, serial(issued[0]))] + \
        [(IssuanceKind.RENEW, serial(c)) for c in issued[1:]]
    assert audit[2:] == [("simplereenroll", "issued", 200)] * BUDGET + \
        [("simplereenroll", "refused", 429)] * 3


def test_a_renewed_credential_cannot_renew_again(
    server: ESTServer, factory_ca: pki.Authority, tmp_path: Path,
) -> None:
    first = enrolled(server, factory_ca, tmp_path, "replayer")
    statuses = [enroll(server, first, new_key(), "simplereenroll").status for _ in range(3)]

    assert statuses == [200, 403, 403]
    with server.registry() as registry:
        operational = [(r.serial, r.status, r.revocation_reason)
                       for r in registry.certificates("replayer")
                       if r.kind is CertKind.OPERATIONAL]
        renewals = [i.kind for i in registry.issuances("replayer")]
    assert operational[0] == (serial(first.certificate), "revoked", "superseded")
    assert [status for _, status, _ in operational] == ["revoked", "issued"]
    assert renewals == [IssuanceKind.ENROLL, IssuanceKind.RENEW]


def listed_after(crl_path: Path, serials: set[int], limit: float) -> float:
    """Seconds until the CRL at ``crl_path`` lists every serial of ``serials``."""
    started = time.monotonic()
    while True:
        try:
            crl = x509.load_pem_x509_crl(crl_path.read_bytes())
            if serials <= {entry.serial_number for entry in crl}:
                return time.monotonic() - started
        except (OSError, ValueError):
            pass  # not written yet
        assert time.monotonic() - started < limit, f"{serials} not on the CRL after {limit}s"
        time.sleep(0.01)


def test_a_supersede_reaches_the_published_crl_at_once(
    server: ESTServer, factory_ca: pki.Authority, tmp_path: Path,
    record_property: pytest.RecordProperty,
) -> None:
    """The server publishes the Device CA's CRL itself after every supersede (before:
    only the next ``device-pki crl`` or refresh did, up to an hour later), also for
    renewals in quick succession: each answer's superseded serial is published."""
    current = enrolled(server, factory_ca, tmp_path, "published")
    assert server.crl is not None
    crl, delays = server.crl, []
    for generation in range(1, 4):
        key = new_key()
        reply = enroll(server, current, key, "simplereenroll")
        assert reply.status == 200, reply.text
        delays.append(listed_after(crl, {current.certificate.serial_number}, 10.0))
        current = save_identity(tmp_path, f"gen-{generation}", "published",
                                reply.certificates()[0], key)
    published = x509.load_pem_x509_crl(crl.read_bytes())
    assert published.get_revoked_certificate_by_serial_number(
        current.certificate.serial_number) is None  # the newest stays valid
    record_property("supersede_to_crl_seconds_max", round(max(delays), 3))
    print(f"supersede -> published CRL: {', '.join(f'{d * 1000:.0f} ms' for d in delays)}")


def schema_1_registry(path: Path, boot: Identity, operational: Identity) -> None:
    """A registry as the previous release left it: one device, enrolled once."""
    db = sqlite3.connect(path)
    for statement in SCHEMA_1:
        db.execute(statement)
    at = timestamp()
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute("INSERT INTO devices VALUES (?, 'active', ?, ?, ?)",
               (boot.device_id, certificate_fingerprint(boot.certificate), at, at))
    for identity, kind, action in ((boot, "bootstrap", "register"),
                                   (operational, "operational", "simpleenroll")):
        cert = identity.certificate
        db.execute("INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, 'issued', NULL, NULL, ?)",
                   (serial(cert), boot.device_id, kind, timestamp(cert.not_valid_before_utc),
                    timestamp(cert.not_valid_after_utc),
                    public_key_fingerprint(cert.public_key()), at))
        db.execute("INSERT INTO audit (at, device_id, action, decision, status, reason,"
                   " issued_serial) VALUES (?, ?, ?, 'issued', 200, 'issued', ?)",
                   (at, boot.device_id, action, serial(cert)))
    db.commit()
    db.close()


def test_a_device_enrolled_before_the_upgrade_renews_after_it(
    est_pki: pki.PKIPaths, factory_ca: pki.Authority, tmp_path: Path,
) -> None:
    """Schema 1 did not record issuers: the server names them at start, so the certificate
    the device holds is still on record (401 "not on record" otherwise)."""
    device_ca = pki.read_authority(est_pki.device_ca)
    boot = bootstrap_identity(tmp_path, factory_ca, "upgraded")
    key = new_key()
    before = save_identity(tmp_path, "gen-0", "upgraded",
                           device_ca.issue_client("upgraded", key.public_key(),
                                                  dt.timedelta(days=7)), key)
    (tmp_path / "srv").mkdir()
    schema_1_registry(tmp_path / "srv" / "registry.sqlite3", boot, before)

    with running_est_server(tmp_path / "srv", est_pki, certificate_lifetime="7d") as upgraded:
        reply = enroll(upgraded, before, new_key(), "simplereenroll")
        assert reply.status == 200, reply.text
        [after] = reply.certificates()
        with upgraded.registry() as registry:
            old = registry.certificate(before.certificate.serial_number, device_ca.name)
            issuances = [(i.kind, i.issuer, i.serial) for i in registry.issuances("upgraded")]
    assert old is not None and (old.status, old.revocation_reason) == ("revoked", "superseded")
    issuer = device_ca.name.rfc4514_string()
    assert issuances == [(IssuanceKind.ENROLL, issuer, serial(before.certificate)),
                         (IssuanceKind.RENEW, issuer, serial(after))]
