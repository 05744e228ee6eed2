"""Helpers for the EST tests: the server as a real process (from simulator.est), device
identities, a raw client."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7

from device_agent._files import write_private
from provisioning import pki

# The est-server process helpers live in the simulator, which runs the same server.
from simulator.est import (  # noqa: F401 - re-exported for the tests
    EST_SERVER,
    WELL_KNOWN,
    ESTServer,
    running_est_server,
    stop,
    write_config,
)

# How a client sees the server's TLS layer refuse its certificate, by exception type, not by
# message: the text varies with the client's OpenSSL (3.0: "EOF occurred in violation of
# protocol"; 3.5: "connection reset by peer"). Under TLS 1.3 the client's handshake is over
# before the server judges the certificate, and the server drops the connection: the
# client's write or read then fails with an alert, an EOF or a reset. A refused TCP
# connection (server down) is none of these.
TLS_REFUSED = (ssl.SSLError, ConnectionResetError, BrokenPipeError)


# --- device-side identities (software keys: the TPM client is tested elsewhere) ----------


@dataclass(frozen=True)
class Identity:
    device_id: str
    cert: Path
    key: Path
    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def save_identity(directory: Path, name: str, device_id: str, certificate: x509.Certificate,
                  key: CertificateIssuerPrivateKeyTypes) -> Identity:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = write_private(directory / f"{name}.pem", pki.cert_pem(certificate), 0o644)
    key_path = write_private(directory / f"{name}.key", pki.key_pem(key))
    return Identity(device_id, cert_path, key_path, certificate, key)


def bootstrap_identity(directory: Path, factory: pki.Authority, device_id: str) -> Identity:
    key = new_key()
    cert = factory.issue_client(device_id, key.public_key(), dt.timedelta(days=365))
    return save_identity(directory, f"{device_id}-bootstrap", device_id, cert, key)


def csr_der(key: CertificateIssuerPrivateKeyTypes, common_name: str,
            uri: str | None = "default") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, common_name)]))
    uri = f"urn:device:{common_name}" if uri == "default" else uri
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
    digest = hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) \
        else None
    return builder.sign(key, digest).public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace").strip()

    def certificates(self) -> list[x509.Certificate]:
        return pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(self.body.split())))


def client_context(server: ESTServer, identity: Identity | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=server.pki.server_trust)
    if identity is not None:
        context.load_cert_chain(identity.cert, identity.key)
    return context


def post(server: ESTServer, operation: str, body: bytes, identity: Identity | None,
         content_type: str = "application/pkcs10", timeout: float = 60.0,
         port: int | None = None) -> Reply:
    """One request over a new mTLS connection, as a device makes it (to ``port`` if given)."""
    connection = http.client.HTTPSConnection("127.0.0.1", port or server.port, timeout=timeout,
                                             context=client_context(server, identity))
    try:
        connection.request("POST", f"{WELL_KNOWN}/{operation}", body=body,
                           headers={"Content-Type": content_type})
        response = connection.getresponse()
        return Reply(response.status, dict(response.getheaders()), response.read())
    finally:
        connection.close()


def enroll(server: ESTServer, identity: Identity, key: CertificateIssuerPrivateKeyTypes,
           operation: str = "simpleenroll") -> Reply:
    return post(server, operation, base64.encodebytes(csr_der(key, identity.device_id)),
                identity)


def recover(server: ESTServer, identity: Identity, key: CertificateIssuerPrivateKeyTypes,
            common_name: str | None = None) -> Reply:
    """POST a CSR for ``key`` to the recovery listener, authenticated as ``identity``."""
    assert server.recovery_port is not None, "start the server with recovery=True"
    body = base64.encodebytes(csr_der(key, common_name or identity.device_id))
    return post(server, "recovery/simplereenroll", body, identity, port=server.recovery_port)
