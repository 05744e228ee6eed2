"""Certificate authorities of a deployment and the certificates they issue.

Two trust domains, as in IEEE 802.1AR:

* the operator's root (Ed25519) signs the Device CA (EC P-256, issues the short-lived
  operational certificates) and the TLS server certificates (Ed25519) of the EST
  server and the broker;
* the Factory CA is a root of its own (the manufacturer's IDevID root) and signs
  bootstrap certificates. Only the EST server trusts it, so a bootstrap
  certificate can never open a broker session.

Server-side keys are Ed25519 on purpose: tpm2-openssl implements ECDSA and RSA
verification but not Ed25519, so a device verifying the server's chain does it on
its CPU and the TPM signs only the CertificateVerify (see device_agent/tls.py).

A CA key is a file (``ca.key``, the embedded default) or an object in a PKCS#11 token
(hsm.py): then ``ca.key.uri`` beside ``ca.pem`` names it, so every consumer (est-server,
device-pki, the factory, broker-config) finds it as it finds a file, without a flag.
Whatever the key, nothing signed leaves an :class:`Authority` unverified.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import ipaddress
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent._files import exclusive_lock, write_private
from device_agent.identity import device_uri, validate_device_id

from . import hsm
from .errors import PKIError

# tcg-kp-AIKCertificate (TCG): the extended key usage of an attestation key certificate, as
# WebAuthn TPM attestation and Windows key attestation require of one.
TCG_KP_AIK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.3")


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _signing_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Authority:
    """A CA certificate with its key; ``chain`` holds its issuers up to the root.

    The key is a file's or a token's (:class:`hsm.TokenECKey`); used as a context
    manager, the Authority gives back its token session on exit (a no-op for a file).
    """

    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def name(self) -> x509.Name:
        return self.certificate.subject

    @functools.cached_property
    def _key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AKI of everything it signs: read once, not re-encoded from its key per issue."""
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())

    def _builder(
        self,
        subject: x509.Name,
        public_key: CertificateIssuerPublicKeyTypes | CertificatePublicKeyTypes,
        lifetime: dt.timedelta,
        not_before: dt.datetime | None,
    ) -> x509.CertificateBuilder:
        # Backdated against clock skew, by no more than a tenth of a short lifetime.
        start = not_before or _now() - min(dt.timedelta(seconds=60), lifetime / 10)
        end = min(start + lifetime, self.certificate.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(self._key_identifier, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        )

    def __enter__(self) -> Authority:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if isinstance(self.key, hsm.TokenECKey):
            self.key.close()

    def sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        certificate = builder.sign(self.key, _signing_hash(self.key))
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise PKIError(f"{self.name.rfc4514_string()}: a certificate it signed does not "
                           "verify against its CA certificate; nothing was issued") from exc
        return certificate

    def issue_ca(
        self, common_name: str, key: CertificateIssuerPrivateKeyTypes, lifetime: dt.timedelta
    ) -> Authority:
        builder = (
            self._builder(_name(common_name), key.public_key(), lifetime, None)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_CA_USAGE, critical=True)
        )
        return Authority(self.sign(builder), key, (self.certificate, *self.chain))

    def issue_client(
        self,
        device_id: str,
        public_key: CertificatePublicKeyTypes,
        lifetime: dt.timedelta,
        not_before: dt.datetime | None = None,
        policies: Sequence[x509.ObjectIdentifier] = (),
    ) -> x509.Certificate:
        """A device certificate: CN and a URI SAN name the device, clientAuth only;
        ``policies``, if any, in a certificatePolicies extension (not critical)."""
        builder = self._device_builder(device_id, public_key, lifetime, not_before,
                                       ExtendedKeyUsageOID.CLIENT_AUTH)
        if policies:
            builder = builder.add_extension(x509.CertificatePolicies(
                [x509.PolicyInformation(oid, None) for oid in policies]), critical=False)
        return self.sign(builder)

    def issue_attestation_key(
        self, device_id: str, public_key: CertificatePublicKeyTypes, lifetime: dt.timedelta,
    ) -> x509.Certificate:
        """A device's attestation key (AK) certificate, for relying parties that verify
        what the AK signs (TPM2_Certify, quotes): named like the device's certificates,
        with tcg-kp-AIKCertificate as its only extended key usage, so no TLS peer
        accepts it as a client or server certificate."""
        return self.sign(self._device_builder(device_id, public_key, lifetime, None,
                                              TCG_KP_AIK_CERTIFICATE))

    def _device_builder(
        self,
        device_id: str,
        public_key: CertificatePublicKeyTypes,
        lifetime: dt.timedelta,
        not_before: dt.datetime | None,
        usage: x509.ObjectIdentifier,
    ) -> x509.CertificateBuilder:
        """CN and a URI SAN name the device; a leaf, digitalSignature, ``usage`` only."""
        check_public_key(public_key)
        return (
            self._builder(_name(validate_device_id(device_id)), public_key, lifetime, not_before)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(device_id))]),
                critical=False,
            )
        )

    def issue_server(
        self,
        common_name: str,
        hostnames: Sequence[str],
        public_key: CertificatePublicKeyTypes,
        lifetime: dt.timedelta,
    ) -> x509.Certificate:
        builder = (
            self._builder(_name(common_name), public_key, lifetime, None)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(list(_general_names(hostnames))), critical=False
            )
        )
        return self.sign(builder)


