"""The factory line: give one device its bootstrap identity, or a CSV line of them.

For a device: make sure its TPM has the storage root key, create the bootstrap
key inside it, have the Factory CA certify a CSR the TPM signed, write what the
agent needs (bootstrap certificate, key blob, trust anchor, agent.toml) and
allowlist the device in the registry. Everything is checked before anything is
written (the agent.toml as the agent will check it, before the TPM is touched),
the files are assembled in a temporary directory and moved into place in one
rename, so a refusal or a crash leaves no partial identity behind.

With manufacturer roots in the line settings (issue 16), the TPM must prove who
made it before anything is written: its EK certificate from NV chains to one of
those roots and names the EK the TPM holds; a new attestation key (AK) is
proven to sit beside that EK by credential activation; the AK certifies the
bootstrap key (TPM2_Certify, in the bootstrap CSR as every later CSR carries it),
which is verified by the EST server's own check before the Factory CA certifies
the AK (``attestation.pem``, for relying parties) and the bootstrap key. The AK's
key file is written beside the bootstrap key (``attestation.tss``, named in
agent.toml as ``[paths] attestation_key``), and its public area, certificate and
the EK certificate's fingerprint are registered with the device, so the EST
server can verify the TPM2_Certify evidence the device's CSRs carry.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import json
import logging
import os
import secrets
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from device_agent._files import fsync_dir, write_private
from device_agent.attest import (
    AttestationKeyBlob,
    activate_credential,
    attested_csr,
    create_attestation_key,
    endorsement_public,
    read_endorsement,
)
from device_agent.config import (
    AgentConfig,
    APISection,
    DeviceSection,
    ESTSection,
    MQTTSection,
    PathsSection,
    render_toml,
)
from device_agent.errors import ConfigError, IdentityError, TPMError
from device_agent.identity import validate_device_id
from device_agent.keystore import Key, KeyStore, is_file_keystore, open_keystore
from device_agent.tpm import TPM, KeyBlob, build_csr

from . import pki
from .attestation import (
    AttestationError,
    ek_fingerprint,
    make_credential,
    parse_public,
    verify_csr_attestation,
    verify_endorsement,
)
from .registry import AttestationKey, certificate_fingerprint
from .registry import Registrar as Registrar  # the factory's hook, re-exported

log = logging.getLogger(__name__)

BOOTSTRAP_LIFETIME = dt.timedelta(days=15 * 365)
FILES = ("agent.toml", "bootstrap.pem", "bootstrap.tss", "trust.pem", "identity.json")
AK_FILE = "attestation.tss"  # written too when the line attests TPMs
AK_CERT_FILE = "attestation.pem"  # the Factory CA's certificate of the AK, beside it
SAMPLE_DEVICE = ("line-check", "device:/dev/tpmrm0")  # what a line's own settings are checked with


class FactoryError(IdentityError):
    """A device could not be provisioned; nothing was written for it."""


class BootstrapSigner(Protocol):
    """Who certifies bootstrap keys and attestation keys: the line's local Factory CA, or a
    remote service."""

    def sign(self, csr: x509.CertificateSigningRequest, device_id: str) -> x509.Certificate: ...

    def certify_attestation_key(self, device_id: str,
                                public_key: CertificatePublicKeyTypes) -> x509.Certificate: ...


@runtime_checkable
class BootstrapIssuer(Protocol):
    """A signer that takes the whole request in one step: a remote service, which checks
    the TPM2_Certify evidence itself and registers the device (factory_remote.py).

    Returns the bootstrap certificate and, when ``attestation`` is given, the AK's.
    """

    def issue(self, csr: x509.CertificateSigningRequest, device_id: str,
              attestation: AttestationKey | None,
              ) -> tuple[x509.Certificate, x509.Certificate | None]: ...


@runtime_checkable
class CredentialChallenger(Protocol):
    """Who makes the credential an AK must activate beside the EK, when that is not the
    station (the signing service, which also keeps the secret and checks the answer)."""

    def challenge(self, ek_certificate: bytes, ek_public: bytes,
                  ak_public: bytes) -> tuple[bytes, bytes]: ...

    def answer(self, ak_public: bytes, secret: bytes) -> None: ...


class LocalFactoryCA:
    """The Factory CA's key in a local PKI directory (passphrase-protected if set), or in
    the PKCS#11 token its ``ca.key.uri`` names (then :meth:`close` gives the session back)."""

    def __init__(self, pki_paths: pki.PKIPaths, passphrase: bytes | None = None) -> None:
        key_path = pki_paths.factory_ca / "ca.key"
        if not key_path.is_file() and not (pki_paths.factory_ca / pki.KEY_URI_FILE).is_file():
            raise FactoryError(f"Factory CA key missing: {key_path}")
        try:
            self.authority = pki.read_authority(pki_paths.factory_ca, passphrase)
        except (TypeError, ValueError) as exc:
            raise FactoryError(f"Factory CA key locked or unreadable ({key_path}): {exc}") from exc
        except pki.PKIError as exc:
            raise FactoryError(f"Factory CA key unusable: {exc}") from exc

    def close(self) -> None:
        self.authority.close()

    def __enter__(self) -> LocalFactoryCA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def sign(self, csr: x509.CertificateSigningRequest, device_id: str) -> x509.Certificate:
        if not csr.is_signature_valid:
            raise FactoryError("CSR signature does not verify")
        return self.authority.issue_client(device_id, csr.public_key(), BOOTSTRAP_LIFETIME)

    def certify_attestation_key(self, device_id: str,
                                public_key: CertificatePublicKeyTypes) -> x509.Certificate:
        """Called once the AK was proven beside the EK and has certified the bootstrap key."""
        return self.authority.issue_attestation_key(device_id, public_key, BOOTSTRAP_LIFETIME)


