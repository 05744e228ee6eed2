"""Malformed enrollment requests against the real est-server: a 4xx for each, never a 500.

Hypothesis builds bodies from broken CSRs (mutated DER, CSRs assembled field by
field with unreadable subjects, duplicate or malformed extensions, keys of every
wrong kind, huge subjects), base64 that is not, random bytes, empty and oversized
bodies, and any content type. Each is posted three ways: without a client
certificate (401 with WWW-Authenticate), with a certificate the endpoint does not
take (403), both without an audit row; and with a usable bootstrap or operational
certificate, where every answer is a 4xx with one audit row.
"""

from __future__ import annotations

import base64
import functools
import string
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa, x25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from provisioning import pki
from provisioning.est_wire import _oid as oid
from provisioning.est_wire import _tlv as tlv

from .est_support import (
    ESTServer,
    Identity,
    bootstrap_identity,
    csr_der,
    enroll,
    new_key,
    post,
    running_est_server,
    save_identity,
)

pytestmark = pytest.mark.integration
DEVICE = "fuzz-dev"
CSR_TYPE = "application/pkcs10"
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


# --- DER, enough to assemble a CertificationRequest (RFC 2986) by hand (est_wire's own
# TLV and OID encoders, which write the CsrAttrs answer) -------------------------------------


