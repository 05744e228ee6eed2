"""An independent telemetry monitor: mosquitto_sub with the back-end identity, counting seqs.

It is not our code on the wire: the broker delivers to Mosquitto's own client,
and this module only parses what it prints. Gaps in a device's sequence
numbers are lost messages; repeats are the at-least-once duplicates.

mosquitto_sub exits when the broker goes away; the monitor starts it again with
the same client ID (a persistent session: the broker kept what arrived for it)
until it is closed, and counts those restarts.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self

from .processes import require


class TelemetryMonitor:
    def __init__(self, *, port: int, cafile: Path, cert: Path, key: Path,
                 topic: str = "devices/+/telemetry", client_id: str = "backend-monitor") -> None:
        self.argv = [require("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port),
                     "--cafile", str(cafile), "--cert", str(cert), "--key", str(key),
                     "-t", topic, "-q", "1", "-v", "-V", "mqttv5", "-i", client_id,
                     # a persistent session: what arrives while it reconnects is kept for it
                     "-c", "-x", "86400"]
        self._seqs: dict[str, list[int]] = defaultdict(list)
        self._arrived: dict[str, dict[int, float]] = defaultdict(dict)  # first arrival
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self._closing = threading.Event()
        self.received = 0
        self.restarts = 0
        self.unparsed: list[str] = []  # lines that name no device and seq (the first 20)
        self.unparsed_count = 0

    def _spawn(self) -> subprocess.Popen[str]:
        process = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        with self._lock:
            self._process = process
        return process

    def __enter__(self) -> Self:
        self._spawn()
        self._reader = threading.Thread(target=self._run, daemon=True)
        self._reader.start()
        time.sleep(0.5)  # mosquitto_sub has no readiness signal; its SUBACK comes within ms
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        stopped: set[int] = set()
        while True:  # the reader may have started a new one just before it saw _closing
            with self._lock:
                process = self._process
            if process is None or process.pid in stopped:
                break
            stopped.add(process.pid)
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            self._reader.join(5)
            if process.stdout is not None:
                process.stdout.close()

    def _run(self) -> None:
        """Read until closed; a mosquitto_sub that exits (the broker went away) is started
        again after a short pause."""
        while True:
            with self._lock:
                process = self._process
            assert process is not None and process.stdout is not None
            self._read(process.stdout)
            process.wait()
            if self._closing.wait(0.5):
                return
            process.stdout.close()
            self.restarts += 1
            self._spawn()

    def _read(self, lines: Iterable[str]) -> None:
        for line in lines:
            topic, _, payload = line.rstrip("\n").partition(" ")
            try:
                message = json.loads(payload)
                device, seq = topic.split("/")[1], int(message["seq"])
            except (ValueError, KeyError, IndexError, TypeError):
                with self._lock:
                    self.unparsed_count += 1
                    if len(self.unparsed) < 20:
                        self.unparsed.append(line[:300])
                continue
            with self._lock:
                self._seen(device, seq, time.monotonic())

    def _seen(self, device: str, seq: int, now: float) -> None:
        """Count one message (the lock held)."""
        self._seqs[device].append(seq)
        self._arrived[device].setdefault(seq, now)
        self.received += 1

    def seqs(self, device: str) -> list[int]:
        with self._lock:
            return list(self._seqs[device])

    def arrival(self, device: str, seq: int) -> float | None:
        """When ``seq`` of ``device`` first arrived (time.monotonic), None if it never did."""
        with self._lock:
            return self._arrived[device].get(seq)

    def missing(self, device: str, first: int, last: int) -> list[int]:
        """Sequence numbers in [first, last] never received from ``device``."""
        seen = set(self.seqs(device))
        return [n for n in range(first, last + 1) if n not in seen]

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.1)
        return condition()
