"""The factory line as it really is: `factory-ca serve` signs, `device-provision --service`
runs beside the TPM (swtpm behind tpm2-abrmd) as a station with its own certificate."""

from __future__ import annotations

import base64
import csv
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from device_agent import attest
from device_agent.tpm import TPM, KeyBlob
from provisioning import pki
from provisioning.attestation import ek_fingerprint, parse_public
from provisioning.factory import FILES
from provisioning.factory_remote import PAUSE_ENV, RemoteFactoryCA, station_context
from provisioning.factory_signing import (
    AK_HEADER,
    CREDENTIAL_HEADER,
    EK_CERT_HEADER,
    EK_PUBLIC_HEADER,
    Verdict,
    decide,
)
from provisioning.factory_stations import add_station, init_stations
from provisioning.registry import (
    Device,
    DeviceState,
    FactoryEnrollment,
    certificate_fingerprint,
)
from simulator.factory_line import FactoryService, Station, running_factory_service
from simulator.manufacturer import Manufacturer
from simulator.processes import SoftwareTPM

from .est_support import TLS_REFUSED, csr_der, new_key

pytestmark = pytest.mark.integration

ENROLL = "/.well-known/est/factory/simpleenroll"


@pytest.fixture(scope="module")
def line_pki(tmp_path_factory: pytest.TempPathFactory) -> pki.PKIPaths:
    return pki.init_pki(tmp_path_factory.mktemp("line-pki"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory,
            line_pki: pki.PKIPaths) -> Iterator[FactoryService]:
    with running_factory_service(tmp_path_factory.mktemp("factory-ca"), line_pki,
                                 rate=50.0, burst=50) as running:
        yield running


@pytest.fixture(scope="module")
def stations(service: FactoryService,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Station]:
    base = tmp_path_factory.mktemp("stations")
    return {name: service.add_station(name, base / name) for name in ("st-a", "st-b")}


def run_station(service: FactoryService, station: Station, *args: str,
                env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "provisioning.factory_cli", "--service", service.url,
            "--station-cert", str(station.cert), "--station-key", str(station.key),
            "--service-trust", str(station.trust), "--trust-anchor",
            str(service.pki.server_trust), "--est-url", "https://est.example:8443",
            "--broker", "broker.example:8883", *args]


def provision(service: FactoryService, station: Station, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(run_station(service, station, *args), capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "TSS2_LOG": "all+none", **(env or {})})


def provision_one(service: FactoryService, station: Station, device_id: str, tcti: str,
                  out: Path, *extra: str) -> dict[str, object]:
    """One device as a one-row batch: the parsed JSON line (ok, status) of that row."""
    sheet = out.parent / f"{out.name}-{device_id}.csv"
    with open(sheet, "w", newline="") as rows:
        csv.writer(rows).writerow([device_id, tcti, out])
    result = provision(service, station, "--batch", str(sheet), *extra)
    row: dict[str, object] = json.loads(result.stdout.splitlines()[0])
    return row


def complete_identity(out: Path, device_id: str, factory: x509.Certificate) -> x509.Certificate:
    """Every file the agent needs, the certificate the Factory CA's, for the TPM key."""
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    cert = x509.load_pem_x509_certificate((out / "bootstrap.pem").read_bytes())
    cert.verify_directly_issued_by(factory)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == device_id
    assert cert.public_key() == KeyBlob.read(out / "bootstrap.tss").public_key()
    assert json.loads((out / "identity.json").read_text())["device_id"] == device_id
    return cert


def factory_cert(service: FactoryService) -> x509.Certificate:
    return pki.load_certs(service.pki.factory_ca / "ca.pem")[0]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def post(service: FactoryService, station: Station | None, body: bytes,
         query: str = "", trust: Path | None = None,
         identity: tuple[Path, Path] | None = None) -> Reply:
    context = ssl.create_default_context(cafile=trust or (station.trust if station else None))
    if station is not None:
        context.load_cert_chain(station.cert, station.key)
    elif identity is not None:
        context.load_cert_chain(*identity)
    connection = http.client.HTTPSConnection("127.0.0.1", service.port, context=context,
                                             timeout=30)
    try:
        connection.request("POST", ENROLL + query, body=body,
                           headers={"Content-Type": "application/pkcs10"})
        response = connection.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


def certificates(reply: Reply) -> list[x509.Certificate]:
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(reply.body.split())))


