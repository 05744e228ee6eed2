"""A short-lived admin session with Mosquitto's dynamic security plugin.

Commands go to ``$CONTROL/dynamic-security/v1`` as JSON; the plugin answers on
``.../response`` to every subscriber, so answers are matched by correlation
data. paho's errors and return codes stop here and become ``BrokerConfigError``.
"""

from __future__ import annotations

import json
import queue
import ssl
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from .errors import BrokerConfigError
from .mosquitto import DYNSEC_TOPIC


@dataclass(frozen=True)
class AdminCredentials:
    """The admin identity (file key) and the anchor for the broker's server certificate."""

    host: str
    port: int
    cert: Path
    key: Path
    server_trust: Path


@dataclass(frozen=True)
class Reply:
    command: str
    error: str | None
    data: dict[str, Any] | None = None


class DynSecSession:
    """One connected admin client; use ``admin_session`` to open it."""

    def __init__(self, client: mqtt.Client, replies: queue.Queue[dict[str, Any]]) -> None:
        self._client = client
        self._replies = replies

    def run(self, commands: Sequence[dict[str, Any]], timeout: float = 5.0) -> list[Reply]:
        """Send ``commands`` in one message and return the plugin's reply to each."""
        tag = uuid.uuid4().hex
        tagged = [{**c, "correlationData": f"{tag}-{i}"} for i, c in enumerate(commands)]
        info = self._client.publish(DYNSEC_TOPIC, json.dumps({"commands": tagged}), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerConfigError(f"dynsec publish failed: {mqtt.error_string(info.rc)}")
        wanted = {c["correlationData"]: c["command"] for c in tagged}
        found: dict[str, Reply] = {}
        while len(found) < len(wanted):
            try:
                message = self._replies.get(timeout=timeout)
            except queue.Empty:
                raise BrokerConfigError(f"no dynsec answer within {timeout}s") from None
            for answer in message.get("responses", []):
                key = answer.get("correlationData")
                if key in wanted:
                    found[key] = Reply(wanted[key], answer.get("error"), answer.get("data"))
        return [found[c["correlationData"]] for c in tagged]


def _tls_context(creds: AdminCredentials) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(creds.server_trust))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(creds.cert), str(creds.key))
    return context


@contextmanager
def admin_session(creds: AdminCredentials, client_id: str, timeout: float = 5.0
                  ) -> Iterator[DynSecSession]:
    """Connect as the admin, subscribe to the plugin's answers, disconnect on exit."""
    replies: queue.Queue[dict[str, Any]] = queue.Queue()
    ready: queue.Queue[str] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    client.tls_set_context(_tls_context(creds))

    def on_connect(c: mqtt.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            ready.put(f"connect refused: {reason}")
        else:
            c.subscribe(f"{DYNSEC_TOPIC}/response", qos=0)

    def on_subscribe(_c: mqtt.Client, _u: object, _m: object, reasons: list[Any],
                     _p: object) -> None:
        ready.put("" if not reasons[0].is_failure else f"subscribe refused: {reasons[0]}")

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        try:
            replies.put(json.loads(message.payload))
        except ValueError:
            pass

    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_message = on_message
    try:
        client.connect(creds.host, creds.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerConfigError(f"admin cannot reach {creds.host}:{creds.port}: {exc}") from exc
    client.loop_start()
    try:
        try:
            problem = ready.get(timeout=timeout)
        except queue.Empty:
            raise BrokerConfigError(f"admin session not ready within {timeout}s") from None
        if problem:
            raise BrokerConfigError(f"admin session: {problem}")
        yield DynSecSession(client, replies)
    finally:
        client.disconnect()
        client.loop_stop()
