"""The factory signing service (``factory-ca serve``) as a child process, and its stations.

Used by tests/test_factory_service.py and benchmarks/bench_factory.py: a factory.toml
on a free port, the Station CA made by ``factory-ca init``, stations added by
``factory-ca station add``, a readiness wait on the "ready" log line, SIGTERM then kill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from provisioning import pki
from provisioning.registry import Registry, open_registry

from .est import stop, wait_ready
from .processes import free_port

FACTORY_CA = [sys.executable, "-m", "provisioning.factory_ca_cli"]


@dataclass(frozen=True)
class Station:
    name: str
    cert: Path
    key: Path
    trust: Path
    serial: str


@dataclass
class FactoryService:
    port: int
    config: Path
    pki: pki.PKIPaths
    registry_path: Path
    stations_dir: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def command(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FACTORY_CA, *argv, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=60, check=False)

    def add_station(self, name: str, out: Path) -> Station:
        result = self.command("station", "add", name, "--out", str(out))
        if result.returncode != 0:
            raise RuntimeError(f"factory-ca station add {name}: {result.stderr}")
        serial = json.loads(result.stdout)["serial"]
        return Station(name, out / "station.pem", out / "station.key",
                       out / "service-trust.pem", serial)

    def revoke_station(self, name: str) -> None:
        result = self.command("station", "revoke", name)
        if result.returncode != 0:
            raise RuntimeError(f"factory-ca station revoke {name}: {result.stderr}")

    @contextmanager
    def registry(self) -> Iterator[Registry]:
        with open_registry(self.registry_path) as registry:
            yield registry


def write_config(directory: Path, paths: pki.PKIPaths, port: int, registry: Path,
                 server: Mapping[str, object],
                 attestation: Mapping[str, object] | None = None) -> Path:
    table = {"port": port, **server}
    lines = ["[server]", *(f"{key} = {json.dumps(value)}" for key, value in table.items()),
             "[pki]", f'directory = "{paths.base}"', f'registry = "{registry}"',
             "[stations]", f'directory = "{directory / "stations"}"']
    if attestation:
        lines += ["[attestation]",
                  *(f"{key} = {json.dumps(value)}" for key, value in attestation.items())]
    config = directory / "factory.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@contextmanager
def running_factory_service(directory: Path, paths: pki.PKIPaths, *,
                            registry: Path | None = None,
                            attestation: Mapping[str, object] | None = None,
                            **server: object) -> Iterator[FactoryService]:
    """``factory-ca init`` then ``serve`` on a free port; ``server`` sets [server] keys,
    ``attestation`` the [attestation] table (paths as strings)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    registry = registry or directory / "registry.sqlite3"
    registry.parent.mkdir(parents=True, exist_ok=True)
    config = write_config(directory, paths, port, registry, server, attestation)
    init = subprocess.run([*FACTORY_CA, "init", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    if init.returncode != 0:
        raise RuntimeError(f"factory-ca init: {init.stderr}")
    log = directory / "factory-ca.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([*FACTORY_CA, "serve", "--config", str(config)],
                                   stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    service = FactoryService(port, config, paths, registry, directory / "stations", log,
                             process)
    try:
        wait_ready(process, log, name="factory-ca serve")
        yield service
    finally:
        stop(process)
