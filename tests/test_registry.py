"""The registry: allowlist, issued certificates, revocations, held requests and the audit log."""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import _registry_schema, pki
from provisioning.errors import RegistryError
from provisioning.registry import (
    SCHEMA_VERSION,
    AttestationKey,
    AuditEntry,
    CertKind,
    DeviceState,
    IssuanceKind,
    Registry,
    RegistryLocation,
    location,
    open_registry,
    public_key_fingerprint,
    registrar,
    serial_hex,
)
from simulator.postgres import PostgreSQL

DAY = dt.timedelta(days=1)


@pytest.fixture(scope="module")
def factory() -> pki.Authority:
    return pki.new_root("Factory CA", pki.ROOT_LIFETIME, ecdsa=True)


@pytest.fixture(scope="module")
def device_ca() -> pki.Authority:
    root = pki.new_root("Root", pki.ROOT_LIFETIME)
    return root.issue_ca("Device CA", ec.generate_private_key(ec.SECP256R1()), pki.CA_LIFETIME)


@pytest.fixture
def registry(registry_location: Path | str) -> Iterator[Registry]:
    """Each test runs on both databases (conftest's ``registry_location``)."""
    with open_registry(registry_location) as opened:
        yield opened


def raw_execute(location: RegistryLocation, statement: str) -> None:
    """One statement on the registry's database, behind the Registry's back."""
    if isinstance(location, str):
        with psycopg.connect(location, autocommit=True) as db:
            db.execute(statement)
        return
    db = sqlite3.connect(location)
    try:
        db.execute(statement)
        db.commit()
    finally:
        db.close()


# What each database raises when a trigger refuses a statement.
REFUSED = (sqlite3.IntegrityError, psycopg.errors.RaiseException)


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
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    db.close()


def test_a_newer_schema_is_refused(registry_location: Path | str) -> None:
    with open_registry(registry_location):
        pass
    with open_registry(registry_location):  # a second open migrates nothing
        pass
    raw_execute(registry_location, "UPDATE schema_version SET version = 99")
    with pytest.raises(RegistryError, match="schema version 99"), \
            open_registry(registry_location):
        pass


def test_an_unreachable_database_is_a_registry_error(
    tmp_path: Path, postgres: PostgreSQL,
) -> None:
    """The same error type whether the file's directory or the server's socket is missing."""
    for where in (tmp_path / "gone" / "registry.sqlite3",
                  f"postgresql://postgres@/registry?host={tmp_path / 'gone'}",
                  postgres.url("no_such_database")):
        with pytest.raises(RegistryError, match="cannot open the registry"), \
                open_registry(where, busy_timeout=2):
            pass


