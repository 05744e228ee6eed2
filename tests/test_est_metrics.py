"""est-server's Prometheus metrics: scraped from the real server (two workers) while a device
enrolls, renews and is refused; and the worker-side counting that feeds them."""

from __future__ import annotations

import base64
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from device_agent.errors import ConfigError
from provisioning import est_config, pki
from provisioning._est_metrics import BUCKETS, CRLWatch, WorkerMetrics, merge, render, scrape
from simulator.processes import require

from .est_support import (
    ESTServer,
    bootstrap_identity,
    csr_der,
    enroll,
    new_key,
    post,
    running_est_server,
    save_identity,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> Samples:
    """The exposition format's samples; every non-comment line must be one."""
    samples: Samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels = frozenset(_LABEL.findall(match[2] or ""))
        samples[(match[1], labels)] = float(match[3])
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def get(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(reply.read().decode())


def until(port: int, ok: Callable[[Samples], bool], what: str, timeout: float = 15.0
          ) -> Samples:
    """Scrape until ``ok``: workers write their counts once a second."""
    deadline = time.monotonic() + timeout
    while True:
        samples = get(port)
        if ok(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never showed {what}: {samples}")
        time.sleep(0.2)


@pytest.fixture
def metrics_server(tmp_path: Path, est_pki: pki.PKIPaths) -> Iterator[ESTServer]:
    with running_est_server(tmp_path / "server", est_pki, metrics=True,
                            certificate_lifetime="1h") as server:
        yield server


@pytest.mark.integration
def test_counters_move_as_a_device_enrolls_renews_and_is_refused(
        metrics_server: ESTServer, factory_ca: pki.Authority, tmp_path: Path) -> None:
    server = metrics_server
    assert server.metrics_port is not None
    port = server.metrics_port
    before = until(port, lambda s: value(s, "est_workers_reporting") == 2, "both workers")
    assert value(before, "est_crl_readable") == 0  # nothing published by this server yet

    # a request without a client certificate: refused at the edge, no audit row
    device_id = "metrics-dev-1"
    boot = bootstrap_identity(tmp_path, factory_ca, device_id)
    reply = post(server, "simpleenroll", base64.encodebytes(csr_der(new_key(), device_id)), None)
    assert reply.status == 401
    # a bootstrap certificate the registry does not know: refused by the policy
    assert enroll(server, boot, new_key()).status == 403
    refused = until(port, lambda s: value(s, "est_refusals_total", reason="no-certificate")
                    >= value(before, "est_refusals_total", reason="no-certificate") + 1
                    and value(s, "est_refusals_total", reason="policy-403") >= 1
                    and value(s, "est_requests_total", endpoint="simpleenroll", code="4xx") >= 2,
                    "the two refusals")
    assert value(refused, "est_requests_total", endpoint="simpleenroll", code="4xx") == 2
    assert value(refused, "est_decisions_total", operation="simpleenroll",
                 outcome="refused") == 1

    # allowlisted: enrolled, then renewed (which supersedes, so the CRL is published)
    with server.registry() as registry:
        registry.register_device(device_id, boot.certificate)
    key = new_key()
    reply = enroll(server, boot, key)
    assert reply.status == 200, reply.text
    operational = save_identity(tmp_path, "operational", device_id, reply.certificates()[0], key)
    assert enroll(server, operational, new_key(), "simplereenroll").status == 200
    # each worker writes its counts once a second, each on its own clock: wait for both
    after = until(port, lambda s: value(s, "est_issuances_total", kind="renew") == 1
                  and value(s, "est_issuances_total", kind="enroll") == 1
                  and value(s, "est_request_duration_seconds_count", endpoint="simpleenroll")
                  == 3 and value(s, "est_crl_readable") == 1, "the renewal and the CRL")
    assert value(after, "est_issuances_total", kind="recover") == 0  # a series from the start
    assert value(after, "est_requests_total", endpoint="simpleenroll", code="2xx") == 1
    assert value(after, "est_requests_total", endpoint="simplereenroll", code="2xx") == 1
    # the latency histogram: every answered request once, in cumulative buckets
    count = value(after, "est_request_duration_seconds_count", endpoint="simpleenroll")
    assert count == 3
    assert value(after, "est_request_duration_seconds_bucket", endpoint="simpleenroll",
                 le="+Inf") == count
    assert 0 < value(after, "est_request_duration_seconds_sum", endpoint="simpleenroll") < 30
    # the CRL was just published: young, and its nextUpdate (7 days by default) ahead
    assert 0 <= value(after, "est_crl_age_seconds") < 60
    assert 6 * 86400 < value(after, "est_crl_next_update_seconds") <= 7 * 86400

    # curl, as an operator would
    text = subprocess.run([require("curl"), "-sS", "--fail", f"http://127.0.0.1:{port}/metrics"],
                          capture_output=True, text=True, timeout=20, check=True).stdout
    assert "# TYPE est_issuances_total counter" in text
    assert value(parse(text), "est_issuances_total", kind="renew") == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10):
        pass
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=10)
        raise AssertionError("a path other than /metrics answered")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404


def test_a_restarted_worker_continues_from_its_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "worker-0.json"
    first = WorkerMetrics(path)
    first.count("est_issuances_total", kind="enroll")
    first.refusals["no-certificate"] += 2
    first.request("simpleenroll", "2xx", 0.03)
    first.save()
    second = WorkerMetrics(path)  # its successor, with counts of its own
    second.count("est_issuances_total", kind="enroll")
    second.refusals["no-certificate"] += 1
    second.request("simpleenroll", "2xx", 100.0)
    second.save()
    other = WorkerMetrics(tmp_path / "worker-1.json")
    other.count("est_issuances_total", kind="renew")
    other.save()
    samples = parse(scrape(tmp_path, CRLWatch(tmp_path / "no-crl.pem")))
    assert value(samples, "est_issuances_total", kind="enroll") == 2
    assert value(samples, "est_issuances_total", kind="renew") == 1
    assert value(samples, "est_refusals_total", reason="no-certificate") == 3
    assert value(samples, "est_workers_reporting") == 2
    assert value(samples, "est_crl_readable") == 0
    histogram = "est_request_duration_seconds_bucket"
    assert value(samples, histogram, endpoint="simpleenroll", le="0.05") == 1
    assert value(samples, histogram, endpoint="simpleenroll", le=str(int(BUCKETS[-1]))) == 1
    assert value(samples, histogram, endpoint="simpleenroll", le="+Inf") == 2
    assert value(samples, "est_request_duration_seconds_sum",
                 endpoint="simpleenroll") == pytest.approx(100.03)


def test_label_values_are_escaped_and_bad_rows_skipped() -> None:
    snapshot = {"counters": [["est_refusals_total", {"reason": 'a"b\\c\nd'}, 1],
                             ["broken"], ["est_x_total", {}, "NaN?"]],
                "histograms": [["est_request_duration_seconds", {}, [1, 2]]]}
    text = render(merge([snapshot]), {})
    assert 'est_refusals_total{reason="a\\"b\\\\c\\nd"} 1' in text
    assert "broken" not in text and "est_x_total" not in text
    assert "est_request_duration_seconds" not in text


def test_metrics_config_is_off_unless_asked_and_never_on_an_est_port(tmp_path: Path) -> None:
    base = '[server]\nport = 8443\nrecovery_port = 8444\n[pki]\ndirectory = "pki"\n'
    path = tmp_path / "est.toml"
    path.write_text(base)
    assert est_config.load(path).metrics_port is None
    path.write_text(base + "[metrics]\nport = 9464\n")
    config = est_config.load(path)
    assert (config.metrics_host, config.metrics_port) == ("127.0.0.1", 9464)
    for bad in ("port = 8444", "port = 9464\nbind = 1", 'port = "9464"'):
        path.write_text(base + f"[metrics]\n{bad}\n")
        with pytest.raises(ConfigError, match="metrics"):
            est_config.load(path)
