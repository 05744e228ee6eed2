"""The soak's plan as pure functions over frozen data: timing, fault schedule, verdict.

``fleet-sim --scenario soak`` compresses weeks of fleet life into ``--duration``
seconds: certificates live tens of seconds, so does the Device CA's CRL, and the
recovery grace and the EST budgets are scaled to match (:class:`Timing`). A seeded
random schedule (:func:`plan`) overlaps faults on the broker, the EST server and
the devices; :func:`justified_issuances` says how many certificates each device may
have obtained given what was done to it, and :func:`violations` turns the run's
figures into the verdict. Nothing here touches a process: soak_run.py carries the
plan out, and tests/test_soak.py checks these functions on their own.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class FaultKind(StrEnum):
    BROKER_STOP = "broker-stop"              # shorter than a certificate lifetime
    BROKER_STOP_LONG = "broker-stop-long"    # longer than a certificate lifetime
    BROKER_RESTART = "broker-restart"
    BROKER_RERENDER = "broker-rerender"      # broker-config render over the running broker
    EST_STOP = "est-stop"
    AGENT_KILL = "agent-kill"                # kill -9, restarted a few seconds later
    AGENT_KILL_RENEWING = "agent-kill-renewing"  # kill -9 just after its renewal began
    AGENT_SUSPEND = "agent-suspend"          # SIGSTOP ... SIGCONT
    CLOCK_1970 = "clock-1970"                # RTC reset, set right later
    CLOCK_FORWARD = "clock-forward"          # ahead by days, set right later
    OFF_PAST_EXPIRY = "off-past-expiry"      # switched off, back inside the grace window
    OFF_PAST_GRACE = "off-past-grace"        # switched off, back after the grace window
    REVOKE = "revoke-device"
    DECOMMISSION = "decommission"


BROKER_KINDS = (FaultKind.BROKER_STOP, FaultKind.BROKER_STOP_LONG, FaultKind.BROKER_RESTART,
                FaultKind.BROKER_RERENDER)
DEVICE_KINDS = (FaultKind.AGENT_KILL, FaultKind.AGENT_KILL_RENEWING, FaultKind.AGENT_SUSPEND,
                FaultKind.CLOCK_1970, FaultKind.CLOCK_FORWARD, FaultKind.OFF_PAST_EXPIRY,
                FaultKind.OFF_PAST_GRACE)
REMOVALS = (FaultKind.REVOKE, FaultKind.DECOMMISSION)

# What each fault on a device may cost in certificates beyond the scheduled renewals:
# a kill may lose a renewal the EST server already superseded with (then the bootstrap
# re-enrolls), a clock set wrong and right may each look like an expiry, and so on.
EXTRA_ISSUANCES: Mapping[FaultKind, int] = {
    FaultKind.AGENT_KILL: 2, FaultKind.AGENT_KILL_RENEWING: 2, FaultKind.AGENT_SUSPEND: 1,
    FaultKind.CLOCK_1970: 2, FaultKind.CLOCK_FORWARD: 2, FaultKind.OFF_PAST_EXPIRY: 1,
    FaultKind.OFF_PAST_GRACE: 1, FaultKind.REVOKE: 0, FaultKind.DECOMMISSION: 0,
    # on every device: a broker away longer than a lifetime, or the EST server away
    # through a renewal, may each leave one more certificate to recover
    FaultKind.BROKER_STOP_LONG: 1, FaultKind.EST_STOP: 1,
    FaultKind.BROKER_STOP: 0, FaultKind.BROKER_RESTART: 0, FaultKind.BROKER_RERENDER: 0,
}
RENEWAL_FRACTION = 0.6  # the agent renews at 2/3 of the lifetime (+ jitter); a little slack


@dataclass(frozen=True)
class Timing:
    """Every interval of one soak, derived from its duration (seconds)."""

    duration: float
    lifetime: int              # operational certificates
    crl_lifetime: int          # the Device CA's CRL (nextUpdate - thisUpdate)
    crl_refresh: float         # how often the shipped refresh runs
    grace: int                 # the recovery listener's grace window
    settle: float              # the last stretch, without faults

    def __post_init__(self) -> None:
        if self.settle >= self.duration:
            raise ValueError("the settle phase must leave room for faults")
        if not self.crl_refresh * 4 <= self.crl_lifetime:
            raise ValueError("the CRL refresh must run well inside the CRL lifetime")

    @classmethod
    def for_run(cls, duration: float, devices: int, lifetime: int | None = None) -> Timing:
        """Lifetimes of tens of seconds so that a run spans many of them; a longer one for a
        big fleet, whose enrollment storm and renewal waves take longer on 2 cores."""
        lifetime = lifetime or max(20, 10 + devices, round(duration / 20))
        shortest = 2.5 * lifetime + 10  # a lifetime of faults, then time to settle
        if duration < shortest:
            raise ValueError(f"--duration must be at least {shortest:g} seconds for a soak "
                             f"with {lifetime}s certificates")
        crl_lifetime = max(20, lifetime)
        return cls(duration=duration, lifetime=lifetime, crl_lifetime=crl_lifetime,
                   crl_refresh=crl_lifetime / 5, grace=lifetime,
                   settle=max(1.5 * lifetime + 10, duration / 5))

    @property
    def faults_end(self) -> float:
        return self.duration - self.settle

    def reserve(self, kind: FaultKind) -> float:
        """The longest a device fault of ``kind`` can hold its device (the driver ends
        each within this, from the device's own certificate expiry where it depends on it)."""
        return {
            FaultKind.AGENT_KILL: 6.0, FaultKind.AGENT_KILL_RENEWING: self.lifetime + 8.0,
            FaultKind.AGENT_SUSPEND: 1.3 * self.lifetime + 2,
            FaultKind.CLOCK_1970: 1.5 * self.lifetime + 2,
            FaultKind.CLOCK_FORWARD: 1.5 * self.lifetime + 2,
            FaultKind.OFF_PAST_EXPIRY: self.lifetime + 0.6 * self.grace + 3,
            FaultKind.OFF_PAST_GRACE: self.lifetime + self.grace + 6,
        }[kind]


@dataclass(frozen=True)
class Fault:
    at: float                   # seconds into the fault phase
    kind: FaultKind
    device: str | None = None   # None: the broker or the EST server
    hold: float = 0.0           # how long it lasts (stops, suspensions, clocks); for the
    #                             switched-off kinds, where in the grace window it returns
    param: float = 0.0          # kind-specific: days ahead, seconds into a renewal

    @property
    def until(self) -> float:
        return self.at + self.hold


@dataclass(frozen=True)
class Plan:
    seed: int
    devices: tuple[str, ...]
    timing: Timing
    faults: tuple[Fault, ...] = field(default=())

    def counts(self) -> dict[str, int]:
        counted = Counter(f.kind.value for f in self.faults)
        return {kind.value: counted.get(kind.value, 0) for kind in FaultKind}

    def removed(self) -> tuple[str, ...]:
        return tuple(f.device for f in self.faults if f.kind in REMOVALS and f.device)


def _free(busy: list[tuple[float, float]], start: float, end: float) -> bool:
    return all(end <= a or start >= b for a, b in busy)


def plan(seed: int, devices: Sequence[str], timing: Timing) -> Plan:
    """The faults of one run, a pure function of the seed, the devices and the timing.

    The broker's faults never overlap each other (a stop inside a stop means nothing),
    nor do the EST server's, nor two faults on one device, but everything else may: an
    EST outage during a broker outage, a device killed while another's clock is wrong. A
    few devices are revoked or decommissioned mid-run and left alone after that.
    """
    rng = random.Random(seed)
    end, life = timing.faults_end, timing.lifetime
    faults: list[Fault] = []
    device_busy: dict[str, list[tuple[float, float]]] = {d: [] for d in devices}

    removals = max(1, len(devices) // 10)
    chosen = rng.sample(list(devices), min(len(devices) - 1, 2 * removals)) \
        if len(devices) >= 4 else []
    for index, device in enumerate(chosen):
        at = round(rng.uniform(0.3, 0.7) * end, 1)
        kind = FaultKind.REVOKE if index % 2 == 0 else FaultKind.DECOMMISSION
        faults.append(Fault(at, kind, device))
        device_busy[device].append((at - 1, math.inf))

    broker_busy: list[tuple[float, float]] = []
    for _ in range(max(2, round(end / (0.7 * life)))):
        kind = rng.choice(BROKER_KINDS)
        hold = {FaultKind.BROKER_STOP: rng.uniform(2, 0.5 * life),
                FaultKind.BROKER_STOP_LONG: rng.uniform(1.1, 1.4) * life}.get(kind, 0.0)
        for _attempt in range(5):
            at = rng.uniform(2, end - hold - 1)
            if at >= 2 and _free(broker_busy, at - 3, at + hold + 3):
                faults.append(Fault(round(at, 1), kind, hold=round(hold, 1)))
                broker_busy.append((at - 3, at + hold + 3))
                break
    est_busy: list[tuple[float, float]] = []
    for _ in range(max(1, round(end / (2.5 * life)))):
        hold = rng.uniform(3, 0.8 * life)
        at = rng.uniform(2, end - hold - 1)
        if at >= 2 and _free(est_busy, at - 3, at + hold + 3):
            faults.append(Fault(round(at, 1), FaultKind.EST_STOP, hold=round(hold, 1)))
            est_busy.append((at - 3, at + hold + 3))

    for _ in range(round(len(devices) * end / (1.5 * life))):
        kind = rng.choice(DEVICE_KINDS)
        device = rng.choice(list(devices))
        reserve = timing.reserve(kind)
        at = math.floor(rng.uniform(1, end - reserve) * 10) / 10  # on the plan's 0.1 s grid,
        if at < 1 or not _free(device_busy[device], at - 2, at + reserve + 2):  # never later
            continue
        hold, param = {
            FaultKind.AGENT_KILL: (rng.uniform(0.5, 5), 0.0),
            FaultKind.AGENT_KILL_RENEWING: (0.0, rng.uniform(0.0, 1.5)),
            FaultKind.AGENT_SUSPEND: (rng.uniform(3, 1.3 * life), 0.0),
            FaultKind.CLOCK_1970: (rng.uniform(5, 1.5 * life), 0.0),
            FaultKind.CLOCK_FORWARD: (rng.uniform(5, 1.5 * life), float(rng.choice(
                (1, 3, 30, 400)))),
            FaultKind.OFF_PAST_EXPIRY: (rng.uniform(0.2, 0.6), 0.0),
            FaultKind.OFF_PAST_GRACE: (rng.uniform(2, 5), 0.0),
        }[kind]
        faults.append(Fault(at, kind, device, round(hold, 2), param))
        device_busy[device].append((at, at + reserve))
    faults.sort(key=lambda f: (f.at, f.kind.value, f.device or ""))
    return Plan(seed, tuple(devices), timing, tuple(faults))


def justified_issuances(plan: Plan, device: str, run_s: float) -> int:
    """The most certificates ``device`` may have obtained in ``run_s`` seconds of the run:
    its enrollment, the scheduled renewals, and what each fault it lived through allows."""
    renewals = math.ceil(run_s / (RENEWAL_FRACTION * plan.timing.lifetime))
    extra = sum(EXTRA_ISSUANCES[f.kind] for f in plan.faults
                if f.device == device or f.device is None)
    return 1 + renewals + extra


def daily_budget(plan: Plan) -> int:
    """The EST server's recoveries and bootstrap re-enrollments per device and (rolling,
    real) day: a run is far shorter than a day, so this is the run's budget, twice what
    the faults on the busiest device could need."""
    needs = [sum(EXTRA_ISSUANCES[f.kind] for f in plan.faults
                 if f.device == device or f.device is None) for device in plan.devices]
    return 2 * max(needs, default=0) + 3


@dataclass(frozen=True)
class Figures:
    """What the run measured, as the verdict needs it."""

    messages_lost: int
    stranded: tuple[str, ...]
    revoked_reconnected: tuple[str, ...]
    crl_lapsed_s: float
    over_issued: Mapping[str, tuple[int, int]]  # device: (issued, justified)
    not_enrolled: tuple[str, ...] = ()


def violations(figures: Figures) -> list[str]:
    """Each broken invariant, one line each; empty when the run passes."""
    found = []
    if figures.not_enrolled:
        found.append(f"{len(figures.not_enrolled)} device(s) never enrolled: "
                     f"{list(figures.not_enrolled)[:5]}")
    if figures.messages_lost:
        found.append(f"{figures.messages_lost} message(s) lost")
    if figures.stranded:
        found.append(f"{len(figures.stranded)} device(s) stranded: {list(figures.stranded)[:5]}")
    if figures.revoked_reconnected:
        found.append(f"revoked device(s) reconnected: {list(figures.revoked_reconnected)}")
    if figures.crl_lapsed_s > 0:
        found.append(f"the broker held an expired CRL for {figures.crl_lapsed_s:.1f}s")
    if figures.over_issued:
        shown = {d: f"{n} > {m}" for d, (n, m) in sorted(figures.over_issued.items())[:5]}
        found.append(f"{len(figures.over_issued)} device(s) got more certificates than "
                     f"justified: {shown}")
    return found


def replay_command(plan: Plan, lifetime: int | None = None, interval: float | None = None,
                   keystore: str = "tpm") -> str:
    argv = ["fleet-sim", "--devices", str(len(plan.devices)), "--scenario", "soak",
            "--duration", f"{plan.timing.duration:g}", "--seed", str(plan.seed)]
    if lifetime is not None:
        argv += ["--lifetime", str(lifetime)]
    if interval is not None:
        argv += ["--interval", f"{interval:g}"]
    if keystore != "tpm":
        argv += ["--keystore", keystore]
    return " ".join(argv)
