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


class Reached(enum.IntEnum):
    """How far one connection attempt got, which is what it tells about the broker."""

    NOTHING = 0  # no answer at all: a timeout, no route, no name (the network is gone)
    HOST = 1  # the host refused TCP: nothing listens on the port (a broker restarting)
    LISTENER = 2  # TCP accepted, the TLS handshake not completed
    BROKER = 3  # TCP and TLS done, then closed or refused before admitting us
    ADMITTED = 4  # CONNACK success; the connection has ended since


class Hint(enum.Enum):
    """What a broker that answered said about when to come back."""

    BUSY = "busy"  # CONNACK server busy / unavailable, quota or connection rate exceeded
    MOVED = "moved"  # CONNACK use another server / server moved: go there now
    REFUSED = "refused"  # our credential refused (CONNACK or TLS alert): the lifecycle acts


UNREACHABLE_CAP = 60.0
"""Backoff ceiling while nothing answers at all: spare the radio, not the broker."""
STABLE_AFTER = 10.0
"""Seconds an admitted connection must last to count as one (a broker that admits and
drops us at once is not reconnected to every second)."""


@dataclass(frozen=True)
class ReconnectPolicy:
    """Reconnect timing: ``window`` spreads the first attempt after a lost connection,
    ``cap`` bounds the backoff while the broker's host answers, ``base`` starts it."""

    window: float = 2.0
    cap: float = 10.0
    base: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.window <= self.cap:
            raise ValueError(f"window must be in [0, cap], got {self.window}")
        if not 0 < self.base <= self.cap:
            raise ValueError(f"base must be in (0, cap], got {self.base}")

    def ceiling(self, reached: Reached) -> float:
        return max(UNREACHABLE_CAP, self.cap) if reached is Reached.NOTHING else self.cap


@dataclass(frozen=True)
class Backoff:
    """Where a link's reconnects stand: how far the last attempt got, failures in a row."""

    reached: Reached = Reached.ADMITTED
    failures: int = 0


def next_reconnect(state: Backoff, reached: Reached, hint: Hint | None,
                   policy: ReconnectPolicy, draw: float,
                   held: float = STABLE_AFTER) -> tuple[Backoff, float]:
    """The state after an attempt that got as far as ``reached``, and the seconds to wait.

    ``draw`` in [0, 1) is the jitter. A lost admitted connection that lasted ``held`` >=
    ``STABLE_AFTER`` seconds (or a move to another server) tries again within ``window``;
    a shorter one counts as a failure of a broker that answered. Each failure doubles the
    ceiling of a full-jitter wait, up to ``policy.cap`` while the broker's host answers,
    up to ``UNREACHABLE_CAP`` while nothing does; an attempt that got further than the one
    before (the broker listens again, or completed a handshake) restarts the doubling. A
    busy broker, or one that refused our credential, is given half the cap to the cap.
    """
    if not 0 <= draw < 1:
        raise ValueError(f"draw must be in [0, 1), got {draw}")
    if (reached is Reached.ADMITTED and held >= STABLE_AFTER) or hint is Hint.MOVED:
        return Backoff(), policy.window * draw
    if reached is Reached.ADMITTED:
        reached = Reached.BROKER
    failures = 1 if reached > state.reached else state.failures + 1
    after = Backoff(reached, failures)
    if hint is not None:  # BUSY or REFUSED: not sooner than half the cap, spread over the rest
        return after, policy.cap * (1 + draw) / 2
    ceiling = min(policy.ceiling(reached), policy.base * 2 ** min(failures, 30))
    return after, ceiling * draw
