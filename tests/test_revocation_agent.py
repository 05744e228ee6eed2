"""`device-pki revoke --broker`: a running TPM-backed agent is cut off and stays out."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioning import pki
from simulator.processes import SoftwareTPM

from .conftest import RenderedBroker, factory_device, rendered_broker
from .est_support import ESTServer

pytestmark = pytest.mark.integration


@pytest.fixture
def own_broker(pki_dir: pki.PKIPaths) -> Iterator[RenderedBroker]:
    with rendered_broker(pki_dir) as broker:
        yield broker


def test_revoke_ends_the_live_session_and_the_device_cannot_return(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths,
    enrollment_server: ESTServer,
    own_broker: RenderedBroker,
) -> None:
    # a renewal in the middle would bring a new, unrevoked certificate: renew late
    agent = factory_device(tmp_path / "dev", "revoked-1", swtpm, pki_dir, enrollment_server,
                           own_broker.mosquitto, fraction=0.9)
    broker_log = own_broker.mosquitto.process
    with agent:
        status = agent.wait_for(lambda s: s.get("connected"), 30, "connection")
        offset = broker_log.log_offset()
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "provisioning.cli", "revoke", status["cert_serial"],
             "--reason", "keyCompromise", "--pki", str(pki_dir.base),
             "--registry", str(enrollment_server.registry_path), "--crl",
             str(tmp_path / "crl.pem"), "--broker", str(own_broker.layout.base)],
            capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        ended = "Client revoked-1 been disconnected by administrative action"
        while ended not in broker_log.log_since(offset):
            assert time.monotonic() - started < 10, broker_log.log_since(offset)
            time.sleep(0.01)
        cut_off = time.monotonic() - started
        time.sleep(5)
        after = agent.status()
    print(f"\ndevice-pki revoke to disconnection: {cut_off * 1000:.0f} ms")
    assert not after["connected"]
    assert after["link"]["connects"] == 1
    assert after["link"]["connect_failures"] >= 1
    after_kick = broker_log.log_since(offset).split(ended, 1)[1]
    assert "as revoked-1" not in after_kick  # never admitted again
    assert "certificate verify failed" in after_kick
