"""The EST server as a real process, driven by clients that are not our code: curl and openssl."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from provisioning import pki
from provisioning.registry import CertKind
from simulator.processes import require

from .est_support import ESTServer, bootstrap_identity, enroll, new_key

pytestmark = pytest.mark.integration
DEVICE_PKI = Path(sys.executable).parent / "device-pki"


def sh(program: str | Path, *argv: str | Path) -> str:
    """Run a program (by name from a Debian package, or by path); its stdout."""
    path = str(program) if Path(program).is_absolute() else require(str(program))
    result = subprocess.run([path, *map(str, argv)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{program} failed: {result.stderr}"
    return result.stdout


def curl(server: ESTServer, path: str, out: Path, *options: str | Path) -> int:
    """curl's HTTP status for ``path``; the body lands in ``out``."""
    status = sh("curl", "-sS", "--cacert", server.pki.server_trust, "-o", out,
                "-w", "%{http_code}", *options, f"{server.url}/{path}")
    return int(status)


def pkcs7_to_pem(b64: Path, pem: Path) -> list[x509.Name]:
    """Decode a base64 certs-only answer with openssl; the subjects of what it printed."""
    der = b64.with_suffix(".p7")
    sh("openssl", "base64", "-d", "-in", b64, "-out", der)
    sh("openssl", "pkcs7", "-inform", "DER", "-in", der, "-print_certs", "-out", pem)
    return [cert.subject for cert in x509.load_pem_x509_certificates(pem.read_bytes())]


def common_name(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])


def openssl_csr(directory: Path, name: str, device_id: str) -> tuple[Path, Path]:
    """A P-256 key and a base64 DER CSR naming the device, both made by openssl."""
    key, der, b64 = (directory / f"{name}.key", directory / f"{name}.der",
                     directory / f"{name}.b64")
    sh("openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
       "-out", key)
    sh("openssl", "req", "-new", "-key", key, "-subj", f"/CN={device_id}",
       "-addext", f"subjectAltName=URI:urn:device:{device_id}", "-outform", "DER", "-out", der)
    sh("openssl", "base64", "-in", der, "-out", b64)
    return key, b64


def verify(server: ESTServer, cert: Path) -> None:
    """openssl's verdict by its exit status (``sh`` fails the test on any other)."""
    sh("openssl", "verify", "-CAfile", server.pki.root / "ca.pem",
       "-untrusted", server.pki.device_ca / "ca.pem", "-purpose", "sslclient", cert)


def test_cacerts_is_the_device_ca_chain(est_server: ESTServer, tmp_path: Path) -> None:
    assert curl(est_server, "cacerts", tmp_path / "cacerts.b64") == 200
    subjects = pkcs7_to_pem(tmp_path / "cacerts.b64", tmp_path / "cacerts.pem")
    assert sorted(subjects, key=str) == [common_name("Device CA"),
                                         common_name("Device Identity Root CA")]


def test_csrattrs_asks_for_p256_and_ecdsa_sha256(est_server: ESTServer, tmp_path: Path) -> None:
    assert curl(est_server, "csrattrs", tmp_path / "attrs.b64") == 200
    sh("openssl", "base64", "-d", "-in", tmp_path / "attrs.b64", "-out", tmp_path / "attrs.der")
    parsed = sh("openssl", "asn1parse", "-inform", "DER", "-in", tmp_path / "attrs.der")
    assert [w for w in ("ecdsa-with-SHA256", "id-ecPublicKey", "prime256v1") if w in parsed] == \
        ["ecdsa-with-SHA256", "id-ecPublicKey", "prime256v1"]


def test_enroll_then_reenroll_with_curl_and_openssl(
    est_server: ESTServer, factory_ca: pki.Authority, tmp_path: Path,
) -> None:
    boot = bootstrap_identity(tmp_path, factory_ca, "curl-device")
    sh(DEVICE_PKI, "register", boot.device_id, "--bootstrap-cert", boot.cert,
       "--registry", est_server.registry_path)

    key, csr = openssl_csr(tmp_path, "op1", boot.device_id)
    status = curl(est_server, "simpleenroll", tmp_path / "op1.b64", "--cert", boot.cert,
                  "--key", boot.key, "-H", "Content-Type: application/pkcs10",
                  "--data-binary", f"@{csr}")
    assert status == 200, (tmp_path / "op1.b64").read_text()
    assert pkcs7_to_pem(tmp_path / "op1.b64", tmp_path / "op1.pem") == \
        [common_name("curl-device")]
    verify(est_server, tmp_path / "op1.pem")

    key2, csr2 = openssl_csr(tmp_path, "op2", boot.device_id)
    status = curl(est_server, "simplereenroll", tmp_path / "op2.b64", "--cert",
                  tmp_path / "op1.pem", "--key", key, "-H", "Content-Type: application/pkcs10",
                  "--data-binary", f"@{csr2}")
    assert status == 200, (tmp_path / "op2.b64").read_text()
    pkcs7_to_pem(tmp_path / "op2.b64", tmp_path / "op2.pem")
    verify(est_server, tmp_path / "op2.pem")

    first, second = (x509.load_pem_x509_certificate((tmp_path / f"op{i}.pem").read_bytes())
                     for i in (1, 2))
    new_key = serialization.load_pem_private_key(key2.read_bytes(), None).public_key()
    assert second.public_key() == new_key
    assert second.subject == first.subject and second.serial_number != first.serial_number
    with est_server.registry() as registry:
        records = registry.certificates(boot.device_id)
        assert [(r.kind, r.status) for r in records] == [
            (CertKind.BOOTSTRAP, "issued"), (CertKind.OPERATIONAL, "revoked"),
            (CertKind.OPERATIONAL, "issued")]  # the renewal superseded the first
        assert [e.decision for e in registry.audit_log(boot.device_id)] == \
            ["allowlisted", "issued", "issued"]


def test_issued_certificates_live_as_configured(est_server: ESTServer, factory_ca: pki.Authority,
                                                tmp_path: Path) -> None:
    boot = bootstrap_identity(tmp_path, factory_ca, "lifetime-device")
    with est_server.registry() as registry:
        registry.register_device(boot.device_id, boot.certificate)
    [cert] = enroll(est_server, boot, new_key()).certificates()
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() == 3600
