"""The EST server's edge: who may hold a connection, the TLS handshake, refusal counters.

aiohttp's ``TCPSite`` hands each socket to asyncio's TLS layer, which drops a
failed or stalled handshake without a word (asyncio logs it in debug mode
only) and knows no connection limit. A :class:`GuardedListener` accepts plain
TCP instead, admits the connection against a total and a per-address limit,
runs the handshake itself (``loop.start_tls``) under a timeout, and only then
gives the TLS transport to aiohttp. Every refusal on the way, and every refusal
the HTTP layer makes before a request is tied to a device, is counted by a
:class:`RefusalLog`, which writes at most one line per kind per interval: a
flood neither reaches the registry nor fills the disk with log lines.

Limits and counters are per worker process; the kernel spreads connections
over the workers (SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import math
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

Emit = Callable[..., None]


class RefusalLog:
    """Refusals counted by kind; at most one log line per kind per ``interval`` seconds.

    A line carries ``count`` (refusals of its kind since the previous line, this
    one included), ``total`` (since the worker started) and the fields of the
    latest refusal (peer address, endpoint, reason). :meth:`flush` writes the
    counts a quiet spell left unwritten, under the same one-line-per-interval rule.
    """

    def __init__(self, emit: Emit, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.emit = emit
        self.interval = interval
        self.clock = clock
        self.totals: Counter[str] = Counter()
        self._unwritten: Counter[str] = Counter()
        self._latest: dict[str, dict[str, object]] = {}
        self._next: dict[str, float] = {}

    def note(self, kind: str, **fields: object) -> None:
        self.totals[kind] += 1
        self._unwritten[kind] += 1
        self._latest[kind] = fields
        self._write(kind, self.clock())

    def flush(self, force: bool = False) -> None:
        """Write what waits whose interval has passed; ``force``: all of it (at stop)."""
        now = self.clock()
        for kind in list(self._unwritten):
            self._write(kind, now, force)

    def _write(self, kind: str, now: float, force: bool = False) -> None:
        if now < self._next.get(kind, -math.inf) and not force:
            return
        count = self._unwritten.pop(kind, 0)
        if count:
            self.emit("refused", kind=kind, count=count, total=self.totals[kind],
                      **self._latest[kind])
            self._next[kind] = now + self.interval


@dataclass(frozen=True)
class ConnectionLimits:
    handshake_timeout: float
    max_connections: int
    max_per_peer: int


class GuardedListener:
    """One TCP port: admission, the TLS handshake, then ``app_factory``'s protocol (aiohttp)."""

    def __init__(self, name: str, context: ssl.SSLContext,
                 app_factory: Callable[[], asyncio.Protocol], limits: ConnectionLimits,
                 refusals: RefusalLog) -> None:
        self.name = name
        self.context = context
        self.app_factory = app_factory
        self.limits = limits
        self.refusals = refusals
        self.open = 0
        self.by_peer: Counter[str] = Counter()
        self._server: asyncio.AbstractServer | None = None
        self._handshakes: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, backlog: int = 1024) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Accept(self), host, port,
                                                reuse_port=True, backlog=backlog)

    def close(self) -> None:
        """Stop accepting and drop unfinished handshakes; aiohttp closes the rest."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handshakes):
            task.cancel()

    def admit(self, transport: asyncio.Transport) -> None:
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if peername else "unknown"
        limits = self.limits
        full = ("connection-limit" if self.open >= limits.max_connections
                else "peer-connection-limit" if self.by_peer[peer] >= limits.max_per_peer
                else None)
        if full is not None:
            self.refusals.note(full, listener=self.name, peer=peer, open=self.open,
                               from_peer=self.by_peer[peer])
            transport.abort()
            return
        self.open += 1
        self.by_peer[peer] += 1
        slot = _Slot(self, peer)
        task = asyncio.get_running_loop().create_task(self._handshake(transport, peer, slot))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def release(self, peer: str) -> None:
        self.open -= 1
        self.by_peer[peer] -= 1
        if self.by_peer[peer] <= 0:
            del self.by_peer[peer]

    async def _handshake(self, transport: asyncio.Transport, peer: str, slot: _Slot) -> None:
        connection = _Connection(self.app_factory, slot.release)
        timeout = self.limits.handshake_timeout
        kind, reason = "tls-dropped", "closed during the handshake"
        try:
            async with asyncio.timeout(timeout):
                # asyncio's own timeout is a backstop; ours tells a stall from a failure.
                tls = await asyncio.get_running_loop().start_tls(
                    transport, connection, self.context, server_side=True,
                    ssl_handshake_timeout=timeout + 5, ssl_shutdown_timeout=timeout)
        except TimeoutError:
            kind, reason = "tls-timeout", f"no handshake within {timeout:g}s"
            tls = None
        except ssl.SSLError as exc:
            kind, reason = "tls-failed", exc.reason or type(exc).__name__
            tls = None
        except OSError as exc:
            reason = type(exc).__name__
            tls = None
        except asyncio.CancelledError:
            transport.abort()
            slot.release()
            raise
        if tls is None or connection.lost:
            transport.abort()
            slot.release()
            self.refusals.note(kind, listener=self.name, peer=peer, reason=reason)
            return
        connection.connection_made(tls)


class _Slot:
    """A place in the listener's counts, given back exactly once."""

    def __init__(self, listener: GuardedListener, peer: str) -> None:
        self._listener = listener
        self._peer = peer
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._listener.release(self._peer)


class _Accept(asyncio.Protocol):
    """The plain TCP side until start_tls takes the transport over."""

    def __init__(self, listener: GuardedListener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello is for the TLS layer, not for us
        self.listener.admit(transport)


class _Connection(asyncio.Protocol):
    """Between the TLS layer and aiohttp: gives the slot back when the connection ends.

    The TLS layer may pass on request bytes that arrived with the handshake's
    last flight before :meth:`connection_made` is called; they wait here.
    """

    def __init__(self, app_factory: Callable[[], asyncio.Protocol],
                 release: Callable[[], None]) -> None:
        self._app_factory = app_factory
        self._release = release
        self._app: asyncio.Protocol | None = None
        self._early: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        app = self._app = self._app_factory()
        app.connection_made(transport)
        for data in self._early:
            app.data_received(data)
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        if self._app is None:
            self._early.append(data)
        else:
            self._app.data_received(data)

    def eof_received(self) -> bool | None:
        return self._app.eof_received() if self._app is not None else None

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._release()
        if self._app is not None:
            self._app.connection_lost(exc)
