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
