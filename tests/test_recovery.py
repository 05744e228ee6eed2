"""The recovery listener and the bootstrap fallback, on a real est-server with real TLS.

Expired certificates are issued directly by the Device CA with a ``not_before``
in the past and recorded in the registry, as if the device had enrolled long
ago and been switched off since. Keys are software keys: the TPM side is the
agent's tests' business.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from provisioning import pki
from provisioning.registry import AuditEntry, CertKind, DeviceState, serial_hex

from .est_support import (
    TLS_REFUSED,
    ESTServer,
    Identity,
    Reply,
    bootstrap_identity,
    csr_der,
    enroll,
    new_key,
    post,
    recover,
    running_est_server,
    save_identity,
)

pytestmark = pytest.mark.integration
NOW = dt.datetime.now(dt.UTC)
HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           est_pki: pki.PKIPaths) -> Iterator[ESTServer]:
    """The default recovery policy: 90 days of grace, 3 recoveries a day."""
    with running_est_server(tmp_path_factory.mktemp("recovery-server"), est_pki, recovery=True,
                            certificate_lifetime="1h") as running:
        yield running


@pytest.fixture(scope="module")
def device_ca(est_pki: pki.PKIPaths) -> pki.Authority:
    return pki.read_authority(est_pki.device_ca)


@dataclass
class Device:
    """One device's credentials, made the way the registry would have seen them."""

    server: ESTServer
    factory: pki.Authority
    device_ca: pki.Authority
    directory: Path
    device_id: str
    boot: Identity = field(init=False)

    def __post_init__(self) -> None:
        self.boot = bootstrap_identity(self.directory, self.factory, self.device_id)
        with self.server.registry() as registry:
            registry.register_device(self.device_id, self.boot.certificate)

    def operational(self, expired_for: dt.timedelta | None = HOUR,
                    key: CertificateIssuerPrivateKeyTypes | None = None) -> Identity:
        """An operational certificate on record: expired ``expired_for`` ago, or valid if None."""
        key = key or new_key()
        if expired_for is None:
            cert = self.device_ca.issue_client(self.device_id, key.public_key(), HOUR)
        else:
            cert = self.device_ca.issue_client(self.device_id, key.public_key(), HOUR,
                                               not_before=NOW - expired_for - HOUR)
        with self.server.registry() as registry:
            registry.record_certificate(self.device_id, cert, CertKind.OPERATIONAL)
        return save_identity(self.directory, f"op-{serial_hex(cert.serial_number)}",
                             self.device_id, cert, key)

    def audit(self) -> list[AuditEntry]:
        with self.server.registry() as registry:
            return registry.audit_log(self.device_id)


@pytest.fixture
def make_device(server: ESTServer, factory_ca: pki.Authority, device_ca: pki.Authority,
                tmp_path: Path, request: pytest.FixtureRequest) -> Callable[[str], Device]:
    def make(suffix: str = "") -> Device:
        name = "rec-" + request.node.name.split("[")[-1].strip("]").replace(" ", "-") + suffix
        return Device(server, factory_ca, device_ca, tmp_path / name, name[:64])
    return make


def refused(reply: Reply, status: int, reason: str, device: Device,
            audit_before: list[AuditEntry]) -> None:
    """The refusal as the client reads it, and one audit row that says the same."""
    assert (reply.status, reason in reply.text) == (status, True), reply.text
    [row] = device.audit()[len(audit_before):]
    assert (row.action, row.decision, row.status, row.reason) == \
        ("recovery", "refused", status, reply.text)


