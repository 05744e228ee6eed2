"""The daemon: wires TPM, credentials, EST, the MQTT link, the outbox and systemd together.

One main loop makes every decision (renew, switch, roll back, ping the
watchdog); slow work runs beside it so the loop keeps turning: enrollment
and renewal on a worker thread (EST round trips, retries with backoff), the
broker connection on the link's thread, the local API on its own.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import logging
import queue
import resource
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .config import AgentConfig
from .credentials import CredentialStore, Generation
from .enroll import Enroller
from .errors import ConfigError, ESTError, IdentityError, OutboxCorruptError, OutboxError
from .keystore import is_file_keystore, keystore_kind, open_keystore, read_key
from .lifecycle import (
    Action,
    RenewalPolicy,
    State,
    SwitchVerdict,
    Validity,
    clock_plausible,
    decide,
    full_jitter,
    judge_switch,
    renewal_time,
)
from .localapi import LocalAPI
from .metrics import system_metrics
from .mqtt import MQTTLink
from .outbox import Outbox
from .status import write_status
from .systemd import Notifier
from .tls import active_provider, client_context, releasing

log = logging.getLogger(__name__)

TICK = 0.2
STATUS_EVERY = 2.0
SWITCH_TIMEOUT = 60.0
DRAIN_SECONDS = 5.0
WORKER_GRACE = 5.0  # seconds a stopping agent waits for an EST exchange in flight


def _key_fingerprint(certificate: x509.Certificate) -> str:
    der = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


RESTART_ONLY = ("device", "paths", "outbox", "api")  # a reload cannot apply these
EXPIRY_RECHECK = 600.0  # seconds before the EST server's clock is asked again


@dataclass(frozen=True)
class ExpiryCheck:
    """The EST server's time, asked because the broker said our certificate had expired."""

    serial: int
    server_now: dt.datetime


