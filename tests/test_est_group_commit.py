"""Group commit in the EST service: several requests, one transaction, each answered as if
it had come alone (a savepoint each), and nothing answered before the commit."""

from __future__ import annotations

import base64
import datetime as dt
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import pki
from provisioning.enrollment import Operation, Outcome, Peer, Policy
from provisioning.errors import PKIError, RegistryError
from provisioning.est_service import Call, EnrollmentService, Result
from provisioning.registry import CertKind, Registry, open_registry

DAY = dt.timedelta(days=1)
FACTORY = pki.new_root("Factory CA", pki.ROOT_LIFETIME, ecdsa=True)
ROOT = pki.new_root("Root", pki.ROOT_LIFETIME)
DEVICE_CA = ROOT.issue_ca("Device CA", ec.generate_private_key(ec.SECP256R1()), pki.CA_LIFETIME)


class FailingCA:
    """The Device CA, except that signing for the devices in ``refuse`` fails."""

    def __init__(self, refuse: set[str]) -> None:
        self.certificate = DEVICE_CA.certificate
        self.refuse = refuse

    def issue_client(self, device_id: str, *args: Any, **kwargs: Any) -> x509.Certificate:
        if device_id in self.refuse:
            raise PKIError(f"the token would not sign for {device_id}")
        return DEVICE_CA.issue_client(device_id, *args, **kwargs)


@pytest.fixture
def registry(registry_location: Path | str) -> Iterator[Registry]:
    with open_registry(registry_location) as opened:
        yield opened


def enroll_call(registry: Registry, device_id: str) -> Call:
    """A registered device's first simpleenroll, with a CSR for a new key."""
    boot_key = ec.generate_private_key(ec.SECP256R1())
    boot = FACTORY.issue_client(device_id, boot_key.public_key(), DAY)
    registry.register_device(device_id, boot)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id)]))
           .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))
    body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
    peer = Peer.from_certificate(boot, FACTORY.certificate, DEVICE_CA.certificate)
    return Call(Operation.ENROLL, peer, body)


def service(registry: Registry, ca: object = DEVICE_CA) -> EnrollmentService:
    return EnrollmentService(ca, FACTORY.certificate, registry, Policy(), DAY)  # type: ignore[arg-type]


def commits(registry: Registry) -> list[str]:
    """Every COMMIT the SQLite connection executes from now on."""
    seen: list[str] = []
    registry._db._db.set_trace_callback(  # type: ignore[attr-defined]
        lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


def issued(outcome: Result | Exception) -> x509.Certificate:
    assert isinstance(outcome, Result), outcome
    assert outcome.decision.outcome is Outcome.ISSUE
    assert outcome.certificate is not None
    return outcome.certificate


def test_requests_share_one_commit(registry: Registry, registry_location: Path | str) -> None:
    calls = [enroll_call(registry, f"dev-{i}") for i in range(3)]
    enrollments = service(registry)
    seen = commits(registry) if isinstance(registry_location, Path) else None
    outcomes = enrollments.handle_all(calls)
    certificates = [issued(outcome) for outcome in outcomes]
    if seen is not None:
        assert len(seen) == 1
    for i, certificate in enumerate(certificates):
        record = registry.certificate(certificate.serial_number, certificate.issuer)
        assert record is not None and record.device_id == f"dev-{i}"
    decisions = [entry for entry in registry.audit_log() if entry.action == "simpleenroll"]
    assert [(e.device_id, e.decision) for e in decisions] == [
        (f"dev-{i}", "issued") for i in range(3)]


def test_calls_that_came_while_the_lock_was_taken_join_the_batch(
        registry: Registry, registry_location: Path | str) -> None:
    first, *later = [enroll_call(registry, f"dev-{i}") for i in range(3)]
    enrollments = service(registry)
    seen = commits(registry) if isinstance(registry_location, Path) else None
    holding, leaving = threading.Event(), threading.Event()

    def other_writer() -> None:
        with open_registry(registry_location) as other, other.transaction():
            holding.set()
            leaving.wait(0.3)
            leaving.set()

    joined_after_the_other_left: list[bool] = []

    def joining() -> list[Call]:
        joined_after_the_other_left.append(leaving.is_set())
        return later

    holder = threading.Thread(target=other_writer)
    holder.start()
    assert holding.wait(10)
    outcomes = enrollments.handle_all([first], joining)
    holder.join(10)
    assert joined_after_the_other_left == [True]
    certificates = [issued(outcome) for outcome in outcomes]
    for i, certificate in enumerate(certificates):
        record = registry.certificate(certificate.serial_number, certificate.issuer)
        assert record is not None and record.device_id == f"dev-{i}"
    if seen is not None:
        assert len(seen) == 1


def test_one_failure_takes_back_only_its_own(registry: Registry) -> None:
    calls = [enroll_call(registry, f"dev-{i}") for i in range(3)]
    outcomes = service(registry, FailingCA({"dev-1"})).handle_all(calls)
    issued(outcomes[0])
    issued(outcomes[2])
    assert isinstance(outcomes[1], PKIError)
    assert sorted(r.device_id for r in registry.certificates()
                  if r.kind is CertKind.OPERATIONAL) == ["dev-0", "dev-2"]
    audited = {e.device_id for e in registry.audit_log() if e.action == "simpleenroll"}
    assert audited == {"dev-0", "dev-2"}  # dev-1's transaction, alone, would have rolled back


def test_a_failed_commit_answers_each_alone(tmp_path: Path) -> None:
    with open_registry(tmp_path / "registry.db") as registry:
        calls = [enroll_call(registry, f"dev-{i}") for i in range(3)]
        enrollments = service(registry)
        database: Any = registry._db
        real_commit = database.commit
        failures = [RegistryError("disk full")]

        def commit() -> None:
            if failures:
                database.rollback()
                raise failures.pop()
            real_commit()

        database.commit = commit
        outcomes = enrollments.handle_all(calls)
        certificates = [issued(outcome) for outcome in outcomes]
        operational = [r for r in registry.certificates() if r.kind is CertKind.OPERATIONAL]
        # the batch's rows were rolled back: one certificate each, the one answered
        assert sorted(r.serial for r in operational) == sorted(
            f"{c.serial_number:x}" for c in certificates)


def test_a_lone_request_gets_its_error_and_leaves_nothing(registry: Registry) -> None:
    call = enroll_call(registry, "dev-0")
    [outcome] = service(registry, FailingCA({"dev-0"})).handle_all([call])
    assert isinstance(outcome, PKIError)
    assert registry.certificates("dev-0")[-1].kind is CertKind.BOOTSTRAP


def test_savepoint_needs_a_transaction(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="inside a transaction"), registry.savepoint():
        pass
