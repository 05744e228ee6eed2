"""The agent's health counters, its Prometheus textfile, and the [metrics] config keys."""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path

import pytest

from device_agent.config import AgentConfig, render_toml
from device_agent.errors import ConfigError
from device_agent.health import Health, job_tpm_error, textfile, write_textfile

_SAMPLE = re.compile(r"^(device_agent_[a-z_]+)(?:\{(.*)\})? (\S+)$")

BASE = """
[device]
id = "dev-1"
tcti = "device:/dev/tpmrm0"
[paths]
state_dir = "/var/lib/device-agent"
bootstrap_cert = "/etc/device-agent/bootstrap.pem"
bootstrap_key = "/etc/device-agent/bootstrap.key"
server_trust = "/etc/device-agent/trust.pem"
[est]
url = "https://est.example:8443"
[mqtt]
host = "broker.example"
"""


def samples(text: str) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        out[(match[1], match[2] or "")] = float(match[3])
    return out


def test_health_counts_jobs_tpm_errors_and_connections_across_links() -> None:
    health = Health()
    assert health.fields(0) == {"tpm_errors": 0, "connects": 0, "reconnects": 0,
                                "last_renewal": None, "credential_jobs": {}}
    health.job_done("renew", "failed", "TPM busy", at=1000.0)
    health.job_done("clock", "failed", "no answer")  # not a renewal: not counted
    health.job_done("renew", "issued", at=2000.0)
    health.tpm_error()
    health.link_closed(3)  # the first generation's link connected 3 times
    fields = health.fields(1)
    assert fields["connects"] == 4 and fields["reconnects"] == 3
    assert fields["tpm_errors"] == 1
    assert fields["credential_jobs"] == {"renew:failed": 1, "renew:issued": 1}
    assert fields["last_renewal"]["outcome"] == "issued"
    assert fields["last_renewal"]["at"] == "1970-01-01T00:33:20Z"


def test_a_credential_jobs_tpm_failure_is_recognised_from_its_answer() -> None:
    assert job_tpm_error('log line\n{"outcome": "failed", "error": "x", "tpm": true}\n')
    assert not job_tpm_error('{"outcome": "failed", "error": "x", "retry_after": null}')
    assert not job_tpm_error("Traceback ...\nnot json")
    assert not job_tpm_error("")


def test_the_textfile_says_what_the_status_says() -> None:
    health = Health()
    health.job_done("recovery", "refused", "403 too late", at=1234.5)
    health.tpm_error()
    status = {"device_id": 'dev-"1"', "state": "operational", "keystore": "tpm",
              "generation": 4, "cert_expires_in_s": 3599.5, "connected": True,
              "outbox_depth": 7, "outbox_dropped": 2, "errors": ["a", "b"], "updated": 99.0,
              **health.fields(2)}
    text = textfile(status)
    values = samples(text)
    assert values[("device_agent_certificate_expiry_seconds", "")] == 3599.5
    assert values[("device_agent_outbox_depth", "")] == 7
    assert values[("device_agent_outbox_dropped_total", "")] == 2
    assert values[("device_agent_reconnects_total", "")] == 1
    assert values[("device_agent_tpm_errors_total", "")] == 1
    assert values[("device_agent_connected", "")] == 1
    assert values[("device_agent_errors", "")] == 2
    assert values[("device_agent_credential_jobs_total",
                   'outcome="refused",work="recovery"')] == 1
    assert values[("device_agent_last_renewal_timestamp_seconds", "")] == 1234.5
    assert values[("device_agent_last_renewal_success", "")] == 0
    assert ("device_agent_info", 'device_id="dev-\\"1\\"",keystore="tpm",'
                                 'state="operational"') in values
    assert "# TYPE device_agent_tpm_errors_total counter" in text
    # no certificate yet: no expiry sample at all (0 would read as "expires now")
    bare = samples(textfile({"device_id": "d", "cert_expires_in_s": None, "connected": False}))
    assert ("device_agent_certificate_expiry_seconds", "") not in bare
    assert ("device_agent_last_renewal_success", "") not in bare


def test_the_textfile_is_replaced_whole_and_readable_by_node_exporter(tmp_path: Path) -> None:
    path = tmp_path / "device_agent.prom"
    write_textfile(path, {"device_id": "d", "outbox_depth": 1})
    write_textfile(path, {"device_id": "d", "outbox_depth": 2})
    assert samples(path.read_text())[("device_agent_outbox_depth", "")] == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["device_agent.prom"]  # no temp left


def test_metrics_config_is_off_by_default_and_validated() -> None:
    config = AgentConfig.from_toml(BASE)
    assert config.metrics.textfile is None
    on = AgentConfig.from_toml(BASE + '[metrics]\ntextfile = "/run/ne/device_agent.prom"\n')
    assert on.metrics.textfile == Path("/run/ne/device_agent.prom")
    assert AgentConfig.from_toml(render_toml(on)) == on
    with pytest.raises(ConfigError, match=r"\[metrics\] textfile"):
        AgentConfig.from_toml(BASE + '[metrics]\ntextfile = "/run/ne/agent.txt"\n')
    with pytest.raises(ConfigError, match=r"\[metrics\] interval"):
        AgentConfig.from_toml(BASE + "[metrics]\ninterval = 0\n")
    assert json.dumps(on.metrics.interval) == "15.0"
