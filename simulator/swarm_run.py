"""``fleet-sim --swarm N``: N simulated devices in this one process against the real back office.

SIMULATION ONLY: software keys in files, no device-agent process, no TPM, no key
attestation; bootstrap certificates come straight from the Factory CA (the swarm skips
the factory line) and are registered in bulk. The back office is the fleet's (the
est-server process, Mosquitto rendered by ``broker-config render``), with the broker
rendered for ``--monitors`` back-end subscribers sharing the telemetry subscription and
a queue per session large enough that the monitor is not the limit. Every output says
``simulation``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from device_agent.lifecycle import ReconnectPolicy
from provisioning import pki
from provisioning.factory import BOOTSTRAP_LIFETIME
from provisioning.registry import open_registry

from .fleet import BACKEND_ID, MAX_FILE_DEVICES, Fleet, FleetOptions, run_in_work_directory, step
from .observe import TimedMonitor
from .report import percentile, write_json
from .swarm import (
    CLIENT_LOG,
    SwarmDevice,
    SwarmSettings,
    SwarmStats,
    bootstrap_identity,
    run_swarm,
)
from .swarm_observe import CPUSampler, MonitorGroup, children, dropped_for

MONITOR_TOPICS = ("devices/<id>/telemetry, one persistent subscription per device, the devices "
                  "dealt over the subscribers")
SWARM_SCENARIOS = ("steady", "broker-restart")
QUIET_S = 5.0
MAX_QUEUED = 1_000_000  # per back-end session: far above what a run's backlog can reach
SIMULATION = "SIMULATION: swarm devices with software keys in files, no TPM, no agent process"


@dataclasses.dataclass(frozen=True)
class SwarmOptions:
    devices: int
    scenario: str
    duration_s: float = 20.0
    lifetime_s: int = 30
    interval_s: float = 1.0
    monitors: int = 4
    reconnect_window: float | None = None
    est_threads: int = 8
    connect_threads: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= MAX_FILE_DEVICES:
            raise ValueError(f"--swarm must be 1-{MAX_FILE_DEVICES}")
        if self.scenario not in SWARM_SCENARIOS:
            raise ValueError(f"--swarm runs {' or '.join(SWARM_SCENARIOS)}")
        if not 1 <= self.monitors <= 64:
            raise ValueError("--monitors must be 1-64")


class SwarmFleet(Fleet):
    """The fleet's back office with a monitor of several subscribers and swarm devices.

    Each subscriber has an identity of its own (``backend``, ``backend-2``..: the client ID
    is the certificate's CN) and a persistent subscription to its share of the devices'
    telemetry topics. An MQTT 5 shared subscription (``$share/monitor/devices/+/telemetry``)
    was tried first: across a broker restart it lost the messages devices published
    between the broker's start and the subscribers' return (one per device in a 20-device
    run), which persistent per-topic subscriptions keep for them.
    """

    def __init__(self, directory: Path, options: SwarmOptions) -> None:
        super().__init__(directory, FleetOptions(options.devices, options.lifetime_s,
                                                 options.interval_s, keystore="file"))
        self.swarm_options = options
        self.stats = SwarmStats()
        self.devices: list[SwarmDevice] = []
        self.monitors = MonitorGroup([])
        self.wall0 = time.time()

    def __enter__(self) -> SwarmFleet:
        super().__enter__()
        return self

    def broker_limits(self) -> dict[str, Any]:
        return {"backend_workers": self.swarm_options.monitors, "max_queued_messages": MAX_QUEUED}

    def _start_monitor(self, port: int, cert: Path, key: Path) -> TimedMonitor:
        names = [BACKEND_ID, *(f"{BACKEND_ID}-{n}"
                               for n in range(2, self.swarm_options.monitors + 1))]
        ids = swarm_ids(self.swarm_options.devices)
        for index, name in enumerate(names):
            cert, key = self._backend_files(name) if name != BACKEND_ID else (cert, key)
            topics = [f"devices/{d}/telemetry" for d in ids[index::len(names)]]
            monitor = TimedMonitor(port=port, cafile=self.pki.server_trust, cert=cert, key=key,
                                   topic=topics[0], client_id=name)
            for topic in topics[1:]:  # one SUBSCRIBE with every topic of its range
                monitor.argv += ["-t", topic]
            self.monitors.monitors.append(self.enter_context(monitor))
        return self.monitors.monitors[0]

    def _devices(self) -> None:
        started = time.monotonic()
        options = self.swarm_options
        policy = ReconnectPolicy() if options.reconnect_window is None else ReconnectPolicy(
            window=options.reconnect_window, cap=max(10.0, options.reconnect_window))
        settings = SwarmSettings(est_url=self.est.base_url, broker_port=self.broker.port,
                                 server_trust=self.pki.server_trust,
                                 interval_s=options.interval_s, reconnect=policy)
        factory = pki.read_authority(self.pki.factory_ca)
        with open_registry(self.est.registry_path) as registry, registry.transaction():
            for device_id in swarm_ids(options.devices):
                directory = self.directory / "swarm" / device_id
                bootstrap = bootstrap_identity(directory, factory, device_id, BOOTSTRAP_LIFETIME)
                registry.register_device(device_id, bootstrap.certificate)
                self.devices.append(SwarmDevice(device_id, directory, bootstrap, settings,
                                                self.stats))
        step(f"{SIMULATION}: {len(self.devices)} bootstrap certificates issued by the Factory "
             f"CA directly and registered in one transaction (the factory line skipped) in "
             f"{time.monotonic() - started:.1f}s")


def swarm_ids(count: int) -> list[str]:
    return [f"swarm-{index + 1:05d}" for index in range(count)]


class SwarmLoop:
    """The swarm's asyncio loop in a thread of its own; the scenario runs in the caller's."""

    def __init__(self, fleet: SwarmFleet) -> None:
        self.fleet = fleet
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="swarm", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        self._ready.set()
        options = self.fleet.swarm_options
        await run_swarm(self.fleet.devices, self._stop, options.est_threads,
                        options.connect_threads)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self, timeout: float = 60.0) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)


@dataclasses.dataclass
class Run:
    """What the scenario measured, beside the stats the devices keep."""

    marks: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds since t0
    failures: list[str] = dataclasses.field(default_factory=list)
    backlog_peak: int = 0
    reconnect_all_s: float | None = None
    reconnects_per_s: float | None = None
    reconnects_per_s_peak: int | None = None
    not_reconnected: int = 0
    drain_s: float | None = None     # the monitor's last message, seconds after the stop
    complete: bool = False
    not_connected_by_phase: dict[str, int] = dataclasses.field(default_factory=dict)


def acked(fleet: SwarmFleet) -> int:
    return sum(d.last_seq - len(d.unacked) for d in fleet.devices)


def wait_for(fleet: SwarmFleet, run: Run, condition: Any, timeout: float) -> bool:
    """Poll ``condition()`` each second, noting the monitor's backlog (acknowledged by the
    broker, not yet seen by the monitor)."""
    deadline = time.monotonic() + timeout
    while True:
        run.backlog_peak = max(run.backlog_peak, acked(fleet) - fleet.monitors.received)
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(1.0, max(0.05, deadline - time.monotonic())))


def scenario(fleet: SwarmFleet, loop: SwarmLoop, run: Run) -> None:
    options, stats, count = fleet.swarm_options, fleet.stats, len(fleet.devices)
    fleet.event(f"enroll storm: {count} swarm devices start at once")
    loop.start()
    if not wait_for(fleet, run, lambda: len(stats.connected) >= count, 60 + count / 20):
        run.failures.append(f"enroll storm: {count - len(stats.connected)} never connected")
    run.marks["enrolled"] = fleet.now()
    fleet.event(f"{len(stats.enrolled_at)} enrolled, {len(stats.connected)} connected")
    wait_for(fleet, run, lambda: False, options.duration_s)
    run.marks["steady"] = fleet.now()
    if options.scenario == "broker-restart":
        broker_restart(fleet, run)
        run.marks["reconnected"] = fleet.now()
        wait_for(fleet, run, lambda: False, 5)
    # a device renewing right now is between two connections for a moment: give it time
    wait_for(fleet, run, lambda: len(stats.connected) >= count, 15)
    run.marks["connected_at_end"] = len(stats.connected)
    run.not_connected_by_phase = dict(collections.Counter(
        d.phase for d in fleet.devices if d.device_id not in stats.connected))
    fleet.event("stop: every device drains what is unacknowledged and disconnects")
    loop.stop()
    run.marks["stopped"] = fleet.now()
    started = time.monotonic()

    seen = [fleet.monitors.received, time.monotonic()]

    def complete() -> bool:
        return all(set(fleet.monitors.missing(d.device_id, d.last_seq)) <= set(d.unacked)
                   for d in fleet.devices)

    def quiet() -> bool:  # nothing new for QUIET_S: what is missing is not coming
        if fleet.monitors.received != seen[0]:
            seen[:] = [fleet.monitors.received, time.monotonic()]
        return time.monotonic() - seen[1] >= QUIET_S

    wait_for(fleet, run, lambda: complete() or quiet(), 120)
    run.drain_s = round(seen[1] - started, 2)
    run.complete = complete()
    fleet.event(f"monitor {'complete' if run.complete else 'quiet, messages missing'}: "
                f"its last message {run.drain_s}s after the stop")


def broker_restart(fleet: SwarmFleet, run: Run) -> None:
    count = len(fleet.devices)
    fleet.event("broker restart")
    down = time.time()
    fleet.broker.restart()
    back = time.time()
    run.marks["broker_back"] = fleet.now()
    fleet.event("broker back: reconnect storm")
    since = fleet.stats.connected_since

    def all_back() -> bool:
        return sum(1 for d in fleet.devices if since.get(d.device_id, 0.0) >= down) >= count

    wait_for(fleet, run, all_back, 60 + count / 20)
    times = [since[d.device_id] for d in fleet.devices if since.get(d.device_id, 0.0) >= down]
    run.not_reconnected = count - len(times)
    if times:
        run.reconnect_all_s = round(max(0.0, max(times) - back), 3)
        run.reconnects_per_s = round(len(times) / max(run.reconnect_all_s, 0.001), 1)
        run.reconnects_per_s_peak = max(collections.Counter(int(t) for t in times).values())
    if run.not_reconnected:
        run.failures.append(f"broker-restart: {run.not_reconnected} never reconnected")
    fleet.event(f"{len(times)} reconnected in {run.reconnect_all_s}s")


def _rate(count: int, seconds: float | None) -> float | None:
    return round(count / seconds, 1) if seconds else None


def build_report(fleet: SwarmFleet, run: Run, sampler: CPUSampler) -> dict[str, Any]:
    options, stats = fleet.swarm_options, fleet.stats
    sent = lost = queued = 0
    lost_by_device: dict[str, int] = {}
    lost_examples: list[str] = []
    for device in fleet.devices:
        sent += device.last_seq
        missing = set(fleet.monitors.missing(device.device_id, device.last_seq))
        queued += len(missing & set(device.unacked))
        if missing - set(device.unacked):
            lost_by_device[device.device_id] = len(missing - set(device.unacked))
            lost_examples.extend(f"{device.device_id}:{n}"
                                 for n in sorted(missing - set(device.unacked)))
    unseen = sum(lost_by_device.values())
    dropped = [c for c in dropped_for(fleet.broker.process.log)
               if c == BACKEND_ID or c.startswith(f"{BACKEND_ID}-")]
    lost = 0 if dropped else unseen  # the broker dropped for the monitor: not the devices' loss
    received = fleet.monitors.unique_received()
    enroll_times = sorted(stats.enrolled_at.values())
    enroll_span = (enroll_times[-1] - fleet.wall0) if enroll_times else None
    storm = [t for t in stats.connects if t <= fleet.wall0 + run.marks.get("enrolled", 0)]
    failures = list(run.failures)
    if stats.crashed:
        failures.append(f"{stats.crashed} swarm device(s) crashed: {stats.errors[:3]}")
    if len(stats.enrolled_at) < len(fleet.devices):
        failures.append(f"{len(fleet.devices) - len(stats.enrolled_at)} never enrolled")
    if lost:
        failures.append(f"{lost} message(s) lost: {lost_examples[:10]}")
    steady = (run.marks.get("enrolled", 0.0), run.marks.get("steady", 0.0))
    renewals = len(stats.renewals)
    peaks = sampler.peaks()
    return {
        "simulation": True,
        "mode": "swarm",
        "keys": "file (SIMULATION ONLY: software keys, no TPM, no key attestation)",
        "factory_line": "skipped: bootstrap certificates issued by the Factory CA directly",
        "scenario": options.scenario,
        "devices": len(fleet.devices),
        "enrolled": len(stats.enrolled_at),
        "connected": run.marks.get("connected_at_end", 0),
        "not_connected_at_end_by_phase": run.not_connected_by_phase,
        "sent": sent,
        "received": received,
        "lost": lost,
        "duplicates": fleet.monitors.received - received,
        "queued_at_end": queued,
        "lost_examples": lost_examples[:20],
        "enroll_all_s": round(enroll_span, 2) if enroll_span else None,
        "enrollments_per_s": _rate(len(enroll_times), enroll_span),
        "connects_per_s": _rate(len(storm), (max(storm) - fleet.wall0) if storm else None),
        "cold_start_p95_s": percentile([t - fleet.wall0 for t in enroll_times], 0.95),
        "renewals": renewals,
        "renewals_per_s": _rate(renewals, steady[1] - steady[0]),
        "reconnect_all_s": run.reconnect_all_s,
        "reconnects_per_s_after_restart": run.reconnects_per_s,
        "reconnects_per_s_peak": run.reconnects_per_s_peak,
        "connect_failures": stats.connect_failures,
        "connect_failure_kinds": dict(stats.failure_kinds.most_common(8)),
        "est_failures": stats.est_failures,
        "loop_errors": stats.loop_errors,
        "mqtt_client_log": dict(CLIENT_LOG.counts.most_common(8)),
        "broker_rss_mb_peak": round(sampler.rss_peak.get("mosquitto", 0.0), 1),
        "swarm_rss_mb_peak": round(sampler.rss_peak.get("swarm", 0.0), 1),
        "broker_cpu_pct": {"enroll": sampler.between(0, steady[0]).get("mosquitto"),
                           "steady": sampler.between(*steady).get("mosquitto"),
                           "peak": peaks.get("mosquitto")},
        "est_server_cpu_pct": {"enroll": sampler.between(0, steady[0]).get("est-server"),
                               "steady": sampler.between(*steady).get("est-server"),
                               "peak": peaks.get("est-server")},
        "cpu_pct_steady": sampler.between(*steady),
        "cpu_pct_peak": peaks,
        "saturated_first": sampler.saturated_first(),
        "monitor": {"subscribers": len(fleet.monitors.monitors), "topics": MONITOR_TOPICS,
                    "restarts": fleet.monitors.restarts(),
                    "backlog_peak_messages": run.backlog_peak,
                    "caught_up_after_stop_s": run.drain_s,
                    "broker_dropped_for": dropped,
                    "fell_behind": bool(dropped),
                    "unseen_while_behind": unseen if dropped else 0},
        "certificate_lifetime_s": options.lifetime_s,
        "telemetry_interval_s": options.interval_s,
        "duration_s": round(fleet.now(), 1),
        "events": [{"at_s": round(at, 2), "event": label} for at, label in fleet.events],
        "errors": stats.errors,
        "failures": failures,
    }


def raise_file_limit() -> int:
    """The soft limit on open files up to the hard one (Mosquitto, started from here,
    inherits it); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def print_summary(report: dict[str, Any]) -> None:
    print(f"fleet-sim --swarm {report['devices']} {report['scenario']} ({SIMULATION})")
    for key, value in report.items():
        if key not in ("events", "errors", "failures"):
            print(f"  {key:<32} {'-' if value is None else value}")
    for failure in report["failures"]:
        print(f"FAIL {failure}")
    print("PASS" if not report["failures"] else f"FAILED ({len(report['failures'])})")