# --- a station provisions devices ---------------------------------------------------------


def test_a_station_provisions_a_batch_over_mtls_and_the_service_registers_each(
    service: FactoryService, stations: dict[str, Station], swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    sheet = tmp_path / "batch.csv"
    devices = [f"line-{i}" for i in range(3)]
    with open(sheet, "w", newline="") as rows:
        csv.writer(rows).writerows([[d, swtpm.tcti, tmp_path / d] for d in devices])
    result = provision(service, stations["st-a"], "--batch", str(sheet))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1] == {"provisioned": 3, "failed": 0}
    with service.registry() as registry:
        for device_id in devices:
            cert = complete_identity(tmp_path / device_id, device_id, factory_cert(service))
            device = registry.device(device_id)
            assert device is not None and device.state is DeviceState.ACTIVE
            assert device.bootstrap_fingerprint == certificate_fingerprint(cert)
            made = registry.factory_enrollment(device_id)
            assert made is not None and made.station == "st-a"
            assert made.station_serial == stations["st-a"].serial
            assert [(a.decision, a.status) for a in registry.audit_log(device_id)
                    if a.action == "factory-enroll"] == [("issued", 200)]


def test_the_same_key_again_gets_the_same_certificate_and_one_registry_entry(
    service: FactoryService, stations: dict[str, Station],
) -> None:
    key = new_key()
    body = base64.encodebytes(csr_der(key, "same-key-1"))
    first, again = post(service, stations["st-a"], body), post(service, stations["st-a"], body)
    assert first.status == again.status == 200
    assert certificates(first) == certificates(again)
    with service.registry() as registry:
        assert len(registry.certificates("same-key-1")) == 1
        assert [a.decision for a in registry.audit_log("same-key-1")
                if a.action == "factory-enroll"] == ["issued", "repeated"]


# --- stations refused ---------------------------------------------------------------------


