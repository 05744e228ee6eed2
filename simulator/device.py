"""A device as the tests and the fleet simulator run it: a config directory and the real
``device-agent`` process."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.config import AgentConfig
from device_agent.status import read_status

from .processes import Process


class AgentProcess:
    """``python -m device_agent.cli run`` for one device, with its log in the state dir."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.config = AgentConfig.load(config_path)
        self.env = {"TSS2_LOG": "all+none", **(env or {})}
        self.log = config_path.parent / "agent.log"
        self.process: Process | None = None
        self.started_at = 0.0

    @property
    def device_id(self) -> str:
        return self.config.device.id

    def start(self) -> AgentProcess:
        self.process = Process(
            "device-agent",
            [sys.executable, "-m", "device_agent.cli", "--config", str(self.config_path), "run"],
            self.log, env=self.env,
        ).start()
        self.started_at = time.monotonic()
        return self

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 15.0) -> int | None:
        return self.process.stop(timeout) if self.process else None

    def kill(self) -> None:
        """``kill -9``: no drain, no goodbye."""
        assert self.process is not None and self.process.popen is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.popen.wait(10)

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def status(self) -> dict[str, Any]:
        return read_status(self.config.paths.state_dir)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, condition: Callable[[dict[str, Any]], bool], timeout: float,
                 what: str) -> dict[str, Any]:
        """Poll the status file until ``condition`` holds; the status, or an error with the log."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if status.get("running") and condition(status):
                return status
            if self.process is not None and not self.process.running():
                break
            time.sleep(0.1)
        raise AssertionError(f"{self.device_id}: {what} not seen within {timeout}s; "
                             f"status {status}\n--- agent log ---\n{self.log_text()[-3000:]}")
