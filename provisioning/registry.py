"""The registry: which devices exist, what was issued to them, and every decision taken.

SQLite in WAL mode is the embedded default: readers never wait for the writer,
and the EST server's worker processes share one file, each with its own
connection. The SQL stays portable (text timestamps in ISO 8601 UTC, serials as
lowercase hex text, ``ON CONFLICT`` upserts, parameters everywhere) so that a
fleet that outgrows one host can move the same schema to PostgreSQL; only the
pragmas and the append-only triggers are SQLite's dialect.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_agent.identity import is_service_identity, validate_device_id

from . import pki
from .errors import RegistryError

SCHEMA_VERSION = 1

_SCHEMA = (
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


class DeviceState(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DECOMMISSIONED = "decommissioned"


class CertKind(StrEnum):
    BOOTSTRAP = "bootstrap"
    OPERATIONAL = "operational"


@dataclass(frozen=True)
class Device:
    device_id: str
    state: DeviceState
    bootstrap_fingerprint: str | None
    created: str


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    device_id: str
    kind: CertKind
    not_before: str
    not_after: str
    public_key_sha256: str
    status: str
    revocation_reason: str | None
    revoked_at: str | None

    @property
    def revoked(self) -> bool:
        return self.status == "revoked"


@dataclass(frozen=True)
class PendingRequest:
    device_id: str
    bootstrap_fingerprint: str
    bootstrap_pem: str
    decision: str
    requests: int
    first_seen: str
    last_seen: str


@dataclass(frozen=True)
class AuditEntry:
    """One decision. ``decision`` is issued, held, refused or an operator's action."""

    action: str
    decision: str
    reason: str
    device_id: str | None = None
    status: int | None = None
    peer_serial: str | None = None
    issued_serial: str | None = None
    at: str | None = None


def timestamp(when: dt.datetime | None = None) -> str:
    return (when or dt.datetime.now(dt.UTC)).astimezone(dt.UTC).isoformat(timespec="milliseconds")


