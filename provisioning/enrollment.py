"""Who gets a certificate: the enrollment policy as a pure function of the facts.

The EST server gathers the facts (the TLS peer certificate, the parsed CSR,
the registry's records) and :func:`decide` answers issue, hold or refuse with
the HTTP status and the reason the client and the audit log will read. No I/O
happens here, so every rule is tested without a server.

Status conventions: 401 when the client is not authenticated for this endpoint
(no certificate, the wrong kind of certificate, one that is not on record, a
still-valid certificate on the recovery listener), 403 when it is authenticated
but not allowed (device not allowlisted or not active, revoked or superseded
certificate, expired past the recovery grace, a CSR for another identity, a
refused key, bootstrap re-enrollment switched off), 429 with Retry-After when a
device has used up its renewals, recoveries or bootstrap re-enrollments for 24
hours, 400 when the request itself is malformed.

Every issuance says what it is (:class:`IssuanceKind`) and which of the device's
certificates it supersedes: a renewal supersedes every older operational
certificate still valid, so a credential cannot be renewed into a pile of live
certificates, and the registry counts the issuances of each kind for the budgets.

Recovery (issue 6) exists because a device that sat in a warehouse comes back
with an expired certificate: the recovery listener lets that certificate
through TLS, and :func:`decide` bounds what it may still do (a grace window,
the device's latest certificate only, a new key, a daily budget). Past the
grace window the bootstrap certificate is the way back, under its own budget.

Key attestation (issue 16) is checked by the service before it calls
:func:`decide` (the evidence needs the device's registered AK): the result
arrives as :attr:`Records.evidence`, and the policy's ``key_attestation`` says
what it takes: ``required`` (no evidence, 403), ``optional`` (evidence that
is there must verify), ``off`` (evidence is not read). It is the last check on a
request, after everything else about it was found in order.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import math
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.x509.oid import NameOID

from device_agent.identity import DEVICE_ID_PATTERN, device_uri, is_service_identity

from . import pki
from .errors import EnrollmentRefused
from .registry import (
    CertificateRecord,
    CertKind,
    Device,
    DeviceState,
    IssuanceKind,
    PendingRequest,
    certificate_fingerprint,
    public_key_fingerprint,
    serial_hex,
)


class Operation(StrEnum):
    ENROLL = "simpleenroll"
    REENROLL = "simplereenroll"
    RECOVER = "recovery"


BUDGET_WINDOW = dt.timedelta(hours=24)

# Whose issuances each operation's daily budget counts (a first enrollment has none).
BUDGETS = {Operation.ENROLL: IssuanceKind.BOOTSTRAP_REENROLL,
           Operation.REENROLL: IssuanceKind.RENEW,
           Operation.RECOVER: IssuanceKind.RECOVER}


class Outcome(StrEnum):
    ISSUE = "issued"
    HOLD = "held"
    REFUSE = "refused"


class UnknownDevices(StrEnum):
    """What to do with a valid bootstrap certificate whose device is not allowlisted."""

    REFUSE = "refuse"
    PENDING = "pending"


class BootstrapReenroll(StrEnum):
    """Whether a device that already had operational certificates may enroll again."""

    ACTIVE = "active"
    NEVER = "never"


class KeyAttestation(StrEnum):
    """Whether a CSR must prove, with TPM2_Certify evidence, that its key lives in the TPM."""

    REQUIRED = "required"
    OPTIONAL = "optional"   # evidence sent must verify; none is accepted (unattested)
    OFF = "off"             # evidence is not read


@dataclass(frozen=True)
class Policy:
    unknown_devices: UnknownDevices = UnknownDevices.REFUSE
    require_new_key: bool = True
    pending_retry_after: int = 60
    recovery_grace: dt.timedelta = dt.timedelta(days=90)
    recoveries_per_day: int = 3
    bootstrap_reenroll: BootstrapReenroll = BootstrapReenroll.ACTIVE
    bootstrap_reenrolls_per_day: int = 3
    renewals_per_day: int = 24
    key_attestation: KeyAttestation = KeyAttestation.OFF

    def __post_init__(self) -> None:
        if self.pending_retry_after < 1:
            raise ValueError("pending_retry_after must be at least 1 second")
        if self.recovery_grace < dt.timedelta(0):
            raise ValueError("recovery_grace must not be negative")
        if min(self.recoveries_per_day, self.bootstrap_reenrolls_per_day,
               self.renewals_per_day) < 1:
            raise ValueError("recoveries_per_day, bootstrap_reenrolls_per_day and "
                             "renewals_per_day must be at least 1")


class Issuer(StrEnum):
    FACTORY = "factory"
    DEVICE = "device"
    OTHER = "other"


def _common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if len(values) == 1 else None


def _san(extensions: x509.Extensions) -> tuple[x509.GeneralName, ...] | None:
    try:
        return tuple(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return None


@functools.lru_cache(maxsize=8)
def _key_id(ca: x509.Certificate) -> bytes | None:
    try:
        return ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    """Name and key identifier match; the TLS layer has already checked the signature."""
    if certificate.issuer != ca.subject:
        return False
    try:
        aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return False
    return aki.key_identifier is not None and aki.key_identifier == _key_id(ca)


@dataclass(frozen=True)
class Peer:
    """The TLS client certificate, reduced to what the policy reads."""

    certificate: x509.Certificate
    issuer: Issuer
    device_id: str | None
    serial: str
    fingerprint: str
    key_fingerprint: str

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate, factory_ca: x509.Certificate,
                         device_ca: x509.Certificate) -> Peer:
        issuer = (Issuer.FACTORY if _issued_by(certificate, factory_ca)
                  else Issuer.DEVICE if _issued_by(certificate, device_ca) else Issuer.OTHER)
        name = _common_name(certificate.subject)
        return cls(certificate, issuer,
                   name if name and DEVICE_ID_PATTERN.fullmatch(name) else None,
                   serial_hex(certificate.serial_number), certificate_fingerprint(certificate),
                   public_key_fingerprint(certificate.public_key()))


@dataclass(frozen=True)
class Request:
    """A CSR whose signature verified, reduced to what the policy reads."""

    subject: x509.Name
    common_name: str | None
    san: tuple[x509.GeneralName, ...] | None
    key_fingerprint: str
    key_problem: str | None

    @classmethod
    def from_csr(cls, csr: x509.CertificateSigningRequest) -> Request:
        """The CSR parses its subject again at each read: read once here."""
        key = csr.public_key()
        try:
            pki.check_public_key(key)
            problem = None
        except ValueError as exc:
            problem = str(exc)
        subject = csr.subject
        return cls(subject, _common_name(subject), _san(csr.extensions),
                   public_key_fingerprint(key), problem)


@dataclass(frozen=True)
class Evidence:
    """The service's check of a CSR's key attestation against the device's registered AK.

    ``present``: the CSR carried the attribute; ``problem``: why it does not prove the
    key TPM-resident (None: it does). Not looked at (policy off): :data:`NO_EVIDENCE`.
    """

    present: bool = False
    problem: str | None = None

    @property
    def verified(self) -> bool:
        return self.present and self.problem is None


NO_EVIDENCE = Evidence()


@dataclass(frozen=True)
class Records:
    """What the registry knows about the peer; empty for a peer it has never seen.

    ``latest_serial`` is the device's most recently issued operational
    certificate, ``unexpired_serials`` those not revoked and still valid, and
    ``recent`` when the device was issued certificates of this operation's
    budget (:data:`BUDGETS`: renewals, recoveries or bootstrap re-enrollments)
    within :data:`BUDGET_WINDOW`.
    """

    device: Device | None = None
    peer_record: CertificateRecord | None = None
    pending: PendingRequest | None = None
    known_keys: frozenset[str] = frozenset()
    latest_serial: str | None = None
    unexpired_serials: tuple[str, ...] = ()
    recent: tuple[dt.datetime, ...] = ()
    evidence: Evidence = NO_EVIDENCE


@dataclass(frozen=True)
class Decision:
    """The answer; an issuance says its ``issuance`` kind, lists in ``supersede`` the
    serials (the Device CA's) to revoke as superseded with it, and whether its key was
    ``attested`` (the certificate says so)."""

    outcome: Outcome
    status: int
    reason: str
    device_id: str | None = None
    retry_after: int | None = None
    supersede: tuple[str, ...] = ()
    issuance: IssuanceKind | None = None
    attested: bool = False


def _refuse(status: int, reason: str, device_id: str | None = None) -> Decision:
    return Decision(Outcome.REFUSE, status, reason, device_id)


def decide(operation: Operation, peer: Peer | None, request: Request | EnrollmentRefused,
           records: Records, policy: Policy, now: dt.datetime) -> Decision:
    """Authenticate the peer, then check the request, then authorize; the first failure wins."""
    if peer is None:
        return _refuse(401, "no client certificate")
    if operation is Operation.ENROLL:
        decision = _enroll(peer, request, records, policy, now)
    elif operation is Operation.RECOVER:
        decision = _recover(peer, request, records, policy, now)
    else:
        decision = _reenroll(peer, request, records, policy, now)
    if decision.outcome is not Outcome.ISSUE or policy.key_attestation is KeyAttestation.OFF:
        return decision  # a held request is checked again when it is asked to be issued
    # Everything else about the request is in order: now whether its key is proven.
    evidence = records.evidence
    if evidence.present and evidence.problem is not None:
        return _refuse(403, f"key attestation refused: {evidence.problem}", decision.device_id)
    if not evidence.present and policy.key_attestation is KeyAttestation.REQUIRED:
        return _refuse(403, "key attestation required: the CSR carries no TPM evidence for "
                            "its key", decision.device_id)
    return dataclasses.replace(decision, attested=evidence.verified)


def _enroll(peer: Peer, request: Request | EnrollmentRefused, records: Records,
            policy: Policy, now: dt.datetime) -> Decision:
    if peer.issuer is not Issuer.FACTORY:
        return _refuse(401, "simpleenroll takes a bootstrap certificate from the Factory CA")
    device_id = peer.device_id
    if device_id is None:
        return _refuse(401, "the bootstrap certificate names no valid device ID")
    if is_service_identity(device_id):
        return _refuse(403, f"{device_id!r} is reserved for a service identity", device_id)
    device = records.device
    if device is None:
        refusal = _unknown_device(peer, device_id, records.pending, policy)
        if refusal is not None:
            return refusal
    elif device.bootstrap_fingerprint != peer.fingerprint:
        return _refuse(401, f"this bootstrap certificate is not the one on record for {device_id}",
                       device_id)
    if records.peer_record is not None and records.peer_record.revoked:
        return _refuse(403, f"bootstrap certificate {peer.serial} is revoked", device_id)
    if device is not None and device.state is not DeviceState.ACTIVE:
        return _refuse(403, f"device {device_id} is {device.state.value}", device_id)
    again = records.latest_serial is not None
    if again and policy.bootstrap_reenroll is BootstrapReenroll.NEVER:
        return _refuse(403, f"device {device_id} is already enrolled and the policy allows no "
                            "re-enrollment with the bootstrap certificate", device_id)
    if again:
        refusal = _over_budget(records.recent, policy.bootstrap_reenrolls_per_day,
                               "bootstrap re-enrollments", device_id, now)
        if refusal is not None:
            return refusal
    if isinstance(request, EnrollmentRefused):
        return _refuse(request.status, request.reason, device_id)
    if request.common_name != device_id:
        return _refuse(403, f"the CSR names {request.common_name!r}, not the authenticated "
                            f"device {device_id}", device_id)
    expected_san = (x509.UniformResourceIdentifier(device_uri(device_id)),)
    if request.san is not None and request.san != expected_san:
        return _refuse(403, f"the CSR subjectAltName must be {device_uri(device_id)} alone",
                       device_id)
    refusal = _key_refusal(request, device_id)
    if refusal is not None:
        return refusal
    if request.key_fingerprint == peer.key_fingerprint:
        return _refuse(403, "the operational key must not be the bootstrap key", device_id)
    if device is None:
        return Decision(Outcome.HOLD, 202, "held until an operator approves the device",
                        device_id, policy.pending_retry_after)
    if again:
        # Starting over: certificates still valid from before are superseded, not left live.
        return Decision(Outcome.ISSUE, 200,
                        f"re-enrolled with bootstrap: device {device_id} was already enrolled "
                        f"(latest certificate {records.latest_serial}); "
                        f"{len(records.unexpired_serials)} unexpired certificate(s) superseded",
                        device_id, supersede=records.unexpired_serials,
                        issuance=IssuanceKind.BOOTSTRAP_REENROLL)
    return Decision(Outcome.ISSUE, 200, "issued", device_id, issuance=IssuanceKind.ENROLL)


def _unknown_device(peer: Peer, device_id: str, pending: PendingRequest | None,
                    policy: Policy) -> Decision | None:
    if policy.unknown_devices is UnknownDevices.REFUSE:
        return _refuse(403, f"device {device_id} is not allowlisted", device_id)
    if pending is None:
        return None
    if pending.bootstrap_fingerprint != peer.fingerprint:
        return _refuse(403, f"another bootstrap certificate is already held for {device_id}",
                       device_id)
    if pending.decision == "rejected":
        return _refuse(403, f"an operator rejected device {device_id}", device_id)
    return None


def _reenroll(peer: Peer, request: Request | EnrollmentRefused, records: Records,
              policy: Policy, now: dt.datetime) -> Decision:
    refusal = _operational_peer(peer, records, "simplereenroll")
    if refusal is not None:
        return refusal
    device_id = peer.device_id
    assert device_id is not None
    if peer.certificate.not_valid_after_utc < now:
        return _refuse(401, f"certificate {peer.serial} has expired", device_id)
    refusal = (_standing(peer, records, device_id)
               or _over_budget(records.recent, policy.renewals_per_day, "renewals", device_id,
                               now)
               or _renewal_request(peer, request, records, device_id, policy.require_new_key))
    if refusal is not None:
        return refusal
    # The new certificate replaces the one renewed and any other still valid: one live
    # credential per device, whatever a client does with the ones it was given.
    older = tuple(dict.fromkeys((*records.unexpired_serials, peer.serial)))
    return Decision(Outcome.ISSUE, 200, f"issued; superseded {', '.join(older)}", device_id,
                    supersede=older, issuance=IssuanceKind.RENEW)


def _recover(peer: Peer, request: Request | EnrollmentRefused, records: Records,
             policy: Policy, now: dt.datetime) -> Decision:
    """An expired operational certificate asks for a new one: bounded in time and in number."""
    refusal = _operational_peer(peer, records, "the recovery listener")
    if refusal is not None:
        return refusal
    device_id = peer.device_id
    assert device_id is not None
    expired_for = now - peer.certificate.not_valid_after_utc
    if expired_for <= dt.timedelta(0):
        return _refuse(401, f"certificate {peer.serial} has not expired; renew it on "
                            "simplereenroll", device_id)
    if expired_for > policy.recovery_grace:
        return _refuse(403, f"certificate {peer.serial} expired {_span(expired_for)} ago, "
                            f"past the recovery grace of {_span(policy.recovery_grace)}; "
                            "enroll again with the bootstrap certificate", device_id)
    refusal = _standing(peer, records, device_id)
    if refusal is not None:
        return refusal
    if records.latest_serial != peer.serial:
        return _refuse(403, f"certificate {peer.serial} is not the latest issued to "
                            f"{device_id}; only the latest may be recovered", device_id)
    refusal = (_over_budget(records.recent, policy.recoveries_per_day, "recoveries", device_id,
                            now)
               or _renewal_request(peer, request, records, device_id, require_new_key=True))
    if refusal is not None:
        return refusal
    return Decision(Outcome.ISSUE, 200,
                    f"recovered: certificate {peer.serial} expired {_span(expired_for)} ago "
                    f"(grace {_span(policy.recovery_grace)}) and is superseded",
                    device_id, supersede=(peer.serial,), issuance=IssuanceKind.RECOVER)


def _operational_peer(peer: Peer, records: Records, endpoint: str) -> Decision | None:
    """An operational certificate from the Device CA, on record for the device it names."""
    if peer.issuer is not Issuer.DEVICE:
        return _refuse(401, f"{endpoint} takes an operational certificate from the Device CA")
    record = records.peer_record
    if record is None or record.kind is not CertKind.OPERATIONAL:
        return _refuse(401, f"certificate {peer.serial} is not on record")
    if peer.device_id != record.device_id:
        return _refuse(401, f"certificate {peer.serial} is on record for another device",
                       record.device_id)
    return None


def _standing(peer: Peer, records: Records, device_id: str) -> Decision | None:
    """Not revoked, and the device is active."""
    record = records.peer_record
    if record is not None and record.revoked:
        return _refuse(403, f"certificate {peer.serial} is revoked ({record.revocation_reason})",
                       device_id)
    device = records.device
    if device is None or device.state is not DeviceState.ACTIVE:
        state = device.state.value if device else "unknown"
        return _refuse(403, f"device {device_id} is {state}", device_id)
    return None


def _renewal_request(peer: Peer, request: Request | EnrollmentRefused, records: Records,
                     device_id: str, require_new_key: bool) -> Decision | None:
    """RFC 7030 4.2.2: the same subject and SAN as the certificate renewed, and a new key."""
    if isinstance(request, EnrollmentRefused):
        return _refuse(request.status, request.reason, device_id)
    if request.subject != peer.certificate.subject:
        return _refuse(403, "the CSR subject differs from the certificate being renewed",
                       device_id)
    if request.san != _san(peer.certificate.extensions):
        return _refuse(403, "the CSR subjectAltName differs from the certificate being renewed",
                       device_id)
    refusal = _key_refusal(request, device_id)
    if refusal is not None:
        return refusal
    if require_new_key and (request.key_fingerprint == peer.key_fingerprint
                            or request.key_fingerprint in records.known_keys):
        return _refuse(403, "re-enrollment must use a new key", device_id)
    return None


def _over_budget(recent: tuple[dt.datetime, ...], per_day: int, what: str, device_id: str,
                 now: dt.datetime) -> Decision | None:
    """429 once ``per_day`` uses fall within the last 24 h; Retry-After: when the oldest leaves."""
    window = sorted(t for t in recent if now - t < BUDGET_WINDOW)
    if len(window) < per_day:
        return None
    wait = window[-per_day] + BUDGET_WINDOW - now
    return Decision(Outcome.REFUSE, 429, f"{per_day} {what} within 24 h is the limit for "
                                         f"{device_id}", device_id,
                    max(1, math.ceil(wait.total_seconds())))


def _span(delta: dt.timedelta) -> str:
    """A duration as an operator reads it in a log: 90d, 3h, 12m, 40s (largest whole unit)."""
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _key_refusal(request: Request, device_id: str) -> Decision | None:
    if request.key_problem is None:
        return None
    return _refuse(403, f"key refused: {request.key_problem}", device_id)
