"""Verifying TPM key attestation, in software: TPM structures read with ``cryptography`` only.

The server side of issue 16. A request's key is accepted as TPM-resident when a
TPM2_Certify by the device's attestation key (AK) says so: the AK's signature
over a TPMS_ATTEST that the TPM generated (``TPM_GENERATED_VALUE``) for a
certification (``TPM_ST_ATTEST_CERTIFY``), whose qualifying data binds it to this
request's key, whose attested name is the digest of the public area sent with
it, and that public area is the request's key, made inside the TPM
(``sensitiveDataOrigin``), unable to leave it (``fixedTPM``, ``fixedParent``), a
signing key that cannot decrypt. The AK itself must be a restricted signing key,
so it signs only structures the TPM generated.

The factory side is here too: :func:`verify_endorsement` (does the TPM's EK
certificate chain to a manufacturer we trust and name the TPM's EK, and is its AK
fit to attest) and :func:`make_credential`, the software half of the credential
activation that proves the AK lives in the TPM that holds the EK (TPM 2.0 Part 1,
"Credential Protection").

Structures follow TPM 2.0 Part 2; everything is big-endian and length-checked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # CFB, which TPM credential protection uses, lives in "decrepit" in newer cryptography
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment]

from device_agent.csr_attestation import (
    EvidenceFormatError,
    TpmCertifyStatement,
    attestation_attribute,
    decode_bundle,
    key_binding,
)

from .errors import ProvisioningError

# The certificate policy an EST-issued certificate carries when its key's TPM residency
# was verified, so a relying party can require it. Under the documentation arc of
# RFC 5612 (enterprise number 32473): replace it by an OID under an assigned arc.
ATTESTED_KEY_POLICY = x509.ObjectIdentifier("1.3.6.1.4.1.32473.16.1")

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_CERTIFY = 0x8017

ALG_RSA, ALG_SHA1, ALG_AES, ALG_KEYEDHASH = 0x0001, 0x0004, 0x0006, 0x0008
ALG_SHA256, ALG_SHA384, ALG_SHA512, ALG_NULL = 0x000B, 0x000C, 0x000D, 0x0010
ALG_RSASSA, ALG_RSAPSS, ALG_ECDSA, ALG_ECC, ALG_CFB = 0x0014, 0x0016, 0x0018, 0x0023, 0x0043

FIXED_TPM, FIXED_PARENT = 1 << 1, 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
TPM_RESIDENT = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN

_HASHES: dict[int, type[hashes.HashAlgorithm]] = {
    ALG_SHA256: hashes.SHA256, ALG_SHA384: hashes.SHA384, ALG_SHA512: hashes.SHA512,
}
_HASHLIB = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
_CURVES: dict[int, ec.EllipticCurve] = {
    0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1(), 0x0005: ec.SECP521R1(),
}


class AttestationError(ProvisioningError):
    """Key attestation evidence was refused; ``reason`` is the short text for the audit."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Reader:
    """Big-endian TPM unmarshalling that refuses short or over-long buffers."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.offset = 0
        self.what = what

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.data):
            raise AttestationError(f"{self.what} is truncated")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def sized(self) -> bytes:
        """A TPM2B_*: a 16-bit size, then that many bytes."""
        return self.take(self.u16())

    def end(self) -> None:
        if self.offset != len(self.data):
            raise AttestationError(f"{self.what} has {len(self.data) - self.offset} "
                                   "trailing bytes")


@dataclass(frozen=True)
class TPMPublic:
    """A TPMT_PUBLIC of an RSA or ECC key: what the name is computed from."""

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]      # (algorithm, key bits, mode); (ALG_NULL, 0, 0)
    scheme: tuple[int, int]              # (scheme, hash); (ALG_NULL, 0)
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey

    @property
    def name(self) -> bytes:
        """The TPM name: nameAlg (16 bits) then the nameAlg digest of the public area."""
        if self.name_alg not in _HASHLIB:
            raise AttestationError(f"unsupported name algorithm 0x{self.name_alg:04x}")
        return struct.pack(">H", self.name_alg) + hashlib.new(
            _HASHLIB[self.name_alg], self.raw).digest()

    def has(self, attributes: int) -> bool:
        return self.attributes & attributes == attributes


def parse_public(data: bytes) -> TPMPublic:
    """A marshalled TPMT_PUBLIC (no TPM2B size) of an RSA or ECC key."""
    reader = _Reader(data, "TPMT_PUBLIC")
    kind, name_alg, attributes = reader.u16(), reader.u16(), reader.u32()
    policy = reader.sized()
    symmetric = _sym_def(reader)
    scheme = (reader.u16(), 0)
    if scheme[0] != ALG_NULL:
        scheme = (scheme[0], reader.u16())
    key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    if kind == ALG_ECC:
        curve_id = reader.u16()
        if reader.u16() != ALG_NULL:  # kdf scheme: only NULL is used by signing keys and EKs
            raise AttestationError("TPMT_PUBLIC with an ECC KDF scheme is not supported")
        x, y = reader.sized(), reader.sized()
        if curve_id not in _CURVES:
            raise AttestationError(f"unsupported ECC curve 0x{curve_id:04x}")
        try:
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                                _CURVES[curve_id]).public_key()
        except ValueError as exc:
            raise AttestationError(f"TPMT_PUBLIC holds no valid ECC point: {exc}") from exc
    elif kind == ALG_RSA:
        reader.u16()  # keyBits: implied by the modulus
        exponent = reader.u32() or 65537
        modulus = reader.sized()
        try:
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        except ValueError as exc:
            raise AttestationError(f"TPMT_PUBLIC holds no valid RSA key: {exc}") from exc
    else:
        raise AttestationError(f"TPMT_PUBLIC of type 0x{kind:04x} is not an RSA or ECC key")
    reader.end()
    return TPMPublic(data, kind, name_alg, attributes, policy, symmetric, scheme, key)


def _sym_def(reader: _Reader) -> tuple[int, int, int]:
    algorithm = reader.u16()
    if algorithm == ALG_NULL:
        return (ALG_NULL, 0, 0)
    return (algorithm, reader.u16(), reader.u16())


@dataclass(frozen=True)
class CertifyInfo:
    """A parsed TPMS_ATTEST; ``name`` and ``qualified_name`` only for a certification."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    name: bytes = b""
    qualified_name: bytes = b""


