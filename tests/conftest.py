"""Real processes shared by the tests: D-Bus, swtpm + tpm2-abrmd, Mosquitto, a PKI.

Every component is the real program on 127.0.0.1 with free ports and temp
directories; a missing program fails the test with the package to install.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from device_agent.tpm import TPM, KeyBlob
from provisioning import pki
from simulator import seed
from simulator.manufacturer import Manufacturer
from simulator.postgres import PostgreSQL
from simulator.processes import DBusSession, Mosquitto, SoftwareTPM, free_port

BACKEND_ID = "backend"


@pytest.fixture(scope="session")
def dbus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DBusSession]:
    with DBusSession(tmp_path_factory.mktemp("dbus")) as bus:
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = bus.address
        yield bus


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory, dbus: DBusSession) -> Iterator[SoftwareTPM]:
    """The device TPM, behind tpm2-abrmd limited like the kernel's /dev/tpmrm0."""
    with SoftwareTPM(tmp_path_factory.mktemp("swtpm"), dbus, "main", max_transients=3) as tpm:
        yield tpm


@pytest.fixture(scope="session")
def other_swtpm(
    tmp_path_factory: pytest.TempPathFactory, dbus: DBusSession
) -> Iterator[SoftwareTPM]:
    """A second, unrelated TPM."""
    with SoftwareTPM(tmp_path_factory.mktemp("swtpm-other"), dbus, "other") as tpm:
        yield tpm


@pytest.fixture(scope="session")
def manufacturer(tmp_path_factory: pytest.TempPathFactory) -> Manufacturer:
    """A TPM maker (swtpm_localca): the roots a key-attesting factory line trusts."""
    return Manufacturer(tmp_path_factory.mktemp("manufacturer"), "maker-test")


@pytest.fixture(scope="session")
def made_swtpm(tmp_path_factory: pytest.TempPathFactory, dbus: DBusSession,
               manufacturer: Manufacturer) -> Iterator[SoftwareTPM]:
    """A TPM with EK certificates from ``manufacturer``, behind tpm2-abrmd like /dev/tpmrm0."""
    with SoftwareTPM(tmp_path_factory.mktemp("made-swtpm"), dbus, "made", max_transients=3,
                     manufacturer=manufacturer) as tpm:
        yield tpm


@pytest.fixture
def raw_swtpm(tmp_path: Path) -> Iterator[SoftwareTPM]:
    """A swtpm with no resource manager in front: objects leak unless flushed."""
    with SoftwareTPM(tmp_path / "raw-swtpm", None, "raw") as tpm:
        yield tpm


@pytest.fixture
def key_file(tmp_path: Path, swtpm: SoftwareTPM) -> Path:
    """A fresh TPM key blob written as a TSS2 key file."""
    with TPM(swtpm.tcti) as tpm:
        return tpm.create_key().write(tmp_path / "key.tss")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgreSQL]:
    """One PostgreSQL server for the session, on a unix socket in a directory of its own."""
    with PostgreSQL() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_location(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's registry lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "registry.sqlite3"
    server: PostgreSQL = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> pki.PKIPaths:
    return pki.init_pki(tmp_path_factory.mktemp("pki"))


@dataclass(frozen=True)
class ClientFiles:
    """A certificate and its key on disk, as a client hands them to TLS."""

    cert: Path
    key: Path
    device_id: str


def issue_file_client(directory: Path, authority: pki.Authority, device_id: str,
                      lifetime: dt.timedelta = dt.timedelta(days=1)) -> ClientFiles:
    """A client identity with a software key: back-end services and negative cases."""
    cert, key = seed.issue_file_client(directory, authority, device_id, lifetime)
    return ClientFiles(cert, key, device_id)


@pytest.fixture(scope="session")
def device_ca(pki_dir: pki.PKIPaths) -> pki.Authority:
    return pki.read_authority(pki_dir.device_ca)


@pytest.fixture(scope="session")
def device(tmp_path_factory: pytest.TempPathFactory, swtpm: SoftwareTPM,
           device_ca: pki.Authority) -> ClientFiles:
    """A device whose key was made in the TPM and certified by the Device CA."""
    directory = tmp_path_factory.mktemp("device")
    with TPM(swtpm.tcti) as tpm:
        blob = tpm.create_key()
    key_path = blob.write(directory / "device.tss")
    cert = device_ca.issue_client("dev-0001", KeyBlob.read(key_path).public_key(),
                                  dt.timedelta(days=1))
    (directory / "device.pem").write_bytes(pki.cert_pem(cert))
    return ClientFiles(directory / "device.pem", key_path, "dev-0001")


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory, device_ca: pki.Authority) -> ClientFiles:
    return issue_file_client(tmp_path_factory.mktemp("backend"), device_ca, BACKEND_ID)


@pytest.fixture(scope="session")
def broker(pki_dir: pki.PKIPaths) -> Iterator[Mosquitto]:
    """Mosquitto as ``broker-config render`` ships it, running as the mosquitto user."""
    with rendered_broker(pki_dir) as rendered:
        yield rendered.mosquitto


# --- broker configuration ---

import shutil  # noqa: E402
import tempfile  # noqa: E402
from contextlib import contextmanager  # noqa: E402

from broker_config.deploy import BrokerLayout, render_broker  # noqa: E402


@dataclass(frozen=True)
class RenderedBroker:
    """A broker directory rendered by ``broker-config`` and the Mosquitto running it."""

    layout: BrokerLayout
    mosquitto: Mosquitto

    @property
    def port(self) -> int:
        return self.mosquitto.port


