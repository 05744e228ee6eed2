"""The rendered Mosquitto configuration, judged by the real broker's answers.

Clients here use software keys from files (the TPM path is tests/test_tls.py),
so paho runs in the test process without the TPM provider.
"""

from __future__ import annotations

import datetime as dt
import os
import pwd
import queue
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from broker_config import revocation
from broker_config.deploy import BrokerLayout, render_broker
from broker_config.errors import RevocationError
from broker_config.mosquitto import BrokerSettings, render_acl
from provisioning import pki
from simulator.processes import require

from .conftest import BACKEND_ID, ClientFiles, RenderedBroker, issue_file_client

NOT_AUTHORIZED = 0x87
ADMINISTRATIVE_ACTION = 0x98
QUIET = 1.0  # seconds to wait for a message that must not come


def accepted(reason: int) -> bool:
    """A success PUBACK: 0x00, or 0x10 when nobody subscribes."""
    return reason < 0x80


@dataclass
class Session:
    """A paho MQTT v5 client with a file key that records what the broker answers."""

    client: mqtt.Client
    acks: queue.Queue[tuple[str, list[int]]] = field(default_factory=queue.Queue)
    messages: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    events: list[tuple[float, str, int]] = field(default_factory=list)

    def publish(self, topic: str, payload: bytes = b"x", retain: bool = False) -> int:
        """Publish at QoS 1; the PUBACK reason code."""
        self.client.publish(topic, payload, qos=1, retain=retain)
        return self._ack("puback")[0]

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1; the SUBACK reason code."""
        self.client.subscribe(topic, qos=1)
        return self._ack("suback")[0]

    def _ack(self, kind: str) -> list[int]:
        got, codes = self.acks.get(timeout=5)
        assert got == kind
        return codes

    def next_message(self, timeout: float) -> tuple[str, bytes] | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def connected(self) -> bool:
        return bool(self.events) and self.events[-1][1] == "connect" and self.events[-1][2] == 0


def connect(creds: ClientFiles, trust: Path, port: int, client_id: str | None = None
            ) -> Session:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or creds.device_id,
                         protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    context = ssl.create_default_context(cafile=str(trust))
    context.load_cert_chain(str(creds.cert), str(creds.key))
    client.tls_set_context(context)
    session = Session(client)

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        session.events.append((time.monotonic(), "connect", reason.value))

    def on_disconnect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        session.events.append((time.monotonic(), "disconnect", reason.value))

    def on_publish(_c: Any, _u: Any, _m: Any, reason: Any, _p: Any) -> None:
        session.acks.put(("puback", [reason.value]))

    def on_subscribe(_c: Any, _u: Any, _m: Any, reasons: list[Any], _p: Any) -> None:
        session.acks.put(("suback", [r.value for r in reasons]))

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        session.messages.put((message.topic, bytes(message.payload)))

    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    client.on_publish, client.on_subscribe, client.on_message = on_publish, on_subscribe, on_message
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not session.events and time.monotonic() < deadline:
        time.sleep(0.01)
    return session


def close(*sessions: Session) -> None:
    for session in sessions:
        session.client.disconnect()
        session.client.loop_stop()
        # paho closes its wake-up socket pair only in __del__; the callbacks above make a
        # reference cycle, and the cycle collector may finalize the sockets first.
        session.client._reset_sockets()  # noqa: SLF001


def log_since(broker: RenderedBroker, offset: int) -> str:
    return broker.mosquitto.process.log_since(offset)


def log_size(broker: RenderedBroker) -> int:
    return broker.mosquitto.process.log_offset()


def refused(broker: RenderedBroker, trust: Path, *args: str) -> str:
    """A mosquitto_pub attempt that must fail; what the broker logged about it."""
    before = log_size(broker)
    result = subprocess.run(
        [require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(broker.port), "--cafile",
         str(trust), "-t", "devices/x/telemetry", "-m", "x", "-q", "1", "-V", "mqttv5", *args],
        capture_output=True, text=True, timeout=20, check=False,
    )
    time.sleep(0.2)
    logged = log_since(broker, before)
    assert result.returncode != 0, result
    assert "New client connected" not in logged, logged
    return logged


def s_client(broker: RenderedBroker, trust: Path, creds: ClientFiles, *args: str) -> str:
    """An ``openssl s_client`` handshake that must fail; what the broker logged."""
    before = log_size(broker)
    result = subprocess.run(
        [require("openssl"), "s_client", "-connect", f"127.0.0.1:{broker.port}", "-CAfile",
         str(trust), "-cert", str(creds.cert), "-key", str(creds.key), *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20, check=False,
    )
    time.sleep(0.2)
    assert result.returncode != 0, result.stdout[-500:]
    return log_since(broker, before)


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory, device_ca: pki.Authority
            ) -> dict[str, ClientFiles]:
    directory = tmp_path_factory.mktemp("broker-clients")
    names = ("dev-a", "dev-b", BACKEND_ID)
    return {name: issue_file_client(directory, device_ca, name) for name in names}


def crl_with(authority: pki.Authority, serials: list[int], when: dt.datetime | None = None
             ) -> bytes:
    """What provisioning's CRL publishing will produce: the Device CA's signed CRL."""
    now = when or dt.datetime.now(dt.UTC)
    builder = (x509.CertificateRevocationListBuilder().issuer_name(authority.name)
               .last_update(now).next_update(now + dt.timedelta(days=1)))
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
    crl = builder.sign(authority.key, hashes.SHA256())  # the Device CA's key is EC P-256
    return crl.public_bytes(serialization.Encoding.PEM)


def serial_of(creds: ClientFiles) -> int:
    return x509.load_pem_x509_certificate(creds.cert.read_bytes()).serial_number


# --- the renderer ------------------------------------------------------------------------


def test_rendered_directory_is_least_privilege(pki_dir: pki.PKIPaths, tmp_path: Path) -> None:
    layout = render_broker(pki_dir, tmp_path / "broker", port=18883, backend_identity="svc")
    conf = layout.conf.read_text().splitlines()
    for line in ("user mosquitto", "allow_anonymous false", "persistence true",
                 "listener 18883 127.0.0.1", "tls_version tlsv1.2", "require_certificate true",
                 "use_identity_as_username true", "use_username_as_clientid true",
                 f"cafile {layout.client_ca}", f"crlfile {layout.crl}", f"acl_file {layout.acl}"):
        assert line in conf
    assert [c for c in conf if c.startswith(("listener", "port "))] == ["listener 18883 127.0.0.1"]
    assert not any("password_file" in c or "psk" in c for c in conf)
    ciphers = next(c for c in conf if c.startswith("ciphers ")).split()[1].split(":")
    assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA20" in c) for c in ciphers)

    anchors = x509.load_pem_x509_certificates(layout.client_ca.read_bytes())
    assert [a.subject for a in anchors] == [
        pki.load_certs(pki_dir.device_ca / "chain.pem")[i].subject for i in range(2)]
    assert pki.load_certs(pki_dir.factory_ca / "ca.pem")[0] not in anchors
    crl = x509.load_pem_x509_crl(layout.crl.read_bytes())
    assert crl.issuer == anchors[0].subject and len(crl) == 0

    acl = layout.acl.read_text()
    assert "pattern readwrite devices/%u/#" in acl
    assert "user svc\ntopic read devices/+/telemetry/#" in acl
    assert "topic write devices/+/commands/#" in acl
    assert "user broker-admin\ntopic write $CONTROL/dynamic-security/v1\n" in acl

    broker_user = pwd.getpwnam("mosquitto")
    def owner(path: Path) -> tuple[int, int]:
        return path.stat().st_uid, path.stat().st_mode & 0o777
    if os.geteuid() == 0:
        assert owner(layout.conf) == (0, 0o640)
        assert owner(layout.server_key) == (0, 0o640)
        assert layout.server_key.stat().st_gid == broker_user.pw_gid
        assert owner(layout.acl) == (broker_user.pw_uid, 0o600)
        assert owner(layout.data) == (broker_user.pw_uid, 0o700)
        assert owner(layout.admin) == (0, 0o700)
    assert not list(layout.base.rglob("ca.key"))


def test_renderer_cli_and_settings_validation(pki_dir: pki.PKIPaths, tmp_path: Path) -> None:
    from broker_config.cli import main

    assert main(["render", "--pki", str(pki_dir.base), "--out", str(tmp_path / "b"),
                 "--port", "18884", "--backend-identity", "svc"]) == 0
    assert "listener 18884 127.0.0.1" in (tmp_path / "b" / "mosquitto.conf").read_text()
    with pytest.raises(ValueError, match="absolute"):
        BrokerSettings(port=1, client_ca=Path("ca.pem"), certfile=Path("/c"),
                       keyfile=Path("/k"), data_dir=Path("/d"))
    with pytest.raises(ValueError, match="must differ"):
        BrokerSettings(port=1, client_ca=Path("/a"), certfile=Path("/c"), keyfile=Path("/k"),
                       data_dir=Path("/d"), backend_identity="x", admin_identity="x",
                       dynsec_plugin=Path("/p"), dynsec_config=Path("/j"))
    plain = BrokerSettings(port=1, client_ca=Path("/a"), certfile=Path("/c"),
                           keyfile=Path("/k"), data_dir=Path("/d"))
    assert render_acl(plain).strip() == (
        "# Devices: the certificate CN is the username.\npattern readwrite devices/%u/#")


def test_a_crl_that_the_broker_might_ignore_is_refused(
    pki_dir: pki.PKIPaths, device_ca: pki.Authority, tmp_path: Path,
) -> None:
    layout = render_broker(pki_dir, tmp_path / "broker", port=18885)
    installed = x509.load_pem_x509_crl(layout.crl.read_bytes())
    same_second = crl_with(device_ca, [1], installed.last_update_utc)
    with pytest.raises(RevocationError, match="not later") as caught:
        revocation.check_crl(layout, same_second)
    assert caught.value.step == "crl"
    with pytest.raises(RevocationError, match="not on the CRL"):
        revocation.check_crl(layout, crl_with(device_ca, [1]), serial=2)
    rogue = pki.new_root("Device CA", pki.CA_LIFETIME, ecdsa=True)
    with pytest.raises(RevocationError, match="not signed"):
        revocation.check_crl(layout, crl_with(rogue, [1]))
    revocation.check_crl(layout, layout.crl.read_bytes())  # re-running a revocation is fine


# --- the running broker ------------------------------------------------------------------


@pytest.mark.integration
def test_broker_drops_to_the_mosquitto_user_and_keeps_state(shipped_broker: RenderedBroker
                                                            ) -> None:
    status = Path(f"/proc/{shipped_broker.mosquitto.process.pid}/status").read_text()
    uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
    assert int(uid) == pwd.getpwnam("mosquitto").pw_uid
    layout = shipped_broker.layout
    assert int(layout.pid_file.read_text()) == shipped_broker.mosquitto.process.pid
    deadline = time.monotonic() + 5
    while not (layout.data / "mosquitto.db").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (layout.data / "mosquitto.db").stat().st_uid == int(uid)


@pytest.mark.integration
def test_a_device_cannot_publish_into_another_devices_topics(
    shipped_broker: RenderedBroker, clients: dict[str, ClientFiles], pki_dir: pki.PKIPaths,
) -> None:
    a = connect(clients["dev-a"], pki_dir.server_trust, shipped_broker.port)
    try:
        assert accepted(a.publish("devices/dev-a/telemetry"))
        for topic in ("devices/dev-b/telemetry", "devices/dev-b/commands/reboot",
                      "devices/dev-b/status", "devices/x", "$CONTROL/dynamic-security/v1",
                      "$SYS/broker/uptime"):
            assert a.publish(topic, b'{"commands": []}') == NOT_AUTHORIZED, topic
    finally:
        close(a)


@pytest.mark.integration
def test_a_device_cannot_read_another_devices_topics(
    shipped_broker: RenderedBroker, clients: dict[str, ClientFiles], pki_dir: pki.PKIPaths,
) -> None:
    """Mosquitto 2.0's ACL file grants every SUBSCRIBE (the plugin callback in its
    security_default.c returns success for subscriptions) and checks read access
    on each delivery: the SUBACK may say granted, nothing of B's may arrive."""
    a = connect(clients["dev-a"], pki_dir.server_trust, shipped_broker.port)
    b = connect(clients["dev-b"], pki_dir.server_trust, shipped_broker.port)
    try:
        assert accepted(b.publish("devices/dev-b/status", b"retained", retain=True))
        for topic in ("devices/dev-b/#", "devices/+/telemetry", "#"):
            assert a.subscribe(topic) in (1, NOT_AUTHORIZED)
        assert accepted(b.publish("devices/dev-b/telemetry", b"secret"))
        assert a.next_message(QUIET) is None
        assert accepted(a.publish("devices/dev-a/telemetry", b"own"))
        assert a.next_message(5) == ("devices/dev-a/telemetry", b"own")
    finally:
        close(a, b)


