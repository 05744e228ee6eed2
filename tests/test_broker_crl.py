"""The broker's CRL never lapses back (issue 13): re-renders, refreshes and pruning.

``device-pki`` and ``broker-config`` run as the console scripts an operator runs,
against a PKI made by ``device-pki init``; Mosquitto is the real broker; whether a
certificate is revoked is judged by its TLS handshake being refused, and CRLs by
parsing them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker_config import revocation
from broker_config.crl import Rollback, rollback
from broker_config.deploy import BrokerLayout, render_broker
from broker_config.errors import CRLRefused
from provisioning import pki
from provisioning.registry import CertKind, open_registry
from simulator.crl_refresh import service_commands
from simulator.processes import Mosquitto, free_port

from .conftest import BACKEND_ID, ClientFiles, issue_file_client
from .est_support import TLS_REFUSED

BIN = Path(sys.executable).parent
DEVICE_PKI, BROKER_CONFIG = str(BIN / "device-pki"), str(BIN / "broker-config")
DAY = dt.timedelta(days=1)
CONNACK_ACCEPTED = 0


def run(*argv: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=60,
                            check=False)
    assert (result.returncode == 0) == ok, (argv, result.stdout, result.stderr)
    return result


@dataclass(frozen=True)
class Office:
    """A back office made by ``device-pki init``: PKI, registry, the Device CA's key."""

    paths: pki.PKIPaths
    device_ca: pki.Authority
    directory: Path

    def device(self, device_id: str, lifetime: dt.timedelta = DAY) -> ClientFiles:
        """A registered device holding an operational certificate the registry recorded."""
        factory = pki.read_authority(self.paths.factory_ca)
        boot = self.directory / f"{device_id}-bootstrap.pem"
        boot.write_bytes(pki.cert_pem(factory.issue_client(
            device_id, ec.generate_private_key(ec.SECP256R1()).public_key(), DAY)))
        run(DEVICE_PKI, "register", device_id, "--bootstrap-cert", boot, "--pki", self.paths.base)
        files = issue_file_client(self.directory, self.device_ca, device_id, lifetime)
        with open_registry(self.paths.registry) as registry, registry.transaction():
            registry.record_certificate(device_id, certificate(files), CertKind.OPERATIONAL)
        return files

    def revoke(self, files: ClientFiles, *extra: str | Path) -> None:
        run(DEVICE_PKI, "revoke", f"{certificate(files).serial_number:x}", "--reason",
            "keyCompromise", "--pki", self.paths.base, *extra)

    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl(self.paths.crl.read_bytes())