_CA_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)
_LEAF_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)


def _general_names(hostnames: Iterable[str]) -> Iterable[x509.GeneralName]:
    for host in hostnames:
        try:
            yield x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            yield x509.DNSName(host)


def check_public_key(public_key: object) -> None:
    """Keys we certify: EC P-256/P-384 or RSA of at least 2048 bits."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise ValueError(f"EC curve {public_key.curve.name} is not accepted (P-256 or P-384)")
    elif isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise ValueError(f"RSA-{public_key.key_size} is too weak (2048 bits or more)")
    elif not isinstance(public_key, ed25519.Ed25519PublicKey):
        raise ValueError(f"key type {type(public_key).__name__} is not accepted")


def new_root(common_name: str, lifetime: dt.timedelta, *, ecdsa: bool = False,
             key: CertificateIssuerPrivateKeyTypes | None = None) -> Authority:
    """A self-signed root; Ed25519 unless ``ecdsa`` asks for P-256 (or ``key`` is given)."""
    if key is None:
        key = (ec.generate_private_key(ec.SECP256R1()) if ecdsa
               else ed25519.Ed25519PrivateKey.generate())
    name = _name(common_name)
    start = _now() - dt.timedelta(seconds=60)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    certificate = builder.sign(key, _signing_hash(key))
    try:
        certificate.verify_directly_issued_by(certificate)
    except InvalidSignature as exc:
        raise PKIError(f"the self-signed {common_name} certificate does not verify") from exc
    return Authority(certificate, key)


# --- PEM files -------------------------------------------------------------------------


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def key_pem(key: CertificateIssuerPrivateKeyTypes, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def load_certs(path: str | Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def write_authority(directory: Path, authority: Authority, passphrase: bytes | None = None) -> None:
    """``ca.pem`` (the CA alone), ``chain.pem`` (CA then issuers), ``ca.key`` (0600), or for
    a key in a token ``ca.key.uri`` (0600: the URI may carry a pin-value)."""
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(authority.key, hsm.TokenECKey):
        write_private(directory / KEY_URI_FILE, (authority.key.uri.full() + "\n").encode())
    else:
        write_private(directory / "ca.key", key_pem(authority.key, passphrase))
    write_private(directory / "ca.pem", cert_pem(authority.certificate), 0o644)
    write_private(directory / "chain.pem", cert_pem(authority.certificate, *authority.chain), 0o644)


KEY_URI_FILE = "ca.key.uri"


def read_authority(directory: Path, passphrase: bytes | None = None) -> Authority:
    """The CA in ``directory``; its key from ``ca.key``, or from the token ``ca.key.uri``
    names (then ``passphrase`` is not used, and close the Authority when done)."""
    certs = load_certs(directory / "chain.pem")
    if (directory / KEY_URI_FILE).exists():
        if (directory / "ca.key").exists():
            raise PKIError(f"{directory} holds both ca.key and {KEY_URI_FILE}: keep one")
        public = certs[0].public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise PKIError(f"{directory}: a CA key in a token must be EC (P-256 or P-384)")
        uri = (directory / KEY_URI_FILE).read_text()
        return Authority(certs[0], hsm.open_key(uri, public), tuple(certs[1:]))
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), passphrase)
    ca_key_types = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if not isinstance(key, ca_key_types):
        raise ValueError(f"{directory / 'ca.key'} holds a {type(key).__name__}, not a CA key")
    return Authority(certs[0], key, tuple(certs[1:]))


def open_authority(directory: Path, passphrase: bytes | None = None) -> Authority:
    """:func:`read_authority` with its failures as :class:`PKIError` naming the directory."""
    try:
        return read_authority(directory, passphrase)
    except FileNotFoundError as exc:
        raise PKIError(f"no CA in {directory}: {exc.filename} is missing") from exc
    except TypeError as exc:
        hint = "a passphrase is needed" if passphrase is None else "no passphrase is set"
        raise PKIError(f"cannot unlock the CA key in {directory}: {hint}") from exc
    except ValueError as exc:
        raise PKIError(f"cannot read the CA in {directory} (wrong passphrase?): {exc}") from exc


def new_server_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


# --- a deployment's PKI directory -------------------------------------------------------

ROOT_LIFETIME = dt.timedelta(days=20 * 365)
CA_LIFETIME = dt.timedelta(days=10 * 365)
TOKEN_LABELS = ("device-ca", "factory-ca")  # the CA keys init_pki makes in a token
SERVER_LIFETIME = dt.timedelta(days=397)


@dataclass(frozen=True)
class PKIPaths:
    """Where a PKI directory keeps each authority and server credential."""

    base: Path

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def device_ca(self) -> Path:
        return self.base / "device-ca"

    @property
    def factory_ca(self) -> Path:
        return self.base / "factory-ca"

    @property
    def servers(self) -> Path:
        return self.base / "servers"

    @property
    def server_trust(self) -> Path:
        """The trust anchor devices use for the EST server and the broker."""
        return self.root / "ca.pem"

    def server_cert(self, name: str) -> Path:
        return self.servers / f"{name}.pem"

    def server_key(self, name: str) -> Path:
        return self.servers / f"{name}.key"

    @property
    def crl(self) -> Path:
        """The Device CA's CRL (PEM), what the broker's ``crlfile`` is a copy of."""
        return self.device_ca / "crl.pem"

    @property
    def crl_settings(self) -> Path:
        """How long each CRL the Device CA publishes is valid (:func:`crl_lifetime`)."""
        return self.device_ca / "crl.toml"

    @property
    def registry(self) -> Path:
        """The default registry database, beside the CAs it records issuance of."""
        return self.base / "registry.sqlite3"


def issue_server_files(
    paths: PKIPaths,
    name: str,
    hostnames: Sequence[str],
    passphrase: bytes | None = None,
    lifetime: dt.timedelta = SERVER_LIFETIME,
) -> tuple[Path, Path]:
    """Issue ``servers/<name>.pem`` (leaf then chain) and its 0600 key from the root."""
    root = read_authority(paths.root, passphrase)
    key = new_server_key()
    cert = root.issue_server(hostnames[0], hostnames, key.public_key(), lifetime)
    paths.servers.mkdir(parents=True, exist_ok=True)
    write_private(paths.server_key(name), key_pem(key))
    write_private(paths.server_cert(name), cert_pem(cert), 0o644)
    return paths.server_cert(name), paths.server_key(name)


def init_pki(
    directory: str | Path,
    *,
    passphrase: bytes | None = None,
    hostnames: Sequence[str] = ("localhost", "127.0.0.1"),
    crl_lifetime: dt.timedelta | None = None,
    pkcs11: str | None = None,
) -> PKIPaths:
    """Create the root, the Device CA, the Factory CA and the EST and broker certificates;
    ``crl_lifetime`` (default :data:`CRL_LIFETIME`) is kept for every later CRL.

    ``pkcs11``, a PKCS#11 URI naming a token (and its module and PIN), makes the Device
    CA's and the Factory CA's keys in that token (labels :data:`TOKEN_LABELS`, never
    extractable); the root and server keys stay files."""
    paths = PKIPaths(Path(directory))
    if (paths.root / "ca.key").exists():
        raise FileExistsError(f"{paths.root} already holds a CA")
    if crl_lifetime is not None:
        check_crl_lifetime(crl_lifetime)
    with contextlib.ExitStack() as keys:
        device_key: CertificateIssuerPrivateKeyTypes
        factory_key: CertificateIssuerPrivateKeyTypes
        if pkcs11 is None:
            device_key, factory_key = (ec.generate_private_key(ec.SECP256R1()),
                                       ec.generate_private_key(ec.SECP256R1()))
        else:  # made in the token before any file is written: a refusal writes nothing
            device_key, factory_key = hsm.generate_keys(pkcs11, TOKEN_LABELS)
            keys.callback(factory_key.close)
            keys.callback(device_key.close)
        root = new_root("Device Identity Root CA", ROOT_LIFETIME)
        write_authority(paths.root, root, passphrase)
        device_ca = root.issue_ca("Device CA", device_key, CA_LIFETIME)
        write_authority(paths.device_ca, device_ca, passphrase)
        write_authority(paths.factory_ca, new_root("Factory CA", ROOT_LIFETIME, key=factory_key),
                        passphrase)
    for name in ("est", "broker"):
        issue_server_files(paths, name, hostnames, passphrase)
    if crl_lifetime is not None:
        set_crl_lifetime(paths, crl_lifetime)
    return paths


# --- revocation -------------------------------------------------------------------------

CRL_LIFETIME = dt.timedelta(days=7)
CRL_LIFETIME_RANGE = (dt.timedelta(seconds=10), dt.timedelta(days=366))


def check_crl_lifetime(lifetime: dt.timedelta) -> None:
    low, high = CRL_LIFETIME_RANGE
    if not low <= lifetime <= high:
        raise PKIError(f"a CRL lifetime of {lifetime} is outside {low} .. {high}")


def set_crl_lifetime(paths: PKIPaths, lifetime: dt.timedelta) -> Path:
    """Keep ``lifetime`` as the validity of every CRL the Device CA publishes from now on.

    It lives in the PKI directory, not in each publisher's options, so the EST
    server, ``device-pki`` and the refresh timer can never disagree about it.
    """
    check_crl_lifetime(lifetime)
    text = ("# Validity of each CRL the Device CA publishes (nextUpdate - thisUpdate).\n"
            "# The broker refuses every device once its CRL is past nextUpdate: the\n"
            "# refresh (device-crl-refresh.timer) must run well inside this.\n"
            f"lifetime_seconds = {int(lifetime.total_seconds())}\n")
    return write_private(paths.crl_settings, text.encode(), 0o644)


def crl_lifetime(paths: PKIPaths) -> dt.timedelta:
    """The PKI's CRL lifetime (:func:`set_crl_lifetime`), :data:`CRL_LIFETIME` if never set."""
    try:
        text = paths.crl_settings.read_text()
    except FileNotFoundError:
        return CRL_LIFETIME
    except OSError as exc:
        raise PKIError(f"cannot read {paths.crl_settings}: {exc.strerror}") from exc
    try:
        seconds = tomllib.loads(text)["lifetime_seconds"]
        if not isinstance(seconds, int) or isinstance(seconds, bool):
            raise TypeError(seconds)
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
        raise PKIError(f"{paths.crl_settings}: expected lifetime_seconds = <integer>") from exc
    lifetime = dt.timedelta(seconds=seconds)
    try:
        check_crl_lifetime(lifetime)
    except PKIError as exc:
        raise PKIError(f"{paths.crl_settings}: {exc}") from exc
    return lifetime

