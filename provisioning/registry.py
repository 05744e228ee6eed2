"""The registry: which devices exist, what was issued to them, and every decision taken.

SQLite in WAL mode is the embedded default: readers never wait for the writer,
and the EST server's worker processes share one file, each with its own
connection. A ``postgresql://`` URL where a path is given puts the same schema
in PostgreSQL, which several EST servers on several hosts share. The SQL here is
written once (text timestamps in ISO 8601 UTC, serials as lowercase hex text,
``ON CONFLICT`` upserts, ``?`` parameters everywhere); what differs between the
two, from placeholders to the write lock, is in _registry_db.py and
_registry_pg.py. Every decision that must hold across servers (a daily budget,
one first enrollment per device) is read and written inside :meth:`Registry.transaction`,
which both databases serialize.

A certificate is named by its issuer (the CA's distinguished name, RFC 4514)
and its serial: the Factory CA and the Device CA each choose serials of their
own. Every certificate the EST server hands out also gets an issuance row of its
kind, which is what the daily budgets count.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_agent.identity import is_service_identity, validate_device_id

from . import pki
from ._registry_db import Cursor, Database, connect
from ._registry_db import RegistryLocation as RegistryLocation
from ._registry_db import is_url as is_url
from ._registry_db import location as location
from ._registry_schema import SCHEMA_VERSION as SCHEMA_VERSION  # the tables live there
from .errors import RegistryError


class DeviceState(StrEnum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    DECOMMISSIONED = "decommissioned"


class CertKind(StrEnum):
    BOOTSTRAP = "bootstrap"
    OPERATIONAL = "operational"


class IssuanceKind(StrEnum):
    """Why the EST server issued an operational certificate."""

    ENROLL = "enroll"                          # simpleenroll, the device's first
    RENEW = "renew"                            # simplereenroll
    RECOVER = "recover"                        # the recovery listener
    BOOTSTRAP_REENROLL = "bootstrap-reenroll"  # simpleenroll again, starting over


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
    issuer: str = ""  # RFC 4514; "" for a row from schema 1 no one has adopted yet
    attested: bool = False  # the EST server verified TPM key attestation for its key

    @property
    def revoked(self) -> bool:
        return self.status == "revoked"


@dataclass(frozen=True)
class AttestationKey:
    """A device's attestation key as the factory registered it (schema 3).

    ``ak_public`` is the marshalled TPMT_PUBLIC, ``ak_name`` its TPM name,
    ``ek_cert_sha256`` the fingerprint of the EK certificate whose TPM proved,
    by credential activation, that it holds the AK, and ``certificate`` the
    Factory CA's certificate of the AK (schema 4; None for an AK registered before).
    """

    device_id: str
    ak_public: bytes
    ak_name: bytes
    ek_cert_sha256: str
    certificate: x509.Certificate | None = None
    registered: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.ak_public, bytes) or not self.ak_public:
            raise ValueError("ak_public must be non-empty bytes")
        if not isinstance(self.ak_name, bytes) or len(self.ak_name) < 2:
            raise ValueError("ak_name must be a TPM name (bytes)")
        if len(self.ek_cert_sha256) != 64:
            raise ValueError("ek_cert_sha256 must be a SHA-256 hex digest")
        if self.certificate is not None and not isinstance(self.certificate, x509.Certificate):
            raise TypeError("certificate must be an x509.Certificate")


@dataclass(frozen=True)
class FactoryEnrollment:
    """The bootstrap certificate the factory signing service issued a device (schema 5),
    and the station that asked for it."""

    device_id: str
    station: str
    station_serial: str
    certificate: x509.Certificate
    at: str = ""

    @property
    def public_key_sha256(self) -> str:
        return public_key_fingerprint(self.certificate.public_key())


@dataclass(frozen=True)
class Issuance:
    device_id: str
    kind: IssuanceKind
    issuer: str
    serial: str
    at: str


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


def issuer_name(issuer: x509.Name | str) -> str:
    """The registry's spelling of an issuer: its distinguished name as RFC 4514 text."""
    return issuer.rfc4514_string() if isinstance(issuer, x509.Name) else issuer


def certificate_fingerprint(certificate: x509.Certificate) -> str:
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def public_key_fingerprint(public_key: object) -> str:
    der = public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


