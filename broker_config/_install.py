"""Atomic writes with an owner: the broker must read the new file the moment it appears."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from device_agent._files import fsync_dir

from .errors import BrokerConfigError


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


def install(path: Path, data: bytes, owner: Owner | None, mode: int) -> Path:
    """Write ``data`` to ``path`` via a temp file that already has its owner and mode,
    so a SIGHUP landing mid-update sees the old file or the new one, never an
    unreadable one."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise BrokerConfigError(f"cannot create a file in {path.parent}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise BrokerConfigError(f"cannot write {path}: {exc.strerror}") from exc
    return path


def make_dir(path: Path, owner: Owner | None, mode: int) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
        if owner is not None:
            os.chown(path, owner.uid, owner.gid)
    except OSError as exc:
        raise BrokerConfigError(f"cannot prepare {path}: {exc.strerror}") from exc
