"""The agent's status file: what ``device-agent status`` shows without talking to the agent."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ._files import write_private

STATUS_FILE = "status.json"
STALE_AFTER = 30.0


def write_status(state_dir: Path, status: dict[str, Any]) -> None:
    write_private(state_dir / STATUS_FILE,
                  json.dumps({**status, "pid": os.getpid(), "updated": time.time()},
                             indent=2).encode(), 0o640)


def read_status(state_dir: Path) -> dict[str, Any]:
    """The last status written, with ``running`` saying whether the writer still lives."""
    path = state_dir / STATUS_FILE
    try:
        status: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {"running": False, "error": f"no status at {path}: the agent has not run"}
    except (OSError, ValueError) as exc:
        return {"running": False, "error": f"unreadable status {path}: {exc}"}
    alive = _alive(int(status.get("pid", 0)))
    # the file's mtime comes from the kernel: right even when the agent's clock is not
    fresh = time.time() - path.stat().st_mtime < STALE_AFTER
    status["running"] = alive and fresh
    return status


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
