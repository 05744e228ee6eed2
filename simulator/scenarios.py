"""The fleet's scenarios: one function each, all recording into one ``Findings``.

Every scenario starts with the enrollment storm (a fleet must boot before
anything else happens) and ends with ``finish``: SIGTERM to every agent, which
drains its outbox, then the monitor is given time to see the last messages.
"""

from __future__ import annotations

import collections
import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from device_agent.errors import IdentityError

if TYPE_CHECKING:
    from .fleet import Fleet


@dataclass
class Findings:
    cold_starts: dict[str, float] = field(default_factory=dict)
    not_enrolled: list[str] = field(default_factory=list)
    reconnect_all_s: float | None = None
    reconnects_per_s_peak: int | None = None  # the broker's busiest second of the storm
    not_reconnected: list[str] = field(default_factory=list)
    not_renewed: list[str] = field(default_factory=list)
    offline: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    not_recovered: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    revoked_disconnected: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    final: dict[str, dict[str, Any]] = field(default_factory=dict)
    connected_at_end: int = 0

    def active(self, fleet: Fleet) -> list[str]:
        return [d for d in fleet.agents if d not in self.revoked]


def _connected(_id: str, status: dict[str, Any]) -> bool:
    return bool(status.get("connected"))


def enroll_storm(fleet: Fleet, found: Findings) -> None:
    """Every device boots at once: EST enrollment with the bootstrap identity, then MQTT."""
    fleet.event(f"enroll storm: {len(fleet.agents)} agents start at once")
    fleet.start_agents(fleet.agents)
    met, late = fleet.wait_all(fleet.agents, _connected, 60 + 1.5 * len(fleet.agents))
    for device_id, status in met.items():
        since = (status.get("link") or {}).get("connected_since") or time.time()
        found.cold_starts[device_id] = since - fleet.started_wall[device_id]
    found.not_enrolled.extend(late)
    if late:
        found.failures.append(f"enroll-storm: {len(late)} device(s) never connected: {late[:5]}")
    fleet.event(f"all {len(met)} enrolled and connected")


def steady(fleet: Fleet, found: Findings, seconds: float = 12.0) -> None:
    """Telemetry for a while; every active device must deliver some."""
    before = {d: fleet.monitor.count(d) for d in found.active(fleet)}
    fleet.event(f"steady: {seconds:.0f}s of telemetry")
    time.sleep(seconds)
    silent = [d for d, n in before.items() if fleet.monitor.count(d) <= n]
    if silent:
        found.failures.append(f"steady: {len(silent)} device(s) delivered nothing: {silent[:5]}")


def broker_restart(fleet: Fleet, found: Findings) -> None:
    """Stop and start Mosquitto; the time until every device is back is ``reconnect_all_s``."""
    active = found.active(fleet)
    fleet.event("broker restart")
    down = time.time()
    fleet.broker.restart()
    back = time.time()
    fleet.event("broker back: reconnect storm")

    def reconnected(_id: str, status: dict[str, Any]) -> bool:
        # since the stop: a device may be back before restart() has seen the port open
        since = (status.get("link") or {}).get("connected_since")
        return bool(status.get("connected") and since and since >= down)

    met, late = fleet.wait_all(active, reconnected, 60 + len(active))
    if met:
        times = [s["link"]["connected_since"] for s in met.values()]
        found.reconnect_all_s = max(0.0, max(times) - back)
        per_second = collections.Counter(int(t) for t in times)
        found.reconnects_per_s_peak = max(per_second.values())
    found.not_reconnected.extend(late)
    if late:
        found.failures.append(f"broker-restart: {len(late)} never reconnected: {late[:5]}")
    fleet.event(f"{len(met)} reconnected in {found.reconnect_all_s or 0:.1f}s, at most "
                f"{found.reconnects_per_s_peak or 0} in one second")


def rotation_wave(fleet: Fleet, found: Findings) -> None:
    """Short lifetimes: every active device renews (a fresh TPM key) while telemetry flows."""
    active = found.active(fleet)
    generation = {d: fleet.status(d).get("generation") or 0 for d in active}
    fleet.event(f"rotation wave: waiting for {len(active)} renewals")

    def renewed(device_id: str, status: dict[str, Any]) -> bool:
        return bool((status.get("generation") or 0) > generation[device_id]
                    and status.get("connected"))

    met, late = fleet.wait_all(active, renewed, 1.5 * fleet.options.lifetime_s + 30)
    found.not_renewed.extend(late)
    if late:
        found.failures.append(f"rotation-wave: {len(late)} did not renew: {late[:5]}")
    fleet.event(f"{len(met)} renewed")


