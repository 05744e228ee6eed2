"""The lifecycle controller against random worlds: clocks, outages, refusals, crashes.

A hypothesis state machine plays the world around one device: a true time, a device
clock that may be reset to 1970, corrected by NTP or stepped; a broker that may be
away, hold an expired CRL (it then answers everyone "certificate expired") or refuse
new credentials; an EST server with a recovery listener and a grace window, that may
be down, busy, lose its answers or send no ``Date``; crashes at any step, resumed as
the credential store's ``repair`` resumes them. After every step it checks what a
fleet operator relies on; at the end it heals the world and requires the device back.
(That no generation is ever deleted is the credential store's model test.)
"""

from __future__ import annotations

import datetime as dt
import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from device_agent.controller import (
    Activate,
    Clock,
    Commit,
    Controller,
    Credential,
    Decision,
    Failed,
    Issued,
    LinkView,
    Refused,
    RollBack,
    Settings,
    Start,
    TimeTold,
    Work,
)
from device_agent.lifecycle import RenewalPolicy

EPOCH = dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
RTC_RESET = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LIFETIME = dt.timedelta(hours=1)
GRACE = dt.timedelta(hours=2)
TICK = 10.0
STORM = 4  # issuances the device may cause in any one certificate lifetime
SETTINGS = Settings(policy=RenewalPolicy(2 / 3, 0.05), retry_max=120.0,
                    has_recovery_listener=True, switch_timeout=60.0, expiry_recheck=600.0)


