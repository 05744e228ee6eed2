"""The daemon: wires credentials, the MQTT link, the outbox and systemd together.

One main loop makes every decision (renew, switch, roll back, ping the
watchdog); slow work runs beside it so the loop keeps turning: enrollment,
renewal and every EST exchange in a credential job, a short-lived process of
its own (credential_job.py), watched by a thread; the broker connection on the
link's thread, the local API on its own.

The daemon never loads ``tpm2_pytss`` or ``cryptography`` (issue 15: its memory):
TLS signs with the TPM key through OpenSSL's tpm2 provider, certificates are
known by the facts their job wrote beside them, and the watchdog asks the TPM
for random bytes through the same provider.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import queue
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import job_process
from .committer import Committer
from .config import AgentConfig, render_toml
from .controller import (
    Activate,
    Clock,
    Commit,
    Controller,
    Credential,
    Decision,
    Failed,
    Issued,
    LinkView,
    Reconnect,
    Refused,
    Report,
    Result,
    RollBack,
    Settings,
    Start,
    TimeTold,
    Work,
)
from .credentials import CertificateFacts, CredentialStore, Generation
from .errors import ConfigError, IdentityError, OutboxCorruptError, OutboxError, TPMError
from .health import Health, job_tpm_error, write_textfile
from .keystore import check_key_file, is_file_keystore, keystore_kind, probe
from .lifecycle import RenewalPolicy, clock_plausible
from .localapi import LocalAPI
from .metrics import system_metrics
from .mqtt import MQTTLink
from .outbox import Outbox
from .status import write_status
from .systemd import Notifier
from .tls import active_provider, bind_provider_tcti, client_context, releasing

log = logging.getLogger(__name__)

TICK = 0.2
STATUS_EVERY = 2.0
SWITCH_TIMEOUT = 60.0
DRAIN_SECONDS = 5.0
WORKER_GRACE = 5.0  # seconds a stopping agent waits for an EST exchange in flight


RESTART_ONLY = ("device", "paths", "outbox", "api")  # a reload cannot apply these
EXPIRY_RECHECK = 600.0  # seconds before the EST server's clock is asked again


def raise_file_limit(wanted: int = 8192) -> None:
    """Room for the local API's clients: systemd's default soft limit is 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def settings_of(config: AgentConfig) -> Settings:
    return Settings(policy=RenewalPolicy(config.renewal.fraction, config.renewal.jitter),
                    retry_max=config.renewal.retry_max,
                    has_recovery_listener=bool(config.est.recovery_url),
                    switch_timeout=SWITCH_TIMEOUT, expiry_recheck=EXPIRY_RECHECK)


def credential_of(generation: Generation, via: Work | None = None) -> Credential:
    facts = generation.facts()
    return Credential(generation.number, facts.serial, facts.not_before, facts.not_after, via)


def result_of(work: Work, output: str, returncode: int | None,
              staged: Callable[[int], Generation | None]) -> tuple[Result, Generation | None]:
    """A credential job's answer (its last stdout line) as the controller's result, and the
    generation it staged."""
    lines = output.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
        if not isinstance(answer, dict):
            raise ValueError(f"no answer line: {answer!r}")
        outcome = answer["outcome"]
        if outcome == "issued":
            generation = staged(int(answer["generation"]))
            if generation is None or not generation.complete():
                return Failed(work, f"the credential job staged generation "
                                    f"{answer['generation']}, which is not complete"), None
            return Issued(work, credential_of(generation, work)), generation
        if outcome == "refused":
            return Refused(work, int(answer["status"]), str(answer["reason"]),
                           answer.get("retry_after")), None
        if outcome == "time":
            when = answer["server_now"]
            return TimeTold(work, dt.datetime.fromisoformat(when) if when else None), None
        return Failed(work, str(answer["error"]), answer.get("retry_after")), None
    except (ValueError, KeyError, TypeError, IdentityError) as exc:
        return Failed(work, f"the credential job gave no usable answer (exit {returncode}): "
                            f"{exc}"), None