@dataclass(frozen=True)
class LineSettings:
    """What every device on a line shares: where it will enroll, recover and publish.

    Checked when built, as the agent checks its agent.toml (``FactoryError`` names the key):
    a line that would write a configuration the agent refuses provisions nothing.
    """

    est_url: str
    broker_host: str
    broker_port: int
    server_trust: Path
    state_dir: Path = Path("/var/lib/device-agent")
    installed_dir: Path | None = None  # where out_dir will live on the device, if elsewhere
    api_socket: Path | None = Path("/run/device-agent/api.sock")
    service_group: int | None = None  # gid the installed agent runs as; it must read the files
    recovery_url: str | None = None  # the EST server's recovery listener, for expired certificates
    # TPM makers whose EK certificates this line accepts; empty: no key attestation
    manufacturer_roots: tuple[x509.Certificate, ...] = ()
    manufacturer_intermediates: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if self.manufacturer_intermediates and not self.manufacturer_roots:
            raise FactoryError("manufacturer intermediates need manufacturer roots")
        agent_config(*SAMPLE_DEVICE, self.installed_dir or Path("/"), self)

    @property
    def attests(self) -> bool:
        return bool(self.manufacturer_roots)


def agent_config(device_id: str, tcti: str, installed: Path, line: LineSettings) -> AgentConfig:
    """The device's agent.toml, loaded back as the agent loads it: what it refuses, we refuse."""
    config = AgentConfig(
        device=DeviceSection(device_id, tcti),
        paths=PathsSection(line.state_dir, installed / "bootstrap.pem",
                           installed / "bootstrap.tss", installed / "trust.pem",
                           installed / AK_FILE if line.attests else None),
        est=ESTSection(line.est_url, line.recovery_url),
        mqtt=MQTTSection(line.broker_host, line.broker_port),
        api=APISection(line.api_socket),
    )
    try:
        return AgentConfig.from_toml(render_toml(config), "agent.toml")
    except ConfigError as exc:
        raise FactoryError(str(exc)) from exc


@dataclass(frozen=True)
class Summary:
    device_id: str
    bootstrap_serial: str
    bootstrap_fingerprint_sha256: str
    public_key_pem: str
    tcti: str
    files: dict[str, str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)


def _summary(device_id: str, tcti: str, out_dir: Path, cert: x509.Certificate) -> Summary:
    public = cert.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    names = FILES + tuple(name for name in (AK_FILE, AK_CERT_FILE) if (out_dir / name).exists())
    return Summary(device_id, f"{cert.serial_number:x}", certificate_fingerprint(cert),
                   public.decode(), tcti, {name: str(out_dir / name) for name in names})