class Fleet(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.true_now = EPOCH
        self.clock_error = dt.timedelta()  # the device's wall clock minus the true time
        self.mono = 0.0
        self.broker_up = True
        self.crl_expired = False
        self.refusing_new = False  # credentials issued while set are refused by the broker
        self.refused_serials: set[int] = set()
        self.est_mode = "ok"  # ok | down | busy | lossy
        self.sends_date = True
        self.serial = 100
        self.issued: list[tuple[dt.datetime, Work, bool]] = []  # what the server issued, when
        self.latest: int | None = None  # the serial the server would renew or recover
        self.superseded: set[int] = set()
        self.current: Credential | None = None  # the store, as the agent keeps it
        self.previous: Credential | None = None
        self.staged: Credential | None = None  # issued and written, not yet delivered
        self.in_flight: Work | None = None
        self.rng = random.Random(7)
        self.controller = self._boot()

    # --- the device's side -------------------------------------------------------------

    def _boot(self) -> Controller:
        clock = Clock(lambda: self.true_now + self.clock_error, lambda: self.mono)
        controller = Controller(SETTINGS, clock, random.Random(self.rng.random()))
        self._carry_out(controller.start(self.current, self.previous))
        return controller

    def _carry_out(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            if isinstance(decision, Start):
                self.in_flight = decision.work
            elif isinstance(decision, Activate):
                self.previous, self.current = self.current, decision.credential
                self.staged = None
            elif isinstance(decision, Commit):
                self.previous = None
            elif isinstance(decision, RollBack):
                assert self._link().refusal is not None, "rolled back, yet nothing refused"
                assert decision.to == self.previous, "rolls back only to the way back"
                assert decision.to.serial not in self.superseded, \
                    f"rolled back to superseded {decision.to}"
                if self.clock_error == dt.timedelta():
                    assert self.true_now < decision.to.not_after, \
                        f"rolled back to expired {decision.to}"
                self.current, self.previous = decision.to, None

    def _link(self) -> LinkView:
        cert = self.current
        if not self.broker_up or cert is None:
            return LinkView(last_error="connection refused")
        if self.crl_expired or self.true_now >= cert.not_after:
            return LinkView(peer_says_expired=True, last_error="alert certificate expired")
        if cert.serial in self.superseded or cert.serial in self.refused_serials:
            return LinkView(refusal="ALERT_CERTIFICATE_REVOKED", last_error="revoked")
        return LinkView(connected=True)

    # --- the EST server's side ---------------------------------------------------------

    def _issue(self, work: Work) -> Credential:
        self.serial += 1
        if self.latest is not None:  # every issuance supersedes the one before
            self.superseded.add(self.latest)
        self.latest = self.serial
        self.issued.append((self.true_now, work, self.est_mode != "lossy"))
        if self.refusing_new:
            self.refused_serials.add(self.serial)
        number = max((c.number for c in (self.current, self.previous) if c), default=0) + 1
        return Credential(number, self.serial, self.true_now, self.true_now + LIFETIME, work)

    def _answer(self, work: Work) -> Issued | Refused | Failed | TimeTold | None:
        """The server's answer; None: the device crashed before it came."""
        if self.est_mode == "down":
            return Failed(work, "connection refused")
        if self.est_mode == "busy":
            return Refused(work, 503, "busy", retry_after=30.0)
        if work in (Work.CLOCK, Work.EXPIRY_CHECK, Work.DUE_CHECK):
            return TimeTold(work, self.true_now if self.sends_date else None)
        cert = self.current
        if work is Work.RENEW:
            assert cert is not None
            if self.true_now >= cert.not_after:
                return Refused(work, 401, "certificate expired")
            if cert.serial != self.latest:
                return Refused(work, 403, "revoked (superseded)")
        if work is Work.RECOVER:
            assert cert is not None
            if self.true_now < cert.not_after:
                return Refused(work, 401, "has not expired")
            if cert.serial != self.latest or self.true_now > cert.not_after + GRACE:
                return Refused(work, 403, "past the grace window")
        issued = self._issue(work)
        if self.est_mode == "lossy":  # issued, but the answer was lost on the way
            return Failed(work, "timed out")
        return Issued(work, issued)

    # --- time passing ------------------------------------------------------------------

    def _tick(self) -> None:
        if self.in_flight is not None:
            work, self.in_flight = self.in_flight, None
            answer = self._answer(work)
            if answer is not None:
                self._carry_out(self.controller.result(answer))
        self._carry_out(self.controller.tick(self._link()))

    def _pass(self, seconds: float) -> None:
        for _ in range(int(seconds // TICK)):
            self.true_now += dt.timedelta(seconds=TICK)
            self.mono += TICK
            self._tick()

    @rule(minutes=st.integers(1, 90))
    def time_passes(self, minutes: int) -> None:
        self._pass(minutes * 60)

    @rule()
    def rtc_resets_to_1970(self) -> None:
        self.clock_error = RTC_RESET - self.true_now
        self.in_flight = None
        self.controller = self._boot()  # a reboot with a flat RTC battery

    @rule()
    def ntp_corrects_the_clock(self) -> None:
        self.clock_error = dt.timedelta()

    @rule(minutes=st.integers(-120, 120))
    def the_clock_is_stepped(self, minutes: int) -> None:
        self.clock_error += dt.timedelta(minutes=minutes)

    @rule(up=st.booleans())
    def broker(self, up: bool) -> None:
        self.broker_up = up

    @rule(expired=st.booleans())
    def brokers_crl(self, expired: bool) -> None:
        self.crl_expired = expired

    @rule(refusing=st.booleans())
    def broker_refuses_new_credentials(self, refusing: bool) -> None:
        self.refusing_new = refusing

    @rule(mode=st.sampled_from(["ok", "down", "busy", "lossy"]), date=st.booleans())
    def est_server(self, mode: str, date: bool) -> None:
        self.est_mode, self.sends_date = mode, date

    @rule(written=st.booleans())
    def crash_and_restart(self, written: bool) -> None:
        """Killed at this step; an issuing worker may have written its generation."""
        if self.in_flight is not None and self.in_flight.issues and written:
            answer = self._answer(self.in_flight)
            if isinstance(answer, Issued):
                self.staged = answer.credential
        self.in_flight = None
        if self.staged is not None:  # repair() rolls forward to what was written last
            staged, self.staged = self.staged, None
            self.previous, self.current = self.current, Credential(
                staged.number, staged.serial, staged.not_before, staged.not_after)
        self.controller = self._boot()

    # --- what must hold ----------------------------------------------------------------

    @invariant()
    def no_issuance_storm(self) -> None:
        window = [t for t, _, delivered in self.issued if delivered and
                  t > self.true_now - LIFETIME]
        assert len(window) <= STORM, f"{len(window)} issuances in one lifetime: {self.issued}"

    @invariant()
    def a_valid_credential_is_not_replaced_by_an_older_one(self) -> None:
        if self.current is not None and self.previous is not None:
            assert self.current.serial > self.previous.serial

    def teardown(self) -> None:
        """Heal the world: within two lifetimes the device is connected and valid, and
        from then on it only renews, on schedule (every ~0.68 of a lifetime)."""
        self.clock_error = dt.timedelta()
        self.broker_up, self.crl_expired, self.refusing_new = True, False, False
        self.est_mode, self.sends_date = "ok", True
        self._pass(2 * LIFETIME.total_seconds())
        assert self._link().connected, (self.controller.phase, self.current, self._link())
        assert self.current is not None and self.true_now < self.current.not_after
        settled = len(self.issued)
        self._pass(3 * LIFETIME.total_seconds())
        assert self._link().connected
        since = [work for _, work, _ in self.issued[settled:]]
        assert set(since) <= {Work.RENEW} and 4 <= len(since) <= 5, since


Fleet.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None,
                                            derandomize=True)
TestLifecycleModel = Fleet.TestCase
