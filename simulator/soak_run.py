"""The soak carried out: the fault injector, the watchers, the settle phase, the figures.

:func:`run_soak` boots the fleet (the enrollment storm), hands the plan of soak.py
to an :class:`Injector` that applies each fault at its time and ends it later,
keeps every agent running as systemd would (an agent that dies is started again
and counted), watches revoked devices stay out, then lets the fleet settle
without faults, drains it, and collects what the verdict needs: the monitor's
sequence numbers, the registry's issuances per device (the second witness), the
EST requests per device from the audit log, and how long the broker held an
expired CRL (crl_refresh.CRLWatch, with the shipped refresh running on its timer).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import itertools
import json
import random
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provisioning.registry import Registry, open_registry

from .crl_refresh import CRLRefresher, CRLWatch, crl_probe, service_commands
from .scenarios import Findings, enroll_storm, finish
from .soak import (
    REMOVALS,
    Fault,
    FaultKind,
    Figures,
    Plan,
    Timing,
    daily_budget,
    justified_issuances,
    plan,
    replay_command,
    violations,
)

if TYPE_CHECKING:
    from .fleet import Fleet, FleetOptions

RTC_RESET = "@1970-01-02 00:00:00"  # libfaketime: a clock that starts there and runs
CUT_OFF_S = 15.0   # a removed device must be off the broker within this
RESTART_S = 2.0    # an agent that died is started again after this (systemd: RestartSec)
EST_READY_S = 120.0  # an EST server restarted under load may take this long to be ready


@dataclass
class SoakRecord:
    """What happened, as the injector and the watchers saw it (fleet seconds)."""

    applied: Counter[str] = field(default_factory=Counter)
    spans: list[tuple[float, float, str, str | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    deaths: list[dict[str, Any]] = field(default_factory=list)
    broker_crashes: list[dict[str, Any]] = field(default_factory=list)
    removed_at: dict[str, float] = field(default_factory=dict)
    cut_marks: dict[str, int] = field(default_factory=dict)  # broker log offsets
    revoked_reconnected: set[str] = field(default_factory=set)
    stranded: dict[str, dict[str, Any]] = field(default_factory=dict)
    est_starts_s: list[float] = field(default_factory=list)
    faults_started: float = 0.0
    settle_started: float = 0.0
    wall0: float = 0.0


class Injector:
    """Applies the plan's faults against the running fleet, each ended on time.

    One thread (the caller's) carries out every action in time order from a queue:
    a fault's start schedules its end, so faults overlap as the plan says. Actions
    are short (a stop, a signal, a file rewritten, one command), so a late one is
    late by seconds at most.
    """

    def __init__(self, fleet: Fleet, plan: Plan, record: SoakRecord) -> None:
        self.fleet, self.plan, self.record = fleet, plan, record
        self.queue: list[tuple[float, int, str, Callable[[], None]]] = []
        self._order = itertools.count()
        self.down: set[str] = set()     # agents the injector stopped on purpose
        self.removed: set[str] = set()
        self.restart_due: dict[str, float] = {}
        self.broker_stopped = False     # on purpose: a broker-stop fault holds it down
        self.broker_due: float | None = None
        self.rng = random.Random(plan.seed + 1)
        self.registry: Registry | None = None  # the second witness, open for the run

    # --- the queue ---------------------------------------------------------------------------

    def at(self, when: float, what: str, action: Callable[[], None]) -> None:
        heapq.heappush(self.queue, (when, next(self._order), what, action))

    def schedule(self, start: float) -> None:
        for fault in self.plan.faults:
            self.at(start + fault.at, f"{fault.kind.value} {fault.device or ''}",
                    lambda fault=fault: self.begin(fault))  # type: ignore[misc]

    def run_until(self, end: float, *, final: bool = False) -> None:
        """Carry out what is due until ``end``; with ``final``, also every pending end
        action at once (nothing may outlast the fault phase)."""
        while True:
            now = self.fleet.now()
            if self.queue and (self.queue[0][0] <= now or (final and now >= end)):
                _when, _n, what, action = heapq.heappop(self.queue)
                try:
                    action()
                except Exception as exc:  # noqa: BLE001 - one fault failing must not end the run
                    self.record.errors.append(f"{now:.1f}s {what}: {type(exc).__name__}: {exc}")
                    self.fleet.event(f"injector: {what} failed: {exc}")
                continue
            if now >= end:
                return
            self.watch()
            wake = min([end, now + 1.0] + ([self.queue[0][0]] if self.queue else []))
            time.sleep(max(0.05, wake - self.fleet.now()))

    # --- faults ------------------------------------------------------------------------------

    def begin(self, fault: Fault) -> None:
        fleet, kind, device = self.fleet, fault.kind, fault.device
        start = fleet.now()
        self.record.applied[kind.value] += 1
        if device is not None and device in self.removed:
            return
        if kind is FaultKind.OFF_PAST_GRACE:
            how = f" until {fault.hold:.0f}s past expiry + grace"
        elif kind is FaultKind.OFF_PAST_EXPIRY:
            how = f" until {fault.hold:.0%} of the grace past expiry"
        elif kind is FaultKind.CLOCK_FORWARD:
            how = f" {fault.param:g} days ahead for {fault.hold:.0f}s"
        else:
            how = f" for {fault.hold:.0f}s" if fault.hold >= 1 else ""
        fleet.event(f"fault {kind.value}{' ' + device if device else ''}{how}")

        def until(end: float, what: str, action: Callable[[], None]) -> None:
            def done() -> None:
                action()
                self.record.spans.append((start, fleet.now(), kind.value, device))
            self.at(end, what, done)

        if kind is FaultKind.BROKER_STOP or kind is FaultKind.BROKER_STOP_LONG:
            self.broker_stopped = True
            fleet.broker.stop()
            until(start + fault.hold, "broker start", self.start_broker)
        elif kind is FaultKind.BROKER_RESTART:
            fleet.broker.stop()
            self.start_broker()
            self.record.spans.append((start, fleet.now(), kind.value, None))
        elif kind is FaultKind.BROKER_RERENDER:
            self.rerender()
            self.record.spans.append((start, fleet.now(), kind.value, None))
        elif kind is FaultKind.EST_STOP:
            fleet.est.stop()
            until(start + fault.hold, "est-server start", self.start_est)
        elif device is not None:
            self.begin_device(fault, device, start, until)

    def begin_device(self, fault: Fault, device: str, start: float,
                     until: Callable[[float, str, Callable[[], None]], None]) -> None:
        fleet, kind = self.fleet, fault.kind
        agent = fleet.agents[device]
        if kind in REMOVALS:
            # removed whatever the command says: a failure may come after the suspension
            self.removed.add(device)
            try:
                fleet.revoke([device], "revoke-device" if kind is FaultKind.REVOKE
                             else kind.value)
            finally:
                self.record.removed_at[device] = fleet.now()
                self.record.spans.append((start, fleet.now(), kind.value, device))
        elif kind is FaultKind.AGENT_KILL:
            self.kill(device)
            until(start + fault.hold, f"start {device}", lambda: self.start(device))
        elif kind is FaultKind.AGENT_KILL_RENEWING:
            due = _seconds_until(agent.status().get("renew_at"))
            if due is None or due > self.plan.timing.lifetime:
                due = 0.0  # no renewal in sight: an ordinary kill -9
            issued = len(self.registry.issuances(device)) if self.registry else 0
            self.at(start + max(0.0, due - 0.5), f"watch {device} renew",
                    lambda: self._await_renewal(fault, device, start, start + due + 8, issued))
        elif kind is FaultKind.AGENT_SUSPEND:
            process = agent.process
            if process is not None and agent.running():
                process.send_signal(signal.SIGSTOP)
                until(start + fault.hold, f"SIGCONT {device}",
                      lambda: process.send_signal(signal.SIGCONT))
        elif kind is FaultKind.CLOCK_1970 or kind is FaultKind.CLOCK_FORWARD:
            from .fleet import REAL_TIME, set_clock

            clock = fleet.clock_file(device)
            set_clock(clock, RTC_RESET if kind is FaultKind.CLOCK_1970 else f"+{fault.param:g}d")
            until(start + fault.hold, f"clock of {device} set right",
                  lambda: set_clock(clock, REAL_TIME))
        else:  # switched off past expiry or past the grace window (SIGTERM: a clean shutdown)
            self.down.add(device)
            fleet.stop_agents([device])
            expiry = _seconds_until(agent.status().get("cert_not_after"))
            expiry = self.plan.timing.lifetime if expiry is None else max(0.0, expiry)
            grace = self.plan.timing.grace
            back = (fault.hold * grace if kind is FaultKind.OFF_PAST_EXPIRY
                    else grace + fault.hold)
            until(fleet.now() + expiry + back, f"switch {device} on",
                  lambda: self.start(device))

    def _await_renewal(self, fault: Fault, device: str, start: float, deadline: float,
                       issued: int) -> None:
        """Poll until the device's renewal is under way (its status says so, or the EST
        server has just issued to it), then kill it ``fault.param`` seconds later."""
        now = self.fleet.now()
        state = self.fleet.agents[device].status().get("state")
        new = self.registry is not None and len(self.registry.issuances(device)) > issued
        if state in ("renewing", "switching") or new or now >= deadline:
            why = "issued" if new else state
            self.at(now + fault.param, f"kill -9 {device} renewing",
                    lambda: self._kill_renewing(device, start, why))
        else:
            self.at(now + 0.1, f"watch {device} renew",
                    lambda: self._await_renewal(fault, device, start, deadline, issued))

    def _kill_renewing(self, device: str, start: float, why: object) -> None:
        state = self.fleet.agents[device].status().get("state")
        self.kill(device)
        self.fleet.event(f"kill -9 {device} (renewal seen: {why}; state then {state})")
        hold = self.rng.uniform(0.5, 3.0)

        def back() -> None:
            self.start(device)
            self.record.spans.append((start, self.fleet.now(), "agent-kill-renewing", device))
        self.at(self.fleet.now() + hold, f"start {device}", back)

    def kill(self, device: str) -> None:
        self.down.add(device)
        agent = self.fleet.agents[device]
        if agent.running():
            agent.kill()

    def start(self, device: str) -> None:
        self.down.discard(device)
        self.restart_due.pop(device, None)
        if not self.fleet.agents[device].running():
            self.fleet.start_agents([device])

    def start_broker(self) -> None:
        self.broker_stopped, self.broker_due = False, None
        if not self.fleet.broker.process.running():
            self.fleet.broker.start()

    def start_est(self) -> None:
        """Start the EST server again; how long until all its workers listen is a figure."""
        began = time.monotonic()
        self.fleet.est.start(timeout=EST_READY_S)
        self.record.est_starts_s.append(round(time.monotonic() - began, 1))

    def rerender(self) -> None:
        """``broker-config render`` over the running broker's directory, as an operator
        re-rendering after a change would do. Not followed by SIGHUP: a reload drops
        Mosquitto 2.0's offline sessions (broker_config/crl_dir.py); the CRL it
        installs reaches the broker through the hashed CRL directory, and a changed
        configuration takes a restart (README, "Revocation")."""
        from .fleet import BACKEND_ID, BIN

        layout, broker = self.fleet.broker_layout, self.fleet.broker
        result = subprocess.run(
            [str(BIN / "broker-config"), "render", "--pki", str(self.fleet.pki.base),
             "--out", str(layout.base), "--port", str(broker.port),
             "--backend-identity", BACKEND_ID], capture_output=True, text=True, timeout=60,
            check=False)
        if result.returncode != 0:
            raise RuntimeError(f"broker-config render: exit {result.returncode}: "
                               f"{result.stderr.strip()}")

    # --- watchers ----------------------------------------------------------------------------

    def watch(self) -> None:
        """Once a second: agents and a broker that died are started again, as systemd
        would (counted: the run fails on what their deaths lost); removed devices stay out."""
        fleet, now = self.fleet, self.fleet.now()
        broker = fleet.broker.process
        if not self.broker_stopped and not broker.running():
            if self.broker_due is None:
                code = broker.popen.returncode if broker.popen else None
                self.record.broker_crashes.append({"at_s": round(now, 1), "exit": code})
                fleet.event(f"broker exited by itself ({code}): restarting")
                self.broker_due = now + RESTART_S
            elif now >= self.broker_due:
                self.start_broker()
        for device, agent in fleet.agents.items():
            if device in self.down or agent.process is None:
                continue
            if not agent.running():
                if device not in self.restart_due:
                    popen = agent.process.popen
                    code = popen.returncode if popen else None
                    self.record.deaths.append({"device": device, "at_s": round(now, 1),
                                               "exit": code})
                    fleet.event(f"{device} exited by itself ({code}): restarting")
                    self.restart_due[device] = now + RESTART_S
                if now >= self.restart_due[device]:
                    del self.restart_due[device]
                    fleet.start_agents([device])
        for device, removed in self.record.removed_at.items():
            self.watch_removed(device, now - removed)

    def watch_removed(self, device: str, since: float) -> None:
        """A removed device must be off the broker within CUT_OFF_S and never accepted
        again: the broker's own log says whom it accepted (queued messages the monitor
        receives after the removal are not a reconnection)."""
        if device in self.record.revoked_reconnected:
            return
        if device not in self.record.cut_marks:
            status = self.fleet.status(device)
            if not (status.get("connected") and status.get("running")) and since >= 1.0:
                self.record.cut_marks[device] = self.fleet.broker.process.log_offset()
            elif since > CUT_OFF_S:
                self.record.revoked_reconnected.add(device)  # never cut off
            return
        accepted = f" as {device} ("
        log = self.fleet.broker.process.log_since(self.record.cut_marks[device])
        if any("New client connected" in line and accepted in line
               for line in log.splitlines()):
            self.fleet.event(f"{device} is back on the broker after its removal")
            self.record.revoked_reconnected.add(device)


def _seconds_until(iso: object) -> float | None:
    if not isinstance(iso, str):
        return None
    return (dt.datetime.fromisoformat(iso) - dt.datetime.now(dt.UTC)).total_seconds()


def _valid_and_connected(_id: str, status: dict[str, Any]) -> bool:
    left = _seconds_until(status.get("cert_not_after"))
    return bool(status.get("connected")) and left is not None and left > 0


def last_status(status: dict[str, Any]) -> dict[str, Any]:
    """What a stranded device's report entry shows of its status."""
    keys = ("running", "state", "why", "connected", "generation", "cert_not_after",
            "time_source", "clock_offset_s", "outbox_depth", "last_seq")
    shown = {key: status.get(key) for key in keys}
    shown["errors"] = list(status.get("errors") or [])[-3:]
    return shown


