"""Getting a certificate for a fresh TPM key: first enrollment, renewal, recovery.

Each path makes a new key inside the TPM, has the TPM sign the CSR, and asks
the EST server over mutual TLS with the credential that path is entitled to
use (bootstrap, current, or expired-current on the recovery listener). The
issued certificate is checked against what we asked for before it is staged
as a new credential generation. Retries use tenacity with full jitter and
never wait less than the server's ``Retry-After``.

With ``[paths] attestation_key`` (the factory's AK) and a TPM keystore, every
CSR also carries the AK's TPM2_Certify of the new key, bound to that key, in
the id-aa-attestation attribute (:mod:`device_agent.csr_attestation`), so the
EST server can verify that the key lives in this TPM.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import tenacity
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import AgentConfig
from .credentials import CertificateFacts, CredentialStore, Generation
from .errors import ESTError
from .est import ESTClient, ESTReply
from .identity import device_uri
from .keystore import Key, KeyStore
from .lifecycle import full_jitter
from .tls import NO_CHECK_TIME, client_context, releasing
from .tpm import TPM, KeyBlob, build_csr

log = logging.getLogger(__name__)

EnrollCall = Callable[[ESTClient, x509.CertificateSigningRequest], ESTReply]


class Enroller:
    def __init__(self, config: AgentConfig, tpm: KeyStore, store: CredentialStore,
                 stop: threading.Event, backoff_base: float = 2.0) -> None:
        self.config = config
        self.tpm = tpm
        self.store = store
        self.stop = stop
        self.backoff_base = backoff_base
        self.check_time = True  # cleared by the agent while its clock is not to be trusted
        self.last_server_date: datetime | None = None

    @contextmanager
    def _client(self, url: str, cert: Path | None, key: Path | None) -> Iterator[ESTClient]:
        """An EST client whose TLS context is freed under the handshake lock."""
        context = client_context(certfile=cert, keyfile=key, cafile=self.config.paths.server_trust,
                                 tcti=self.config.device.tcti, check_time=self.check_time)
        client = ESTClient(url, context, self.config.est.timeout)
        try:
            yield client
        finally:
            with releasing():
                client.context = None  # type: ignore[assignment]
                del context

    def enroll(self, attempts: int | None = None) -> Generation:
        """First boot: authenticate with the factory bootstrap credential."""
        paths = self.config.paths
        with self._client(self.config.est.url, paths.bootstrap_cert, paths.bootstrap_key) as est:
            return self._obtain(est, ESTClient.simpleenroll, "simpleenroll", attempts)

    def renew(self, current: Generation, attempts: int | None = None) -> Generation:
        """Before expiry: authenticate with the current operational credential."""
        with self._client(self.config.est.url, current.cert_path, current.key_path) as est:
            return self._obtain(est, ESTClient.simplereenroll, "simplereenroll", attempts,
                                current.certificate())

    def recover(self, expired: Generation, attempts: int | None = None) -> Generation:
        """After expiry: the expired operational credential, on the recovery listener."""
        url = self.config.est.recovery_url
        if url is None:
            raise ESTError("no [est] recovery_url configured", 403, "no recovery listener")
        with self._client(url, expired.cert_path, expired.key_path) as est:
            return self._obtain(est, ESTClient.recovery_reenroll, "recovery", attempts,
                                expired.certificate())

    def server_time(self) -> datetime | None:
        """The EST server's clock, fetched without trusting our own for the TLS dates."""
        with self._client(self.config.est.url, None, None) as est:
            est.context.verify_flags |= NO_CHECK_TIME  # type: ignore[assignment]
            return est.server_time()

    def _obtain(self, client: ESTClient, call: EnrollCall, name: str,
                attempts: int | None, renewing: x509.Certificate | None = None) -> Generation:
        blob = self.tpm.create_key()
        csr = self._csr(blob, renewing)
        reply = self._retrying(lambda: call(client, csr), name, attempts)
        self.last_server_date = reply.server_date
        certificate = check_issued(reply.certificates[0], self.config.device.id,
                                   blob.public_key())
        pem = _pem(reply.certificates)
        generation = self.store.stage(blob, pem, CertificateFacts.of(pem))
        log.info("%s: certificate %x valid until %s staged as generation %d", name,
                 certificate.serial_number, certificate.not_valid_after_utc, generation.number)
        return generation

    def _csr(self, blob: Key, renewing: x509.Certificate | None) -> x509.CertificateSigningRequest:
        """The request for ``blob``, with the AK's TPM2_Certify of it when the device has one."""
        ak_path = self.config.paths.attestation_key
        if ak_path is None or not isinstance(self.tpm, TPM):
            with self.tpm.loaded(blob) as key:
                return build_csr(key, self.config.device.id, renewing)
        from .attest import AttestationKeyBlob, attested_csr

        assert isinstance(blob, KeyBlob)
        return attested_csr(self.tpm, AttestationKeyBlob.read(ak_path), blob,
                            self.config.device.id, renewing)

    def _retrying(self, call: Callable[[], ESTReply], name: str,
                  attempts: int | None) -> ESTReply:
        def wait(state: tenacity.RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            hint = error.retry_after if isinstance(error, ESTError) else None
            delay = max(full_jitter(state.attempt_number, self.backoff_base,
                                    self.config.renewal.retry_max), hint or 0.0)
            log.warning("%s failed (%s); retrying in %.1fs", name, error, delay)
            return delay

        def sleep(seconds: float) -> None:
            self.stop.wait(seconds)  # a stopping agent does not sit out a backoff

        stop = tenacity.stop_any(
            tenacity.stop_after_attempt(attempts) if attempts else tenacity.stop_never,
            tenacity.stop_when_event_set(self.stop),
        )
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, ESTError) and e.retryable),
            wait=wait, stop=stop, sleep=sleep, reraise=True,
        )
        return retrying(call)

def check_issued(certificate: x509.Certificate, device_id: str,
                 public_key: object) -> x509.Certificate:
    """Before staging: our name, our URI SAN, client authentication, the key just made."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != device_id:
        raise ESTError(f"EST server issued a certificate for {certificate.subject}, "
                       f"not {device_id}", 200)
    try:
        sans = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        sans = []
    if sans != [device_uri(device_id)]:
        raise ESTError(f"EST server issued a certificate with subjectAltName {sans}, "
                       f"not {device_uri(device_id)}", 200)
    try:
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise ESTError("EST server issued a certificate without clientAuth", 200)
    if certificate.public_key() != public_key:
        raise ESTError("EST server issued a certificate for another key", 200)
    return certificate


def _pem(certificates: tuple[x509.Certificate, ...]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certificates)
