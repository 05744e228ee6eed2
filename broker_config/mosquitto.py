"""Mosquitto configuration: one mutual-TLS listener, identities from certificates, ACL.

The broker trusts only the Device CA for clients, takes the MQTT username and
client ID from the certificate CN, and confines each device to its own topic
tree. The dynamic security plugin is loaded only as a switch for revocation:
it holds deny-only state (see revocation.py) and defers every other decision
to the ACL file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TLS12_CIPHERS = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:" \
    "ECDHE-ECDSA-CHACHA20-POLY1305"
TLS13_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"


@dataclass(frozen=True)
class BrokerSettings:
    """What a Mosquitto deployment needs to know; paths are absolute.

    ``clientid_from_identity`` makes the client ID the certificate CN: Mosquitto
    2.0 lets any client take over a session by its client ID, whoever owns it,
    so without this one device can kick another off and inherit its queued
    messages. The cost: two clients with one certificate evict each other, so
    each back-end worker needs an identity of its own. ``render_broker`` (the
    shipped path) turns it on; the default stays off for older callers.
    """

    port: int
    client_ca: Path
    certfile: Path
    keyfile: Path
    data_dir: Path
    crlfile: Path | None = None
    crl_dir: Path | None = None
    backend_identity: str | None = None
    bind: str = "127.0.0.1"
    user: str = "mosquitto"
    admin_identity: str | None = None
    dynsec_plugin: Path | None = None
    dynsec_config: Path | None = None
    pid_file: Path | None = None
    clientid_from_identity: bool = False
    # Back-end subscribers beyond the first, each with its own certificate (the client ID is
    # the CN): ``<backend_identity>-2`` .. ``-N``, for a monitor that shares its subscription.
    backend_workers: int = 1
    # Mosquitto's broker-wide queue per client (its default 1000): what a back-end session
    # may fall behind by before the broker drops messages for it. Devices queue little.
    max_queued_messages: int | None = None

    def backend_identities(self) -> tuple[str, ...]:
        if not self.backend_identity:
            return ()
        base = self.backend_identity
        return (base, *(f"{base}-{n}" for n in range(2, self.backend_workers + 1)))

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        for name in ("client_ca", "certfile", "keyfile", "data_dir", "crlfile", "crl_dir",
                     "dynsec_plugin",
                     "dynsec_config", "pid_file"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_absolute():
                raise ValueError(f"{name} must be an absolute path")
        if (self.dynsec_plugin is None) != (self.dynsec_config is None):
            raise ValueError("dynsec_plugin and dynsec_config go together")
        if self.admin_identity is not None and self.dynsec_plugin is None:
            raise ValueError("an admin identity needs the dynamic security plugin")
        if not 1 <= self.backend_workers <= 64:
            raise ValueError(f"backend_workers must be 1-64, got {self.backend_workers}")
        if self.max_queued_messages is not None and self.max_queued_messages < 1:
            raise ValueError("max_queued_messages must be positive")
        names = [*self.backend_identities(), *([self.admin_identity] if self.admin_identity
                                                else [])]
        if len(set(names)) != len(names):
            raise ValueError("the back-end and admin identities must differ")


def render_acl(settings: BrokerSettings) -> str:
    """Each device reads and writes under ``devices/<its CN>/``; the back end reads all
    telemetry and status and writes commands; the admin talks only to the plugin."""
    lines = ["# Devices: the certificate CN is the username.", "pattern readwrite devices/%u/#", ""]
    for backend in settings.backend_identities():
        lines += [
            f"user {backend}",
            "topic read devices/+/telemetry/#",
            "topic read devices/+/status",
            "topic write devices/+/commands/#",
            "topic read devices/+/responses/#",
            "",
        ]
    if settings.admin_identity:
        lines += [
            f"user {settings.admin_identity}",
            f"topic write {DYNSEC_TOPIC}",
            f"topic read {DYNSEC_TOPIC}/response",
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
        # Nagle delays the small CONNACK/PUBACK packets by ~40 ms each.
        "set_tcp_nodelay true",
        f"acl_file {acl_file}",
    ]
    if settings.pid_file:
        lines.append(f"pid_file {settings.pid_file}")
    if settings.max_queued_messages is not None:
        lines.append(f"max_queued_messages {settings.max_queued_messages}")
    if settings.dynsec_plugin and settings.dynsec_config:
        lines += [f"plugin {settings.dynsec_plugin}",
                  f"plugin_opt_config_file {settings.dynsec_config}"]
    lines += [
        "",
        f"listener {settings.port} {settings.bind}",
        "protocol mqtt",
        "tls_version tlsv1.2",
        f"ciphers {TLS12_CIPHERS}",
        f"ciphers_tls1.3 {TLS13_CIPHERSUITES}",
        f"cafile {settings.client_ca}",
        f"certfile {settings.certfile}",
        f"keyfile {settings.keyfile}",
        "require_certificate true",
        "use_identity_as_username true",
    ]
    if settings.clientid_from_identity:
        lines.append("use_username_as_clientid true")
    if settings.crlfile:
        lines.append(f"crlfile {settings.crlfile}")
    if settings.crl_dir:
        lines.append(f"capath {settings.crl_dir}")
    return "\n".join(lines) + "\n"