def test_an_expired_certificate_within_grace_recovers(server: ESTServer,
                                                      make_device: Callable[[str], Device],
                                                      device_ca: pki.Authority) -> None:
    device = make_device("")
    expired = device.operational(expired_for=2 * HOUR)
    before = device.audit()
    key = new_key()

    reply = recover(server, expired, key)

    assert reply.status == 200, reply.text
    [cert] = reply.certificates()
    cert.verify_directly_issued_by(device_ca.certificate)
    assert (cert.subject, cert.public_key()) == (expired.certificate.subject, key.public_key())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        expired.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC)
    old, new = serial_hex(expired.certificate.serial_number), serial_hex(cert.serial_number)
    with server.registry() as registry:
        record = registry.certificate(old)
        assert record is not None
        assert (record.status, record.revocation_reason) == ("revoked", "superseded")
        assert registry.certificate(new) is not None
        crl = pki.build_crl(device_ca, registry.revocations(), 1, dt.datetime.now(dt.UTC))
    entry = crl.get_revoked_certificate_by_serial_number(expired.certificate.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.superseded
    [row] = device.audit()[len(before):]
    assert (row.action, row.decision, row.status, row.peer_serial, row.issued_serial) == \
        ("recovery", "issued", 200, old, new)
    assert row.reason == \
        f"recovered: certificate {old} expired 2h ago (grace 90d) and is superseded"
    # The recovered certificate is an ordinary one now: renewal, not recovery.
    renewed = enroll(server, save_identity(device.directory, "recovered", device.device_id, cert,
                                           key), new_key(), "simplereenroll")
    assert renewed.status == 200, renewed.text


def test_past_grace_the_bootstrap_certificate_is_the_way_back(
        server: ESTServer, make_device: Callable[[str], Device]) -> None:
    device = make_device("")
    stale = device.operational(expired_for=100 * DAY)
    before = device.audit()

    reply = recover(server, stale, new_key())
    refused(reply, 403, "expired 100d ago, past the recovery grace of 90d", device, before)

    fallback = enroll(server, device.boot, new_key())
    assert fallback.status == 200, fallback.text
    first, second = device.audit()[len(before):]
    assert first.decision == "refused"
    assert (second.action, second.decision, second.peer_serial) == \
        ("simpleenroll", "issued", serial_hex(device.boot.certificate.serial_number))
    assert second.reason.startswith(f"re-enrolled with bootstrap: device {device.device_id} "
                                    f"was already enrolled (latest certificate "
                                    f"{serial_hex(stale.certificate.serial_number)})")


def _revoked(device: Device) -> tuple[Identity, bytes]:
    expired = device.operational()
    with device.server.registry() as registry:
        registry.revoke(expired.certificate.serial_number, x509.ReasonFlags.key_compromise)
    return expired, _csr(device.device_id)


def _suspended(device: Device) -> tuple[Identity, bytes]:
    expired = device.operational()
    with device.server.registry() as registry:
        registry.set_state(device.device_id, DeviceState.SUSPENDED)
    return expired, _csr(device.device_id)


def _earlier_key(device: Device) -> tuple[Identity, bytes]:
    earlier = new_key()
    device.operational(expired_for=10 * DAY, key=earlier)
    return device.operational(), _csr(device.device_id, earlier)


def _not_latest(device: Device) -> tuple[Identity, bytes]:
    older = device.operational(expired_for=2 * HOUR)
    device.operational()
    return older, _csr(device.device_id)


def _csr(name: str, key: CertificateIssuerPrivateKeyTypes | None = None) -> bytes:
    return base64.encodebytes(csr_der(key or new_key(), name))


@dataclass(frozen=True)
class Case:
    name: str
    setup: Callable[[Device], tuple[Identity | None, bytes]]
    status: int | None  # None: the TLS layer refuses, no HTTP request reaches the application
    reason: str



CASES = [
    Case("revoked", _revoked, 403, "is revoked (keyCompromise)"),
    Case("csr-for-another-device",
         lambda d: (d.operational(), _csr("rec-victim")),
         403, "the CSR subject differs from the certificate being renewed"),
    Case("valid-certificate", lambda d: (d.operational(expired_for=None), _csr(d.device_id)),
         401, "has not expired; renew it on simplereenroll"),
    Case("suspended", _suspended, 403, "is suspended"),
    Case("same-key", lambda d: (lambda e: (e, _csr(d.device_id, e.private_key)))(d.operational()),
         403, "re-enrollment must use a new key"),
    Case("earlier-key", _earlier_key, 403, "re-enrollment must use a new key"),
    Case("not-latest", _not_latest, 403, "only the latest may be recovered"),
    Case("bootstrap-certificate", lambda d: (d.boot, _csr(d.device_id)), None, "TLS: unknown CA"),
    Case("no-client-certificate", lambda d: (None, _csr(d.device_id)), None,
         "certificate required"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refusal(case: Case, server: ESTServer, make_device: Callable[[str], Device]) -> None:
    device = make_device("")
    identity, body = case.setup(device)
    with server.registry() as registry:
        certificates_before = registry.certificates()
        audit_before = registry.audit_log(limit=100000)

    try:
        reply = post(server, "recovery/simplereenroll", body, identity,
                     port=server.recovery_port)
    except TLS_REFUSED as exc:
        reply = Reply(0, {}, str(exc).encode())

    with server.registry() as registry:
        assert registry.certificates() == certificates_before  # nothing issued, nothing revoked
        new_rows = registry.audit_log(limit=100000)[len(audit_before):]
    if case.status is None:
        assert reply.status == 0
        assert new_rows == []
        return
    assert (reply.status, case.reason in reply.text) == (case.status, True), reply.text
    [row] = new_rows
    assert (row.action, row.decision, row.status, row.reason, row.device_id) == \
        ("recovery", "refused", case.status, reply.text, device.device_id)


def test_the_fourth_recovery_within_a_day_waits(server: ESTServer,
                                                make_device: Callable[[str], Device]) -> None:
    device = make_device("")
    before = device.audit()
    for _ in range(3):
        reply = recover(server, device.operational(), new_key())
        assert reply.status == 200, reply.text

    reply = recover(server, device.operational(), new_key())

    assert reply.status == 429, reply.text
    assert 86000 < int(reply.headers["Retry-After"]) <= 86400
    rows = device.audit()[len(before):]
    assert [(r.decision, r.status) for r in rows] == [("issued", 200)] * 3 + [("refused", 429)]
    assert rows[-1].reason == reply.text == \
        f"3 recoveries within 24 h is the limit for {device.device_id}"


def test_bootstrap_reenrollment_supersedes_and_has_a_daily_budget(
        server: ESTServer, make_device: Callable[[str], Device]) -> None:
    device = make_device("")
    first = enroll(server, device.boot, new_key())
    assert first.status == 200, first.text
    [live] = first.certificates()
    for _ in range(3):
        again = enroll(server, device.boot, new_key())
        assert again.status == 200, again.text

    over = enroll(server, device.boot, new_key())

    assert (over.status, over.text) == \
        (429, f"3 bootstrap re-enrollments within 24 h is the limit for {device.device_id}")
    assert 86000 < int(over.headers["Retry-After"]) <= 86400
    with server.registry() as registry:
        record = registry.certificate(live.serial_number)
        assert record is not None and record.revocation_reason == "superseded"
        live_serials = registry.unexpired_operational(device.device_id, dt.datetime.now(dt.UTC))
    assert len(live_serials) == 1  # only the last re-enrollment's certificate is in force
    rows = [r for r in device.audit() if r.action == "simpleenroll"]
    assert [(r.decision, r.status, r.reason.split(":")[0]) for r in rows] == \
        [("issued", 200, "issued")] + [("issued", 200, "re-enrolled with bootstrap")] * 3 \
        + [("refused", 429, over.text)]


def test_bootstrap_reenrollment_can_be_switched_off(est_pki: pki.PKIPaths,
                                                    factory_ca: pki.Authority,
                                                    device_ca: pki.Authority,
                                                    tmp_path: Path) -> None:
    with running_est_server(tmp_path / "srv", est_pki, bootstrap_reenroll="never") as strict:
        assert strict.recovery_port is None  # recovery=False: no second listener
        device = Device(strict, factory_ca, device_ca, tmp_path / "dev", "rec-never")
        assert enroll(strict, device.boot, new_key()).status == 200
        again = enroll(strict, device.boot, new_key())
        assert (again.status, "policy allows no re-enrollment" in again.text) == (403, True)
        assert [r.decision for r in device.audit() if r.action == "simpleenroll"] == \
            ["issued", "refused"]
