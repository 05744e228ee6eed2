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
backlog is 1024), and a small pool of threads does the durable writes.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .errors import IdentityError

log = logging.getLogger(__name__)

TOPIC_SUFFIX = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+){0,7}")
RESERVED = ("status", "commands")
MAX_LINE = 256 * 1024
MAX_SUFFIX = 128  # characters below devices/<id>/
MAX_CLIENTS = 4096  # the agent raises its file limit to fit (agent.raise_file_limit)
BACKLOG = 1024
WRITERS = 4
READ_CHUNK = 64 * 1024

Publish = Callable[[str, dict[str, Any]], int]


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


def parse_request(line: bytes | None, max_payload: int) -> tuple[str, dict[str, Any]]:
    """(topic suffix, data) of one request line; ``None`` stands for an oversized line."""
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
    size = len(json.dumps(request["data"], separators=(",", ":")).encode())
    if size > max_payload:
        raise LocalAPIError(f"payload of {size} bytes: the limit is {max_payload}")
    return suffix, request["data"]


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


class LocalAPI:
    """Serves the socket from one event-loop thread until closed."""

    def __init__(self, path: Path, publish: Publish, group: str | None = None,
                 max_payload: int = MAX_LINE) -> None:
        self.path = path
        self.publish = publish
        self.max_payload = max_payload
        self.clients = 0
        self._open: set[asyncio.StreamWriter] = set()
        if path.exists() or path.is_symlink():
            path.unlink()
        self._writers = ThreadPoolExecutor(WRITERS, thread_name_prefix="local-api-write")
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
            self._writers.shutdown()
            raise
        self._thread = threading.Thread(target=self._loop.run_forever, name="local-api",
                                        daemon=True)
        self._thread.start()

    def answer(self, line: bytes | None) -> dict[str, Any]:
        try:
            suffix, data = parse_request(line, self.max_payload)
            return {"ok": True, "seq": self.publish(suffix, data)}
        except IdentityError as exc:  # refused, or the outbox could not take it
            return {"ok": False, "error": str(exc)}

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
            async for line in request_lines(reader):
                answer = await self._loop.run_in_executor(self._writers, self.answer, line)
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        except Exception:  # noqa: BLE001 - one client must never stop the API
            log.exception("local API client failed")
        finally:
            self.clients -= 1
            self._open.discard(writer)
            writer.close()

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
        self._writers.shutdown(wait=True)
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