# removeFromCRL belongs to delta CRLs and certificateHold to a reversible hold; we
# publish neither (a suspended device is refused by the registry, not the CRL).
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    flag.value: flag for flag in x509.ReasonFlags
    if flag not in (x509.ReasonFlags.remove_from_crl, x509.ReasonFlags.certificate_hold)
}


def revocation_reason(text: str) -> x509.ReasonFlags:
    """The RFC 5280 reason named ``text``: ``keyCompromise``, ``key-compromise``, ``superseded``."""
    wanted = text.replace("-", "").replace("_", "").lower()
    for name, flag in REVOCATION_REASONS.items():
        if name.lower() == wanted:
            return flag
    raise ValueError(f"unknown revocation reason {text!r}: one of {', '.join(REVOCATION_REASONS)}")


@dataclass(frozen=True)
class Revocation:
    """One CRL entry: what the registry knows about a revoked certificate.

    ``not_after`` is the certificate's own expiry, when known: it decides when
    the entry may leave the CRL (:func:`still_listed`).
    """

    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags = x509.ReasonFlags.unspecified
    not_after: dt.datetime | None = None


def still_listed(entry: Revocation, previous_this_update: dt.datetime | None) -> bool:
    """Whether ``entry`` belongs on the CRL that follows one issued at ``previous_this_update``.

    RFC 5280 5.1.2.6 lets an entry go once it "appears on one regularly scheduled
    CRL issued beyond the revoked certificate's validity period". So an entry goes
    when the previous CRL was issued after both the certificate's notAfter and its
    revocation (that CRL, built from the same registry, listed it past expiry): the
    first CRL after expiry still lists it, the next one does not. Keeping expired
    entries forever would only grow the list every device handshake is checked
    against; an expired certificate is refused for its dates anyway. An entry whose
    notAfter is unknown, or with no previous CRL, stays.
    """
    if entry.not_after is None or previous_this_update is None:
        return True
    return not (entry.not_after < previous_this_update and entry.revoked_at < previous_this_update)


