"""agent.toml: valid files load; every malformed key is named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.config import AgentConfig, render_toml
from device_agent.errors import ConfigError

VALID = """
[device]
id = "dev-0001"
tcti = "tabrmd:bus_type=session"

[paths]
state_dir = "/var/lib/device-agent"
bootstrap_cert = "/etc/device-agent/bootstrap.pem"
bootstrap_key = "/etc/device-agent/bootstrap.tss"
server_trust = "/etc/device-agent/trust.pem"

[est]
url = "https://est.example:8443"

[mqtt]
host = "broker.example"
port = 8883
telemetry_interval = 10
"""


def test_valid_config_loads_with_defaults() -> None:
    config = AgentConfig.from_toml(VALID)
    assert config.device.id == "dev-0001"
    assert config.paths.state_dir == Path("/var/lib/device-agent")
    assert config.mqtt.telemetry_interval == 10.0
    assert config.renewal.fraction == pytest.approx(2 / 3)
    assert config.outbox.drop_policy == "oldest"


def test_rendered_config_loads_back_equal() -> None:
    config = AgentConfig.from_toml(VALID)
    again = AgentConfig.from_toml(render_toml(config))
    assert again == config


@pytest.mark.parametrize(("change", "message"), [
    (("port = 8883", 'port = "x"'), r"\[mqtt\] port: must be an integer"),
    (("port = 8883", "port = 70000"), r"\[mqtt\] port: must be 1-65535"),
    (('id = "dev-0001"', 'id = "dev/1"'), r"\[device\] id: malformed device ID"),
    (('url = "https://est.example:8443"', 'url = "http://est.example"'), r"\[est\] url: must be"),
    (('state_dir = "/var/lib/device-agent"', 'state_dir = "relative"'),
     r"\[paths\] state_dir: must be an absolute path"),
    (("[mqtt]", "[mqtt]\nretain = true"), r"\[mqtt\] retain: unknown key"),
    (('host = "broker.example"', ""), r"\[mqtt\] host: missing"),
    (("[est]", "[estt]"), r"\[estt\]: unknown section"),
    (("telemetry_interval = 10", "telemetry_interval = -1"), r"telemetry_interval"),
    (('tcti = "tabrmd:bus_type=session"', 'tcti = "tabrmd"'), r"\[device\] tcti: expected"),
])
def test_malformed_key_is_named(change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AgentConfig.from_toml(VALID.replace(*change), "agent.toml")


def test_not_toml_is_refused() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        AgentConfig.from_toml("[device\nid=", "agent.toml")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        AgentConfig.load(tmp_path / "agent.toml")


def test_renewal_fraction_and_jitter_must_leave_room() -> None:
    with pytest.raises(ConfigError, match=r"\[renewal\] jitter"):
        AgentConfig.from_toml(VALID + "\n[renewal]\nfraction = 0.9\njitter = 0.2\n")


def test_the_attestation_key_is_optional_and_an_absolute_path() -> None:
    assert AgentConfig.from_toml(VALID).paths.attestation_key is None
    text = VALID.replace('server_trust = "/etc/device-agent/trust.pem"',
                         'server_trust = "/etc/device-agent/trust.pem"\n'
                         'attestation_key = "/etc/device-agent/attestation.tss"')
    config = AgentConfig.from_toml(text)
    assert config.paths.attestation_key == Path("/etc/device-agent/attestation.tss")
    assert AgentConfig.from_toml(render_toml(config)) == config
    with pytest.raises(ConfigError, match=r"\[paths\] attestation_key: must be an absolute"):
        AgentConfig.from_toml(text.replace('"/etc/device-agent/attestation.tss"', '"ak.tss"'))