@contextmanager
def rendered_broker(paths: pki.PKIPaths, crl: Path | None = None) -> Iterator[RenderedBroker]:
    """Render and run a broker as shipped: started as root, dropped to ``mosquitto``;
    ``crl`` installs that CRL instead of the PKI's.

    pytest's temp directories are 0700 root, which the ``mosquitto`` user cannot
    traverse, so the broker directory lives in a directory of its own, removed after.
    """
    parent = Path(tempfile.mkdtemp(prefix="broker-test-"))
    try:
        parent.chmod(0o755)
        port = free_port()
        layout = render_broker(paths, parent / "broker", port=port, backend_identity=BACKEND_ID,
                               crl=crl)
        with Mosquitto(parent, layout.conf, port) as mosquitto:
            yield RenderedBroker(layout, mosquitto)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def shipped_broker(pki_dir: pki.PKIPaths) -> Iterator[RenderedBroker]:
    """One rendered broker shared by the tests that do not change its state."""
    with rendered_broker(pki_dir) as broker:
        yield broker


@pytest.fixture
def revocable_broker(pki_dir: pki.PKIPaths) -> Iterator[RenderedBroker]:
    """A rendered broker of its own, for tests that revoke and reload."""
    with rendered_broker(pki_dir) as broker:
        yield broker


# --- device agent ---

from device_agent.config import AgentConfig, render_toml  # noqa: E402
from provisioning.factory import LineSettings, LocalFactoryCA, provision  # noqa: E402
from provisioning.registry import registrar  # noqa: E402
from simulator.device import AgentProcess  # noqa: E402
from simulator.monitor import TelemetryMonitor  # noqa: E402
from simulator.seed import seed_operational, write_agent_config  # noqa: E402


@pytest.fixture
def monitor(broker: Mosquitto, pki_dir: pki.PKIPaths,
            backend: ClientFiles) -> Iterator[TelemetryMonitor]:
    with TelemetryMonitor(port=broker.port, cafile=pki_dir.server_trust, cert=backend.cert,
                          key=backend.key) as telemetry:
        yield telemetry


@pytest.fixture
def operational_device(tmp_path: Path, request: pytest.FixtureRequest, swtpm: SoftwareTPM,
                       pki_dir: pki.PKIPaths, device_ca: pki.Authority,
                       broker: Mosquitto) -> AgentProcess:
    """A device that already holds an operational credential (no EST needed), not started."""
    device_id = "op-" + request.node.name.replace("test_", "")[:40].replace("_", "-")
    config = write_agent_config(tmp_path / "device", device_id, swtpm.tcti, pki_dir, broker.port)
    seed_operational(config, swtpm.tcti, device_ca)
    return AgentProcess(config, swtpm.env)


# --- PKI and EST server ---
# The server is the real est-server command (a supervisor and two workers) on a free
# 127.0.0.1 port; the process helpers live in tests/est_support.py.

from .est_support import ESTServer, running_est_server  # noqa: E402


@pytest.fixture(scope="session")
def est_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.PKIPaths:
    """A PKI of its own, so the EST tests' revocations and CRLs touch no broker test."""
    return pki.init_pki(tmp_path_factory.mktemp("est-pki"))


@pytest.fixture(scope="session")
def factory_ca(est_pki: pki.PKIPaths) -> pki.Authority:
    return pki.read_authority(est_pki.factory_ca)


@pytest.fixture(scope="session")
def est_server(tmp_path_factory: pytest.TempPathFactory,
               est_pki: pki.PKIPaths) -> Iterator[ESTServer]:
    """Refuses unknown devices (the default policy); certificates live an hour."""
    with running_est_server(tmp_path_factory.mktemp("est-server"), est_pki,
                            certificate_lifetime="1h") as server:
        yield server


@pytest.fixture(scope="session")
def enrollment_server(tmp_path_factory: pytest.TempPathFactory,
                      pki_dir: pki.PKIPaths) -> Iterator[ESTServer]:
    """The EST server of the broker's PKI, issuing 20-second certificates."""
    with running_est_server(tmp_path_factory.mktemp("agent-est"), pki_dir,
                            certificate_lifetime="20s") as server:
        yield server


def factory_device(directory: Path, device_id: str, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths,
                   est: ESTServer, broker: Mosquitto, fraction: float = 2 / 3,
                   recovery_url: str | None = None) -> AgentProcess:
    """Provisioned by the factory script's code (with ``recovery_url``, the EST server's
    recovery listener, if given), then only its speed knobs turned for a fast test."""
    line = LineSettings(est_url=f"https://127.0.0.1:{est.port}", broker_host="127.0.0.1",
                        broker_port=broker.port, server_trust=pki_dir.server_trust,
                        state_dir=directory / "state", api_socket=directory / "api.sock",
                        recovery_url=recovery_url)
    provision(device_id, swtpm.tcti, directory / "etc", LocalFactoryCA(pki_dir), line,
              registrar(est.registry_path))
    return fast_agent(directory / "etc" / "agent.toml", swtpm.env, fraction)


def fast_agent(config_path: Path, env: dict[str, str], fraction: float = 2 / 3) -> AgentProcess:
    """The factory's agent.toml with test-speed knobs only (telemetry period, retry cap,
    renewal fraction); where the device enrolls, recovers and publishes stays as provisioned."""
    config = AgentConfig.load(config_path)
    config = dataclasses.replace(
        config, mqtt=dataclasses.replace(config.mqtt, telemetry_interval=0.25),
        renewal=dataclasses.replace(config.renewal, retry_max=4.0, fraction=fraction))
    config_path.write_text(render_toml(config))
    return AgentProcess(config_path, env)