def test_a_revoked_station_is_refused_from_its_next_request_and_registers_nothing(
    service: FactoryService, swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    station = service.add_station("st-revoked", tmp_path / "station")
    assert provision_one(service, station, "rev-before", swtpm.tcti,
                         tmp_path / "before")["ok"] is True
    service.revoke_station("st-revoked")  # the service keeps running: no restart
    row = provision_one(service, station, "rev-after", swtpm.tcti, tmp_path / "after",
                        "--service-attempts", "1")
    assert (row["ok"], row["status"]) == (False, 403)
    assert not (tmp_path / "after").exists()
    assert post(service, station, base64.encodebytes(csr_der(new_key(), "rev-raw"))).status \
        == 403
    with service.registry() as registry:
        assert registry.device("rev-after") is None and registry.device("rev-raw") is None
        refused = [a for a in registry.audit_log() if a.peer_serial == station.serial
                   and a.decision == "refused"]
        assert [a.status for a in refused] == [403, 403]


def test_a_station_certificate_from_another_station_ca_fails_the_handshake(
    service: FactoryService, stations: dict[str, Station], tmp_path: Path,
) -> None:
    """Same name, another CA (a fake Station CA): TLS refuses it before any request."""
    fake = init_stations(tmp_path / "fake", ["127.0.0.1"])
    add_station(fake.base, "st-a", tmp_path / "fake-st-a")
    with pytest.raises(TLS_REFUSED):
        post(service, None, base64.encodebytes(csr_der(new_key(), "fake-1")),
             trust=stations["st-a"].trust,
             identity=(tmp_path / "fake-st-a" / "station.pem",
                       tmp_path / "fake-st-a" / "station.key"))
    with service.registry() as registry:
        assert registry.device("fake-1") is None


# --- two stations, one device ------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True], ids=["refused", "forced"])
def test_another_stations_device_needs_force(
    service: FactoryService, stations: dict[str, Station], swtpm: SoftwareTPM, tmp_path: Path,
    force: bool,
) -> None:
    device_id = f"two-st-{'forced' if force else 'refused'}"
    assert provision_one(service, stations["st-a"], device_id, swtpm.tcti,
                         tmp_path / "a")["ok"] is True
    first = complete_identity(tmp_path / "a", device_id, factory_cert(service))
    row = provision_one(service, stations["st-b"], device_id, swtpm.tcti, tmp_path / "b",
                        *(["--force"] if force else []))
    if force:
        assert row["ok"] is True, row
        holder, current = "st-b", complete_identity(tmp_path / "b", device_id,
                                                    factory_cert(service))
    else:
        assert (row["ok"], row["status"]) == (False, 409)
        assert not (tmp_path / "b").exists()
        holder, current = "st-a", first
    with service.registry() as registry:
        device = registry.device(device_id)
        made = registry.factory_enrollment(device_id)
        assert device is not None and device.bootstrap_fingerprint == \
            certificate_fingerprint(current)
        assert made is not None and made.station == holder
        records = {r.serial: r for r in registry.certificates(device_id)}
        assert records[f"{first.serial_number:x}"].revocation_reason == \
            ("superseded" if force else None)
        assert not records[f"{current.serial_number:x}"].revoked


# --- a station killed at each step --------------------------------------------------------


@pytest.mark.parametrize("point", ["sending", "received"])
def test_a_station_killed_at_each_step_then_run_again_completes_one_identity(
    service: FactoryService, stations: dict[str, Station], swtpm: SoftwareTPM, tmp_path: Path,
    point: str,
) -> None:
    device_id, out = f"killed-{point}", tmp_path / "etc"
    marker = tmp_path / "paused"
    args = ("--device-id", device_id, "--tcti", swtpm.tcti, "--out", str(out))
    process = subprocess.Popen(
        run_station(service, stations["st-a"], *args), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TSS2_LOG": "all+none", PAUSE_ENV: f"{point}:{marker}"})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, "the station exited before its pause"
            assert time.monotonic() < deadline, "the station never reached its pause"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paused"]  # nothing on the device
    with service.registry() as registry:
        assert (registry.device(device_id) is not None) is (point == "received")
    again = provision(service, stations["st-a"], *args)
    assert again.returncode == 0, again.stderr
    cert = complete_identity(out, device_id, factory_cert(service))
    with service.registry() as registry:
        device = registry.device(device_id)
        assert device is not None and device.bootstrap_fingerprint == \
            certificate_fingerprint(cert)
        assert registry.states()[device_id] is DeviceState.ACTIVE
        live = [r for r in registry.certificates(device_id) if not r.revoked]
        assert [r.serial for r in live] == [f"{cert.serial_number:x}"]
        assert all(r.revocation_reason == "superseded"
                   for r in registry.certificates(device_id) if r.revoked)


# --- refusals -----------------------------------------------------------------------------


def test_malformed_and_foreign_csrs_are_400_and_register_nothing(
    service: FactoryService, stations: dict[str, Station],
) -> None:
    key = new_key()
    bodies = {
        "not base64": b"***",
        "not a CSR": base64.encodebytes(b"\x30\x03\x02\x01\x00"),
        "SAN names another device": base64.encodebytes(csr_der(key, "bad-1",
                                                               "urn:device:bad-other")),
        "no SAN": base64.encodebytes(csr_der(key, "bad-2", None)),
        "CN not a device ID": base64.encodebytes(csr_der(key, "bad/3", None)),
    }
    replies = {name: post(service, stations["st-a"], body) for name, body in bodies.items()}
    assert {name: reply.status for name, reply in replies.items()} == \
        dict.fromkeys(bodies, 400)
    with service.registry() as registry:
        for device_id in ("bad-1", "bad-other", "bad-2", "bad/3"):
            assert registry.device(device_id) is None
        refused = [a for a in registry.audit_log() if a.action == "factory-enroll"
                   and a.status == 400 and a.peer_serial == stations["st-a"].serial]
        assert len(refused) >= len(bodies)


@pytest.fixture
def movable_service(tmp_path: Path, line_pki: pki.PKIPaths) -> Iterator[FactoryService]:
    """A service whose registry's directory a test can take away; a tight rate limit."""
    with running_factory_service(tmp_path / "service", line_pki,
                                 registry=tmp_path / "registry" / "registry.sqlite3",
                                 rate=0.2, burst=3, unavailable_retry_after=2) as running:
        yield running


def test_an_unreachable_registry_is_503_and_nothing_is_written(
    movable_service: FactoryService, swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    station = movable_service.add_station("st-m", tmp_path / "station")
    registry_dir = movable_service.registry_path.parent
    registry_dir.rename(tmp_path / "away")
    try:
        reply = post(movable_service, station, base64.encodebytes(csr_der(new_key(), "reg-1")))
        assert (reply.status, reply.headers.get("Retry-After")) == (503, "2")
        row = provision_one(movable_service, station, "reg-2", swtpm.tcti, tmp_path / "etc",
                            "--service-attempts", "1")
        assert (row["ok"], row["status"]) == (False, 503)
        assert not (tmp_path / "etc").exists()
    finally:
        (tmp_path / "away").rename(registry_dir)
    assert provision_one(movable_service, station, "reg-2", swtpm.tcti,
                         tmp_path / "etc")["ok"] is True
    complete_identity(tmp_path / "etc", "reg-2", factory_cert(movable_service))
    with movable_service.registry() as registry:
        assert registry.device("reg-1") is None and registry.device("reg-2") is not None


def test_a_station_over_its_rate_is_429_with_retry_after(
    movable_service: FactoryService, tmp_path: Path,
) -> None:
    station = movable_service.add_station("st-fast", tmp_path / "station")
    replies = [post(movable_service, station, base64.encodebytes(csr_der(new_key(), f"rl-{i}")))
               for i in range(4)]
    assert [r.status for r in replies] == [200, 200, 200, 429]
    assert int(replies[-1].headers["Retry-After"]) >= 1
    other = movable_service.add_station("st-slow", tmp_path / "other")  # its own bucket
    assert post(movable_service, other,
                base64.encodebytes(csr_der(new_key(), "rl-other"))).status == 200
    with movable_service.registry() as registry:
        assert registry.device("rl-3") is None


# --- the rule, as a pure function ---------------------------------------------------------


def test_the_reprovisioning_rule() -> None:
    key = new_key()
    cert = pki.new_root("Factory CA", pki.ROOT_LIFETIME, ecdsa=True).issue_client(
        "d", key.public_key(), pki.ROOT_LIFETIME / 20)
    made = FactoryEnrollment("d", "st-a", "1", cert)
    device = Device("d", DeviceState.ACTIVE, certificate_fingerprint(cert), "")
    same, other = made.public_key_sha256, "0" * 64
    assert decide(None, None, "st-a", other, False, False)[0] is Verdict.NEW
    assert decide(device, made, "st-b", same, True, False)[0] is Verdict.REPEAT
    assert decide(device, made, "st-a", other, False, False)[0] is Verdict.REPLACE
    assert decide(device, made, "st-a", other, True, False)[0] is Verdict.REFUSE
    assert decide(device, made, "st-b", other, False, False)[0] is Verdict.REFUSE
    assert decide(device, made, "st-b", other, True, True)[0] is Verdict.REPLACE
    assert decide(device, None, "st-a", other, False, False)[0] is Verdict.REFUSE
    gone = Device("d", DeviceState.DECOMMISSIONED, device.bootstrap_fingerprint, "")
    assert decide(gone, made, "st-a", same, False, True)[0] is Verdict.REFUSE


# --- key attestation through the service --------------------------------------------------


@pytest.fixture(scope="module")
def makers(tmp_path_factory: pytest.TempPathFactory, manufacturer: Manufacturer,
           made_swtpm: SoftwareTPM) -> dict[str, Path]:
    """PEM files: the TPM maker's root and issuer (its CA exists once made_swtpm was made),
    and a root of a maker no TPM here comes from."""
    base = tmp_path_factory.mktemp("makers")
    files = {"roots": pki.cert_pem(manufacturer.root), "chain": pki.cert_pem(manufacturer.issuer),
             "stranger": pki.cert_pem(pki.new_root("Stranger TPM maker", pki.ROOT_LIFETIME,
                                                   ecdsa=True).certificate)}
    for name, data in files.items():
        (base / f"{name}.pem").write_bytes(data)
    return {name: base / f"{name}.pem" for name in files}


@pytest.fixture(scope="module")
def attesting_service(tmp_path_factory: pytest.TempPathFactory, line_pki: pki.PKIPaths,
                      makers: dict[str, Path]) -> Iterator[FactoryService]:
    """A service that trusts the TPM maker itself (not only the stations do)."""
    with running_factory_service(
            tmp_path_factory.mktemp("attesting"), line_pki, rate=50.0, burst=50,
            attestation={"manufacturer_roots": str(makers["roots"]),
                         "manufacturer_intermediates": str(makers["chain"])}) as running:
        yield running


def provision_attested(service: FactoryService, station: Station, tpm: SoftwareTPM,
                       makers: dict[str, Path], device_id: str,
                       out: Path) -> dict[str, object]:
    return provision_one(service, station, device_id, tpm.tcti, out,
                         "--manufacturer-roots", str(makers["roots"]),
                         "--manufacturer-intermediates", str(makers["chain"]))


def test_an_attesting_line_gets_the_ak_proven_certified_and_registered_by_the_service(
    attesting_service: FactoryService, made_swtpm: SoftwareTPM, makers: dict[str, Path],
    tmp_path: Path,
) -> None:
    station = attesting_service.add_station("st-att", tmp_path / "station")
    out = tmp_path / "etc"
    row = provision_attested(attesting_service, station, made_swtpm, makers, "att-svc", out)
    assert row["ok"] is True, row
    ak = attest.AttestationKeyBlob.read(out / "attestation.tss")
    ak_cert = x509.load_pem_x509_certificate((out / "attestation.pem").read_bytes())
    ak_cert.verify_directly_issued_by(factory_cert(attesting_service))
    assert ak_cert.public_key() == parse_public(ak.public_area).public_key
    with TPM(made_swtpm.tcti) as tpm:
        ek = x509.load_der_x509_certificate(attest.read_endorsement(tpm).certificate)
    with attesting_service.registry() as registry:
        registered = registry.attestation_key("att-svc")
        assert registered is not None and registered.ak_public == ak.public_area
        assert registered.ek_cert_sha256 == ek_fingerprint(ek)  # the service's, from the EK
        assert registered.certificate == ak_cert
        assert [r.attested for r in registry.certificates("att-svc")] == [True]


def test_a_service_that_does_not_trust_the_tpm_maker_refuses_it_whatever_the_station_says(
    line_pki: pki.PKIPaths, made_swtpm: SoftwareTPM, makers: dict[str, Path], tmp_path: Path,
) -> None:
    with running_factory_service(tmp_path / "service", line_pki,
                                 attestation={"manufacturer_roots":
                                              str(makers["stranger"])}) as service:
        station = service.add_station("st-trusting", tmp_path / "station")
        row = provision_attested(service, station, made_swtpm, makers, "att-stranger",
                                 tmp_path / "etc")
        assert (row["ok"], row["status"]) == (False, 400)
        assert not (tmp_path / "etc").exists()
        with service.registry() as registry:
            assert registry.device("att-stranger") is None


def test_attestation_evidence_is_verified_by_the_service_not_the_station(
    attesting_service: FactoryService, made_swtpm: SoftwareTPM, tmp_path: Path,
) -> None:
    """Only the AK the service's credential was activated for, whose TPM2_Certify is in
    the CSR, with the TPM's true answer, gets through."""
    station = attesting_service.add_station("st-forger", tmp_path / "station")
    remote = RemoteFactoryCA(attesting_service.url,
                             station_context(station.cert, station.key, station.trust))
    with TPM(made_swtpm.tcti) as tpm:
        endorsement = attest.read_endorsement(tpm)
        with attest.endorsement_key(tpm, endorsement) as (_, ek_public):
            pass
        ak, other = attest.create_attestation_key(tpm), attest.create_attestation_key(tpm)
        credential, encrypted = remote.challenge(endorsement.certificate, ek_public,
                                                 ak.public_area)
        answer = attest.activate_credential(tpm, ak, endorsement, credential, encrypted)
        blob = tpm.create_key()
        csr = attest.attested_csr(tpm, ak, blob, "att-forged")
    body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))

    def send(ak_public: bytes | None, secret: bytes) -> int:
        headers = {"Content-Type": "application/pkcs10"}
        if ak_public is not None:
            headers |= {AK_HEADER: base64.b64encode(ak_public).decode(),
                        EK_CERT_HEADER: base64.b64encode(endorsement.certificate).decode(),
                        EK_PUBLIC_HEADER: base64.b64encode(ek_public).decode(),
                        CREDENTIAL_HEADER: base64.b64encode(secret).decode()}
        context = ssl.create_default_context(cafile=station.trust)
        context.load_cert_chain(station.cert, station.key)
        connection = http.client.HTTPSConnection("127.0.0.1", attesting_service.port,
                                                 context=context, timeout=30)
        try:
            connection.request("POST", ENROLL, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    refused = {"another AK": send(other.public_area, answer),
               "a made-up answer": send(ak.public_area, bytes(32)),
               "no AK at all": send(None, b"")}
    assert refused == dict.fromkeys(refused, 400)
    with attesting_service.registry() as registry:
        assert registry.device("att-forged") is None
    assert send(ak.public_area, answer) == 200
