"""The end-to-end demo behind ``make demo``: what exists today, on real components.

Starts swtpm + tpm2-abrmd, a fresh PKI and Mosquitto on 127.0.0.1; creates a
device key inside the TPM; has the Device CA certify it from a TPM-signed CSR;
connects to the broker over mutual TLS with the TPM key; publishes one
telemetry message and receives it back, while an independent back-end
subscriber (mosquitto_sub) sees it too. Prints each step.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import ssl
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import paho.mqtt.client as mqtt

from device_agent.tls import active_provider, client_context
from device_agent.tpm import TPM, build_csr
from provisioning import pki

from .processes import require
from .stack import LocalStack

DEVICE_ID = "demo-device-1"


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def publish_and_receive(cert: Path, key: Path, cafile: Path, tcti: str, port: int,
                        env: dict[str, str]) -> dict[str, str]:
    """Runs in a fresh interpreter: the TPM provider is process-wide."""
    os.environ.update(env)
    topic = f"devices/{DEVICE_ID}/telemetry"
    payload = json.dumps({"device": DEVICE_ID, "seq": 1, "temperature_c": 21.5})
    done = threading.Event()
    result: dict[str, str] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=DEVICE_ID,
                         protocol=mqtt.MQTTv5)
    client.tls_set_context(client_context(certfile=cert, keyfile=key, cafile=cafile, tcti=tcti))
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, *_: c.publish(topic, payload, qos=1)

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        result["received"] = message.payload.decode()
        done.set()

    client.on_message = on_message
    started = time.perf_counter()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not done.wait(15):
            raise TimeoutError("the message did not come back from the broker")
        sock = client.socket()
        result["tls"] = sock.version() if isinstance(sock, ssl.SSLSocket) else "?"
        result["seconds"] = f"{time.perf_counter() - started:.3f}"
        provider = active_provider()
        result["provider"] = provider.version if provider else "?"
        result["sent"] = payload
    finally:
        client.disconnect()
        client.loop_stop()
    return result


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="device-identity-demo-") as tmp:
        directory = Path(tmp)
        step("starting D-Bus, swtpm + tpm2-abrmd (3 transients per connection, as "
             "/dev/tpmrm0), a fresh PKI and Mosquitto on 127.0.0.1")
        with LocalStack(directory) as stack:
            step(f"TPM on {stack.tpm.tcti}; broker on 127.0.0.1:{stack.broker.port} (mTLS only)")
            with TPM(stack.tpm.tcti) as tpm:
                blob = tpm.create_key()
                key_path = blob.write(directory / "device.tss")
                step(f"created an ECC P-256 key inside the TPM under SRK 0x81000001: "
                     f"attributes {blob.attributes}; key file {key_path.name} (mode 0600, "
                     "TPM-wrapped)")
                with tpm.loaded(blob) as key:
                    csr = build_csr(key, DEVICE_ID)
            step(f"CSR signed by the TPM: signature valid={csr.is_signature_valid}")
            cert = stack.device_ca.issue_client(DEVICE_ID, csr.public_key(), dt.timedelta(hours=1))
            cert_path = directory / "device.pem"
            cert_path.write_bytes(pki.cert_pem(cert))
            step(f"Device CA issued serial {cert.serial_number:x} to "
                 f"{cert.subject.rfc4514_string()}, valid until "
                 f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")

            backend = stack.file_client("backend")
            topic = f"devices/{DEVICE_ID}/telemetry"
            subscriber = subprocess.Popen(
                [require("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(stack.broker.port),
                 "--cafile", str(stack.pki.server_trust), "--cert", str(backend.cert),
                 "--key", str(backend.key), "-t", topic, "-C", "1", "-W", "20", "-q", "1",
                 "-V", "mqttv5"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            time.sleep(0.5)
            env = {"DBUS_SESSION_BUS_ADDRESS": stack.bus.address}
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                result = pool.submit(publish_and_receive, cert_path, key_path,
                                     stack.pki.server_trust, stack.tpm.tcti, stack.broker.port,
                                     env).result(60)
            step(f"device connected over {result['tls']} with its TPM key (tpm2-openssl "
                 f"{result['provider']}), published {result['sent']} at QoS 1 and got it back "
                 f"in {result['seconds']} s")
            out, err = subscriber.communicate(timeout=30)
            if subscriber.returncode != 0 or not out.strip():
                raise SystemExit(f"back-end subscriber failed: {err.strip()}")
            step(f"independent back-end subscriber received: {out.strip()}")
        step("stopped every process; demo complete")


if __name__ == "__main__":
    main()
