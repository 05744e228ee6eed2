"""``factory-ca serve``: the Factory CA behind HTTPS, for the line's stations.

On a real line the TPM sits on the device under test, a station drives it, and the
Factory CA's key stays on the line server. Each station authenticates with its own
certificate from the Station CA (factory_stations.py); the TLS layer trusts that CA
alone, so any other certificate fails the handshake, and the station book, read
again whenever it changes, refuses a revoked or unlisted one with 403 on its next
request. Decisions are factory_signing.py's; this module is HTTP only.

The endpoint is an EST profile: ``POST /.well-known/est/factory/simpleenroll``, the
"factory" label of RFC 7030 3.2.2, with the EST server's wire format (est_wire.py: a
base64 PKCS#10 body in, a base64 certs-only PKCS#7 out, holding the bootstrap
certificate and, when the line attests, the AK's, told apart by their keys since a
certs-only PKCS#7 is an unordered SET). The device ID is the one the CSR names (its CN
and ``urn:device:`` SAN, which the certificate will carry), so there is no second name
to disagree with; ``?force=1`` asks to replace another station's device. Why EST and
not a custom JSON endpoint: the wire code is shared, any EST client (curl and openssl)
can drive the service, and the refusals are the EST server's (a status, a one-line
reason, ``Retry-After`` on 429 and 503); a second wire format for the one request every
device makes would buy nothing. What PKCS#10 has no place for travels in headers when
the line attests: the AK's and the EK's TPMT_PUBLIC, the EK certificate, and the TPM's
answer to the credential challenge (``POST /.well-known/est/factory/credential``, the
one non-EST call: the service makes a credential for the AK that only the TPM holding
that EK can activate, so the service, not the station, knows the AK sits beside an EK
of a maker it trusts; it then verifies the AK's TPM2_Certify of the CSR's key itself).

Refusals: 403 revoked or unlisted station (audited), 429 over the station's token
bucket (logged only: the limit protects the registry, so it does not write to it),
413/415 body, 400 malformed or foreign CSR or refused attestation evidence, 409 the
device is another station's or enrolled (see factory_signing.py for the rule), 503
registry unreachable (logged; the registry cannot hold its audit row).

One process, one event loop, one thread for the Factory CA and the registry: SQLite
takes one writer at a time anyway, and a signature costs well under a millisecond.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from cryptography import x509

from . import pki
from .est_server import TLS12_CIPHERS, _text, peer_certificate
from .est_wire import (
    CERTS_TYPE,
    CSR_TYPE,
    PARSE_ERRORS,
    PREFIX,
    encode_certs,
    media_type,
    read_body,
)
from .factory import LocalFactoryCA
from .factory_config import ServiceConfig
from .factory_signing import (
    AK_HEADER,
    CREDENTIAL_HEADER,
    EK_CERT_HEADER,
    EK_PUBLIC_HEADER,
    Answer,
    EndorsementCheck,
    Request,
    SigningService,
    TokenBucket,
    log_event,
)
from .factory_stations import StationBook, StationPaths
from .registry import open_registry

LABEL = "factory"
ENROLL_PATH = f"{PREFIX}/{LABEL}/simpleenroll"
CHALLENGE_PATH = f"{PREFIX}/{LABEL}/credential"  # not EST: the AK's proof beside the EK
BODY_TIMEOUT = 10.0


def service_context(stations: StationPaths) -> ssl.SSLContext:
    """Our certificate from the Station CA; a client certificate from it required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(stations.service_cert, stations.service_key)
        context.load_verify_locations(cafile=stations.ca)
        context.set_ciphers(TLS12_CIPHERS)
    except (OSError, ssl.SSLError) as exc:
        raise pki.PKIError(f"cannot build the signing service's TLS context: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


class FactoryEndpoints:
    def __init__(self, config: ServiceConfig, book: StationBook, service: SigningService,
                 executor: ThreadPoolExecutor) -> None:
        self.config = config
        self.book = book
        self.service = service
        self.executor = executor
        self.buckets: dict[str, TokenBucket] = {}
        self.cacerts_body = encode_certs([service.signer.authority.certificate])

    def routes(self) -> list[web.RouteDef]:
        return [web.post(ENROLL_PATH, self.enroll),
                web.post(CHALLENGE_PATH, self.challenge),
                web.get(f"{PREFIX}/{LABEL}/cacerts", self.cacerts)]

    async def _run(self, method: str, *args: object) -> Answer:
        call = getattr(self.service, method)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call, *args)

    async def cacerts(self, request: web.Request) -> web.Response:
        return web.Response(body=self.cacerts_body, headers={
            "Content-Type": CERTS_TYPE, "Content-Transfer-Encoding": "base64"})

    async def challenge(self, request: web.Request) -> web.Response:
        station = await self._station(request)
        if isinstance(station, web.Response):
            return station
        answer = await self._run("challenge", self._request(request, *station, b""))
        if answer.status == 200:
            return web.json_response(body=answer.body)
        return _text(answer.status, answer.reason, answer.retry_after)

    @staticmethod
    def _request(request: web.Request, name: str, serial: str, body: bytes) -> Request:
        force = request.query.get("force", "").lower() in ("1", "true", "yes")
        headers = request.headers
        return Request(name, serial, body, force, headers.get(AK_HEADER),
                       headers.get(EK_CERT_HEADER), headers.get(EK_PUBLIC_HEADER),
                       headers.get(CREDENTIAL_HEADER))

    async def enroll(self, request: web.Request) -> web.Response:
        station = await self._station(request)
        if isinstance(station, web.Response):
            return station
        name, serial = station
        limit = self.config.max_body_bytes
        base = Request(name, serial, b"")
        if media_type(request.content_type) != CSR_TYPE:
            answer = await self._run("refuse", base, 415, f"content type must be {CSR_TYPE}")
            return _text(answer.status, answer.reason)
        body = await read_body(request, limit, BODY_TIMEOUT)
        if isinstance(body, tuple):
            answer = await self._run("refuse", base, *body)
            return _text(answer.status, answer.reason)
        answer = await self._run("handle", self._request(request, name, serial, body))
        if answer.certificates:
            return web.Response(body=encode_certs(list(answer.certificates)), headers={
                "Content-Type": CERTS_TYPE, "Content-Transfer-Encoding": "base64"})
        return _text(answer.status, answer.reason, answer.retry_after)

    async def _station(self, request: web.Request) -> tuple[str, str] | web.Response:
        """The station's name and certificate serial, or the refusal to answer."""
        der = peer_certificate(request)
        if der is None:  # CERT_REQUIRED: only a TLS layer misconfigured gets here
            return _text(401, "no client certificate")
        try:
            certificate = x509.load_der_x509_certificate(der)
        except PARSE_ERRORS:
            return _text(403, "the client certificate cannot be read")
        serial = f"{certificate.serial_number:x}"
        names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = str(names[0].value) if names else "?"
        # the bucket first, by the name the Station CA certified: a revoked station that
        # keeps asking is refused within its rate too, and does not fill the audit table
        bucket = self.buckets.setdefault(
            name, TokenBucket(self.config.rate, self.config.burst, time.monotonic()))
        wait = bucket.take(time.monotonic())
        if wait is not None:
            log_event("rate-limited", logging.WARNING, station=name, retry_after=wait)
            return _text(429, f"station {name} over its rate limit", wait)
        try:
            station, why = self.book.lookup(certificate)
        except (OSError, pki.PKIError) as exc:
            log_event("station-book-unreadable", logging.ERROR, error=str(exc))
            return _text(503, "station book unreadable", self.config.unavailable_retry_after)
        if station is None:
            answer = await self._run("refuse", Request(name, serial, b""), 403, why)
            return _text(answer.status, answer.reason)
        return station.name, serial


async def serve(config: ServiceConfig) -> None:
    stations = StationPaths(config.stations)
    signer = LocalFactoryCA(pki.PKIPaths(config.pki_directory), config.passphrase())
    with open_registry(config.registry):
        pass  # created or migrated now, so a bad path fails the start, not the first device
    service = SigningService(signer, config.registry, config.require_attestation,
                             config.unavailable_retry_after,
                             EndorsementCheck(config.manufacturer_roots,
                                              config.manufacturer_intermediates))
    executor = ThreadPoolExecutor(1, thread_name_prefix="factory-ca")
    endpoints = FactoryEndpoints(config, StationBook(stations.book), service, executor)
    app = web.Application(client_max_size=config.max_body_bytes + 1)
    app.add_routes(endpoints.routes())
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    try:
        site = web.TCPSite(runner, config.host, config.port,
                           ssl_context=service_context(stations))
        await site.start()
        log_event("ready", host=config.host, port=config.port, pid=os.getpid())
        await stopping.wait()
    finally:
        await runner.cleanup()
        executor.shutdown(wait=True)
        signer.close()  # a PKCS#11 session back to its token
    log_event("stopped")
