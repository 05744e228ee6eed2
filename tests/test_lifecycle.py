"""The renewal decision is a pure function of (validity, now, policy, draw)."""

from __future__ import annotations

import datetime as dt
import random

import pytest

from device_agent.lifecycle import (
    Action,
    RenewalPolicy,
    SwitchVerdict,
    Validity,
    decide,
    full_jitter,
    judge_switch,
    renewal_time,
)
from device_agent.mqtt import certificate_alert

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
VALIDITY = Validity(START, START + dt.timedelta(days=30))
POLICY = RenewalPolicy(fraction=2 / 3, jitter=0.05)


def test_renews_at_two_thirds_without_jitter() -> None:
    assert renewal_time(VALIDITY, POLICY, 0.0) == START + dt.timedelta(days=20)


def test_jitter_moves_renewal_later_within_its_share_of_the_lifetime() -> None:
    latest = renewal_time(VALIDITY, POLICY, 0.999999)
    assert START + dt.timedelta(days=20) < latest < START + dt.timedelta(days=21.5)


def test_nothing_to_do_before_renewal_time() -> None:
    assert decide(VALIDITY, START + dt.timedelta(days=19), POLICY, 0.0) is Action.NONE


def test_renew_between_renewal_time_and_expiry() -> None:
    assert decide(VALIDITY, START + dt.timedelta(days=25), POLICY, 0.5) is Action.RENEW


def test_recover_once_expired() -> None:
    assert decide(VALIDITY, VALIDITY.not_after, POLICY, 0.0) is Action.RECOVER


def test_seconds_lifetimes_work_as_days_do() -> None:
    short = Validity(START, START + dt.timedelta(seconds=20))
    assert decide(short, START + dt.timedelta(seconds=14), POLICY, 0.0) is Action.RENEW


@pytest.mark.parametrize("draw", [-0.1, 1.0])
def test_draw_outside_unit_interval_is_refused(draw: float) -> None:
    with pytest.raises(ValueError):
        renewal_time(VALIDITY, POLICY, draw)


def test_policy_that_would_renew_after_expiry_is_refused() -> None:
    with pytest.raises(ValueError):
        RenewalPolicy(fraction=0.9, jitter=0.2)


def test_full_jitter_stays_under_the_capped_exponential() -> None:
    rng = random.Random(7)
    waits = [full_jitter(attempt, 1.0, 60.0, rng) for attempt in range(12) for _ in range(50)]
    assert all(0 <= w <= 60.0 for w in waits)
    assert max(full_jitter(2, 1.0, 60.0, rng) for _ in range(200)) <= 4.0
    assert len({round(w, 3) for w in waits}) > 500  # spread, not lockstep


# --- switching to a new credential generation ---------------------------------------------

@pytest.mark.parametrize(("connected", "refusal", "previous_valid", "verdict"), [
    (True, None, True, SwitchVerdict.CONFIRMED),
    (True, None, False, SwitchVerdict.CONFIRMED),
    # the broker away, busy or slow: never a reason to go back
    (False, None, True, SwitchVerdict.WAIT),
    (False, None, False, SwitchVerdict.WAIT),
    # the broker refused this credential itself
    (False, "ALERT_CERTIFICATE_REVOKED", True, SwitchVerdict.ROLL_BACK),
    (False, "Not authorized", True, SwitchVerdict.ROLL_BACK),
    # ... but the one before it is expired (or gone): stay and report
    (False, "ALERT_UNKNOWN_CA", False, SwitchVerdict.STAY),
])
def test_a_switch_rolls_back_only_when_the_new_credential_is_refused(
    connected: bool, refusal: str | None, previous_valid: bool, verdict: SwitchVerdict,
) -> None:
    assert judge_switch(connected, refusal, previous_valid) is verdict


@pytest.mark.parametrize(("error", "alert"), [
    ("[SSL: SSLV3_ALERT_CERTIFICATE_REVOKED] sslv3 alert certificate revoked (_ssl.c:2580)",
     "ALERT_CERTIFICATE_REVOKED"),
    ("[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca", "ALERT_UNKNOWN_CA"),
    ("[SSL: SSLV3_ALERT_BAD_CERTIFICATE] sslv3 alert bad certificate", "ALERT_BAD_CERTIFICATE"),
    # not about our credential: the broker's CRL expired, or the network
    ("[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired", None),
    ("[Errno 111] Connection refused", None),
    ("", None),
])
def test_only_alerts_about_our_certificate_count_as_a_refusal(error: str,
                                                              alert: str | None) -> None:
    assert certificate_alert(error) == alert