def main_swarm(args: argparse.Namespace) -> int:
    try:
        if args.keystore != "file":
            raise ValueError("--swarm needs --keystore file: swarm devices have software keys")
        options = SwarmOptions(
            args.swarm, args.scenario, 20.0 if args.duration is None else args.duration,
            args.lifetime or max(30, args.swarm // 10), args.interval, args.monitors,
            args.reconnect_window)
    except ValueError as exc:
        print(f"fleet-sim: {exc}", file=sys.stderr)
        return 2
    limit = raise_file_limit()
    need = options.devices + options.monitors + 100
    if limit < need:
        print(f"fleet-sim: open files limited to {limit}, the swarm needs about {need}",
              file=sys.stderr)
        return 2
    step(f"{SIMULATION} (open files: {limit})")

    def swarm(directory: Path) -> bool:
        with SwarmFleet(directory, options) as fleet:
            fleet.wall0 = time.time()
            fleet.t0 = time.monotonic()
            run = Run()
            groups = {"mosquitto": lambda: [fleet.broker.process.pid],
                      "est-server": lambda: [fleet.est.process.pid,
                                             *children(fleet.est.process.pid)],
                      "swarm": lambda: [os.getpid()], "monitors": fleet.monitors.pids}
            with CPUSampler(groups, fleet.t0) as sampler:
                scenario(fleet, SwarmLoop(fleet), run)
            report = build_report(fleet, run, sampler)
        print_summary(report)
        if args.json:
            write_json(report, args.json)
        return not report["failures"]

    return run_in_work_directory("fleet-swarm-", args.keep, swarm)
