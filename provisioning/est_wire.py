"""RFC 7030 wire format with the RFC 8951 clarifications, and nothing about policy.

Requests carry a base64 PKCS#10 body (``application/pkcs10``); answers carry a
base64 PKCS#7 certs-only structure. RFC 8951 settles that base64 is always
used whatever ``Content-Transfer-Encoding`` says, and that a receiver tolerates
line breaks and other whitespace inside it. A request body is read within the size
and time limits its server sets (``read_body``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from .errors import EnrollmentRefused

if TYPE_CHECKING:  # aiohttp is the server extra; the station's code imports this module too
    from aiohttp import web

PREFIX = "/.well-known/est"
CSR_TYPE = "application/pkcs10"
CERTS_TYPE = "application/pkcs7-mime; smime-type=certs-only"
CSRATTRS_TYPE = "application/csrattrs"

# What cryptography raises for DER it cannot read: it parses a CSR's or a certificate's
# parts lazily, so these come from the attribute read, not only from the load.
PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError, TypeError, UnsupportedAlgorithm, x509.UnsupportedGeneralNameType,
    x509.DuplicateExtension, x509.InvalidVersion)


def media_type(content_type: str | None) -> str:
    """``application/pkcs10`` from ``Application/PKCS10; charset=x``: parameters are ignored."""
    return (content_type or "").split(";", 1)[0].strip().lower()


async def read_body(request: web.Request, limit: int,
                    timeout: float) -> bytes | tuple[int, str]:
    """The body of an enrollment request, or the refusal (status, reason) to answer with.

    Shared by the EST server and the Factory CA's service, so both refuse a body larger
    than ``limit`` with 413 as soon as it passes the limit, and one slower than
    ``timeout`` seconds with 408, in the same words.
    """
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.content.iter_chunked(8192):
                body += chunk
                if len(body) > limit:
                    return (413, f"request body larger than {limit} bytes")
    except TimeoutError:
        return (408, f"request body not received within {timeout:g}s")
    return bytes(body)


def decode_base64(body: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(b"".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnrollmentRefused(400, f"{what} is not valid base64") from exc


def decode_csr(body: bytes) -> x509.CertificateSigningRequest:
    """The request in a simpleenroll/simplereenroll body, its signature checked, its
    subject, extensions and key readable.

    The signature is the proof of possession of the private key, so a CSR whose
    signature does not verify is refused as malformed before any policy runs.
    Every part a policy reads is parsed here, so a part that does not parse is a
    400 and not an exception in the policy.
    """
    der = decode_base64(body, "request body")
    if not der:
        raise EnrollmentRefused(400, "request body is empty")
    try:
        csr = x509.load_der_x509_csr(der)
    except PARSE_ERRORS as exc:
        raise EnrollmentRefused(400, "request body is not a DER PKCS#10 request") from exc
    try:
        valid = csr.is_signature_valid
    except PARSE_ERRORS as exc:
        raise EnrollmentRefused(400, "CSR signature cannot be checked") from exc
    if not valid:
        raise EnrollmentRefused(400, "CSR signature does not verify")
    try:
        csr.subject.rfc4514_string()
        len(csr.extensions)
        csr.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    except PARSE_ERRORS as exc:
        raise EnrollmentRefused(400, "CSR subject, extensions or key cannot be read") from exc
    return csr


def _wrap(data: bytes) -> bytes:
    """Base64 in 64-column lines, as PEM writes it and RFC 8951 allows."""
    text = base64.b64encode(data)
    return b"".join(text[i:i + 64] + b"\n" for i in range(0, len(text), 64))


def encode_certs(certificates: Sequence[x509.Certificate]) -> bytes:
    """A certs-only PKCS#7 (no signers, no content), DER then base64."""
    return _wrap(pkcs7.serialize_certificates(list(certificates), serialization.Encoding.DER))


# DER for CsrAttrs (RFC 7030 4.5.2): ecdsa-with-SHA256 as an OID, then the
# attribute that asks for an EC key on P-256.
def _oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    body = bytearray([first * 40 + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _tlv(tag: int, value: bytes) -> bytes:
    if len(value) < 0x80:
        return bytes([tag, len(value)]) + value
    size = len(value).to_bytes((len(value).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + value


ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
EC_PUBLIC_KEY = "1.2.840.10045.2.1"
SECP256R1 = "1.2.840.10045.3.1.7"


def encode_csrattrs() -> bytes:
    attributes = _oid(ECDSA_WITH_SHA256) + _tlv(
        0x30, _oid(EC_PUBLIC_KEY) + _tlv(0x31, _oid(SECP256R1)))
    return _wrap(_tlv(0x30, attributes))
