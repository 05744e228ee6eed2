"""Mutual TLS with the key in the TPM, against the real Mosquitto broker."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from device_agent.tls import client_context
from provisioning import pki
from simulator.processes import Mosquitto, SoftwareTPM, require
from simulator.tpm_trace import count_commands, flush_capture

from .conftest import ClientFiles, issue_file_client
from .isolated import run_isolated

pytestmark = pytest.mark.integration


def tpm_context(device: ClientFiles, cafile: Path, tcti: str) -> ssl.SSLContext:
    return client_context(certfile=device.cert, keyfile=device.key, cafile=cafile, tcti=tcti)


def mqtt_round_trip(device: ClientFiles, cafile: Path, tcti: str, port: int) -> dict[str, str]:
    """Connect with the TPM key, subscribe to our telemetry, publish once, read it back."""
    topic = f"devices/{device.device_id}/telemetry"
    received = threading.Event()
    result: dict[str, str] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device.device_id,
                         protocol=mqtt.MQTTv5)
    client.tls_set_context(tpm_context(device, cafile, tcti))

    def on_connect(c: mqtt.Client, _u: object, _f: object, reason: object, _p: object) -> None:
        result["connect"] = str(reason)
        c.subscribe(topic, qos=1)

    def on_subscribe(c: mqtt.Client, _u: object, _m: object, reasons: list, _p: object) -> None:
        c.publish(topic, b'{"seq": 1}', qos=1)

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        result["payload"] = message.payload.decode()
        received.set()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        received.wait(10)
        sock = client.socket()
        result["tls"] = sock.version() if isinstance(sock, ssl.SSLSocket) else "none"
    finally:
        client.disconnect()
        client.loop_stop()
    return result


def handshake_commands(device: ClientFiles, cafile: Path, tcti: str, port: int,
                       handshakes: int) -> Counter[str]:
    """TPM commands seen by the provider's TCTI over ``handshakes`` TLS handshakes."""
    context = tpm_context(device, cafile, f"pcap:{tcti}")
    for _ in range(handshakes):
        with context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                 server_hostname="127.0.0.1") as tls:
            tls.do_handshake()
    flush_capture()
    return count_commands(Path(os.environ["TCTI_PCAP_FILE"]))


