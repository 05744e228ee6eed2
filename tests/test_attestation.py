"""Key attestation verified in software: TPM structures, every refusal, the CSR attribute.

No TPM here: the evidence is marshalled by hand (TPM 2.0 Part 2 layouts) and
signed by a software "AK", so each refusal can be made on purpose. That the
real TPM's evidence passes is tests/test_attestation_tpm.py's business.
"""

from __future__ import annotations

import base64
import datetime as dt
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from device_agent.csr_attestation import (
    ID_AA_ATTESTATION,
    TCG_ATTEST_TPM_CERTIFY,
    EvidenceFormatError,
    TpmCertifyStatement,
    attestation_attribute,
    build_attested_csr,
    decode_bundle,
    encode_bundle,
    key_binding,
)
from device_agent.identity import device_uri
from device_agent.tpm import build_csr
from provisioning import attestation as A
from provisioning.enrollment import Request
from provisioning.est_wire import decode_csr

SHA256 = A.ALG_SHA256
KEY_ATTRS = A.TPM_RESIDENT | 1 << 6 | A.SIGN                     # + userWithAuth
AK_ATTRS = A.TPM_RESIDENT | 1 << 6 | A.RESTRICTED | A.SIGN


def sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def ecc_public(key: ec.EllipticCurvePrivateKey, attributes: int, ecdsa: bool = False) -> bytes:
    """A TPMT_PUBLIC for a P-256 key; ``ecdsa`` fixes the scheme, as a restricted key needs."""
    numbers = key.public_key().public_numbers()
    scheme = struct.pack(">HH", A.ALG_ECDSA, SHA256) if ecdsa else struct.pack(">H", A.ALG_NULL)
    return (struct.pack(">HHI", A.ALG_ECC, SHA256, attributes) + sized(b"")
            + struct.pack(">H", A.ALG_NULL) + scheme + struct.pack(">HH", 0x0003, A.ALG_NULL)
            + sized(numbers.x.to_bytes(32, "big")) + sized(numbers.y.to_bytes(32, "big")))


def tpms_attest(extra: bytes, name: bytes, magic: int = A.TPM_GENERATED_VALUE,
                kind: int = A.TPM_ST_ATTEST_CERTIFY) -> bytes:
    return (struct.pack(">IH", magic, kind) + sized(b"\x00\x0b" + b"\x11" * 32) + sized(extra)
            + struct.pack(">QIIB", 1234, 7, 0, 1) + struct.pack(">Q", 0x2019_1023)
            + sized(name) + sized(b"\x00\x0b" + b"\x22" * 32))


