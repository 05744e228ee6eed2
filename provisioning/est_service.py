"""One enrollment, from the TLS peer and the request body to an answer and an audit row.

This is where the policy meets the CA and the registry. It is synchronous on
purpose: each EST worker runs it on one thread that owns the worker's
registry connection, so the event loop never waits on a database lock.

Group commit: the requests that arrive while that thread is busy are handed to it
together (:meth:`EnrollmentService.handle_all`) and share one transaction, so
under load one commit (one fsync, one turn of the registry's write lock) carries
many enrollments; a lone request is still committed at once. Each request has a
savepoint of its own in that transaction, and no answer leaves before the commit
that holds its rows.

With ``[policy] key_attestation`` on, the CSR's TPM evidence is verified here,
against the attestation key registered for the device, before :func:`decide`
reads the result; an attested certificate carries :data:`ATTESTED_KEY_POLICY`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509

from device_agent.csr_attestation import EvidenceFormatError, attestation_attribute

from . import pki
from .attestation import ATTESTED_KEY_POLICY, AttestationError, verify_csr_attestation
from .enrollment import (
    BUDGET_WINDOW,
    BUDGETS,
    NO_EVIDENCE,
    Decision,
    Evidence,
    KeyAttestation,
    Operation,
    Outcome,
    Peer,
    Policy,
    Records,
    Request,
    decide,
)
from .errors import EnrollmentRefused, ProvisioningError
from .est_wire import PARSE_ERRORS, decode_csr
from .registry import AuditEntry, CertKind, Registry, serial_hex


@dataclass(frozen=True)
class Result:
    """The decision, and the certificate when one was issued."""

    decision: Decision
    peer_serial: str | None
    certificate: x509.Certificate | None = None


@dataclass(frozen=True)
class Call:
    """One request for the registry: a body to decide on, or the ``refusal`` (status,
    reason) given before the body was read, to audit. ``peer`` is the TLS client
    certificate as the HTTP layer read it."""

    operation: Operation
    peer: Peer | None
    body: bytes | None = None
    refusal: tuple[int, str] | None = None


@dataclass(frozen=True)
class _Prepared:
    """A call with its CSR parsed and verified (outside the write lock)."""

    call: Call
    csr: x509.CertificateSigningRequest | None = None
    request: Request | EnrollmentRefused | None = None


class EnrollmentService:
    def __init__(self, device_ca: pki.Authority, factory_ca: x509.Certificate,
                 registry: Registry, policy: Policy, lifetime: dt.timedelta,
                 superseded: Callable[[], None] | None = None) -> None:
        """``superseded`` is called after a transaction that revoked older certificates
        commits (the worker's CRL publisher)."""
        self.device_ca = device_ca
        self.superseded = superseded
        self.factory_ca = factory_ca
        self.registry = registry
        self.policy = policy
        self.lifetime = lifetime
        # Rows from a schema-1 registry do not name their CA; the two this server holds did.
        registry.adopt_issuers({CertKind.BOOTSTRAP: factory_ca.subject,
                                CertKind.OPERATIONAL: device_ca.certificate.subject})

    def _records(self, operation: Operation, peer: Peer | None, now: dt.datetime) -> Records:
        """Only the facts ``operation`` reads: renewal and recovery need the device's keys,
        bootstrap re-enrollment and recovery its latest serial, bootstrap re-enrollment and
        renewal its unexpired serials (to supersede), each its daily budget."""
        if peer is None:
            return Records()
        record = self.registry.certificate(peer.serial, peer.certificate.issuer)
        device_id = record.device_id if record else peer.device_id
        if device_id is None:
            return Records(peer_record=record)
        registry = self.registry
        device = registry.device(device_id)
        if device is None:
            return Records(peer_record=record, pending=registry.pending(device_id))
        renewal = operation is not Operation.ENROLL
        return Records(
            device=device,
            peer_record=record,
            known_keys=registry.public_key_fingerprints(device_id) if renewal else frozenset(),
            latest_serial=(registry.latest_operational(device_id)
                           if operation is not Operation.REENROLL else None),
            unexpired_serials=(registry.unexpired_operational(device_id, now)
                               if operation is not Operation.RECOVER else ()),
            recent=registry.issued_since(device_id, BUDGETS[operation], now - BUDGET_WINDOW),
        )

    def handle_all(self, calls: Sequence[Call],
                   joining: Callable[[], Sequence[Call]] | None = None,
                   ) -> list[Result | Exception]:
        """Answer ``calls`` in order, each as it would be answered alone,
        with one transaction (one commit, one fsync) for them all: group commit.

        ``joining`` is called once the write lock is ours: the calls it gives (those that
        arrived while this batch waited for the lock) join the batch, and their answers
        follow those of ``calls``. Under contention the lock is the bottleneck, so the
        longer the wait, the more calls share the commit that ends it.

        The CSRs in ``calls`` are parsed and verified first, outside the write lock.
        Each call then decides, signs and records in a savepoint of its own, so one that
        raises takes back only its writes and gets its exception; no answer is
        returned before the commit that holds its rows. When that transaction
        fails as a whole (its commit, or a rollback the database refused), the calls
        are answered again one at a time, each in its own transaction, so each ends
        as it would have without company. Every decision writes an audit row, so it
        needs the write lock anyway; holding it from the first read means no suspension
        or revocation can land between a decision and its record.
        """
        prepared = [self._prepare(call) for call in calls]
        outcomes: list[Result | Exception]
        began = False
        try:
            with self.registry.transaction():
                began = True
                if joining is not None:
                    prepared += [self._prepare(call) for call in joining()]
                outcomes = [self._in_savepoint(item) for item in prepared]
        except ProvisioningError as exc:
            # No transaction at all (the lock timed out): each would have met the same.
            outcomes = ([self._alone(item) for item in prepared] if began
                        else [exc] * len(prepared))
        if self.superseded is not None and any(
                isinstance(outcome, Result) and outcome.certificate is not None
                and outcome.decision.supersede for outcome in outcomes):
            self.superseded()
        return outcomes

    def _prepare(self, call: Call) -> _Prepared:
        if call.body is None:
            return _Prepared(call)
        csr: x509.CertificateSigningRequest | None = None
        request: Request | EnrollmentRefused
        try:
            csr = decode_csr(call.body)
            request = Request.from_csr(csr)
        except EnrollmentRefused as refused:
            request = refused
        except PARSE_ERRORS:  # a part of the CSR that decode_csr does not read
            request = EnrollmentRefused(400, "CSR cannot be read")
        return _Prepared(call, csr, request)

    def _alone(self, item: _Prepared) -> Result | Exception:
        try:
            with self.registry.transaction():
                return self._decide(item)
        except Exception as exc:  # noqa: BLE001 - the caller's, as if it had called alone
            return exc

    def _in_savepoint(self, item: _Prepared) -> Result | Exception:
        """``item`` decided inside the batch's transaction; what it raised is its answer
        once its savepoint is rolled back. A savepoint that cannot be taken or rolled
        back (the database lost the transaction) raises: the batch has failed."""
        failure: Exception | None = None
        try:
            with self.registry.savepoint():
                try:
                    return self._decide(item)
                except Exception as exc:  # noqa: BLE001 - the caller's, rolled back alone
                    failure = exc
                    raise
        except Exception as exc:
            if exc is failure:
                return exc
            raise

    def _decide(self, item: _Prepared) -> Result:
        """Decide, sign and record one call inside the caller's transaction."""
        call = item.call
        operation, peer = call.operation, call.peer
        peer_serial = peer.serial if peer else None
        if call.refusal is not None:
            status, reason = call.refusal
            decision = Decision(Outcome.REFUSE, status, reason, peer.device_id if peer else None)
            self.audit(operation, peer, decision, None)
            return Result(decision, peer_serial)
        csr, request = item.csr, item.request
        assert request is not None
        certificate = None
        now = dt.datetime.now(dt.UTC)
        records = self._records(operation, peer, now)
        if csr is not None and self.policy.key_attestation is not KeyAttestation.OFF:
            device = records.device
            records = dataclasses.replace(records, evidence=self.evidence(
                csr, device.device_id if device else None))
        decision = decide(operation, peer, request, records, self.policy, now)
        if decision.outcome is Outcome.ISSUE:
            assert csr is not None and decision.device_id is not None
            assert decision.issuance is not None
            certificate = self.device_ca.issue_client(
                decision.device_id, csr.public_key(), self.lifetime,
                policies=(ATTESTED_KEY_POLICY,) if decision.attested else ())
            self.registry.record_issuance(decision.device_id, certificate,
                                          decision.issuance, decision.supersede, now,
                                          attested=decision.attested)
        elif decision.outcome is Outcome.HOLD:
            assert peer is not None and decision.device_id is not None
            self.registry.hold(decision.device_id, peer.certificate)
        self.audit(operation, peer, decision, certificate)
        return Result(decision, peer_serial, certificate)

    def evidence(self, csr: x509.CertificateSigningRequest, device_id: str | None) -> Evidence:
        """The CSR's key attestation checked against the AK registered for ``device_id``."""
        try:
            if attestation_attribute(csr) is None:
                return NO_EVIDENCE
        except EvidenceFormatError as exc:
            return Evidence(True, f"attestation attribute unreadable: {exc}")
        registered = self.registry.attestation_key(device_id) if device_id else None
        if registered is None:
            return Evidence(True, f"no attestation key is registered for {device_id}")
        try:
            verify_csr_attestation(csr, registered.ak_public)
        except AttestationError as exc:
            return Evidence(True, exc.reason)
        return Evidence(True)

    def audit(self, operation: Operation, peer: Peer | None, decision: Decision,
              certificate: x509.Certificate | None) -> None:
        self.registry.audit(AuditEntry(
            action=operation.value, decision=decision.outcome.value, reason=decision.reason,
            device_id=decision.device_id or (peer.device_id if peer else None),
            status=decision.status,
            peer_serial=peer.serial if peer else None,
            issued_serial=serial_hex(certificate.serial_number) if certificate else None))
