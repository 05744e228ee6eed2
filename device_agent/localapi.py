"""The local publishing API: other programs on the device publish through the agent.

A Unix stream socket (mode 0660, group-owned) takes one JSON object per line,
``{"topic": "telemetry/engine", "data": {...}}``, and answers one line,
``{"ok": true, "seq": 42}``, once the message is durable in the outbox.

What MQTT or the broker could not carry is refused here, before it reaches the
outbox, so no caller can put a message at the head of the queue that blocks all
others: a topic too long or with characters outside ``[A-Za-z0-9_-]``, a payload
over ``[api] max_payload`` bytes, a line over 256 KiB (refused whole, its tail is
never read as a request of its own), JSON nested too deep. One thread with a
selector serves every connection (an idle client costs a buffer, not a thread; the
listen backlog is 1024).

A client may send its next lines before the first answer: up to ``PIPELINE``
lines per connection are in flight at once, and the answers come back in the
order of the lines. Each line goes to the group commit (``device_agent.committer``):
lines from every connection that arrive while a transaction commits go into the
next one, and a line is answered ``ok`` only when that transaction is durable.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import json
import logging
import os
import re
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .errors import IdentityError
from .outbox import Draft, Message, Outbox

log = logging.getLogger(__name__)

TOPIC_SUFFIX = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+){0,7}")
RESERVED = ("status", "commands")
MAX_LINE = 256 * 1024
MAX_SUFFIX = 128  # characters below devices/<id>/
MAX_CLIENTS = 4096  # the agent raises its file limit to fit (agent.raise_file_limit)
BACKLOG = 1024
PIPELINE = 64  # lines of one connection in flight before it is read no further
READ_CHUNK = 64 * 1024

# Committer.submit: the message once durable, or the OutboxError
Submit = Callable[[Draft], Future[Message]]


class LocalAPIError(IdentityError):
    """A local publish request was refused."""


def validate_suffix(suffix: str) -> str:
    """Topic levels below devices/<id>/: no wildcards, no empty levels, not the agent's own."""
    if len(suffix) > MAX_SUFFIX:
        raise LocalAPIError(f"topic suffix of {len(suffix)} characters: at most {MAX_SUFFIX}")
    if not TOPIC_SUFFIX.fullmatch(suffix) or suffix.split("/")[0] in RESERVED:
        raise LocalAPIError(f"topic suffix {suffix!r} not allowed: use levels of "
                            "[A-Za-z0-9_-], not status/ or commands/")
    return suffix


