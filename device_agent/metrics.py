"""Built-in system telemetry: cheap readings every Linux device has."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

_STARTED = time.monotonic()


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable"):
                values[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return values


def _temperature_c() -> float | None:
    try:
        return int(Path("/sys/class/thermal/thermal_zone0/temp").read_text()) / 1000
    except (OSError, ValueError):
        return None


def system_metrics() -> dict[str, object]:
    load1, load5, load15 = os.getloadavg()
    memory = _meminfo()
    readings: dict[str, object] = {
        "load": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "mem_total_kb": memory.get("MemTotal"),
        "mem_available_kb": memory.get("MemAvailable"),
        "agent_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "agent_uptime_s": round(time.monotonic() - _STARTED, 1),
    }
    temperature = _temperature_c()
    if temperature is not None:
        readings["temperature_c"] = temperature
    return readings