def seq(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def set_of(*parts: bytes) -> bytes:
    return tlv(0x31, b"".join(sorted(parts)))  # DER orders a SET OF by encoding


CN, EXTENSION_REQUEST, SAN = "2.5.4.3", "1.2.840.113549.1.9.14", "2.5.29.17"
SIGNATURES = {"ec": "1.2.840.10045.4.3.2", "rsa": "1.2.840.113549.1.1.11",
              "ed25519": "1.3.101.112", "ed448": "1.3.101.113", "dsa": "2.16.840.1.101.3.4.3.2"}
EC_KEY = "1.2.840.10045.2.1"


@functools.cache
def keys() -> dict[str, object]:
    """Private keys of every kind (made once); the policy takes P-256, P-384, RSA-2048, Ed25519."""
    return {
        "p256": new_key(), "p384": ec.generate_private_key(ec.SECP384R1()),
        "p192": ec.generate_private_key(ec.SECP192R1()),
        "secp256k1": ec.generate_private_key(ec.SECP256K1()),
        "brainpool": ec.generate_private_key(ec.BrainpoolP256R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(), "ed448": ed448.Ed448PrivateKey.generate(),
        "rsa1024": rsa.generate_private_key(65537, 1024),  # noqa: S505 - a key to refuse
        "rsa2048": rsa.generate_private_key(65537, 2048),
        "dsa": dsa.generate_private_key(1024),  # noqa: S505 - a key to refuse
        "x25519": x25519.X25519PrivateKey.generate(),  # cannot sign: its CSR cannot verify
    }


ACCEPTED = {"p256", "p384", "rsa2048", "ed25519"}
BAD_SPKI = {
    "unknown-algorithm": seq(seq(oid("1.2.3.4.5")), tlv(0x03, b"\x00abc")),
    "unknown-curve": seq(seq(oid(EC_KEY), oid("1.2.3.4")), tlv(0x03, b"\x00\x04" + b"a" * 64)),
    "point-off-curve": seq(seq(oid(EC_KEY), oid("1.2.840.10045.3.1.7")),
                           tlv(0x03, b"\x00\x04" + b"a" * 64)),
    "rsa-garbage": seq(seq(oid("1.2.840.113549.1.1.1"), tlv(0x05, b"")),
                       tlv(0x03, b"\x00\x30\x03\x02\x01")),
    "empty": seq(),
}


def spki(key: object) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(key: object, data: bytes) -> tuple[str, bytes]:
    """The signature algorithm and signature ``key`` makes over ``data`` (x25519: P-256's)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return SIGNATURES["ec"], key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return SIGNATURES["rsa"], key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if isinstance(key, dsa.DSAPrivateKey):
        return SIGNATURES["dsa"], key.sign(data, hashes.SHA256())
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        name = "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "ed448"
        return SIGNATURES[name], key.sign(data)
    return sign(keys()["p256"], data)


# --- strategies --------------------------------------------------------------------------

STRING_TAGS = [0x0C, 0x13, 0x16, 0x1E, 0x14, 0x1C, 0x02, 0x04, 0x30]
NAME_OIDS = [CN, "2.5.4.6", "2.5.4.10", "2.5.4.11", "2.5.4.5", "0.9.2342.19200300.100.1.25",
             "1.2.3.4.99"]
attribute_values = st.one_of(
    st.text(max_size=80).map(lambda text: tlv(0x0C, text.encode())),  # UTF8String
    st.from_regex(r"[A-Za-z0-9 '()+,./:=?-]{0,40}", fullmatch=True).map(
        lambda text: tlv(0x13, text.encode())),                        # PrintableString
    st.integers(1000, 12000).map(lambda n: tlv(0x0C, b"x" * n)),       # huge
    st.tuples(st.sampled_from(STRING_TAGS), st.binary(max_size=40)).map(
        lambda tagged: tlv(*tagged)),                                  # anything at all
)


@st.composite
def subjects(draw: st.DrawFn, common_name: str) -> bytes:
    """The CN (or not), then random attributes: odd string types, odd values, huge ones."""
    rdns = [set_of(seq(oid(CN), tlv(0x0C, common_name.encode())))] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 4))):
        atvs = [seq(oid(draw(st.sampled_from(NAME_OIDS))), draw(attribute_values))
                for _ in range(draw(st.integers(1, 2)))]
        rdns.insert(draw(st.integers(0, len(rdns))), set_of(*atvs))
    return seq(*rdns)


def extension(draw: st.DrawFn) -> bytes:
    uri = tlv(0x86, f"urn:device:{DEVICE}".encode())
    value = draw(st.sampled_from([
        seq(uri),                                       # the SAN the policy wants
        seq(tlv(0x86, draw(st.binary(max_size=40)))),  # URIs of any bytes
        seq(tlv(0x82, draw(st.binary(max_size=40)))),  # DNS names of any bytes
        seq(tlv(0xA3, b"\x30\x00")),                    # x400Address: unsupported
        seq(tlv(0x87, b"\x01\x02\x03")),                # an IP address of 3 bytes
        draw(st.binary(max_size=30)),                   # not DER at all
    ]))
    name = draw(st.sampled_from([SAN, SAN, "2.5.29.19", "2.5.29.15", "2.5.29.37", "1.2.3.4"]))
    critical = [tlv(0x01, b"\xff")] if draw(st.booleans()) else []
    return seq(oid(name), *critical, tlv(0x04, value))


@st.composite
def attributes(draw: st.DrawFn) -> bytes:
    """[0] attributes: an extension request (duplicates welcome), odd sets, junk."""
    extensions = [extension(draw) for _ in range(draw(st.integers(0, 3)))]
    return draw(st.sampled_from([
        tlv(0xA0, seq(oid(EXTENSION_REQUEST), set_of(seq(*extensions)))),
        tlv(0xA0, seq(oid(EXTENSION_REQUEST), set_of())),  # no value: not single-valued
        tlv(0xA0, seq(oid(EXTENSION_REQUEST), set_of(seq(*extensions), seq()))),
        tlv(0xA0, seq(oid("1.2.840.113549.1.9.7"), set_of(tlv(0x02, b"")))),
        tlv(0xA0, b""),
        tlv(0xA0, draw(st.binary(max_size=20))),
    ]))


@st.composite
def assembled_csrs(draw: st.DrawFn) -> bytes:
    """A CSR put together field by field. It names the device only with a key the policy
    refuses or cannot read, so none of them can be a request the server should grant."""
    key_name = draw(st.sampled_from(sorted(keys()) + sorted(BAD_SPKI)))
    key = keys().get(key_name, keys()["p256"])
    public = BAD_SPKI.get(key_name) or spki(key)
    names_device = key_name not in ACCEPTED and draw(st.booleans())
    common_name = DEVICE if names_device else "x-" + draw(st.text(max_size=30))
    version = b"\x00" if draw(st.integers(0, 7)) else draw(st.sampled_from([b"\x02", b"\xff", b""]))
    info = seq(tlv(0x02, version), draw(subjects(common_name)), public, draw(attributes()))
    algorithm, signature = sign(key, info)
    if draw(st.integers(0, 4)) == 0:
        algorithm = draw(st.sampled_from([*SIGNATURES.values(), "1.2.3.4"]))
    if draw(st.integers(0, 6)) == 0:
        signature = draw(st.binary(max_size=80))
    return seq(info, seq(oid(algorithm)), tlv(0x03, b"\x00" + signature))


@functools.cache
def valid_csr() -> bytes:
    return csr_der(keys()["p256"], DEVICE)  # type: ignore[arg-type]


@st.composite
def mutated_csrs(draw: st.DrawFn) -> bytes:
    """The valid CSR, changed: a byte flipped, cut short, bytes inserted. Never unchanged."""
    der = bytearray(valid_csr())
    at = draw(st.integers(0, len(der) - 1))
    how = draw(st.sampled_from(["flip", "cut", "insert"]))
    if how == "flip":
        der[at] ^= draw(st.integers(1, 255))
    elif how == "cut":
        del der[at:]
    else:
        der[at:at] = draw(st.binary(min_size=1, max_size=20))
    return bytes(der)


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data)


bodies = st.one_of(
    mutated_csrs().map(b64),
    assembled_csrs().map(b64),
    assembled_csrs().map(b64),
    assembled_csrs(),                                   # DER, not base64
    st.binary(max_size=2000),
    st.binary(max_size=2000).map(b64),
    st.sampled_from([b"", b" ", b"\r\n\r\n", b"====", b"A", b"AA=", b"QQ==\n!", b"\x00" * 64,
                     b"-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n"]),
    st.integers(16385, 40000).map(lambda n: b"A" * n),  # oversized
)
content_types = st.one_of(
    st.just(CSR_TYPE), st.just(CSR_TYPE), st.just(CSR_TYPE),
    st.sampled_from(["Application/PKCS10; charset=utf-8", "text/plain", "", "application/json",
                     "application/x-www-form-urlencoded", "multipart/form-data; boundary=z",
                     "application/pkcs7-mime; smime-type=certs-only"]),
    st.text(alphabet=string.ascii_letters + string.digits + " /;=-_.+\"", max_size=60),
)
operations = st.sampled_from(["simpleenroll", "simplereenroll"])
# With a usable certificate the body reaches the parser: mostly CSRs, mostly the right type.
csr_bodies = st.integers(0, 5).flatmap(
    lambda n: assembled_csrs().map(b64) if n < 4 else mutated_csrs().map(b64) if n < 5 else bodies)
csr_types = st.integers(0, 9).flatmap(lambda n: st.just(CSR_TYPE) if n < 8 else content_types)


# --- the server and its callers ----------------------------------------------------------


@dataclass(frozen=True)
class Callers:
    server: ESTServer
    bootstrap: Identity    # registered device: usable on simpleenroll
    operational: Identity  # its certificate: usable on simplereenroll only

    def audit_rows(self) -> int:
        with self.server.registry() as registry:
            return len(registry.audit_log(limit=1_000_000))


@pytest.fixture(scope="module")
def callers(tmp_path_factory: pytest.TempPathFactory, est_pki: pki.PKIPaths,
            factory_ca: pki.Authority) -> Iterator[Callers]:
    directory = tmp_path_factory.mktemp("est-fuzz")
    with running_est_server(directory / "server", est_pki, certificate_lifetime="1h") as server:
        boot = bootstrap_identity(directory, factory_ca, DEVICE)
        with server.registry() as registry:
            registry.register_device(DEVICE, boot.certificate)
        key = new_key()
        reply = enroll(server, boot, key)
        assert reply.status == 200, reply.text
        operational = save_identity(directory, "operational", DEVICE, reply.certificates()[0],
                                    key)
        yield Callers(server, boot, operational)
        log = server.log.read_text()
    assert "Traceback" not in log, log[max(0, log.index("Traceback") - 500):][:3000]


def refused_unaudited(callers: Callers, operation: str, body: bytes, content_type: str,
                      identity: Identity | None) -> tuple[int, dict[str, str]]:
    """The status and headers of a request that must leave the audit table as it was."""
    before = callers.audit_rows()
    reply = post(callers.server, operation, body, identity, content_type)
    assert callers.audit_rows() == before, (reply.status, reply.text)
    return reply.status, reply.headers


@settings(FUZZ, max_examples=250)
@given(body=bodies, content_type=content_types, operation=operations)
def test_without_a_certificate_401_with_a_challenge_and_no_audit_row(
        callers: Callers, body: bytes, content_type: str, operation: str) -> None:
    status, headers = refused_unaudited(callers, operation, body, content_type, None)
    assert (status, "WWW-Authenticate" in headers) == (401, True)


@settings(FUZZ, max_examples=150)
@given(body=bodies, content_type=content_types, operation=operations)
def test_a_certificate_the_endpoint_does_not_take_403_and_no_audit_row(
        callers: Callers, body: bytes, content_type: str, operation: str) -> None:
    wrong = {"simpleenroll": callers.operational, "simplereenroll": callers.bootstrap}
    status, _ = refused_unaudited(callers, operation, body, content_type, wrong[operation])
    assert status == 403


@settings(FUZZ, max_examples=400)
@given(body=csr_bodies, content_type=csr_types, operation=operations)
def test_with_a_usable_certificate_a_4xx_and_one_audit_row(
        callers: Callers, body: bytes, content_type: str, operation: str) -> None:
    right = {"simpleenroll": callers.bootstrap, "simplereenroll": callers.operational}
    before = callers.audit_rows()
    reply = post(callers.server, operation, body, right[operation], content_type)
    assert 400 <= reply.status < 500, (reply.status, reply.text)
    assert ("WWW-Authenticate" in reply.headers) == (reply.status == 401)
    assert callers.audit_rows() == before + 1


def test_csr_parts_that_once_gave_a_500_are_a_400(callers: Callers) -> None:
    """One hand-made CSR of each kind the fuzzer found answered with a 500: each part is
    parsed only when read, and each raised its own exception past the parser."""
    p256 = keys()["p256"]
    name = seq(set_of(seq(oid(CN), tlv(0x0C, DEVICE.encode()))))
    san = seq(oid(SAN), tlv(0x04, seq(tlv(0x86, f"urn:device:{DEVICE}".encode()))))

    def csr(info_subject: bytes = name, public: bytes | None = None,
            attrs: bytes = tlv(0xA0, b""), version: bytes = b"\x00") -> bytes:
        info = seq(tlv(0x02, version), info_subject, public or spki(p256), attrs)
        algorithm, signature = sign(p256, info)
        return b64(seq(info, seq(oid(algorithm)), tlv(0x03, b"\x00" + signature)))

    cases = {
        "duplicate extension": csr(attrs=tlv(0xA0, seq(oid(EXTENSION_REQUEST),
                                                         set_of(seq(san, san))))),
        "unsupported general name": csr(attrs=tlv(0xA0, seq(oid(EXTENSION_REQUEST), set_of(seq(
            seq(oid(SAN), tlv(0x04, seq(tlv(0xA3, b"\x30\x00"))))))))),
        "unreadable subject": csr(info_subject=seq(set_of(seq(oid(CN), tlv(0x0C, b"\xff\xfe"))))),
        "unknown key algorithm": csr(public=BAD_SPKI["unknown-algorithm"]),
        "unknown curve": csr(public=BAD_SPKI["unknown-curve"]),
        "CSR version 3": csr(version=b"\x02"),
        "extension request without a value": csr(
            attrs=tlv(0xA0, seq(oid(EXTENSION_REQUEST), set_of()))),
    }
    statuses = {what: post(callers.server, "simpleenroll", body, callers.bootstrap).status
                for what, body in cases.items()}
    assert statuses == dict.fromkeys(cases, 400)
