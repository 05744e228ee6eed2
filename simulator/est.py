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


@dataclass
class ESTServer:
    """A running est-server: where it listens, its PKI and registry, and its log.

    ``stop()`` and ``start()`` take it down and bring it back on the same ports with
    the same configuration (the soak's EST outages); ``process`` is the current one.
    """

    port: int
    pki: pki.PKIPaths
    registry_path: Path | str  # a SQLite file or a postgresql:// URL
    log: Path
    process: subprocess.Popen[bytes]
    recovery_port: int | None = None
    config: Path | None = None
    crl: Path | None = None  # where it publishes the CRL after supersedes
    metrics_port: int | None = None  # [metrics] port, when started with metrics=True

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        return stop(self.process)

    def start(self, timeout: float = 30.0) -> None:
        """Start it again after :meth:`stop`, and wait for its new "ready" line."""
        if self.running():
            raise RuntimeError("est-server is still running")
        if self.config is None:
            raise RuntimeError("no configuration to start est-server from")
        offset = self.log.stat().st_size
        self.process = _launch(self.config, self.log)
        wait_ready(self.process, self.log, offset, timeout)

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
                 server_table: Mapping[str, object] | None = None,
                 registry: Path | str | None = None, crl: Path | None = None,
                 metrics_port: int | None = None, **policy: object) -> Path:
    """est.toml for a test server; ``policy`` becomes the [policy] table as given,
    ``server_table`` adds to (or overrides) the [server] table; the registry is
    ``directory/registry.sqlite3`` unless ``registry`` names one (a path or a
    postgresql:// URL, which several servers may share), and the CRL it
    publishes after supersedes ``directory/crl.pem`` unless ``crl`` does (several test
    servers share one PKI, each with its own registry: one CRL file each)."""
    table: dict[str, object] = {"port": port, "workers": 2, "max_in_flight": 256,
                                "shutdown_timeout": 5}
    if recovery_port is not None:
        table["recovery_port"] = recovery_port
    table.update(server_table or {})
    lines = ["[server]", *(f"{key} = {json.dumps(value)}" for key, value in table.items()),
             "[pki]", f'directory = "{paths.base}"',
             f'registry = "{registry or directory / "registry.sqlite3"}"',
             f'crl = "{crl or directory / "crl.pem"}"', "[policy]"]
    for key, value in policy.items():
        lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true")
                     .replace("False", "false"))
    if metrics_port is not None:
        lines += ["[metrics]", f"port = {metrics_port}"]
    config = directory / "est.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@contextmanager
def running_est_server(directory: Path, paths: pki.PKIPaths, *, recovery: bool = False,
                       server_table: Mapping[str, object] | None = None,
                       registry: Path | str | None = None, crl: Path | None = None,
                       metrics: bool = False, **policy: object) -> Iterator[ESTServer]:
    """Start est-server on a free port, wait for its "ready" line, then SIGTERM, then kill.

    ``recovery=True`` also opens the recovery listener on a second free port
    (``ESTServer.recovery_port``, ``recovery_url``); ``server_table`` sets [server] keys;
    ``metrics=True`` serves metrics on a third (``ESTServer.metrics_port``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    recovery_port = free_port() if recovery else None
    metrics_port = free_port() if metrics else None
    config = write_config(directory, paths, port, recovery_port, server_table=server_table,
                          registry=registry, crl=crl, metrics_port=metrics_port, **policy)
    log = directory / "est-server.log"
    server = ESTServer(port, paths, registry or directory / "registry.sqlite3", log,
                       _launch(config, log), recovery_port, config, crl or directory / "crl.pem",
                       metrics_port)
    try:
        wait_ready(server.process, log, 0)
        yield server
    finally:
        server.stop()


def _launch(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([EST_SERVER, "--config", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def wait_ready(process: subprocess.Popen[bytes], log: Path, offset: int = 0,
               timeout: float = 30.0, name: str = "est-server") -> None:
    """Until the log holds a "ready" line past ``offset``; an error if it exits first
    (also the factory signing service's wait: it logs the same line)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log, "rb") as text:
            text.seek(offset)
            if b'"event":"ready"' in text.read():
                return
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n"
                               f"{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready after {timeout:.0f}s:\n"
                               f"{log.read_text()[-2000:]}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM the process (started in a session of its own), kill its whole group if it
    lingers; always reaped."""
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