def _pick(ids: list[str], share: float, avoid: list[str]) -> list[str]:
    pool = [d for d in ids if d not in avoid] or ids
    count = max(1, round(share * len(ids)))
    stride = max(1, len(pool) // count)
    return pool[::stride][:count]


def offline_expiry(fleet: Fleet, found: Findings, share: float = 0.2) -> None:
    """A share of devices stops until its certificates have expired, then comes back."""
    chosen = _pick(found.active(fleet), share, [])
    before = {d: fleet.status(d) for d in chosen}
    found.offline.extend(chosen)
    fleet.event(f"offline: {len(chosen)} agent(s) stopped (SIGTERM)")
    fleet.stop_agents(chosen)
    after = {d: fleet.status(d) for d in chosen}  # the status written on the way out
    expiry = max(dt.datetime.fromisoformat(s["cert_not_after"]) for s in after.values())
    while dt.datetime.now(dt.UTC) < expiry + dt.timedelta(seconds=2):
        time.sleep(0.5)
    fleet.event(f"offline devices return, certificates expired {len(chosen)}x")
    fleet.start_agents(chosen)
    gens = {d: (after[d].get("generation") or before[d].get("generation") or 0) for d in chosen}

    def back(device_id: str, status: dict[str, Any]) -> bool:
        return bool((status.get("generation") or 0) > gens[device_id] and status.get("connected"))

    met, late = fleet.wait_all(chosen, back, 60 + 2 * len(chosen))
    found.recovered.extend(sorted(met))
    found.not_recovered.extend(late)
    if late:
        found.failures.append(f"offline-expiry: {len(late)} did not recover: {late[:5]}")
    fleet.event(f"{len(met)} of {len(chosen)} recovered")


def revocation(fleet: Fleet, found: Findings, share: float = 0.1,
               stay_out_s: float = 10.0) -> None:
    """Revoke some devices mid-run: they must be cut off at once and stay out."""
    chosen = _pick(found.active(fleet), share, found.offline)
    fleet.event(f"revoke {len(chosen)} device(s)")
    seconds = fleet.revoke(chosen)
    found.revoked.extend(chosen)
    fleet.event(f"revoked and enforced in {seconds:.1f}s")
    cut, still = fleet.wait_all(chosen, lambda _i, s: not s.get("connected"), 15)
    marks = {d: (fleet.monitor.count(d), (s.get("link") or {}).get("connects")) for d, s in
             cut.items()}
    time.sleep(stay_out_s)
    for device_id, (count, connects) in marks.items():
        status = fleet.status(device_id)
        link = status.get("link") or {}
        if (not status.get("connected") and link.get("connects") == connects
                and fleet.monitor.count(device_id) == count):
            found.revoked_disconnected.append(device_id)
    stayed = [d for d in chosen if d not in found.revoked_disconnected]
    if stayed or still:
        found.failures.append(f"revocation: {len(stayed)} revoked device(s) connected again "
                              f"or never cut off: {stayed[:5]}")
    fleet.event(f"{len(found.revoked_disconnected)} of {len(chosen)} stayed out")


def finish(fleet: Fleet, found: Findings) -> None:
    """SIGTERM every agent (they drain); let the monitor see the last messages."""
    connected, _ = fleet.wait_all(found.active(fleet), _connected, 15)
    found.connected_at_end = len(connected)
    fleet.event("SIGTERM to every agent: drain and stop")
    fleet.stop_agents(list(fleet.agents))
    found.final = {d: fleet.status(d) for d in fleet.agents}
    active = found.active(fleet)

    def complete() -> bool:
        return all(not fleet.monitor.missing(d, 1, found.final[d].get("last_seq") or 0)
                   for d in active)

    fleet.monitor.wait_until(complete, 15)
    fleet.event("stopped")


Scenario = Callable[["Fleet", Findings], None]
SCENARIOS: dict[str, list[Scenario]] = {
    "enroll-storm": [lambda f, r: steady(f, r, 5)],
    "steady": [steady],
    "broker-restart": [lambda f, r: steady(f, r, 5), broker_restart,
                       lambda f, r: steady(f, r, 5)],
    "rotation-wave": [rotation_wave],
    "offline-expiry": [offline_expiry],
    "revocation": [lambda f, r: steady(f, r, 5), revocation],
    "full": [steady, broker_restart, rotation_wave, offline_expiry, revocation],
}


def run(fleet: Fleet, name: str) -> Findings:
    """Boot (the enrollment storm), the scenario's phases, then the drain; always finishes."""
    found = Findings()
    fleet.start_sampling()
    try:
        enroll_storm(fleet, found)
        if not found.not_enrolled:
            for phase in SCENARIOS[name]:
                phase(fleet, found)
    except IdentityError as exc:  # a component or the revocation path failed: report it
        found.failures.append(f"{name}: {exc}")
        fleet.event(f"scenario aborted: {exc}")
    finish(fleet, found)
    return found
