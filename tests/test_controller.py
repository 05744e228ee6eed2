"""The lifecycle controller, one transition per test: events in, decisions out."""

from __future__ import annotations

import datetime as dt
import random

import pytest

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
    Phase,
    Reconnect,
    Refused,
    Report,
    RollBack,
    Settings,
    Start,
    TimeSource,
    TimeTold,
    Work,
)
from device_agent.lifecycle import RenewalPolicy

REAL = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
RTC_RESET = dt.datetime(1970, 1, 2, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
UP = LinkView(connected=True)
AWAY = LinkView(last_error="connection refused")
REFUSED = LinkView(refusal="ALERT_CERTIFICATE_REVOKED", last_error="alert certificate revoked")
SAYS_EXPIRED = LinkView(peer_says_expired=True, last_error="tlsv1 alert certificate expired")


class World:
    """A wall clock that can be stepped and a monotonic one that only moves forward."""

    def __init__(self, wall: dt.datetime = REAL) -> None:
        self.wall, self.mono = wall, 1000.0
        self.clock = Clock(lambda: self.wall, lambda: self.mono)

    def wait(self, seconds: float) -> None:
        self.wall += dt.timedelta(seconds=seconds)
        self.mono += seconds

    def step(self, to: dt.datetime) -> None:
        self.wall = to


def credential(number: int, not_before: dt.datetime, lifetime: dt.timedelta = 10 * HOUR,
               via: Work | None = Work.RENEW) -> Credential:
    return Credential(number, 1000 + number, not_before, not_before + lifetime, via)


def controller(world: World, **settings: object) -> Controller:
    base = {"policy": RenewalPolicy(0.5, 0.0), "retry_max": 60.0, "switch_timeout": 60.0,
            "has_recovery_listener": True}
    return Controller(Settings(**{**base, **settings}), world.clock,  # type: ignore[arg-type]
                      random.Random(1))


def starts(decisions: list[Decision]) -> list[Work]:
    return [d.work for d in decisions if isinstance(d, Start)]


def running(world: World, **settings: object) -> Controller:
    """Operational on generation 1, enrolled in this run, its notBefore an hour back."""
    ctl = controller(world, **settings)
    ctl.start(None, None)
    ctl.tick(AWAY)
    ctl.result(Issued(Work.ENROLL, credential(1, world.wall - HOUR, via=Work.ENROLL)))
    ctl.tick(UP)
    return ctl


# --- first boot --------------------------------------------------------------------------

def test_first_boot_with_a_plausible_clock_enrolls() -> None:
    world = World()
    ctl = controller(world)
    ctl.start(None, None)
    assert starts(ctl.tick(AWAY)) == [Work.ENROLL]
    assert ctl.phase is Phase.ENROLLING


def test_first_boot_at_1970_asks_the_server_for_the_time_before_enrolling() -> None:
    world = World(RTC_RESET)
    ctl = controller(world)
    ctl.start(None, None)
    assert starts(ctl.tick(AWAY)) == [Work.CLOCK]
    ctl.result(TimeTold(Work.CLOCK, REAL))
    assert starts(ctl.tick(AWAY)) == [Work.ENROLL]
    assert ctl.time_source is TimeSource.EST_SERVER and ctl.now() == REAL


def test_a_server_without_a_date_does_not_block_enrollment() -> None:
    world = World(RTC_RESET)
    ctl = controller(world)
    ctl.start(None, None)
    ctl.tick(AWAY)
    ctl.result(TimeTold(Work.CLOCK, None))
    assert starts(ctl.tick(AWAY)) == [Work.ENROLL]
    ctl.result(Issued(Work.ENROLL, credential(1, REAL, via=Work.ENROLL)))
    assert ctl.time_source is TimeSource.CERTIFICATE
    assert ctl.now() == REAL  # the certificate's issue time: a floor, never a guess ahead
    world.wait(3600)
    assert ctl.now() == REAL + HOUR


def test_an_issued_certificate_is_activated_and_confirmed_by_the_broker() -> None:
    world = World()
    ctl = controller(world)
    ctl.start(None, None)
    ctl.tick(AWAY)
    new = credential(1, REAL, via=Work.ENROLL)
    assert ctl.result(Issued(Work.ENROLL, new)) == [Activate(new)]
    assert ctl.phase is Phase.SWITCHING
    assert Commit() in ctl.tick(UP)
    assert ctl.phase is Phase.OPERATIONAL and ctl.previous is None


# --- time --------------------------------------------------------------------------------

def test_a_corrected_clock_drops_the_servers_offset_and_the_device_renews_normally() -> None:
    """Failure 1: the offset from a 1970 boot was kept after NTP fixed the clock (~2083)."""
    world = World(RTC_RESET)
    ctl = controller(world)
    ctl.start(None, None)
    ctl.tick(AWAY)
    ctl.result(TimeTold(Work.CLOCK, REAL))
    ctl.tick(AWAY)
    ctl.result(Issued(Work.ENROLL, credential(1, REAL, via=Work.ENROLL)))
    ctl.tick(UP)
    world.wait(60)
    world.step(REAL + dt.timedelta(seconds=60))  # NTP
    decisions = ctl.tick(UP)
    assert Reconnect() in decisions and not starts(decisions)
    assert ctl.offset is None and ctl.time_source is TimeSource.SYSTEM
    for _ in range(10):  # an hour later: nothing to do yet
        world.wait(360)
        assert starts(ctl.tick(UP)) == []
    world.wait(4 * 3600)  # half the ten-hour lifetime
    assert starts(ctl.tick(UP)) == [Work.RENEW]


def test_a_clock_jump_drops_the_offset_and_asks_the_server_again() -> None:
    world = World(RTC_RESET)
    ctl = controller(world)
    ctl.start(credential(1, REAL - HOUR), None)
    assert starts(ctl.tick(UP)) == [Work.CLOCK]
    ctl.result(TimeTold(Work.CLOCK, REAL))
    world.step(RTC_RESET + dt.timedelta(days=3))  # still implausible, but moved
    decisions = ctl.tick(UP)
    assert Reconnect() in decisions and starts(decisions) == [Work.CLOCK]
    ctl.result(TimeTold(Work.CLOCK, REAL + dt.timedelta(days=3)))
    assert ctl.now() == REAL + dt.timedelta(days=3)


def test_a_long_suspend_past_expiry_recovers_at_once() -> None:
    world = World()
    ctl = running(world)
    world.wait(20 * 3600)  # suspended: the boot clock counts it (CLOCK_BOOTTIME)
    assert starts(ctl.tick(AWAY)) == [Work.RECOVER]
    assert ctl.phase is Phase.RECOVERING


# --- renewal and switching ---------------------------------------------------------------

def test_renewal_starts_when_due_and_not_before() -> None:
    world = World()
    ctl = running(world)
    world.wait(3.9 * 3600)
    assert starts(ctl.tick(UP)) == []
    world.wait(0.2 * 3600)
    assert starts(ctl.tick(UP)) == [Work.RENEW]
    assert ctl.phase is Phase.RENEWING


def test_no_second_work_while_one_is_in_flight() -> None:
    world = World()
    ctl = running(world)
    world.wait(5 * 3600)
    assert starts(ctl.tick(UP)) == [Work.RENEW]
    world.wait(600)
    assert starts(ctl.tick(UP)) == []


def test_a_requested_renewal_starts_at_once() -> None:
    world = World()
    ctl = running(world)
    ctl.request_renewal()
    assert starts(ctl.tick(UP)) == [Work.RENEW]


def test_a_broker_away_over_a_rotation_keeps_the_new_credential() -> None:
    """Failure 2: the switch rolled back (and deleted the new credential) after 60 s away."""
    world = World()
    ctl = running(world)
    world.wait(5 * 3600)
    ctl.tick(UP)
    new = credential(2, world.wall)
    ctl.result(Issued(Work.RENEW, new))
    for _ in range(30):  # five minutes away
        world.wait(10)
        decisions = ctl.tick(AWAY)
        assert not any(isinstance(d, RollBack) for d in decisions)
        assert starts(decisions) == []
    assert ctl.current == new and ctl.phase is Phase.SWITCHING
    assert any(isinstance(d, Report) and "keeping it" in d.message for d in decisions) or \
        ctl.previous is not None
    assert Commit() in ctl.tick(UP)


def test_a_refused_credential_is_kept_when_the_server_superseded_the_previous() -> None:
    """Our EST server revokes the renewed certificate: there is no way back."""
    world = World()
    ctl = running(world)
    world.wait(5 * 3600)
    ctl.tick(UP)
    new = credential(2, world.wall)
    ctl.result(Issued(Work.RENEW, new))
    decisions = ctl.tick(REFUSED)
    assert not any(isinstance(d, RollBack) for d in decisions)
    assert ctl.current == new and ctl.phase is Phase.OPERATIONAL


def test_a_refused_credential_rolls_back_to_a_valid_previous_one() -> None:
    world = World()
    ctl = running(world, issuance_supersedes=False)
    old = ctl.current
    world.wait(5 * 3600)
    ctl.tick(UP)
    ctl.result(Issued(Work.RENEW, credential(2, world.wall)))
    decisions = ctl.tick(REFUSED)
    assert RollBack(old) in decisions  # type: ignore[arg-type]
    assert ctl.current == old and ctl.phase is Phase.OPERATIONAL
    assert starts(ctl.tick(UP)) == []  # backs off before renewing again


def test_a_refused_credential_is_kept_when_the_previous_has_expired() -> None:
    world = World()
    ctl = running(world, issuance_supersedes=False)
    world.wait(5 * 3600)
    ctl.tick(UP)
    new = credential(2, world.wall)
    ctl.result(Issued(Work.RENEW, new))
    world.wait(6 * 3600)  # the old one expired while the new one waited
    decisions = ctl.tick(REFUSED)
    assert not any(isinstance(d, RollBack) for d in decisions)
    assert ctl.current == new


def test_never_rolls_back_past_a_recovery_even_with_a_server_that_keeps_renewed_ones() -> None:
    world = World()
    ctl = running(world, issuance_supersedes=False)
    world.wait(11 * 3600)
    assert starts(ctl.tick(AWAY)) == [Work.RECOVER]
    ctl.result(Refused(Work.RECOVER, 403, "past grace"))
    assert starts(ctl.tick(AWAY)) == [Work.BOOTSTRAP]
    ctl.result(Issued(Work.BOOTSTRAP, credential(2, world.wall, via=Work.BOOTSTRAP)))
    world.step(REAL)  # even if our clock made the old one look valid again
    assert not any(isinstance(d, RollBack) for d in ctl.tick(REFUSED))


def test_a_broker_refusing_every_new_credential_does_not_make_a_renewal_storm() -> None:
    world = World()
    ctl = running(world, issuance_supersedes=False)
    world.wait(5 * 3600)
    issued = 0
    for _ in range(2000):  # to past expiry, ten seconds a tick
        world.wait(10)
        for work in starts(ctl.tick(REFUSED if ctl.previous else AWAY)):
            if work is Work.RENEW:
                issued += 1
                ctl.result(Issued(work, credential(10 + issued, world.wall)))
            elif work is Work.RECOVER:
                break
        if ctl.busy is Work.RECOVER:
            break
    assert issued == 3  # Settings.refused_switches; then kept until it expired
    assert ctl.busy is Work.RECOVER


def test_a_credential_revoked_while_in_use_goes_back_to_the_bootstrap_not_days_later() -> None:
    """`revoke-device`: the broker now refuses a credential it admitted. Before, the agent
    waited for the credential's renewal time (days) before the EST server was asked; now
    it asks at once, a 403 sends it to the bootstrap certificate, and that is retried
    until an operator activates the device."""
    world = World()
    ctl = running(world)
    world.wait(60)
    assert starts(ctl.tick(REFUSED)) == [Work.RENEW]
    ctl.result(Refused(Work.RENEW, 403, "certificate revoked"))
    assert starts(ctl.tick(REFUSED)) == [Work.BOOTSTRAP]
    ctl.result(Refused(Work.BOOTSTRAP, 403, "device revoked-2 is suspended"))
    assert ctl.phase is Phase.STRANDED
    retried = []
    for _ in range(20):
        world.wait(10)
        retried += starts(ctl.tick(REFUSED))
        if retried:
            break
    assert retried == [Work.BOOTSTRAP]  # never the revoked credential again


def test_a_refusal_is_put_to_the_server_once_per_credential() -> None:
    """The server stands by the credential (a broker with a wrong CRL, say): no storm."""
    world = World()
    ctl = running(world)
    world.wait(60)
    assert starts(ctl.tick(REFUSED)) == [Work.RENEW]
    ctl.result(Issued(Work.RENEW, credential(2, world.wall)))
    ctl.tick(REFUSED)  # the new one is refused as well: kept, the old one is superseded
    asked = []
    for _ in range(360):  # an hour
        world.wait(10)
        asked += starts(ctl.tick(REFUSED))
    assert asked == []
    assert ctl.current is not None and ctl.current.number == 2


# --- expiry and recovery -----------------------------------------------------------------

def test_expired_recovers_through_the_listener() -> None:
    world = World()
    ctl = running(world)
    world.wait(10 * 3600)
    assert starts(ctl.tick(AWAY)) == [Work.RECOVER]


def test_expired_without_a_listener_reenrolls_with_the_bootstrap() -> None:
    world = World()
    ctl = running(world, has_recovery_listener=False)
    world.wait(10 * 3600)
    assert starts(ctl.tick(AWAY)) == [Work.BOOTSTRAP]
    assert ctl.phase is Phase.REENROLLING


def test_recovery_answering_not_expired_renews_instead_never_the_bootstrap() -> None:
    world = World()
    ctl = running(world)
    world.wait(10 * 3600)
    ctl.tick(AWAY)
    ctl.result(Refused(Work.RECOVER, 401, "has not expired"))
    assert starts(ctl.tick(AWAY)) == [Work.RENEW]


def test_not_expired_is_forgotten_when_the_renewal_gets_no_answer() -> None:
    """Issue 14's soak, seed 2: a clock a day ahead sent the agent to the recovery listener,
    which said "not expired", so it renewed instead; the renewal got no answer, and once the
    clock was set right and the certificate had really expired, every renewal failed in the
    handshake while "renew instead" stuck: stranded. A renewal without an answer now
    forgets the listener's verdict, and the expired certificate goes to recovery."""
    world = World()
    ctl = running(world)
    world.step(world.wall + 24 * HOUR)
    world.wait(3 * 3600)  # past the "obtained moments ago" guard
    assert starts(ctl.tick(AWAY)) == [Work.RECOVER]
    ctl.result(Refused(Work.RECOVER, 401, "has not expired"))
    assert starts(ctl.tick(AWAY)) == [Work.RENEW]
    ctl.result(Failed(Work.RENEW, "Remote end closed connection without response"))
    world.step(world.wall - 24 * HOUR)
    world.wait(10 * 3600)  # now it has expired
    assert starts(ctl.tick(AWAY)) == [Work.RECOVER]


def test_recovery_past_grace_falls_back_to_the_bootstrap() -> None:
    world = World()
    ctl = running(world)
    world.wait(10 * 3600)
    ctl.tick(AWAY)
    ctl.result(Refused(Work.RECOVER, 403, "past the grace window"))
    assert starts(ctl.tick(AWAY)) == [Work.BOOTSTRAP]


def test_a_renewal_instead_of_recovery_refused_falls_back_to_the_bootstrap() -> None:
    world = World()
    ctl = running(world)
    world.wait(10 * 3600)
    ctl.tick(AWAY)
    ctl.result(Refused(Work.RECOVER, 401, "has not expired"))
    ctl.tick(AWAY)
    ctl.result(Refused(Work.RENEW, 403, "not the latest issued"))
    assert starts(ctl.tick(AWAY)) == [Work.BOOTSTRAP]


def test_a_renewal_refused_as_superseded_reenrolls_with_the_bootstrap_at_once() -> None:
    """A renewal whose answer was lost: the server has superseded the credential we hold."""
    world = World()
    ctl = running(world)
    world.wait(5 * 3600)
    ctl.tick(UP)
    ctl.result(Refused(Work.RENEW, 403, "revoked (superseded)"))
    assert starts(ctl.tick(UP)) == [Work.BOOTSTRAP]


def test_a_renewal_refused_for_expiry_backs_off_for_recovery() -> None:
    world = World()
    ctl = running(world)
    world.wait(5 * 3600)
    ctl.tick(UP)
    ctl.result(Refused(Work.RENEW, 401, "certificate expired"))
    assert starts(ctl.tick(UP)) == []


def test_a_refused_bootstrap_strands_the_device_and_says_why() -> None:
    world = World()
    ctl = running(world, has_recovery_listener=False)
    world.wait(10 * 3600)
    ctl.tick(AWAY)
    ctl.result(Refused(Work.BOOTSTRAP, 403, "device is suspended"))
    assert ctl.phase is Phase.STRANDED and "suspended" in (ctl.why or "")
    world.wait(59)
    assert starts(ctl.tick(AWAY)) == []
    world.wait(2)
    assert starts(ctl.tick(AWAY)) == [Work.BOOTSTRAP]


def test_a_busy_server_is_not_asked_before_its_retry_after() -> None:
    world = World()
    ctl = running(world)
    world.wait(5 * 3600)
    ctl.tick(UP)
    ctl.result(Refused(Work.RENEW, 429, "budget", retry_after=45.0))
    world.wait(44)
    assert starts(ctl.tick(UP)) == []
    world.wait(2)
    assert starts(ctl.tick(UP)) == [Work.RENEW]


def test_failures_back_off() -> None:
    world = World()
    ctl = running(world)
    world.wait(5 * 3600)
    ctl.tick(UP)
    decisions = ctl.result(Failed(Work.RENEW, "timed out"))
    assert any(isinstance(d, Report) and "next attempt" in d.message for d in decisions)
    assert ctl.phase is Phase.OPERATIONAL and ctl.busy is None


# --- the broker's word on expiry ---------------------------------------------------------

def test_the_brokers_expired_alert_for_a_valid_certificate_is_checked_not_obeyed() -> None:
    world = World()
    ctl = running(world)
    assert starts(ctl.tick(SAYS_EXPIRED)) == [Work.EXPIRY_CHECK]
    decisions = ctl.result(TimeTold(Work.EXPIRY_CHECK, world.wall))
    assert any(isinstance(d, Report) and "CRL may have expired" in d.message
               for d in decisions)
    for _ in range(50):
        world.wait(10)
        assert starts(ctl.tick(SAYS_EXPIRED)) == []
    world.wait(200)  # the verdict is ten minutes old: ask again
    assert starts(ctl.tick(SAYS_EXPIRED)) == [Work.EXPIRY_CHECK]


def test_the_brokers_expired_alert_confirmed_by_the_server_recovers() -> None:
    world = World()
    ctl = running(world)
    ctl.tick(SAYS_EXPIRED)
    ctl.result(TimeTold(Work.EXPIRY_CHECK, world.wall + 20 * HOUR))  # our clock lags
    assert starts(ctl.tick(SAYS_EXPIRED)) == [Work.RECOVER]


# --- restarts ----------------------------------------------------------------------------

def test_a_restart_during_a_switch_resumes_it() -> None:
    world = World()
    ctl = controller(world, issuance_supersedes=False)
    old, new = credential(1, REAL - HOUR), credential(2, REAL, via=None)
    ctl.start(new, old)
    assert ctl.phase is Phase.SWITCHING
    assert RollBack(old) in ctl.tick(REFUSED)


@pytest.mark.parametrize("phase_work", [Work.RENEW, Work.RECOVER, Work.BOOTSTRAP])
def test_a_restart_with_work_in_flight_starts_it_again(phase_work: Work) -> None:
    world = World()
    ctl = running(world, has_recovery_listener=phase_work is not Work.BOOTSTRAP)
    world.wait((5 if phase_work is Work.RENEW else 10) * 3600)
    assert starts(ctl.tick(AWAY)) == [phase_work]
    again = controller(world, has_recovery_listener=phase_work is not Work.BOOTSTRAP)
    again.start(ctl.current, None)
    if phase_work is Work.RENEW:  # what an earlier run obtained: the server's clock first
        assert starts(again.tick(AWAY)) == [Work.DUE_CHECK]
        again.result(TimeTold(Work.DUE_CHECK, world.wall))
    assert starts(again.tick(AWAY)) == [phase_work]


def test_a_restarted_device_whose_clock_runs_ahead_does_not_renew_early() -> None:
    """A fast clock survives restarts; each restart used to renew again (a storm)."""
    world = World()
    for _ in range(5):
        ctl = controller(world)
        ctl.start(credential(1, REAL - HOUR), None)
        world.step(REAL + 4 * HOUR)  # the clock says renew; the true time is REAL
        assert starts(ctl.tick(UP)) == [Work.DUE_CHECK]
        ctl.result(TimeTold(Work.DUE_CHECK, REAL))
        assert starts(ctl.tick(UP)) == []
        world.step(REAL)