def tpm_signature(signer: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(signer.sign(message, ec.ECDSA(hashes.SHA256())))
    return (struct.pack(">HH", A.ALG_ECDSA, SHA256) + sized(r.to_bytes(32, "big"))
            + sized(s.to_bytes(32, "big")))


class FakeTPM:
    """A software AK and keys: evidence as a TPM would shape it, or deliberately not."""

    def __init__(self, ak_attributes: int = AK_ATTRS) -> None:
        self.ak = ec.generate_private_key(ec.SECP256R1())
        self.ak_public = ecc_public(self.ak, ak_attributes, ecdsa=True)

    def certify(self, key: ec.EllipticCurvePrivateKey, *, attributes: int = KEY_ATTRS,
                bound_to: ec.EllipticCurvePublicKey | None = None,
                magic: int = A.TPM_GENERATED_VALUE, kind: int = A.TPM_ST_ATTEST_CERTIFY,
                public: bytes | None = None) -> TpmCertifyStatement:
        area = ecc_public(key, attributes)
        name = A.parse_public(area).name
        attest = tpms_attest(key_binding(bound_to or key.public_key()), name, magic, kind)
        return TpmCertifyStatement(attest, tpm_signature(self.ak, attest), public or area)


@pytest.fixture
def tpm() -> FakeTPM:
    return FakeTPM()


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def refused(statement: TpmCertifyStatement, ak_public: bytes,
            request_key: ec.EllipticCurvePublicKey) -> str:
    with pytest.raises(A.AttestationError) as caught:
        A.verify_certify(statement, ak_public, request_key)
    return caught.value.reason


# --- TPM structures ---

def test_name_is_name_alg_then_digest_of_the_public_area(key: ec.EllipticCurvePrivateKey) -> None:
    area = ecc_public(key, KEY_ATTRS)
    public = A.parse_public(area)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(area)
    assert public.name == b"\x00\x0b" + digest.finalize()
    assert public.public_key == key.public_key()
    assert public.has(A.TPM_RESIDENT | A.SIGN)


@pytest.mark.parametrize("cut", [1, 10, 40])
def test_truncated_structures_are_refused(tpm: FakeTPM, key: ec.EllipticCurvePrivateKey,
                                          cut: int) -> None:
    statement = tpm.certify(key)
    with pytest.raises(A.AttestationError, match="truncated"):
        A.parse_public(statement.public[:-cut])
    with pytest.raises(A.AttestationError, match="truncated"):
        A.parse_attest(statement.attest[:-cut])


def test_trailing_bytes_are_refused(tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    statement = tpm.certify(key)
    with pytest.raises(A.AttestationError, match="trailing"):
        A.parse_public(statement.public + b"\0")
    with pytest.raises(A.AttestationError, match="trailing"):
        A.parse_attest(statement.attest + b"\0")


def test_a_point_off_the_curve_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    area = bytearray(ecc_public(key, KEY_ATTRS))
    area[-1] ^= 1
    with pytest.raises(A.AttestationError, match="no valid ECC point"):
        A.parse_public(bytes(area))


# --- verification and each refusal ---

def test_evidence_from_the_tpm_with_the_registered_ak_is_accepted(
        tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    result = A.verify_certify(tpm.certify(key), tpm.ak_public, key.public_key())
    assert result.name == A.parse_public(ecc_public(key, KEY_ATTRS)).name
    assert result.ak_name == A.parse_public(tpm.ak_public).name
    assert result.clock == 1234 and result.reset_count == 7


def test_wrong_magic_is_refused(tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    statement = tpm.certify(key, magic=0xFF544348)
    assert "magic" in refused(statement, tpm.ak_public, key.public_key())


def test_another_attestation_type_is_refused(tpm: FakeTPM,
                                             key: ec.EllipticCurvePrivateKey) -> None:
    statement = tpm.certify(key, kind=0x8018)  # TPM_ST_ATTEST_QUOTE
    assert "not a TPM2_Certify" in refused(statement, tpm.ak_public, key.public_key())


def test_evidence_replayed_for_another_key_is_refused(tpm: FakeTPM,
                                                      key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    statement = tpm.certify(key)  # genuine, for ``key``
    assert "another key" in refused(statement, tpm.ak_public, other.public_key())


def test_a_tampered_public_area_is_refused(tpm: FakeTPM,
                                          key: ec.EllipticCurvePrivateKey) -> None:
    genuine = tpm.certify(key, attributes=KEY_ATTRS & ~A.FIXED_TPM)  # a duplicable key
    tampered = TpmCertifyStatement(genuine.attest, genuine.signature,
                                   ecc_public(key, KEY_ATTRS))        # claims fixedTPM
    assert "attested name" in refused(tampered, tpm.ak_public, key.public_key())


def test_a_public_area_that_is_not_the_csr_key_is_refused(
        tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    request = ec.generate_private_key(ec.SECP256R1())
    statement = tpm.certify(key, bound_to=request.public_key())  # bound right, wrong key
    assert "not the CSR's key" in refused(statement, tpm.ak_public, request.public_key())


@pytest.mark.parametrize("missing", [A.FIXED_TPM, A.FIXED_PARENT, A.SENSITIVE_DATA_ORIGIN,
                                     A.SIGN])
def test_a_key_that_can_leave_the_tpm_or_cannot_sign_is_refused(
        tpm: FakeTPM, key: ec.EllipticCurvePrivateKey, missing: int) -> None:
    statement = tpm.certify(key, attributes=KEY_ATTRS & ~missing)
    assert "TPM-resident signing-only" in refused(statement, tpm.ak_public, key.public_key())


def test_a_key_that_can_decrypt_is_refused(tpm: FakeTPM,
                                           key: ec.EllipticCurvePrivateKey) -> None:
    statement = tpm.certify(key, attributes=KEY_ATTRS | A.DECRYPT)
    assert "TPM-resident signing-only" in refused(statement, tpm.ak_public, key.public_key())


def test_a_non_restricted_signing_key_posing_as_ak_is_refused(
        key: ec.EllipticCurvePrivateKey) -> None:
    impostor = FakeTPM(ak_attributes=AK_ATTRS & ~A.RESTRICTED)
    statement = impostor.certify(key)
    assert "restricted signing key" in refused(statement, impostor.ak_public, key.public_key())


def test_an_ak_that_can_decrypt_is_refused(key: ec.EllipticCurvePrivateKey) -> None:
    impostor = FakeTPM(ak_attributes=AK_ATTRS | A.DECRYPT)
    assert "restricted signing key" in refused(impostor.certify(key), impostor.ak_public,
                                               key.public_key())


def test_evidence_signed_by_another_devices_ak_is_refused(
        tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    other_device = FakeTPM()
    statement = other_device.certify(key)
    assert "does not verify" in refused(statement, tpm.ak_public, key.public_key())


def test_a_tampered_attestation_is_refused(tpm: FakeTPM,
                                          key: ec.EllipticCurvePrivateKey) -> None:
    genuine = tpm.certify(key)
    attest = bytearray(genuine.attest)
    attest[-40] ^= 1  # the clock, say
    statement = TpmCertifyStatement(bytes(attest), genuine.signature, genuine.public)
    assert "does not verify" in refused(statement, tpm.ak_public, key.public_key())


def test_an_rsa_ak_signature_is_checked_too(key: ec.EllipticCurvePrivateKey) -> None:
    from cryptography.hazmat.primitives.asymmetric import padding
    ak = rsa.generate_private_key(65537, 2048)
    modulus = ak.public_key().public_numbers().n.to_bytes(256, "big")
    ak_public = (struct.pack(">HHI", A.ALG_RSA, SHA256, AK_ATTRS) + sized(b"")
                 + struct.pack(">HHHHI", A.ALG_NULL, A.ALG_RSASSA, SHA256, 2048, 0)
                 + sized(modulus))
    area = ecc_public(key, KEY_ATTRS)
    attest = tpms_attest(key_binding(key.public_key()), A.parse_public(area).name)
    raw = ak.sign(attest, padding.PKCS1v15(), hashes.SHA256())
    signature = struct.pack(">HH", A.ALG_RSASSA, SHA256) + sized(raw)
    assert A.verify_certify(TpmCertifyStatement(attest, signature, area), ak_public,
                            key.public_key())
    bad = struct.pack(">HH", A.ALG_RSASSA, SHA256) + sized(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert "does not verify" in refused(TpmCertifyStatement(attest, bad, area), ak_public,
                                        key.public_key())


def test_sha1_signatures_are_not_accepted(tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    genuine = tpm.certify(key)
    signature = struct.pack(">HH", A.ALG_ECDSA, A.ALG_SHA1) + genuine.signature[4:]
    statement = TpmCertifyStatement(genuine.attest, signature, genuine.public)
    assert "not accepted" in refused(statement, tpm.ak_public, key.public_key())


# --- the CSR attribute (draft-ietf-lamps-csr-attestation) ---

def subject_and_san(device_id: str) -> tuple[x509.Name, list[x509.Extension[x509.ExtensionType]]]:
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(device_uri(device_id))])
    return (x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]),
            [x509.Extension(san.oid, False, san)])


def test_bundle_round_trips(tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    statement = tpm.certify(key)
    certificate = self_signed(ec.generate_private_key(ec.SECP256R1()), "ak-cert")
    bundle = decode_bundle(encode_bundle([statement], [certificate]))
    assert bundle.statements == (statement,)
    assert bundle.certificates == (certificate,)
    assert bundle.other_types == ()


def test_bundle_encoding_is_the_drafts_structure(tpm: FakeTPM,
                                                 key: ec.EllipticCurvePrivateKey) -> None:
    """AttestationBundle ::= SEQUENCE { attestations SEQUENCE OF AttestationStatement, ... },
    AttestationStatement ::= SEQUENCE { type OID, stmt }, read back with no schema."""
    from pyasn1.codec.der import decoder

    statement = tpm.certify(key)
    bundle, rest = decoder.decode(encode_bundle([statement]))
    assert rest == b"" and len(bundle) == 1          # no certs
    (only,) = bundle[0]
    assert str(only[0]) == "2.23.133.20.1" == TCG_ATTEST_TPM_CERTIFY.dotted_string
    assert [bytes(part) for part in only[1]] == [statement.attest, statement.signature,
                                                 statement.public]


def test_bundle_with_a_non_canonical_length_is_refused(tpm: FakeTPM,
                                                       key: ec.EllipticCurvePrivateKey) -> None:
    der = encode_bundle([tpm.certify(key)])
    assert der[1] == 0x82                       # long-form length, two octets: make it three
    ber = der[:1] + b"\x83\x00" + der[2:]
    with pytest.raises(EvidenceFormatError):
        decode_bundle(ber)


def test_bundle_keeps_statement_types_it_does_not_read(tpm: FakeTPM,
                                                       key: ec.EllipticCurvePrivateKey) -> None:
    der = encode_bundle([tpm.certify(key)])
    foreign = der.replace(b"\x06\x05\x67\x81\x05\x14\x01", b"\x06\x05\x67\x81\x05\x14\x07")
    bundle = decode_bundle(foreign)
    assert bundle.statements == ()
    assert bundle.other_types == (x509.ObjectIdentifier("2.23.133.20.7"),)


def test_attested_csr_round_trips_and_passes_the_est_servers_checks(
        tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    subject, extensions = subject_and_san("dev-att-1")
    csr = build_attested_csr(key, subject, extensions, encode_bundle([tpm.certify(key)]))
    assert csr.is_signature_valid
    der = csr.public_bytes(serialization.Encoding.DER)
    parsed = decode_csr(base64.b64encode(der))  # the EST server's parser, unchanged
    request = Request.from_csr(parsed)
    assert request.common_name == "dev-att-1"
    assert request.key_problem is None
    assert attestation_attribute(parsed) is not None
    result = A.verify_csr_attestation(parsed, tpm.ak_public)
    assert result is not None and result.ak_name == A.parse_public(tpm.ak_public).name


def test_plain_csr_has_no_evidence(tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    csr = build_csr(key, "dev-att-2")
    assert attestation_attribute(csr) is None
    assert A.verify_csr_attestation(csr, tpm.ak_public) is None


def test_csr_with_two_attestation_attributes_is_refused(
        tpm: FakeTPM, key: ec.EllipticCurvePrivateKey) -> None:
    from pyasn1.codec.der import decoder, encoder
    from pyasn1_modules import rfc2986

    subject, extensions = subject_and_san("dev-att-3")
    csr = build_attested_csr(key, subject, extensions, encode_bundle([tpm.certify(key)]))
    request, _ = decoder.decode(csr.public_bytes(serialization.Encoding.DER),
                                asn1Spec=rfc2986.CertificationRequest())
    attributes = request["certificationRequestInfo"]["attributes"]
    twice = [a for a in attributes if str(a["type"]) == ID_AA_ATTESTATION.dotted_string][0]
    copy = rfc2986.Attribute()
    copy["type"] = twice["type"]
    copy["values"].append(twice["values"][0])
    attributes.append(copy)
    tbs = encoder.encode(request["certificationRequestInfo"])
    from pyasn1.type import univ
    request["signature"] = univ.BitString.fromOctetString(
        key.sign(tbs, ec.ECDSA(hashes.SHA256())))
    doubled = x509.load_der_x509_csr(encoder.encode(request))
    with pytest.raises(EvidenceFormatError, match="more than one"):
        attestation_attribute(doubled)
    with pytest.raises(A.AttestationError, match="unreadable"):
        A.verify_csr_attestation(doubled, tpm.ak_public)


def test_csr_with_evidence_for_another_key_is_refused(tpm: FakeTPM,
                                                      key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    subject, extensions = subject_and_san("dev-att-4")
    csr = build_attested_csr(other, subject, extensions, encode_bundle([tpm.certify(key)]))
    with pytest.raises(A.AttestationError, match="another key"):
        A.verify_csr_attestation(csr, tpm.ak_public)


# --- EK certificates: does the TPM chain to a maker we trust ---

def self_signed(key: ec.EllipticCurvePrivateKey, name: str, ca: bool = True,
                days: int = 3650) -> x509.Certificate:
    return issue(key.public_key(), name, key, name, ca, days)


def issue(public: ec.EllipticCurvePublicKey, name: str, signer: ec.EllipticCurvePrivateKey,
          issuer: str, ca: bool, days: int = 3650) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(public).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256()))


@pytest.fixture
def maker() -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """(root, issuing CA, EK certificate) of one TPM maker."""
    root_key, ca_key = (ec.generate_private_key(ec.SECP384R1()) for _ in range(2))
    root = self_signed(root_key, "maker-root")
    ca = issue(ca_key.public_key(), "maker-ca", root_key, "maker-root", True)
    ek = issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "ek", ca_key, "maker-ca",
               False)
    return root, ca, ek


def test_ek_certificate_chains_to_its_makers_root(maker: tuple[x509.Certificate, ...]) -> None:
    root, ca, ek = maker
    assert A.verify_ek_certificate(ek, [root], [ca]) == [ek, ca, root]


def test_ek_certificate_of_an_unknown_maker_is_refused(
        maker: tuple[x509.Certificate, ...]) -> None:
    _, ca, ek = maker
    other_root = self_signed(ec.generate_private_key(ec.SECP384R1()), "other-root")
    with pytest.raises(A.AttestationError, match="trusted TPM manufacturer"):
        A.verify_ek_certificate(ek, [other_root], [ca])


def test_a_fake_root_with_the_makers_name_is_refused(
        maker: tuple[x509.Certificate, ...]) -> None:
    _, ca, ek = maker
    fake = self_signed(ec.generate_private_key(ec.SECP384R1()), "maker-root")
    with pytest.raises(A.AttestationError, match="trusted TPM manufacturer"):
        A.verify_ek_certificate(ek, [fake], [ca])


def test_an_expired_link_is_refused(maker: tuple[x509.Certificate, ...]) -> None:
    root, ca, ek = maker
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=4000)
    with pytest.raises(A.AttestationError, match="validity"):
        A.verify_ek_certificate(ek, [root], [ca], later)


def test_a_non_ca_cannot_issue_an_ek_certificate(maker: tuple[x509.Certificate, ...]) -> None:
    root, _, _ = maker
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = self_signed(root_key, "maker-root")
    leaf = issue(leaf_key.public_key(), "not-a-ca", root_key, "maker-root", False)
    ek = issue(ec.generate_private_key(ec.SECP256R1()).public_key(), "ek", leaf_key,
               "not-a-ca", False)
    with pytest.raises(A.AttestationError, match="not a CA"):
        A.verify_ek_certificate(ek, [root], [leaf])
