"""est-server.toml, validated when loaded: an error names the key; unknown keys are errors.

```toml
[server]
host = "127.0.0.1"        # loopback unless an operator says otherwise
port = 8443
recovery_port = 8444      # the recovery listener (expired certificates); absent: none
workers = 2               # processes sharing the port (SO_REUSEPORT); default: CPU count
max_body_bytes = 16384
max_in_flight = 64        # per worker; beyond it 503 + Retry-After
busy_retry_after = 5
shutdown_timeout = 10
handshake_timeout = 10    # seconds from connect to a finished TLS handshake
idle_timeout = 15         # from the handshake or the last answer to a complete request head
body_timeout = 10         # to receive a request body once its head is in; beyond it 408
max_connections = 1000    # per listener and worker; when full, the quietest idle one makes room
max_connections_per_peer = 256  # per worker and client IP address
refusal_log_interval = 10 # at most one log line per refusal kind per worker per interval

[pki]
directory = "/var/lib/device-pki"
passphrase_file = "/etc/device-pki/passphrase"   # optional
registry = "/var/lib/device-pki/registry.sqlite3"  # default: <directory>/registry.sqlite3;
                          # or "postgresql://est@db.example/registry" (shared by servers)
crl = "/var/lib/device-pki/device-ca/crl.pem"  # published after supersedes; this default
registry_sync = "full"    # or "normal": no fsync per enrollment (see below)

[policy]
unknown_devices = "refuse"     # or "pending": 202 until `device-pki approve`
pending_retry_after = 60
require_new_key = true
certificate_lifetime = "7d"    # or "90s", "12h", or an integer number of seconds
recovery_grace = "90d"         # how long after expiry a certificate may still recover
recoveries_per_day = 3         # per device, rolling 24 h; beyond it 429 + Retry-After
bootstrap_reenroll = "active"  # or "never": an enrolled device may not use its bootstrap again
bootstrap_reenrolls_per_day = 3
renewals_per_day = 24          # per device, rolling 24 h; beyond it 429 + Retry-After
key_attestation = "off"        # or "optional", "required": TPM2_Certify evidence in the CSR

[metrics]                      # absent: no metrics listener
port = 9464                    # Prometheus text format, GET /metrics, plain HTTP
host = "127.0.0.1"             # the default; the supervisor serves it (_est_metrics.py)
```

Relative paths are read from the configuration file's directory.

``pki.registry`` as a ``postgresql://`` URL (libpq's syntax; ``?host=/run/postgresql``
for a unix socket) puts the registry in PostgreSQL, which several est-server hosts
share; the schema is created at the first start. Daily budgets and first enrollments
are decided inside the registry's write transaction, so they hold across servers.

The connection keys (``handshake_timeout`` to ``refusal_log_interval``) bound
what a client that never authenticates can hold: a socket that sends nothing
is closed after ``handshake_timeout``, a TLS connection without a request after
``idle_timeout``; ``max_connections_per_peer`` counts by IP address, so a fleet
behind one NAT address may need it raised (a newcomer over it is refused). A
full listener (``max_connections``) makes room for a newcomer by closing the
connection that has been quiet longest, never one with a request in progress;
evictions, refusals and failed TLS handshakes are counted in the refusal log
lines. Each worker raises its file-descriptor limit to fit the connections (or
lowers them to fit the limit, with one ``descriptor-limit`` warning).

``renewals_per_day`` bounds how many certificates one credential can obtain by
renewing (each renewal supersedes the device's older certificates). It must
allow a renewal every half lifetime, ``2 * 24h / certificate_lifetime``; left
out, it is 24 or four renewals per lifetime, whichever is more (a 20 s
certificate in a test, renewed every ~13 s, needs thousands a day).

``registry_sync = "normal"`` trades durability for throughput: after a power
cut (not a crash of the server) the last issuance records may be gone. Such a
certificate is then "not on record", so the device cannot renew with it and
falls back to simpleenroll with its bootstrap certificate; but the registry
cannot revoke it by device, only by the serial in the server's log. Operator
commands (device-pki) always write with a full sync.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_agent.errors import ConfigError

from .enrollment import BootstrapReenroll, KeyAttestation, Policy, UnknownDevices
from .pki import PKIPaths
from .registry import is_url

# [server] keys for the connection edge (_est_guard.py), read with their defaults' types.
_EDGE_KEYS = ("handshake_timeout", "idle_timeout", "body_timeout", "max_connections",
              "max_connections_per_peer", "refusal_log_interval")
_DURATION = re.compile(r"(\d+)\s*([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DAY = dt.timedelta(days=1)


def renewals_needed(lifetime: dt.timedelta) -> int:
    """The fewest renewals a day that let every device renew at half its certificate's life."""
    return math.ceil(2 * _DAY / lifetime)


