"""Persistent sessions across CRL refreshes (issue 14's soak lost messages here).

Mosquitto 2.0 re-checks every client's credentials on SIGHUP, offline sessions too,
and refuses those (no TLS connection to take the identity from): a session restored
after a restart is thrown away with what arrives for it until it reconnects, though
the publisher got a success PUBACK. The CRL refresh reloaded the broker, so a
refresh landing between a broker restart and the back end's reconnect lost
telemetry. Now a CRL reaches the broker through its hashed CRL directory
(broker_config/crl_dir.py) and nothing reloads it. Judged by what the back end
receives and the PUBACK reason codes, never by the log.
"""

from __future__ import annotations

import queue
import ssl
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker_config import revocation
from provisioning import pki

from .conftest import BACKEND_ID, ClientFiles, RenderedBroker, issue_file_client
from .test_broker import close, connect, crl_with

pytestmark = pytest.mark.integration

NO_MATCHING_SUBSCRIBERS = 0x10
TOPIC = "devices/+/telemetry"


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory, device_ca: pki.Authority
               ) -> dict[str, ClientFiles]:
    directory = tmp_path_factory.mktemp("session-clients")
    return {name: issue_file_client(directory, device_ca, name) for name in ("dev-s", BACKEND_ID)}


def backend_session(creds: ClientFiles, trust: Path, port: int,
                    received: queue.Queue[bytes]) -> mqtt.Client:
    """The back end as it runs: a persistent session (clean start off, an hour's expiry)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=creds.device_id,
                         protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    context = ssl.create_default_context(cafile=str(trust))
    context.load_cert_chain(str(creds.cert), str(creds.key))
    client.tls_set_context(context)
    subscribed = queue.Queue[int]()
    client.on_message = lambda _c, _u, message: received.put(bytes(message.payload))
    client.on_subscribe = lambda _c, _u, _m, reasons, _p: subscribed.put(reasons[0].value)
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", port, keepalive=30, clean_start=False, properties=properties)
    client.loop_start()
    client.subscribe(TOPIC, qos=1)
    assert subscribed.get(timeout=5) == 1
    return client


def stop(client: mqtt.Client) -> None:
    client.disconnect()
    client.loop_stop()
    client._reset_sockets()  # noqa: SLF001 - see test_broker.close


def drain(received: queue.Queue[bytes], count: int, timeout: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            got.append(received.get(timeout=0.1))
        except queue.Empty:
            pass
    return got


def test_a_crl_refresh_after_a_restart_keeps_the_offline_back_ends_session(
        revocable_broker: RenderedBroker, identities: dict[str, ClientFiles],
        pki_dir: pki.PKIPaths, device_ca: pki.Authority) -> None:
    trust, broker = pki_dir.server_trust, revocable_broker
    received: queue.Queue[bytes] = queue.Queue()
    stop(backend_session(identities[BACKEND_ID], trust, broker.port, received))
    broker.mosquitto.restart()  # the back end's session now comes from the persistence file

    device = connect(identities["dev-s"], trust, broker.port)
    try:
        assert device.publish("devices/dev-s/telemetry", b"1") == 0
        time.sleep(1.1)  # a strictly later thisUpdate, as every re-issued CRL has
        refreshed = revocation.refresh_crl(broker.layout.base, crl_with(device_ca, []))
        assert refreshed.installed and refreshed.running
        time.sleep(0.5)
        codes = [device.publish("devices/dev-s/telemetry", str(n).encode()) for n in (2, 3)]
    finally:
        close(device)
    assert codes == [0, 0], "the back end's session was dropped: no subscriber left"

    client = backend_session(identities[BACKEND_ID], trust, broker.port, received)
    try:
        assert sorted(drain(received, 3)) == [b"1", b"2", b"3"]
    finally:
        stop(client)
