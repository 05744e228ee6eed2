"""SIMULATION: thousands of devices in one process, each doing what a device does on the wire.

A swarm device has a software key in a file (never a TPM), and the lifecycle of the
agent reduced to its wire traffic: EST enrollment with its bootstrap identity
(device_agent.est's client, in a bounded thread pool), MQTT 5 over mutual TLS with
its own operational certificate (aiomqtt: paho's protocol code driven by this
process's asyncio loop), QoS 1 telemetry with a per-device sequence number, renewal
at the agent's renewal time (simplereenroll with a fresh key, then a new connection
with the new certificate), and reconnects timed by the agent's own
``lifecycle.next_reconnect``. Unacknowledged messages are kept in memory and sent
again on the next connection (at-least-once, like the agent's outbox, without its
disk).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent._files import write_private
from device_agent.controller import jitter_draw
from device_agent.errors import ESTError, IdentityError
from device_agent.est import ESTClient
from device_agent.lifecycle import (
    Backoff,
    Hint,
    Reached,
    ReconnectPolicy,
    RenewalPolicy,
    Validity,
    full_jitter,
    next_reconnect,
    renewal_time,
)
from device_agent.mqtt import BUSY_REASONS, MOVED_REASONS, REFUSED_REASONS, reached_by
from device_agent.tls import client_context
from device_agent.tpm import build_csr
from provisioning import pki

SESSION_EXPIRY = 7 * 24 * 3600  # as the agent's link
PUBLISH_TIMEOUT = 20.0


class _Tally(logging.Handler):
    """What paho and aiomqtt log per connection (a socket error for each device in a
    broker restart storm): counted by message for the report, not printed 10,000 times."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.getMessage().partition(":")[0]] += 1


CLIENT_LOG = _Tally()
QUIET = logging.getLogger("simulator.swarm.mqtt")
QUIET.setLevel(logging.WARNING)
QUIET.addHandler(CLIENT_LOG)
QUIET.propagate = False


@dataclass(frozen=True)
class SwarmSettings:
    """Where the swarm's devices enroll and publish, and at what pace."""

    est_url: str
    broker_port: int
    server_trust: Path
    interval_s: float = 1.0
    keepalive: int = 30
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)
    renewal: RenewalPolicy = field(default_factory=RenewalPolicy)
    broker_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError("the telemetry interval must be positive")