class Agent:
    def __init__(self, config_path: Path,
                 standby: subprocess.Popen[str] | None = None) -> None:
        """``standby``: a credential job started ahead (job_process.ahead_of_first_boot),
        which takes the first work the controller asks for."""
        self.config_path = config_path
        self._standby = standby
        self.config = AgentConfig.load(config_path)
        self.stop = threading.Event()
        self.reload_requested = threading.Event()
        self.renew_requested = threading.Event()
        self.controller = Controller(settings_of(self.config), Clock(
            lambda: dt.datetime.now(dt.UTC),
            lambda: time.clock_gettime(time.CLOCK_BOOTTIME)))  # counts a suspend, too
        self.errors: collections.deque[str] = collections.deque(maxlen=10)
        self.health = Health()  # counters for status.json and the metrics textfile
        self.notifier = Notifier()
        self.link: MQTTLink | None = None
        self.generation: Generation | None = None
        self._worker: threading.Thread | None = None
        self._job: subprocess.Popen[str] | None = None
        self._check_time = True
        self._results: queue.Queue[Result] = queue.Queue()
        self._wake = threading.Event()  # set when a credential job has answered
        self._staged: dict[int, Generation] = {}  # issued, not yet made current
        self._next: dict[str, float] = {}

    # --- running ---------------------------------------------------------------------

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop())
        signal.signal(signal.SIGINT, lambda *_: self._request_stop())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())
        raise_file_limit()
        state_dir = self._usable_paths()
        if not is_file_keystore(self.config.device.tcti):
            bind_provider_tcti(self.config.device.tcti)  # before any thread starts
        else:
            log.warning("SIMULATION ONLY: keys are software keys in plain files (%s), "
                        "not in a TPM; never use this on a real device", self.config.device.tcti)
        with self._open_outbox() as outbox, \
                Committer(outbox) as committer:  # closed after the API, before the outbox
            self.outbox, self.committer = outbox, committer
            self.store = CredentialStore(state_dir)
            api = self._start_api()
            try:
                self._start(self.store.repair())
                self.notifier.ready()
                while not self.stop.is_set():
                    self._wake.clear()
                    self._tick()
                    self._wake.wait(TICK)  # a job's answer is taken at once, not next tick
            finally:
                self._shutdown(api)
        return 0

    def _request_stop(self) -> None:
        self.stop.set()
        self._wake.set()

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
        return LocalAPI(self.config.api.socket, self.committer.submit, self.config.api.group,
                        self.config.api.max_payload)

    def _start(self, current: Generation | None) -> None:
        while current is not None:
            try:
                self._use(current)
            except IdentityError as exc:
                if isinstance(exc, TPMError):
                    self.health.tpm_error()
                kept = self.store.quarantine(current)
                self._error(f"credential generation {current.number} unusable ({exc}); "
                            f"kept as {kept.name}")
                current = self.store.current()
                continue
            break
        previous = self.store.previous() if current is not None else None
        self._carry_out(self.controller.start(
            credential_of(current) if current else None,
            credential_of(previous) if previous is not None and previous.complete() else None))

    def _shutdown(self, api: LocalAPI | None) -> None:
        self.notifier.stopping()
        if api is not None:
            api.close()
        if self.link is not None:
            self.link.stop(drain=DRAIN_SECONDS)
        if self._standby is not None:
            job_process.dismiss(self._standby)
            self._standby = None
        worker, job = self._worker, self._job
        if worker is not None and job is not None:  # it ends its retries and answers
            if job.poll() is None:
                job.terminate()
            worker.join(WORKER_GRACE)
            if worker.is_alive():
                log.warning("credential job %s still running at exit; killed", worker.name)
                job.kill()
        self._write_status(final=True)
        log.info("stopped; %d message(s) left in the outbox", self.outbox.depth())

    def publish(self, topic_suffix: str, data: dict[str, Any]) -> int:
        return self.committer.put(topic_suffix, data).seq  # the API's group commit, too

    # --- the loop ----------------------------------------------------------------------

    def _due(self, name: str, every: float) -> bool:
        now = time.monotonic()
        if now < self._next.get(name, 0.0):
            return False
        self._next[name] = now + every
        return True

    def _tick(self) -> None:
        self._collect_worker()
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self._reload()
        if self.renew_requested.is_set():
            self.renew_requested.clear()
            self.controller.request_renewal()
        self._carry_out(self.controller.tick(self._link_view()))
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

    def _link_view(self) -> LinkView:
        link = self.link
        if link is None:
            return LinkView()
        error = link.stats.last_error
        return LinkView(connected=link.connected.is_set(), refusal=link.credential_refusal,
                        peer_says_expired="certificate expired" in error.lower(),
                        last_error=error)

    def _carry_out(self, decisions: list[Decision]) -> None:
        """The controller decided; this does it."""
        self._check_time = self.controller.system_clock_ok
        for decision in decisions:
            if isinstance(decision, Report):
                if decision.error:
                    self._error(decision.message)
                else:
                    log.warning("%s", decision.message)
            elif isinstance(decision, Start):
                self._spawn(decision.work)
            elif isinstance(decision, Activate):
                generation = self._staged.pop(decision.credential.number)
                self.store.activate(generation)
                self._use(generation)
            elif isinstance(decision, Commit):
                self.store.commit()
                log.info("credential generation %d confirmed by the broker",
                         self.generation.number if self.generation else -1)
            elif isinstance(decision, RollBack):
                self._use(self.store.rollback())
            elif isinstance(decision, Reconnect) and self.generation is not None:
                self._use(self.generation)  # contexts built for the clock we now have

    def _spawn(self, work: Work) -> None:
        """Start ``work`` as a credential job (or hand it to the one started ahead); a
        thread waits for its answer."""
        generation = None
        if work in (Work.RENEW, Work.RECOVER):
            assert self.generation is not None, "the controller renews only what it has"
            generation = self.generation.number
        # what runs, even if the file changed since
        order = job_process.order(work.value, generation, self._check_time, self.config_path,
                                  render_toml(self.config))
        standby, self._standby = self._standby, None

        def run() -> None:
            try:
                job = self._job = standby or job_process.start()
                output, _ = job.communicate(order)
            except OSError as exc:
                self._results.put(Failed(work, f"cannot start the credential job: {exc}"))
                self._wake.set()
                return
            if job_tpm_error(output):
                self.health.tpm_error()
            result, generation = result_of(work, output, job.returncode, self.store.generation)
            if generation is not None:
                self._staged[generation.number] = generation
            self._results.put(result)
            self._wake.set()

        self._worker = threading.Thread(target=run, name=work.value, daemon=True)
        self._worker.start()

    def _collect_worker(self) -> None:
        try:
            outcome = self._results.get_nowait()
        except queue.Empty:
            return
        self._worker = self._job = None
        if isinstance(outcome, Issued):
            self.health.job_done(outcome.work.value, "issued")
        elif isinstance(outcome, Refused):
            self.health.job_done(outcome.work.value, "refused",
                                 f"{outcome.status} {outcome.reason}")
        elif isinstance(outcome, Failed):
            self.health.job_done(outcome.work.value, "failed", outcome.error)
        self._carry_out(self.controller.result(outcome))

    def _use(self, generation: Generation) -> None:
        """Connect with ``generation``; the link of the previous one is closed first."""
        check_key_file(generation.key_path, self.config.device.tcti)
        facts = generation.facts()
        context = client_context(certfile=generation.cert_path, keyfile=generation.key_path,
                                 cafile=self.config.paths.server_trust,
                                 tcti=self.config.device.tcti,
                                 check_time=clock_plausible(dt.datetime.now(dt.UTC)))
        if self.link is not None:
            self.link.stop(drain=1.0)
            self.health.link_closed(self.link.stats.connects)
            with releasing():
                self.link = None
        self.generation = generation
        self._facts: CertificateFacts | None = facts
        mqtt = self.config.mqtt
        self.link = MQTTLink(
            device_id=self.config.device.id, host=mqtt.host, port=mqtt.port,
            keepalive=mqtt.keepalive, context=context, outbox=self.outbox,
            inflight=self.config.outbox.inflight, on_command=self.command,
            status=self._public_status,
            reconnect_window=mqtt.reconnect_window, reconnect_max=mqtt.reconnect_max,
        ).start()

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
            self.config = config  # all of it, or (above) none; credential jobs get it too
            self.controller.settings = settings_of(config)
            log.info("configuration reloaded from %s", self.config_path)
            if changed and self.generation is not None:
                self._use(self.generation)
        self.notifier.ready()

    # --- health, status, commands --------------------------------------------------------

    def _healthy(self) -> bool:
        """The loop turned (we are in it), the TPM answers, the credential is usable."""
        try:
            probe(self.config.device.tcti)
        except IdentityError as exc:
            if isinstance(exc, TPMError):
                self.health.tpm_error()
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
        facts = getattr(self, "_facts", None)
        return {"generation": self.generation.number if self.generation else None,
                "cert_not_after": facts.not_after.isoformat() if facts else None}

    def status(self) -> dict[str, Any]:
        facts: CertificateFacts | None = getattr(self, "_facts", None)
        link = self.link
        provider = active_provider()
        controller = self.controller
        renew_at = controller.renew_at()
        return {
            "device_id": self.config.device.id,
            "state": controller.phase.value,
            "why": controller.why,
            "generation": self.generation.number if self.generation else None,
            "cert_serial": f"{facts.serial:x}" if facts else None,
            "key_sha256": facts.key_sha256 if facts else None,
            "cert_not_after": facts.not_after.isoformat() if facts else None,
            "cert_expires_in_s": round((facts.not_after - controller.now()).total_seconds(), 1)
            if facts else None,
            "renew_at": renew_at.isoformat() if renew_at else None,
            "connected": bool(link and link.connected.is_set()),
            "broker": f"{self.config.mqtt.host}:{self.config.mqtt.port}",
            "link": link.stats.__dict__ if link else None,
            "outbox_depth": self.outbox.depth(),
            "outbox_dropped": self.outbox.dropped(),
            "outbox_set_aside": self.outbox.set_aside_count(),
            "last_seq": self.outbox.last_seq(),
            "keystore": keystore_kind(self.config.device.tcti),
            "tpm2_openssl": provider.version if provider else None,
            "time_source": controller.time_source.value,
            "clock_offset_s": controller.offset.total_seconds()
            if controller.offset is not None else None,
            "errors": list(self.errors),
            **self.health.fields(link.stats.connects if link else 0),
        }

    def _write_status(self, final: bool = False) -> None:
        status = self.status()
        try:
            write_status(self.config.paths.state_dir, status)
        except IdentityError as exc:  # a full disk must not stop the agent
            self._error_now_and_then("status", f"status not written: {exc}")
        metrics = self.config.metrics
        if metrics.textfile is not None and (self._due("textfile", metrics.interval) or final):
            try:
                write_textfile(metrics.textfile, {**status, "updated": time.time()})
            except IdentityError as exc:
                self._error_now_and_then("textfile", f"metrics textfile not written: {exc}")
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
