"""An independent telemetry monitor: mosquitto_sub with the back-end identity, counting seqs.

It is not our code on the wire: the broker delivers to Mosquitto's own client,
and this module only parses what it prints. Gaps in a device's sequence
numbers are lost messages; repeats are the at-least-once duplicates.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable
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
        self._lock = threading.Lock()
        self._process: subprocess.Popen[str] | None = None
        self.received = 0

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(0.5)  # mosquitto_sub has no readiness signal; its SUBACK comes within ms
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
            self._reader.join(5)
            if self._process.stdout is not None:
                self._process.stdout.close()

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            topic, _, payload = line.rstrip("\n").partition(" ")
            try:
                message = json.loads(payload)
                device, seq = topic.split("/")[1], int(message["seq"])
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            with self._lock:
                self._seqs[device].append(seq)
                self.received += 1

    def seqs(self, device: str) -> list[int]:
        with self._lock:
            return list(self._seqs[device])

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