def parse_request(line: bytes | None, max_payload: int) -> Draft:
    """The message one request line asks for; ``None`` stands for an oversized line."""
    if line is None:
        raise LocalAPIError(f"request larger than {MAX_LINE} bytes")
    try:
        request = json.loads(line)
    except RecursionError:
        raise LocalAPIError("request nested too deeply") from None
    except ValueError as exc:
        raise LocalAPIError(f"request is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("data"), dict):
        raise LocalAPIError('expected {"topic": "...", "data": {...}}')
    suffix = validate_suffix(str(request.get("topic", "telemetry")))
    try:
        draft = Outbox.draft(suffix, request["data"])  # encoded once, here
    except ValueError:
        raise LocalAPIError("NaN and Infinity are not JSON: not allowed in data") from None
    if len(draft.body) > max_payload:
        raise LocalAPIError(f"payload of {len(draft.body)} bytes: the limit is {max_payload}")
    return draft


def answer_of(outcome: Future[Message]) -> bytes:
    """The answer line for a request whose outcome is settled."""
    try:
        return b'{"ok": true, "seq": %d}\n' % outcome.result().seq
    except IdentityError as exc:  # refused, or the outbox could not take it
        return json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n"


class _Client:
    """One connection: bytes read and not yet taken as lines, the outcomes of its lines in
    their order, the answers not yet written."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = bytearray()
        self.skipping = False  # inside a line over MAX_LINE: its tail is no request
        self.pending: deque[Future[Message]] = deque()
        self.outbox = bytearray()
        self.eof = False
        self.gone = False  # the client no longer reads: its lines are stored, not answered
        self.events = 0

    def lines(self) -> Iterator[bytes | None]:
        """The complete lines in the buffer (``None`` for one over MAX_LINE), while the
        caller takes them; at end of file, what is left as a last line."""
        while (end := self.inbox.find(b"\n")) >= 0:
            line = bytes(self.inbox[:end])
            del self.inbox[:end + 1]
            skipped, self.skipping = self.skipping, False
            yield None if skipped or len(line) > MAX_LINE else line
        if len(self.inbox) > MAX_LINE:
            self.inbox.clear()
            self.skipping = True
        if self.eof:
            line, skipped = bytes(self.inbox), self.skipping
            self.inbox.clear()
            self.skipping = False
            if skipped:
                yield None
            elif line.strip():
                yield line

    @property
    def finished(self) -> bool:
        return self.eof and not self.pending and not self.inbox and not self.outbox


class LocalAPI:
    """Serves the socket from one thread with a selector until closed: no event-loop
    framework (asyncio alone would be 1.9 MB of the daemon's resident memory)."""

    def __init__(self, path: Path, submit: Submit, group: str | None = None,
                 max_payload: int = MAX_LINE) -> None:
        self.path = path
        self.submit = submit
        self.max_payload = max_payload
        self.clients = 0
        self._open: set[_Client] = set()
        # clients with outcomes settled on the committer's thread, one wake-up per batch
        self._ready: set[_Client] = set()
        self._ready_lock = threading.Lock()
        self._closing = False
        self._accept_paused_until = 0.0
        if path.exists() or path.is_symlink():
            path.unlink()
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(path))
            os.chmod(path, 0o660)
            if group:
                try:
                    os.chown(path, -1, grp.getgrnam(group).gr_gid)
                except KeyError:
                    log.warning("local API group %s does not exist; socket left root-group",
                                group)
            self._listener.listen(BACKLOG)
            for sock in (self._listener, self._wake_read, self._wake_write):
                sock.setblocking(False)
            self._selector.register(self._listener, selectors.EVENT_READ)
            self._selector.register(self._wake_read, selectors.EVENT_READ)
        except BaseException:
            self._close_sockets()
            raise
        self._thread = threading.Thread(target=self._run, name="local-api", daemon=True)
        self._thread.start()

    def request(self, line: bytes | None) -> Future[Message]:
        """The outcome of one request line: refused at once, or the committer's answer."""
        try:
            return self.submit(parse_request(line, self.max_payload))
        except IdentityError as exc:
            refused: Future[Message] = Future()
            refused.set_exception(exc)
            return refused

    def _settled(self, client: _Client, _done: Future[Message]) -> None:
        """On the committer's thread: wake the API's thread once per batch, not per line."""
        with self._ready_lock:
            first = not self._ready
            self._ready.add(client)
        if first:
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # full: a wake-up is pending
            self._wake_write.send(b"\0")

    def _run(self) -> None:
        try:
            while not self._closing:
                timeout = None
                if self._accept_paused_until:
                    timeout = max(0.0, self._accept_paused_until - time.monotonic())
                    if timeout == 0.0:
                        self._accept_paused_until = 0.0
                        self._selector.register(self._listener, selectors.EVENT_READ)
                        timeout = None
                for key, events in self._selector.select(timeout):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_read:
                        self._woken()
                    else:
                        self._serve(key.data, events)
        except Exception:  # noqa: BLE001 - logged; the agent's health sees no API
            log.exception("local API stopped")
        finally:
            for client in list(self._open):
                self._drop(client)
            self._close_sockets()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # out of file descriptors: try again shortly
                log.warning("local API cannot accept: %s", exc)
                self._selector.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + 0.1
                return
            if self.clients >= MAX_CLIENTS:
                with contextlib.suppress(OSError):
                    sock.setblocking(False)
                    sock.send(json.dumps({"ok": False, "error": "too many clients; retry"})
                              .encode() + b"\n")
                sock.close()
                continue
            self.clients += 1
            sock.setblocking(False)
            client = _Client(sock)
            self._open.add(client)
            client.events = selectors.EVENT_READ
            self._selector.register(sock, client.events, client)

    def _woken(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_read.recv(4096):
                pass
        with self._ready_lock:
            ready, self._ready = self._ready, set()
        for client in ready:
            if client in self._open:
                self._progress(client)

    def _serve(self, client: _Client, events: int) -> None:
        if events & selectors.EVENT_READ:
            try:
                chunk = client.sock.recv(READ_CHUNK)
            except BlockingIOError:
                chunk = None
            except ConnectionError:  # reset: nobody reads the answers either
                chunk, client.gone = b"", True
                client.inbox.clear()
            if chunk is not None:
                client.inbox += chunk
                client.eof = not chunk
        if events & selectors.EVENT_WRITE:
            self._write(client)
        self._progress(client)

    def _progress(self, client: _Client) -> None:
        """Take lines while fewer than PIPELINE are in flight, answer what has settled in
        order, write, and listen for what this client can do next."""
        while True:
            for line in client.lines():
                outcome = self.request(line)
                client.pending.append(outcome)
                if not outcome.done():
                    outcome.add_done_callback(functools.partial(self._settled, client))
                if len(client.pending) >= PIPELINE:
                    break
            answered = False
            while client.pending and client.pending[0].done():
                answer = answer_of(client.pending.popleft())
                answered = True
                if not client.gone:
                    client.outbox += answer
            if not answered or len(client.pending) >= PIPELINE:
                break
        self._write(client)
        if client.finished:
            self._drop(client)
            return
        wanted = 0
        if not client.eof and len(client.pending) < PIPELINE:
            wanted |= selectors.EVENT_READ
        if client.outbox:
            wanted |= selectors.EVENT_WRITE
        if wanted != client.events:
            if not client.events:
                self._selector.register(client.sock, wanted, client)
            elif not wanted:
                self._selector.unregister(client.sock)
            else:
                self._selector.modify(client.sock, wanted, client)
            client.events = wanted

    def _write(self, client: _Client) -> None:
        if not client.outbox:
            return
        try:
            sent = client.sock.send(client.outbox)
        except BlockingIOError:
            return
        except OSError:  # the client went away: keep storing its lines, answer no more
            client.gone = True
            client.outbox.clear()
            return
        del client.outbox[:sent]

    def _drop(self, client: _Client) -> None:
        self._open.discard(client)
        if client.events:
            self._selector.unregister(client.sock)
            client.events = 0
        client.sock.close()
        self.clients -= 1

    def _close_sockets(self) -> None:
        self._selector.close()
        for sock in (self._listener, self._wake_read, self._wake_write):
            sock.close()

    def close(self) -> None:
        self._closing = True
        self._wake()
        self._thread.join(10)
        if self._thread.is_alive():  # a stop must never fail the agent
            log.warning("local API did not close within 10 s")
        self.path.unlink(missing_ok=True)


def publish_via_socket(path: Path, topic: str, data: dict[str, Any],
                       timeout: float = 10.0) -> dict[str, Any]:
    """Client side, for ``device-agent publish``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise LocalAPIError(f"agent not reachable on {path}: {exc.strerror}") from exc
        sock.sendall(json.dumps({"topic": topic, "data": data}).encode() + b"\n")
        reply = sock.makefile("rb").readline(MAX_LINE)
    if not reply:
        raise LocalAPIError("agent closed the connection without answering")
    answer: dict[str, Any] = json.loads(reply)
    return answer
