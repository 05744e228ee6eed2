"""EST client (RFC 7030 with the RFC 8951 clarifications): the protocol and nothing else.

When to enroll, renew or recover is lifecycle.py's business; this module only
speaks the wire format over a mutual-TLS connection whose client key may live
in the TPM, and turns every failure into an :class:`ESTError` carrying the
HTTP status, the server's reason and its ``Retry-After``.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import http.client
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from .errors import ESTError, ESTPendingError
from .tls import handshake_lock

WELL_KNOWN = "/.well-known/est"
RECOVERY = "/.well-known/est/recovery"
MAX_RESPONSE = 1 << 20


@dataclass(frozen=True)
class ESTReply:
    """What a successful call returned, with the server's clock for sanity checks."""

    certificates: tuple[x509.Certificate, ...]
    server_date: datetime | None


class ESTClient:
    """One EST server at ``base_url`` reached with ``context`` (a client mTLS context)."""

    def __init__(self, base_url: str, context: ssl.SSLContext, timeout: float = 30.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"EST URL must be https://host[:port], got {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.prefix = parts.path.rstrip("/")
        self.context = context
        self.timeout = timeout

    def cacerts(self) -> ESTReply:
        return self._call("GET", f"{WELL_KNOWN}/cacerts")

    def simpleenroll(self, csr: x509.CertificateSigningRequest) -> ESTReply:
        return self._call("POST", f"{WELL_KNOWN}/simpleenroll", csr)

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> ESTReply:
        return self._call("POST", f"{WELL_KNOWN}/simplereenroll", csr)

    def server_time(self) -> datetime | None:
        """The server's clock (its ``Date`` header), read with a cacerts request; None: no Date."""
        return self.cacerts().server_date

    def recovery_reenroll(self, csr: x509.CertificateSigningRequest) -> ESTReply:
        """Re-enroll with an expired operational certificate on the recovery listener."""
        return self._call("POST", f"{RECOVERY}/simplereenroll", csr)

    def labeled_enroll(self, label: str, csr: x509.CertificateSigningRequest, query: str = "",
                       headers: Mapping[str, str] | None = None) -> ESTReply:
        """simpleenroll under an RFC 7030 (3.2.2) label, ``/.well-known/est/LABEL/simpleenroll``,
        with ``query`` (already encoded) and extra ``headers`` (the factory signing service)."""
        path = f"{WELL_KNOWN}/{label}/simpleenroll" + (f"?{query}" if query else "")
        return self._call("POST", path, csr, headers)

    def _call(self, method: str, path: str,
              csr: x509.CertificateSigningRequest | None = None,
              extra_headers: Mapping[str, str] | None = None) -> ESTReply:
        headers = {"Accept": "application/pkcs7-mime", **(extra_headers or {})}
        body = None
        if csr is not None:
            body = base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))
            headers |= {"Content-Type": "application/pkcs10",
                        "Content-Transfer-Encoding": "base64"}
        connection = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                 timeout=self.timeout)
        try:
            with handshake_lock:
                connection.connect()
            # http.client writes the head and the body in two sends: without NODELAY the
            # body waits for the server's delayed ACK of the head (40 ms on Linux).
            connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection.request(method, self.prefix + path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read(MAX_RESPONSE + 1)
        except ssl.SSLError as exc:
            raise ESTError(f"TLS with EST server {self.host}:{self.port} failed: "
                           f"{exc.reason or exc}", reason=str(exc.reason or "")) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ESTError(f"EST server {self.host}:{self.port} unreachable: {exc}") from exc
        finally:
            connection.close()
        server_date = _http_date(response.getheader("Date"))
        retry_after = _retry_after(response.getheader("Retry-After"))
        if response.status == 202:
            raise ESTPendingError(f"EST server holds the request; retry in {retry_after}s",
                                  202, "pending", retry_after)
        if response.status != 200:
            reason = data[:200].decode("utf-8", "replace").strip()
            raise ESTError(f"EST {path} refused: {response.status} {reason}",
                           response.status, reason, retry_after)
        if len(data) > MAX_RESPONSE:
            raise ESTError(f"EST {path}: response larger than {MAX_RESPONSE} bytes", 200)
        return ESTReply(_certificates(data, path), server_date)


def _certificates(data: bytes, path: str) -> tuple[x509.Certificate, ...]:
    """Certificates from a base64 ``application/pkcs7-mime; smime-type=certs-only`` body."""
    try:
        der = base64.b64decode(b"".join(data.split()), validate=True)
        certs = pkcs7.load_der_pkcs7_certificates(der)
    except (binascii.Error, ValueError) as exc:
        raise ESTError(f"EST {path}: response is not base64 PKCS#7 certs-only: {exc}", 200) from exc
    if not certs:
        raise ESTError(f"EST {path}: response holds no certificate", 200)
    return tuple(certs)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    when = _http_date(value)
    if when is None:
        return None
    return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())


def _http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