def test_a_postgresql_connection_lost_between_transactions_is_opened_again(
    postgres: PostgreSQL, factory: pki.Authority,
) -> None:
    """A database restart or a killed backend: the call that finds the connection gone is a
    RegistryError (a request fails), the next one connects again."""
    url = postgres.new_database()
    with open_registry(url) as registry:
        registry.register_device("dev-1", bootstrap(factory, "dev-1"))
        raw_execute(url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(RegistryError):
            registry.device("dev-1")
        assert registry.device("dev-1") is not None
        with registry.transaction():
            registry.set_state("dev-1", DeviceState.SUSPENDED)
        assert registry.states() == {"dev-1": DeviceState.SUSPENDED}


def test_a_postgresql_url_is_told_from_a_path() -> None:
    assert location("postgresql://est@db.example/registry") == \
        "postgresql://est@db.example/registry"
    assert location("postgres://est@/registry?host=/run/postgresql") == \
        "postgres://est@/registry?host=/run/postgresql"
    assert location("registry.sqlite3") == Path("registry.sqlite3")
    assert location("/var/lib/postgresql/registry.db") == Path("/var/lib/postgresql/registry.db")


def test_budget_decisions_of_concurrent_writers_are_serialized(
    registry_location: Path | str, factory: pki.Authority, device_ca: pki.Authority,
) -> None:
    """What the EST service does on each of its connections: read the budget, sign, record,
    in one transaction. Six writers, each on its own connection (several servers), a
    budget of three: exactly three are issued, whichever database holds the registry."""
    budget, writers = 3, 6
    with open_registry(registry_location) as registry:
        registry.register_device("dev-1", bootstrap(factory, "dev-1"))
    issued: list[bool] = []
    start = threading.Barrier(writers)

    def writer() -> None:
        with open_registry(registry_location) as registry:
            start.wait()
            with registry.transaction():
                now = dt.datetime.now(dt.UTC)
                used = registry.issued_since("dev-1", IssuanceKind.RENEW, now - DAY)
                time.sleep(0.02)  # signing: another writer would read the same count here
                if len(used) < budget:
                    registry.record_issuance("dev-1", operational(device_ca),
                                             IssuanceKind.RENEW, when=now)
                    issued.append(True)

    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(issued) == budget
    with open_registry(registry_location) as registry:
        assert len(registry.issuances("dev-1")) == budget


def test_sqlite_writers_take_turns_on_the_lock_file_and_give_them_back(
    tmp_path: Path, factory: pki.Authority,
) -> None:
    """A writer waits on ``REGISTRY.lock`` (the kernel wakes it when the holder is done,
    where SQLite's busy wait sleeps up to 100 ms at a time), and gives the turn back when
    its transaction ends: committed, rolled back, or never begun."""
    path = tmp_path / "r.db"
    with open_registry(path) as registry:
        pass
    holder = os.open(f"{path}.lock", os.O_RDONLY)
    began = threading.Event()

    def write() -> None:
        with open_registry(path) as registry, registry.transaction():
            began.set()
            registry.register_device("dev-1", bootstrap(factory, "dev-1"))

    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        writer = threading.Thread(target=write)
        writer.start()
        assert not began.wait(0.5)  # its turn has not come
        fcntl.flock(holder, fcntl.LOCK_UN)
        writer.join(10)
        assert began.is_set()

        def turn_is_free() -> bool:
            try:
                fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            fcntl.flock(holder, fcntl.LOCK_UN)
            return True

        with open_registry(path) as registry:
            assert registry.device("dev-1") is not None and turn_is_free()  # committed
            with pytest.raises(RuntimeError), registry.transaction():
                assert not turn_is_free()
                raise RuntimeError("rolled back")
            assert turn_is_free()
        with open_registry(path, busy_timeout=0.1) as impatient:
            blocker = sqlite3.connect(path, isolation_level=None)  # a writer without turns
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(RegistryError), impatient.transaction():
                pass  # BEGIN fails on SQLite's own lock: the turn goes back
            blocker.execute("ROLLBACK")
            blocker.close()
            assert turn_is_free()
    finally:
        os.close(holder)


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
                                      registry_location: Path | str) -> None:
    registry.register_device("dev-1", bootstrap(factory, "dev-1"))
    for statement in ("UPDATE audit SET reason = 'nothing happened'", "DELETE FROM audit"):
        with pytest.raises(REFUSED, match="append-only"):
            raw_execute(registry_location, statement)
    assert [entry.decision for entry in registry.audit_log()] == ["allowlisted"]


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


# --- issuances: the budgets' record ------------------------------------------------------


def operational(device_ca: pki.Authority, device_id: str = "dev-1",
                serial: int | None = None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    if serial is None:
        return device_ca.issue_client(device_id, key, DAY)
    return with_serial(device_ca, device_ca.issue_client(device_id, key, DAY), serial)


def with_serial(authority: pki.Authority, cert: x509.Certificate,
                serial: int) -> x509.Certificate:
    """``cert`` signed again by ``authority`` with the serial given."""
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(serial)
               .not_valid_before(cert.not_valid_before_utc)
               .not_valid_after(cert.not_valid_after_utc))
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    return authority.sign(builder)


def test_an_issuance_is_recorded_with_its_certificate_and_what_it_supersedes(
    registry: Registry, factory: pki.Authority, device_ca: pki.Authority,
) -> None:
    registry.register_device("dev-1", bootstrap(factory, "dev-1"))
    first, second = operational(device_ca), operational(device_ca)
    registry.record_issuance("dev-1", first, IssuanceKind.ENROLL)
    registry.record_issuance("dev-1", second, IssuanceKind.RENEW,
                             supersede=(serial_hex(first.serial_number),))
    issuer = device_ca.name.rfc4514_string()
    assert [(i.device_id, i.kind, i.issuer, i.serial) for i in registry.issuances("dev-1")] == [
        ("dev-1", IssuanceKind.ENROLL, issuer, serial_hex(first.serial_number)),
        ("dev-1", IssuanceKind.RENEW, issuer, serial_hex(second.serial_number))]
    old, new = (registry.certificate(c.serial_number) for c in (first, second))
    assert old is not None and (old.status, old.revocation_reason) == ("revoked", "superseded")
    assert new is not None and (new.kind, new.status) == (CertKind.OPERATIONAL, "issued")


