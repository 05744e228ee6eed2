"""The real est-server as a child process: config, readiness wait, SIGTERM-then-kill.

Used by the fleet simulator and the tests (tests/est_support.py re-exports it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from provisioning import pki
from provisioning.registry import Registry, open_registry

from .processes import free_port

EST_SERVER = str(Path(sys.executable).parent / "est-server")
WELL_KNOWN = "/.well-known/est"


@dataclass(frozen=True)
class ESTServer:
    """A running est-server: where it listens, its PKI and registry, and its log."""

    port: int
    pki: pki.PKIPaths
    registry_path: Path
    log: Path
    process: subprocess.Popen[bytes]
    recovery_port: int | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{WELL_KNOWN}"

    @property
    def base_url(self) -> str:
        """The agent's ``[est] url``: scheme, host and port; it adds the well-known path."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def recovery_url(self) -> str:
        """The agent's ``[est] recovery_url``; it adds /.well-known/est/recovery/simplereenroll."""
        if self.recovery_port is None:
            raise ValueError("started without recovery=True: no recovery listener")
        return f"https://127.0.0.1:{self.recovery_port}"

    @contextmanager
    def registry(self) -> Iterator[Registry]:
        with open_registry(self.registry_path) as registry:
            yield registry


def write_config(directory: Path, paths: pki.PKIPaths, port: int,
                 recovery_port: int | None = None, *,
                 server_table: Mapping[str, object] | None = None, **policy: object) -> Path:
    """est.toml for a test server; ``policy`` becomes the [policy] table as given,
    ``server_table`` adds to (or overrides) the [server] table."""
    table: dict[str, object] = {"port": port, "workers": 2, "max_in_flight": 256,
                                "shutdown_timeout": 5}
    if recovery_port is not None:
        table["recovery_port"] = recovery_port
    table.update(server_table or {})
    lines = ["[server]", *(f"{key} = {json.dumps(value)}" for key, value in table.items()),
             "[pki]", f'directory = "{paths.base}"',
             f'registry = "{directory / "registry.sqlite3"}"', "[policy]"]
    for key, value in policy.items():
        lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true")
                     .replace("False", "false"))
    config = directory / "est.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@contextmanager
def running_est_server(directory: Path, paths: pki.PKIPaths, *, recovery: bool = False,
                       server_table: Mapping[str, object] | None = None,
                       **policy: object) -> Iterator[ESTServer]:
    """Start est-server on a free port, wait for its "ready" line, then SIGTERM, then kill.

    ``recovery=True`` also opens the recovery listener on a second free port
    (``ESTServer.recovery_port``, ``recovery_url``); ``server_table`` sets [server] keys.
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    recovery_port = free_port() if recovery else None
    config = write_config(directory, paths, port, recovery_port, server_table=server_table,
                          **policy)
    log = directory / "est-server.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([EST_SERVER, "--config", str(config)], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = ESTServer(port, paths, directory / "registry.sqlite3", log, process, recovery_port)
    try:
        deadline = time.monotonic() + 30
        while b'"event":"ready"' not in log.read_bytes():
            if process.poll() is not None:
                raise RuntimeError(f"est-server exited with {process.returncode}:\n"
                                   f"{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"est-server not ready after 30s:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM the supervisor, kill its whole group if it lingers; always reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers, should any outlive their parent
    except ProcessLookupError:
        pass
    return process.returncode
