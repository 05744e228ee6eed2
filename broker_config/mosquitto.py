"""Mosquitto configuration: one mutual-TLS listener, identities from certificates, ACL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device_agent._files import write_private

TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" \
    "ECDHE-ECDSA-CHACHA20-POLY1305"


@dataclass(frozen=True)
class BrokerSettings:
    """What a Mosquitto deployment needs to know; paths are absolute."""

    port: int
    client_ca: Path
    certfile: Path
    keyfile: Path
    data_dir: Path
    crlfile: Path | None = None
    backend_identity: str | None = None
    bind: str = "127.0.0.1"
    user: str = "mosquitto"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        for name in ("client_ca", "certfile", "keyfile", "data_dir"):
            if not Path(getattr(self, name)).is_absolute():
                raise ValueError(f"{name} must be an absolute path")


def render_acl(settings: BrokerSettings) -> str:
    """Each device reads and writes under ``devices/<its CN>/``; the back end reads all
    telemetry and status and writes commands."""
    lines = ["# Devices: the certificate CN is the username.", "pattern readwrite devices/%u/#", ""]
    if settings.backend_identity:
        lines += [
            f"user {settings.backend_identity}",
            "topic read devices/+/telemetry/#",
            "topic read devices/+/telemetry",
            "topic read devices/+/status",
            "topic write devices/+/commands/#",
            "topic read devices/+/responses/#",
            "",
        ]
    return "\n".join(lines)


def render_conf(settings: BrokerSettings, acl_file: Path) -> str:
    lines = [
        f"user {settings.user}",
        "per_listener_settings false",
        "allow_anonymous false",
        "persistence true",
        f"persistence_location {settings.data_dir}/",
        "autosave_interval 1",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        f"acl_file {acl_file}",
        "",
        f"listener {settings.port} {settings.bind}",
        "protocol mqtt",
        "tls_version tlsv1.2",
        f"ciphers {TLS12_CIPHERS}",
        f"cafile {settings.client_ca}",
        f"certfile {settings.certfile}",
        f"keyfile {settings.keyfile}",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    if settings.crlfile:
        lines.append(f"crlfile {settings.crlfile}")
    return "\n".join(lines) + "\n"


def write_config(settings: BrokerSettings, out_dir: Path) -> Path:
    """Write ``mosquitto.conf`` and ``acl`` into ``out_dir``; returns the config path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    acl = write_private(out_dir / "acl", render_acl(settings).encode(), 0o644)
    return write_private(out_dir / "mosquitto.conf", render_conf(settings, acl).encode(), 0o644)