@pytest.mark.integration
def test_a_device_cannot_take_over_another_devices_session(
    shipped_broker: RenderedBroker, clients: dict[str, ClientFiles], pki_dir: pki.PKIPaths,
) -> None:
    b = connect(clients["dev-b"], pki_dir.server_trust, shipped_broker.port)
    a = connect(clients["dev-a"], pki_dir.server_trust, shipped_broker.port, client_id="dev-b")
    try:
        time.sleep(0.3)
        assert a.connected() and b.connected()
        assert [e[1] for e in b.events] == ["connect"]
    finally:
        close(a, b)


@pytest.mark.integration
def test_the_backend_reads_all_telemetry_and_writes_commands(
    shipped_broker: RenderedBroker, clients: dict[str, ClientFiles], pki_dir: pki.PKIPaths,
) -> None:
    backend = connect(clients[BACKEND_ID], pki_dir.server_trust, shipped_broker.port)
    a = connect(clients["dev-a"], pki_dir.server_trust, shipped_broker.port)
    b = connect(clients["dev-b"], pki_dir.server_trust, shipped_broker.port)
    try:
        assert backend.subscribe("devices/+/telemetry/#") == 1
        assert a.subscribe("devices/dev-a/commands/#") == 1
        assert accepted(a.publish("devices/dev-a/telemetry", b"a1"))
        assert accepted(b.publish("devices/dev-b/telemetry/temp", b"b1"))
        got = {backend.next_message(5), backend.next_message(5)}
        assert got == {("devices/dev-a/telemetry", b"a1"), ("devices/dev-b/telemetry/temp", b"b1")}
        assert accepted(backend.publish("devices/dev-a/commands/reboot", b"now"))
        assert a.next_message(5) == ("devices/dev-a/commands/reboot", b"now")
        assert backend.publish("devices/dev-a/telemetry", b"forged") == NOT_AUTHORIZED
    finally:
        close(backend, a, b)