def default_renewals(lifetime: dt.timedelta) -> int:
    """24, or four renewals per certificate lifetime when that is more."""
    if lifetime < dt.timedelta(seconds=1):
        return Policy.renewals_per_day  # the lifetime itself is refused
    return max(Policy.renewals_per_day, 2 * renewals_needed(lifetime))


@dataclass(frozen=True)
class ServerConfig:
    pki_dir: Path
    registry: Path | str  # a SQLite file, or a postgresql:// URL
    crl: Path | None = None  # None: the PKI's device-ca/crl.pem
    passphrase_file: Path | None = None
    registry_sync: str = "full"
    host: str = "127.0.0.1"
    port: int = 8443
    recovery_port: int | None = None
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_body_bytes: int = 16384
    max_in_flight: int = 64
    busy_retry_after: int = 5
    shutdown_timeout: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 15.0
    body_timeout: float = 10.0
    max_connections: int = 1000
    max_connections_per_peer: int = 256
    refusal_log_interval: float = 10.0
    policy: Policy = Policy()
    certificate_lifetime: dt.timedelta = dt.timedelta(days=7)
    metrics_port: int | None = None  # [metrics] port; None: no metrics listener
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        renewals = (renewals_needed(self.certificate_lifetime)
                    if self.certificate_lifetime >= dt.timedelta(seconds=1) else 1)
        checks = {
            "server.port": 0 < self.port < 65536,
            "server.recovery_port (not the port)": self.recovery_port is None
            or (0 < self.recovery_port < 65536 and self.recovery_port != self.port),
            "metrics.port (not an EST port)": self.metrics_port is None
            or (0 < self.metrics_port < 65536
                and self.metrics_port not in (self.port, self.recovery_port)),
            "server.workers": 1 <= self.workers <= 64,
            "server.max_body_bytes": 256 <= self.max_body_bytes <= 1 << 20,
            "server.max_in_flight": self.max_in_flight >= 1,
            "server.busy_retry_after": self.busy_retry_after >= 1,
            "server.shutdown_timeout": self.shutdown_timeout > 0,
            "server.handshake_timeout": 0 < self.handshake_timeout <= 300,
            "server.idle_timeout": 0 < self.idle_timeout <= 3600,
            "server.body_timeout": 0 < self.body_timeout <= 300,
            "server.max_connections": self.max_connections >= 1,
            "server.max_connections_per_peer (at most max_connections)":
            1 <= self.max_connections_per_peer <= self.max_connections,
            "server.refusal_log_interval": 0 < self.refusal_log_interval <= 3600,
            "policy.certificate_lifetime": self.certificate_lifetime.total_seconds() >= 1,
            f"policy.renewals_per_day (at least {renewals} for this certificate_lifetime)":
            self.policy.renewals_per_day >= renewals,
            "pki.registry_sync (full or normal)": self.registry_sync in ("full", "normal"),
        }
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"{key}: out of range")

    @property
    def pki(self) -> PKIPaths:
        return PKIPaths(self.pki_dir)

    def passphrase(self) -> bytes | None:
        if self.passphrase_file is None:
            return None
        try:
            return self.passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(f"pki.passphrase_file: cannot read: {exc.strerror}") from exc


def parse_duration(value: object, key: str) -> dt.timedelta:
    if isinstance(value, int) and not isinstance(value, bool):
        return dt.timedelta(seconds=value)
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{key}: expected seconds or a duration such as 90s, 15m, 12h, 7d")
    return dt.timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def _take(table: dict[str, Any], section: str, key: str, kind: type, default: Any) -> Any:
    value = table.pop(key, default)
    if value is default:
        return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{section}.{key}: expected {kind.__name__}")
    return value


