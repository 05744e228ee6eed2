"""What the agent asks for on renewal and what it accepts back (pure, software keys)."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent.enroll import check_issued
from device_agent.errors import ESTError
from device_agent.tpm import build_csr

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
CA = ec.generate_private_key(ec.SECP256R1())


def certificate(key: ec.EllipticCurvePrivateKey, subject: x509.Name,
                sans: list[str] | None, usages: list[x509.ObjectIdentifier] | None,
                ) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Device CA")]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=7)))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(uri) for uri in sans]), critical=False)
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(CA, hashes.SHA256())


def name(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


DEVICE = name((NameOID.COMMON_NAME, "dev-7"))
CLIENT = [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_renewal_csr_copies_subject_and_san_from_the_certificate_it_renews() -> None:
    """RFC 7030 4.2.2: the subject of a re-enrollment is the current certificate's."""
    old_key, new_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    subject = name((NameOID.ORGANIZATION_NAME, "Acme"), (NameOID.COMMON_NAME, "dev-7"))
    current = certificate(old_key, subject, ["urn:device:dev-7"], CLIENT)
    csr = build_csr(new_key, "dev-7", renewing=current)
    assert csr.subject == subject
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert csr.public_key() == new_key.public_key() and csr.is_signature_valid


def test_a_first_enrollment_csr_names_the_device() -> None:
    csr = build_csr(ec.generate_private_key(ec.SECP256R1()), "dev-7")
    assert csr.subject == DEVICE


def test_the_right_certificate_is_accepted() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = certificate(key, DEVICE, ["urn:device:dev-7"], CLIENT)
    assert check_issued(issued, "dev-7", key.public_key()) is issued


@pytest.mark.parametrize(("subject", "sans", "usages", "other_key"), [
    (name((NameOID.COMMON_NAME, "dev-8")), ["urn:device:dev-7"], CLIENT, False),
    (DEVICE, None, CLIENT, False),
    (DEVICE, ["urn:device:dev-8"], CLIENT, False),
    (DEVICE, ["urn:device:dev-7", "urn:device:dev-8"], CLIENT, False),
    (DEVICE, ["urn:device:dev-7"], None, False),
    (DEVICE, ["urn:device:dev-7"], [ExtendedKeyUsageOID.SERVER_AUTH], False),
    (DEVICE, ["urn:device:dev-7"], CLIENT, True),
], ids=["other-name", "no-san", "other-san", "extra-san", "no-eku", "server-eku", "other-key"])
def test_a_certificate_that_is_not_ours_is_refused_before_staging(
    subject: x509.Name, sans: list[str] | None, usages: list[x509.ObjectIdentifier] | None,
    other_key: bool,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = certificate(ec.generate_private_key(ec.SECP256R1()) if other_key else key,
                         subject, sans, usages)
    with pytest.raises(ESTError):
        check_issued(issued, "dev-7", key.public_key())