def run_soak(fleet: Fleet, plan: Plan) -> tuple[Findings, SoakRecord]:
    """Boot, the faults, the settle phase, the check for stranded devices, the drain."""
    found, record = Findings(), SoakRecord()
    fleet.start_sampling()
    record.wall0 = time.time() - fleet.now()
    stack = contextlib.ExitStack()
    try:
        enroll_storm(fleet, found)
        if not found.not_enrolled:
            injector = Injector(fleet, plan, record)
            injector.registry = stack.enter_context(open_registry(fleet.est.registry_path))
            record.faults_started = fleet.now()
            injector.schedule(record.faults_started)
            fleet.event(f"soak: {len(plan.faults)} faults over {plan.timing.faults_end:.0f}s "
                        f"(seed {plan.seed})")
            injector.run_until(record.faults_started + plan.timing.faults_end)
            injector.run_until(fleet.now(), final=True)
            record.settle_started = fleet.now()
            fleet.event(f"settle: {plan.timing.settle:.0f}s without faults")
            injector.run_until(record.faults_started + plan.timing.duration)
            found.revoked.extend(record.removed_at)
            _met, late = fleet.wait_all(found.active(fleet), _valid_and_connected, 5)
            record.stranded = {d: last_status(fleet.status(d)) for d in late}
            injector.watch()
            found.revoked_disconnected.extend(d for d in record.removed_at
                                              if d not in record.revoked_reconnected)
    finally:
        stack.close()
        for device, agent in fleet.agents.items():  # nothing may stay stopped
            if agent.running() and agent.process is not None:
                agent.process.send_signal(signal.SIGCONT)
            if not agent.running() and device not in found.not_enrolled:
                fleet.start_agents([device])
        if not fleet.broker.process.running():
            fleet.broker.start()
        if not fleet.est.running():
            fleet.est.start()
    finish(fleet, found)
    return found, record


