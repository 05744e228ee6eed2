"""agent.toml, validated when loaded: every error names the key and the problem.

The factory script writes this file (provisioning/factory.py); a fleet operator
may edit it. Unknown keys are errors, not silently ignored typos.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from .errors import ConfigError
from .identity import validate_device_id


@dataclass(frozen=True)
class DeviceSection:
    id: str
    tcti: str = "device:/dev/tpmrm0"


@dataclass(frozen=True)
class PathsSection:
    state_dir: Path
    bootstrap_cert: Path
    bootstrap_key: Path
    server_trust: Path
    attestation_key: Path | None = None  # the factory's AK (TSS2 key file): every CSR then
    # carries TPM2_Certify evidence for its key (a TPM keystore only)


@dataclass(frozen=True)
class ESTSection:
    url: str
    recovery_url: str | None = None
    timeout: float = 30.0


@dataclass(frozen=True)
class MQTTSection:
    host: str
    port: int = 8883
    keepalive: int = 60
    telemetry_interval: float = 60.0
    status_interval: float = 300.0
    reconnect_window: float = 2.0  # seconds over which the first attempt after a lost
    # connection is spread; size it to the devices per broker / handshakes the broker takes a second
    reconnect_max: float = 10.0  # backoff ceiling while the broker's host answers


@dataclass(frozen=True)
class RenewalSection:
    fraction: float = 2 / 3
    jitter: float = 0.05
    retry_max: float = 300.0


@dataclass(frozen=True)
class OutboxSection:
    max_messages: int = 100_000
    drop_policy: Literal["oldest", "newest"] = "oldest"
    inflight: int = 20


@dataclass(frozen=True)
class APISection:
    socket: Path | None = None
    group: str | None = None
    max_payload: int = 128 * 1024  # bytes of JSON a local publish may carry; keep under the
    # broker's message_size_limit


@dataclass(frozen=True)
class MetricsSection:
    textfile: Path | None = None  # a Prometheus textfile for node_exporter (health.py); off
    interval: float = 15.0  # seconds between rewrites of it


@dataclass(frozen=True)
class AgentConfig:
    device: DeviceSection
    paths: PathsSection
    est: ESTSection
    mqtt: MQTTSection
    renewal: RenewalSection = field(default_factory=RenewalSection)
    outbox: OutboxSection = field(default_factory=OutboxSection)
    api: APISection = field(default_factory=APISection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    source: str = "<memory>"

    @classmethod
    def load(cls, path: str | Path) -> AgentConfig:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text") from exc
        return cls.from_toml(text, str(path))

    @classmethod
    def from_toml(cls, text: str, source: str = "<memory>") -> AgentConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<memory>") -> AgentConfig:
        sections: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
        for name in data:
            if name not in known:
                raise ConfigError(f"{source}: [{name}]: unknown section")
        for name in known:
            section_type = hints[name]
            if name not in data:
                if _required(cls, name):
                    raise ConfigError(f"{source}: [{name}]: missing section")
                continue
            if not isinstance(data[name], dict):
                raise ConfigError(f"{source}: {name}: must be a table [{name}]")
            sections[name] = _section(section_type, data[name], f"{source}: [{name}]")
        config = cls(**sections, source=source)
        config._check(source)
        return config

    def _check(self, source: str) -> None:
        def fail(key: str, problem: str) -> ConfigError:
            return ConfigError(f"{source}: {key}: {problem}")

        try:
            validate_device_id(self.device.id)
        except ValueError as exc:
            raise fail("[device] id", str(exc)) from exc
        if ":" not in self.device.tcti:
            raise fail("[device] tcti", f"expected NAME:CONF such as device:/dev/tpmrm0, "
                                        f"got {self.device.tcti!r}")
        for key, url in (("url", self.est.url), ("recovery_url", self.est.recovery_url)):
            if url is not None and (urlsplit(url).scheme != "https" or not urlsplit(url).hostname):
                raise fail(f"[est] {key}", f"must be an https:// URL with a host, got {url!r}")
        if self.est.timeout <= 0:
            raise fail("[est] timeout", "must be positive")
        if not 0 < self.mqtt.port < 65536:
            raise fail("[mqtt] port", f"must be 1-65535, got {self.mqtt.port}")
        if not 5 <= self.mqtt.keepalive <= 65535:
            raise fail("[mqtt] keepalive", f"must be 5-65535 seconds, got {self.mqtt.keepalive}")
        if self.mqtt.telemetry_interval < 0:
            raise fail("[mqtt] telemetry_interval", "must be 0 (off) or positive")
        if not 1 <= self.mqtt.reconnect_max <= 3600:
            raise fail("[mqtt] reconnect_max",
                       f"must be 1-3600 seconds, got {self.mqtt.reconnect_max}")
        if not 0 <= self.mqtt.reconnect_window <= self.mqtt.reconnect_max:
            raise fail("[mqtt] reconnect_window", "must be 0 to reconnect_max seconds, got "
                                                  f"{self.mqtt.reconnect_window}")
        if not 0.1 <= self.renewal.fraction <= 0.95:
            raise fail("[renewal] fraction", f"must be 0.1-0.95, got {self.renewal.fraction}")
        if not 0 <= self.renewal.jitter < 1 - self.renewal.fraction:
            raise fail("[renewal] jitter", "must be >= 0 and leave room before expiry")
        if not 1 <= self.api.max_payload <= 256 * 1024:
            raise fail("[api] max_payload", f"must be 1-262144 bytes, got {self.api.max_payload}")
        if self.outbox.max_messages < 1 or self.outbox.inflight < 1:
            raise fail("[outbox]", "max_messages and inflight must be positive")
        if not 1 <= self.metrics.interval <= 3600:
            raise fail("[metrics] interval",
                       f"must be 1-3600 seconds, got {self.metrics.interval}")
        if self.metrics.textfile is not None and self.metrics.textfile.suffix != ".prom":
            raise fail("[metrics] textfile", "must end in .prom (node_exporter reads only "
                                             f"those), got {str(self.metrics.textfile)!r}")


def _required(cls: type, name: str) -> bool:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _section(section_type: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(section_type)
    kwargs: dict[str, Any] = {}
    for key in values:
        if key not in hints:
            raise ConfigError(f"{where} {key}: unknown key")
    for key, hint in hints.items():
        if key not in values:
            if _required(section_type, key):
                raise ConfigError(f"{where} {key}: missing")
            continue
        kwargs[key] = _coerce(values[key], hint, f"{where} {key}")
    return section_type(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a field's type; ints are accepted where floats are."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        return _coerce(value, options[0], where)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: must be one of {', '.join(map(repr, allowed))}, "
                              f"got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a path string, got {value!r}")
        if not Path(value).is_absolute():
            raise ConfigError(f"{where}: must be an absolute path, got {value!r}")
        return Path(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a non-empty string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


def render_toml(config: AgentConfig) -> str:
    """The file the factory writes; loading it gives back ``config``."""
    lines: list[str] = []
    for section in dataclasses.fields(config):
        if section.name == "source":
            continue
        lines.append(f"[{section.name}]")
        for item in dataclasses.fields(getattr(config, section.name)):
            value = getattr(getattr(config, section.name), item.name)
            if value is None:
                continue
            lines.append(f"{item.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
