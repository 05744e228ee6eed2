"""The device's lifecycle as a state machine: typed events in, decisions out, no I/O.

The agent used to keep this as flags spread over its loop and dispatched worker
results on thread names; a clock corrected after boot, an outage over a rotation
and a broker's expired CRL each found a path no scripted test walked. Here every
transition is a method over plain data with an injected clock and random source,
so unit tests take each one alone and a model-based test drives it through random
worlds. The agent (``agent.py``) carries the decisions out and feeds results back.
"""

from __future__ import annotations

import datetime as dt
import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .lifecycle import (
    Action,
    RenewalPolicy,
    SwitchVerdict,
    Validity,
    clock_plausible,
    decide,
    full_jitter,
    judge_switch,
    renewal_time,
)


class Phase(enum.Enum):
    ENROLLING = "enrolling"  # no credential yet: first enrollment with the bootstrap
    OPERATIONAL = "operational"
    RENEWING = "renewing"  # simplereenroll in flight
    SWITCHING = "switching"  # a new credential not yet confirmed by the broker
    EXPIRED = "expired"  # waiting to recover (backing off)
    RECOVERING = "recovering"  # the recovery listener, with the expired credential
    REENROLLING = "reenrolling"  # simpleenroll again, with the bootstrap credential
    STRANDED = "stranded"  # the EST server refused us for good; ``why`` says what


class Work(enum.Enum):
    """Slow work the agent runs beside its loop, one at a time."""

    ENROLL = "enroll"
    RENEW = "renew"
    RECOVER = "recovery"
    BOOTSTRAP = "bootstrap"
    CLOCK = "clock"  # the EST server's Date, because the system clock is implausible
    EXPIRY_CHECK = "expiry-check"  # the EST server's Date, because the broker said "expired"
    DUE_CHECK = "due-check"  # the EST server's Date, before renewing what an earlier run got

    @property
    def issues(self) -> bool:
        return self in (Work.ENROLL, Work.RENEW, Work.RECOVER, Work.BOOTSTRAP)


class TimeSource(enum.Enum):
    SYSTEM = "system"
    EST_SERVER = "est-server"  # the system clock is implausible; the EST server's Date
    CERTIFICATE = "certificate"  # implausible, and the server sent no Date: our notBefore


@dataclass(frozen=True)
class Credential:
    """What the controller needs of a generation: its number and certificate times."""

    number: int
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    via: Work | None = None  # how it was obtained; None when read back after a restart

    @property
    def validity(self) -> Validity:
        return Validity(self.not_before, self.not_after)


# --- events: what happened --------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    work: Work
    credential: Credential


@dataclass(frozen=True)
class Refused:
    """The EST server answered with an HTTP error."""

    work: Work
    status: int
    reason: str
    retry_after: float | None = None


@dataclass(frozen=True)
class Failed:
    """No answer, a TLS failure, a TPM error: nothing was decided about us."""

    work: Work
    error: str
    retry_after: float | None = None


@dataclass(frozen=True)
class TimeTold:
    """The EST server's clock; ``server_now`` is None when it sent no ``Date``."""

    work: Work
    server_now: dt.datetime | None


Result = Issued | Refused | Failed | TimeTold


@dataclass(frozen=True)
class LinkView:
    """The MQTT link as the loop sees it on one tick."""

    connected: bool = False
    refusal: str | None = None  # the broker refused this credential (an alert, a CONNACK)
    peer_says_expired: bool = False  # the broker's TLS alert: "certificate expired"
    last_error: str = ""


# --- decisions: what the agent is to do ------------------------------------------------


@dataclass(frozen=True)
class Start:
    work: Work


@dataclass(frozen=True)
class Activate:
    """Make a newly issued credential current and connect with it."""

    credential: Credential


@dataclass(frozen=True)
class Commit:
    """The broker admitted the new credential: forget the way back."""


@dataclass(frozen=True)
class RollBack:
    """The broker refused the new credential: set it aside, connect with ``to``."""

    to: Credential


@dataclass(frozen=True)
class Reconnect:
    """Build the TLS context again (the clock we judge dates by changed)."""


@dataclass(frozen=True)
class Report:
    """A line for the log; an error also goes to the status' recent errors."""

    message: str
    error: bool = True


