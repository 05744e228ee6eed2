"""What the fleet simulator watches: telemetry arrival times and the fleet's state over time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .monitor import TelemetryMonitor
from .periodic import Periodic


class TimedMonitor(TelemetryMonitor):
    """The independent monitor, also noting when each message arrived (for the rate plot)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.arrivals: list[float] = []
        self.last_arrival: dict[str, float] = {}

    def _seen(self, device: str, seq: int, now: float) -> None:
        super()._seen(device, seq, now)
        self.arrivals.append(now)
        self.last_arrival[device] = now

    def count(self, device: str) -> int:
        with self._lock:
            return len(self._seqs.get(device, ()))

    def unique_received(self) -> int:
        with self._lock:
            return sum(len(set(seqs)) for seqs in self._seqs.values())


@dataclass(frozen=True)
class Sample:
    at: float          # seconds since the fleet's t0
    connected: int
    received: int      # messages the monitor had seen by then


class Sampler:
    """A thread sampling the connected count once a second until stopped (the first
    sample at once)."""

    def __init__(self, t0: float, connected: Callable[[], int], received: Callable[[], int],
                 period: float = 1.0) -> None:
        self.t0, self.period = t0, period
        self._connected, self._received = connected, received
        self.samples: list[Sample] = []
        self._periodic = Periodic("sampler", period, self._sample, first=self._sample)

    def __enter__(self) -> Sampler:
        self._periodic.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._periodic.stop()

    def _sample(self) -> None:
        self.samples.append(Sample(time.monotonic() - self.t0, self._connected(),
                                   self._received()))