def test_an_issuance_that_cannot_be_recorded_leaves_no_row(
    registry: Registry, factory: pki.Authority, device_ca: pki.Authority,
) -> None:
    for device_id in ("dev-1", "dev-2"):
        registry.register_device(device_id, bootstrap(factory, device_id))
    cert = operational(device_ca)
    registry.record_issuance("dev-1", cert, IssuanceKind.ENROLL)
    with pytest.raises(RegistryError, match="already recorded for dev-1"):
        registry.record_issuance("dev-2", cert, IssuanceKind.ENROLL)
    assert registry.issuances("dev-2") == [] and len(registry.issuances()) == 1


def test_budgets_count_issuances_of_their_kind_not_audit_text(
    registry: Registry, factory: pki.Authority, device_ca: pki.Authority,
) -> None:
    registry.register_device("dev-1", bootstrap(factory, "dev-1"))
    now = dt.datetime.now(dt.UTC)
    hour = dt.timedelta(hours=1)
    for kind, at in ((IssuanceKind.RECOVER, now - 30 * hour), (IssuanceKind.RECOVER, now - hour),
                     (IssuanceKind.RENEW, now - hour), (IssuanceKind.RECOVER, now)):
        registry.record_issuance("dev-1", operational(device_ca), kind, when=at)
    with registry.transaction():  # what the old count matched on, reworded or not
        registry.audit(AuditEntry("recovery", "issued", "recovered: expired 2h ago", "dev-1"))
        registry.audit(AuditEntry("recovery", "issued", "came back from the warehouse", "dev-1"))
    assert len(registry.issued_since("dev-1", IssuanceKind.RECOVER, now - DAY)) == 2
    assert len(registry.issued_since("dev-1", IssuanceKind.RENEW, now - DAY)) == 1
    assert registry.issued_since("dev-1", IssuanceKind.BOOTSTRAP_REENROLL, now - DAY) == ()


def test_issuances_are_append_only(registry: Registry, factory: pki.Authority,
                                   device_ca: pki.Authority,
                                   registry_location: Path | str) -> None:
    registry.register_device("dev-1", bootstrap(factory, "dev-1"))
    registry.record_issuance("dev-1", operational(device_ca), IssuanceKind.RENEW)
    for statement in ("UPDATE issuances SET kind = 'enroll'", "DELETE FROM issuances"):
        with pytest.raises(REFUSED, match="append-only"):
            raw_execute(registry_location, statement)
    assert [row.kind for row in registry.issuances()] == [IssuanceKind.RENEW]


# --- certificates are named by (issuer, serial) -------------------------------------------

SHARED = 0x5EED


@pytest.fixture
def twins(registry: Registry, factory: pki.Authority,
          device_ca: pki.Authority) -> tuple[x509.Certificate, x509.Certificate]:
    """A bootstrap and an operational certificate of dev-1 with the same serial."""
    boot = with_serial(factory, bootstrap(factory, "dev-1"), SHARED)
    registry.register_device("dev-1", boot)
    op = operational(device_ca, serial=SHARED)
    with registry.transaction():
        registry.record_certificate("dev-1", op, CertKind.OPERATIONAL)
    return boot, op


def test_the_same_serial_from_two_issuers_is_two_certificates(
    registry: Registry, twins: tuple[x509.Certificate, x509.Certificate],
) -> None:
    boot, op = twins
    assert registry.count_certificates() == 2
    by_factory, by_device = (registry.certificate(SHARED, c.issuer) for c in twins)
    assert by_factory is not None and by_factory.kind is CertKind.BOOTSTRAP
    assert by_device is not None and by_device.kind is CertKind.OPERATIONAL
    assert (by_factory.issuer, by_device.issuer) == \
        (boot.issuer.rfc4514_string(), op.issuer.rfc4514_string())


