"""The registry's tables, and the migration of a database an older release created.

Version 1 keyed certificates by serial alone, so a bootstrap certificate (Factory
CA) and an operational one (Device CA) with the same serial were one row, and it
had no issuance table: the recovery and bootstrap budgets were counted by
matching the audit log's reason text. Version 2 keys certificates by (issuer,
serial) and records every issuance with its kind.

Migrating from 1 to 2 happens in the opening transaction, so a second process
opening the file waits and then finds version 2. Version 1 never stored the
issuer: those rows get ``''`` (unknown) until a caller that knows the CAs names
them (:meth:`provisioning.registry.Registry.adopt_issuers`; the EST service does
at start). The issuances are rebuilt from the audit log's issued rows: the
endpoint says renew or recover, and a simpleenroll is a bootstrap re-enrollment
when the device had been issued a certificate before (what the policy checks),
so no reason text is read.

Version 3 (key attestation, issue 16) adds the device's attestation key, as the
factory registered it (its TPMT_PUBLIC, TPM name, and the fingerprint of the EK
certificate it was proven resident with), and ``certificates.attested``: whether
the EST server verified that the certificate's key lives in the device's TPM.
Rows from before version 3 are not attested (0).

Version 4 adds ``attestation_keys.certificate``: the AK certificate the Factory CA
issued (PEM), for relying parties; NULL for an AK registered under version 3.

Version 5 adds ``factory_enrollments`` (issue 17): the bootstrap certificate the factory
signing service issued to a device (PEM), and which station asked for it, so a station's
re-run gets the same certificate back and another station's needs ``force``. A new
table only: an older database gains it empty.

These statements are SQLite's; _registry_pg.py translates them for a PostgreSQL
registry (which starts at version 5), so a new table or column is written here once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .errors import RegistryError

SCHEMA_VERSION = 5

_CERTIFICATES = """CREATE TABLE IF NOT EXISTS {table} (
        issuer TEXT NOT NULL,
        serial TEXT NOT NULL,
        device_id TEXT NOT NULL REFERENCES devices (device_id),
        kind TEXT NOT NULL CHECK (kind IN ('bootstrap', 'operational')),
        not_before TEXT NOT NULL,
        not_after TEXT NOT NULL,
        public_key_sha256 TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('issued', 'revoked')),
        revocation_reason TEXT,
        revoked_at TEXT,
        recorded TEXT NOT NULL,
        attested INTEGER NOT NULL DEFAULT 0 CHECK (attested IN (0, 1)),
        PRIMARY KEY (issuer, serial))"""

_ATTESTED_FROM_2 = ("ALTER TABLE certificates ADD COLUMN"
                    " attested INTEGER NOT NULL DEFAULT 0 CHECK (attested IN (0, 1))")
_AK_CERTIFICATE_FROM_3 = "ALTER TABLE attestation_keys ADD COLUMN certificate TEXT"

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS devices (
        device_id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN ('active', 'suspended', 'decommissioned')),
        bootstrap_fingerprint TEXT,
        created TEXT NOT NULL,
        updated TEXT NOT NULL)""",
    _CERTIFICATES.format(table="certificates"),
    "CREATE INDEX IF NOT EXISTS certificates_by_device ON certificates (device_id)",
    "CREATE INDEX IF NOT EXISTS certificates_by_status ON certificates (status, kind)",
    "CREATE INDEX IF NOT EXISTS certificates_by_serial ON certificates (serial)",
    # Each enrollment reads the device's latest operational certificate and its live ones;
    # without these, one scans all the device's certificates and the other every live
    # certificate of every device (by_status).
    "CREATE INDEX IF NOT EXISTS certificates_latest ON certificates"
    " (device_id, kind, recorded, not_before)",
    "CREATE INDEX IF NOT EXISTS certificates_live ON certificates"
    " (device_id, kind, status, not_after)",
    # One row per certificate the EST server handed out, in the transaction that recorded
    # it; the daily budgets count these. The issuer follows a certificate's adoption.
    """CREATE TABLE IF NOT EXISTS issuances (
        id INTEGER PRIMARY KEY,
        device_id TEXT NOT NULL REFERENCES devices (device_id),
        kind TEXT NOT NULL CHECK (kind IN ('enroll', 'renew', 'recover', 'bootstrap-reenroll')),
        issuer TEXT NOT NULL,
        serial TEXT NOT NULL,
        at TEXT NOT NULL,
        FOREIGN KEY (issuer, serial) REFERENCES certificates (issuer, serial)
            ON UPDATE CASCADE)""",
    "CREATE INDEX IF NOT EXISTS issuances_by_device ON issuances (device_id, kind, at)",
    """CREATE TRIGGER IF NOT EXISTS issuances_no_update BEFORE UPDATE ON issuances
        WHEN OLD.issuer != '' OR NEW.serial != OLD.serial OR NEW.kind != OLD.kind
            OR NEW.at != OLD.at OR NEW.device_id != OLD.device_id
        BEGIN SELECT RAISE(ABORT, 'issuances are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS issuances_no_delete BEFORE DELETE ON issuances
        BEGIN SELECT RAISE(ABORT, 'issuances are append-only'); END""",
    # The device's attestation key (AK): one per device, replaced when the factory
    # provisions it again. ``ak_public`` is the marshalled TPMT_PUBLIC the EST server
    # verifies TPM2_Certify evidence with; ``ak_name`` its TPM name (hex); ``certificate``
    # the Factory CA's certificate of it (PEM).
    """CREATE TABLE IF NOT EXISTS attestation_keys (
        device_id TEXT PRIMARY KEY REFERENCES devices (device_id),
        ak_public BLOB NOT NULL,
        ak_name TEXT NOT NULL,
        ek_cert_sha256 TEXT NOT NULL,
        registered TEXT NOT NULL,
        certificate TEXT)""",
    # The factory signing service's last bootstrap certificate per device (PEM) and the
    # station that asked for it (its name and certificate serial).
    """CREATE TABLE IF NOT EXISTS factory_enrollments (
        device_id TEXT PRIMARY KEY REFERENCES devices (device_id),
        station TEXT NOT NULL,
        station_serial TEXT NOT NULL,
        certificate TEXT NOT NULL,
        public_key_sha256 TEXT NOT NULL,
        at TEXT NOT NULL)""",
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

