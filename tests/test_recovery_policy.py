"""Recovery and bootstrap re-enrollment as pure policy: the facts in, the decision out."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import pytest

from device_agent.errors import ConfigError
from provisioning import est_config
from provisioning.enrollment import (
    BootstrapReenroll,
    Decision,
    Operation,
    Outcome,
    Policy,
    Records,
    decide,
)
from provisioning.errors import EnrollmentRefused
from provisioning.registry import DeviceState, IssuanceKind

from .test_est_policy import (
    ACTIVE,
    BOOT,
    DAY,
    DEFAULT,
    DEVICE_CA,
    NOW,
    OP_KEY,
    OP_RECORD,
    OPERATIONAL,
    csr,
    enroll,
    peer,
)

EXPIRED = DEVICE_CA.issue_client("dev-1", OP_KEY.public_key(), DAY, not_before=NOW - 3 * DAY)
EXPIRED_RECORD = replace(OP_RECORD, serial=peer(EXPIRED).serial)
FACTS = Records(device=ACTIVE, peer_record=EXPIRED_RECORD, latest_serial=EXPIRED_RECORD.serial,
                known_keys=frozenset({OP_RECORD.public_key_sha256}))
HOUR = dt.timedelta(hours=1)


def recover(request: object = None, records: Records = FACTS, policy: Policy = DEFAULT,
            cert: object = EXPIRED) -> Decision:
    return decide(Operation.RECOVER, peer(cert) if cert else None,  # type: ignore[arg-type]
                  request or csr(), records, policy, NOW)  # type: ignore[arg-type]


def test_an_expired_latest_certificate_within_grace_recovers_and_is_superseded() -> None:
    decision = recover()
    assert (decision.outcome, decision.status, decision.supersede, decision.issuance) == \
        (Outcome.ISSUE, 200, (EXPIRED_RECORD.serial,), IssuanceKind.RECOVER)
    assert decision.reason == (f"recovered: certificate {EXPIRED_RECORD.serial} expired 2d ago "
                               "(grace 90d) and is superseded")


@pytest.mark.parametrize(("decision", "status", "reason"), [
    (lambda: recover(cert=None), 401, "no client certificate"),
    (lambda: recover(cert=BOOT), 401, "takes an operational certificate"),
    (lambda: recover(records=Records(device=ACTIVE)), 401, "not on record"),
    (lambda: recover(cert=OPERATIONAL, records=replace(FACTS, peer_record=OP_RECORD)),
     401, "has not expired; renew it on simplereenroll"),
    (lambda: recover(policy=Policy(recovery_grace=DAY)), 403, "past the recovery grace of 1d"),
    (lambda: recover(records=replace(FACTS, peer_record=replace(
        EXPIRED_RECORD, status="revoked", revocation_reason="keyCompromise"))),
     403, "revoked (keyCompromise)"),
    (lambda: recover(records=replace(FACTS, device=replace(
        ACTIVE, state=DeviceState.SUSPENDED))), 403, "is suspended"),
    (lambda: recover(records=replace(FACTS, latest_serial="abc")), 403, "not the latest"),
    (lambda: recover(csr("dev-2", uri="urn:device:dev-2")), 403, "subject differs"),
    (lambda: recover(csr(key=OP_KEY)), 403, "must use a new key"),
    (lambda: recover(csr(key=OP_KEY), policy=Policy(require_new_key=False)), 403,
     "must use a new key"),
    (lambda: recover(EnrollmentRefused(400, "CSR signature does not verify")), 400, "verify"),
    (lambda: recover(records=replace(FACTS, recent=(NOW - HOUR,) * 3)), 429, "3 recoveries"),
    (lambda: recover(records=replace(FACTS, recent=(NOW - 25 * HOUR,) * 3)), 200, "recovered"),
])
def test_each_recovery_rule(decision: object, status: int, reason: str) -> None:
    result = decision()  # type: ignore[operator]
    assert (result.status, reason in result.reason) == (status, True), result
    assert result.supersede == (() if status != 200 else (EXPIRED_RECORD.serial,))


def test_retry_after_is_when_the_oldest_recovery_leaves_the_window() -> None:
    recent = (NOW - 20 * HOUR, NOW - 2 * HOUR, NOW - HOUR)
    decision = recover(records=replace(FACTS, recent=recent))
    assert (decision.status, decision.retry_after) == (429, 4 * 3600)


class TestBootstrapReenrollment:
    again = Records(device=ACTIVE, latest_serial="abc", unexpired_serials=("abc",))

    def test_a_first_enrollment_is_plainly_issued(self) -> None:
        assert enroll() == Decision(Outcome.ISSUE, 200, "issued", "dev-1",
                                    issuance=IssuanceKind.ENROLL)

    def test_an_enrolled_active_device_starts_over_and_supersedes_what_it_had(self) -> None:
        decision = enroll(records=self.again)
        assert (decision.status, decision.supersede, decision.issuance) == \
            (200, ("abc",), IssuanceKind.BOOTSTRAP_REENROLL)
        assert decision.reason.startswith("re-enrolled with bootstrap: device dev-1 was already")

    def test_never_means_403(self) -> None:
        decision = enroll(records=self.again,
                          policy=Policy(bootstrap_reenroll=BootstrapReenroll.NEVER))
        assert (decision.status, "allows no re-enrollment" in decision.reason) == (403, True)

    def test_the_daily_budget_gives_429_with_retry_after(self) -> None:
        decision = enroll(records=replace(self.again, recent=(NOW - HOUR,) * 2),
                          policy=Policy(bootstrap_reenrolls_per_day=2))
        assert (decision.status, decision.retry_after) == (429, 23 * 3600)


def test_budgets_and_grace_are_validated() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Policy(recoveries_per_day=0)
    with pytest.raises(ValueError, match="negative"):
        Policy(recovery_grace=-DAY)


def test_the_config_keys_and_their_defaults(tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text('[pki]\ndirectory = "pki"\n')
    assert (est_config.load(plain).recovery_port, est_config.load(plain).policy) == (None, Policy())
    tuned = tmp_path / "tuned.toml"
    tuned.write_text('[server]\nport = 8443\nrecovery_port = 8444\n[pki]\ndirectory = "pki"\n'
                     '[policy]\nrecovery_grace = "30d"\nrecoveries_per_day = 2\n'
                     'bootstrap_reenroll = "never"\nbootstrap_reenrolls_per_day = 5\n')
    config = est_config.load(tuned)
    assert (config.recovery_port, config.policy) == (8444, Policy(
        recovery_grace=30 * DAY, recoveries_per_day=2,
        bootstrap_reenroll=BootstrapReenroll.NEVER, bootstrap_reenrolls_per_day=5))
    tuned.write_text('[server]\nport = 8443\nrecovery_port = 8443\n[pki]\ndirectory = "pki"\n')
    with pytest.raises(ConfigError, match="recovery_port"):
        est_config.load(tuned)
