"""What the swarm watches: CPU and memory of each process from /proc, and a monitor made
of several subscribers, each with its share of the devices."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .observe import TimedMonitor
from .periodic import Periodic

TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
SATURATED = 90.0  # % of one core: a single-threaded process (Mosquitto, the GIL) is full
MACHINE_SATURATED = 95.0  # % of all cores
DROPPED = re.compile(r"Outgoing messages are being dropped for client (\S+)")

Reading = tuple[float, dict[str, float], tuple[float, float]]  # (monotonic, CPU s, machine)


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on


def children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def rss_mb(pid: int) -> float:
    fields = _stat(pid)
    return 0.0 if fields is None else int(fields[21]) * PAGE_KB / 1024


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class CPUSampler:
    """Once a second: each named process group's CPU (% of one core) and the machine's."""

    groups: dict[str, Callable[[], list[int]]]
    t0: float
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    rss_peak: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._last: Reading = (0.0, {}, (0.0, 0.0))
        self._periodic = Periodic("cpu-sampler", 1.0, self._sample, first=self._baseline,
                                  join_timeout=5)

    def __enter__(self) -> CPUSampler:
        self._periodic.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._periodic.stop()

    def _baseline(self) -> None:
        self._last = self._read()

    def _sample(self) -> None:
        last, now = self._last, self._read()
        span = now[0] - last[0]
        shares = {name: 100 * (now[1][name] - last[1].get(name, now[1][name])) / span
                  for name in now[1]}
        busy = now[2][1] - last[2][1]
        shares["machine"] = 100 * (now[2][0] - last[2][0]) / busy if busy else 0.0
        self.samples.append((now[0] - self.t0, shares))
        self._last = now

    def _read(self) -> Reading:
        seconds = {}
        for name, pids in self.groups.items():
            found = pids()
            seconds[name] = cpu_seconds(found)
            if found:
                self.rss_peak[name] = max(self.rss_peak.get(name, 0.0),
                                          sum(rss_mb(p) for p in found))
        return time.monotonic(), seconds, machine_busy()

    def between(self, start: float, end: float) -> dict[str, float]:
        """Mean CPU % of each group between two moments (seconds since t0)."""
        rows = [s for at, s in self.samples if start <= at <= end]
        if not rows:
            return {}
        return {name: round(sum(r[name] for r in rows) / len(rows), 1) for name in rows[0]}

    def peaks(self) -> dict[str, float]:
        names = self.samples[0][1] if self.samples else {}
        return {n: round(max(s[n] for _, s in self.samples), 1) for n in names}

    def saturated_first(self) -> dict[str, object] | None:
        """The first second a single-threaded process or the whole machine was full."""
        for at, shares in self.samples:
            if shares.get("machine", 0.0) >= MACHINE_SATURATED:
                top = max((n for n in shares if n != "machine"), key=lambda n: shares[n])
                return {"what": "machine (all cores)", "at_s": round(at, 1),
                        "busiest": top, "busiest_cpu_pct": round(shares[top], 1)}
            for name in ("mosquitto", "swarm"):
                if shares.get(name, 0.0) >= SATURATED:
                    return {"what": name, "at_s": round(at, 1),
                            "cpu_pct": round(shares[name], 1)}
        return None


class MonitorGroup:
    """Subscribers with identities of their own (``backend``, ``backend-2``..), each for a
    share of the devices, so no single subscriber has to keep up with the whole fleet.
    Counts are over all of them."""

    def __init__(self, monitors: list[TimedMonitor]) -> None:
        self.monitors = monitors

    @property
    def received(self) -> int:
        return sum(m.received for m in self.monitors)

    def unique_received(self) -> int:
        return sum(len(self.seqs(d)) for d in self.devices())

    def devices(self) -> set[str]:
        found: set[str] = set()
        for monitor in self.monitors:
            with monitor._lock:  # noqa: SLF001 - the monitor's own lock, held briefly
                found.update(monitor._seqs)  # noqa: SLF001
        return found

    def seqs(self, device: str) -> set[int]:
        seen: set[int] = set()
        for monitor in self.monitors:
            seen.update(monitor.seqs(device))
        return seen

    def missing(self, device: str, last: int) -> list[int]:
        seen = self.seqs(device)
        return [n for n in range(1, last + 1) if n not in seen]

    def restarts(self) -> int:
        return sum(m.restarts for m in self.monitors)

    def pids(self) -> list[int]:
        pids = []
        for monitor in self.monitors:
            process = monitor._process  # noqa: SLF001
            if process is not None and process.poll() is None:
                pids.append(process.pid)
        return pids


def dropped_for(log: Path) -> list[str]:
    """Clients for which Mosquitto logged that it dropped outgoing messages (its queue for
    them was full: ``max_queued_messages``)."""
    if not log.exists():
        return []
    return sorted(set(DROPPED.findall(log.read_text(errors="replace"))))