def attest_tpm(tpm: KeyStore, device_id: str, line: LineSettings,
               challenger: CredentialChallenger | None = None,
               ) -> tuple[AttestationKeyBlob, AttestationKey]:
    """The TPM is of a maker the line trusts and holds a new AK beside its EK.

    EK certificate from NV, the EK recreated and a new AK created, then the check the
    signing service makes too (its chain to ``line.manufacturer_roots``, the EK it
    names, the AK's attributes), then TPM2_MakeCredential (here, in software) and
    TPM2_ActivateCredential (in the TPM) of a random secret for the new AK: only
    the TPM holding both gives the secret back. Every refusal is a FactoryError.
    With a ``challenger`` (the signing service) the credential is made there and the
    secret the TPM gives back is handed to it, to be checked there.
    """
    if not isinstance(tpm, TPM):
        raise FactoryError("key attestation needs a TPM: the file keystore (simulation) "
                           "runs with attestation off (no manufacturer roots)")
    try:
        endorsement = read_endorsement(tpm)
        certificate = x509.load_der_x509_certificate(endorsement.certificate)
        ek_public = endorsement_public(tpm, endorsement)
        ak = create_attestation_key(tpm)
        ek, ak_public = verify_endorsement(certificate, ek_public, ak.public_area,
                                           line.manufacturer_roots,
                                           line.manufacturer_intermediates)
        secret = secrets.token_bytes(32)
        if challenger is None:
            blob, encrypted = make_credential(ek, ak_public.name, secret)
        else:
            blob, encrypted = challenger.challenge(endorsement.certificate, ek_public,
                                                   ak.public_area)
    except (AttestationError, ValueError) as exc:
        raise FactoryError(f"TPM refused for key attestation: {exc}") from exc
    except TPMError as exc:
        raise FactoryError(f"TPM refused for key attestation: {exc}") from exc
    try:
        returned = activate_credential(tpm, ak, endorsement, blob, encrypted)
    except TPMError as exc:
        raise FactoryError(f"the attestation key could not be proven to live beside the EK "
                           f"(credential activation failed: {exc})") from exc
    if challenger is not None:
        challenger.answer(ak.public_area, returned)
    elif not hmac.compare_digest(returned, secret):
        raise FactoryError("the attestation key could not be proven to live beside the EK "
                           "(credential activation returned another secret)")
    return ak, AttestationKey(device_id, ak.public_area, ak_public.name,
                              ek_fingerprint(certificate))


def bootstrap_csr(tpm: KeyStore, blob: Key, device_id: str,
                  ak: AttestationKeyBlob | None) -> x509.CertificateSigningRequest:
    """The bootstrap key's CSR, signed in the TPM; with the AK's TPM2_Certify of the key when
    the line attests (as the agent's every later CSR)."""
    if ak is None:
        with tpm.loaded(blob) as key:
            return build_csr(key, device_id)
    assert isinstance(tpm, TPM) and isinstance(blob, KeyBlob)  # attest_tpm took only a TPM
    return attested_csr(tpm, ak, blob, device_id)


def certify_attestation_key(csr: x509.CertificateSigningRequest, attestation: AttestationKey,
                            signer: BootstrapSigner) -> x509.Certificate:
    """The Factory CA's certificate of the AK, once the AK's TPM2_Certify of the bootstrap key
    in ``csr`` passed the check the EST server makes of every CSR."""
    try:
        if verify_csr_attestation(csr, attestation.ak_public) is None:
            raise FactoryError("the bootstrap request carries no TPM2_Certify evidence")
        ak_key = parse_public(attestation.ak_public).public_key
    except AttestationError as exc:
        raise FactoryError(f"the attestation key's certification of the bootstrap key was "
                           f"refused: {exc.reason}") from exc
    certificate = signer.certify_attestation_key(attestation.device_id, ak_key)
    if certificate.public_key() != ak_key:
        raise FactoryError("the Factory CA certified a different attestation key")
    return certificate


def issue_bootstrap(signer: BootstrapSigner | BootstrapIssuer,
                    csr: x509.CertificateSigningRequest, device_id: str,
                    attestation: AttestationKey | None,
                    ) -> tuple[x509.Certificate, x509.Certificate | None]:
    """The bootstrap certificate, and the AK's when the line attests (the AK first: its
    certification of the bootstrap key is checked before anything is signed)."""
    if isinstance(signer, BootstrapIssuer):
        cert, ak_cert = signer.issue(csr, device_id, attestation)
        if attestation is not None and (
                ak_cert is None
                or ak_cert.public_key() != parse_public(attestation.ak_public).public_key):
            raise FactoryError("the Factory CA did not certify this attestation key")
        return cert, ak_cert
    ak_cert = None
    if attestation is not None:
        ak_cert = certify_attestation_key(csr, attestation, signer)
    return signer.sign(csr, device_id), ak_cert


