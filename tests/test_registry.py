"""The registry: allowlist, issued certificates, revocations, held requests and the audit log."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import pki
from provisioning.errors import RegistryError
from provisioning.registry import (
    CertKind,
    DeviceState,
    Registry,
    open_registry,
    public_key_fingerprint,
    serial_hex,
)

DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def factory() -> pki.Authority:
    return pki.new_root("Factory CA", pki.ROOT_LIFETIME, ecdsa=True)


@pytest.fixture(scope="module")
def device_ca() -> pki.Authority:
    root = pki.new_root("Root", pki.ROOT_LIFETIME)
    return root.issue_ca("Device CA", ec.generate_private_key(ec.SECP256R1()), pki.CA_LIFETIME)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with open_registry(tmp_path / "registry.sqlite3") as opened:
        yield opened


def bootstrap(factory: pki.Authority, device_id: str) -> x509.Certificate:
    return factory.issue_client(device_id, ec.generate_private_key(ec.SECP256R1()).public_key(),
                                DAY)


def test_the_database_is_wal_with_a_schema_version(tmp_path: Path) -> None:
    with open_registry(tmp_path / "r.db"):
        pass
    with open_registry(tmp_path / "r.db"):  # a second open migrates nothing
        pass
    db = sqlite3.connect(tmp_path / "r.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    db.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with open_registry(tmp_path / "r.db"):
        pass
    db = sqlite3.connect(tmp_path / "r.db")
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(RegistryError, match="schema version 99"), open_registry(tmp_path / "r.db"):
        pass


def test_registering_allowlists_the_device_and_records_its_bootstrap_certificate(
    registry: Registry, factory: pki.Authority,
) -> None:
    cert = bootstrap(factory, "dev-1")
    device = registry.register_device("dev-1", cert)
    assert device.state is DeviceState.ACTIVE
    assert registry.register_device("dev-1", cert) == device  # idempotent
    record = registry.certificate(cert.serial_number)
    assert record is not None and record.kind is CertKind.BOOTSTRAP
    assert [e.decision for e in registry.audit_log("dev-1")] == ["allowlisted"]


def test_replacing_a_bootstrap_certificate_needs_the_previous_one(
    registry: Registry, factory: pki.Authority,
) -> None:
    first, second = bootstrap(factory, "dev-1"), bootstrap(factory, "dev-1")
    registry.register_device("dev-1", first)
    with pytest.raises(RegistryError, match="another bootstrap certificate"):
        registry.register_device("dev-1", second)
    registry.register_device("dev-1", second, previous=first)
    old = registry.certificate(first.serial_number)
    assert old is not None and old.revoked and old.revocation_reason == "superseded"


def test_a_certificate_for_another_name_is_not_registered(
    registry: Registry, factory: pki.Authority,
) -> None:
    with pytest.raises(RegistryError, match="names 'dev-2'"):
        registry.register_device("dev-1", bootstrap(factory, "dev-2"))
    assert registry.device("dev-1") is None


def test_a_service_identity_name_is_not_allowlisted(
    registry: Registry, factory: pki.Authority,
) -> None:
    with pytest.raises(RegistryError, match="reserved for a service identity"):
        registry.register_device("backend", bootstrap(factory, "backend"))
    assert registry.device("backend") is None


def test_revocations_feed_the_crl_and_are_not_repeated(
    registry: Registry, factory: pki.Authority, device_ca: pki.Authority,
) -> None:
    registry.register_device("dev-1", bootstrap(factory, "dev-1"))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = device_ca.issue_client("dev-1", key.public_key(), DAY)
    with registry.transaction():
        registry.record_certificate("dev-1", cert, CertKind.OPERATIONAL)
    assert registry.public_key_fingerprints("dev-1") >= {public_key_fingerprint(key.public_key())}
    registry.revoke(f"0x{cert.serial_number:X}", x509.ReasonFlags.key_compromise)
    [entry] = registry.revocations()
    assert entry.serial == cert.serial_number and entry.reason is x509.ReasonFlags.key_compromise
    with pytest.raises(RegistryError, match="was revoked"):
        registry.revoke(cert.serial_number, x509.ReasonFlags.superseded)
    with pytest.raises(RegistryError, match="no certificate"):
        registry.revoke("abc", x509.ReasonFlags.superseded)


def test_serials_are_spelled_one_way() -> None:
    assert serial_hex(0xABC) == serial_hex("0xABC") == serial_hex("0a:bc") == "abc"
    with pytest.raises(RegistryError, match="malformed serial"):
        serial_hex("xyz")


def test_a_held_request_waits_for_the_operator(registry: Registry, factory: pki.Authority) -> None:
    cert = bootstrap(factory, "newcomer")
    registry.hold("newcomer", cert)
    registry.hold("newcomer", cert)
    [held] = registry.pending_requests()
    assert (held.device_id, held.requests, held.decision) == ("newcomer", 2, "pending")
    registry.decide("newcomer", approve=True)
    assert registry.pending_requests() == []
    device = registry.device("newcomer")
    assert device is not None and device.state is DeviceState.ACTIVE
    with pytest.raises(RegistryError, match="no pending request"):
        registry.decide("newcomer", approve=False)


def test_a_failed_transaction_leaves_nothing(registry: Registry, factory: pki.Authority) -> None:
    with pytest.raises(RuntimeError), registry.transaction():
        registry.register_device("dev-1", bootstrap(factory, "dev-1"))
        raise RuntimeError("crash between the two writes")
    assert registry.device("dev-1") is None and registry.count_certificates() == 0
    assert registry.audit_log() == []


def test_the_audit_log_is_append_only(registry: Registry, factory: pki.Authority,
                                      tmp_path: Path) -> None:
    registry.register_device("dev-1", bootstrap(factory, "dev-1"))
    db = sqlite3.connect(tmp_path / "registry.sqlite3")
    for statement in ("UPDATE audit SET reason = 'nothing happened'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            db.execute(statement)
    db.close()


def test_suspension_is_recorded_and_decommissioning_is_final(
    registry: Registry, factory: pki.Authority,
) -> None:
    registry.register_device("dev-1", bootstrap(factory, "dev-1"))
    assert registry.set_state("dev-1", DeviceState.SUSPENDED).state is DeviceState.SUSPENDED
    registry.set_state("dev-1", DeviceState.DECOMMISSIONED)
    with pytest.raises(RegistryError, match="for good"):
        registry.set_state("dev-1", DeviceState.ACTIVE)
    with pytest.raises(RegistryError, match="no device"):
        registry.set_state("ghost", DeviceState.ACTIVE)