def load(path: str | Path) -> ServerConfig:
    source = Path(path)
    try:
        data = tomllib.loads(source.read_text())
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    base = source.parent

    def section(name: str) -> dict[str, Any]:
        table = data.pop(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        return dict(table)

    server, pki, policy = section("server"), section("pki"), section("policy")
    metrics = section("metrics")
    if data:
        raise ConfigError(f"{source}: unknown section [{next(iter(data))}]")
    directory = _take(pki, "pki", "directory", str, None)
    if directory is None:
        raise ConfigError(f"{source}: pki.directory is required")
    pki_dir = base / directory
    registry = _take(pki, "pki", "registry", str, None)
    crl = _take(pki, "pki", "crl", str, None)
    secret = _take(pki, "pki", "passphrase_file", str, None)
    defaults = ServerConfig(pki_dir, pki_dir)
    try:
        unknown = UnknownDevices(_take(policy, "policy", "unknown_devices", str, "refuse"))
    except ValueError:
        raise ConfigError(f"{source}: policy.unknown_devices: refuse or pending") from None
    try:
        again = BootstrapReenroll(_take(policy, "policy", "bootstrap_reenroll", str, "active"))
    except ValueError:
        raise ConfigError(f"{source}: policy.bootstrap_reenroll: active or never") from None
    try:
        attestation = KeyAttestation(_take(policy, "policy", "key_attestation", str, "off"))
    except ValueError:
        raise ConfigError(f"{source}: policy.key_attestation: required, optional or off") \
            from None
    lifetime = policy.pop("certificate_lifetime", None)
    lifetime = (parse_duration(lifetime, "policy.certificate_lifetime")
                if lifetime is not None else defaults.certificate_lifetime)
    grace = policy.pop("recovery_grace", None)
    try:
        rules = Policy(
            unknown_devices=unknown,
            require_new_key=_take(policy, "policy", "require_new_key", bool, True),
            pending_retry_after=_take(policy, "policy", "pending_retry_after", int, 60),
            recovery_grace=(parse_duration(grace, "policy.recovery_grace") if grace is not None
                            else Policy.recovery_grace),
            recoveries_per_day=_take(policy, "policy", "recoveries_per_day", int, 3),
            bootstrap_reenroll=again,
            bootstrap_reenrolls_per_day=_take(policy, "policy", "bootstrap_reenrolls_per_day",
                                              int, 3),
            renewals_per_day=_take(policy, "policy", "renewals_per_day", int,
                                   default_renewals(lifetime)),
            key_attestation=attestation)
    except ValueError as exc:
        raise ConfigError(f"{source}: policy: {exc}") from exc
    config = ServerConfig(
        pki_dir=pki_dir,
        registry=(registry if registry and is_url(registry) else
                  base / registry if registry else PKIPaths(pki_dir).registry),
        crl=base / crl if crl else None,
        passphrase_file=base / secret if secret else None,
        registry_sync=_take(pki, "pki", "registry_sync", str, "full"),
        host=_take(server, "server", "host", str, defaults.host),
        port=_take(server, "server", "port", int, defaults.port),
        recovery_port=_take(server, "server", "recovery_port", int, None),
        workers=_take(server, "server", "workers", int, defaults.workers),
        max_body_bytes=_take(server, "server", "max_body_bytes", int, defaults.max_body_bytes),
        max_in_flight=_take(server, "server", "max_in_flight", int, defaults.max_in_flight),
        busy_retry_after=_take(server, "server", "busy_retry_after", int,
                               defaults.busy_retry_after),
        shutdown_timeout=_take(server, "server", "shutdown_timeout", float,
                               defaults.shutdown_timeout),
        **{key: _take(server, "server", key, type(getattr(defaults, key)),
                      getattr(defaults, key)) for key in _EDGE_KEYS},
        policy=rules,
        certificate_lifetime=lifetime,
        metrics_port=_take(metrics, "metrics", "port", int, None),
        metrics_host=_take(metrics, "metrics", "host", str, defaults.metrics_host),
    )
    for name, table in (("server", server), ("pki", pki), ("policy", policy),
                        ("metrics", metrics)):
        if table:
            raise ConfigError(f"{source}: {name}.{next(iter(table))}: unknown key")
    return config
