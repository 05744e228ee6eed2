"""The EST server's edge: who may hold a connection, the TLS handshake, refusal counters.

aiohttp's ``TCPSite`` hands each socket to asyncio's TLS layer, which drops a
failed or stalled handshake without a word (asyncio logs it in debug mode
only) and knows no connection limit. A :class:`GuardedListener` accepts the
sockets itself instead, admits each against a per-address limit and a total,
has the event loop run the handshake (``loop.connect_accepted_socket``) under a
timeout, and only then gives the TLS transport to aiohttp. Every refusal on the
way, and every refusal the HTTP layer makes before a request is tied to a device,
is counted by a :class:`RefusalLog`, which writes at most one line per kind per
interval: a flood neither reaches the registry nor fills the disk with log lines.

A full listener does not turn the newcomer away, or idle sockets, however many,
would keep every device out: it evicts the connection that has been quiet
longest (no request bytes since it was admitted, or since its last answer). A
connection with a request in progress is never evicted; when every place holds
one, the newcomer is refused. The per-address limit refuses the newcomer, so one
address cannot evict the others. :func:`fit_descriptor_limit` makes sure a
worker reaches its limit before it runs out of file descriptors.

Limits and counters are per worker process; the kernel spreads connections
over the workers (SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import errno
import math
import resource
import socket
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, cast

Emit = Callable[..., None]
# Descriptors a worker needs besides its connections and accept bursts: listening sockets,
# the registry, the log, the event loop's own.
DESCRIPTOR_MARGIN = 256
# accept() failures that say this process or the kernel is out of room, not that one
# client went away: the listener rests a second instead of spinning on them.
OUT_OF_ROOM = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_REST = 1.0


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
    # The listen queue, and as many sockets as asyncio accepts in one go before any of
    # them is admitted (or evicts another): descriptors a full listener holds on top.
    backlog: int = 1024


def descriptor_plan(soft: int, hard: int, limits: ConnectionLimits,
                    listeners: int) -> tuple[int, ConnectionLimits]:
    """The soft RLIMIT_NOFILE to set (never lower than ``soft``, at most ``hard``) and the
    limits each of ``listeners`` can keep within it, :data:`DESCRIPTOR_MARGIN` to spare;
    short of room, connections and backlog share what there is."""
    unlimited = resource.RLIM_INFINITY
    wanted = listeners * (limits.max_connections + limits.backlog) + DESCRIPTOR_MARGIN
    target = wanted if hard == unlimited else min(wanted, hard)
    new_soft = soft if soft == unlimited or soft >= target else target
    if new_soft == unlimited or new_soft >= wanted:
        return new_soft, limits
    each = max(2, (new_soft - DESCRIPTOR_MARGIN) // listeners)
    backlog = min(limits.backlog, each // 2)
    connections = min(limits.max_connections, each - backlog)
    return new_soft, replace(limits, max_connections=connections, backlog=backlog,
                             max_per_peer=min(limits.max_per_peer, connections))


def fit_descriptor_limit(limits: ConnectionLimits, listeners: int,
                         warn: Emit) -> ConnectionLimits:
    """Raise this process's soft RLIMIT_NOFILE for ``listeners`` listeners held to
    ``limits``; the limits that fit, lower only if the hard limit is.

    A worker out of descriptors fails in accept() (EMFILE), and asyncio then stops
    accepting on that socket for a second, devices included; one held to what fits evicts
    instead. Called once per worker, so the warning is written once per worker.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_soft, fitted = descriptor_plan(soft, hard, limits, listeners)
    if new_soft != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        except (ValueError, OSError):
            new_soft, fitted = descriptor_plan(soft, soft, limits, listeners)
    if fitted != limits:
        warn("descriptor-limit", soft=new_soft, hard=hard, listeners=listeners,
             max_connections=limits.max_connections, connections=fitted.max_connections,
             backlog=fitted.backlog,
             reason=f"RLIMIT_NOFILE holds {fitted.max_connections} connections per listener, "
                    f"not max_connections = {limits.max_connections}: raise the hard limit "
                    "(LimitNOFILE= in the unit, ulimit -Hn)")
    return fitted