def certificate(files: ClientFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(files.cert.read_bytes())


def listed(crl: x509.CertificateRevocationList) -> set[int]:
    return {entry.serial_number for entry in crl}


@pytest.fixture
def office(tmp_path: Path) -> Office:
    run(DEVICE_PKI, "init", tmp_path / "pki")
    paths = pki.PKIPaths(tmp_path / "pki")
    (tmp_path / "clients").mkdir()
    return Office(paths, pki.read_authority(paths.device_ca), tmp_path / "clients")


@pytest.fixture
def broker_parent() -> Iterator[Path]:
    """A directory the ``mosquitto`` user can traverse (pytest's are 0700 root)."""
    parent = Path(tempfile.mkdtemp(prefix="broker-crl-"))
    parent.chmod(0o755)  # noqa: S103 - holds only the broker's own directory
    try:
        yield parent
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def render(office: Office, out: Path, port: int, *extra: str | Path, ok: bool = True
           ) -> subprocess.CompletedProcess[str]:
    return run(BROKER_CONFIG, "render", "--pki", office.paths.base, "--out", out, "--port",
               str(port), "--backend-identity", BACKEND_ID, *extra, ok=ok)


def connack(port: int, trust: Path, client: ClientFiles) -> int:
    """An MQTT 3.1.1 CONNECT over mutual TLS: the CONNACK's return code.

    A certificate the broker refuses raises one of TLS_REFUSED (under TLS 1.3 on
    the read, after the client's side of the handshake is done).
    """
    context = ssl.create_default_context(cafile=str(trust))
    context.load_cert_chain(str(client.cert), str(client.key))
    client_id = client.device_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(bytes([0x10, len(body)]) + body)
        reply = tls.recv(4)
    assert reply[:2] == b"\x20\x02", reply
    return reply[3]


def refused(port: int, trust: Path, client: ClientFiles) -> bool:
    try:
        connack(port, trust, client)
    except TLS_REFUSED:
        return True
    return False


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file of a broker directory but the broker's own state, byte for byte."""
    return {str(path.relative_to(directory)): path.read_bytes()
            for path in sorted(directory.rglob("*"))
            if path.is_file() and "data" not in path.relative_to(directory).parts}


def pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def later_second() -> dt.datetime:
    """A thisUpdate after every CRL signed so far (CRL times have one-second resolution)."""
    time.sleep(1.1)
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


# --- the bug: a re-render un-revoked every certificate -----------------------------------


@pytest.mark.integration
def test_re_rendering_keeps_a_revoked_certificate_refused(office: Office,
                                                          broker_parent: Path) -> None:
    """A revocation survives two re-renders (one after a server-certificate rotation),
    the SIGHUP that makes the broker re-read its files, and a restart."""
    revoked, valid = office.device("crl-revoked"), office.device("crl-valid")
    port, out, trust = free_port(), broker_parent / "broker", office.paths.server_trust
    render(office, out, port)
    with Mosquitto(broker_parent, out / "mosquitto.conf", port) as mosquitto:
        assert connack(port, trust, revoked) == CONNACK_ACCEPTED
        office.revoke(revoked, "--broker", out)
        assert refused(port, trust, revoked)

        later_second()  # a re-render comes later than the revocation
        run(DEVICE_PKI, "issue-server", "broker", "--host", "localhost", "--host", "127.0.0.1",
            "--pki", office.paths.base)
        render(office, out, port)
        render(office, out, port)
        mosquitto.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert refused(port, trust, revoked)
        assert connack(port, trust, valid) == CONNACK_ACCEPTED

        mosquitto.restart()
        assert refused(port, trust, revoked)
        assert connack(port, trust, valid) == CONNACK_ACCEPTED
    installed = x509.load_pem_x509_crl(BrokerLayout(out).crl.read_bytes())
    assert certificate(revoked).serial_number in listed(installed)


@pytest.mark.integration
def test_a_crl_that_would_roll_back_is_refused_unless_forced(office: Office,
                                                             broker_parent: Path) -> None:
    """Fewer entries, an older thisUpdate, a lower CRL number: refused by ``refresh-crl``
    and ``render`` (exit 1, CRLRefused, not a byte written); ``--force`` installs them."""
    revoked, valid = office.device("rb-revoked"), office.device("rb-valid")
    initial = office.paths.crl.read_bytes()  # device-pki init's CRL: number 1, empty
    office.revoke(revoked)
    current = office.crl()
    port, out, trust = free_port(), broker_parent / "broker", office.paths.server_trust
    render(office, out, port)
    layout = BrokerLayout(out)
    assert layout.crl.read_bytes() == office.paths.crl.read_bytes()

    now = later_second()
    entries = [pki.Revocation(certificate(revoked).serial_number, now)]
    number = current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    candidates = {
        "older": initial,
        "fewer": pem(pki.build_crl(office.device_ca, [], number + 1, now)),
        "lower-number": pem(pki.build_crl(office.device_ca, entries, number - 1, now)),
    }
    files = {name: office.directory / f"{name}.crl" for name in candidates}
    for name, data in candidates.items():
        files[name].write_bytes(data)

    with Mosquitto(broker_parent, out / "mosquitto.conf", port):
        assert refused(port, trust, revoked)
        before = snapshot(out)
        for name, path in files.items():
            run(BROKER_CONFIG, "refresh-crl", "--broker", out, "--crl", path, ok=False)
            assert snapshot(out) == before, name
            render(office, out, free_port(), "--crl", path, ok=False)  # not even the new port
            assert snapshot(out) == before, name
            with pytest.raises(CRLRefused):
                revocation.refresh_crl(out, path.read_bytes())
            with pytest.raises(CRLRefused):
                render_broker(office.paths, out, port=port, backend_identity=BACKEND_ID,
                              crl=path)
            assert snapshot(out) == before, name
        assert refused(port, trust, revoked)

        run(BROKER_CONFIG, "refresh-crl", "--broker", out, "--crl", files["fewer"], "--force")
        assert layout.crl.read_bytes() == files["fewer"].read_bytes()
        time.sleep(0.5)  # the reload is applied at the end of the broker's loop turn
        assert connack(port, trust, revoked) == CONNACK_ACCEPTED  # what forcing means
        assert connack(port, trust, valid) == CONNACK_ACCEPTED
    render(office, out, port, "--crl", files["older"], "--force")
    assert layout.crl.read_bytes() == initial


@pytest.mark.integration
def test_refresh_crl_is_idempotent_and_serialised_by_the_lock(office: Office,
                                                              broker_parent: Path) -> None:
    """The same CRL twice: nothing written (the broker may even be down).
    A writer holding the broker's CRL lock makes ``refresh-crl`` wait for it."""
    port, out = free_port(), broker_parent / "broker"
    render(office, out, port)
    layout = BrokerLayout(out)
    with Mosquitto(broker_parent, out / "mosquitto.conf", port) as mosquitto:
        later_second()
        run(DEVICE_PKI, "crl", "--pki", office.paths.base)
        run(BROKER_CONFIG, "refresh-crl", "--broker", out, "--crl", office.paths.crl)
        assert layout.crl.read_bytes() == office.paths.crl.read_bytes()
        first, published = layout.crl.stat(), sorted(layout.crl_dir.iterdir())
        run(BROKER_CONFIG, "refresh-crl", "--broker", out, "--crl", office.paths.crl)
        again = revocation.refresh_crl(out, office.paths.crl.read_bytes())
        assert not again.installed and sorted(layout.crl_dir.iterdir()) == published
        mosquitto.stop()
        run(BROKER_CONFIG, "refresh-crl", "--broker", out, "--crl", office.paths.crl)
        again = layout.crl.stat()
        assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

        mosquitto.start()
        later_second()
        run(DEVICE_PKI, "crl", "--pki", office.paths.base)
        fd = os.open(layout.crl_lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            waiting = subprocess.Popen([BROKER_CONFIG, "refresh-crl", "--broker", str(out),
                                        "--crl", str(office.paths.crl)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.5)
            assert waiting.poll() is None
            assert layout.crl.stat().st_ino == first.st_ino
        finally:
            os.close(fd)
        assert waiting.wait(timeout=30) == 0
        assert layout.crl.read_bytes() == office.paths.crl.read_bytes()


# --- pruning: an expired certificate leaves the CRL, and the broker lets it --------------


@pytest.mark.integration
def test_an_expired_revoked_certificate_leaves_the_crl_once_listed_past_expiry(
    office: Office, broker_parent: Path,
) -> None:
    """RFC 5280 5.1.2.6: the first CRL issued after the certificate's notAfter still lists
    it, the next does not; the broker takes that CRL when the registry shows the
    certificate expired, and refuses it without the registry."""
    long = office.device("long")
    office.revoke(long)
    short = office.device("short-lived", dt.timedelta(seconds=6))
    office.revoke(short)
    gone, kept = certificate(short).serial_number, certificate(long).serial_number
    expiry = certificate(short).not_valid_after_utc
    assert office.crl().last_update_utc < expiry, "too slow: revoked after it expired"
    port, out = free_port(), broker_parent / "broker"
    render(office, out, port)
    layout = BrokerLayout(out)
    publish, refresh = service_commands(office.paths.base, out)
    assert publish[1:] == ["crl", "--pki", str(office.paths.base)]
    assert refresh[1:4] == ["refresh-crl", "--broker", str(out)]

    with Mosquitto(broker_parent, out / "mosquitto.conf", port):
        time.sleep(max(0.0, (expiry - dt.datetime.now(dt.UTC)).total_seconds()) + 1.1)
        run(*publish)
        run(*refresh)
        assert listed(office.crl()) >= {gone, kept}  # the first CRL past expiry lists it
        assert layout.crl.read_bytes() == office.paths.crl.read_bytes()

        later_second()
        run(*publish)
        assert kept in listed(office.crl()) and gone not in listed(office.crl())
        before = snapshot(out)
        run(BROKER_CONFIG, "refresh-crl", "--broker", out, "--crl", office.paths.crl, ok=False)
        assert snapshot(out) == before  # without the registry a missing entry is refused
        run(*refresh)
        assert layout.crl.read_bytes() == office.paths.crl.read_bytes()
        assert refused(port, office.paths.server_trust, long)


def timespan(text: str) -> dt.timedelta:
    """A systemd time span made of one number and one unit, as the shipped timer writes them."""
    units = {"s": 1, "sec": 1, "min": 60, "h": 3600, "d": 86400}
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    return dt.timedelta(seconds=float(number) * units[text[len(number):]])


def test_the_shipped_timer_refreshes_well_inside_the_crl_lifetime() -> None:
    """At least a day's worth of hourly chances before a published CRL's nextUpdate."""
    text = resources.files("provisioning").joinpath("data", "device-crl-refresh.timer").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    longest_gap = timespan(settings["OnUnitActiveSec"]) + timespan(settings["RandomizedDelaySec"])
    assert longest_gap * 24 <= pki.CRL_LIFETIME
    assert timespan(settings["OnBootSec"]) + timespan(settings["RandomizedDelaySec"]) <= \
        pki.CRL_LIFETIME / 24


# --- the rules, as pure functions --------------------------------------------------------

T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def test_still_listed_keeps_an_entry_until_a_crl_past_expiry_carried_it() -> None:
    entry = pki.Revocation(7, revoked_at=T0, not_after=T0 + HOUR)
    assert pki.still_listed(entry, None)  # no previous CRL
    assert pki.still_listed(pki.Revocation(7, T0), T0 + DAY)  # notAfter unknown
    assert pki.still_listed(entry, T0 + HOUR / 2)  # not expired when the last CRL was issued
    assert pki.still_listed(entry, T0 + HOUR)  # expired at that very second: not yet past
    assert not pki.still_listed(entry, T0 + 2 * HOUR)
    late = pki.Revocation(7, revoked_at=T0 + 3 * HOUR, not_after=T0 + HOUR)
    assert pki.still_listed(late, T0 + 2 * HOUR)  # revoked after the last CRL: never listed yet
    assert not pki.still_listed(late, T0 + 4 * HOUR)


def test_rollback_rules() -> None:
    ca = pki.new_root("Device CA", pki.CA_LIFETIME, ecdsa=True)
    one, two = pki.Revocation(1, T0), pki.Revocation(2, T0)
    installed = pki.build_crl(ca, [one, two], 5, T0)
    now = T0 + DAY

    def judged(new: x509.CertificateRevocationList, not_after: dict[int, dt.datetime] | None = None
               ) -> Rollback:
        return rollback(installed, new, not_after or {}, now)

    assert not judged(pki.build_crl(ca, [one, two], 6, T0 + HOUR))
    assert not judged(pki.build_crl(ca, [two, one], None, T0 + HOUR))  # no number: not compared
    assert judged(pki.build_crl(ca, [one, two], 6, T0)) == Rollback(not_newer=True)
    assert judged(pki.build_crl(ca, [one, two], 5, T0 + HOUR)) == Rollback(lower_number=True)
    pruned = pki.build_crl(ca, [two], 6, T0 + HOUR)
    assert judged(pruned) == Rollback(dropped=(1,))  # serial 1's expiry unknown
    assert judged(pruned, {1: now + HOUR}) == Rollback(dropped=(1,))  # not expired yet
    assert not judged(pruned, {1: now})  # expired
    assert judged(pki.build_crl(ca, [], 4, T0)) == Rollback(True, True, (1, 2))
