"""The station's side of the factory signing service: a BootstrapIssuer over EST.

``device-provision --service URL`` runs on the device (or on a station that reaches
its TPM): the TPM makes the key and signs the CSR here, and the CSR goes to
``factory-ca serve`` over mutual TLS with the station's certificate. When the line
attests, the service makes the credential the TPM activates for its new AK (the
station's TPM only answers it: :class:`provisioning.factory.CredentialChallenger`),
then checks the answer, the EK chain and the AK's TPM2_Certify of the key itself, signs,
and registers the device in the same transaction, so there is no local registrar.
Core dependencies only (http.client, mostly through :class:`device_agent.est.ESTClient`):
the device install has no aiohttp.

A request that got no answer, a 429 or a 503 is sent again (the same CSR, so the
service answers the same certificate if the first one was issued after all), up to
``attempts`` times, waiting ``Retry-After`` (at most :data:`MAX_WAIT`).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import time
from pathlib import Path

from cryptography import x509

from device_agent.errors import ESTError
from device_agent.est import ESTClient

from .attestation import parse_public
from .factory import FactoryError
from .factory_signing import AK_HEADER, CREDENTIAL_HEADER, EK_CERT_HEADER, EK_PUBLIC_HEADER
from .registry import AttestationKey

LABEL = "factory"
CHALLENGE_PATH = f"/.well-known/est/{LABEL}/credential"
MAX_WAIT = 10.0
# Test hook: "POINT:FILE" makes the client touch FILE and stop at POINT ("sending": the
# CSR is made, not sent; "received": the certificate is in hand, no file written) until
# it is killed, so a test can kill a station at a deterministic step.
PAUSE_ENV = "DEVICE_PROVISION_TEST_PAUSE"


class RemoteRefused(FactoryError):
    """The signing service refused or could not be reached; ``status`` None: no answer."""

    def __init__(self, message: str, status: int | None, reason: str,
                 retry_after: float | None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


def _pause(point: str) -> None:
    wanted, _, marker = os.environ.get(PAUSE_ENV, "").partition(":")
    if wanted != point:
        return
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(60)


def station_context(cert: Path, key: Path, trust: Path) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=str(trust))
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise FactoryError(f"station credentials unusable ({cert}, {key}, {trust}): "
                           f"{exc}") from exc
    return context


class RemoteFactoryCA:
    """The Factory CA behind ``factory-ca serve`` at ``url`` (https://host:port)."""

    def __init__(self, url: str, context: ssl.SSLContext, *, force: bool = False,
                 attempts: int = 3, timeout: float = 30.0) -> None:
        try:
            self.client = ESTClient(url, context, timeout)
        except ValueError as exc:
            raise FactoryError(f"--service: {exc}") from exc
        self.force = force
        self.attempts = max(1, attempts)
        self.context = context
        self._proofs: dict[bytes, dict[str, str]] = {}  # AK public area: its headers

    def challenge(self, ek_certificate: bytes, ek_public: bytes,
                  ak_public: bytes) -> tuple[bytes, bytes]:
        """The service's credential for this AK and EK (CredentialChallenger)."""
        headers = {AK_HEADER: base64.b64encode(ak_public).decode(),
                   EK_CERT_HEADER: base64.b64encode(ek_certificate).decode(),
                   EK_PUBLIC_HEADER: base64.b64encode(ek_public).decode()}
        client = self.client
        connection = http.client.HTTPSConnection(client.host, client.port, context=self.context,
                                                 timeout=client.timeout)
        try:
            connection.request("POST", f"{client.prefix}{CHALLENGE_PATH}", body=b"",
                               headers=headers)
            response = connection.getresponse()
            data = response.read(1 << 16)
        except (OSError, http.client.HTTPException) as exc:
            raise RemoteRefused(f"the signing service is unreachable: {exc}", None, "",
                                None) from exc
        finally:
            connection.close()
        if response.status != 200:
            reason = data[:200].decode("utf-8", "replace").strip()
            raise RemoteRefused(f"the signing service refused the TPM: {response.status} "
                                f"{reason}", response.status, reason, None)
        try:
            answer = json.loads(data)
            blob = base64.b64decode(answer["credential_blob"], validate=True)
            secret = base64.b64decode(answer["encrypted_secret"], validate=True)
        except (ValueError, KeyError, TypeError) as exc:
            raise FactoryError(f"the signing service's credential is unreadable: {exc}") \
                from exc
        self._proofs[ak_public] = headers
        return blob, secret

    def answer(self, ak_public: bytes, secret: bytes) -> None:
        """What the TPM's activation gave back, sent with the CSR for the service to check."""
        self._proofs[ak_public] = {**self._proofs.get(ak_public, {}),
                                   CREDENTIAL_HEADER: base64.b64encode(secret).decode()}

    def issue(self, csr: x509.CertificateSigningRequest, device_id: str,
              attestation: AttestationKey | None,
              ) -> tuple[x509.Certificate, x509.Certificate | None]:
        headers = {}
        if attestation is not None:
            headers = self._proofs.pop(attestation.ak_public, {
                AK_HEADER: base64.b64encode(attestation.ak_public).decode()})
        _pause("sending")
        certificates = self._send(csr, headers)
        _pause("received")
        cert = next((c for c in certificates if c.public_key() == csr.public_key()), None)
        if cert is None:
            raise FactoryError("the signing service answered no certificate for this key")
        ak_cert = None
        if attestation is not None:
            ak_key = parse_public(attestation.ak_public).public_key
            ak_cert = next((c for c in certificates if c.public_key() == ak_key), None)
        return cert, ak_cert

    def _send(self, csr: x509.CertificateSigningRequest,
              headers: dict[str, str]) -> tuple[x509.Certificate, ...]:
        query = "force=1" if self.force else ""
        for attempt in range(1, self.attempts + 1):
            try:
                return self.client.labeled_enroll(LABEL, csr, query, headers).certificates
            except ESTError as exc:
                again = exc.status is None or exc.status in (429, 503)
                if not again or attempt == self.attempts:
                    answer = f"{exc.status} {exc.reason}" if exc.status else str(exc)
                    raise RemoteRefused(f"the signing service refused: {answer}", exc.status,
                                        exc.reason, exc.retry_after) from exc
                time.sleep(min(MAX_WAIT, exc.retry_after or 1.0))
        raise AssertionError("unreachable")


def no_registrar(device_id: str, bootstrap: x509.Certificate,
                 previous: x509.Certificate | None,
                 attestation: AttestationKey | None = None) -> None:
    """The remote mode's registrar: the service registered the device when it signed."""