class GuardedListener:
    """One TCP port: admission, the TLS handshake, then ``app_factory``'s protocol (aiohttp)."""

    def __init__(self, name: str, context: ssl.SSLContext,
                 app_factory: Callable[[], asyncio.Protocol], limits: ConnectionLimits,
                 refusals: RefusalLog, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.context = context
        self.app_factory = app_factory
        self.limits = limits
        self.refusals = refusals
        self.clock = clock
        self.by_peer: Counter[str] = Counter()
        self._quiet: OrderedDict[_Slot, None] = OrderedDict()  # quiet longest first
        self._busy: set[_Slot] = set()  # a request in progress: never evicted
        self._sockets: list[socket.socket] = []
        self._handshakes: set[asyncio.Task[None]] = set()

    @property
    def open(self) -> int:
        return len(self._quiet) + len(self._busy)

    async def start(self, host: str, port: int) -> None:
        """Listen on every address ``host`` names (SO_REUSEPORT: the other workers too)."""
        loop = asyncio.get_running_loop()
        found = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        for family, _, _, _, address in dict.fromkeys(found):
            sock = socket.create_server(address, family=family, backlog=self.limits.backlog,
                                        reuse_port=True)
            sock.setblocking(False)
            self._sockets.append(sock)
            loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and drop unfinished handshakes; aiohttp closes the rest."""
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        for task in list(self._handshakes):
            task.cancel()

    def _accept(self, listening: socket.socket) -> None:
        """Take what the listen queue holds, ``backlog`` at most per turn of the loop."""
        for _ in range(self.limits.backlog):
            try:
                sock, address = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in OUT_OF_ROOM:
                    continue  # that client gave up (ECONNABORTED and kin)
                self.refusals.note("accept-failed", listener=self.name,
                                   reason=exc.strerror, open=self.open)
                self._rest(listening)
                return
            sock.setblocking(False)
            slot = self.admit(_Accepted(sock, address))
            if slot is not None:
                self.handshake(slot, sock)

    def _rest(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(listening.fileno())

        def resume() -> None:
            if listening in self._sockets:
                loop.add_reader(listening.fileno(), self._accept, listening)

        loop.call_later(ACCEPT_REST, resume)

    def admit(self, transport: asyncio.Transport) -> _Slot | None:
        """A place for a new connection, or None: refused, aborted and counted."""
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if peername else "unknown"
        refusal = None
        if self.by_peer[peer] >= self.limits.max_per_peer:
            refusal = "peer-connection-limit"
        elif self.open >= self.limits.max_connections and not self._evict(peer):
            refusal = "connection-limit"
        if refusal is not None:
            self.refusals.note(refusal, listener=self.name, peer=peer, open=self.open,
                               from_peer=self.by_peer[peer])
            transport.abort()
            return None
        slot = _Slot(self, peer, transport, self.clock())
        self._quiet[slot] = None
        self.by_peer[peer] += 1
        return slot

    def _evict(self, newcomer: str) -> bool:
        if not self._quiet:
            return False
        victim = next(iter(self._quiet))
        self.refusals.note("connection-evicted", listener=self.name, peer=victim.peer,
                           newcomer=newcomer, quiet_for=round(self.clock() - victim.since, 3),
                           open=self.open)
        victim.evict()
        return True

    def handshake(self, slot: _Slot, sock: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake(slot, sock))
        slot.task = task
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def spoke(self, slot: _Slot) -> None:
        self._quiet.pop(slot, None)
        self._busy.add(slot)

    def answered(self, slot: _Slot) -> None:
        self._busy.discard(slot)
        self._quiet[slot] = None
        self._quiet.move_to_end(slot)
        slot.since = self.clock()

    def release(self, slot: _Slot) -> None:
        self._quiet.pop(slot, None)
        self._busy.discard(slot)
        self.by_peer[slot.peer] -= 1
        if self.by_peer[slot.peer] <= 0:
            del self.by_peer[slot.peer]

    async def _handshake(self, slot: _Slot, sock: socket.socket) -> None:
        """The loop's TLS layer takes the socket; the connection is aiohttp's once the
        handshake is done, or counted and closed when it fails or stalls."""
        pending = slot.transport
        assert isinstance(pending, _Accepted)
        connection = _Connection(self.app_factory, slot)
        timeout = self.limits.handshake_timeout
        kind, reason = "tls-dropped", "closed during the handshake"
        pending.handed = True  # from here on the loop closes the socket, whatever happens
        try:
            async with asyncio.timeout(timeout):
                # asyncio's own timeout is a backstop; ours tells a stall from a failure.
                await asyncio.get_running_loop().connect_accepted_socket(
                    lambda: connection, sock, ssl=self.context,
                    ssl_handshake_timeout=timeout + 5, ssl_shutdown_timeout=timeout)
            return
        except TimeoutError:
            kind, reason = "tls-timeout", f"no handshake within {timeout:g}s"
        except ssl.SSLError as exc:
            kind, reason = "tls-failed", exc.reason or type(exc).__name__
        except OSError as exc:
            reason = type(exc).__name__
        except asyncio.CancelledError:
            slot.release()  # evicted, or the listener is closing
            raise
        slot.release()
        self.refusals.note(kind, listener=self.name, peer=slot.peer, reason=reason)


class _Accepted(asyncio.Transport):
    """An accepted socket before the TLS layer has it: its peer, and how to refuse it.

    Once handed to the loop, the loop owns the socket and closes it when the
    handshake is cancelled or fails; before that (refused at admission, or evicted
    before its handshake began) it is closed here.
    """

    def __init__(self, sock: socket.socket, address: Any) -> None:
        super().__init__()
        self._sock = sock
        self._address = address
        self.handed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._address if name == "peername" else default

    def abort(self) -> None:
        if not self.handed:
            self._sock.close()

    def close(self) -> None:
        self.abort()

    def is_closing(self) -> bool:
        return self._sock.fileno() < 0


class _Slot:
    """One admitted connection: its place in the listener's counts and eviction order,
    given back exactly once, and how to end it."""

    def __init__(self, listener: GuardedListener, peer: str, transport: asyncio.Transport,
                 since: float) -> None:
        self.listener = listener
        self.peer = peer
        self.transport = transport  # the accepted socket until the handshake is done
        self.since = since  # admitted, or last answered
        self.task: asyncio.Task[None] | None = None
        self.held = True

    def spoke(self) -> None:
        if self.held:
            self.listener.spoke(self)

    def answered(self) -> None:
        if self.held:
            self.listener.answered(self)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.listener.release(self)

    def evict(self) -> None:
        """Give the place back now and close the connection (a handshake under way is
        cancelled, and the loop closes its socket)."""
        self.release()
        if self.task is not None:
            self.task.cancel()  # a handshake under way; nothing once it is done
        self.transport.abort()


class _Connection(asyncio.Protocol):
    """Between the TLS layer and aiohttp: request bytes make the connection busy, an answer
    quiet again; gives the slot back when the connection ends."""

    def __init__(self, app_factory: Callable[[], asyncio.Protocol], slot: _Slot) -> None:
        self._app_factory = app_factory
        self._slot = slot
        self._app: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = cast(asyncio.Transport, transport)  # uvloop's is one, not a subclass
        self._slot.transport = tls
        app = self._app = self._app_factory()
        app.connection_made(_Answering(tls, self._slot.answered))

    def data_received(self, data: bytes) -> None:
        self._slot.spoke()
        assert self._app is not None
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
        self._slot.release()
        if self._app is not None:
            self._app.connection_lost(exc)


class _Answering(asyncio.Transport):
    """The TLS transport as aiohttp sees it: whatever aiohttp writes answers the request in
    progress, which tells the listener the connection is quiet again (and evictable)."""

    def __init__(self, tls: asyncio.Transport, answered: Callable[[], None]) -> None:
        super().__init__()
        self._tls = tls
        self._answered = answered

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        self._answered()
        self._tls.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview[Any]]) -> None:
        self._answered()
        self._tls.writelines(list_of_data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._tls.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self._tls.is_closing()

    def close(self) -> None:
        self._tls.close()

    def abort(self) -> None:
        self._tls.abort()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._tls.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._tls.get_protocol()

    def is_reading(self) -> bool:
        return self._tls.is_reading()

    def pause_reading(self) -> None:
        self._tls.pause_reading()

    def resume_reading(self) -> None:
        self._tls.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._tls.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tls.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tls.get_write_buffer_limits()

    def write_eof(self) -> None:
        self._tls.write_eof()

    def can_write_eof(self) -> bool:
        return self._tls.can_write_eof()
