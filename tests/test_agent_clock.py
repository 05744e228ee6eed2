"""A device whose clock is set right while it runs: the real agent under libfaketime.

The device boots with its RTC reset to 1970, enrolls on the EST server's time, and then
NTP sets its clock right. libfaketime reads the device's time from a file the test
rewrites (FAKETIME_TIMESTAMP_FILE, re-read every second); "@1970-01-02 00:00:00" is a
clock that starts at the RTC's reset value and runs, "+0" is the real time.
Certificates live 40 seconds, so the scheduled renewal comes some 25 seconds after
the first enrollment: well after the clock was set right.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from provisioning import pki
from provisioning.registry import CertKind
from simulator.device import AgentProcess
from simulator.monitor import TelemetryMonitor
from simulator.processes import Mosquitto, SoftwareTPM, require_library

from .conftest import factory_device
from .est_support import ESTServer, running_est_server

pytestmark = pytest.mark.integration

FAKETIME = "faketime/libfaketime.so.1"
RTC_RESET = "@1970-01-02 00:00:00"  # a clock that starts there and runs
REAL_TIME = "+0"  # an offset of nothing: libfaketime reports the real time
FIFTY_YEARS = 50 * 365 * 86400


def set_clock(timestamp_file: Path, setting: str) -> None:
    """Replace the file whole: libfaketime never reads a half-written setting."""
    partial = timestamp_file.with_suffix(".partial")
    partial.write_text(setting + "\n")
    os.replace(partial, timestamp_file)


def enrollment_decisions(est: ESTServer, device: str) -> list[tuple[str, str]]:
    with est.registry() as registry:
        return [(e.action, e.decision) for e in registry.audit_log(device)
                if e.action in ("simpleenroll", "simplereenroll", "recovery")]


def issued_kinds(est: ESTServer, device: str) -> list[CertKind]:
    with est.registry() as registry:
        return [r.kind for r in registry.certificates(device)]


@pytest.mark.timeout(240)
def test_a_device_first_booted_at_1970_whose_clock_is_corrected_gets_one_certificate_then_renews(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, broker: Mosquitto,
    monitor: TelemetryMonitor,
) -> None:
    device_id = "clock-1"
    clock = tmp_path / "faketime.rc"
    set_clock(clock, RTC_RESET)
    with running_est_server(tmp_path / "est", pki_dir, certificate_lifetime="40s") as est:
        factory = factory_device(tmp_path / "dev", device_id, swtpm, pki_dir, est, broker)
        agent = AgentProcess(factory.config_path, {
            **factory.env, "LD_PRELOAD": require_library(FAKETIME),
            "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_CACHE_DURATION": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
        # Nothing else in the environment: the agent once added TPM2OPENSSL_TCTI from its
        # enrollment thread while libfaketime's getenv() read the environment on others
        # (a segfault about one run in twenty-five); tls.bind_provider_tcti fixed that.
        assert "FAKETIME" not in agent.env and "TPM2OPENSSL_TCTI" not in agent.env
        generations: list[int] = []

        def seen(status: dict[str, Any]) -> dict[str, Any]:
            number = status.get("generation")
            if number is not None and (not generations or generations[-1] != number):
                generations.append(number)
            return status

        try:
            with agent:
                # first boot at 1970: enrolled on the EST server's time, connected, publishing
                booted = agent.wait_for(
                    lambda s: seen(s)["connected"] and s["clock_offset_s"] is not None, 60,
                    "enrollment on the EST server's time")
                assert monitor.wait_until(lambda: len(monitor.seqs(device_id)) >= 3, 20)
                assert issued_kinds(est, device_id) == [CertKind.BOOTSTRAP,
                                                        CertKind.OPERATIONAL]

                # NTP sets the clock right
                set_clock(clock, REAL_TIME)
                corrected = agent.wait_for(
                    lambda s: seen(s)["clock_offset_s"] is None and s["connected"], 20,
                    "the offset dropped and the link back")
                sent_before = agent.status()["last_seq"]
                assert monitor.wait_until(
                    lambda: max(monitor.seqs(device_id), default=0) > sent_before, 20), \
                    "no telemetry after the clock was set right"
                kinds_after_correction = issued_kinds(est, device_id)

                # the scheduled renewal, on the real clock
                renewed = agent.wait_for(lambda s: seen(s)["generation"] == 2 and s["connected"],
                                         60, "the scheduled renewal")
                kinds_after_renewal = issued_kinds(est, device_id)  # before gen 2's renewal
                decisions = enrollment_decisions(est, device_id)
                sent_before = agent.status()["last_seq"]
                assert monitor.wait_until(
                    lambda: max(monitor.seqs(device_id), default=0) > sent_before, 20), \
                    "no telemetry after the renewal"
                assert agent.stop() == 0
            final = agent.status()
            last = final["last_seq"]
            assert monitor.wait_until(lambda: not monitor.missing(device_id, 1, last), 20), \
                monitor.missing(device_id, 1, last)[:20]
        except AssertionError:
            popen = agent.process.popen if agent.process else None
            print(f"--- agent exit status {popen.poll() if popen else None} (nonzero or "
                  "negative: it died before the test stopped it); its log ---\n"
                  + agent.log_text()[-6000:])
            raise

    assert booted["generation"] == 1
    assert booted["clock_offset_s"] > FIFTY_YEARS  # it really ran at 1970
    # the same certificate, kept across the correction: no re-enrollment, no recovery
    assert (corrected["generation"], corrected["cert_serial"]) == (1, booted["cert_serial"])
    assert kinds_after_correction == [CertKind.BOOTSTRAP, CertKind.OPERATIONAL]
    # one ordinary renewal: a new TPM key, one more operational certificate
    assert renewed["key_sha256"] != booted["key_sha256"]
    assert kinds_after_renewal == [CertKind.BOOTSTRAP, CertKind.OPERATIONAL,
                                   CertKind.OPERATIONAL], kinds_after_renewal
    assert decisions == [("simpleenroll", "issued"), ("simplereenroll", "issued")], decisions
    assert generations == [1, 2], generations
    assert final["outbox_depth"] == 0