def test_a_serial_two_issuers_used_needs_the_issuer(
    registry: Registry, twins: tuple[x509.Certificate, x509.Certificate],
) -> None:
    with pytest.raises(RegistryError, match="issued by 2 CAs"):
        registry.certificate(SHARED)
    with pytest.raises(RegistryError, match="issued by 2 CAs"):
        registry.revoke(SHARED, x509.ReasonFlags.key_compromise)


def test_revoking_or_superseding_one_leaves_the_other_issuers_certificate(
    registry: Registry, twins: tuple[x509.Certificate, x509.Certificate],
) -> None:
    boot, op = twins
    registry.revoke(SHARED, x509.ReasonFlags.key_compromise, issuer=op.issuer)
    with registry.transaction():
        registry.supersede((serial_hex(SHARED),), issuer=boot.issuer)
    statuses = {r.kind: (r.status, r.revocation_reason) for r in registry.certificates("dev-1")}
    assert statuses == {CertKind.OPERATIONAL: ("revoked", "keyCompromise"),
                        CertKind.BOOTSTRAP: ("revoked", "superseded")}
    assert [(e.serial, e.reason) for e in registry.revocations()] == \
        [(SHARED, x509.ReasonFlags.key_compromise)]


# --- a registry from schema version 1 -------------------------------------------------------