def parse_attest(data: bytes) -> CertifyInfo:
    """A marshalled TPMS_ATTEST (no TPM2B size); the attested part read for TPM2_Certify."""
    reader = _Reader(data, "TPMS_ATTEST")
    magic, kind = reader.u32(), reader.u16()
    signer, extra = reader.sized(), reader.sized()
    clock, resets, restarts, safe = reader.u64(), reader.u32(), reader.u32(), reader.u8()
    firmware = reader.u64()
    info = CertifyInfo(magic, kind, signer, extra, clock, resets, restarts, safe == 1, firmware)
    if magic != TPM_GENERATED_VALUE or kind != TPM_ST_ATTEST_CERTIFY:
        return info  # the caller refuses it; the rest has another layout
    name, qualified = reader.sized(), reader.sized()
    reader.end()
    return CertifyInfo(magic, kind, signer, extra, clock, resets, restarts, safe == 1, firmware,
                       name, qualified)


def verify_tpm_signature(ak: TPMPublic, message: bytes, signature: bytes) -> None:
    """Check a marshalled TPMT_SIGNATURE by ``ak`` over ``message``."""
    reader = _Reader(signature, "TPMT_SIGNATURE")
    scheme, hash_alg = reader.u16(), reader.u16()
    if hash_alg not in _HASHES:
        raise AttestationError(f"signature hash 0x{hash_alg:04x} is not accepted")
    digest = _HASHES[hash_alg]()
    try:
        if scheme == ALG_ECDSA and isinstance(ak.public_key, ec.EllipticCurvePublicKey):
            r, s = reader.sized(), reader.sized()
            reader.end()
            der = utils.encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big"))
            ak.public_key.verify(der, message, ec.ECDSA(digest))
        elif scheme in (ALG_RSASSA, ALG_RSAPSS) and isinstance(ak.public_key, rsa.RSAPublicKey):
            raw = reader.sized()
            reader.end()
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15() if scheme == ALG_RSASSA
                else padding.PSS(padding.MGF1(digest), padding.PSS.AUTO))
            ak.public_key.verify(raw, message, pad, digest)
        else:
            raise AttestationError(f"signature scheme 0x{scheme:04x} does not fit the AK")
    except InvalidSignature as exc:
        raise AttestationError("attestation signature does not verify with the device's AK") \
            from exc


def check_attestation_key(ak: TPMPublic) -> None:
    """An AK is a restricted signing key that never leaves its TPM."""
    if not ak.has(RESTRICTED | SIGN) or ak.attributes & DECRYPT:
        raise AttestationError("attestation key is not a restricted signing key")
    if not ak.has(TPM_RESIDENT):
        raise AttestationError("attestation key is not fixedTPM, fixedParent and "
                               "sensitiveDataOrigin")