def build_crl(
    authority: Authority,
    revocations: Iterable[Revocation],
    number: int | None,
    this_update: dt.datetime,
    lifetime: dt.timedelta = CRL_LIFETIME,
) -> x509.CertificateRevocationList:
    """Sign a CRL listing exactly ``revocations``; ``number`` None leaves out the CRL number
    (a CRL outside the PKI's own sequence, see broker_config.deploy)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.certificate.subject)
        .last_update(this_update)
        .next_update(this_update + lifetime)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
            critical=False,
        )
    )
    if number is not None:
        builder = builder.add_extension(x509.CRLNumber(number), critical=False)
    for entry in revocations:
        revoked = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        if entry.reason is not x509.ReasonFlags.unspecified:  # RFC 5280: omit, not "unspecified"
            revoked = revoked.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(revoked.build())
    crl = builder.sign(authority.key, _signing_hash(authority.key))
    issuer_key = authority.certificate.public_key()
    if not isinstance(issuer_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
                      | rsa.RSAPublicKey) or not crl.is_signature_valid(issuer_key):
        raise PKIError(f"{authority.name.rfc4514_string()}: the CRL it signed does not verify "
                       "against its CA certificate; nothing was published")
    return crl


def publish_crl(
    authority: Authority,
    revocations: Iterable[Revocation] | Callable[[], Iterable[Revocation]],
    path: str | Path,
    lifetime: dt.timedelta = CRL_LIFETIME,
) -> x509.CertificateRevocationList:
    """Write a new CRL over ``path`` atomically, following the one already there.

    The CRL number goes up by one and thisUpdate is strictly later than the
    previous CRL's: OpenSSL (and so Mosquitto, which adds every reloaded CRL to
    its store) keeps the CRL with the latest thisUpdate, so a tie could leave
    the older list in force. A thisUpdate in the future would make OpenSSL
    reject the CRL, so a second publication within the same second waits.
    Entries of certificates that expired before the previous CRL was issued are
    left out (:func:`still_listed`). Publishers in several processes (EST
    workers, ``device-pki``) take turns on a lock beside ``path``, so numbers
    and thisUpdate only go up; ``revocations`` is called under that lock, so
    each CRL lists what the registry held when it was signed.
    """
    target = Path(path)
    with exclusive_lock(target.with_name(target.name + ".lock")):
        entries = revocations() if callable(revocations) else revocations
        return _publish(authority, entries, target, lifetime)


def _publish(authority: Authority, revocations: Iterable[Revocation], target: Path,
             lifetime: dt.timedelta) -> x509.CertificateRevocationList:
    number, this_update = 1, _now().replace(microsecond=0)
    previous_this_update: dt.datetime | None = None
    if target.exists():
        try:
            previous = x509.load_pem_x509_crl(target.read_bytes())
        except ValueError as exc:
            raise PKIError(f"{target} is not a PEM CRL; move it away to start over") from exc
        try:
            last = previous.extensions.get_extension_for_class(x509.CRLNumber).value
            number = last.crl_number + 1
        except x509.ExtensionNotFound:
            pass
        previous_this_update = previous.last_update_utc
        this_update = _later_than(previous_this_update)
    listed = [entry for entry in revocations if still_listed(entry, previous_this_update)]
    crl = build_crl(authority, listed, number, this_update, lifetime)
    write_private(target, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return crl


def _later_than(previous: dt.datetime, patience: float = 2.0) -> dt.datetime:
    """The current second once it is past ``previous`` (CRL times have 1 s resolution)."""
    deadline = time.monotonic() + patience
    while True:
        now = _now().replace(microsecond=0)
        if now > previous:
            return now
        if time.monotonic() > deadline:
            raise PKIError(f"the previous CRL's thisUpdate {previous} is in the future; "
                           "check the clock")
        time.sleep(0.05)
