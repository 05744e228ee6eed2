"""``est-server``: the EST endpoints (RFC 7030) over HTTPS with client certificates.

Process model: ``est-server --config FILE`` is a supervisor (see _supervisor.py)
that starts ``workers`` processes; each binds the same address with
SO_REUSEPORT, so the kernel spreads connections over them and every core does
TLS. A worker runs aiohttp on one event loop (uvloop's: its TLS layer is C) and
hands enrollments to one thread that owns its registry connection (est_service.py):
those that arrive while it is busy go to it together, one transaction and one commit
for the lot (group commit).

A listener is a TLS context plus routes: ``est`` on ``port`` serves RFC 7030;
``recovery`` on ``recovery_port`` (when configured) serves only
``/.well-known/est/recovery/simplereenroll``. Its TLS layer trusts the Device
CA chain alone and ignores certificate dates, so an expired operational
certificate gets through to the policy, which decides (enrollment.py); a
bootstrap certificate does not even complete the handshake there.

Authenticate first, then parse: a request without a client certificate (401,
``WWW-Authenticate``), or with one this endpoint never takes (403: the wrong
CA, no device ID), is answered here without reading its body or touching the
registry, and counted in the worker's refusal log (_est_guard.py) instead of
the audit table. Only a request a device can be held to reaches the service
thread, whose every decision is an audit row.

With ``[metrics]`` configured, each worker counts requests, latencies, decisions,
issuances and refusals, and the supervisor serves their sum (_est_metrics.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web
from cryptography import x509

from device_agent.errors import IdentityError

from . import est_config, pki
from ._est_guard import ConnectionLimits, GuardedListener, RefusalLog, fit_descriptor_limit
from ._est_metrics import WorkerMetrics, middleware
from .crl_publisher import CRLPublisher
from .enrollment import Issuer, Operation, Peer
from .est_config import ServerConfig
from .est_service import Call, EnrollmentService, Result
from .est_wire import (
    CERTS_TYPE,
    CSR_TYPE,
    CSRATTRS_TYPE,
    PARSE_ERRORS,
    PREFIX,
    encode_certs,
    encode_csrattrs,
    read_body,
)
from .est_wire import media_type as _media_type
from .registry import open_registry, serial_hex
from .revocation import Revocations

X509_V_FLAG_NO_CHECK_TIME = 0x200000
# TLS 1.2 suites: forward secret and AEAD only (TLS 1.3 suites are all AEAD). Key exchange
# groups stay OpenSSL's defaults (X25519, P-256, X448, P-521, P-384): Python 3.11 can only
# narrow them to a single curve.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
# RFC 9110 wants a challenge on every 401, and no scheme is registered for TLS client
# certificates: this one names what to present; clients skip schemes they do not know.
CHALLENGE = 'TLS-Client-Certificate realm="est"'
# The certificate each endpoint takes, judged without the registry (the TLS layer has
# verified the chain): anything else is refused before the request is read.
TAKES = {
    Operation.ENROLL: (Issuer.FACTORY,
                       "simpleenroll takes a bootstrap certificate from the Factory CA"),
    Operation.REENROLL: (Issuer.DEVICE,
                         "simplereenroll takes an operational certificate from the Device CA"),
    Operation.RECOVER: (Issuer.DEVICE,
                        "the recovery listener takes an operational certificate from the "
                        "Device CA"),
}
# Calls one registry transaction takes at most (group commit): a bound on how long a
# batch holds the write lock, and so on any caller's wait behind it.
MAX_BATCH = 32
log = logging.getLogger("est")


def log_event(event: str, level: int = logging.INFO, **fields: object) -> None:
    """One JSON object per line, so logs can be filtered by field rather than by regex."""
    record = {"ts": round(time.time(), 3), "event": event, "pid": os.getpid(), **fields}
    log.log(level, json.dumps(record, default=str, separators=(",", ":")))


def _tls_context(paths: pki.PKIPaths, trust: Sequence[Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(paths.server_cert("est"), paths.server_key("est"))
        for cafile in trust:
            context.load_verify_locations(cafile=cafile)
        context.set_ciphers(TLS12_CIPHERS)
    except (OSError, ssl.SSLError) as exc:
        raise pki.PKIError(f"cannot build the EST server's TLS context: {exc}") from exc
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


def server_context(paths: pki.PKIPaths) -> ssl.SSLContext:
    """TLS for the EST server: our Ed25519 certificate, client certificates optional.

    Clients may present a bootstrap certificate (Factory CA) or an operational
    one (Device CA chain); which one an endpoint wants is the policy's business.
    A certificate from any other CA fails the handshake.
    """
    context = _tls_context(paths, (paths.factory_ca / "ca.pem", paths.device_ca / "chain.pem"))
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def recovery_context(paths: pki.PKIPaths) -> ssl.SSLContext:
    """TLS for the recovery listener: a Device CA certificate is required, its dates are not.

    Only the Device CA chain is trusted, so a bootstrap certificate fails the
    handshake; NO_CHECK_TIME lets an expired one through to the policy, which
    bounds how expired it may be. The signature and chain are still verified.
    """
    context = _tls_context(paths, (paths.device_ca / "chain.pem",))
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= X509_V_FLAG_NO_CHECK_TIME
    return context


def peer_certificate(request: web.Request) -> bytes | None:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    return ssl_object.getpeercert(binary_form=True) if ssl_object else None


def _text(status: int, reason: str, retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after else {}
    if status == 401:
        headers["WWW-Authenticate"] = CHALLENGE
    return web.Response(status=status, text=reason + "\n", headers=headers)


@dataclass(frozen=True)
class Authorities:
    """The CA certificates a client certificate is sorted by (bootstrap or operational)."""

    factory: x509.Certificate
    device: x509.Certificate


def authenticate(der: bytes | None, operation: Operation,
                 authorities: Authorities) -> Peer | tuple[str, int, str]:
    """Whether this endpoint can use the TLS client certificate, without the registry.

    The peer, read once for the policy too, when it can; otherwise the refusal's kind,
    status and reason: 401 when there is no certificate, 403 when the one presented is
    not for this endpoint.
    """
    if der is None:
        return "no-certificate", 401, "no client certificate"
    issuer, wanted = TAKES[operation]
    try:
        peer = Peer.from_certificate(x509.load_der_x509_certificate(der), authorities.factory,
                                     authorities.device)
    except PARSE_ERRORS:
        return "unusable-certificate", 403, "the client certificate cannot be read"
    if peer.issuer is not issuer:
        return "unusable-certificate", 403, wanted
    if peer.device_id is None:
        return "unusable-certificate", 403, "the client certificate names no valid device ID"
    return peer


class Endpoints:
    """The HTTP side of one worker: authentication, load shedding, shape checks, then the
    service thread."""

    def __init__(self, config: ServerConfig, run: Callable[[Call], Awaitable[Result]],
                 ca_chain: bytes, authorities: Authorities, refusals: RefusalLog,
                 metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.run = run
        self.ca_chain = ca_chain
        self.authorities = authorities
        self.refusals = refusals
        self.csrattrs = encode_csrattrs()
        self.in_flight = 0
        self.busy_peers: set[bytes] = set()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{PREFIX}/cacerts", self.cacerts),
            web.get(f"{PREFIX}/csrattrs", self.get_csrattrs),
            web.post(f"{PREFIX}/simpleenroll", self.simpleenroll),
            web.post(f"{PREFIX}/simplereenroll", self.simplereenroll),
        ]

    def recovery_routes(self) -> list[web.RouteDef]:
        return [web.post(f"{PREFIX}/recovery/simplereenroll", self.recover)]

    async def cacerts(self, request: web.Request) -> web.Response:
        return web.Response(body=self.ca_chain, headers={
            "Content-Type": CERTS_TYPE, "Content-Transfer-Encoding": "base64"})

    async def get_csrattrs(self, request: web.Request) -> web.Response:
        return web.Response(body=self.csrattrs, headers={
            "Content-Type": CSRATTRS_TYPE, "Content-Transfer-Encoding": "base64"})

    async def simpleenroll(self, request: web.Request) -> web.Response:
        return await self.enroll(request, Operation.ENROLL)

    async def simplereenroll(self, request: web.Request) -> web.Response:
        return await self.enroll(request, Operation.REENROLL)

    async def recover(self, request: web.Request) -> web.Response:
        return await self.enroll(request, Operation.RECOVER)

    async def enroll(self, request: web.Request, operation: Operation) -> web.Response:
        started = time.monotonic()
        peer = peer_certificate(request)
        checked = authenticate(peer, operation, self.authorities)
        if not isinstance(checked, Peer):
            kind, status, reason = checked
            self.refusals.note(kind, status=status, op=operation.value, peer=request.remote,
                               reason=reason)
            return _text(status, reason)
        if self.in_flight >= self.config.max_in_flight:
            self.refusals.note("shed", status=503, op=operation.value, peer=request.remote,
                               in_flight=self.in_flight)
            return _text(503, "server busy", self.config.busy_retry_after)
        if peer is not None and peer in self.busy_peers:
            return _text(429, "a request with this certificate is already in progress",
                         self.config.busy_retry_after)
        self.in_flight += 1
        if peer is not None:
            self.busy_peers.add(peer)
        try:
            result = await self._enroll(request, operation, checked)
        finally:
            self.in_flight -= 1
            self.busy_peers.discard(peer)  # type: ignore[arg-type]
        decision = result.decision
        if self.metrics is not None:
            self._count(operation, result)
        log_event("enroll", op=operation.value, status=decision.status,
                  decision=decision.outcome.value, device=decision.device_id,
                  reason=decision.reason, peer_serial=result.peer_serial,
                  issued_serial=(serial_hex(result.certificate.serial_number)
                                 if result.certificate else None),
                  ms=round((time.monotonic() - started) * 1000, 2))
        if result.certificate is not None:
            return web.Response(body=encode_certs([result.certificate]), headers={
                "Content-Type": CERTS_TYPE, "Content-Transfer-Encoding": "base64"})
        return _text(decision.status, decision.reason, decision.retry_after)

    def _count(self, operation: Operation, result: Result) -> None:
        """A decision (an audit row) in the metrics: its outcome, and what it issued or why
        it refused (by status: the reasons are free text)."""
        assert self.metrics is not None
        decision = result.decision
        self.metrics.count("est_decisions_total", operation=operation.value,
                           outcome=decision.outcome.value)
        if result.certificate is not None and decision.issuance is not None:
            self.metrics.count("est_issuances_total", kind=decision.issuance.value)
        elif decision.outcome.value == "refused":
            self.metrics.refusals[f"policy-{decision.status}"] += 1

    async def _enroll(self, request: web.Request, operation: Operation, peer: Peer) -> Result:
        limit = self.config.max_body_bytes
        body: bytes | tuple[int, str]
        if _media_type(request.content_type) != CSR_TYPE:
            body = (415, f"content type must be {CSR_TYPE}")
        elif request.content_length is not None and request.content_length > limit:
            body = (413, f"request body larger than {limit} bytes")
        else:
            body = await self._body(request, limit)
        if isinstance(body, tuple):
            return await self.run(Call(operation, peer, refusal=body))
        return await self.run(Call(operation, peer, body))

    async def _body(self, request: web.Request, limit: int) -> bytes | tuple[int, str]:
        """The body, or the refusal: larger than ``limit``, or slower than body_timeout."""
        return await read_body(request, limit, self.config.body_timeout)


@dataclass(frozen=True)
class Listener:
    name: str
    host: str
    port: int
    context: ssl.SSLContext
    routes: Sequence[web.RouteDef]


class Worker:
    """One process: the service thread, the listeners, and an orderly stop."""

    def __init__(self, config: ServerConfig, metrics_path: Path | None = None) -> None:
        """``metrics_path``: where this worker's metrics snapshot goes (_est_metrics.py);
        None: no metrics."""
        self.config = config
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="registry")
        self.waiting: deque[tuple[Call, asyncio.Future[Result]]] = deque()
        self.batch: asyncio.Future[list[Result | Exception]] | None = None
        self.stack = contextlib.ExitStack()
        self.service: EnrollmentService | None = None
        self.publisher: CRLPublisher | None = None
        self.stopping = asyncio.Event()
        self.refusals = RefusalLog(lambda event, **fields: log_event(event, logging.WARNING,
                                                                     **fields),
                                   config.refusal_log_interval)
        self.metrics = (WorkerMetrics(metrics_path, self.refusals.totals)
                        if metrics_path is not None else None)

    def _open(self) -> None:
        paths = self.config.pki
        # A Device CA key in a PKCS#11 token is opened here, in the worker process (sessions
        # are not fork-safe), kept for the worker's life and closed last on shutdown.
        device_ca = self.stack.enter_context(
            pki.open_authority(paths.device_ca, self.config.passphrase()))
        factory_ca = pki.load_certs(paths.factory_ca / "ca.pem")[0]
        registry = self.stack.enter_context(
            open_registry(self.config.registry, synchronous=self.config.registry_sync))
        revocations = Revocations(paths, device_ca, self.config.registry, self.config.crl)
        self.publisher = CRLPublisher(
            lambda: open_registry(self.config.registry, synchronous=self.config.registry_sync),
            revocations.publish,
            lambda text: log_event("crl-not-published", logging.ERROR, reason=text))
        self.stack.callback(self.publisher.close)
        self.service = EnrollmentService(device_ca, factory_ca, registry, self.config.policy,
                                         self.config.certificate_lifetime,
                                         superseded=self.publisher.request)

    async def run(self, call: Call) -> Result:
        """``call``'s answer from the registry thread, once the commit that holds it is done.

        Calls queue here while a batch is on that thread. A batch takes the calls queued
        when it starts, and, once it holds the registry's write lock, those that came
        while it waited for the lock (:meth:`EnrollmentService.handle_all`): in arrival
        order, :data:`MAX_BATCH` at most, with no waiting for company.
        """
        answer = asyncio.get_running_loop().create_future()
        self.waiting.append((call, answer))
        if self.batch is None:
            self._next_batch()
        return await answer

    def _take(self, taken: list[tuple[Call, asyncio.Future[Result]]]) -> list[Call]:
        """Queued calls moved to ``taken`` up to :data:`MAX_BATCH`, skipping those whose
        handler is gone (nothing to decide or audit); returns the calls it moved. Also
        called on the registry thread: the loop appends meanwhile but takes nothing while
        a batch is out."""
        start = len(taken)
        while self.waiting and len(taken) < MAX_BATCH:
            call, answer = self.waiting.popleft()
            if not answer.cancelled():
                taken.append((call, answer))
        return [call for call, _ in taken[start:]]

    def _next_batch(self) -> None:
        assert self.service is not None
        taken: list[tuple[Call, asyncio.Future[Result]]] = []
        calls = self._take(taken)
        if not calls:
            return
        batch = asyncio.get_running_loop().run_in_executor(
            self.executor, self.service.handle_all, calls, lambda: self._take(taken))
        self.batch = batch
        batch.add_done_callback(lambda done: self._answer(done, [a for _, a in taken]))

    def _answer(self, done: asyncio.Future[list[Result | Exception]],
                answers: list[asyncio.Future[Result]]) -> None:
        self.batch = None
        if done.cancelled():
            outcomes: Sequence[Result | BaseException | None] = [None] * len(answers)
        else:
            failure = done.exception()  # handle_all answers each call; this is a bug's
            outcomes = [failure] * len(answers) if failure is not None else done.result()
        for answer, outcome in zip(answers, outcomes, strict=True):
            if answer.done():
                continue
            if outcome is None:
                answer.cancel()
            elif isinstance(outcome, BaseException):
                answer.set_exception(outcome)
            else:
                answer.set_result(outcome)
        if self.waiting:
            self._next_batch()

    def listeners(self) -> list[Listener]:
        paths = self.config.pki
        chain = pki.load_certs(paths.device_ca / "chain.pem")
        assert self.service is not None
        authorities = Authorities(self.service.factory_ca, self.service.device_ca.certificate)
        endpoints = Endpoints(self.config, self.run, encode_certs(chain), authorities,
                              self.refusals, self.metrics)
        listeners = [Listener("est", self.config.host, self.config.port, server_context(paths),
                              endpoints.routes())]
        if self.config.recovery_port is not None:
            listeners.append(Listener("recovery", self.config.host, self.config.recovery_port,
                                      recovery_context(paths), endpoints.recovery_routes()))
        return listeners

    async def serve(self, ready_fd: int | None) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._open)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stopping.set)
        config = self.config
        runners: list[web.AppRunner] = []
        guards: list[GuardedListener] = []
        try:
            listeners = self.listeners()
            limits = fit_descriptor_limit(
                ConnectionLimits(config.handshake_timeout, config.max_connections,
                                 config.max_connections_per_peer),
                len(listeners), lambda event, **fields: log_event(event, logging.WARNING,
                                                                  **fields))
            for listener in listeners:
                app = web.Application(client_max_size=config.max_body_bytes,
                                      middlewares=[middleware(self.metrics)]
                                      if self.metrics is not None else [])
                app.add_routes(listener.routes)
                # keepalive_timeout: from the handshake (or the last answer) to a complete
                # request head; a silent or slow-header connection is closed after it.
                runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                       shutdown_timeout=config.shutdown_timeout,
                                       keepalive_timeout=config.idle_timeout)
                await runner.setup()
                runners.append(runner)
                assert runner.server is not None
                guard = GuardedListener(listener.name, listener.context, runner.server, limits,
                                        self.refusals)
                await guard.start(listener.host, listener.port)
                guards.append(guard)
                log_event("listening", listener=listener.name, host=listener.host,
                          port=listener.port)
            if ready_fd is not None:
                os.write(ready_fd, b"r")
                os.close(ready_fd)
            tasks = [asyncio.create_task(self._watch_parent()),
                     asyncio.create_task(self._write_refusals())]
            await self.stopping.wait()
            for task in tasks:
                task.cancel()
        finally:
            for guard in guards:
                guard.close()
            for runner in runners:
                await runner.cleanup()
            await loop.run_in_executor(self.executor, self.stack.close)
            self.executor.shutdown(wait=True)
        self.refusals.flush(force=True)
        self._save_metrics()
        log_event("stopped", refusals=dict(self.refusals.totals))

    async def _watch_parent(self) -> None:
        """A worker whose supervisor died (SIGKILL) stops instead of holding the port."""
        parent = os.getppid()
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        log_event("orphaned", logging.WARNING)
        self.stopping.set()

    async def _write_refusals(self) -> None:
        """Counts a quiet spell left unwritten reach the log within an interval or so; the
        metrics snapshot is written each second."""
        while True:
            await asyncio.sleep(1.0)
            self.refusals.flush()
            self._save_metrics()

    def _save_metrics(self) -> None:
        if self.metrics is None:
            return
        try:
            self.metrics.save()
        except OSError as exc:  # metrics must never stop the worker
            log_event("metrics-not-written", logging.WARNING, error=exc.strerror)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="est-server", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="est-server TOML file")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--metrics-dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        config = est_config.load(args.config)
        if args.worker is None:
            from ._supervisor import supervise
            return supervise(config, args.config)
        metrics = (args.metrics_dir / f"worker-{args.worker}.json"
                   if args.metrics_dir is not None else None)
        uvloop.run(Worker(config, metrics).serve(args.ready_fd))
    except IdentityError as exc:
        log_event("error", logging.ERROR, error=str(exc))
        print(f"est-server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