@dataclass(frozen=True)
class AttestedKey:
    """What a verified statement established."""

    name: bytes                 # the certified key's TPM name
    ak_name: bytes              # the attestation key's TPM name
    clock: int                  # the TPM's clock when it certified (milliseconds)
    reset_count: int


def verify_certify(statement: TpmCertifyStatement, ak_public: bytes,
                   request_key: ec.EllipticCurvePublicKey) -> AttestedKey:
    """Accept ``statement`` as proof that ``request_key`` lives in the TPM holding the AK.

    ``ak_public`` is the TPMT_PUBLIC registered for the device at the factory.
    Every refusal raises :class:`AttestationError` with its reason.
    """
    ak = parse_public(ak_public)
    check_attestation_key(ak)
    verify_tpm_signature(ak, statement.attest, statement.signature)
    info = parse_attest(statement.attest)
    if info.magic != TPM_GENERATED_VALUE:
        raise AttestationError("attestation was not generated by a TPM (magic)")
    if info.type != TPM_ST_ATTEST_CERTIFY:
        raise AttestationError(f"attestation is not a TPM2_Certify (type 0x{info.type:04x})")
    if not hmac.compare_digest(info.extra_data, key_binding(request_key)):
        raise AttestationError("attestation was made for another key (qualifying data)")
    certified = parse_public(statement.public)
    if info.name != certified.name:
        raise AttestationError("attested name is not the name of the public area sent")
    if certified.public_key != request_key:
        raise AttestationError("attested public area is not the CSR's key")
    if not certified.has(TPM_RESIDENT | SIGN) or certified.attributes & DECRYPT:
        raise AttestationError("attested key is not a TPM-resident signing-only key "
                               "(fixedTPM, fixedParent, sensitiveDataOrigin, sign, not decrypt)")
    return AttestedKey(certified.name, ak.name, info.clock, info.reset_count)


def verify_csr_attestation(csr: x509.CertificateSigningRequest,
                           ak_public: bytes) -> AttestedKey | None:
    """The CSR's key attestation checked against the device's AK; None: no evidence sent.

    Whether None is acceptable is the policy's decision (``key_attestation``).
    """
    try:
        der = attestation_attribute(csr)
        if der is None:
            return None
        bundle = decode_bundle(der)
    except EvidenceFormatError as exc:
        raise AttestationError(f"attestation attribute unreadable: {exc}") from exc
    if len(bundle.statements) != 1:
        raise AttestationError(f"expected one tcg-attest-tpm-certify statement, "
                               f"got {len(bundle.statements)}")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AttestationError("only ECC request keys are attested")
    return verify_certify(bundle.statements[0], ak_public, key)


# --- the factory: EK certificates and credential activation ---

def verify_ek_certificate(certificate: x509.Certificate, roots: Iterable[x509.Certificate],
                          intermediates: Iterable[x509.Certificate] = (),
                          now: dt.datetime | None = None) -> list[x509.Certificate]:
    """The chain from the EK certificate to one of ``roots`` (the TPM makers we trust).

    EK certificates are not TLS certificates (empty subject, a critical
    directoryName SAN, the tcg-kp-EKCertificate usage), so the path is built
    here: each link's signature, validity and CA flag. Raises when none chains.
    """
    now = now or dt.datetime.now(dt.UTC)
    anchors = list(roots)
    pool = anchors + list(intermediates)
    chain = [certificate]
    while True:
        current = chain[-1]
        _check_validity(current, now)
        if any(current == root for root in anchors):
            return chain
        issuer = next((c for c in pool if c not in chain and _issued(current, c)), None)
        if issuer is None or len(chain) > 5:
            raise AttestationError("EK certificate does not chain to a trusted TPM manufacturer")
        _check_ca(issuer)
        chain.append(issuer)


