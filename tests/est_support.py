"""Helpers for the EST tests: the server as a real process, device identities, a raw client."""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7

from device_agent._files import write_private
from provisioning import pki
from provisioning.registry import Registry, open_registry
from simulator.processes import free_port

EST_SERVER = str(Path(sys.executable).parent / "est-server")
WELL_KNOWN = "/.well-known/est"
# How a client sees the server's TLS layer refuse its certificate. Under TLS 1.3 the client's
# handshake is over before the server judges the certificate, and the server's event loop
# drops the connection: depending on timing the client's request write hits EOF, or its read
# finds the connection closed. (Lower case, as matched against the error text.)
TLS_REFUSED = ("closed connection without response", "eof occurred in violation of protocol")


@dataclass(frozen=True)
class ESTServer:
    """A running est-server: where it listens, its PKI and registry, and its log."""

    port: int
    pki: pki.PKIPaths
    registry_path: Path
    log: Path
    process: subprocess.Popen[bytes]
    recovery_port: int | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{WELL_KNOWN}"

    @property
    def base_url(self) -> str:
        """The agent's ``[est] url``: scheme, host and port; it adds the well-known path."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def recovery_url(self) -> str:
        """The agent's ``[est] recovery_url``; it adds /.well-known/est/recovery/simplereenroll."""
        if self.recovery_port is None:
            raise ValueError("started without recovery=True: no recovery listener")
        return f"https://127.0.0.1:{self.recovery_port}"

    @contextmanager
    def registry(self) -> Iterator[Registry]:
        with open_registry(self.registry_path) as registry:
            yield registry


def write_config(directory: Path, paths: pki.PKIPaths, port: int,
                 recovery_port: int | None = None, **policy: object) -> Path:
    """est.toml for a test server; ``policy`` becomes the [policy] table as given."""
    recovery = [f"recovery_port = {recovery_port}"] if recovery_port is not None else []
    lines = ["[server]", f"port = {port}", *recovery, "workers = 2", "max_in_flight = 256",
             "shutdown_timeout = 5", "[pki]", f'directory = "{paths.base}"',
             f'registry = "{directory / "registry.sqlite3"}"', "[policy]"]
    for key, value in policy.items():
        lines.append(f"{key} = {value!r}".replace("'", '"').replace("True", "true")
                     .replace("False", "false"))
    config = directory / "est.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


@contextmanager
def running_est_server(directory: Path, paths: pki.PKIPaths, *, recovery: bool = False,
                       **policy: object) -> Iterator[ESTServer]:
    """Start est-server on a free port, wait for its "ready" line, then SIGTERM, then kill.

    ``recovery=True`` also opens the recovery listener on a second free port
    (``ESTServer.recovery_port``, ``recovery_url``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    recovery_port = free_port() if recovery else None
    config = write_config(directory, paths, port, recovery_port, **policy)
    log = directory / "est-server.log"
    with open(log, "ab") as out:
        process = subprocess.Popen([EST_SERVER, "--config", str(config)], stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
    server = ESTServer(port, paths, directory / "registry.sqlite3", log, process, recovery_port)
    try:
        deadline = time.monotonic() + 30
        while b'"event":"ready"' not in log.read_bytes():
            if process.poll() is not None:
                raise RuntimeError(f"est-server exited with {process.returncode}:\n"
                                   f"{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"est-server not ready after 30s:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM the supervisor, kill its whole group if it lingers; always reaped."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    try:
        os.killpg(process.pid, signal.SIGKILL)  # workers, should any outlive their parent
    except ProcessLookupError:
        pass
    return process.returncode


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
