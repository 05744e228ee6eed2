"""Starting credential jobs (credential_job.py) from the daemon.

A job imports what credential work needs before it reads its order, so at a first boot
(no current credential) the daemon starts one before its own imports: the two
interpreters start side by side and the enrollment is not kept waiting for either
(issue 15: spawn to first PUBACK).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .config import AgentConfig
from .credentials import CredentialStore
from .errors import IdentityError


def start() -> subprocess.Popen[str]:
    """A credential job, waiting for its order on stdin."""
    return subprocess.Popen([sys.executable, "-m", "device_agent.credential_job"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=os.environ.copy())


def order(work: str, generation: int | None, check_time: bool, source: Path,
          config_toml: str) -> str:
    """What a job reads on stdin: the work order line, then the running configuration."""
    line = {"work": work, "generation": generation, "check_time": check_time,
            "source": str(source)}
    return json.dumps(line) + "\n" + config_toml


def ahead_of_first_boot(config_path: Path) -> subprocess.Popen[str] | None:
    """A job started now if the device has no credential yet (its first work is due at
    once); None otherwise, or if the configuration does not load (the agent says why)."""
    try:
        config = AgentConfig.load(config_path)
        if CredentialStore(config.paths.state_dir).current() is not None:
            return None
    except (IdentityError, OSError):
        return None
    try:
        return start()
    except OSError:
        return None  # the agent starts its job itself and reports what fails


def dismiss(job: subprocess.Popen[str], timeout: float = 5.0) -> None:
    """End a job that was started ahead and never given work."""
    try:
        job.communicate("", timeout=timeout)  # stdin closes: it exits without answering
    except subprocess.TimeoutExpired:
        job.kill()
        job.wait()
