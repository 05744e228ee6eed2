"""Key attestation in a PKCS#10 request: the wire format both the device and the server use.

The evidence travels as the attribute of ``draft-ietf-lamps-csr-attestation``
(revision 28): ``id-aa-attestation`` (1.2.840.113549.1.9.16.2.59) holding one
``AttestationBundle`` -- a sequence of ``AttestationStatement`` (a type OID and a
statement) and optionally the certificates a verifier may need. Our statement is
TCG's ``tcg-attest-tpm-certify`` (2.23.133.20.1): the TPMS_ATTEST a TPM2_Certify
returned, the signature over it (a marshalled TPMT_SIGNATURE) and the certified
key's TPMT_PUBLIC, each an OCTET STRING, as the draft's TPM appendix defined it up
to revision 18.

``cryptography`` writes CSR attributes only as string types, and this one is a
SEQUENCE, so the CertificationRequestInfo is assembled with pyasn1 from DER that
``cryptography`` produced (name, key, extension values), signed once by the
caller's key (inside the TPM), and loaded back with ``cryptography``. Decoding is
strict: whatever does not re-encode to the same bytes is refused.

The statement is bound to the request by its qualifying data,
:func:`key_binding` of the request's public key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyasn1.codec.der import decoder, encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import constraint, namedtype, univ
from pyasn1_modules import rfc2986, rfc5280

DRAFT = "draft-ietf-lamps-csr-attestation-28"
ID_AA_ATTESTATION = x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.59")
TCG_ATTEST_TPM_CERTIFY = x509.ObjectIdentifier("2.23.133.20.1")
EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")
ECDSA_WITH_SHA256 = univ.ObjectIdentifier("1.2.840.10045.4.3.2")
MAX_ATTRIBUTE = 16 * 1024  # a TPM statement is a few hundred bytes; certificates add a few KiB


class EvidenceFormatError(ValueError):
    """The attestation attribute is missing parts, repeated, or not DER."""


def key_binding(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """The qualifying data that binds TPM2_Certify evidence to one request's key:
    SHA-256 of the key's DER SubjectPublicKeyInfo."""
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


@dataclass(frozen=True)
class TpmCertifyStatement:
    """One TPM2_Certify result, as the TPM produced it (marshalled TPM structures)."""

    attest: bytes      # TPMS_ATTEST (the signed bytes)
    signature: bytes   # TPMT_SIGNATURE by the attestation key
    public: bytes      # TPMT_PUBLIC of the certified key

    def __post_init__(self) -> None:
        for name in ("attest", "signature", "public"):
            if not isinstance(getattr(self, name), bytes):
                raise TypeError(f"{name} must be bytes")
            if not getattr(self, name):
                raise ValueError(f"{name} is empty")


@dataclass(frozen=True)
class AttestationBundle:
    """What the attribute carries: our TPM statements and any X.509 certificates."""

    statements: tuple[TpmCertifyStatement, ...]
    certificates: tuple[x509.Certificate, ...] = ()
    other_types: tuple[x509.ObjectIdentifier, ...] = ()  # statements we do not read


class _AttestationStatement(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("type", univ.ObjectIdentifier()),
        namedtype.NamedType("stmt", univ.Any()),
    )


class _TcgAttestTpmCertify(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("tpmSAttest", univ.OctetString()),
        namedtype.NamedType("signature", univ.OctetString()),
        namedtype.OptionalNamedType("tpmTPublic", univ.OctetString()),
    )


_NON_EMPTY = constraint.ValueSizeConstraint(1, 64)


class _AttestationBundle(univ.Sequence):
    componentType = namedtype.NamedTypes(
        namedtype.NamedType("attestations", univ.SequenceOf(
            componentType=_AttestationStatement()).subtype(sizeSpec=_NON_EMPTY)),
        # LimitedCertChoices: only ``certificate`` is written; ``other`` is skipped on read
        namedtype.OptionalNamedType("certs", univ.SequenceOf(
            componentType=univ.Any()).subtype(sizeSpec=_NON_EMPTY)),
    )


def encode_bundle(statements: Sequence[TpmCertifyStatement],
                  certificates: Sequence[x509.Certificate] = ()) -> bytes:
    """DER of an AttestationBundle with ``statements`` and ``certificates``."""
    if not statements:
        raise ValueError("an AttestationBundle needs at least one statement")
    bundle = _AttestationBundle()
    attestations = bundle["attestations"]
    for i, statement in enumerate(statements):
        certify = _TcgAttestTpmCertify()
        certify["tpmSAttest"] = statement.attest
        certify["signature"] = statement.signature
        certify["tpmTPublic"] = statement.public
        attestations[i]["type"] = univ.ObjectIdentifier(TCG_ATTEST_TPM_CERTIFY.dotted_string)
        attestations[i]["stmt"] = univ.Any(encoder.encode(certify))
    for i, certificate in enumerate(certificates):
        bundle["certs"][i] = univ.Any(certificate.public_bytes(serialization.Encoding.DER))
    return bytes(encoder.encode(bundle))


