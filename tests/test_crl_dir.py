"""The CRL directory's file names: OpenSSL finds a CRL in a ``capath`` only under its
issuer's X509_NAME_hash, so ours must equal OpenSSL's for any name a CA may carry
(case, blanks, non-ASCII, multi-valued RDNs, IA5 and Printable strings)."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker_config.crl_dir import issuer_hash, publish
from simulator.processes import require

NAMES = {
    "plain": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Device CA")]),
    "blanks and non-ASCII": x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "  Acme   Devices\tGmbH "),
        x509.NameAttribute(NameOID.COMMON_NAME, "Größe CA Ünïcode")]),
    "multi-valued RDN": x509.Name([x509.RelativeDistinguishedName([
        x509.NameAttribute(NameOID.COMMON_NAME, "B"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "a")])]),
    "IA5 strings": x509.Name([
        x509.NameAttribute(NameOID.EMAIL_ADDRESS, "CA@Example.COM"),
        x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "Example")]),
}


def crl_pem(issuer: x509.Name) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(issuer).last_update(now)
           .next_update(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("issuer", NAMES.values(), ids=NAMES.keys())
def test_the_issuer_hash_is_openssls(issuer: x509.Name) -> None:
    pem = crl_pem(issuer)
    openssl = subprocess.run([require("openssl"), "crl", "-hash", "-noout"], input=pem,
                             capture_output=True, check=True)
    assert int(issuer_hash(pem), 16) == int(openssl.stdout, 16)


def test_files_are_numbered_on_and_a_stopped_broker_starts_from_none(tmp_path: Path) -> None:
    first, second = crl_pem(NAMES["plain"]), crl_pem(NAMES["plain"])
    prefix = issuer_hash(first)
    publish(tmp_path, first, None, 0o640, empty_first=False)
    publish(tmp_path, second, None, 0o640, empty_first=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{prefix}.r0", f"{prefix}.r1"]
    assert (tmp_path / f"{prefix}.r1").read_bytes() == second
    assert (tmp_path / f"{prefix}.r1").stat().st_mode & 0o777 == 0o640
    publish(tmp_path, first, None, 0o640, empty_first=True)
    assert [p.name for p in tmp_path.iterdir()] == [f"{prefix}.r0"]
    assert (tmp_path / f"{prefix}.r0").read_bytes() == first