def issuances(fleet: Fleet) -> dict[str, Counter[str]]:
    """The registry's issuances per device, by kind: the second witness."""
    with open_registry(fleet.est.registry_path) as registry:
        rows = registry.issuances()
    counted: dict[str, Counter[str]] = defaultdict(Counter)
    for row in rows:
        counted[row.device_id][row.kind.value] += 1
    return counted


def issuance_times(fleet: Fleet, wall0: float) -> list[float]:
    with open_registry(fleet.est.registry_path) as registry:
        return [dt.datetime.fromisoformat(row.at).timestamp() - wall0
                for row in registry.issuances()]


def est_requests(fleet: Fleet) -> Counter[str]:
    """Requests each device made of the EST server, from the audit log (one row each)."""
    with open_registry(fleet.est.registry_path) as registry:
        log = registry.audit_log(limit=10_000_000)
    return Counter(e.device_id for e in log
                   if e.device_id and e.action in ("simpleenroll", "simplereenroll", "recovery"))


def soak_report(fleet: Fleet, plan: Plan, record: SoakRecord, watch: CRLWatch,
                refresher: CRLRefresher, report: dict[str, Any]) -> dict[str, Any]:
    """The soak's keys added to the ordinary report, and the verdict."""
    issued = issuances(fleet)
    run_s = fleet.now() - record.faults_started + 10
    justified = {d: justified_issuances(plan, d, run_s) for d in fleet.agents}
    counts = {d: sum(issued.get(d, Counter()).values()) for d in fleet.agents}
    over = {d: (n, justified[d]) for d, n in counts.items() if n > justified[d]}
    requests = est_requests(fleet)
    figures = Figures(
        messages_lost=report["messages_lost"], stranded=tuple(sorted(record.stranded)),
        revoked_reconnected=tuple(sorted(record.revoked_reconnected)),
        crl_lapsed_s=round(watch.lapsed_s, 1), over_issued=over,
        not_enrolled=tuple(d for d in fleet.agents if d not in issued))
    failures = list(report["failures"])  # its lost-messages line names the devices
    failures += [v for v in violations(figures) if "message(s) lost" not in v]
    failures += [f"operator or injector command failed: {e}" for e in record.errors]
    soak = {
        "seed": plan.seed,
        "soak_duration_s": plan.timing.duration,
        "settle_s": plan.timing.settle,
        "crl_lifetime_s": plan.timing.crl_lifetime,
        "crl_refresh_period_s": plan.timing.crl_refresh,
        "crl_refresh_runs": refresher.runs,
        "crl_refresh_failures": refresher.failures,
        "recovery_grace_s": plan.timing.grace,
        "faults_started_s": round(record.faults_started, 1),
        "settle_started_s": round(record.settle_started, 1),
        "faults": dict(record.applied),
        "faults_planned": plan.counts(),
        "issuances_per_device_max": max(counts.values(), default=0),
        "issuances_expected_max": max(justified.values(), default=0),
        "issuances_by_kind": dict(sum(issued.values(), Counter())),
        "issuances_per_device": {d: dict(issued.get(d, Counter())) for d in fleet.agents},
        "est_requests_per_device_max": max(requests.values(), default=0),
        "stranded_devices": record.stranded,
        "revoked_devices": sorted(record.removed_at),
        "revoked_reconnected": sorted(record.revoked_reconnected),
        "crl_lapsed_s": figures.crl_lapsed_s,
        "lost_seqs": lost_seqs(fleet, report),
        "monitor_unparsed": fleet.monitor.unparsed_count,
        "monitor_unparsed_lines": fleet.monitor.unparsed,
        "crl_lapses": [[round(a, 1), round(b, 1)] for a, b in watch.windows],
        "agent_deaths": record.deaths,
        "broker_crashes": record.broker_crashes,
        "monitor_restarts": fleet.monitor.restarts,
        "est_restart_s_max": max(record.est_starts_s, default=None),
        "crl_file_lapsed_s": round(watch.file_lapsed_s, 1),
    }
    merged = {**report, **soak, "messages_lost": report["messages_lost"],
              "messages_duplicate": report["messages_duplicate"]}
    merged["fault_spans"] = [[round(a, 1), round(b, 1), kind, device]
                             for a, b, kind, device in record.spans]
    merged["failures"] = failures
    return merged


