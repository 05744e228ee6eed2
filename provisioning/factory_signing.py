"""The factory signing service's decisions, without HTTP: the per-station rate limit, the
TPM's proof of its AK, the re-provisioning rule, and one request carried out against the
registry (the settings are factory_config.py's).

The rule (:func:`decide`), for a CSR naming device D from station S:

- D unknown: issue, register D, record S as the station that made it.
- the key is the one D's recorded bootstrap certificate certifies: answer that same
  certificate again, whoever asks (a CSR proves possession of the key, so nothing new
  is handed out); this is the re-run after a lost answer.
- D decommissioned: 409, ``force`` or not.
- ``force``: issue for the new key, the old bootstrap certificate revoked (superseded).
- D made by S and never enrolled (no operational certificate on record): issue for the
  new key, replacing the old one. This is S's re-run after it died between the
  certificate and the device's files: the device has no identity yet, so no one loses
  one; the registry keeps one device entry.
- otherwise (made by another station, registered outside the service, or already
  enrolled): 409.

Every decision is one registry transaction: the certificate is signed inside it and
handed out only once the registration, the service's record and the audit row are
committed, so a failure leaves nothing but (at most) a certificate no one received.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from device_agent.csr_attestation import EvidenceFormatError, attestation_attribute
from device_agent.identity import device_uri, is_service_identity, validate_device_id

from .attestation import (
    AttestationError,
    TPMPublic,
    ek_fingerprint,
    make_credential,
    parse_public,
    verify_csr_attestation,
    verify_endorsement,
)
from .errors import EnrollmentRefused, RegistryError
from .est_wire import PARSE_ERRORS, decode_csr
from .factory import FactoryError, LocalFactoryCA
from .registry import (
    AttestationKey,
    AuditEntry,
    CertKind,
    Device,
    DeviceState,
    FactoryEnrollment,
    Registry,
    certificate_fingerprint,
    open_registry,
    public_key_fingerprint,
    serial_hex,
)

log = logging.getLogger("factory-ca")
ACTION = "factory-enroll"
AK_HEADER = "Factory-AK-Public"          # base64 TPMT_PUBLIC of the attestation key
EK_CERT_HEADER = "Factory-EK-Certificate"  # base64 DER: the TPM's EK certificate
EK_PUBLIC_HEADER = "Factory-EK-Public"   # base64 TPMT_PUBLIC of the EK the TPM recreated
CREDENTIAL_HEADER = "Factory-Credential"  # base64: what TPM2_ActivateCredential gave back
# the OID of id-aa-attestation as DER, to tell a CSR without evidence at a glance
_ATTESTATION_OID_DER = b"\x06\x0b\x2a\x86\x48\x86\xf7\x0d\x01\x09\x10\x02\x3b"
CHALLENGE_WINDOW = 300  # seconds a credential challenge stays answerable (two windows)


def log_event(event: str, level: int = logging.INFO, **fields: object) -> None:
    record = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid(), **fields}
    log.log(level, json.dumps(record, default=str, separators=(",", ":")))


# --- the per-station rate limit ------------------------------------------------------------

class TokenBucket:
    """``rate`` tokens a second up to ``burst``; a request takes one or waits."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), now

    def take(self, now: float) -> int | None:
        """None: go ahead; else the whole seconds to wait (a Retry-After)."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return max(1, math.ceil((1 - self.tokens) / self.rate))


# --- the re-provisioning rule ------------------------------------------------------------

class Verdict(StrEnum):
    NEW = "issued"
    REPEAT = "repeated"
    REPLACE = "replaced"
    REFUSE = "refused"


def decide(device: Device | None, made: FactoryEnrollment | None, station: str,
           key_sha256: str, enrolled: bool, force: bool) -> tuple[Verdict, str]:
    """What to do for a CSR (its key's fingerprint) naming a device; see the module doc."""
    if device is None:
        return Verdict.NEW, "new device"
    if made is not None and certificate_fingerprint(made.certificate) \
            != device.bootstrap_fingerprint:
        made = None  # replaced outside the service since: not the service's to answer
    if device.state is DeviceState.DECOMMISSIONED:
        return Verdict.REFUSE, "device is decommissioned"
    if made is not None and made.public_key_sha256 == key_sha256:
        return Verdict.REPEAT, f"the same key as station {made.station}'s certificate"
    if force:
        return Verdict.REPLACE, "forced"
    if made is None:
        return Verdict.REFUSE, "device was provisioned outside this service; force to replace"
    if made.station != station:
        return Verdict.REFUSE, f"device was provisioned by station {made.station}; " \
                               "force to replace"
    if enrolled:
        return Verdict.REFUSE, "device has enrolled with its identity; force to replace"
    return Verdict.REPLACE, "same station, device never enrolled"


# --- one request ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    station: str
    station_serial: str
    body: bytes
    force: bool = False
    ak_public: str | None = None    # the headers as sent
    ek_certificate: str | None = None
    ek_public: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class Answer:
    status: int
    reason: str
    verdict: Verdict = Verdict.REFUSE
    device_id: str | None = None
    certificates: tuple[x509.Certificate, ...] = ()
    retry_after: int | None = None
    body: bytes = b""  # a credential challenge's JSON


def device_of(csr: x509.CertificateSigningRequest) -> str:
    """The device ID a CSR names: its one CN, and its SAN, exactly ``urn:device:<CN>``."""
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or len(csr.subject) != 1:
        raise EnrollmentRefused(400, "the CSR subject must be one CN, the device ID")
    device_id = str(names[0].value)
    try:
        validate_device_id(device_id)
    except ValueError as exc:
        raise EnrollmentRefused(400, f"the CSR's CN is not a device ID: {exc}") from exc
    if is_service_identity(device_id):
        raise EnrollmentRefused(400, f"{device_id!r} is reserved for a service identity")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise EnrollmentRefused(400, "the CSR carries no subjectAltName") from None
    if list(san) != [x509.UniformResourceIdentifier(device_uri(device_id))]:
        raise EnrollmentRefused(400, f"the CSR's subjectAltName must be "
                                     f"{device_uri(device_id)} alone")
    return device_id


class EndorsementCheck:
    """The TPM proves, to the service and not to the station, that the AK sits beside an
    EK of a maker the line trusts: the EK certificate chains to ``roots``, the TPM's EK
    is the one it names, and the TPM activates a credential the service made for the AK.

    Stateless: the credential is an HMAC of the AK's name, the EK and a time window under
    a key the service draws at start, so the answer is checked by making it again (in
    this window or the last; a challenge does not survive a restart).
    """

    def __init__(self, roots: tuple[x509.Certificate, ...],
                 intermediates: tuple[x509.Certificate, ...]) -> None:
        self.roots, self.intermediates = roots, intermediates
        self.key = secrets.token_bytes(32)

    def _secret(self, ak_name: bytes, ek_public: bytes, window: int) -> bytes:
        message = (b"factory-credential" + len(ak_name).to_bytes(2, "big") + ak_name
                   + ek_public + window.to_bytes(8, "big"))
        return hmac.new(self.key, message, hashlib.sha256).digest()

    def _endorsed(self, request: Request) -> tuple[x509.Certificate, TPMPublic, TPMPublic,
                                                   bytes]:
        if not self.roots:
            raise EnrollmentRefused(400, "this service is not set up for key attestation "
                                         "(no [attestation] manufacturer_roots)")
        if not (request.ak_public and request.ek_certificate and request.ek_public):
            raise EnrollmentRefused(400, f"key attestation needs {AK_HEADER}, "
                                         f"{EK_CERT_HEADER} and {EK_PUBLIC_HEADER}")
        try:
            certificate = x509.load_der_x509_certificate(
                base64.b64decode(request.ek_certificate, validate=True))
            ek_public = base64.b64decode(request.ek_public, validate=True)
            ak_public = base64.b64decode(request.ak_public, validate=True)
            ek, ak = verify_endorsement(certificate, ek_public, ak_public, self.roots,
                                        self.intermediates)
        except PARSE_ERRORS as exc:  # binascii.Error is a ValueError
            raise EnrollmentRefused(400, f"attestation headers unreadable: {exc}") from exc
        except AttestationError as exc:
            raise EnrollmentRefused(400, f"TPM refused for key attestation: {exc.reason}") \
                from exc
        return certificate, ek, ak, ek_public

    def challenge(self, request: Request, now: float) -> tuple[bytes, bytes]:
        _, ek, ak, ek_public = self._endorsed(request)
        secret = self._secret(ak.name, ek_public, int(now // CHALLENGE_WINDOW))
        try:
            return make_credential(ek, ak.name, secret)
        except (AttestationError, ValueError) as exc:
            raise EnrollmentRefused(400, f"no credential can be made for this EK: {exc}") \
                from exc

    def verify(self, request: Request, now: float) -> tuple[x509.Certificate, TPMPublic]:
        """The EK certificate and the AK, once the TPM's answer matched; else a 400."""
        certificate, _, ak, ek_public = self._endorsed(request)
        try:
            answer = base64.b64decode(request.credential or "", validate=True)
        except binascii.Error as exc:
            raise EnrollmentRefused(400, f"{CREDENTIAL_HEADER} unreadable") from exc
        window = int(now // CHALLENGE_WINDOW)
        if not answer or not any(hmac.compare_digest(answer, self._secret(ak.name, ek_public, w))
                                 for w in (window, window - 1)):
            raise EnrollmentRefused(400, "the attestation key was not proven to live beside "
                                         "the EK (no or a wrong credential answer)")
        return certificate, ak


def attestation_of(csr: x509.CertificateSigningRequest, device_id: str, request: Request,
                   required: bool, endorsement: EndorsementCheck) -> AttestationKey | None:
    """The AK the request names, once the service proved it beside a trusted EK and its
    TPM2_Certify of the CSR's key verified here."""
    if request.ak_public is None:
        if required:
            raise EnrollmentRefused(400, "this line requires key attestation")
        if _ATTESTATION_OID_DER not in csr.tbs_certrequest_bytes:
            return None  # no id-aa-attestation anywhere: skip parsing the CSR again (1-2 ms)
        try:
            evidence = attestation_attribute(csr)
        except EvidenceFormatError as exc:
            raise EnrollmentRefused(400, f"attestation attribute unreadable: {exc}") from exc
        if evidence is None:
            return None
        raise EnrollmentRefused(400, f"the CSR carries attestation evidence but no {AK_HEADER}")
    ek_certificate, ak = endorsement.verify(request, time.time())
    ak_public = base64.b64decode(request.ak_public)
    try:
        if verify_csr_attestation(csr, ak_public) is None:
            raise EnrollmentRefused(400, "the CSR carries no TPM2_Certify evidence")
    except AttestationError as exc:
        raise EnrollmentRefused(400, f"key attestation refused: {exc.reason}") from exc
    return AttestationKey(device_id, ak_public, ak.name, ek_fingerprint(ek_certificate))


class SigningService:
    """Decisions for one thread: the Factory CA and a registry connection per request
    (so an unreachable registry is noticed on the request that meets it: 503)."""

    def __init__(self, signer: LocalFactoryCA, registry: Path | str, require_attestation: bool,
                 unavailable_retry_after: int = 5,
                 endorsement: EndorsementCheck | None = None) -> None:
        self.signer = signer
        self.registry = registry
        self.require_attestation = require_attestation
        self.retry_after = unavailable_retry_after
        self.endorsement = endorsement or EndorsementCheck((), ())

    def challenge(self, request: Request) -> Answer:
        """A credential for the AK to activate beside the EK (JSON, base64 fields)."""
        try:
            blob, encrypted = self.endorsement.challenge(request, time.time())
        except EnrollmentRefused as exc:
            return self.refuse(request, exc.status, exc.reason)
        body = json.dumps({"credential_blob": base64.b64encode(blob).decode(),
                           "encrypted_secret": base64.b64encode(encrypted).decode()})
        return Answer(200, "challenge", Verdict.NEW, body=body.encode())

    def handle(self, request: Request) -> Answer:
        device_id: str | None = None
        try:
            csr = decode_csr(request.body)
            try:
                device_id = device_of(csr)
            except PARSE_ERRORS as exc:
                raise EnrollmentRefused(400, "the CSR's names cannot be read") from exc
            attestation = attestation_of(csr, device_id, request, self.require_attestation,
                                         self.endorsement)
            with open_registry(self.registry) as registry, registry.transaction():
                answer = self._decide(registry, request, csr, device_id, attestation)
                self._audit(registry, request, answer)
        except EnrollmentRefused as exc:
            return self.refuse(request, exc.status, exc.reason, device_id)
        except RegistryError as exc:
            answer = Answer(503, "registry unavailable", device_id=device_id,
                            retry_after=self.retry_after)
            self._log(request, answer, error=str(exc))
            return answer
        self._log(request, answer)
        return answer

    def refuse(self, request: Request, status: int, reason: str,
               device_id: str | None = None) -> Answer:
        """A refusal before any decision on a device: audited when the registry answers."""
        answer = Answer(status, reason, device_id=device_id)
        try:
            with open_registry(self.registry) as registry, registry.transaction():
                self._audit(registry, request, answer)
        except RegistryError as exc:
            self._log(request, answer, audited=False, error=str(exc))
            return answer
        self._log(request, answer)
        return answer

    def _decide(self, registry: Registry, request: Request, csr: x509.CertificateSigningRequest,
                device_id: str, attestation: AttestationKey | None) -> Answer:
        device = registry.device(device_id)
        made = registry.factory_enrollment(device_id)
        enrolled = any(record.kind is CertKind.OPERATIONAL
                       for record in registry.certificates(device_id))
        verdict, why = decide(device, made, request.station,
                              public_key_fingerprint(csr.public_key()), enrolled, request.force)
        if verdict is Verdict.REFUSE:
            return Answer(409, why, verdict, device_id)
        if verdict is Verdict.REPEAT:
            assert made is not None
            known = registry.attestation_key(device_id)
            if attestation is None:
                return Answer(200, why, verdict, device_id, (made.certificate,))
            if known is None or known.ak_public != attestation.ak_public \
                    or known.certificate is None:
                return Answer(409, "the same bootstrap key with another attestation key",
                              Verdict.REFUSE, device_id)
            return Answer(200, why, verdict, device_id, (made.certificate, known.certificate))
        try:
            ak_cert = None
            if attestation is not None:
                ak_cert = self.signer.certify_attestation_key(
                    device_id, parse_public(attestation.ak_public).public_key)
                attestation = dataclasses.replace(attestation, certificate=ak_cert)
            cert = self.signer.sign(csr, device_id)
        except (FactoryError, ValueError) as exc:
            raise EnrollmentRefused(400, f"the Factory CA refused the request: {exc}") from exc
        registry.register_device(device_id, cert, made.certificate if made else None,
                                 attested=attestation is not None,
                                 replace=verdict is Verdict.REPLACE)
        if attestation is not None:
            registry.register_attestation_key(attestation)
        registry.record_factory_enrollment(FactoryEnrollment(
            device_id, request.station, request.station_serial, cert))
        issued = (cert,) if ak_cert is None else (cert, ak_cert)
        return Answer(200, why, verdict, device_id, issued)

    @staticmethod
    def _audit(registry: Registry, request: Request, answer: Answer) -> None:
        issued = serial_hex(answer.certificates[0].serial_number) if answer.certificates \
            else None
        registry.audit(AuditEntry(ACTION, answer.verdict.value,
                                  f"station {request.station}: {answer.reason}",
                                  answer.device_id, answer.status, request.station_serial,
                                  issued))

    @staticmethod
    def _log(request: Request, answer: Answer, **extra: object) -> None:
        issued = serial_hex(answer.certificates[0].serial_number) if answer.certificates \
            else None
        log_event("enroll", logging.INFO if answer.status == 200 else logging.WARNING,
                  station=request.station, station_serial=request.station_serial,
                  device=answer.device_id, status=answer.status, decision=answer.verdict.value,
                  reason=answer.reason, force=request.force, issued_serial=issued, **extra)