def existing_identity(out_dir: Path) -> tuple[str, x509.Certificate, str] | None:
    """(device ID, bootstrap certificate, TCTI) already in ``out_dir``, if any."""
    marker = out_dir / "identity.json"
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text())
        cert = x509.load_pem_x509_certificate((out_dir / "bootstrap.pem").read_bytes())
        return str(record["device_id"]), cert, str(record["tcti"])
    except (OSError, ValueError, KeyError) as exc:
        raise FactoryError(f"{out_dir} holds an unreadable identity: {exc}") from exc


def provision(device_id: str, tcti: str, out_dir: Path,
              signer: BootstrapSigner | BootstrapIssuer, line: LineSettings,
              register: Registrar, *, force: bool = False) -> Summary:
    """Provision one device; idempotent unless ``force``."""
    try:
        validate_device_id(device_id)
    except ValueError as exc:
        raise FactoryError(str(exc)) from exc
    out_dir = out_dir.absolute()
    config = agent_config(device_id, tcti, line.installed_dir or out_dir, line)
    previous = existing_identity(out_dir)
    if previous is not None:
        known_id, known_cert, known_tcti = previous
        if known_id != device_id:
            raise FactoryError(f"{out_dir} holds the identity of {known_id}, not {device_id}")
        if not force:
            return _summary(device_id, known_tcti, out_dir, known_cert)
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FactoryError(f"{out_dir} is not empty and holds no device identity")

    if line.attests and is_file_keystore(tcti):
        raise FactoryError("key attestation needs a TPM: the file keystore (simulation) "
                           "runs with attestation off (no manufacturer roots)")
    ak: AttestationKeyBlob | None = None
    registered: AttestationKey | None = None
    with open_keystore(tcti) as tpm:
        if line.attests:
            challenger = signer if isinstance(signer, CredentialChallenger) else None
            ak, registered = attest_tpm(tpm, device_id, line, challenger)
        blob = tpm.create_key()
        csr = bootstrap_csr(tpm, blob, device_id, ak)
    ak_files: list[tuple[str, bytes, int]] = []
    cert, ak_cert = issue_bootstrap(signer, csr, device_id, registered)
    if ak is not None and registered is not None and ak_cert is not None:
        registered = dataclasses.replace(registered, certificate=ak_cert)
        # the AK is TPM-wrapped like bootstrap.tss; its certificate is for the agent's group
        ak_files = [(AK_FILE, ak.pem, 0o640), (AK_CERT_FILE, pki.cert_pem(ak_cert), 0o640)]
    if cert.public_key() != blob.public_key():
        raise FactoryError("the Factory CA certified a different key")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        identity = json.dumps({"device_id": device_id, "tcti": tcti,
                               "bootstrap_serial": f"{cert.serial_number:x}"}).encode()
        # Key blobs are TPM-wrapped (useless off this chip): the agent's group may read them.
        files = [("bootstrap.tss", blob.pem, 0o640),
                 ("bootstrap.pem", pki.cert_pem(cert), 0o644),
                 ("trust.pem", line.server_trust.read_bytes(), 0o644),
                 ("agent.toml", render_toml(config).encode(), 0o640),
                 ("identity.json", identity, 0o644), *ak_files]
        for name, data, mode in files:
            write_private(staging / name, data, mode)
            if line.service_group is not None:
                os.chown(staging / name, -1, line.service_group)
        if line.service_group is not None:
            os.chown(staging, -1, line.service_group)
        os.chmod(staging, 0o750)  # noqa: S103 - the agent group traverses it
        if registered is not None:
            register(device_id, cert, previous[1] if previous else None, registered)
        else:
            register(device_id, cert, previous[1] if previous else None)
        _swap_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _summary(device_id, tcti, out_dir, cert)


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging`` with renames only; the old one goes last."""
    retired = None
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.retired")
        if retired.exists():
            shutil.rmtree(retired)
        os.replace(out_dir, retired)
    os.replace(staging, out_dir)
    fsync_dir(out_dir.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