# Version 1's tables, as provisioning/registry.py created them before the issuances table.
SCHEMA_1 = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('active', 'suspended', 'decommissioned')),
        bootstrap_fingerprint TEXT,
        created TEXT NOT NULL,
        updated TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS certificates (
        serial TEXT PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices (device_id),
        kind TEXT NOT NULL CHECK (kind IN ('bootstrap', 'operational')),
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        public_key_sha256 TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('issued', 'revoked')),
        revocation_reason TEXT,
        revoked_at TEXT,
        recorded TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS certificates_by_device ON certificates (device_id)",
    "CREATE INDEX IF NOT EXISTS certificates_by_status ON certificates (status, kind)",
    """CREATE TABLE IF NOT EXISTS pending (
        device_id TEXT PRIMARY KEY,
        bootstrap_fingerprint TEXT NOT NULL,
        bootstrap_pem TEXT NOT NULL,
        decision TEXT NOT NULL CHECK (decision IN ('pending', 'approved', 'rejected')),
        requests INTEGER NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY,
        at TEXT NOT NULL,
        device_id TEXT,
        action TEXT NOT NULL,
        decision TEXT NOT NULL,
        status INTEGER,
        reason TEXT NOT NULL,
        peer_serial TEXT,
        issued_serial TEXT)""",
    "CREATE INDEX IF NOT EXISTS audit_by_device ON audit (device_id)",
    """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
        BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
)

# dev-1's history in version 1: (audit action, decision, reason, issued serial, kind, status).
HISTORY_1 = (
    ("register", "allowlisted", "bootstrap certificate recorded", "b0", "bootstrap", "issued"),
    ("simpleenroll", "issued", "issued", "a1", "operational", "revoked"),
    ("simplereenroll", "issued", "issued", "a2", "operational", "revoked"),
    ("simplereenroll", "refused", "re-enrollment must use a new key", None, None, None),
    ("simpleenroll", "issued", "starting over (any wording)", "a3", "operational", "revoked"),
    ("recovery", "issued", "brought back", "a4", "operational", "issued"),
)


def schema_1_registry(path: Path) -> None:
    db = sqlite3.connect(path)
    for statement in SCHEMA_1:
        db.execute(statement)
    db.execute("INSERT INTO schema_version VALUES (1)")
    db.execute("INSERT INTO devices VALUES ('dev-1', 'active', 'ff', '2025', '2025')")
    for hour, (action, decision, reason, serial, kind, status) in enumerate(HISTORY_1):
        at = f"2025-01-01T{hour:02d}:00:00.000+00:00"
        if serial is not None:
            db.execute("INSERT INTO certificates VALUES (?, 'dev-1', ?, ?, '2099', 'k', ?, ?, ?,"
                       " ?)", (serial, kind, at, status, "superseded" if status == "revoked"
                               else None, at if status == "revoked" else None, at))
        db.execute("INSERT INTO audit (at, device_id, action, decision, reason, issued_serial)"
                   " VALUES (?, 'dev-1', ?, ?, ?, ?)", (at, action, decision, reason, serial))
    db.commit()
    db.close()


def test_a_schema_1_registry_is_migrated_and_keeps_its_certificates(tmp_path: Path) -> None:
    schema_1_registry(tmp_path / "old.db")
    with open_registry(tmp_path / "old.db") as registry:
        certificates = registry.certificates("dev-1")
        audit = registry.audit_log("dev-1")
    assert [(c.serial, c.kind.value, c.status, c.issuer) for c in certificates] == \
        [(serial, kind, status, "") for _, _, _, serial, kind, status in HISTORY_1 if serial]
    assert len(audit) == len(HISTORY_1)
    db = sqlite3.connect(tmp_path / "old.db")
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    key = sorted((row[5], row[1]) for row in db.execute("PRAGMA table_info(certificates)")
                 if row[5])
    assert key == [(1, "issuer"), (2, "serial")]
    db.close()


def test_a_schema_1_registry_gets_its_issuances_from_the_audit_rows(tmp_path: Path) -> None:
    schema_1_registry(tmp_path / "old.db")
    with open_registry(tmp_path / "old.db") as registry:
        issuances = [(i.kind, i.serial, i.at[11:13]) for i in registry.issuances("dev-1")]
        recent = registry.issued_since("dev-1", IssuanceKind.BOOTSTRAP_REENROLL,
                                       dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
    assert issuances == [(IssuanceKind.ENROLL, "a1", "01"), (IssuanceKind.RENEW, "a2", "02"),
                         (IssuanceKind.BOOTSTRAP_REENROLL, "a3", "04"),
                         (IssuanceKind.RECOVER, "a4", "05")]
    assert recent == (dt.datetime(2025, 1, 1, 4, tzinfo=dt.UTC),)


def test_schema_1_certificates_are_named_by_the_cas_that_know_them(
    tmp_path: Path, factory: pki.Authority, device_ca: pki.Authority,
) -> None:
    schema_1_registry(tmp_path / "old.db")
    with open_registry(tmp_path / "old.db") as registry:
        named = registry.adopt_issuers({CertKind.BOOTSTRAP: factory.name,
                                        CertKind.OPERATIONAL: device_ca.name})
        assert named == 5 and registry.adopt_issuers({CertKind.BOOTSTRAP: factory.name}) == 0
        boot, recovered = registry.certificate("b0", factory.name), \
            registry.certificate("a4", device_ca.name)
        issuers = {i.issuer for i in registry.issuances("dev-1")}
    assert boot is not None and boot.kind is CertKind.BOOTSTRAP
    assert recovered is not None and recovered.status == "issued"
    assert issuers == {device_ca.name.rfc4514_string()}


# --- schema 3: attestation keys and attested certificates ------------------------------------

AK = AttestationKey("dev-ak", b"\x00\x23" + b"\x01" * 80, b"\x00\x0b" + b"\x02" * 32, "e" * 64)


def test_an_attestation_key_is_registered_replaced_and_audited(
    registry: Registry, factory: pki.Authority,
) -> None:
    with pytest.raises(RegistryError, match="no device dev-ak"):
        registry.register_attestation_key(AK)
    registry.register_device("dev-ak", bootstrap(factory, "dev-ak"))
    registry.register_attestation_key(AK)
    stored = registry.attestation_key("dev-ak")
    assert stored is not None and (stored.ak_public, stored.ak_name, stored.ek_cert_sha256) == \
        (AK.ak_public, AK.ak_name, AK.ek_cert_sha256)
    registry.register_attestation_key(dataclasses.replace(AK, ak_public=b"\x00\x23\x09"))
    again = registry.attestation_key("dev-ak")
    assert again is not None and again.ak_public == b"\x00\x23\x09"
    assert [row.action for row in registry.audit_log("dev-ak")][-2:] == ["attestation-key"] * 2
    assert registry.attestation_key("dev-none") is None


def test_the_registrar_records_device_and_attestation_key_in_one_step(
    registry_location: Path | str, factory: pki.Authority,
) -> None:
    register = registrar(registry_location)
    register("dev-ak", bootstrap(factory, "dev-ak"), None, AK)
    register("dev-plain", bootstrap(factory, "dev-plain"), None)
    with open_registry(registry_location) as registry:
        assert registry.attestation_key("dev-ak") is not None
        assert registry.attestation_key("dev-plain") is None
    with pytest.raises(RegistryError):  # no device: neither is recorded
        register("bad/id", bootstrap(factory, "dev-x"), None,
                 dataclasses.replace(AK, device_id="bad/id"))


def test_a_certificate_records_whether_its_key_was_attested(
    registry: Registry, factory: pki.Authority, device_ca: pki.Authority,
) -> None:
    registry.register_device("dev-att", bootstrap(factory, "dev-att"))
    plain, attested = (device_ca.issue_client("dev-att", ec.generate_private_key(
        ec.SECP256R1()).public_key(), DAY) for _ in range(2))
    registry.record_issuance("dev-att", plain, IssuanceKind.ENROLL)
    registry.record_issuance("dev-att", attested, IssuanceKind.RENEW, attested=True)
    recorded = {c.serial: c.attested for c in registry.certificates("dev-att")
                if c.kind is CertKind.OPERATIONAL}
    assert recorded == {serial_hex(plain.serial_number): False,
                        serial_hex(attested.serial_number): True}


# Version 2's certificates table had no ``attested`` column and there was no AK table.
_ATTESTED_COLUMN = "        attested INTEGER NOT NULL DEFAULT 0 CHECK (attested IN (0, 1)),\n"


def schema_2_registry(path: Path, factory: pki.Authority, device_ca: pki.Authority) -> str:
    db = sqlite3.connect(path)
    for statement in _registry_schema.SCHEMA:
        if "attestation_keys" not in statement:
            db.execute(statement.replace(_ATTESTED_COLUMN, ""))
    db.execute("INSERT INTO schema_version VALUES (2)")
    db.execute("INSERT INTO devices VALUES ('dev-2', 'active', 'ff', '2025', '2025')")
    cert = device_ca.issue_client("dev-2", ec.generate_private_key(ec.SECP256R1()).public_key(),
                                  DAY)
    serial = serial_hex(cert.serial_number)
    db.execute("INSERT INTO certificates VALUES (?, ?, 'dev-2', 'operational', '2025', '2099',"
               " 'k', 'issued', NULL, NULL, '2025')", (device_ca.name.rfc4514_string(), serial))
    db.commit()
    columns = [row[1] for row in db.execute("PRAGMA table_info(certificates)")]
    db.close()
    assert "attested" not in columns
    return serial


def test_a_schema_2_registry_is_migrated(
    tmp_path: Path, factory: pki.Authority, device_ca: pki.Authority,
) -> None:
    serial = schema_2_registry(tmp_path / "v2.db", factory, device_ca)
    with open_registry(tmp_path / "v2.db") as registry:
        [old] = registry.certificates("dev-2")
        assert (old.serial, old.attested) == (serial, False)
        registry.register_attestation_key(dataclasses.replace(AK, device_id="dev-2"))
        fresh = device_ca.issue_client("dev-2", ec.generate_private_key(
            ec.SECP256R1()).public_key(), DAY)
        registry.record_issuance("dev-2", fresh, IssuanceKind.RENEW, attested=True)
        assert {c.serial: c.attested for c in registry.certificates("dev-2")} == \
            {serial: False, serial_hex(fresh.serial_number): True}
    with open_registry(tmp_path / "v2.db"):  # opening again migrates nothing
        pass
    db = sqlite3.connect(tmp_path / "v2.db")
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    db.close()


def test_a_schema_1_registry_is_migrated_through_to_the_latest(tmp_path: Path) -> None:
    schema_1_registry(tmp_path / "old.db")
    with open_registry(tmp_path / "old.db") as registry:
        assert not any(c.attested for c in registry.certificates("dev-1"))
        registry.register_attestation_key(dataclasses.replace(AK, device_id="dev-1"))
        assert registry.attestation_key("dev-1") is not None


# --- schema 4: the Factory CA's certificate of the attestation key ---------------------------

def ak_certificate(factory: pki.Authority, device_id: str) -> x509.Certificate:
    return factory.issue_attestation_key(device_id, ec.generate_private_key(
        ec.SECP256R1()).public_key(), DAY)


def test_the_attestation_key_certificate_is_recorded_with_the_ak(
    registry: Registry, factory: pki.Authority,
) -> None:
    registry.register_device("dev-akc", bootstrap(factory, "dev-akc"))
    certificate = ak_certificate(factory, "dev-akc")
    registry.register_attestation_key(dataclasses.replace(AK, device_id="dev-akc",
                                                          certificate=certificate))
    stored = registry.attestation_key("dev-akc")
    assert stored is not None and stored.certificate == certificate
    assert serial_hex(certificate.serial_number) in registry.audit_log("dev-akc")[-1].reason
    with pytest.raises(TypeError):
        dataclasses.replace(AK, certificate=pki.cert_pem(certificate))


def test_the_registrar_records_an_attested_bootstrap_with_its_ak(
    registry_location: Path | str, factory: pki.Authority,
) -> None:
    """The factory registers an AK only after it verified the AK's certification of the
    bootstrap key: that bootstrap certificate is recorded as attested, a plain one is not."""
    register = registrar(registry_location)
    register("dev-ak", bootstrap(factory, "dev-ak"), None, AK)
    register("dev-plain", bootstrap(factory, "dev-plain"), None)
    with open_registry(registry_location) as registry:
        assert [c.attested for c in registry.certificates("dev-ak")] == [True]
        assert [c.attested for c in registry.certificates("dev-plain")] == [False]


_AK_CERTIFICATE_COLUMN = ",\n        certificate TEXT)"


def test_a_schema_3_registry_keeps_its_aks_and_gains_their_certificates(
    tmp_path: Path, factory: pki.Authority,
) -> None:
    db = sqlite3.connect(tmp_path / "v3.db")
    for statement in _registry_schema.SCHEMA:
        db.execute(statement.replace(_AK_CERTIFICATE_COLUMN, ")"))
    db.execute("INSERT INTO schema_version VALUES (3)")
    db.execute("INSERT INTO devices VALUES ('dev-3', 'active', 'ff', '2025', '2025')")
    db.execute("INSERT INTO attestation_keys VALUES ('dev-3', ?, ?, ?, '2025')",
               (AK.ak_public, AK.ak_name.hex(), AK.ek_cert_sha256))
    db.commit()
    assert "certificate" not in [row[1] for row in db.execute(
        "PRAGMA table_info(attestation_keys)")]
    db.close()
    with open_registry(tmp_path / "v3.db") as registry:
        old = registry.attestation_key("dev-3")
        assert old is not None and (old.ak_public, old.certificate) == (AK.ak_public, None)
        certificate = ak_certificate(factory, "dev-3")
        registry.register_attestation_key(dataclasses.replace(AK, device_id="dev-3",
                                                              certificate=certificate))
        renewed = registry.attestation_key("dev-3")
        assert renewed is not None and renewed.certificate == certificate
    db = sqlite3.connect(tmp_path / "v3.db")
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    db.close()


# --- the indexes each enrollment reads through ------------------------------------------------

PER_DEVICE_INDEXES = {"certificates_latest", "certificates_live"}


def index_names(location: RegistryLocation) -> set[str]:
    if isinstance(location, str):
        with psycopg.connect(location) as pg:
            return {str(row[0]) for row in pg.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")}
    db = sqlite3.connect(location)
    try:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    finally:
        db.close()


def test_a_registry_made_before_the_per_device_indexes_gains_them(
    registry_location: Path | str,
) -> None:
    """Each enrollment reads the device's latest and its live certificates, which without
    these indexes scan its history and every device's live certificates; a registry made
    before them gets them when opened (PostgreSQL, whose tables are made once, too)."""
    with open_registry(registry_location):
        pass
    for name in PER_DEVICE_INDEXES:
        raw_execute(registry_location, f"DROP INDEX {name}")
    assert not PER_DEVICE_INDEXES & index_names(registry_location)
    with open_registry(registry_location):
        pass
    assert PER_DEVICE_INDEXES <= index_names(registry_location)
