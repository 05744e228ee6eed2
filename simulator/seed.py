"""A device's files without EST: an agent.toml, and an operational credential in its TPM.

Shared by the tests and the benchmarks, which need a device that is already
enrolled so that what they measure is the agent and the broker, not EST.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from device_agent._files import write_private
from device_agent.config import (
    AgentConfig,
    APISection,
    DeviceSection,
    ESTSection,
    MQTTSection,
    PathsSection,
    RenewalSection,
    render_toml,
)
from device_agent.credentials import CertificateFacts, CredentialStore
from device_agent.keystore import open_keystore
from provisioning import pki


def write_agent_config(directory: Path, device_id: str, tcti: str, pki_paths: pki.PKIPaths,
                       broker_port: int, est_url: str = "https://127.0.0.1:9",
                       telemetry_interval: float = 0.2, fraction: float = 2 / 3) -> Path:
    """An agent.toml for a device living in ``directory``."""
    config = AgentConfig(
        device=DeviceSection(device_id, tcti),
        paths=PathsSection(directory / "state", directory / "bootstrap.pem",
                           directory / "bootstrap.tss", pki_paths.server_trust),
        est=ESTSection(est_url, timeout=10),
        mqtt=MQTTSection("127.0.0.1", broker_port, keepalive=10,
                         telemetry_interval=telemetry_interval),
        renewal=RenewalSection(fraction=fraction, jitter=0.05, retry_max=5),
        api=APISection(directory / "api.sock"),
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "agent.toml").write_text(render_toml(config))
    return directory / "agent.toml"


def seed_operational(config_path: Path, tcti: str, authority: pki.Authority,
                     lifetime: dt.timedelta = dt.timedelta(hours=1)) -> None:
    """Give a device an operational credential directly, as if it had enrolled."""
    config = AgentConfig.load(config_path)
    with open_keystore(tcti) as tpm:
        blob = tpm.create_key()
    cert = authority.issue_client(config.device.id, blob.public_key(), lifetime)
    store = CredentialStore(config.paths.state_dir)
    pem = pki.cert_pem(cert)
    store.activate(store.stage(blob, pem, CertificateFacts.of(pem)))


def issue_file_client(directory: Path, authority: pki.Authority, name: str,
                      lifetime: dt.timedelta = dt.timedelta(days=1)) -> tuple[Path, Path]:
    """A client certificate with a software key (back-end services, baselines, refusals):
    ``<name>.pem`` (leaf and intermediates) and ``<name>.key`` (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = authority.issue_client(name, key.public_key(), lifetime)
    return (write_private(directory / f"{name}.pem",
                          pki.cert_pem(cert, *authority.chain[:-1]), 0o644),
            write_private(directory / f"{name}.key", pki.key_pem(key)))
