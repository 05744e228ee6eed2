"""The local publishing API: other programs on the device publish through the agent.

A Unix stream socket (mode 0660, group-owned) takes one JSON object per line,
``{"topic": "telemetry/engine", "data": {...}}``, and answers one line,
``{"ok": true, "seq": 42}``, once the message is durable in the outbox.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import re
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import IdentityError

log = logging.getLogger(__name__)

TOPIC_SUFFIX = re.compile(r"[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+){0,7}")
RESERVED = ("status", "commands")
MAX_LINE = 256 * 1024

Publish = Callable[[str, dict[str, Any]], int]


class LocalAPIError(IdentityError):
    """A local publish request was refused."""


def validate_suffix(suffix: str) -> str:
    """Topic levels below devices/<id>/: no wildcards, no empty levels, not the agent's own."""
    if not TOPIC_SUFFIX.fullmatch(suffix) or suffix.split("/")[0] in RESERVED:
        raise LocalAPIError(f"topic suffix {suffix!r} not allowed: use levels of "
                            "[A-Za-z0-9_-], not status/ or commands/")
    return suffix


class _Handler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while line := self.rfile.readline(MAX_LINE + 1):
            self.wfile.write(json.dumps(self.server.answer(line)).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, publish: Publish) -> None:
        self.publish = publish
        super().__init__(path, _Handler)

    def answer(self, line: bytes) -> dict[str, Any]:
        try:
            if len(line) > MAX_LINE:
                raise LocalAPIError(f"request larger than {MAX_LINE} bytes")
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("data"), dict):
                raise LocalAPIError('expected {"topic": "...", "data": {...}}')
            seq = self.publish(validate_suffix(str(request.get("topic", "telemetry"))),
                               request["data"])
            return {"ok": True, "seq": seq}
        except (ValueError, IdentityError) as exc:
            return {"ok": False, "error": str(exc)}


class LocalAPI:
    """Serves the socket on its own threads until closed."""

    def __init__(self, path: Path, publish: Publish, group: str | None = None) -> None:
        self.path = path
        if path.exists() or path.is_symlink():
            path.unlink()
        self._server = _Server(str(path), publish)
        os.chmod(path, 0o660)
        if group:
            try:
                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            except KeyError:
                log.warning("local API group %s does not exist; socket left root-group", group)
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-api",
                                        kwargs={"poll_interval": 0.2}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
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