def _strict_decode(der: bytes, spec: univ.Asn1Item, what: str) -> univ.Asn1Item:
    try:
        value, rest = decoder.decode(der, asn1Spec=spec)
        canonical = encoder.encode(value)
    except (PyAsn1Error, ValueError, TypeError) as exc:
        raise EvidenceFormatError(f"{what} is not DER: {exc}") from exc
    if rest or bytes(canonical) != bytes(der):
        raise EvidenceFormatError(f"{what} is not canonical DER")
    return value


def decode_bundle(der: bytes) -> AttestationBundle:
    """The statements and certificates of an AttestationBundle; refuses what is not DER."""
    if len(der) > MAX_ATTRIBUTE:
        raise EvidenceFormatError(f"attestation attribute larger than {MAX_ATTRIBUTE} bytes")
    bundle = _strict_decode(der, _AttestationBundle(), "AttestationBundle")
    statements: list[TpmCertifyStatement] = []
    others: list[x509.ObjectIdentifier] = []
    for item in bundle["attestations"]:
        kind = x509.ObjectIdentifier(str(item["type"]))
        if kind != TCG_ATTEST_TPM_CERTIFY:
            others.append(kind)
            continue
        certify = _strict_decode(bytes(item["stmt"]), _TcgAttestTpmCertify(),
                                 "tcg-attest-tpm-certify statement")
        if not certify["tpmTPublic"].isValue:
            raise EvidenceFormatError("tcg-attest-tpm-certify statement lacks tpmTPublic")
        try:
            statements.append(TpmCertifyStatement(bytes(certify["tpmSAttest"]),
                                                  bytes(certify["signature"]),
                                                  bytes(certify["tpmTPublic"])))
        except ValueError as exc:
            raise EvidenceFormatError(f"tcg-attest-tpm-certify statement: {exc}") from exc
    certificates: list[x509.Certificate] = []
    if bundle["certs"].isValue:
        for item in bundle["certs"]:
            raw = bytes(item)
            if raw[:1] != b"\x30":
                continue  # ``other`` [3]: a non-X.509 format we do not read
            try:
                certificates.append(x509.load_der_x509_certificate(raw))
            except ValueError as exc:
                raise EvidenceFormatError(f"certificate in AttestationBundle: {exc}") from exc
    return AttestationBundle(tuple(statements), tuple(certificates), tuple(others))


def attestation_attribute(csr: x509.CertificateSigningRequest) -> bytes | None:
    """The DER AttestationBundle of ``csr``'s id-aa-attestation attribute, None if absent.

    The draft allows one such attribute with exactly one value; anything else is refused.
    """
    der = csr.public_bytes(serialization.Encoding.DER)
    request = _strict_decode(der, rfc2986.CertificationRequest(), "CSR")
    found: list[bytes] = []
    for attribute in request["certificationRequestInfo"]["attributes"]:
        if x509.ObjectIdentifier(str(attribute["type"])) != ID_AA_ATTESTATION:
            continue
        values = attribute["values"]
        if len(values) != 1:
            raise EvidenceFormatError("id-aa-attestation attribute must hold exactly one value")
        found.append(bytes(values[0]))
    if len(found) > 1:
        raise EvidenceFormatError("CSR carries more than one id-aa-attestation attribute")
    return found[0] if found else None


def build_attested_csr(key: ec.EllipticCurvePrivateKey, subject: x509.Name,
                       extensions: Sequence[x509.Extension[x509.ExtensionType]],
                       bundle: bytes) -> x509.CertificateSigningRequest:
    """A PKCS#10 request for ``key`` with ``extensions`` and the attestation ``bundle``.

    The key signs once (ECDSA with SHA-256), as :func:`device_agent.tpm.build_csr` does.
    """
    _strict_decode(bundle, _AttestationBundle(), "AttestationBundle")
    info = rfc2986.CertificationRequestInfo()
    info["version"] = 0
    info["subject"] = _strict_decode(subject.public_bytes(), rfc5280.Name(), "subject")
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    info["subjectPKInfo"] = _strict_decode(spki, rfc5280.SubjectPublicKeyInfo(), "public key")
    attributes = info["attributes"]
    if extensions:
        attributes.append(_attribute(EXTENSION_REQUEST, _extensions_der(extensions)))
    attributes.append(_attribute(ID_AA_ATTESTATION, bundle))
    tbs = bytes(encoder.encode(info))
    request = rfc2986.CertificationRequest()
    request["certificationRequestInfo"] = info
    request["signatureAlgorithm"]["algorithm"] = ECDSA_WITH_SHA256
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    request["signature"] = univ.BitString.fromOctetString(signature)
    return x509.load_der_x509_csr(bytes(encoder.encode(request)))


def _attribute(oid: x509.ObjectIdentifier, value_der: bytes) -> rfc5280.Attribute:
    attribute = rfc5280.Attribute()
    attribute["type"] = univ.ObjectIdentifier(oid.dotted_string)
    attribute["values"].append(univ.Any(value_der))
    return attribute


def _extensions_der(extensions: Sequence[x509.Extension[x509.ExtensionType]]) -> bytes:
    sequence = rfc5280.Extensions()
    for extension in extensions:
        item = rfc5280.Extension()
        item["extnID"] = univ.ObjectIdentifier(extension.oid.dotted_string)
        item["critical"] = extension.critical
        item["extnValue"] = extension.value.public_bytes()
        sequence.append(item)
    return bytes(encoder.encode(sequence))
