"""Fleet identity health from the registry: what ``device-pki report`` prints.

Read-only queries over the registry's connection, kept to portable SQL (no
window functions, no date arithmetic in SQL: the cut-offs are computed here and
compared as the registry's ISO 8601 UTC text, which sorts as time does), so the
PostgreSQL port can take them as they are.

A device's certificate, here, is its latest operational certificate still in
force (``issued``, not revoked or superseded): expiring within the window, or
expired with nothing newer, which is a device that can only come back through
the recovery listener or its bootstrap certificate.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from .registry import DeviceState, IssuanceKind, Registry, timestamp

# An operational certificate in force with no later one in force for its device.
_LATEST = """SELECT c.device_id, c.serial, c.not_after FROM certificates c
    JOIN devices d ON d.device_id = c.device_id
    WHERE d.state = 'active' AND c.kind = 'operational' AND c.status = 'issued'
      AND c.not_after > ? AND c.not_after <= ?
      AND NOT EXISTS (SELECT 1 FROM certificates o WHERE o.device_id = c.device_id
                      AND o.kind = 'operational' AND o.status = 'issued'
                      AND o.not_after > c.not_after)
    ORDER BY c.not_after, c.device_id"""
_STATES = "SELECT state, COUNT(*) FROM devices GROUP BY state"
_ISSUED_SINCE = "SELECT kind, COUNT(*) FROM issuances WHERE at >= ? GROUP BY kind"
_CAME_BACK = """SELECT device_id, kind, COUNT(*), MAX(at) FROM issuances
    WHERE at >= ? AND kind IN ('recover', 'bootstrap-reenroll')
    GROUP BY device_id, kind ORDER BY device_id, kind"""
_NEVER_RENEWED = """SELECT i.device_id, MIN(i.at) FROM issuances i
    JOIN devices d ON d.device_id = i.device_id
    WHERE d.state = 'active' AND NOT EXISTS (
        SELECT 1 FROM issuances r WHERE r.device_id = i.device_id AND r.kind = 'renew')
    GROUP BY i.device_id ORDER BY i.device_id"""
_NEVER_ENROLLED = """SELECT d.device_id FROM devices d WHERE d.state = 'active'
    AND NOT EXISTS (SELECT 1 FROM issuances i WHERE i.device_id = d.device_id)
    ORDER BY d.device_id"""
_PENDING = "SELECT COUNT(*) FROM pending WHERE decision = 'pending'"
# Earlier than any time the registry's text holds: the lower bound for expired ones.
_NEVER = "0000"


@dataclass(frozen=True)
class Held:
    """A device's latest certificate in force."""

    device_id: str
    serial: str
    not_after: str


@dataclass(frozen=True)
class CameBack:
    """A device that recovered or re-enrolled with its bootstrap certificate since the cut-off."""

    device_id: str
    kind: str
    count: int
    last: str


@dataclass(frozen=True)
class FleetReport:
    generated: str
    within_seconds: float
    since: str
    devices_by_state: dict[str, int]
    pending_requests: int
    issuances_since: dict[str, int]
    expiring: list[Held] = field(default_factory=list)
    expired: list[Held] = field(default_factory=list)
    came_back: list[CameBack] = field(default_factory=list)
    never_renewed: list[dict[str, str]] = field(default_factory=list)
    never_enrolled: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        days = self.within_seconds / 86400
        states = ", ".join(f"{n} {state}" for state, n in self.devices_by_state.items())
        issued = ", ".join(f"{n} {kind}" for kind, n in self.issuances_since.items())
        lines = [f"fleet identity health at {self.generated}",
                 f"devices        {sum(self.devices_by_state.values())}: {states}; "
                 f"{self.pending_requests} enrollment request(s) held",
                 f"since {self.since}: issued {issued}",
                 f"expiring within {days:g}d: {len(self.expiring)}"]
        lines += [f"  {h.device_id}\tserial {h.serial}\tnot after {h.not_after}"
                  for h in self.expiring]
        lines.append(f"expired, nothing newer: {len(self.expired)}")
        lines += [f"  {h.device_id}\tserial {h.serial}\tnot after {h.not_after}"
                  for h in self.expired]
        lines.append(f"recovered or re-enrolled since {self.since}: {len(self.came_back)}")
        lines += [f"  {c.device_id}\t{c.kind} x{c.count}\tlast {c.last}" for c in self.came_back]
        lines.append(f"never renewed: {len(self.never_renewed)}")
        lines += [f"  {d['device_id']}\tfirst issued {d['first_issued']}"
                  for d in self.never_renewed]
        lines.append(f"allowlisted, never enrolled: {len(self.never_enrolled)}")
        lines += [f"  {device_id}" for device_id in self.never_enrolled]
        return "\n".join(lines)


def fleet_report(registry: Registry, now: dt.datetime, within: dt.timedelta,
                 since: dt.datetime) -> FleetReport:
    """The registry's view of the fleet at ``now``: certificates expiring before
    ``now + within``, recoveries and issuances from ``since`` on."""
    if within < dt.timedelta(0):
        raise ValueError("the expiry window must not be negative")
    query = registry._query  # the registry's connection; read-only statements only
    at, until = timestamp(now), timestamp(now + within)
    by_state = {state.value: 0 for state in DeviceState}
    by_state.update({row[0]: int(row[1]) for row in query(_STATES)})
    issued = {kind.value: 0 for kind in IssuanceKind}
    issued.update({row[0]: int(row[1]) for row in query(_ISSUED_SINCE, (timestamp(since),))})
    return FleetReport(
        generated=at,
        within_seconds=within.total_seconds(),
        since=timestamp(since),
        devices_by_state=by_state,
        pending_requests=int(query(_PENDING)[0][0]),
        issuances_since=issued,
        expiring=[Held(*row) for row in query(_LATEST, (at, until))],
        expired=[Held(*row) for row in query(_LATEST, (_NEVER, at))],
        came_back=[CameBack(row[0], row[1], int(row[2]), row[3])
                   for row in query(_CAME_BACK, (timestamp(since),))],
        never_renewed=[{"device_id": row[0], "first_issued": row[1]}
                       for row in query(_NEVER_RENEWED)],
        never_enrolled=[row[0] for row in query(_NEVER_ENROLLED)],
    )
