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


KEY = ec.generate_private_key(ec.SECP256R1())
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
DAY = dt.timedelta(days=1)


def crl_pem(issuer: x509.Name, revoked: tuple[int, ...] = (), at: dt.datetime = NOW) -> bytes:
    builder = (x509.CertificateRevocationListBuilder().issuer_name(issuer).last_update(at)
               .next_update(at + DAY))
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build())
    return builder.sign(KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.mark.parametrize("issuer", NAMES.values(), ids=NAMES.keys())
def test_the_issuer_hash_is_openssls(issuer: x509.Name) -> None:
    pem = crl_pem(issuer)
    openssl = subprocess.run([require("openssl"), "crl", "-hash", "-noout"], input=pem,
                             capture_output=True, check=True)
    assert int(issuer_hash(pem), 16) == int(openssl.stdout, 16)


def test_files_are_numbered_on_and_a_stopped_broker_starts_from_none(tmp_path: Path) -> None:
    first = crl_pem(NAMES["plain"])
    second = crl_pem(NAMES["plain"], (7,), NOW + dt.timedelta(seconds=1))
    prefix = issuer_hash(first)
    assert publish(tmp_path, first, None, 0o640, empty_first=False, now=NOW)
    assert publish(tmp_path, second, None, 0o640, empty_first=False, now=NOW)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{prefix}.r0", f"{prefix}.r1"]
    assert (tmp_path / f"{prefix}.r1").read_bytes() == second
    assert (tmp_path / f"{prefix}.r1").stat().st_mode & 0o777 == 0o640
    publish(tmp_path, first, None, 0o640, empty_first=True, now=NOW)
    assert [p.name for p in tmp_path.iterdir()] == [f"{prefix}.r0"]
    assert (tmp_path / f"{prefix}.r0").read_bytes() == first


def test_a_running_broker_gets_a_crl_only_when_it_adds_something(tmp_path: Path) -> None:
    """The broker keeps every CRL it reads: an hourly re-issue with the same entries is
    added only once the last one is past half its lifetime; a new revocation at once."""
    plain = NAMES["plain"]
    prefix = issuer_hash(crl_pem(plain))
    publish(tmp_path, crl_pem(plain, (1,)), None, 0o640, empty_first=False, now=NOW)
    hour = dt.timedelta(hours=1)
    assert publish(tmp_path, crl_pem(plain, (1,), NOW + hour), None, 0o640,
                   empty_first=False, now=NOW + hour) is None
    assert publish(tmp_path, crl_pem(plain, (1, 2), NOW + 2 * hour), None, 0o640,
                   empty_first=False, now=NOW + 2 * hour) is not None
    later = NOW + 2 * hour + DAY / 2 + hour  # the last one past half its lifetime
    assert publish(tmp_path, crl_pem(plain, (1, 2), later), None, 0o640,
                   empty_first=False, now=later) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{prefix}.r{n}" for n in range(3)]