def raise_file_limit(wanted: int = 8192) -> None:
    """Room for the local API's clients: systemd's default soft limit is 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def jitter_draw(serial: int) -> float:
    """A per-certificate draw in [0, 1): stable across restarts, spread across a fleet."""
    return (serial % 10_007) / 10_007


class Agent:
    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = AgentConfig.load(config_path)
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.renew_requested = threading.Event()
        self.state = State.BOOTSTRAPPED
        self.errors: collections.deque[str] = collections.deque(maxlen=10)
        self.notifier = Notifier()
        self.link: MQTTLink | None = None
        self.generation: Generation | None = None
        self._worker: threading.Thread | None = None
        self._results: queue.Queue[tuple[str, object]] = queue.Queue()
        self._clock_offset: dt.timedelta | None = None
        self._bootstrap_fallback = False
        self._renew_instead = False  # the recovery listener said "not expired"
        self._expiry_verdict: tuple[int, bool, float] | None = None  # serial, expired, when
        self._retry_at = 0.0
        self._failures = 0
        self._switch_deadline: float | None = None
        self._next: dict[str, float] = {}

    # --- running ---------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        raise_file_limit()
        state_dir = self._usable_paths()
        if is_file_keystore(self.config.device.tcti):
            log.warning("SIMULATION ONLY: keys are software keys in plain files (%s), "
                        "not in a TPM; never use this on a real device", self.config.device.tcti)
        with open_keystore(self.config.device.tcti) as tpm, self._open_outbox() as outbox:
            self.tpm, self.outbox = tpm, outbox
            self.store = CredentialStore(state_dir)
            self.enroller = Enroller(self.config, tpm, self.store, self.stop)
            api = self._start_api()
            try:
                self._start(self.store.repair())
                self.notifier.ready()
                while not self.stop.is_set():
                    self._tick()
                    self.stop.wait(TICK)
            finally:
                self._shutdown(api)
        return 0

    def _usable_paths(self) -> Path:
        """The state directory, made if missing; a path problem is a named, final error."""
        paths, source = self.config.paths, self.config.source
        if not paths.server_trust.is_file():
            raise ConfigError(f"{source}: [paths] server_trust: {paths.server_trust} is not a "
                              "readable file")
        try:
            paths.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"{source}: [paths] state_dir: {paths.state_dir}: "
                              f"{exc.strerror}") from exc
        return paths.state_dir

    def _open_outbox(self) -> Outbox:
        path = self.config.paths.state_dir / "outbox.db"

        def open_outbox() -> Outbox:
            return Outbox(path, self.config.device.id, self.config.outbox.max_messages,
                          self.config.outbox.drop_policy)

        try:
            return open_outbox()
        except OutboxCorruptError as exc:
            kept = Outbox.quarantine(path)
            self._error(f"outbox database corrupt ({exc}); kept as {kept.name}, started afresh")
            return open_outbox()

    def _start_api(self) -> LocalAPI | None:
        if self.config.api.socket is None:
            return None
        return LocalAPI(self.config.api.socket, self.publish, self.config.api.group,
                        self.config.api.max_payload)

    def _start(self, current: Generation | None) -> None:
        while current is not None:
            try:
                self._use(current)
            except IdentityError as exc:
                kept = self.store.quarantine(current)
                self._error(f"credential generation {current.number} unusable ({exc}); "
                            f"kept as {kept.name}")
                current = self.store.current()
                continue
            if self.store.previous() is not None:
                self._switch_deadline = time.monotonic() + SWITCH_TIMEOUT
            return
        self.state = State.ENROLLING  # the loop enrolls once it has judged the clock

    def _shutdown(self, api: LocalAPI | None) -> None:
        self.notifier.stopping()
        if api is not None:
            api.close()
        if self.link is not None:
            self.link.stop(drain=DRAIN_SECONDS)
        worker = self._worker
        if worker is not None:  # the TPM closes after this: not under a renewal in flight
            worker.join(WORKER_GRACE)
            if worker.is_alive():
                log.warning("%s still running at exit", worker.name)
        self._write_status()
        log.info("stopped; %d message(s) left in the outbox", self.outbox.depth())

    def publish(self, topic_suffix: str, data: dict[str, Any]) -> int:
        return self.outbox.put(topic_suffix, data).seq

    # --- the loop ----------------------------------------------------------------------

    def _due(self, name: str, every: float) -> bool:
        now = time.monotonic()
        if now < self._next.get(name, 0.0):
            return False
        self._next[name] = now + every
        return True

    def _tick(self) -> None:
        self._collect_worker()
        self._confirm_or_roll_back()
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self._reload()
        self._consider_renewal()
        interval = self.config.mqtt.telemetry_interval
        if interval and self.generation is not None and self._due("telemetry", interval):
            self._store_telemetry()
        watchdog = self.notifier.watchdog_interval
        if watchdog and self._due("watchdog", watchdog / 3):
            if self._healthy():
                self.notifier.watchdog()
        if self._due("status", STATUS_EVERY):
            self._write_status()

    def _store_telemetry(self) -> None:
        try:
            self.publish("telemetry", {"system": system_metrics()})
        except OutboxError as exc:  # full (the outbox counted the drop), or no space left
            self._error_now_and_then("telemetry", f"telemetry not stored: {exc}")

    def _error_now_and_then(self, kind: str, message: str) -> None:
        """An error that may repeat every tick is logged once a minute."""
        if self._due(f"error:{kind}", 60.0):
            self._error(message)

    def _spawn(self, work: Callable[[], object], name: str) -> None:
        def run() -> None:
            try:
                self._results.put((name, work()))
            except BaseException as exc:  # noqa: BLE001 - handed to the loop, which decides
                self._results.put((name, exc))

        self._worker = threading.Thread(target=run, name=name, daemon=True)
        self._worker.start()

    def _collect_worker(self) -> None:
        try:
            name, result = self._results.get_nowait()
        except queue.Empty:
            return
        self._worker = None
        if isinstance(result, ExpiryCheck):
            self._judge_expiry(result)
            return
        if isinstance(result, dt.datetime):
            self._clock_offset = result - dt.datetime.now(dt.UTC)
            log.warning("local clock is off by %s; using the EST server's time",
                        self._clock_offset)
            if self.generation is not None:
                self._use(self.generation)  # contexts built for the clock we now have
            return
        if isinstance(result, Generation):
            self._failures = 0
            if name in ("recovery", "bootstrap"):
                log.info("recovered through %s", name)
            self._bootstrap_fallback = self._renew_instead = False
            self.store.activate(result)
            self._use(result)
            self._switch_deadline = time.monotonic() + SWITCH_TIMEOUT
            return
        if name == "recovery" and isinstance(result, ESTError) and result.status == 401:
            # the listener does not take this certificate (it says: not expired): renew it
            self._renew_instead = True
            self._retry_at = 0.0
            self._error(f"recovery refused ({result.reason or result}); "
                        "renewing on simplereenroll instead")
            return
        if (name == "recovery" or (name == "renew" and self._renew_instead)) and \
                isinstance(result, ESTError) and result.status in (401, 403):
            self._bootstrap_fallback = True  # past the grace window: the bootstrap path decides
            self._renew_instead = False
            self._retry_at = 0.0
            self._error(f"{name} refused ({result.reason or result}); "
                        "falling back to the bootstrap certificate")
            return
        self._failures += 1
        hint = getattr(result, "retry_after", None) or 0.0
        delay = max(full_jitter(self._failures, 2.0, self.config.renewal.retry_max), hint)
        self._retry_at = time.monotonic() + delay
        self._error(f"{self.state.value} failed: {result}; next attempt in {delay:.0f}s")
        if isinstance(result, BaseException) and not isinstance(result, IdentityError):
            log.error("unexpected failure", exc_info=result)

    def _use(self, generation: Generation) -> None:
        """Connect with ``generation``; the link of the previous one is closed first."""
        # a clear error for a damaged key file, before OpenSSL's
        read_key(generation.key_path, self.config.device.tcti)
        context = client_context(certfile=generation.cert_path, keyfile=generation.key_path,
                                 cafile=self.config.paths.server_trust,
                                 tcti=self.config.device.tcti,
                                 check_time=clock_plausible(dt.datetime.now(dt.UTC)))
        if self.link is not None:
            self.link.stop(drain=1.0)
            with releasing():
                self.link = None
        self.generation = generation
        self._certificate = generation.certificate()
        mqtt = self.config.mqtt
        self.link = MQTTLink(
            device_id=self.config.device.id, host=mqtt.host, port=mqtt.port,
            keepalive=mqtt.keepalive, context=context, outbox=self.outbox,
            inflight=self.config.outbox.inflight, on_command=self.command,
            status=self._public_status,
        ).start()
        self.state = State.OPERATIONAL

    def _confirm_or_roll_back(self) -> None:
        if self._switch_deadline is None or self.link is None:
            return
        previous = self.store.previous()
        verdict = judge_switch(self.link.connected.is_set(), self.link.credential_refusal,
                               previous is not None and self._still_valid(previous))
        number = self.generation.number if self.generation else -1
        if verdict is SwitchVerdict.CONFIRMED:
            self._switch_deadline = None
            self.store.commit()
            log.info("credential generation %d confirmed by the broker", number)
        elif verdict is SwitchVerdict.ROLL_BACK:
            self._switch_deadline = None
            self._error(f"the broker refused credential generation {number} "
                        f"({self.link.credential_refusal}); rolling back")
            self._use(self.store.rollback())
        elif verdict is SwitchVerdict.STAY:
            self._switch_deadline = None
            self._error(f"the broker refused credential generation {number} "
                        f"({self.link.credential_refusal}) and no valid one precedes it")
        elif time.monotonic() > self._switch_deadline:
            self._switch_deadline = time.monotonic() + SWITCH_TIMEOUT
            self._error(f"credential generation {number} not confirmed yet, the broker is away "
                        f"({self.link.stats.last_error or 'no answer'}); keeping it")

    def _still_valid(self, generation: Generation) -> bool:
        """Complete, and not expired by our time: worth rolling back to."""
        try:
            return generation.complete() and \
                self._now() < generation.certificate().not_valid_after_utc
        except IdentityError:
            return False

    def _now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + (self._clock_offset or dt.timedelta())

    def _system_clock_ok(self) -> bool:
        """Whether the system clock (which OpenSSL also uses) can be believed."""
        cert = getattr(self, "_certificate", None)
        validity = Validity(cert.not_valid_before_utc, cert.not_valid_after_utc) if cert else None
        return clock_plausible(dt.datetime.now(dt.UTC), validity)

    def _peer_says_expired(self) -> bool:
        link = self.link
        return bool(link and not link.connected.is_set()
                    and "certificate expired" in link.stats.last_error.lower())

    def _consider_renewal(self) -> None:
        if self._worker is not None or time.monotonic() < self._retry_at:
            return
        system_ok = self._system_clock_ok()
        self.enroller.check_time = system_ok
        if system_ok and self._clock_offset is not None:
            log.warning("the system clock is plausible again; no longer using the EST "
                        "server's time (it was %s off)", self._clock_offset)
            self._clock_offset = None
            if self.generation is not None:
                self._use(self.generation)  # TLS date checks back on
            return
        if not system_ok and self._clock_offset is None:
            self._spawn(self.enroller.server_time, "clock")
            return
        if self.generation is None:
            if self.state is State.ENROLLING:
                self._spawn(lambda: self.enroller.enroll(), "enroll")
            return
        validity = Validity(self._certificate.not_valid_before_utc,
                            self._certificate.not_valid_after_utc)
        action = decide(validity, self._now(), self._policy(),
                        jitter_draw(self._certificate.serial_number))
        if action is Action.NONE and self._peer_says_expired():
            serial = self._certificate.serial_number
            verdict = self._expiry_verdict
            if verdict is None or verdict[0] != serial or \
                    time.monotonic() - verdict[2] > EXPIRY_RECHECK:
                # our clock says valid, the broker says expired: ask the EST server's clock
                self._spawn(lambda: ExpiryCheck(serial, self.enroller.server_time()),
                            "expiry-check")
                return
            if verdict[1]:
                action = Action.RECOVER
        if self.renew_requested.is_set():
            self.renew_requested.clear()
            action = Action.RENEW if action is Action.NONE else action
        if action is Action.RECOVER and self._renew_instead and not self._bootstrap_fallback:
            action = Action.RENEW  # the recovery listener said "not expired"
        if action is Action.RENEW:
            self.state = State.RENEWING
            current = self.generation
            self._spawn(lambda: self.enroller.renew(current, attempts=1), "renew")
        elif action is Action.RECOVER:
            self.state = State.RECOVERING
            expired = self.generation
            if self.config.est.recovery_url and not self._bootstrap_fallback:
                self._spawn(lambda: self.enroller.recover(expired, attempts=1), "recovery")
            else:
                self._spawn(lambda: self.enroller.enroll(attempts=1), "bootstrap")

    def _judge_expiry(self, check: ExpiryCheck) -> None:
        """The broker's "certificate expired" against the EST server's clock."""
        cert = self._certificate
        if check.serial != cert.serial_number:
            return  # asked about a certificate we no longer use
        expired = check.server_now >= cert.not_valid_after_utc
        self._expiry_verdict = (check.serial, expired, time.monotonic())
        if not expired:
            self._error(f"the broker reports our certificate expired, but it is valid until "
                        f"{cert.not_valid_after_utc.isoformat()} by the EST server's clock too "
                        f"({check.server_now.isoformat()}): the broker's CRL may have expired; "
                        "not recovering")

    def _policy(self) -> RenewalPolicy:
        return RenewalPolicy(self.config.renewal.fraction, self.config.renewal.jitter)

    def _reload(self) -> None:
        self.notifier.reloading()
        try:
            config = AgentConfig.load(self.config_path)
        except IdentityError as exc:
            self._error(f"reload refused, keeping the running configuration: {exc}")
        else:
            fixed = [name for name in RESTART_ONLY
                     if getattr(config, name) != getattr(self.config, name)]
            if fixed:
                self._error("reload refused, keeping the running configuration: "
                            f"{', '.join(f'[{n}]' for n in fixed)} change only with a restart")
                self.notifier.ready()
                return
            changed = config.mqtt != self.config.mqtt
            if config.mqtt.telemetry_interval != self.config.mqtt.telemetry_interval:
                self._next.pop("telemetry", None)  # not on the old interval's schedule
            self.config = self.enroller.config = config  # all of it, or (above) none
            log.info("configuration reloaded from %s", self.config_path)
            if changed and self.generation is not None:
                self._use(self.generation)
        self.notifier.ready()

    # --- health, status, commands --------------------------------------------------------

    def _healthy(self) -> bool:
        """The loop turned (we are in it), the TPM answers, the credential is usable."""
        try:
            self.tpm.ping()
        except IdentityError as exc:
            self._error(f"watchdog withheld: {exc}")
            return False
        if self.generation is not None and not self.generation.complete():
            self._error("watchdog withheld: credential files missing")
            return False
        if self.link is not None and not self.link.alive():
            self._error("watchdog withheld: the MQTT link's thread has stopped")
            return False
        return True

    def _error(self, message: str) -> None:
        log.error("%s", message)
        self.errors.append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}")

    def _public_status(self) -> dict[str, Any]:
        cert = getattr(self, "_certificate", None)
        return {"generation": self.generation.number if self.generation else None,
                "cert_not_after": cert.not_valid_after_utc.isoformat() if cert else None}

    def status(self) -> dict[str, Any]:
        cert = getattr(self, "_certificate", None)
        link = self.link
        provider = active_provider()
        renew_at = None
        if cert is not None:
            renew_at = renewal_time(Validity(cert.not_valid_before_utc, cert.not_valid_after_utc),
                                    self._policy(), jitter_draw(cert.serial_number)).isoformat()
        return {
            "device_id": self.config.device.id,
            "state": self.state.value,
            "generation": self.generation.number if self.generation else None,
            "cert_serial": f"{cert.serial_number:x}" if cert else None,
            "key_sha256": _key_fingerprint(cert) if cert else None,
            "cert_not_after": cert.not_valid_after_utc.isoformat() if cert else None,
            "renew_at": renew_at,
            "connected": bool(link and link.connected.is_set()),
            "broker": f"{self.config.mqtt.host}:{self.config.mqtt.port}",
            "link": link.stats.__dict__ if link else None,
            "outbox_depth": self.outbox.depth(),
            "outbox_dropped": self.outbox.dropped(),
            "outbox_set_aside": self.outbox.set_aside_count(),
            "last_seq": self.outbox.last_seq(),
            "keystore": keystore_kind(self.config.device.tcti),
            "tpm2_openssl": provider.version if provider else None,
            "clock_offset_s": self._clock_offset.total_seconds()
            if self._clock_offset is not None else None,
            "errors": list(self.errors),
        }

    def _write_status(self) -> None:
        status = self.status()
        try:
            write_status(self.config.paths.state_dir, status)
        except IdentityError as exc:  # a full disk must not stop the agent
            self._error_now_and_then("status", f"status not written: {exc}")
        connected = "connected" if status["connected"] else "not connected"
        self.notifier.status(f"{status['state']}, {connected}, outbox {status['outbox_depth']}")

    def command(self, name: str, payload: bytes) -> dict[str, Any]:
        if name == "ping":
            return {"ok": True, "pong": time.time()}
        if name == "status":
            return {"ok": True, "status": self.status()}
        if name == "renew-now":
            self.renew_requested.set()
            return {"ok": True, "accepted": "renew"}
        return {"ok": False, "error": f"unknown command {name!r}"}