def serial_hex(serial: int | str) -> str:
    """The registry's spelling of a serial: lowercase hex, no prefix, no colons."""
    if isinstance(serial, int):
        return f"{serial:x}"
    text = serial.strip().lower().replace(":", "").removeprefix("0x")
    try:
        return f"{int(text, 16):x}"
    except ValueError:
        raise RegistryError(f"malformed serial {serial!r}: expected hexadecimal") from None


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def public_key_fingerprint(public_key: object) -> str:
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class Registry:
    """Queries and changes over one connection; writes go through :meth:`transaction`."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        self._depth = 0

    # --- plumbing ------------------------------------------------------------------------

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise RegistryError(f"registry query failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Registry]:
        """A write transaction taken up front, so it never fails half-way on a lock upgrade."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._query("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self
        except BaseException:
            self._depth = 0
            self._db.rollback()
            raise
        self._depth = 0
        try:
            self._query("COMMIT")
        except RegistryError:
            self._db.rollback()
            raise

    # --- devices -------------------------------------------------------------------------

    def device(self, device_id: str) -> Device | None:
        rows = self._query("SELECT device_id, state, bootstrap_fingerprint, created FROM devices"
                           " WHERE device_id = ?", (device_id,))
        if not rows:
            return None
        row = rows[0]
        return Device(row[0], DeviceState(row[1]), row[2], row[3])

    def register_device(self, device_id: str, bootstrap: x509.Certificate,
                        previous: x509.Certificate | None = None) -> Device:
        """Allowlist ``device_id`` with its bootstrap certificate (the factory's registrar).

        Registering the same certificate again changes nothing. Replacing a
        device's bootstrap certificate needs the one on record as ``previous``,
        so a typo on the factory line cannot take over another device's name.
        """
        try:
            validate_device_id(device_id)
        except ValueError as exc:
            raise RegistryError(str(exc)) from exc
        if is_service_identity(device_id):
            raise RegistryError(f"{device_id!r} is reserved for a service identity")
        if _common_name(bootstrap) != device_id:
            raise RegistryError(f"the bootstrap certificate names {_common_name(bootstrap)!r}, "
                                f"not {device_id!r}")
        fingerprint = certificate_fingerprint(bootstrap)
        now = timestamp()
        with self.transaction():
            known = self.device(device_id)
            if known is not None and known.bootstrap_fingerprint == fingerprint:
                return known
            if known is None:
                self._query("INSERT INTO devices (device_id, state, bootstrap_fingerprint, created,"
                            " updated) VALUES (?, ?, ?, ?, ?)",
                            (device_id, DeviceState.ACTIVE.value, fingerprint, now, now))
                action = "allowlisted"
            elif known.state is DeviceState.DECOMMISSIONED:
                raise RegistryError(f"device {device_id} is decommissioned")
            elif (previous is None
                  or certificate_fingerprint(previous) != known.bootstrap_fingerprint):
                raise RegistryError(f"device {device_id} is registered with another bootstrap "
                                    "certificate; give that one as the previous to replace it")
            else:
                self._query("UPDATE devices SET bootstrap_fingerprint = ?, updated = ?"
                            " WHERE device_id = ?", (fingerprint, now, device_id))
                self._query("UPDATE certificates SET status = 'revoked', revoked_at = ?,"
                            " revocation_reason = 'superseded' WHERE device_id = ? AND kind = ?"
                            " AND status = 'issued'", (now, device_id, CertKind.BOOTSTRAP.value))
                action = "bootstrap replaced"
            self.record_certificate(device_id, bootstrap, CertKind.BOOTSTRAP)
            self.audit(AuditEntry("register", action, "bootstrap certificate recorded", device_id,
                                  issued_serial=serial_hex(bootstrap.serial_number)))
        device = self.device(device_id)
        assert device is not None
        return device

    def set_state(self, device_id: str, state: DeviceState, reason: str = "operator") -> Device:
        with self.transaction():
            known = self.device(device_id)
            if known is None:
                raise RegistryError(f"no device {device_id} in the registry")
            if known.state is DeviceState.DECOMMISSIONED and state is not known.state:
                raise RegistryError(f"device {device_id} is decommissioned for good")
            self._query("UPDATE devices SET state = ?, updated = ? WHERE device_id = ?",
                        (state.value, timestamp(), device_id))
            self.audit(AuditEntry("state", state.value, reason, device_id))
        return Device(device_id, state, known.bootstrap_fingerprint, known.created)

    # --- certificates --------------------------------------------------------------------

    def record_certificate(self, device_id: str, certificate: x509.Certificate,
                           kind: CertKind) -> None:
        serial = serial_hex(certificate.serial_number)
        try:
            cursor = self._db.execute(
                "INSERT INTO certificates (serial, device_id, kind, not_before, not_after,"
                " public_key_sha256, status, recorded) VALUES (?, ?, ?, ?, ?, ?, 'issued', ?)"
                " ON CONFLICT (serial) DO NOTHING",
                (serial, device_id, kind.value, timestamp(certificate.not_valid_before_utc),
                 timestamp(certificate.not_valid_after_utc),
                 public_key_fingerprint(certificate.public_key()), timestamp()))
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot record certificate {serial}: {exc}") from exc
        if cursor.rowcount == 0:
            known = self.certificate(serial)
            if known is None or known.device_id != device_id:
                raise RegistryError(f"serial {serial} is already recorded for "
                                    f"{known.device_id if known else 'another device'}")

    def certificate(self, serial: int | str) -> CertificateRecord | None:
        rows = self._query("SELECT serial, device_id, kind, not_before, not_after,"
                           " public_key_sha256, status, revocation_reason, revoked_at"
                           " FROM certificates WHERE serial = ?", (serial_hex(serial),))
        if not rows:
            return None
        row = rows[0]
        return CertificateRecord(row[0], row[1], CertKind(row[2]), *row[3:])

    def certificates(self, device_id: str | None = None) -> list[CertificateRecord]:
        rows = self._query("SELECT serial FROM certificates WHERE ? IS NULL OR device_id = ?"
                           " ORDER BY recorded, serial", (device_id, device_id))
        return [r for r in (self.certificate(row[0]) for row in rows) if r is not None]

    def count_certificates(self, kind: CertKind | None = None) -> int:
        if kind is None:
            return int(self._query("SELECT COUNT(*) FROM certificates")[0][0])
        return int(self._query("SELECT COUNT(*) FROM certificates WHERE kind = ?",
                               (kind.value,))[0][0])

    def public_key_fingerprints(self, device_id: str) -> frozenset[str]:
        rows = self._query("SELECT public_key_sha256 FROM certificates WHERE device_id = ?",
                           (device_id,))
        return frozenset(row[0] for row in rows)

    def latest_operational(self, device_id: str) -> str | None:
        """The serial most recently issued to the device: the only one recovery accepts."""
        rows = self._query("SELECT serial FROM certificates WHERE device_id = ? AND kind = ?"
                           " ORDER BY recorded DESC, not_before DESC LIMIT 1",
                           (device_id, CertKind.OPERATIONAL.value))
        return rows[0][0] if rows else None

    def unexpired_operational(self, device_id: str, now: dt.datetime) -> tuple[str, ...]:
        """Serials a device could still use today: issued, not revoked, not yet expired."""
        rows = self._query("SELECT serial FROM certificates WHERE device_id = ? AND kind = ?"
                           " AND status = 'issued' AND not_after > ? ORDER BY recorded",
                           (device_id, CertKind.OPERATIONAL.value, timestamp(now)))
        return tuple(row[0] for row in rows)

    def supersede(self, serials: tuple[str, ...], when: dt.datetime | None = None) -> None:
        """Revoke ``serials`` (superseded) inside the caller's transaction.

        No audit row of its own: the enrollment decision that replaced them is
        the one entry, and it names the old serial.
        """
        for serial in serials:
            self._query("UPDATE certificates SET status = 'revoked', revocation_reason = ?,"
                        " revoked_at = ? WHERE serial = ? AND status = 'issued'",
                        (x509.ReasonFlags.superseded.value, timestamp(when), serial_hex(serial)))

    def revoke(self, serial: int | str, reason: x509.ReasonFlags,
               when: dt.datetime | None = None) -> CertificateRecord:
        serial = serial_hex(serial)
        with self.transaction():
            record = self.certificate(serial)
            if record is None:
                raise RegistryError(f"no certificate with serial {serial} in the registry")
            if record.revoked:
                raise RegistryError(f"certificate {serial} was revoked at {record.revoked_at} "
                                    f"({record.revocation_reason})")
            self._query("UPDATE certificates SET status = 'revoked', revocation_reason = ?,"
                        " revoked_at = ? WHERE serial = ?",
                        (reason.value, timestamp(when), serial))
            self.audit(AuditEntry("revoke", "revoked", reason.value, record.device_id,
                                  peer_serial=serial))
        revoked = self.certificate(serial)
        assert revoked is not None
        return revoked

    def revocations(self) -> list[pki.Revocation]:
        """The Device CA's revoked certificates, as its CRL lists them."""
        rows = self._query("SELECT serial, revoked_at, revocation_reason FROM certificates"
                           " WHERE status = 'revoked' AND kind = ? ORDER BY revoked_at",
                           (CertKind.OPERATIONAL.value,))
        return [pki.Revocation(int(serial, 16), dt.datetime.fromisoformat(at),
                               x509.ReasonFlags(reason or "unspecified"))
                for serial, at, reason in rows]

    # --- requests held for an operator (RFC 7030 4.2.3) ----------------------------------

    def pending(self, device_id: str) -> PendingRequest | None:
        rows = self._query("SELECT device_id, bootstrap_fingerprint, bootstrap_pem, decision,"
                           " requests, first_seen, last_seen FROM pending WHERE device_id = ?",
                           (device_id,))
        return PendingRequest(*rows[0]) if rows else None

    def pending_requests(self) -> list[PendingRequest]:
        rows = self._query("SELECT device_id FROM pending WHERE decision = 'pending'"
                           " ORDER BY first_seen")
        return [p for p in (self.pending(row[0]) for row in rows) if p is not None]

    def hold(self, device_id: str, bootstrap: x509.Certificate) -> None:
        """Note (again) that an unknown device asked to enroll; the first certificate wins."""
        now = timestamp()
        self._query(
            "INSERT INTO pending (device_id, bootstrap_fingerprint, bootstrap_pem, decision,"
            " requests, first_seen, last_seen) VALUES (?, ?, ?, 'pending', 1, ?, ?)"
            " ON CONFLICT (device_id) DO UPDATE SET requests = pending.requests + 1,"
            " last_seen = excluded.last_seen",
            (device_id, certificate_fingerprint(bootstrap),
             pki.cert_pem(bootstrap).decode(), now, now))

    def decide(self, device_id: str, approve: bool) -> PendingRequest:
        """An operator's answer to a held request; approval allowlists the device."""
        with self.transaction():
            request = self.pending(device_id)
            if request is None or request.decision != "pending":
                raise RegistryError(f"no pending request from {device_id}")
            decision = "approved" if approve else "rejected"
            self._query("UPDATE pending SET decision = ? WHERE device_id = ?",
                        (decision, device_id))
            if approve:
                self.register_device(
                    device_id, x509.load_pem_x509_certificate(request.bootstrap_pem.encode()))
            self.audit(AuditEntry("pending", decision, "operator", device_id))
        decided = self.pending(device_id)
        assert decided is not None
        return decided

    # --- audit ---------------------------------------------------------------------------

    def audit(self, entry: AuditEntry) -> None:
        self._query("INSERT INTO audit (at, device_id, action, decision, status, reason,"
                    " peer_serial, issued_serial) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (entry.at or timestamp(), entry.device_id, entry.action, entry.decision,
                     entry.status, entry.reason, entry.peer_serial, entry.issued_serial))

    def issued_since(self, device_id: str, action: str, reason_prefix: str,
                     since: dt.datetime) -> tuple[dt.datetime, ...]:
        """When ``action`` issued to the device with a reason starting ``reason_prefix``.

        The audit log is the record of recoveries and bootstrap re-enrollments,
        so the daily budgets are counted from it rather than kept in a table
        that could disagree with it.
        """
        rows = self._query("SELECT at FROM audit WHERE device_id = ? AND action = ?"
                           " AND decision = 'issued' AND substr(reason, 1, ?) = ? AND at >= ?"
                           " ORDER BY at", (device_id, action, len(reason_prefix), reason_prefix,
                                            timestamp(since)))
        return tuple(dt.datetime.fromisoformat(row[0]) for row in rows)

    def audit_log(self, device_id: str | None = None, limit: int = 1000) -> list[AuditEntry]:
        rows = self._query(
            "SELECT action, decision, reason, device_id, status, peer_serial, issued_serial, at"
            " FROM audit WHERE ? IS NULL OR device_id = ? ORDER BY id DESC LIMIT ?",
            (device_id, device_id, limit))
        return [AuditEntry(*row) for row in reversed(rows)]


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            db.execute(statement)
        rows = db.execute("SELECT version FROM schema_version").fetchall()
        if not rows:
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif rows[0][0] > SCHEMA_VERSION:
            raise RegistryError(f"{path} has schema version {rows[0][0]}; this program knows "
                                f"{SCHEMA_VERSION} at most")
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise


@contextmanager
def open_registry(path: str | Path, busy_timeout: float = 10.0,
                  synchronous: str = "full") -> Iterator[Registry]:
    """One connection, for one process or thread; closed on exit.

    ``full`` (the default): a certificate handed to a device is on disk first,
    so it can always be found and revoked later. ``normal`` skips the fsync at
    each commit; a power cut may then forget the last issuance records (the
    database stays consistent), see est_config.py for when that is acceptable.
    """
    path = Path(path)
    if synchronous not in ("full", "normal"):
        raise RegistryError(f"synchronous must be full or normal, not {synchronous!r}")
    try:
        db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot open the registry {path}: {exc}") from exc
    try:
        try:
            db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            db.execute("PRAGMA foreign_keys = ON")
            _migrate(db, path)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot prepare the registry {path}: {exc}") from exc
        yield Registry(db)
    finally:
        db.close()


def registrar(path: str | Path) -> Callable[[str, x509.Certificate, x509.Certificate | None], None]:
    """The factory's hook: allowlist a device in the registry at ``path``."""

    def register(device_id: str, bootstrap: x509.Certificate,
                 previous: x509.Certificate | None) -> None:
        with open_registry(path) as registry:
            registry.register_device(device_id, bootstrap, previous)

    return register
