"""``device-pki`` as an operator runs it: a real process, output on stdout, one-line errors."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import pki
from provisioning.registry import CertKind, DeviceState, open_registry

DEVICE_PKI = str(Path(sys.executable).parent / "device-pki")


def run(*args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([DEVICE_PKI, *map(str, args)], capture_output=True, text=True,
                            timeout=60)
    assert (result.returncode == 0) == ok, result.stderr
    return result


@pytest.fixture
def locked_pki(tmp_path: Path) -> tuple[pki.PKIPaths, Path]:
    secret = tmp_path / "passphrase"
    secret.write_text("correct horse\n")
    run("init", tmp_path / "pki", "--passphrase-file", secret)
    return pki.PKIPaths(tmp_path / "pki"), secret


def test_init_creates_the_hierarchy_an_empty_crl_and_the_registry(
    locked_pki: tuple[pki.PKIPaths, Path],
) -> None:
    paths, _ = locked_pki
    crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    assert len(crl) == 0 and paths.registry.exists()
    assert run("init", paths.base, ok=False).stderr.startswith("device-pki init: ")


def test_revoke_republishes_the_crl(locked_pki: tuple[pki.PKIPaths, Path], tmp_path: Path) -> None:
    paths, secret = locked_pki
    factory = pki.read_authority(paths.factory_ca, b"correct horse")
    device_ca = pki.read_authority(paths.device_ca, b"correct horse")
    boot = tmp_path / "boot.pem"
    boot.write_bytes(pki.cert_pem(factory.issue_client(
        "dev-7", ec.generate_private_key(ec.SECP256R1()).public_key(), dt.timedelta(days=1))))
    run("register", "dev-7", "--bootstrap-cert", boot, "--pki", paths.base)
    cert = device_ca.issue_client("dev-7", ec.generate_private_key(ec.SECP256R1()).public_key(),
                                  dt.timedelta(days=1))
    with open_registry(paths.registry) as registry, registry.transaction():
        registry.record_certificate("dev-7", cert, CertKind.OPERATIONAL)

    locked = run("revoke", f"{cert.serial_number:x}", "--reason", "keyCompromise",
                 "--pki", paths.base, ok=False)
    assert "passphrase is needed" in locked.stderr and len(locked.stderr.splitlines()) == 1
    run("revoke", f"{cert.serial_number:x}", "--reason", "key-compromise", "--pki", paths.base,
        "--passphrase-file", secret)
    entry = x509.load_pem_x509_crl(paths.crl.read_bytes()).get_revoked_certificate_by_serial_number(
        cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is \
        x509.ReasonFlags.key_compromise


def test_suspend_and_activate(locked_pki: tuple[pki.PKIPaths, Path], tmp_path: Path) -> None:
    paths, _ = locked_pki
    assert "no device ghost" in run("suspend", "ghost", "--pki", paths.base, ok=False).stderr
    factory = pki.read_authority(paths.factory_ca, b"correct horse")
    boot = tmp_path / "boot.pem"
    boot.write_bytes(pki.cert_pem(factory.issue_client(
        "dev-8", ec.generate_private_key(ec.SECP256R1()).public_key(), dt.timedelta(days=1))))
    run("register", "dev-8", "--bootstrap-cert", boot, "--pki", paths.base)
    run("suspend", "dev-8", "--pki", paths.base)
    with open_registry(paths.registry) as registry:
        device = registry.device("dev-8")
        assert device is not None and device.state is DeviceState.SUSPENDED
    run("activate", "dev-8", "--pki", paths.base)


def test_issue_server_writes_a_certificate_for_the_hosts(
    locked_pki: tuple[pki.PKIPaths, Path],
) -> None:
    paths, secret = locked_pki
    run("issue-server", "est2", "--host", "est.example", "--host", "10.0.0.5",
        "--pki", paths.base, "--passphrase-file", secret)
    cert = x509.load_pem_x509_certificate(paths.server_cert("est2").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["est.example"]


def _device_with_certificates(paths: pki.PKIPaths, tmp_path: Path, device_id: str,
                              lifetimes: list[dt.timedelta]) -> list[x509.Certificate]:
    """A registered device with operational certificates; a negative lifetime: expired."""
    factory = pki.read_authority(paths.factory_ca, b"correct horse")
    device_ca = pki.read_authority(paths.device_ca, b"correct horse")
    boot = tmp_path / f"{device_id}-boot.pem"
    boot.write_bytes(pki.cert_pem(factory.issue_client(
        device_id, ec.generate_private_key(ec.SECP256R1()).public_key(), dt.timedelta(days=1))))
    run("register", device_id, "--bootstrap-cert", boot, "--pki", paths.base)
    now = dt.datetime.now(dt.UTC)
    certs = []
    for lifetime in lifetimes:
        start = now - dt.timedelta(hours=2) if lifetime < dt.timedelta(0) else None
        certs.append(device_ca.issue_client(
            device_id, ec.generate_private_key(ec.SECP256R1()).public_key(),
            abs(lifetime) if start is None else dt.timedelta(hours=1), not_before=start))
    with open_registry(paths.registry) as registry, registry.transaction():
        for cert in certs:
            registry.record_certificate(device_id, cert, CertKind.OPERATIONAL)
    return certs


def _listed(paths: pki.PKIPaths) -> dict[int, x509.ReasonFlags | None]:
    crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
    reasons: dict[int, x509.ReasonFlags | None] = {}
    for entry in crl:
        try:
            reasons[entry.serial_number] = entry.extensions.get_extension_for_class(
                x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reasons[entry.serial_number] = None
    return reasons


def test_revoke_device_suspends_it_and_revokes_every_certificate_it_could_use(
        locked_pki: tuple[pki.PKIPaths, Path], tmp_path: Path) -> None:
    """Two valid certificates (a renewal that just completed leaves two) and one expired:
    both valid ones are revoked and published, the device is suspended, nothing else."""
    paths, secret = locked_pki
    older, newer, expired = _device_with_certificates(
        paths, tmp_path, "dev-9", [dt.timedelta(days=1), dt.timedelta(days=1),
                                   -dt.timedelta(hours=1)])
    bystander, = _device_with_certificates(paths, tmp_path, "dev-10", [dt.timedelta(days=1)])

    locked = run("revoke-device", "dev-9", "--reason", "keyCompromise", "--pki", paths.base,
                 ok=False)
    with open_registry(paths.registry) as registry:
        device = registry.device("dev-9")
        assert device is not None and device.state is DeviceState.ACTIVE  # nothing changed
        assert not any(r.revoked for r in registry.certificates("dev-9"))
    assert len(locked.stderr.splitlines()) == 1

    run("revoke-device", "dev-9", "--reason", "keyCompromise", "--pki", paths.base,
        "--passphrase-file", secret)
    with open_registry(paths.registry) as registry:
        device = registry.device("dev-9")
        assert device is not None and device.state is DeviceState.SUSPENDED
        revoked = {int(r.serial, 16) for r in registry.certificates("dev-9") if r.revoked}
        assert not any(r.revoked for r in registry.certificates("dev-10"))
    assert revoked == {older.serial_number, newer.serial_number}
    assert _listed(paths) == {older.serial_number: x509.ReasonFlags.key_compromise,
                              newer.serial_number: x509.ReasonFlags.key_compromise}
    assert expired.serial_number not in _listed(paths)
    assert bystander.serial_number not in _listed(paths)

    # the suspension is lifted; the revoked certificates stay revoked
    run("activate", "dev-9", "--pki", paths.base)
    with open_registry(paths.registry) as registry:
        device = registry.device("dev-9")
        assert device is not None and device.state is DeviceState.ACTIVE
    assert set(_listed(paths)) == {older.serial_number, newer.serial_number}


def test_decommission_revokes_for_good(locked_pki: tuple[pki.PKIPaths, Path],
                                       tmp_path: Path) -> None:
    paths, secret = locked_pki
    cert, = _device_with_certificates(paths, tmp_path, "dev-11", [dt.timedelta(days=1)])
    run("decommission", "dev-11", "--pki", paths.base, "--passphrase-file", secret)
    assert _listed(paths) == {cert.serial_number: x509.ReasonFlags.cessation_of_operation}
    refused = run("activate", "dev-11", "--pki", paths.base, ok=False)
    assert "decommissioned" in refused.stderr
    with open_registry(paths.registry) as registry:
        device = registry.device("dev-11")
        assert device is not None and device.state is DeviceState.DECOMMISSIONED


def test_the_crl_lifetime_is_kept_in_the_pki_for_every_publisher(tmp_path: Path) -> None:
    run("init", tmp_path / "pki", "--crl-lifetime", "45s")
    paths = pki.PKIPaths(tmp_path / "pki")
    for _ in range(2):  # init's CRL, then the one device-pki crl publishes
        crl = x509.load_pem_x509_crl(paths.crl.read_bytes())
        assert crl.next_update_utc is not None
        assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(seconds=45)
        run("crl", "--pki", paths.base)
    assert pki.crl_lifetime(paths) == dt.timedelta(seconds=45)
    assert pki.crl_lifetime(pki.PKIPaths(tmp_path / "elsewhere")) == pki.CRL_LIFETIME
    for bad in ("2s", "soon", "400d"):
        run("init", tmp_path / f"pki-{bad}", "--crl-lifetime", bad, ok=False)
        assert not (tmp_path / f"pki-{bad}").exists()
    paths.crl_settings.write_text("lifetime_seconds = 'a week'\n")
    assert "lifetime_seconds" in run("crl", "--pki", paths.base, ok=False).stderr
