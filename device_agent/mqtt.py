"""The MQTT 5 link to the broker: one credential generation, reconnects with full jitter.

How long to wait before the next attempt is ``lifecycle.next_reconnect``'s decision; this
module only says how far each attempt got (nothing answered, the host refused TCP, TLS
failed, the broker closed or refused, the broker admitted us) and what the broker hinted.

paho-mqtt takes a TLS context once per client, and a rotation brings a new
certificate, so every connection attempt gets a fresh ``paho.Client`` built
from the link's context. The durable outbox is the only record of what is
unacknowledged: each new connection publishes what the outbox still holds,
and a message leaves the outbox only when the broker's PUBACK says success.
The PUBACKs read in one loop turn are deleted in one commit (one fsync, not
one per message); a crash before that commit re-sends at most those messages.
Losing a connection therefore loses nothing and duplicates at most the
messages whose PUBACK was lost (at-least-once; consumers de-duplicate on seq).
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .errors import OutboxError
from .lifecycle import Backoff, Hint, Reached, ReconnectPolicy, next_reconnect
from .tls import handshake_lock

log = logging.getLogger(__name__)

SESSION_EXPIRY = 7 * 24 * 3600
# CONNACK reasons that mean "not now": back off longer before trying again (MQTT 5 has no
# retry-after property; these reason codes are the broker's only hint).
BUSY_REASONS = {"Server busy", "Server unavailable", "Quota exceeded",
                "Connection rate exceeded"}
MOVED_REASONS = {"Use another server", "Server moved"}
REFUSED_REASONS = {"Not authorized", "Bad user name or password", "Banned",
                   "Client identifier not valid"}
# TLS alerts by which the broker refuses our certificate itself (OpenSSL's reason codes,
# the same on 3.0 and 3.5). "certificate expired" is not among them: Mosquitto sends it
# for its own expired CRL too, and expiry is the lifecycle's to judge.
CERTIFICATE_ALERTS = ("ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_REVOKED", "ALERT_UNKNOWN_CA",
                      "ALERT_CERTIFICATE_UNKNOWN", "ALERT_UNSUPPORTED_CERTIFICATE")


def certificate_alert(error: str) -> str | None:
    """The alert in a TLS error by which the peer refused our certificate, if any."""
    return next((alert for alert in CERTIFICATE_ALERTS if alert in error.upper()), None)


def reached_by(exc: OSError) -> Reached:
    """How far a connect that raised ``exc`` got: the host refusing TCP (nothing listens,
    a broker restarting) is told apart from no answer at all and from a failed handshake."""
    if isinstance(exc, ConnectionRefusedError):
        return Reached.HOST
    if isinstance(exc, ssl.SSLError | ConnectionResetError | ConnectionAbortedError
                  | BrokenPipeError):
        return Reached.LISTENER
    if isinstance(exc, TimeoutError) and "handshake" in str(exc):
        return Reached.LISTENER
    return Reached.NOTHING  # a TCP timeout, no route, no such name


class OutboxLike(Protocol):
    def pending(self, limit: int = ..., after_seq: int | None = ...) -> list[Any]: ...
    def ack_many(self, seqs: list[int]) -> int: ...
    def set_aside(self, seq: int, reason: str) -> bool: ...


@dataclass
class LinkStats:
    """Counters for status output; updated from the link's thread."""

    connects: int = 0
    connect_failures: int = 0
    published: int = 0
    acked: int = 0
    refused_publishes: int = 0
    set_aside: int = 0
    last_error: str = ""
    last_connack: str = ""
    connected_since: float | None = None
    reached: str = ""  # how far the last attempt got
    attempts: list[float] = field(default_factory=list)  # wall times of the last 10 attempts
    history: list[str] = field(default_factory=list)

    def attempt(self) -> None:
        self.attempts = (self.attempts + [time.time()])[-10:]

    def error(self, message: str) -> None:
        self.last_error = message
        self.history = (self.history + [f"{time.strftime('%H:%M:%S')} {message}"])[-10:]


CommandHandler = Callable[[str, bytes], dict[str, Any]]