Decision = Start | Activate | Commit | RollBack | Reconnect | Report


@dataclass(frozen=True)
class Settings:
    policy: RenewalPolicy = field(default_factory=RenewalPolicy)
    retry_max: float = 300.0
    has_recovery_listener: bool = False
    switch_timeout: float = 60.0
    expiry_recheck: float = 600.0  # seconds before the EST server's clock is asked again
    refused_switches: int = 3  # per credential: then keep it until it expires
    # Our EST server revokes a device's older certificates (superseded) on every issuance,
    # renewals included: then there is no way back. False: a server that keeps them.
    issuance_supersedes: bool = True
    clock_jump: float = 5.0  # seconds the wall clock may move against the monotonic one


@dataclass(frozen=True)
class Clock:
    """Wall and monotonic time; tests pass their own."""

    wall: Callable[[], dt.datetime]
    monotonic: Callable[[], float]


def jitter_draw(serial: int) -> float:
    """A per-certificate draw in [0, 1): stable across restarts, spread across a fleet."""
    return (serial % 10_007) / 10_007


class Controller:
    """One device's lifecycle. Feed it ``start``, then ``tick`` and ``result`` calls."""

    def __init__(self, settings: Settings, clock: Clock,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        self.phase = Phase.ENROLLING
        self.why: str | None = None
        self.current: Credential | None = None
        self.previous: Credential | None = None  # while switching: the way back
        self.busy: Work | None = None
        self.offset: dt.timedelta | None = None
        self.time_source = TimeSource.SYSTEM
        self.system_clock_ok = True
        self._renew_requested = False
        self._bootstrap_fallback = False
        self._renew_instead = False  # the recovery listener said "not expired"
        self._asked_about: int | None = None  # serial the expiry check is for
        self._expiry_verdict: tuple[int, bool, float] | None = None  # serial, expired, when
        self._refused: dict[int, int] = {}  # serial rolled back to -> refused switches
        self._obtained: dict[int, float] = {}  # serial -> monotonic time we obtained it
        self._ahead_reported: set[int] = set()
        self._refusal_judged: set[int] = set()  # serials the EST server was asked about
        self._due_verdict: tuple[int | None, dt.timedelta, float] | None = None
        self._retry_at = 0.0
        self._failures = 0
        self._switch_deadline: float | None = None
        self._skew: float | None = None

    # --- inputs --------------------------------------------------------------------------

    def start(self, current: Credential | None, previous: Credential | None) -> list[Decision]:
        """The credential store as found at start; ``previous`` set: a switch was under way."""
        self.current, self.previous = current, previous if current else None
        if current is None:
            self.phase = Phase.ENROLLING
        elif self.previous is not None:
            self.phase = Phase.SWITCHING
            self._switch_deadline = self.clock.monotonic() + self.settings.switch_timeout
        else:
            self.phase = Phase.OPERATIONAL
        return []

    def request_renewal(self) -> None:
        self._renew_requested = True

    def now(self) -> dt.datetime:
        """Our best idea of the time: the system clock, or it corrected by the offset."""
        return self.clock.wall() + (self.offset or dt.timedelta())

    def renew_at(self) -> dt.datetime | None:
        cert = self.current
        if cert is None:
            return None
        return renewal_time(cert.validity, self.settings.policy, jitter_draw(cert.serial))

    def result(self, outcome: Result) -> list[Decision]:
        """A worker finished."""
        self.busy = None
        out: list[Decision] = []
        if isinstance(outcome, TimeTold):
            if outcome.work is Work.EXPIRY_CHECK:
                self._judge_expiry(outcome.server_now, out)
            elif outcome.work is Work.DUE_CHECK:
                told = outcome.server_now
                offset = told - self.clock.wall() if told else dt.timedelta()
                self._due_verdict = (self._asked_about, offset, self.clock.monotonic())
            else:
                self._take_time(outcome.server_now, out)
        elif isinstance(outcome, Issued):
            self._issued(outcome, out)
        elif isinstance(outcome, Refused):
            self._refused_by_est(outcome, out)
        else:
            if outcome.work is Work.RENEW:
                # no answer: the listener's "not expired" may no longer hold (a certificate
                # that expired since fails the handshake); the clock decides again
                self._renew_instead = False
            self._back_off(outcome.retry_after, f"{outcome.work.value} failed: {outcome.error}",
                           out)
        self._settle()
        return out

    def tick(self, link: LinkView) -> list[Decision]:
        """Once per loop turn: judge the switch, the clock, and whether to start work."""
        out: list[Decision] = []
        self._watch_for_jumps(out)
        self._judge_switch(link, out)
        if self.busy is None and self.clock.monotonic() >= self._retry_at:
            self._next_work(link, out)
        self._settle()
        return out

    # --- transitions ---------------------------------------------------------------------

    def _watch_for_jumps(self, out: list[Decision]) -> None:
        """A clock stepped by NTP, by hand or over a suspend: every time judgement again."""
        skew = self.clock.wall().timestamp() - self.clock.monotonic()
        last, self._skew = self._skew, skew
        if last is None or abs(skew - last) <= self.settings.clock_jump:
            return
        self._expiry_verdict = None
        out.append(Report(f"the system clock jumped by {skew - last:+.0f}s; "
                          "judging every deadline again"))
        if self.offset is not None:  # it was measured against the clock that moved
            self.offset = None
            self.time_source = TimeSource.SYSTEM
            if self.current is not None:
                out.append(Reconnect())

    def _next_work(self, link: LinkView, out: list[Decision]) -> None:
        wall = self.clock.wall()
        cert = self.current
        self.system_clock_ok = clock_plausible(wall, cert.validity if cert else None)
        if self.system_clock_ok and self.offset is not None:
            out.append(Report(f"the system clock is plausible again; no longer using the "
                              f"{self.time_source.value}'s time (it was {self.offset} off)",
                              error=False))
            self.offset, self.time_source = None, TimeSource.SYSTEM
            if cert is not None:
                out.append(Reconnect())  # TLS date checks back on
            return
        if self.system_clock_ok:
            self.time_source = TimeSource.SYSTEM
        elif self.offset is None and self.time_source is not TimeSource.CERTIFICATE:
            self._begin(Work.CLOCK, out)
            return
        if cert is None:
            self._begin(Work.ENROLL, out)
            return
        action = decide(cert.validity, self.now(), self.settings.policy,
                        jitter_draw(cert.serial))
        if action is not Action.NONE and self._too_soon(cert, out):
            action = Action.NONE
        if action is Action.NONE and link.peer_says_expired and not link.connected:
            verdict = self._expiry_verdict
            if verdict is None or verdict[0] != cert.serial or \
                    self.clock.monotonic() - verdict[2] > self.settings.expiry_recheck:
                # our clock says valid, the broker says expired: ask the EST server's clock
                self._asked_about = cert.serial
                self._begin(Work.EXPIRY_CHECK, out)
                return
            if verdict[1]:
                action = Action.RECOVER
        if action is Action.RENEW and self._switches_refused(cert):
            action = Action.NONE
        if action is Action.NONE and self._refused_since(cert, link):
            # revoked since (revoke-device, decommission) or never ours: the EST server
            # says which; a 403 sends us to the bootstrap certificate
            self._refusal_judged.add(cert.serial)
            self._renew_requested = True
            out.append(Report(f"the broker refuses our certificate ({link.refusal}); asking "
                              "the EST server whether it still stands"))
        if self._renew_requested:
            self._renew_requested = False
            action = Action.RENEW if action is Action.NONE else action
        elif action is Action.RENEW and cert.serial not in self._obtained:
            due = self._due_verdict
            if due is None or due[0] != cert.serial or \
                    self.clock.monotonic() - due[2] > self.settings.expiry_recheck:
                # obtained before this run: no elapsed time to check a fast clock against
                self._asked_about = cert.serial
                self._begin(Work.DUE_CHECK, out)
                return
            server_now = self.clock.wall() + due[1]
            if decide(cert.validity, server_now, self.settings.policy,
                      jitter_draw(cert.serial)) is Action.NONE:
                action = Action.NONE
        if self._bootstrap_fallback:
            action = Action.RECOVER  # the EST server disowned this credential: re-enroll now
        if action is Action.RECOVER and self._renew_instead and not self._bootstrap_fallback:
            action = Action.RENEW  # the recovery listener said "not expired"
        if action is Action.RENEW:
            self._begin(Work.RENEW, out)
        elif action is Action.RECOVER:
            listener = self.settings.has_recovery_listener and not self._bootstrap_fallback
            self._begin(Work.RECOVER if listener else Work.BOOTSTRAP, out)

    def _too_soon(self, cert: Credential, out: list[Decision]) -> bool:
        """Obtained in this run less than half its renewal interval ago, by the monotonic clock.

        A system clock running ahead of the EST server's passes as plausible, and made
        every new certificate look due at once: a renewal storm. Elapsed time since we
        obtained a certificate does not depend on the wall clock.
        """
        obtained = self._obtained.get(cert.serial)
        if obtained is None:
            return False
        interval = renewal_time(cert.validity, self.settings.policy, jitter_draw(cert.serial)) \
            - cert.not_before
        if self.clock.monotonic() - obtained >= interval.total_seconds() / 2:
            return False
        if cert.serial not in self._ahead_reported:
            self._ahead_reported.add(cert.serial)
            out.append(Report(
                f"the system clock ({self.clock.wall().isoformat()}) is ahead of the certificate "
                f"issued {self.clock.monotonic() - obtained:.0f}s ago; not renewing it yet"))
        return True

    def _refused_since(self, cert: Credential, link: LinkView) -> bool:
        """The broker refuses a credential it was not just handed in a switch (that one's
        refusal is the switch's to judge): asked once per credential."""
        return (link.refusal is not None and not link.connected
                and self._switch_deadline is None and cert.serial not in self._refusal_judged
                and self.now() < cert.not_after)

    def _switches_refused(self, cert: Credential) -> bool:
        return self._refused.get(cert.serial, 0) >= self.settings.refused_switches

    def _begin(self, work: Work, out: list[Decision]) -> None:
        self.busy = work
        out.append(Start(work))

    def _take_time(self, server_now: dt.datetime | None, out: list[Decision]) -> None:
        wall = self.clock.wall()
        if server_now is None:
            self.time_source = TimeSource.CERTIFICATE
            if self.current is not None:
                self.offset = self.current.not_before - wall
            out.append(Report("the system clock is implausible and the EST server sent no "
                              "Date; going by our certificate's issue time"))
            return
        self.offset, self.time_source = server_now - wall, TimeSource.EST_SERVER
        out.append(Report(f"local clock is off by {self.offset}; using the EST server's time",
                          error=False))
        if self.current is not None:
            out.append(Reconnect())

    def _judge_expiry(self, server_now: dt.datetime | None, out: list[Decision]) -> None:
        """The broker's "certificate expired" against the EST server's clock."""
        cert, serial = self.current, self._asked_about
        if cert is None or serial != cert.serial:
            return  # asked about a certificate we no longer use
        expired = server_now is not None and server_now >= cert.not_after
        self._expiry_verdict = (serial, expired, self.clock.monotonic())
        if expired:
            return
        told = f"by the EST server's clock too ({server_now.isoformat()})" if server_now \
            else "and the EST server gives no time to say otherwise"
        out.append(Report(f"the broker reports our certificate expired, but it is valid until "
                          f"{cert.not_after.isoformat()} {told}: the broker's CRL may have "
                          "expired; not recovering"))

    def _issued(self, outcome: Issued, out: list[Decision]) -> None:
        new = outcome.credential
        if outcome.work in (Work.RECOVER, Work.BOOTSTRAP):
            out.append(Report(f"recovered through {outcome.work.value}", error=False))
        self._failures = 0
        self.why = None
        self._bootstrap_fallback = self._renew_instead = False
        self._expiry_verdict = None
        if self.time_source is TimeSource.CERTIFICATE and not self.system_clock_ok:
            self.offset = new.not_before - self.clock.wall()
        self.previous, self.current = self.current, new
        self._obtained[new.serial] = self.clock.monotonic()
        self._switch_deadline = self.clock.monotonic() + self.settings.switch_timeout
        out.append(Activate(new))

    def _refused_by_est(self, outcome: Refused, out: list[Decision]) -> None:
        work, status = outcome.work, outcome.status
        said = outcome.reason or str(status)
        if work is Work.RECOVER and status == 401:
            # the listener does not take this certificate (it says: not expired): renew it
            self._renew_instead = True
            self._retry_at = 0.0
            out.append(Report(f"recovery refused ({said}); renewing on simplereenroll instead"))
        elif (status in (401, 403) and (work is Work.RECOVER or
                                        (work is Work.RENEW and self._renew_instead))) or \
                (status == 403 and work is Work.RENEW):
            # past the grace window, or superseded (a renewal whose answer was lost), or
            # revoked: only the bootstrap credential can bring the device back
            self._bootstrap_fallback = True
            self._renew_instead = False
            self._retry_at = 0.0
            out.append(Report(f"{work.value} refused ({said}); "
                              "falling back to the bootstrap certificate"))
        elif status in (401, 403) and work in (Work.ENROLL, Work.BOOTSTRAP):
            self.why = f"the EST server refused enrollment: {said}"
            self._back_off(max(outcome.retry_after or 0.0, self.settings.retry_max),
                           self.why, out)
        else:
            self._back_off(outcome.retry_after, f"{work.value} refused: {said}", out)

    def _back_off(self, hint: float | None, what: str, out: list[Decision]) -> None:
        self._failures += 1
        delay = max(full_jitter(self._failures, 2.0, self.settings.retry_max, self.rng),
                    hint or 0.0)
        self._retry_at = self.clock.monotonic() + delay
        out.append(Report(f"{what}; next attempt in {delay:.0f}s"))

    def _judge_switch(self, link: LinkView, out: list[Decision]) -> None:
        if self._switch_deadline is None or self.current is None:
            return
        number = self.current.number
        previous = self.previous
        verdict = judge_switch(link.connected, link.refusal,
                               previous is not None and self._worth_going_back(previous))
        if verdict is SwitchVerdict.CONFIRMED:
            self._switch_deadline = None
            self.previous = None
            self.why = None
            out.append(Commit())
        elif verdict is SwitchVerdict.ROLL_BACK:
            assert previous is not None
            self._switch_deadline = None
            out.append(Report(f"the broker refused credential generation {number} "
                              f"({link.refusal}); rolling back"))
            self.current, self.previous = previous, None
            self._refused[previous.serial] = self._refused.get(previous.serial, 0) + 1
            if self._switches_refused(previous):
                out.append(Report("the broker refused every new credential; keeping "
                                  f"generation {previous.number} until it expires"))
            self._back_off(None, "renewal refused by the broker", out)
            out.append(RollBack(previous))
        elif verdict is SwitchVerdict.STAY:
            self._switch_deadline = None
            self.previous = None
            self._refusal_judged.add(self.current.serial)  # just issued: the server stands by it
            out.append(Report(f"the broker refused credential generation {number} "
                              f"({link.refusal}); keeping it: the previous one is superseded or "
                              "expired"))
        elif self.clock.monotonic() > self._switch_deadline:
            self._switch_deadline = self.clock.monotonic() + self.settings.switch_timeout
            out.append(Report(f"credential generation {number} not confirmed yet, the broker "
                              f"is away ({link.last_error or 'no answer'}); keeping it"))

    def _worth_going_back(self, previous: Credential) -> bool:
        """Valid by our time, and not superseded when its successor was issued."""
        if self.settings.issuance_supersedes:
            return False
        current = self.current
        if current is not None and current.via in (Work.RECOVER, Work.BOOTSTRAP):
            return False  # revoked (superseded) even by a server that keeps renewed ones
        return self.now() < previous.not_after

    def _settle(self) -> None:
        """The phase follows from the work in flight and the credential's times."""
        if self.busy is not None:
            self.phase = {Work.ENROLL: Phase.ENROLLING, Work.RENEW: Phase.RENEWING,
                          Work.RECOVER: Phase.RECOVERING,
                          Work.BOOTSTRAP: Phase.REENROLLING}.get(self.busy, self.phase)
            if self.busy.issues:
                return
        if self.why is not None and self._failures:
            self.phase = Phase.STRANDED
        elif self.current is None:
            self.phase = Phase.ENROLLING
        elif self._switch_deadline is not None:
            self.phase = Phase.SWITCHING
        elif self.now() >= self.current.not_after:
            self.phase = Phase.EXPIRED
        elif self.busy is None:
            self.phase = Phase.OPERATIONAL
