"""The enrollment policy as a pure function: facts in, a decision with its status out."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from device_agent.errors import ConfigError
from provisioning import est_config, pki
from provisioning.enrollment import (
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
    UnknownDevices,
    decide,
)
from provisioning.errors import EnrollmentRefused
from provisioning.registry import (
    CertificateRecord,
    CertKind,
    Device,
    DeviceState,
    IssuanceKind,
    PendingRequest,
    public_key_fingerprint,
)

NOW = dt.datetime.now(dt.UTC)
DAY = dt.timedelta(days=1)
FACTORY = pki.new_root("Factory CA", pki.ROOT_LIFETIME, ecdsa=True)
ROOT = pki.new_root("Root", pki.ROOT_LIFETIME)
DEVICE_CA = ROOT.issue_ca("Device CA", ec.generate_private_key(ec.SECP256R1()), pki.CA_LIFETIME)
BOOT_KEY = ec.generate_private_key(ec.SECP256R1())
OP_KEY = ec.generate_private_key(ec.SECP256R1())
NEW_KEY = ec.generate_private_key(ec.SECP256R1())
BOOT = FACTORY.issue_client("dev-1", BOOT_KEY.public_key(), DAY)
OPERATIONAL = DEVICE_CA.issue_client("dev-1", OP_KEY.public_key(), DAY)


def peer(cert: x509.Certificate) -> Peer:
    return Peer.from_certificate(cert, FACTORY.certificate, DEVICE_CA.certificate)


def csr(name: str = "dev-1", key: ec.EllipticCurvePrivateKey = NEW_KEY,
        uri: str | None = "urn:device:dev-1") -> Request:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)]))
    if uri:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
    return Request.from_csr(builder.sign(key, hashes.SHA256()))


ACTIVE = Device("dev-1", DeviceState.ACTIVE, peer(BOOT).fingerprint, "then")
OP_RECORD = CertificateRecord(peer(OPERATIONAL).serial, "dev-1", CertKind.OPERATIONAL, "", "",
                              public_key_fingerprint(OP_KEY.public_key()), "issued", None, None)
ENROLL_FACTS = Records(device=ACTIVE)
DEFAULT = Policy()
REENROLL_FACTS = Records(device=ACTIVE, peer_record=OP_RECORD,
                         known_keys=frozenset({OP_RECORD.public_key_sha256}))


def enroll(request: Request | EnrollmentRefused | None = None, records: Records = ENROLL_FACTS,
           policy: Policy = DEFAULT, cert: x509.Certificate | None = BOOT) -> Decision:
    return decide(Operation.ENROLL, peer(cert) if cert else None, request or csr(), records,
                  policy, NOW)


def reenroll(request: Request | EnrollmentRefused | None = None,
             records: Records = REENROLL_FACTS, policy: Policy = DEFAULT,
             cert: x509.Certificate | None = OPERATIONAL) -> Decision:
    return decide(Operation.REENROLL, peer(cert) if cert else None, request or csr(), records,
                  policy, NOW)


def test_an_allowlisted_active_device_with_its_bootstrap_certificate_is_issued() -> None:
    assert enroll() == Decision(Outcome.ISSUE, 200, "issued", "dev-1",
                                issuance=IssuanceKind.ENROLL)


def test_a_renewal_with_the_current_certificate_and_a_new_key_is_issued() -> None:
    decision = reenroll()
    assert (decision.outcome, decision.status, decision.issuance) == \
        (Outcome.ISSUE, 200, IssuanceKind.RENEW)


@pytest.mark.parametrize(("decision", "status", "reason"), [
    (lambda: enroll(cert=None), 401, "no client certificate"),
    (lambda: enroll(cert=OPERATIONAL), 401, "takes a bootstrap certificate"),
    (lambda: enroll(records=Records()), 403, "not allowlisted"),
    (lambda: enroll(records=Records(device=replace(ACTIVE, bootstrap_fingerprint="00"))),
     401, "not the one on record"),
    (lambda: enroll(records=Records(device=replace(ACTIVE, state=DeviceState.SUSPENDED))),
     403, "dev-1 is suspended"),
    (lambda: enroll(EnrollmentRefused(400, "request body is not valid base64")), 400, "base64"),
    (lambda: enroll(csr("dev-2", uri=None)), 403, "names 'dev-2'"),
    (lambda: enroll(csr(uri="urn:device:dev-2")), 403, "subjectAltName must be"),
    (lambda: enroll(csr(key=BOOT_KEY)), 403, "must not be the bootstrap key"),
    (lambda: enroll(csr(key=ec.generate_private_key(ec.SECP384R1()))), 200, "issued"),
    (lambda: reenroll(cert=BOOT), 401, "takes an operational certificate"),
    (lambda: reenroll(cert=None), 401, "no client certificate"),
    (lambda: reenroll(records=Records(device=ACTIVE)), 401, "not on record"),
    (lambda: reenroll(records=replace(REENROLL_FACTS, peer_record=replace(
        OP_RECORD, status="revoked", revocation_reason="keyCompromise"))),
     403, "revoked (keyCompromise)"),
    (lambda: reenroll(records=replace(REENROLL_FACTS, device=replace(
        ACTIVE, state=DeviceState.DECOMMISSIONED))), 403, "is decommissioned"),
    (lambda: reenroll(csr(key=OP_KEY)), 403, "must use a new key"),
    (lambda: reenroll(csr(uri=None)), 403, "subjectAltName differs"),
    (lambda: reenroll(csr("dev-2")), 403, "subject differs"),
    (lambda: reenroll(EnrollmentRefused(400, "CSR signature does not verify")), 400, "verify"),
    (lambda: reenroll(csr(key=OP_KEY), policy=Policy(require_new_key=False)), 200, "issued"),
])
def test_each_rule(decision: object, status: int, reason: str) -> None:
    result = decision()  # type: ignore[operator]
    assert (result.status, reason in result.reason) == (status, True), result


def test_authentication_comes_before_the_request_is_looked_at() -> None:
    garbage = EnrollmentRefused(400, "request body is not a DER PKCS#10 request")
    assert enroll(garbage, cert=None).status == 401
    assert reenroll(garbage, cert=BOOT).status == 401


def test_an_expired_certificate_is_not_a_renewal_credential() -> None:
    expired = DEVICE_CA.issue_client("dev-1", OP_KEY.public_key(), DAY,
                                     not_before=NOW - 3 * DAY)
    records = replace(REENROLL_FACTS, peer_record=replace(OP_RECORD, serial=peer(expired).serial))
    assert "has expired" in reenroll(records=records, cert=expired).reason


def test_a_weak_key_is_refused_by_name() -> None:
    weak = csr(key=ec.generate_private_key(ec.SECP192R1()))
    assert enroll(weak).reason == "key refused: EC curve secp192r1 is not accepted (P-256 or P-384)"


class TestUnknownDevices:
    pending = Policy(unknown_devices=UnknownDevices.PENDING, pending_retry_after=30)

    def test_are_refused_by_default(self) -> None:
        assert enroll(records=Records()).status == 403

    def test_are_held_with_retry_after_when_the_policy_says_pending(self) -> None:
        decision = enroll(records=Records(), policy=self.pending)
        assert (decision.outcome, decision.status, decision.retry_after) == (Outcome.HOLD, 202, 30)

    def test_are_still_held_to_the_request_rules(self) -> None:
        assert enroll(csr("dev-2"), records=Records(), policy=self.pending).status == 403

    def test_a_rejected_device_stays_refused(self) -> None:
        held = PendingRequest("dev-1", peer(BOOT).fingerprint, "", "rejected", 3, "", "")
        decision = enroll(records=Records(pending=held), policy=self.pending)
        assert (decision.status, decision.reason) == (403, "an operator rejected device dev-1")

    def test_another_certificate_cannot_take_over_a_held_name(self) -> None:
        held = PendingRequest("dev-1", "someone else", "", "pending", 1, "", "")
        assert enroll(records=Records(pending=held), policy=self.pending).status == 403


@pytest.mark.parametrize("name", ["backend", "broker-admin"])
def test_a_service_identity_name_is_never_enrolled_as_a_device(name: str) -> None:
    boot = FACTORY.issue_client(name, BOOT_KEY.public_key(), DAY)
    device = Device(name, DeviceState.ACTIVE, peer(boot).fingerprint, "then")
    decision = decide(Operation.ENROLL, peer(boot), csr(name, uri=f"urn:device:{name}"),
                      Records(device=device), Policy(), NOW)
    assert (decision.outcome, decision.status) == (Outcome.REFUSE, 403)
    assert "reserved for a service identity" in decision.reason


class TestRenewal:
    """simplereenroll is not a mint: it supersedes what it replaces and has a daily budget."""

    HOUR = dt.timedelta(hours=1)

    def test_supersedes_the_certificate_renewed(self) -> None:
        assert reenroll().supersede == (OP_RECORD.serial,)

    def test_supersedes_every_other_unexpired_certificate_of_the_device(self) -> None:
        records = replace(REENROLL_FACTS, unexpired_serials=("a1", OP_RECORD.serial, "b2"))
        assert reenroll(records=records).supersede == ("a1", OP_RECORD.serial, "b2")

    def test_a_refused_renewal_supersedes_nothing(self) -> None:
        records = replace(REENROLL_FACTS, unexpired_serials=(OP_RECORD.serial,))
        decision = reenroll(csr(key=OP_KEY), records=records)
        assert (decision.status, decision.supersede, decision.issuance) == (403, (), None)

    def test_the_daily_budget_gives_429_with_retry_after(self) -> None:
        recent = (NOW - 20 * self.HOUR, NOW - self.HOUR)
        decision = reenroll(records=replace(REENROLL_FACTS, recent=recent),
                            policy=Policy(renewals_per_day=2))
        assert (decision.status, decision.retry_after, decision.supersede) == (429, 4 * 3600, ())

    def test_renewals_more_than_a_day_old_do_not_count(self) -> None:
        recent = (NOW - 25 * self.HOUR,) * 24
        assert reenroll(records=replace(REENROLL_FACTS, recent=recent)).status == 200

    def test_the_default_budget_is_24(self) -> None:
        recent = (NOW - self.HOUR,) * 23
        assert reenroll(records=replace(REENROLL_FACTS, recent=recent)).status == 200
        assert reenroll(records=replace(REENROLL_FACTS, recent=(*recent, NOW))).status == 429

    def test_the_budget_must_be_at_least_one(self) -> None:
        with pytest.raises(ValueError, match="renewals_per_day must be at least 1"):
            Policy(renewals_per_day=0)


class TestRenewalConfig:
    @staticmethod
    def load(tmp_path: Path, policy: str) -> est_config.ServerConfig:
        path = tmp_path / "est.toml"
        path.write_text(f'[pki]\ndirectory = "pki"\n[policy]\n{policy}\n')
        return est_config.load(path)

    def test_defaults_to_24_a_day_for_week_long_certificates(self, tmp_path: Path) -> None:
        assert self.load(tmp_path, "").policy.renewals_per_day == 24

    def test_defaults_to_four_per_lifetime_for_short_certificates(self, tmp_path: Path) -> None:
        config = self.load(tmp_path, 'certificate_lifetime = "20s"')
        assert config.policy.renewals_per_day == 4 * 86400 // 20

    def test_is_read_from_the_policy_table(self, tmp_path: Path) -> None:
        config = self.load(tmp_path, 'certificate_lifetime = "1h"\nrenewals_per_day = 50')
        assert config.policy.renewals_per_day == 50

    def test_fewer_than_a_renewal_every_half_lifetime_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"renewals_per_day \(at least 48 "):
            self.load(tmp_path, 'certificate_lifetime = "1h"\nrenewals_per_day = 24')


class TestKeyAttestation:
    """The service verifies the evidence; decide reads the result as the last request check."""

    REQUIRED = Policy(key_attestation=KeyAttestation.REQUIRED)
    OPTIONAL = Policy(key_attestation=KeyAttestation.OPTIONAL)
    GOOD, BAD = Evidence(present=True), Evidence(present=True, problem="made for another key")

    def test_off_by_default_and_evidence_is_not_read(self) -> None:
        assert DEFAULT.key_attestation is KeyAttestation.OFF
        for evidence in (NO_EVIDENCE, self.BAD, self.GOOD):
            decision = enroll(records=replace(ENROLL_FACTS, evidence=evidence))
            assert (decision.status, decision.attested) == (200, False)

    @pytest.mark.parametrize("operation", [enroll, reenroll])
    def test_required_issues_attested_and_refuses_without_or_with_bad_evidence(
            self, operation: object) -> None:
        facts = ENROLL_FACTS if operation is enroll else REENROLL_FACTS
        run = operation  # type: ignore[assignment]
        good = run(records=replace(facts, evidence=self.GOOD), policy=self.REQUIRED)
        none = run(records=facts, policy=self.REQUIRED)
        bad = run(records=replace(facts, evidence=self.BAD), policy=self.REQUIRED)
        assert (good.outcome, good.attested) == (Outcome.ISSUE, True)
        assert (none.status, none.reason) == (403, "key attestation required: the CSR carries "
                                                   "no TPM evidence for its key")
        assert (bad.status, bad.reason, bad.supersede) == \
            (403, "key attestation refused: made for another key", ())

    def test_optional_accepts_no_evidence_unattested_but_never_bad_evidence(self) -> None:
        plain = enroll(policy=self.OPTIONAL)
        assert (plain.status, plain.attested) == (200, False)
        assert enroll(records=replace(ENROLL_FACTS, evidence=self.GOOD),
                      policy=self.OPTIONAL).attested
        assert enroll(records=replace(ENROLL_FACTS, evidence=self.BAD),
                      policy=self.OPTIONAL).status == 403

    def test_other_refusals_come_first(self) -> None:
        decision = enroll(csr("dev-2", uri=None), policy=self.REQUIRED)
        assert (decision.status, "names 'dev-2'" in decision.reason) == (403, True)

    @pytest.mark.parametrize(("text", "expected"), [
        ("", KeyAttestation.OFF), ('key_attestation = "required"', KeyAttestation.REQUIRED),
        ('key_attestation = "optional"', KeyAttestation.OPTIONAL)])
    def test_the_config_key(self, tmp_path: Path, text: str, expected: KeyAttestation) -> None:
        assert TestRenewalConfig.load(tmp_path, text).policy.key_attestation is expected

    def test_an_unknown_value_is_refused(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="key_attestation: required, optional or off"):
            TestRenewalConfig.load(tmp_path, 'key_attestation = "yes"')