@dataclass
class SwarmStats:
    """What the swarm did, written by the loop's thread, read by the scenario's."""

    enrolled_at: dict[str, float] = field(default_factory=dict)    # time.time()
    connected: set[str] = field(default_factory=set)
    connected_since: dict[str, float] = field(default_factory=dict)
    connects: list[float] = field(default_factory=list)             # every admission
    renewals: list[float] = field(default_factory=list)
    connect_failures: int = 0
    est_failures: int = 0
    crashed: int = 0
    loop_errors: int = 0
    failure_kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)                 # the first 20

    def failed(self, kind: str) -> None:
        """A connection attempt that was not admitted, by how far it got and why."""
        self.connect_failures += 1
        self.failure_kinds[kind] += 1

    def error(self, message: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(message)


@dataclass
class Identity:
    cert: Path
    key: Path
    certificate: x509.Certificate


class SwarmDevice:
    """One simulated device: its files, its sequence numbers and its unacknowledged messages."""

    def __init__(self, device_id: str, directory: Path, bootstrap: Identity,
                 settings: SwarmSettings, stats: SwarmStats) -> None:
        self.device_id, self.directory = device_id, directory
        self.bootstrap, self.settings, self.stats = bootstrap, settings, stats
        self.operational: Identity | None = None
        self.generation = 0
        self.last_seq = 0
        self.unacked: dict[int, bytes] = {}
        self.topic = f"devices/{device_id}/telemetry"
        self._rng = random.Random(device_id)
        self._renewed = asyncio.Event()
        self._switching = False
        self.phase = "enrolling"  # enrolling, connecting, online, leaving, waiting, stopped

    # --- EST (blocking, in the pool) -----------------------------------------------------

    def _est(self, identity: Identity, renewing: x509.Certificate | None) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = build_csr(key, self.device_id, renewing)
        context = client_context(certfile=identity.cert, keyfile=identity.key,
                                 cafile=self.settings.server_trust)
        client = ESTClient(self.settings.est_url, context)
        reply = client.simplereenroll(csr) if renewing else client.simpleenroll(csr)
        self.generation += 1
        stem = self.directory / f"op{self.generation}"
        cert = write_private(stem.with_suffix(".pem"), pki.cert_pem(*reply.certificates), 0o644)
        keyfile = write_private(stem.with_suffix(".key"), pki.key_pem(key))
        return Identity(cert, keyfile, reply.certificates[0])

    async def _est_until_done(self, pool: concurrent.futures.Executor, identity: Identity,
                              renewing: x509.Certificate | None, stop: asyncio.Event) -> Identity:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                return await loop.run_in_executor(pool, self._est, identity, renewing)
            except (ESTError, IdentityError, OSError) as exc:
                self.stats.est_failures += 1
                self.stats.error(f"{self.device_id}: EST: {exc}")
                retry_after = getattr(exc, "retry_after", None)
                wait = retry_after or full_jitter(attempt, 1.0, 30.0, self._rng)
                attempt += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
                if stop.is_set():
                    raise

    # --- the device's life ------------------------------------------------------------------

    async def run(self, pool: concurrent.futures.Executor, stop: asyncio.Event) -> None:
        try:
            self.operational = await self._est_until_done(pool, self.bootstrap, None, stop)
        except (ESTError, IdentityError, OSError):
            return  # stopped before enrolled
        self.stats.enrolled_at[self.device_id] = time.time()
        renewer = asyncio.create_task(self._renew_forever(pool, stop))
        backoff, wait = Backoff(), 0.0
        try:
            while not stop.is_set():
                if wait:
                    self.phase = "waiting"
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)
                    if stop.is_set():
                        break
                self._renewed.clear()  # this connection takes the newest certificate
                self._switching = False
                reached, hint, held = await self._connection(stop)
                backoff, wait = next_reconnect(backoff, reached, hint, self.settings.reconnect,
                                               self._rng.random(), held)
                if self._switching:  # a switch, not a loss: straight to the new certificate
                    wait = 0.0
        finally:
            self.phase = "stopped"
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    def _renew_at(self) -> float:
        assert self.operational is not None
        certificate = self.operational.certificate
        validity = Validity(certificate.not_valid_before_utc, certificate.not_valid_after_utc)
        when = renewal_time(validity, self.settings.renewal, jitter_draw(certificate.serial_number))
        return when.timestamp()

    async def _renew_forever(self, pool: concurrent.futures.Executor, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, self._renew_at() - time.time()))
            if stop.is_set():
                return
            assert self.operational is not None
            try:
                self.operational = await self._est_until_done(
                    pool, self.operational, self.operational.certificate, stop)
            except (ESTError, IdentityError, OSError):
                return
            self.stats.renewals.append(time.time())
            self._renewed.set()  # the connection ends and comes back with the new certificate

    def _client(self, identity: Identity) -> _Client:
        context = client_context(certfile=identity.cert, keyfile=identity.key,
                                 cafile=self.settings.server_trust)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY
        will = aiomqtt.Will(f"devices/{self.device_id}/status", b'{"state":"offline"}', 1, True)
        return _Client(self.settings.broker_host, self.settings.broker_port,
                              identifier=self.device_id, protocol=aiomqtt.ProtocolVersion.V5,
                              clean_start=False, properties=properties, will=will,
                              keepalive=self.settings.keepalive, tls_context=context,
                              timeout=PUBLISH_TIMEOUT, logger=QUIET)

    async def _connection(self, stop: asyncio.Event) -> tuple[Reached, Hint | None, float]:
        """One connection until it ends; how far it got, the broker's hint, seconds held."""
        assert self.operational is not None
        self.phase = "connecting"
        client = self._client(self.operational)
        admitted = 0.0
        try:
            async with client:
                admitted = time.monotonic()
                self._admitted()
                self.phase = "online"
                try:
                    await self._online(client, stop)
                finally:
                    self._gone()
                    self.phase = "leaving"
        except MqttConnectError as exc:
            self.stats.failed(f"CONNACK {exc.rc}")
            return Reached.BROKER, _hint(str(exc.rc)), 0.0
        except aiomqtt.MqttError as exc:
            if not admitted:
                cause = exc.__cause__ or exc.__context__
                # aiomqtt's wait for the CONNACK times out with asyncio's TimeoutError (an
                # OSError): TCP and TLS were done, so the broker answered, as the agent
                # judges a missed CONNACK deadline; only connect()'s own errors say less.
                waited = str(exc) == "Operation timed out"
                reached = (reached_by(cause) if isinstance(cause, OSError) and not waited
                           else Reached.BROKER)
                self.stats.failed(f"{reached.name.lower()}: {type(cause or exc).__name__}")
                return reached, None, 0.0
        finally:
            client.forget_disconnect()
        return Reached.ADMITTED, None, time.monotonic() - admitted if admitted else 0.0

    def _admitted(self) -> None:
        now = time.time()
        self.stats.connected.add(self.device_id)
        self.stats.connected_since[self.device_id] = now
        self.stats.connects.append(now)

    def _gone(self) -> None:
        self.stats.connected.discard(self.device_id)

    async def _online(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        """Publish what is unacknowledged, then one message per interval, until the
        connection drops, the certificate was renewed or the swarm stops."""
        watch = asyncio.create_task(_until_disconnected(client))
        stopping = asyncio.create_task(stop.wait())
        renewed = asyncio.create_task(self._renewed.wait())
        sending: set[asyncio.Task[None]] = set()
        try:
            await client.publish(f"devices/{self.device_id}/status", b'{"state":"online"}',
                                 qos=1, retain=True)
            for seq in sorted(self.unacked):
                sending.add(asyncio.create_task(self._send(client, seq)))
            next_at = time.monotonic() + self._rng.uniform(0, self.settings.interval_s)
            while True:
                done, _ = await asyncio.wait({watch, stopping, renewed},
                                             timeout=max(0.0, next_at - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if watch in done:
                    return
                if done:  # stopping or renewed: let what is in flight be acknowledged
                    self._switching = renewed in done
                    if sending:
                        await asyncio.wait(sending, timeout=5.0)
                    return
                sending = {t for t in sending if not t.done()}
                sending.add(asyncio.create_task(self._send(client, self._new_message())))
                next_at += self.settings.interval_s
        finally:
            for task in (watch, stopping, renewed, *sending):
                task.cancel()

    def _new_message(self) -> int:
        self.last_seq += 1
        self.unacked[self.last_seq] = json.dumps(
            {"device": self.device_id, "seq": self.last_seq, "ts": time.time(),
             "data": {"simulation": True}}).encode()
        return self.last_seq

    async def _send(self, client: aiomqtt.Client, seq: int) -> None:
        payload = self.unacked.get(seq)
        if payload is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(self.topic, payload, qos=1)
            self.unacked.pop(seq, None)  # PUBACK: the broker has it


class _Client(aiomqtt.Client):
    """aiomqtt 2.5's client with its write registration checked when it runs.

    aiomqtt defers ``add_writer`` with ``call_soon_threadsafe`` but removes readers and
    writers at once; a socket closed in between (a switch, a broker restart) then had a
    stale writer registered on its number: EBADF, or EPERM for a file that had taken
    the number, or another device's socket (seen 60 times in a 3000-device run).
    """

    def _on_socket_register_write(self, client: paho.Client, userdata: Any,
                                  sock: Any) -> None:
        fileno = sock.fileno()

        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # noqa: BLE001 - as aiomqtt: a broken connection ends it
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            current = client.socket()  # still this connection's socket, still open
            if fileno > -1 and current is not None and current is sock \
                    and current.fileno() == fileno:
                self._loop.add_writer(fileno, write)

        self._loop.call_soon_threadsafe(register)

    def forget_disconnect(self) -> None:
        """Mark the disconnection's exception as seen: the caller has judged the connection's
        end already (else asyncio logs "Future exception was never retrieved")."""
        if self._disconnected.done() and not self._disconnected.cancelled():
            self._disconnected.exception()


async def _until_disconnected(client: aiomqtt.Client) -> None:
    with contextlib.suppress(aiomqtt.MqttError):
        async for _message in client.messages:
            pass


def _hint(reason: str) -> Hint | None:
    if reason in BUSY_REASONS:
        return Hint.BUSY
    if reason in MOVED_REASONS:
        return Hint.MOVED
    return Hint.REFUSED if reason in REFUSED_REASONS else None


def bootstrap_identity(directory: Path, authority: pki.Authority, device_id: str,
                       lifetime: dt.timedelta) -> Identity:
    """A bootstrap certificate straight from the Factory CA, with a software key (the swarm
    skips the factory line: no station, no TPM, no attestation)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = authority.issue_client(device_id, key.public_key(), lifetime)
    cert = write_private(directory / "bootstrap.pem",
                         pki.cert_pem(certificate, *authority.chain[:-1]), 0o644)
    return Identity(cert, write_private(directory / "bootstrap.key", pki.key_pem(key)),
                    certificate)


async def run_swarm(devices: list[SwarmDevice], stop: asyncio.Event, est_threads: int,
                    connect_threads: int) -> None:
    """Every device at once (the enrollment storm) until ``stop`` is set; EST calls in a pool
    of ``est_threads``, blocking TLS connects in ``connect_threads``."""
    loop = asyncio.get_running_loop()
    stats = devices[0].stats if devices else SwarmStats()

    def counted(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        stats.loop_errors += 1  # aiomqtt's unretrieved disconnection futures, mostly
        stats.error(f"asyncio: {context.get('message')}: {context.get('exception')!r}")

    loop.set_exception_handler(counted)
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
        connect_threads, thread_name_prefix="connect"))
    with concurrent.futures.ThreadPoolExecutor(est_threads, thread_name_prefix="est") as pool:
        await asyncio.gather(*(_guarded(device, pool, stop) for device in devices))


async def _guarded(device: SwarmDevice, pool: concurrent.futures.Executor,
                   stop: asyncio.Event) -> None:
    """One device's failure is counted and shown, never the swarm's end."""
    try:
        await device.run(pool, stop)
    except Exception as exc:  # noqa: BLE001 - per device: logged and totalled
        device.stats.crashed += 1
        device.stats.error(f"{device.device_id}: crashed: {exc!r}")

