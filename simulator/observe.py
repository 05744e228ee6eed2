"""What the fleet simulator watches: telemetry arrival times and the fleet's state over time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .monitor import TelemetryMonitor


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
    """A thread sampling the connected count once a second until stopped."""

    def __init__(self, t0: float, connected: Callable[[], int], received: Callable[[], int],
                 period: float = 1.0) -> None:
        self.t0, self.period = t0, period
        self._connected, self._received = connected, received
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(Sample(time.monotonic() - self.t0, self._connected(),
                                       self._received()))
            self._stop.wait(self.period)
