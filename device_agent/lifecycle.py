"""When to enroll, renew or recover: pure functions of (certificate times, now, policy).

No I/O here, so every decision is tested without a TPM, a server or a clock.
Jitter spreads a fleet's renewals so devices certified together do not all
come back to the EST server in the same second.
"""

from __future__ import annotations

import datetime as dt
import enum
import random
from dataclasses import dataclass


class State(enum.Enum):
    UNPROVISIONED = "unprovisioned"
    BOOTSTRAPPED = "bootstrapped"
    ENROLLING = "enrolling"
    OPERATIONAL = "operational"
    RENEWING = "renewing"
    EXPIRED = "expired"
    RECOVERING = "recovering"


class Action(enum.Enum):
    NONE = "none"
    RENEW = "renew"
    RECOVER = "recover"


@dataclass(frozen=True)
class RenewalPolicy:
    """Renew at ``fraction`` of the lifetime plus up to ``jitter`` of it, drawn per certificate."""

    fraction: float = 2 / 3
    jitter: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction}")
        if not 0 <= self.jitter < 1 - self.fraction:
            raise ValueError("jitter must be >= 0 and end before expiry")


@dataclass(frozen=True)
class Validity:
    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.not_before


def renewal_time(validity: Validity, policy: RenewalPolicy, draw: float) -> dt.datetime:
    """The moment to renew; ``draw`` in [0, 1) picks the jitter (fixed per certificate)."""
    if not 0 <= draw < 1:
        raise ValueError(f"draw must be in [0, 1), got {draw}")
    return validity.not_before + validity.lifetime * (policy.fraction + policy.jitter * draw)


def decide(validity: Validity, now: dt.datetime, policy: RenewalPolicy, draw: float) -> Action:
    if now >= validity.not_after:
        return Action.RECOVER
    if now >= renewal_time(validity, policy, draw):
        return Action.RENEW
    return Action.NONE


CLOCK_FLOOR = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
"""No device running this release can truly be earlier than its release month."""


def clock_plausible(now: dt.datetime, validity: Validity | None = None) -> bool:
    """False for a clock that lost its time (an RTC reset to 1970, say).

    A clock earlier than this release, or more than an hour before our own
    certificate was issued, is not to be believed for expiry decisions.
    """
    if now < CLOCK_FLOOR:
        return False
    return validity is None or now >= validity.not_before - dt.timedelta(hours=1)


def seconds_until_renewal(validity: Validity, now: dt.datetime, policy: RenewalPolicy,
                          draw: float) -> float:
    return max(0.0, (renewal_time(validity, policy, draw) - now).total_seconds())


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    ceiling = min(cap, base * (2 ** min(attempt, 30)))
    return (rng or random).uniform(0, ceiling)


class SwitchVerdict(enum.Enum):
    """What to do with a new credential generation the broker has not confirmed yet."""

    CONFIRMED = "confirmed"  # the broker admitted it: forget the way back
    WAIT = "wait"  # the broker is slow, busy or away: keep the new credential, keep trying
    ROLL_BACK = "roll-back"  # the broker refused this credential; the previous is valid
    STAY = "stay"  # refused, and nothing valid to go back to: keep it, report


def judge_switch(connected: bool, refusal: str | None, previous_valid: bool) -> SwitchVerdict:
    """Roll back only when the broker refused the new credential itself, never on time alone.

    A broker outage across a rotation used to roll back after 60 s and delete the new
    credential; the device then renewed again, recovered, re-enrolled: four certificates
    for one outage. Going back is only worth it to a previous credential still valid.
    """
    if connected:
        return SwitchVerdict.CONFIRMED
    if refusal is None:
        return SwitchVerdict.WAIT
    return SwitchVerdict.ROLL_BACK if previous_valid else SwitchVerdict.STAY