_CERTIFICATE = ("SELECT serial, device_id, kind, not_before, not_after, public_key_sha256,"
                " status, revocation_reason, revoked_at, issuer, attested FROM certificates")


def _certificate_record(row: Sequence[Any]) -> CertificateRecord:
    return CertificateRecord(row[0], row[1], CertKind(row[2]), row[3], row[4], row[5], row[6],
                             row[7], row[8], row[9], bool(row[10]))


class Registry:
    """Queries and changes over one connection; writes go through :meth:`transaction`."""

    def __init__(self, database: Database) -> None:
        self._db = database
        self._depth = 0

    # --- plumbing ------------------------------------------------------------------------

    def _execute(self, sql: str, params: tuple[object, ...] = (),
                 failed: str = "registry query failed") -> Cursor:
        try:
            return self._db.execute(sql, params)
        except self._db.errors as exc:
            raise RegistryError(f"{failed}: {exc}") from exc

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[Any]:
        cursor = self._execute(sql, params)
        if cursor.description is None:  # no rows to read (psycopg refuses fetchall then)
            return []
        try:
            return cursor.fetchall()
        except self._db.errors as exc:
            raise RegistryError(f"registry query failed: {exc}") from exc

    def _call(self, step: str, action: Callable[[], None]) -> None:
        try:
            action()
        except self._db.errors as exc:
            raise RegistryError(f"registry {step} failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Registry]:
        """A write transaction taken up front, so it never fails half-way on a lock upgrade
        (SQLite), and serialized with every other writer's (PostgreSQL, across servers)."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._call("begin", self._db.begin)
        self._depth = 1
        try:
            yield self
        except BaseException:
            self._depth = 0
            self._db.rollback()
            raise
        self._depth = 0
        try:
            self._call("commit", self._db.commit)
        except RegistryError:
            self._db.rollback()
            raise

    @contextmanager
    def savepoint(self) -> Iterator[Registry]:
        """Inside :meth:`transaction`: what the block wrote is undone if it raises, and the
        transaction goes on (SQL ``SAVEPOINT``, which both databases have). Group commit
        puts each of several requests in one, so a request that fails takes only its own
        writes back. A rollback that fails (the database has lost the transaction) raises."""
        if not self._depth:
            raise RegistryError("a savepoint is taken inside a transaction")
        self._execute("SAVEPOINT request", (), "registry savepoint failed")
        try:
            yield self
        except BaseException:
            self._execute("ROLLBACK TO SAVEPOINT request", (), "registry rollback failed")
            self._execute("RELEASE SAVEPOINT request", (), "registry rollback failed")
            raise
        self._execute("RELEASE SAVEPOINT request", (), "registry savepoint failed")

    # --- devices -------------------------------------------------------------------------

    def device(self, device_id: str) -> Device | None:
        rows = self._query("SELECT device_id, state, bootstrap_fingerprint, created FROM devices"
                           " WHERE device_id = ?", (device_id,))
        if not rows:
            return None
        row = rows[0]
        return Device(row[0], DeviceState(row[1]), row[2], row[3])

    def states(self) -> dict[str, DeviceState]:
        """Every device's state: what the brokers' bans must follow."""
        return {row[0]: DeviceState(row[1])
                for row in self._query("SELECT device_id, state FROM devices")}

    def register_device(self, device_id: str, bootstrap: x509.Certificate,
                        previous: x509.Certificate | None = None, *,
                        attested: bool = False, replace: bool = False) -> Device:
        """Allowlist ``device_id`` with its bootstrap certificate (the factory's registrar);
        ``attested``: the factory verified its key's TPM2_Certify by the device's AK.

        Registering the same certificate again changes nothing. Replacing a
        device's bootstrap certificate needs the one on record as ``previous``,
        so a typo on the factory line cannot take over another device's name;
        ``replace`` is a caller's decision to replace whatever is on record (the
        factory signing service's ``force``, which it audits).
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
            elif not replace and (
                    previous is None
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
            self.record_certificate(device_id, bootstrap, CertKind.BOOTSTRAP, attested)
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
                           kind: CertKind, attested: bool = False) -> None:
        serial = serial_hex(certificate.serial_number)
        issuer = issuer_name(certificate.issuer)
        cursor = self._execute(
            "INSERT INTO certificates (issuer, serial, device_id, kind, not_before, not_after,"
            " public_key_sha256, status, recorded, attested)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'issued', ?, ?)"
            " ON CONFLICT (issuer, serial) DO NOTHING",
            (issuer, serial, device_id, kind.value, timestamp(certificate.not_valid_before_utc),
             timestamp(certificate.not_valid_after_utc),
             public_key_fingerprint(certificate.public_key()), timestamp(), int(attested)),
            f"cannot record certificate {serial}")
        if cursor.rowcount == 0:
            known = self.certificate(serial, issuer)
            if known is None or known.device_id != device_id:
                raise RegistryError(f"serial {serial} of {issuer} is already recorded for "
                                    f"{known.device_id if known else 'another device'}")

    def record_issuance(self, device_id: str, certificate: x509.Certificate, kind: IssuanceKind,
                        supersede: tuple[str, ...] = (), when: dt.datetime | None = None,
                        attested: bool = False) -> None:
        """An operational certificate handed out: its record (``attested``: its key's TPM
        attestation was verified), its issuance row, and the serials of the same issuer
        it supersedes, in one transaction."""
        issuer = issuer_name(certificate.issuer)
        with self.transaction():
            self.record_certificate(device_id, certificate, CertKind.OPERATIONAL, attested)
            self._query("INSERT INTO issuances (device_id, kind, issuer, serial, at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (device_id, kind.value, issuer, serial_hex(certificate.serial_number),
                         timestamp(when)))
            self.supersede(supersede, when, issuer)

    def certificate(self, serial: int | str,
                    issuer: x509.Name | str | None = None) -> CertificateRecord | None:
        """The certificate ``issuer`` issued with ``serial``.

        Without an issuer, the one certificate with that serial; a serial two
        issuers both used is a RegistryError that asks for the issuer.
        """
        serial = serial_hex(serial)
        if issuer is not None:
            rows = self._query(f"{_CERTIFICATE} WHERE issuer = ? AND serial = ?",
                               (issuer_name(issuer), serial))
        else:
            rows = self._query(f"{_CERTIFICATE} WHERE serial = ?", (serial,))
            if len(rows) > 1:
                issuers = "; ".join(row[9] or "unknown" for row in rows)
                raise RegistryError(f"serial {serial} was issued by {len(rows)} CAs ({issuers}); "
                                    "name the issuer")
        return _certificate_record(rows[0]) if rows else None

    def certificates(self, device_id: str | None = None) -> list[CertificateRecord]:
        rows = self._query(f"{_CERTIFICATE} WHERE CAST(? AS TEXT) IS NULL OR device_id = ?"
                           " ORDER BY recorded, serial", (device_id, device_id))
        return [_certificate_record(row) for row in rows]

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

    def supersede(self, serials: tuple[str, ...], when: dt.datetime | None = None,
                  issuer: x509.Name | str | None = None) -> None:
        """Revoke ``serials`` (``issuer``'s, superseded) inside the caller's transaction.

        No audit row of its own: the enrollment decision that replaced them is
        the one entry, and it names the old serial.
        """
        if issuer is not None:  # the rows are named: no lookup before the update
            named = [(issuer_name(issuer), serial_hex(serial)) for serial in serials]
        else:
            named = [(record.issuer, record.serial)
                     for record in map(self.certificate, serials) if record is not None]
        for issuer_text, serial in named:
            self._query("UPDATE certificates SET status = 'revoked', revocation_reason = ?,"
                        " revoked_at = ? WHERE issuer = ? AND serial = ? AND status = 'issued'",
                        (x509.ReasonFlags.superseded.value, timestamp(when), issuer_text,
                         serial))

    def revoke(self, serial: int | str, reason: x509.ReasonFlags,
               when: dt.datetime | None = None,
               issuer: x509.Name | str | None = None) -> CertificateRecord:
        serial = serial_hex(serial)
        with self.transaction():
            record = self.certificate(serial, issuer)
            if record is None:
                raise RegistryError(f"no certificate with serial {serial} in the registry")
            if record.revoked:
                raise RegistryError(f"certificate {serial} was revoked at {record.revoked_at} "
                                    f"({record.revocation_reason})")
            self._query("UPDATE certificates SET status = 'revoked', revocation_reason = ?,"
                        " revoked_at = ? WHERE issuer = ? AND serial = ?",
                        (reason.value, timestamp(when), record.issuer, serial))
            self.audit(AuditEntry("revoke", "revoked", reason.value, record.device_id,
                                  peer_serial=serial))
        revoked = self.certificate(serial, record.issuer)
        assert revoked is not None
        return revoked

    def adopt_issuers(self, issuers: Mapping[CertKind, x509.Name | str]) -> int:
        """Name the issuer of certificates recorded before schema 2, by their kind.

        One Factory CA signed every bootstrap certificate and one Device CA every
        operational one, so the EST service, which holds both, names them at
        start. Returns how many rows it named.
        """
        named = 0
        with self.transaction():
            for kind, issuer in issuers.items():
                # A row whose (issuer, serial) is taken already keeps '' (SQLite's UPDATE
                # OR IGNORE, written so that both databases read it).
                name = issuer_name(issuer)
                cursor = self._execute(
                    "UPDATE certificates SET issuer = ? WHERE issuer = '' AND kind = ?"
                    " AND NOT EXISTS (SELECT 1 FROM certificates AS taken"
                    " WHERE taken.issuer = ? AND taken.serial = certificates.serial)",
                    (name, kind.value, name), f"cannot name the issuer of {kind} certificates")
                named += cursor.rowcount
        return named

    def revocations(self) -> list[pki.Revocation]:
        """The Device CA's revoked certificates, with their notAfter for pruning the CRL."""
        rows = self._query("SELECT serial, revoked_at, revocation_reason, not_after"
                           " FROM certificates WHERE status = 'revoked' AND kind = ?"
                           " ORDER BY revoked_at", (CertKind.OPERATIONAL.value,))
        return [pki.Revocation(int(serial, 16), dt.datetime.fromisoformat(at),
                               x509.ReasonFlags(reason or "unspecified"),
                               dt.datetime.fromisoformat(not_after))
                for serial, at, reason, not_after in rows]

    # --- attestation keys (schema 3) ------------------------------------------------------

    def register_attestation_key(self, key: AttestationKey) -> AttestationKey:
        """Record (or replace, when the factory provisions the device again) its AK."""
        with self.transaction():
            if self.device(key.device_id) is None:
                raise RegistryError(f"no device {key.device_id} to register an attestation "
                                    "key for")
            now = timestamp()
            certificate = key.certificate
            self._query("INSERT INTO attestation_keys (device_id, ak_public, ak_name,"
                        " ek_cert_sha256, registered, certificate) VALUES (?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (device_id) DO UPDATE SET ak_public = excluded.ak_public,"
                        " ak_name = excluded.ak_name, ek_cert_sha256 = excluded.ek_cert_sha256,"
                        " registered = excluded.registered, certificate = excluded.certificate",
                        (key.device_id, key.ak_public, key.ak_name.hex(), key.ek_cert_sha256,
                         now, pki.cert_pem(certificate).decode() if certificate else None))
            certified = (f"; certificate {serial_hex(certificate.serial_number)}"
                         if certificate else "")
            self.audit(AuditEntry("attestation-key", "registered",
                                  f"AK {key.ak_name.hex()} proven beside EK certificate "
                                  f"{key.ek_cert_sha256}{certified}", key.device_id))
        return dataclasses.replace(key, registered=now)

    def attestation_key(self, device_id: str) -> AttestationKey | None:
        """The device's AK as registered, with the Factory CA's certificate of it if any."""
        rows = self._query("SELECT device_id, ak_public, ak_name, ek_cert_sha256, certificate,"
                           " registered FROM attestation_keys WHERE device_id = ?", (device_id,))
        if not rows:
            return None
        row = rows[0]
        certificate = x509.load_pem_x509_certificate(row[4].encode()) if row[4] else None
        return AttestationKey(row[0], bytes(row[1]), bytes.fromhex(row[2]), row[3], certificate,
                              row[5])

    # --- the factory signing service (schema 5) --------------------------------------------

    def factory_enrollment(self, device_id: str) -> FactoryEnrollment | None:
        rows = self._query("SELECT device_id, station, station_serial, certificate, at"
                           " FROM factory_enrollments WHERE device_id = ?", (device_id,))
        if not rows:
            return None
        row = rows[0]
        return FactoryEnrollment(row[0], row[1], row[2],
                                 x509.load_pem_x509_certificate(row[3].encode()), row[4])

    def record_factory_enrollment(self, enrollment: FactoryEnrollment) -> None:
        """Record (or replace) which station the device's bootstrap certificate went to;
        inside the caller's transaction, beside :meth:`register_device`."""
        self._query("INSERT INTO factory_enrollments (device_id, station, station_serial,"
                    " certificate, public_key_sha256, at) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (device_id) DO UPDATE SET station = excluded.station,"
                    " station_serial = excluded.station_serial,"
                    " certificate = excluded.certificate,"
                    " public_key_sha256 = excluded.public_key_sha256, at = excluded.at",
                    (enrollment.device_id, enrollment.station, enrollment.station_serial,
                     pki.cert_pem(enrollment.certificate).decode(),
                     enrollment.public_key_sha256, enrollment.at or timestamp()))

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

    def issuances(self, device_id: str | None = None) -> list[Issuance]:
        rows = self._query("SELECT device_id, kind, issuer, serial, at FROM issuances"
                           " WHERE CAST(? AS TEXT) IS NULL OR device_id = ? ORDER BY id",
                           (device_id, device_id))
        return [Issuance(row[0], IssuanceKind(row[1]), *row[2:]) for row in rows]

    def issued_since(self, device_id: str, kind: IssuanceKind,
                     since: dt.datetime) -> tuple[dt.datetime, ...]:
        """When the device was issued a certificate of ``kind`` since ``since``: the daily
        budgets (renewals, recoveries, bootstrap re-enrollments) count these rows."""
        rows = self._query("SELECT at FROM issuances WHERE device_id = ? AND kind = ? AND at >= ?"
                           " ORDER BY at", (device_id, kind.value, timestamp(since)))
        return tuple(dt.datetime.fromisoformat(row[0]) for row in rows)

    def audit_log(self, device_id: str | None = None, limit: int = 1000) -> list[AuditEntry]:
        rows = self._query(
            "SELECT action, decision, reason, device_id, status, peer_serial, issued_serial, at"
            " FROM audit WHERE CAST(? AS TEXT) IS NULL OR device_id = ? ORDER BY id DESC LIMIT ?",
            (device_id, device_id, limit))
        return [AuditEntry(*row) for row in reversed(rows)]


@contextmanager
def open_registry(where: RegistryLocation, busy_timeout: float = 10.0,
                  synchronous: str = "full") -> Iterator[Registry]:
    """One connection, for one process or thread; closed on exit.

    ``where`` is a SQLite file's path, or a ``postgresql://`` URL (libpq's: a
    ``host=/dir`` parameter for a unix socket). A database that cannot be reached is
    a RegistryError either way.

    ``full`` (the default): a certificate handed to a device is on disk first,
    so it can always be found and revoked later. ``normal`` skips the fsync at
    each commit (PostgreSQL: ``synchronous_commit = off``); a power cut may then
    forget the last issuance records (the database stays consistent), see
    est_config.py for when that is acceptable.
    """
    database = connect(where, busy_timeout, synchronous)
    try:
        yield Registry(database)
    finally:
        database.close()


class Registrar(Protocol):
    """The factory's registrar: a device, its bootstrap certificate, the one it replaces,
    and (when the line attests TPMs) its attestation key, which has certified the
    bootstrap key (the factory verified that before the certificate was issued)."""

    def __call__(self, device_id: str, bootstrap: x509.Certificate,
                 previous: x509.Certificate | None,
                 attestation: AttestationKey | None = None) -> None: ...


def registrar(path: RegistryLocation) -> Registrar:
    """The factory's hook: allowlist a device in the registry at ``path`` (or URL), and record its
    attestation key when given, the bootstrap certificate then as attested (one transaction)."""

    def register(device_id: str, bootstrap: x509.Certificate,
                 previous: x509.Certificate | None,
                 attestation: AttestationKey | None = None) -> None:
        with open_registry(path) as registry, registry.transaction():
            registry.register_device(device_id, bootstrap, previous,
                                     attested=attestation is not None)
            if attestation is not None:
                registry.register_attestation_key(attestation)

    return register