def lost_seqs(fleet: Fleet, report: dict[str, Any]) -> dict[str, list[list[Any]]]:
    """Per device, the first sequence numbers the monitor never saw that are not queued,
    each as [seq, arrival of seq - 1, arrival of seq + 1] in fleet seconds: where in the
    run's faults the message went missing."""
    if not report["messages_lost"]:
        return {}
    from .report import queued_seqs

    def arrived(device: str, seq: int) -> float | None:
        at = fleet.monitor.arrival(device, seq)
        return None if at is None else round(at - fleet.t0, 1)

    lost = {}
    for device, agent in fleet.agents.items():
        last = agent.status().get("last_seq") or 0
        missing = set(fleet.monitor.missing(device, 1, last))
        gone = sorted(missing - queued_seqs(agent.config.paths.state_dir))
        if gone:
            lost[device] = [[seq, arrived(device, seq - 1), arrived(device, seq + 1)]
                            for seq in gone[:20]]
    return lost


def crl_refresher(fleet: Fleet, period: float) -> CRLRefresher:
    return CRLRefresher(service_commands(fleet.pki.base, fleet.broker_layout.base), period,
                        fleet.directory / "crl-refresh.log")


def crl_watch(fleet: Fleet) -> CRLWatch:
    cert, key = fleet.backend
    return CRLWatch(fleet.broker_layout.crl, lambda: fleet.broker.process.running(), fleet.now,
                    probe=crl_probe(fleet.broker.port, fleet.pki.server_trust, cert, key))


