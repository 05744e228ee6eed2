"""Which CRL may replace the one a broker holds: a new CRL must never un-revoke.

The broker's ``crlfile`` is the only thing that keeps a revoked certificate out
at the TLS layer, so every path that writes it (``render``, ``refresh-crl``,
``enforce``) goes through :func:`accept_crl` under :func:`crl_lock`. A CRL that
replaces the installed one must be signed by the broker's client CA, not past
its nextUpdate, and must not roll back (:func:`rollback`):

* thisUpdate strictly later than the installed CRL's (an older list, or a tie
  Mosquitto may resolve in favour of the old one: it keeps every reloaded CRL
  and OpenSSL uses the latest);
* a CRL number above the installed one's, when both carry one;
* every serial the installed CRL lists is listed again, unless that
  certificate has expired: RFC 5280 lets the PKI drop it then
  (``provisioning.pki.still_listed``), and an expired certificate is refused
  for its dates anyway. Whether it has expired is read from the registry;
  without a registry a dropped serial is refused, since a CRL cannot say why
  an entry is missing (a pruned entry looks like an un-revoked one).

``force`` skips the rollback rules (never the signature or nextUpdate check,
which would lock every device out). Installing the CRL already installed is a
no-op, so the refresh can run as often as wanted, from several hosts: the lock
serialises read, compare and replace, and the replace is atomic.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from device_agent._files import exclusive_lock
from device_agent.errors import FileStoreError
from provisioning.errors import ProvisioningError
from provisioning.registry import is_url, open_registry

from .errors import BrokerConfigError, CRLRefused, RevocationError

# serials -> the notAfter of those whose certificate is known
ExpiryLookup = Callable[[Collection[int]], Mapping[int, dt.datetime]]


def load_crl(data: bytes) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise RevocationError(f"not a PEM CRL: {exc}", "crl") from exc


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise RevocationError(f"client CA key type {type(key).__name__} not supported", "crl")
    return crl.issuer == issuer.subject and crl.is_signature_valid(key)


@dataclass(frozen=True)
class Rollback:
    """How a new CRL would roll back the installed one; false when it would not."""

    not_newer: bool = False
    lower_number: bool = False
    dropped: tuple[int, ...] = ()  # revoked serials left out, not known to have expired

    def __bool__(self) -> bool:
        return self.not_newer or self.lower_number or bool(self.dropped)

    def describe(self) -> str:
        reasons = []
        if self.not_newer:
            reasons.append("its thisUpdate is not later than the installed CRL's")
        if self.lower_number:
            reasons.append("its CRL number is not above the installed one")
        if self.dropped:
            shown = ", ".join(f"{serial:x}" for serial in self.dropped[:5])
            more = f" and {len(self.dropped) - 5} more" if len(self.dropped) > 5 else ""
            reasons.append(f"it leaves out {len(self.dropped)} revoked certificate(s) not known "
                           f"to have expired ({shown}{more}): the broker would accept them again")
        return "; ".join(reasons)


def rollback(installed: x509.CertificateRevocationList, new: x509.CertificateRevocationList,
             not_after: Mapping[int, dt.datetime], now: dt.datetime) -> Rollback:
    """Whether ``new`` would roll back ``installed`` (see the module's rules).

    ``not_after`` holds the expiry of the certificates that are known; a serial
    missing from ``new`` is accepted only if its certificate expired by ``now``.
    """
    old_number, new_number = crl_number(installed), crl_number(new)
    kept = {entry.serial_number for entry in new}
    return Rollback(
        not_newer=new.last_update_utc <= installed.last_update_utc,
        lower_number=(old_number is not None and new_number is not None
                      and new_number <= old_number),
        dropped=tuple(sorted(
            entry.serial_number for entry in installed
            if entry.serial_number not in kept
            and not (entry.serial_number in not_after and not_after[entry.serial_number] <= now))),
    )


def accept_crl(new_pem: bytes, issuer: x509.Certificate, installed_pem: bytes | None, *,
               serial: int | None = None, expiries: ExpiryLookup | None = None,
               force: bool = False, now: dt.datetime | None = None,
               ) -> x509.CertificateRevocationList:
    """Check ``new_pem`` before it replaces ``installed_pem``; the parsed CRL, or raise.

    ``RevocationError`` (step ``crl``) for a CRL the broker cannot use, ``CRLRefused``
    for one that would roll the installed CRL back and ``force`` is not set. An
    installed CRL of another CA (a re-created PKI) or one that does not parse is
    not compared: there is nothing it could still be keeping out.
    """
    now = now or dt.datetime.now(dt.UTC)
    crl = load_crl(new_pem)
    if not _signed_by(crl, issuer):
        raise RevocationError("the CRL is not signed by the broker's client CA", "crl")
    if crl.next_update_utc is not None and crl.next_update_utc <= now:
        raise RevocationError("the CRL is past its nextUpdate: the broker would refuse "
                              "every device", "crl")
    if serial is not None and crl.get_revoked_certificate_by_serial_number(serial) is None:
        raise RevocationError(f"serial {serial:x} is not on the CRL", "crl")
    if force or not installed_pem or installed_pem == new_pem:
        return crl
    try:
        installed = x509.load_pem_x509_crl(installed_pem)
    except ValueError:
        return crl
    if not _signed_by(installed, issuer):
        return crl
    missing = {entry.serial_number for entry in installed} - {entry.serial_number for entry in crl}
    not_after = expiries(missing) if missing and expiries is not None else {}
    found = rollback(installed, crl, not_after, now)
    if found:
        raise CRLRefused("refusing a CRL that would roll back the installed one: "
                         f"{found.describe()} (--force installs it anyway)", found.dropped)
    return crl


def registry_expiries(path: Path | str) -> ExpiryLookup:
    """Look certificates up in the registry at ``path`` (or a postgresql:// URL), opened
    only when a serial is missing."""

    def lookup(serials: Collection[int]) -> Mapping[int, dt.datetime]:
        if not is_url(path) and not Path(path).is_file():
            raise BrokerConfigError(f"no registry at {path}")
        try:
            with open_registry(path) as registry:
                records = {serial: registry.certificate(serial) for serial in serials}
        except ProvisioningError as exc:
            raise BrokerConfigError(f"cannot read the registry {path}: {exc}") from exc
        return {serial: dt.datetime.fromisoformat(record.not_after)
                for serial, record in records.items() if record is not None}

    return lookup


@contextmanager
def crl_lock(path: Path) -> Iterator[None]:
    """Hold the broker's CRL lock for a read-compare-replace (``_files.exclusive_lock``)."""
    try:
        with exclusive_lock(path):
            yield
    except FileStoreError as exc:
        raise BrokerConfigError(str(exc)) from exc