@pytest.mark.integration
def test_bootstrap_unknown_ca_and_no_certificate_are_refused(
    shipped_broker: RenderedBroker, pki_dir: pki.PKIPaths, tmp_path: Path,
) -> None:
    factory = pki.read_authority(pki_dir.factory_ca)
    bootstrap = issue_file_client(tmp_path / "f", factory, "dev-bootstrap")
    rogue = issue_file_client(tmp_path / "r", pki.new_root("Device CA", pki.CA_LIFETIME,
                                                           ecdsa=True), "dev-rogue")
    for creds in (bootstrap, rogue):
        logged = refused(shipped_broker, pki_dir.server_trust,
                         "--cert", str(creds.cert), "--key", str(creds.key))
        assert "certificate verify failed" in logged
    assert "peer did not return a certificate" in refused(shipped_broker, pki_dir.server_trust)


@pytest.mark.integration
def test_old_tls_weak_ciphers_and_plaintext_are_refused(
    shipped_broker: RenderedBroker, clients: dict[str, ClientFiles], pki_dir: pki.PKIPaths,
) -> None:
    device = clients["dev-a"]
    for version in ("-tls1", "-tls1_1"):
        logged = s_client(shipped_broker, pki_dir.server_trust, device, version,
                          "-cipher", "DEFAULT@SECLEVEL=0")  # so the client really offers it
        assert "unsupported protocol" in logged, version
    logged = s_client(shipped_broker, pki_dir.server_trust, device, "-tls1_2",
                      "-cipher", "AES128-SHA:ECDHE-ECDSA-AES128-SHA")
    assert "no shared cipher" in logged

    before = log_size(shipped_broker)
    result = subprocess.run(
        [require("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(shipped_broker.port), "-t",
         "devices/x/telemetry", "-m", "x", "-V", "mqttv5"],
        capture_output=True, text=True, timeout=20, check=False,
    )
    time.sleep(0.2)
    logged = log_since(shipped_broker, before)
    assert result.returncode != 0
    assert "wrong version number" in logged and "New client connected" not in logged


# --- revocation --------------------------------------------------------------------------


@pytest.mark.integration
def test_a_crl_reload_alone_leaves_the_live_session(
    revocable_broker: RenderedBroker, clients: dict[str, ClientFiles], pki_dir: pki.PKIPaths,
    device_ca: pki.Authority,
) -> None:
    """Why the plugin is needed, and that a CRL reload does not break new handshakes."""
    a = connect(clients["dev-a"], pki_dir.server_trust, revocable_broker.port)
    try:
        revocation.install_crl(revocable_broker.layout,
                               crl_with(device_ca, [serial_of(clients["dev-a"])]))
        for _ in range(3):
            revocable_broker.mosquitto.process.send_signal(signal.SIGHUP)
            time.sleep(0.2)
        assert a.connected() and accepted(a.publish("devices/dev-a/telemetry"))
        b = connect(clients["dev-b"], pki_dir.server_trust, revocable_broker.port)
        assert b.connected() and accepted(b.publish("devices/dev-b/telemetry"))
        close(b)
        trust, dev_a = pki_dir.server_trust, clients["dev-a"]
        assert "certificate verify failed" in refused(
            revocable_broker, trust, "--cert", str(dev_a.cert), "--key", str(dev_a.key))
    finally:
        close(a)


@pytest.mark.integration
def test_revocation_ends_the_session_and_bars_reconnection(
    revocable_broker: RenderedBroker, clients: dict[str, ClientFiles], pki_dir: pki.PKIPaths,
    device_ca: pki.Authority,
) -> None:
    trust, port = pki_dir.server_trust, revocable_broker.port
    a = connect(clients["dev-a"], trust, port)
    b = connect(clients["dev-b"], trust, port)
    try:
        assert a.connected() and b.connected()
        time.sleep(1.1)  # a CRL with a later thisUpdate than the rendered one
        serial = serial_of(clients["dev-a"])
        started = time.monotonic()
        done = revocation.enforce(revocable_broker.layout.base, "dev-a",
                                  crl_with(device_ca, [serial]), serial=serial)
        deadline = started + 5
        while a.connected() and time.monotonic() < deadline:
            time.sleep(0.005)
        kicked = next(e for e in a.events if e[1] == "disconnect")
        print(f"revoke -> disconnect: {(kicked[0] - started) * 1000:.0f} ms "
              f"(enforce {done.seconds * 1000:.0f} ms)")
        assert kicked[2] == ADMINISTRATIVE_ACTION
        assert kicked[0] - started < 2.0

        dev_a = clients["dev-a"]
        assert "certificate verify failed" in refused(
            revocable_broker, trust, "--cert", str(dev_a.cert), "--key", str(dev_a.key))
        assert b.connected() and accepted(b.publish("devices/dev-b/telemetry"))
        close(b)

        revocable_broker.mosquitto.restart()  # the revocation survives a restart
        assert "certificate verify failed" in refused(
            revocable_broker, trust, "--cert", str(dev_a.cert), "--key", str(dev_a.key))
    finally:
        close(a, b)


@pytest.mark.integration
def test_a_revoked_name_is_denied_everything_even_if_a_handshake_got_through(
    revocable_broker: RenderedBroker, clients: dict[str, ClientFiles], pki_dir: pki.PKIPaths,
) -> None:
    """The second wall: the deny-all role the plugin keeps for a revoked CN."""
    layout: BrokerLayout = revocable_broker.layout
    revocation.kick(layout, "dev-b")  # no CRL: the certificate itself is still valid
    b = connect(clients["dev-b"], pki_dir.server_trust, revocable_broker.port)
    try:
        assert b.connected()
        assert b.publish("devices/dev-b/telemetry") == NOT_AUTHORIZED
        assert b.subscribe("devices/dev-b/#") == NOT_AUTHORIZED
        backend = connect(clients[BACKEND_ID], pki_dir.server_trust, revocable_broker.port)
        assert accepted(backend.publish("devices/dev-b/commands/x"))
        close(backend)
        assert b.next_message(QUIET) is None
    finally:
        close(b)


# --- the cluster configuration (not run: no EMQX here) -----------------------------------


def test_emqx_files_carry_the_same_model() -> None:
    import broker_config

    directory = Path(broker_config.__file__).parent
    conf = (directory / "emqx.conf").read_text()
    for setting in ("listeners.tcp.default.enable = false", "listeners.ws.default.enable = false",
                    "listeners.wss.default.enable = false", "verify = verify_peer",
                    "fail_if_no_peer_cert = true", 'versions = ["tlsv1.3", "tlsv1.2"]',
                    "peer_cert_as_username = cn", "peer_cert_as_clientid = cn",
                    "no_match = deny", "enable_crl_check = true", "client-ca.pem"):
        assert setting in conf, setting
    assert conf.count("{") == conf.count("}") and conf.count("[") == conf.count("]")
    rules = [line for line in (directory / "emqx-acl.conf").read_text().splitlines()
             if line and not line.startswith("%%")]
    assert all(rule.startswith("{") and rule.endswith("}.") for rule in rules)
    assert rules[-2:] == ['{allow, all, all, ["devices/${username}/#"]}.', "{deny, all}."]
    assert rules[0].startswith('{allow, {username, "backend"}, subscribe,')