def mosquitto_sub(backend: ClientFiles, cafile: Path, port: int, topic: str,
                  count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [require("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(port), "--cafile", str(cafile),
         "--cert", str(backend.cert), "--key", str(backend.key), "-t", topic, "-C", str(count),
         "-W", "20", "-q", "1", "-V", "mqttv5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def refused_by_broker(broker: Mosquitto, cafile: Path, *args: str) -> str:
    """Try a TLS publish with mosquitto_pub; return what the broker logged about it.

    Asserts the client failed and the broker never admitted a client session.
    """
    before = broker.process.log_offset()
    result = subprocess.run(
        [require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(broker.port), "--cafile",
         str(cafile), "-t", "devices/x/telemetry", "-m", "hello", "-q", "1", "-V", "mqttv5",
         *args],
        capture_output=True, text=True, timeout=20, check=False,
    )
    time.sleep(0.2)
    logged = broker.process.log_since(before)
    assert result.returncode != 0, result
    assert "New client connected" not in logged
    return logged


def test_publish_subscribe_round_trip_over_mtls_with_tpm_key(
    device: ClientFiles, backend: ClientFiles, pki_dir: pki.PKIPaths,
    swtpm: SoftwareTPM, broker: Mosquitto,
) -> None:
    topic = f"devices/{device.device_id}/telemetry"
    independent = mosquitto_sub(backend, pki_dir.server_trust, broker.port, topic, 1)
    time.sleep(0.5)  # let mosquitto_sub subscribe before the device publishes
    result = run_isolated(mqtt_round_trip, device, pki_dir.server_trust, swtpm.tcti, broker.port)
    out, err = independent.communicate(timeout=30)
    assert result["connect"] == "Success"
    assert result["payload"] == '{"seq": 1}'
    assert result["tls"] == "TLSv1.3"
    assert out.strip() == '{"seq": 1}', err


def test_a_handshake_costs_the_tpm_one_signature_and_nothing_the_cpu_can_do(
    device: ClientFiles, pki_dir: pki.PKIPaths, swtpm: SoftwareTPM, broker: Mosquitto,
    tmp_path: Path,
) -> None:
    def run(handshakes: int, name: str) -> Counter[str]:
        capture = tmp_path / f"{name}.pcap"  # the pcap TCTI appends: one file per run
        return run_isolated(handshake_commands, device, pki_dir.server_trust, swtpm.tcti,
                            broker.port, handshakes, env={"TCTI_PCAP_FILE": str(capture)})

    run(1, "warm-up")  # a TPM's first signature after start-up may be answered "retry"
    one, four = run(1, "one"), run(4, "four")
    extra = four - one
    assert all(count % 3 == 0 for count in extra.values()), extra
    per_handshake = Counter({name: count // 3 for name, count in extra.items()})
    # The provider reads the curve parameters and hashes the signed data itself;
    # key exchange, digests of the transcript and chain verification stay on the CPU.
    assert per_handshake == Counter({"ECC_Parameters": 1, "Hash": 1, "Sign": 1})


def test_handshake_passes_under_the_kernel_resource_manager_limit(
    device: ClientFiles, pki_dir: pki.PKIPaths, swtpm: SoftwareTPM, broker: Mosquitto,
) -> None:
    assert "--max-transients=3" in (swtpm.abrmd.argv if swtpm.abrmd else [])
    result = run_isolated(mqtt_round_trip, device, pki_dir.server_trust, swtpm.tcti, broker.port)
    assert result["connect"] == "Success"


def test_broker_refuses_a_client_certificate_from_an_untrusted_ca(
    tmp_path: Path, pki_dir: pki.PKIPaths, broker: Mosquitto,
) -> None:
    rogue = pki.new_root("Device CA", pki.CA_LIFETIME, ecdsa=True)  # same name, other key
    client = issue_file_client(tmp_path, rogue, "dev-rogue")
    logged = refused_by_broker(broker, pki_dir.server_trust,
                               "--cert", str(client.cert), "--key", str(client.key))
    assert "certificate verify failed" in logged


def test_broker_refuses_a_bootstrap_certificate(
    tmp_path: Path, pki_dir: pki.PKIPaths, broker: Mosquitto,
) -> None:
    factory = pki.read_authority(pki_dir.factory_ca)
    client = issue_file_client(tmp_path, factory, "dev-bootstrap")
    logged = refused_by_broker(broker, pki_dir.server_trust,
                               "--cert", str(client.cert), "--key", str(client.key))
    assert "certificate verify failed" in logged


def test_broker_refuses_a_client_without_certificate(
    pki_dir: pki.PKIPaths, broker: Mosquitto,
) -> None:
    logged = refused_by_broker(broker, pki_dir.server_trust)
    assert "peer did not return a certificate" in logged


def test_broker_refuses_a_plaintext_connection(broker: Mosquitto) -> None:
    before = broker.process.log_offset()
    result = subprocess.run(
        [require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(broker.port), "-t",
         "devices/x/telemetry", "-m", "hello", "-V", "mqttv5"],
        capture_output=True, text=True, timeout=20, check=False,
    )
    time.sleep(0.2)
    logged = broker.process.log_since(before)
    assert result.returncode != 0
    assert "wrong version number" in logged and "New client connected" not in logged


def test_client_context_trusts_only_the_given_anchor(
    pki_dir: pki.PKIPaths, backend: ClientFiles,
) -> None:
    context = client_context(certfile=backend.cert, keyfile=backend.key,
                             cafile=pki_dir.server_trust)
    anchors = [c["subject"] for c in context.get_ca_certs()]
    assert anchors == [((("commonName", "Device Identity Root CA"),),)]
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