class MQTTLink:
    """Keeps one device connected with one TLS context until stopped."""

    def __init__(self, *, device_id: str, host: str, port: int, keepalive: int,
                 context: ssl.SSLContext, outbox: OutboxLike, inflight: int,
                 on_command: CommandHandler, status: Callable[[], dict[str, Any]],
                 on_refused: Callable[[str], None] | None = None,
                 reconnect_window: float = 2.0, reconnect_max: float = 10.0,
                 rng: random.Random | None = None) -> None:
        self.device_id = device_id
        self.host, self.port, self.keepalive = host, port, keepalive
        self.context = context
        self.outbox = outbox
        self.inflight_limit = inflight
        self.on_command = on_command
        self.status = status
        self.on_refused = on_refused
        self.policy = ReconnectPolicy(window=reconnect_window, cap=reconnect_max)
        self._rng = rng or random.Random()
        self.stats = LinkStats()
        self.connected = threading.Event()
        self.credential_refusal: str | None = None  # why the broker refused our credential
        self._stop = threading.Event()
        self._reached = Reached.NOTHING  # how far the current attempt got
        self._hint: Hint | None = None  # what the broker said about coming back
        self._connack_failed = False
        self._admitted_at = float("inf")  # monotonic time of the last CONNACK success
        self._socket_error = ""
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq
        self._acked: list[int] = []  # PUBACKed this loop turn, still in the outbox
        self._ack_error_logged = float("-inf")
        self._published_up_to = 0
        self._client: paho.Client | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def topic_base(self) -> str:
        return f"devices/{self.device_id}"

    def start(self) -> MQTTLink:
        self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: float = 0.0) -> None:
        """Wait up to ``drain`` seconds for in-flight messages, say offline, disconnect."""
        deadline = time.monotonic() + drain
        while drain and self.connected.is_set() and time.monotonic() < deadline:
            with self._lock:
                if not self._inflight and not self.outbox.pending(1, self._published_up_to):
                    break
            self._stop.wait(0.05)  # not time.sleep: EINVAL under libfaketime (issue #426)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def _status_payload(self, state: str) -> bytes:
        return json.dumps({"state": state, "ts": time.time(), **self.status()}).encode()

    def _new_client(self) -> paho.Client:
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.device_id,
                             protocol=paho.MQTTv5)
        client.tls_set_context(self.context)
        client.max_inflight_messages_set(self.inflight_limit)
        client.will_set(f"{self.topic_base}/status", json.dumps({"state": "offline"}), qos=1,
                        retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_log
        self._socket_error = ""
        return client

    def alive(self) -> bool:
        """The link's thread is running (connected, or retrying with backoff)."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            self._reached, self._hint, self._connack_failed = Reached.NOTHING, None, False
            try:
                self._connect_once()
            except Exception as exc:  # noqa: BLE001 - the link must outlive any one failure
                log.exception("MQTT link failed; starting a new connection")
                self.stats.error(f"link failed: {exc!r}")
                self._lost()
            if self._stop.is_set():
                break
            reached, hint = self._reached, self._hint
            self.stats.reached = reached.name.lower()
            held = time.monotonic() - self._admitted_at
            backoff, wait = next_reconnect(backoff, reached, hint, self.policy,
                                           self._rng.random(), held)
            log.info("reconnecting in %.2fs (last attempt: %s%s)", wait, reached.name.lower(),
                     f", {hint.value}" if hint else "")
            self._stop.wait(wait)

    def _connect_once(self) -> None:
        """One connection, kept until it ends; how far it got is left in ``_reached`` and
        what the broker hinted in ``_hint``."""
        client = self._new_client()
        self._client = client
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY
        self.stats.attempt()
        try:
            with handshake_lock:
                client.connect(self.host, self.port, self.keepalive, clean_start=False,
                               properties=properties)
        except OSError as exc:  # ssl.SSLError is one
            self.stats.connect_failures += 1
            self._reached = reached_by(exc)
            alert = certificate_alert(str(exc))
            if alert is not None:
                self.credential_refusal, self._hint = alert, Hint.REFUSED
            self.stats.error(f"connect to {self.host}:{self.port} failed: {exc}")
            log.warning("MQTT connect to %s:%d failed: %s", self.host, self.port, exc)
            return
        self._reached = Reached.BROKER  # TCP and TLS done: the broker is up
        connack_deadline = time.monotonic() + self.keepalive
        try:
            while not self._stop.is_set() and client.socket() is not None:
                client.loop(timeout=0.1)
                self._commit_acks()
                if self.connected.is_set():
                    self._pump(client)
                elif self._connack_failed or time.monotonic() > connack_deadline:
                    break
            if self._stop.is_set() and self.connected.is_set():
                info = client.publish(f"{self.topic_base}/status",
                                      self._status_payload("offline"), qos=1, retain=True)
                deadline = time.monotonic() + 2
                while not info.is_published() and time.monotonic() < deadline:
                    client.loop(timeout=0.05)
                client.disconnect()
                client.loop(timeout=0.1)
        except (OSError, ssl.SSLError) as exc:
            self.stats.error(f"connection lost: {exc}")
        finally:
            self._commit_acks()
            self._lost()
            if client.socket() is not None:
                client.disconnect()
        if self._reached is not Reached.ADMITTED and not self._stop.is_set():
            self.stats.connect_failures += 1
            alert = certificate_alert(self._socket_error)
            if alert is not None:
                self.credential_refusal, self._hint = alert, Hint.REFUSED
            if not self._connack_failed:
                reason = self._socket_error or "connection closed before CONNACK"
                self.stats.error(f"broker did not admit us: {reason}")
                log.warning("broker did not admit us: %s", reason)

    def _lost(self) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self.stats.connected_since = None
        with self._lock:
            self._inflight.clear()
            self._published_up_to = 0
        if was_connected:
            log.info("MQTT connection closed")

    def _commit_acks(self) -> None:
        """Delete the messages PUBACKed since the last call from the outbox, in one commit.

        If the outbox cannot write (a full disk), the acknowledged messages stay queued
        and are retried at the next turn: at worst sent again after a reconnect.
        """
        if self._acked:
            seqs, self._acked = self._acked, []
            try:
                self.outbox.ack_many(seqs)
            except OutboxError as exc:
                self._acked = seqs + self._acked
                now = time.monotonic()
                if now >= self._ack_error_logged + 60:
                    self._ack_error_logged = now
                    self.stats.error(f"acknowledged messages not yet removed: {exc}")
                    log.warning("outbox cannot record acknowledgements yet: %s", exc)
                return
            self.stats.acked += len(seqs)

    def _pump(self, client: paho.Client) -> None:
        with self._lock:
            room = self.inflight_limit - len(self._inflight)
            if room <= 0:
                return
            batch = self.outbox.pending(room, self._published_up_to)
            for message in batch:
                topic = f"{self.topic_base}/{message.topic_suffix}"
                try:
                    info = client.publish(topic, message.payload, qos=1)
                except ValueError as exc:  # paho: a topic or payload MQTT cannot carry
                    self.outbox.set_aside(message.seq, str(exc))
                    self.stats.set_aside += 1
                    self._published_up_to = message.seq
                    continue
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    break
                self._inflight[info.mid] = message.seq
                self._published_up_to = message.seq
                self.stats.published += 1

    # paho callbacks, on the link's thread

    def _on_log(self, _client: paho.Client, _userdata: object, level: int, message: str) -> None:
        """paho reports socket and TLS failures (such as the peer's alert) only here."""
        if level == paho.MQTT_LOG_ERR:
            self._socket_error = message
            log.debug("paho: %s", message)

    def _on_connect(self, client: paho.Client, _userdata: object, _flags: object,
                    reason: ReasonCode, properties: Properties | None) -> None:
        self.stats.last_connack = str(reason)
        if reason.is_failure:
            self.stats.error(f"broker refused the connection: {reason}")
            log.warning("broker refused the connection: %s", reason)
            name = str(reason)
            if name in BUSY_REASONS:
                self._hint = Hint.BUSY
            elif name in MOVED_REASONS:
                reference = getattr(properties, "ServerReference", None)
                if reference:
                    host, _, port = reference.partition(":")
                    log.warning("broker asks us to use %s", reference)
                    self.host, self.port = host, int(port or self.port)
                self._hint = Hint.MOVED
            elif name in REFUSED_REASONS:
                self._hint = Hint.REFUSED
                self.credential_refusal = name
                if self.on_refused:
                    self.on_refused(name)
            self._connack_failed = True  # other reasons give no hint: the capped backoff
            return
        self._reached = Reached.ADMITTED
        self._admitted_at = time.monotonic()
        self.credential_refusal = None
        self.stats.connects += 1
        self.stats.connected_since = time.time()
        client.publish(f"{self.topic_base}/status", self._status_payload("online"), qos=1,
                       retain=True)
        client.subscribe(f"{self.topic_base}/commands/#", qos=1)
        self.connected.set()
        log.info("MQTT connected to %s:%d", self.host, self.port)

    def _on_disconnect(self, _client: paho.Client, _userdata: object, _flags: object,
                       reason: ReasonCode, _properties: Properties | None) -> None:
        if reason.is_failure:
            self.stats.error(f"disconnected: {reason}")
            log.warning("MQTT disconnected: %s", reason)

    def _on_publish(self, _client: paho.Client, _userdata: object, mid: int,
                    reason: ReasonCode, _properties: Properties | None) -> None:
        with self._lock:
            seq = self._inflight.pop(mid, None)
        if seq is None:
            return
        if reason.is_failure:
            self.stats.refused_publishes += 1
            self.stats.error(f"broker refused message seq {seq}: {reason}")
            log.error("broker refused message seq %d: %s; kept in the outbox", seq, reason)
            return
        self._acked.append(seq)  # committed by _commit_acks after this loop turn

    def _on_message(self, client: paho.Client, _userdata: object,
                    message: paho.MQTTMessage) -> None:
        prefix = f"{self.topic_base}/commands/"
        if not message.topic.startswith(prefix):
            return
        command = message.topic[len(prefix):]
        try:
            answer = self.on_command(command, bytes(message.payload))
        except Exception as exc:  # noqa: BLE001 - a failing command must not kill the link
            log.exception("command %s failed", command)
            answer = {"ok": False, "error": str(exc)}
        properties = message.properties
        response_topic = getattr(properties, "ResponseTopic", None)
        if not response_topic:
            return
        reply = Properties(PacketTypes.PUBLISH)
        correlation = getattr(properties, "CorrelationData", None)
        if correlation is not None:
            reply.CorrelationData = correlation
        client.publish(response_topic, json.dumps(answer).encode(), qos=1, properties=reply)
