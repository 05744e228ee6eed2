"""The local publishing API: other programs on the device publish through the agent.

A Unix stream socket (mode 0660, group-owned) takes one JSON object per line,
``{"topic": "telemetry/engine", "data": {...}}``, and answers one line,
``{"ok": true, "seq": 42}``, once the message is durable in the outbox.

What MQTT or the broker could not carry is refused here, before it reaches the
outbox, so no caller can put a message at the head of the queue that blocks all
others: a topic too long or with characters outside ``[A-Za-z0-9_-]``, a payload
over ``[api] max_payload`` bytes, a line over 256 KiB (refused whole, its tail is
never read as a request of its own), JSON nested too deep. One event-loop thread
serves every connection (idle clients cost a coroutine, not a thread; the listen
backlog is 1024).

A client may send its next lines before the first answer: up to ``PIPELINE``
lines per connection are in flight at once, and the answers come back in the
order of the lines. Each line goes to the group commit (``device_agent.committer``):
lines from every connection that arrive while a transaction commits go into the
next one, and a line is answered ``ok`` only when that transaction is durable.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import re
import socket
import threading
from collections.abc import AsyncIterator, Callable
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


async def request_lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes | None]:
    """Lines from ``reader``; ``None`` for a line over MAX_LINE, which is skipped whole."""
    buffer = bytearray()
    skipping = False
    while chunk := await reader.read(READ_CHUNK):
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[:end + 1]
            yield None if skipping or len(line) > MAX_LINE else line
            skipping = False
        if len(buffer) > MAX_LINE:
            buffer.clear()
            skipping = True
    if skipping:
        yield None
    elif buffer.strip():
        yield bytes(buffer)


def answer_of(outcome: asyncio.Future[Message]) -> bytes:
    """The answer line for a request whose outcome is settled."""
    try:
        return b'{"ok": true, "seq": %d}\n' % outcome.result().seq
    except IdentityError as exc:  # refused, or the outbox could not take it
        return json.dumps({"ok": False, "error": str(exc)}).encode() + b"\n"


class LocalAPI:
    """Serves the socket from one event-loop thread until closed."""

    def __init__(self, path: Path, submit: Submit, group: str | None = None,
                 max_payload: int = MAX_LINE) -> None:
        self.path = path
        self.submit = submit
        self.max_payload = max_payload
        self.clients = 0
        self._open: set[asyncio.StreamWriter] = set()
        # outcomes settled on the committer's thread, handed to the loop a batch at a time
        self._settled: list[tuple[asyncio.Future[Message], Future[Message]]] = []
        self._settled_lock = threading.Lock()
        if path.exists() or path.is_symlink():
            path.unlink()
        self._loop = asyncio.new_event_loop()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(path))
            os.chmod(path, 0o660)
            if group:
                try:
                    os.chown(path, -1, grp.getgrnam(group).gr_gid)
                except KeyError:
                    log.warning("local API group %s does not exist; socket left root-group",
                                group)
            self._server = self._loop.run_until_complete(asyncio.start_unix_server(
                self._serve_client, sock=listener, backlog=BACKLOG, limit=READ_CHUNK))
        except BaseException:
            listener.close()
            self._loop.close()
            raise
        self._thread = threading.Thread(target=self._loop.run_forever, name="local-api",
                                        daemon=True)
        self._thread.start()

    def request(self, line: bytes | None) -> asyncio.Future[Message]:
        """The outcome of one request line: refused at once, or the committer's answer."""
        outcome: asyncio.Future[Message] = self._loop.create_future()
        try:
            submitted = self.submit(parse_request(line, self.max_payload))
        except IdentityError as exc:
            outcome.set_exception(exc)
        else:
            submitted.add_done_callback(lambda done: self._settle(outcome, done))
        return outcome

    def _settle(self, outcome: asyncio.Future[Message], done: Future[Message]) -> None:
        """On the committer's thread: one wake-up of the loop per batch, not per line."""
        with self._settled_lock:
            self._settled.append((outcome, done))
            if len(self._settled) > 1:
                return  # a hand-over is already scheduled
        try:
            self._loop.call_soon_threadsafe(self._hand_over)
        except RuntimeError:  # the API has closed: nobody is left to answer
            log.debug("local API closed before an answer was handed over")

    def _hand_over(self) -> None:
        with self._settled_lock:
            settled, self._settled = self._settled, []
        for outcome, done in settled:
            if outcome.cancelled():
                continue
            error = done.exception()
            if error is None:
                outcome.set_result(done.result())
            else:
                outcome.set_exception(error)

    async def _serve_client(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        self.clients += 1
        self._open.add(writer)
        try:
            if self.clients > MAX_CLIENTS:
                writer.write(json.dumps({"ok": False, "error": "too many clients; retry"})
                             .encode() + b"\n")
                await writer.drain()
                return
            in_flight: asyncio.Queue[asyncio.Future[Message] | None] = asyncio.Queue(PIPELINE)
            answering = asyncio.ensure_future(self._answer(in_flight, writer))
            try:
                async for line in request_lines(reader):
                    await in_flight.put(self.request(line))
            finally:
                await in_flight.put(None)
                await answering
        except ConnectionError:
            pass
        except Exception:  # noqa: BLE001 - one client must never stop the API
            log.exception("local API client failed")
        finally:
            self.clients -= 1
            self._open.discard(writer)
            writer.close()

    @staticmethod
    async def _answer(in_flight: asyncio.Queue[asyncio.Future[Message] | None],
                      writer: asyncio.StreamWriter) -> None:
        """Answers in the order of the lines, each once its outcome is settled, those
        settled together in one write.

        Keeps taking outcomes after the client went away, so the reader never
        waits on a full queue: those lines are still stored, only not answered.
        """
        gone = False
        answers: list[bytes] = []

        async def flush() -> None:
            nonlocal gone
            if answers and not gone:
                try:
                    writer.write(b"".join(answers))
                    await writer.drain()
                except ConnectionError:
                    gone = True
            answers.clear()

        while True:
            taken = [await in_flight.get()]
            while not in_flight.empty():
                taken.append(in_flight.get_nowait())
            for outcome in taken:
                if outcome is None:
                    await flush()
                    return
                if not outcome.done():
                    await flush()  # what is settled goes out before waiting
                    await asyncio.wait((outcome,))
                answers.append(answer_of(outcome))
            await flush()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for writer in list(self._open):  # idle clients: wait_closed waits for them
                writer.close()
            await self._server.wait_closed()

        if self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            except (TimeoutError, RuntimeError) as exc:  # a stop must never fail the agent
                log.warning("local API did not close cleanly: %r", exc)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()
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