def soak_options(args: Any, timing: Timing, soak_plan: Plan) -> FleetOptions:
    from .fleet import FleetOptions

    budget = daily_budget(soak_plan)
    return FleetOptions(args.devices, timing.lifetime, args.interval,
                        recovery_grace=f"{timing.grace}s", keystore=args.keystore,
                        crl_lifetime_s=timing.crl_lifetime, recoveries_per_day=budget,
                        bootstrap_reenrolls_per_day=budget, faketime=True)


def main_soak(args: Any, directory: Path) -> bool:
    """``fleet-sim --scenario soak``: the run, its report, plot and verdict; True if it passed."""
    from .fleet import Fleet, device_ids
    from .report import build_report, print_table, write_json

    timing = Timing.for_run(args.duration, args.devices, args.lifetime)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    soak_plan = plan(seed, device_ids(args.devices), timing)
    replay = replay_command(soak_plan, args.lifetime,
                            args.interval if args.interval != 1.0 else None, args.keystore)
    print(f"soak: seed {seed}, {len(soak_plan.faults)} faults planned, certificates "
          f"{timing.lifetime}s, CRL {timing.crl_lifetime}s refreshed every "
          f"{timing.crl_refresh:g}s, grace {timing.grace}s; replay: {replay}", flush=True)
    with Fleet(directory, soak_options(args, timing, soak_plan)) as fleet, \
            crl_refresher(fleet, timing.crl_refresh) as refresher, crl_watch(fleet) as watch:
        found, record = run_soak(fleet, soak_plan)
        report = soak_report(fleet, soak_plan, record, watch, refresher,
                             build_report(fleet, found, "soak", mode=args.keystore))
        issued_at = issuance_times(fleet, record.wall0)
        print_table({k: v for k, v in report.items()
                     if k not in ("issuances_per_device", "fault_spans", "stranded_devices",
                                  "agent_deaths", "crl_lapses", "broker_crashes",
                                  "monitor_unparsed_lines")})
        if args.json:
            write_json(report, args.json)
        if args.plot:
            from .soak_plot import write_soak_plot

            write_soak_plot(fleet, report, issued_at, args.plot)
    for device, status in report["stranded_devices"].items():
        print(f"stranded {device}: {json.dumps(status)}")
    if report["failures"]:
        print(f"soak FAILED with seed {seed}; replay it with:\n  {replay}", flush=True)
    return not report["failures"]