def _issued(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_validity(certificate: x509.Certificate, now: dt.datetime) -> None:
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise AttestationError(f"certificate {certificate.subject.rfc4514_string()!r} in the "
                               "EK chain is outside its validity period")


def _check_ca(certificate: x509.Certificate) -> None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise AttestationError(f"{certificate.subject.rfc4514_string()!r} is not a CA")


def check_ek_matches(ek_public: bytes, certificate: x509.Certificate) -> TPMPublic:
    """The EK the TPM made from the template is the key its certificate names."""
    ek = parse_public(ek_public)
    if not ek.has(RESTRICTED | DECRYPT | TPM_RESIDENT) or ek.attributes & SIGN:
        raise AttestationError("endorsement key is not a restricted decryption key")
    if ek.public_key != certificate.public_key():
        raise AttestationError("the TPM's endorsement key is not the one its EK certificate "
                               "names")
    return ek


def verify_endorsement(ek_certificate: x509.Certificate, ek_public: bytes, ak_public: bytes,
                       roots: Iterable[x509.Certificate],
                       intermediates: Iterable[x509.Certificate] = (),
                       ) -> tuple[TPMPublic, TPMPublic]:
    """The EK and the AK a TPM presented at the factory: the EK certificate chains to one of
    ``roots`` (the makers the line trusts), the EK the TPM recreated is the one it names,
    and the AK is a restricted signing key that never leaves its TPM.

    One check for both places a line attests a TPM: on the station with a local Factory
    CA (factory.py) and in the signing service, from the station's headers
    (factory_signing.py). That the AK sits beside this EK is proven after, by credential
    activation.
    """
    verify_ek_certificate(ek_certificate, roots, intermediates)
    ek = check_ek_matches(ek_public, ek_certificate)
    ak = parse_public(ak_public)
    check_attestation_key(ak)
    return ek, ak


def _kdfa(alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes,
          bits: int) -> bytes:
    """TPM 2.0 Part 1, 11.4.10.2: SP 800-108 counter-mode KDF with HMAC."""
    out = b""
    counter = 0
    tail = label + b"\0" + context_u + context_v + struct.pack(">I", bits)
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(key, struct.pack(">I", counter) + tail, _HASHLIB[alg]).digest()
    return out[:(bits + 7) // 8]


def _kdfe(alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """TPM 2.0 Part 1, 11.4.10.3: SP 800-56A concatenation KDF for ECDH."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hashlib.new(_HASHLIB[alg], struct.pack(">I", counter) + z + label + b"\0"
                           + party_u + party_v).digest()
    return out[:(bits + 7) // 8]


def _sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def make_credential(ek: TPMPublic, object_name: bytes, credential: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software: (credentialBlob, secret), the contents of a
    TPM2B_ID_OBJECT and a TPM2B_ENCRYPTED_SECRET.

    Only the TPM holding ``ek``'s private part can recover ``credential``, and only
    for a loaded object whose name is ``object_name`` (TPM2_ActivateCredential).
    """
    if ek.name_alg not in _HASHES or ek.symmetric[0] != ALG_AES or ek.symmetric[2] != ALG_CFB:
        raise AttestationError("endorsement key is not an AES-CFB storage key with a "
                               "SHA-2 name algorithm")
    hash_alg = _HASHES[ek.name_alg]
    digest_size = hashlib.new(_HASHLIB[ek.name_alg]).digest_size
    digest_bits = digest_size * 8
    if not 0 < len(credential) <= digest_size:
        raise ValueError("credential must be 1 to digest-size bytes")
    if isinstance(ek.public_key, rsa.RSAPublicKey):
        seed = os.urandom(digest_size)
        secret = ek.public_key.encrypt(seed, padding.OAEP(
            padding.MGF1(hash_alg()), hash_alg(), b"IDENTITY\0"))
    else:
        ephemeral = ec.generate_private_key(ek.public_key.curve)
        z = ephemeral.exchange(ec.ECDH(), ek.public_key)
        size = (ek.public_key.curve.key_size + 7) // 8
        point = ephemeral.public_key().public_numbers()
        ex, ey = point.x.to_bytes(size, "big"), point.y.to_bytes(size, "big")
        ek_x = ek.public_key.public_numbers().x.to_bytes(size, "big")
        seed = _kdfe(ek.name_alg, z, b"IDENTITY", ex, ek_x, digest_bits)
        secret = _sized(ex) + _sized(ey)
    sym_key = _kdfa(ek.name_alg, seed, b"STORAGE", object_name, b"", ek.symmetric[1])
    encryptor = Cipher(algorithms.AES(sym_key), CFB(b"\0" * 16)).encryptor()
    enc_identity = encryptor.update(_sized(credential)) + encryptor.finalize()
    hmac_key = _kdfa(ek.name_alg, seed, b"INTEGRITY", b"", b"", digest_bits)
    outer = hmac.new(hmac_key, enc_identity + object_name, _HASHLIB[ek.name_alg]).digest()
    return _sized(outer) + enc_identity, secret


def ek_fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the EK certificate's DER, hex: what the registry records for a device."""
    return certificate.fingerprint(hashes.SHA256()).hex()
