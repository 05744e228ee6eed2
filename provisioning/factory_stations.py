"""The factory line's stations: a Station CA, the signing service's TLS certificate, and the
book of station certificates with the revoked ones marked.

A station is a host on the line that drives devices under test; it authenticates to the
factory signing service (``factory-ca serve``) with a certificate of its own, issued by
the Station CA, a root that nothing but the signing service trusts. The stations
directory holds::

    ca.pem, ca.key      the Station CA (ca.key 0600; passphrase-protected if set)
    service.pem/.key    the signing service's TLS certificate, from the Station CA
    stations.json       every station certificate issued: name, serial, when, revoked

Revocation is the book, not a CRL: ``factory-ca station revoke NAME`` marks every
certificate of NAME revoked with one ``os.replace`` of ``stations.json``, and the
service reads the book again whenever the file changed (a ``stat`` per request), so a
revoked station is refused from its next request on without a restart. A certificate
the book does not list (a Station CA key used behind the book's back) is refused too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent._files import fsync_dir, write_private

from . import pki
from .errors import PKIError

STATION_LIFETIME = dt.timedelta(days=2 * 365)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ORGANIZATION = "Factory station"


def check_station_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"station name {name!r}: 1-64 of A-Z a-z 0-9 . _ -, "
                         "starting with a letter or digit")
    return name


@dataclass(frozen=True)
class StationPaths:
    base: Path

    @property
    def ca(self) -> Path:
        return self.base / "ca.pem"

    @property
    def service_cert(self) -> Path:
        return self.base / "service.pem"

    @property
    def service_key(self) -> Path:
        return self.base / "service.key"

    @property
    def book(self) -> Path:
        return self.base / "stations.json"


@dataclass(frozen=True)
class StationEntry:
    name: str
    serial: str  # lowercase hex, as the registry spells serials
    issued: str
    revoked: str | None = None


def _serial(certificate: x509.Certificate) -> str:
    return f"{certificate.serial_number:x}"


def init_stations(directory: Path, hostnames: Sequence[str],
                  passphrase: bytes | None = None) -> StationPaths:
    """A new Station CA, the service's TLS certificate for ``hostnames``, an empty book."""
    paths = StationPaths(directory)
    if (directory / "ca.key").exists():
        raise FileExistsError(f"{directory} already holds a Station CA")
    if not hostnames:
        raise ValueError("name at least one hostname or address for the signing service")
    authority = pki.new_root("Factory Station CA", pki.ROOT_LIFETIME, ecdsa=True)
    pki.write_authority(directory, authority, passphrase)
    key = pki.new_server_key()
    cert = authority.issue_server(hostnames[0], hostnames, key.public_key(),
                                  pki.SERVER_LIFETIME)
    write_private(paths.service_key, pki.key_pem(key))
    write_private(paths.service_cert, pki.cert_pem(cert), 0o644)
    _write_book(paths, [])
    return paths


@contextmanager
def _locked(paths: StationPaths) -> Iterator[list[StationEntry]]:
    """The book under an exclusive lock, for a change written back by the caller."""
    with open(paths.base / ".stations.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield read_book(paths.book)


def read_book(path: Path) -> list[StationEntry]:
    try:
        rows = json.loads(path.read_text())
        return [StationEntry(row["name"], row["serial"], row["issued"], row.get("revoked"))
                for row in rows["stations"]]
    except FileNotFoundError as exc:
        raise PKIError(f"no station book {path} (factory-ca init first)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PKIError(f"station book {path} unreadable: {exc}") from exc


def _write_book(paths: StationPaths, entries: list[StationEntry]) -> None:
    data = json.dumps({"stations": [entry.__dict__ for entry in entries]}, indent=1)
    staged = paths.book.with_name(f".{paths.book.name}.new")
    write_private(staged, data.encode(), 0o644)
    os.replace(staged, paths.book)
    fsync_dir(paths.base)


def add_station(directory: Path, name: str, out: Path,
                passphrase: bytes | None = None) -> StationEntry:
    """Issue station ``name`` a key and certificate into ``out`` (station.key 0600,
    station.pem, service-trust.pem: the Station CA the service's certificate chains to)."""
    check_station_name(name)
    paths = StationPaths(directory)
    authority = pki.open_authority(directory, passphrase)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(seconds=60)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                                 x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(authority.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + STATION_LIFETIME,
                             authority.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                     False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            authority.certificate.public_key()), critical=False)  # type: ignore[arg-type]
    )
    certificate = authority.sign(builder)
    entry = StationEntry(name, _serial(certificate), now.isoformat(timespec="seconds"))
    out.mkdir(parents=True, exist_ok=True)
    write_private(out / "station.key", pki.key_pem(key))
    write_private(out / "station.pem", pki.cert_pem(certificate), 0o644)
    write_private(out / "service-trust.pem", paths.ca.read_bytes(), 0o644)
    with _locked(paths) as book:
        _write_book(paths, [*book, entry])
    return entry


def revoke_station(directory: Path, name: str) -> list[StationEntry]:
    """Mark every certificate of station ``name`` revoked; the entries it changed."""
    paths = StationPaths(directory)
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with _locked(paths) as book:
        if not any(entry.name == name for entry in book):
            raise PKIError(f"no station {name!r} in {paths.book}")
        updated = [dataclasses.replace(e, revoked=now) if e.name == name and e.revoked is None
                   else e for e in book]
        _write_book(paths, updated)
    return [new for old, new in zip(book, updated, strict=True) if old is not new]


class StationBook:
    """The book as the service reads it: again whenever the file changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._by_serial: dict[str, StationEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        status = self.path.stat()
        seen = (status.st_ino, status.st_mtime_ns, status.st_size)
        if seen != self._seen:
            self._by_serial = {entry.serial: entry for entry in read_book(self.path)}
            self._seen = seen

    def lookup(self, certificate: x509.Certificate) -> tuple[StationEntry | None, str]:
        """The station a certificate belongs to, or None and why it is refused."""
        self.refresh()
        entry = self._by_serial.get(_serial(certificate))
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if entry is None or not names or names[0].value != entry.name:
            return None, "unknown station certificate"
        if entry.revoked is not None:
            return None, f"station {entry.name} is revoked"
        return entry, ""
