"""factory.toml, the factory signing service's settings, validated when loaded: an error
names the key; unknown sections and keys are errors; relative paths are read from the
file's directory."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from device_agent.errors import ConfigError

from . import pki
from .registry import is_url


@dataclass(frozen=True)
class ServiceConfig:
    """factory.toml, validated when loaded; relative paths are read from its directory.

    ```toml
    [server]
    host = "127.0.0.1"
    port = 9443
    rate = 5.0               # per station: requests per second (token bucket)
    burst = 10               # per station: bucket size
    max_body_bytes = 16384
    unavailable_retry_after = 5   # Retry-After of a 503 (registry unreachable)
    [pki]
    directory = "/var/lib/device-pki"   # its factory-ca/ signs; nothing else is read
    passphrase_file = "/etc/device-pki/passphrase"   # optional
    registry = "/var/lib/device-pki/registry.sqlite3"   # or a postgresql:// URL
    [stations]
    directory = "/var/lib/factory-ca/stations"   # factory-ca init makes it
    [attestation]
    manufacturer_roots = "tpm-makers.pem"   # absent: CSRs with key attestation are refused
    manufacturer_intermediates = "tpm-maker-chains.pem"   # optional
    required = false         # true: a CSR without TPM2_Certify evidence is refused
    ```
    """

    pki_directory: Path
    registry: Path | str  # a SQLite file, or a postgresql:// URL
    stations: Path
    host: str = "127.0.0.1"
    port: int = 9443
    rate: float = 5.0
    burst: int = 10
    max_body_bytes: int = 16384
    unavailable_retry_after: int = 5
    passphrase_file: Path | None = None
    require_attestation: bool = False
    manufacturer_roots: tuple[x509.Certificate, ...] = ()
    manufacturer_intermediates: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"[server] port {self.port} out of range")
        if not self.rate > 0 or self.burst < 1:
            raise ConfigError("[server] rate must be > 0 and burst >= 1")
        if self.max_body_bytes < 256:
            raise ConfigError("[server] max_body_bytes must be at least 256")

    def passphrase(self) -> bytes | None:
        if self.passphrase_file is None:
            return None
        try:
            return self.passphrase_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {self.passphrase_file}: {exc.strerror}") from exc


_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "server": {"host": str, "port": int, "rate": (int, float), "burst": int,
               "max_body_bytes": int, "unavailable_retry_after": int},
    "pki": {"directory": str, "passphrase_file": str, "registry": str},
    "stations": {"directory": str},
    "attestation": {"required": bool, "manufacturer_roots": str,
                    "manufacturer_intermediates": str},
}


def load_config(path: str | Path) -> ServiceConfig:
    path = Path(path)
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    for section, table in data.items():
        if section not in _KEYS or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]")
        for key, value in table.items():
            kind = _KEYS[section].get(key)
            if kind is None:
                raise ConfigError(f"{path}: unknown key {section}.{key}")
            if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
                raise ConfigError(f"{path}: {section}.{key} has the wrong type")
    base = path.parent

    def where(section: str, key: str, required: bool = True) -> Path | None:
        value = data.get(section, {}).get(key)
        if value is None:
            if required:
                raise ConfigError(f"{path}: {section}.{key} is required")
            return None
        return base / Path(value)

    pki_dir = where("pki", "directory")
    stations = where("stations", "directory")
    assert pki_dir is not None and stations is not None
    server = data.get("server", {})

    def certificates(key: str) -> tuple[x509.Certificate, ...]:
        where_ = where("attestation", key, False)
        if where_ is None:
            return ()
        try:
            return tuple(x509.load_pem_x509_certificates(where_.read_bytes()))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: attestation.{key} {where_}: {exc}") from exc

    return ServiceConfig(
        manufacturer_roots=certificates("manufacturer_roots"),
        manufacturer_intermediates=certificates("manufacturer_intermediates"),
        pki_directory=pki_dir, stations=stations,
        registry=(data["pki"]["registry"] if is_url(data.get("pki", {}).get("registry", ""))
                  else where("pki", "registry", False) or pki.PKIPaths(pki_dir).registry),
        passphrase_file=where("pki", "passphrase_file", False),
        require_attestation=data.get("attestation", {}).get("required", False),
        **{key: value for key, value in server.items()})