# Version 1's audit names the EST endpoints in ``action``: simpleenroll, simplereenroll and
# recovery. A simpleenroll after an earlier issue to the device was a bootstrap re-enrollment.
_BACKFILL = """INSERT INTO issuances (device_id, kind, issuer, serial, at)
    SELECT a.device_id,
           CASE WHEN a.action = 'simplereenroll' THEN 'renew'
                WHEN a.action = 'recovery' THEN 'recover'
                WHEN EXISTS (SELECT 1 FROM audit b WHERE b.device_id = a.device_id
                             AND b.id < a.id AND b.decision = 'issued'
                             AND b.action IN ('simpleenroll', 'simplereenroll', 'recovery')
                             AND b.issued_serial IS NOT NULL)
                THEN 'bootstrap-reenroll'
                ELSE 'enroll' END,
           c.issuer, c.serial, a.at
    FROM audit a JOIN certificates c ON c.serial = a.issued_serial AND c.kind = 'operational'
    WHERE a.decision = 'issued' AND a.issued_serial IS NOT NULL
      AND a.action IN ('simpleenroll', 'simplereenroll', 'recovery')
    ORDER BY a.id"""

_COPY_FROM_1 = """INSERT INTO certificates_v2 (issuer, serial, device_id, kind, not_before,
        not_after, public_key_sha256, status, revocation_reason, revoked_at, recorded)
    SELECT '', serial, device_id, kind, not_before, not_after, public_key_sha256, status,
        revocation_reason, revoked_at, recorded FROM certificates"""


def _version(db: sqlite3.Connection) -> int | None:
    known = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                       " AND name = 'schema_version'").fetchone()
    rows = db.execute("SELECT version FROM schema_version").fetchall() if known else []
    return int(rows[0][0]) if rows else None


def _certificates_from_1(db: sqlite3.Connection) -> None:
    """Rebuild ``certificates`` with the issuer in its key (SQLite cannot alter a key)."""
    db.execute(_CERTIFICATES.format(table="certificates_v2"))
    db.execute(_COPY_FROM_1)
    db.execute("DROP TABLE certificates")  # its indexes go with it; SCHEMA makes them again
    db.execute("ALTER TABLE certificates_v2 RENAME TO certificates")


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Create the tables, or bring an older database up to :data:`SCHEMA_VERSION`."""
    db.execute("BEGIN IMMEDIATE")
    try:
        version = _version(db)
        if version is not None and version > SCHEMA_VERSION:
            raise RegistryError(f"{path} has schema version {version}; this program knows "
                                f"{SCHEMA_VERSION} at most")
        if version == 1:
            _certificates_from_1(db)  # the table is made with version 3's columns
        elif version == 2:
            db.execute(_ATTESTED_FROM_2)
        elif version == 3:
            db.execute(_AK_CERTIFICATE_FROM_3)
        for statement in SCHEMA:
            db.execute(statement)
        if version == 1:
            db.execute(_BACKFILL)
        if version is None:
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
        elif version < SCHEMA_VERSION:
            db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        db.rollback()
        raise
