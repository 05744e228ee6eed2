"""``fleet-sim``: N real TPM-backed devices against the real back office, on 127.0.0.1.

Everything is the real program: a PKI and registry, the est-server with its
recovery listener, Mosquitto rendered by broker_config, and per device a swtpm
behind its own tpm2-abrmd, provisioned by the factory code and running the
real ``device-agent``. An independent monitor (mosquitto_sub as the back end)
counts every device's sequence numbers. All of it is stopped at the end, also
on Ctrl-C or SIGTERM.

With TPMs, the scenarios attest keys (issue 16; ``FleetOptions.key_attestation``,
which the soak's own options leave off): each swtpm is manufactured with EK
certificates by one simulated TPM maker (swtpm_localca), the factory trusts that
maker's root, and the EST server runs with ``key_attestation = "required"``, so
every certificate it issues is for a key proven to be in the device's TPM; the
report says how many were.

``--keystore file`` is the scale mode: the same agent and factory code with
``tcti = "file:<device>/keys"`` (device_agent.filekeys, SIMULATION ONLY:
software keys in files), no swtpm or tpm2-abrmd, so N is bounded by the broker,
the EST server and the machine rather than by software TPMs. Its report says
``"mode": "file"`` and ``"key_attestation": "off"``: file keys cannot be attested.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from broker_config.deploy import render_broker
from device_agent._files import write_private
from device_agent.config import AgentConfig, render_toml
from provisioning import pki
from provisioning.factory import LineSettings, LocalFactoryCA, provision
from provisioning.registry import registrar

from .device import AgentProcess
from .est import running_est_server
from .manufacturer import Manufacturer
from .observe import Sampler, TimedMonitor
from .processes import (
    ComponentError,
    DBusSession,
    Mosquitto,
    SoftwareTPM,
    free_port,
    require_library,
)

BACKEND_ID = "backend"
MAX_FILE_DEVICES = 10_000
BIN = Path(sys.executable).parent
FAKETIME = "faketime/libfaketime.so.1"
REAL_TIME = "+0"  # libfaketime: an offset of nothing


@dataclasses.dataclass(frozen=True)
class FleetOptions:
    devices: int
    lifetime_s: int = 30          # operational certificates: renewals every ~2/3 of this
    interval_s: float = 1.0       # telemetry period per device
    recovery_grace: str = "1h"
    keystore: str = "tpm"         # "file": software keys, simulation only
    crl_lifetime_s: int | None = None  # the Device CA's CRL; None: the PKI's default (days)
    recoveries_per_day: int = 100
    bootstrap_reenrolls_per_day: int = 3
    faketime: bool = False        # each agent's clock read from a file (libfaketime)
    key_attestation: str = "off"  # or "optional", "required": manufactured TPMs, attesting line

    def __post_init__(self) -> None:
        if self.key_attestation not in ("off", "optional", "required"):
            raise ValueError("key_attestation must be off, optional or required")
        if self.keystore == "file":
            if self.key_attestation != "off":
                raise ValueError("file-backed keys cannot be attested: key_attestation is off")
            if not 1 <= self.devices <= MAX_FILE_DEVICES:
                raise ValueError(f"--devices must be 1-{MAX_FILE_DEVICES} with file-backed keys")
        elif not 1 <= self.devices <= 500:
            raise ValueError("--devices must be 1-500 with TPM-backed devices")
        if self.lifetime_s < 10:
            raise ValueError("--lifetime must be at least 10 seconds")


def step(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Fleet(contextlib.ExitStack):
    """The whole stack; ``close()`` (or leaving the ``with``) stops every process."""

    def __init__(self, directory: Path, options: FleetOptions) -> None:
        super().__init__()
        self.directory, self.options = directory, options
        self.agents: dict[str, AgentProcess] = {}
        self.started_wall: dict[str, float] = {}
        self.events: list[tuple[float, str]] = []
        self.t0 = time.monotonic()
        self.sampler: Sampler | None = None

    def __enter__(self) -> Fleet:
        super().__enter__()
        try:
            self._back_office()
            self._devices()
        except BaseException:
            self.close()
            raise
        return self

    # --- start-up ------------------------------------------------------------------------

    def _back_office(self) -> None:
        started = time.monotonic()
        self.bus = self.enter_context(DBusSession(self.directory / "dbus"))
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = self.bus.address  # the factory's TPM access
        self.pki = self._init_pki(self.directory / "pki")
        self.authority = pki.read_authority(self.pki.device_ca)
        self.est = self.enter_context(running_est_server(
            self.directory / "est", self.pki, recovery=True, registry=self.pki.registry,
            certificate_lifetime=f"{self.options.lifetime_s}s",
            recovery_grace=self.options.recovery_grace,
            recoveries_per_day=self.options.recoveries_per_day,
            bootstrap_reenrolls_per_day=self.options.bootstrap_reenrolls_per_day,
            key_attestation=self.options.key_attestation))
        # The broker drops to the mosquitto user, which must traverse to its directory.
        parent = Path(tempfile.mkdtemp(prefix="fleet-broker-"))
        self.callback(shutil.rmtree, parent, ignore_errors=True)
        parent.chmod(0o755)  # noqa: S103 - holds only the broker's own directory
        self.callback(_keep_copy, parent / "mosquitto.log", self.directory / "mosquitto.log")
        port = free_port()
        self.broker_layout = render_broker(self.pki, parent / "broker", port=port,
                                           backend_identity=BACKEND_ID, **self.broker_limits())
        self.broker = self.enter_context(Mosquitto(parent, self.broker_layout.conf, port))
        self.backend = cert, key = self._backend_files()
        self.monitor = self._start_monitor(port, cert, key)
        step(f"back office up in {time.monotonic() - started:.1f}s: est-server :{self.est.port} "
             f"(recovery :{self.est.recovery_port}, {self.options.lifetime_s}s certificates, "
             f"key attestation {self.options.key_attestation}), mosquitto :{port}, "
             "monitor subscribed")

    def broker_limits(self) -> dict[str, Any]:
        """Extra ``render_broker`` settings (the swarm's back-end workers and queue)."""
        return {}

    def _start_monitor(self, port: int, cert: Path, key: Path) -> TimedMonitor:
        """The independent subscriber (the swarm adds more, sharing one subscription)."""
        return self.enter_context(TimedMonitor(port=port, cafile=self.pki.server_trust,
                                               cert=cert, key=key))

    def _init_pki(self, directory: Path) -> pki.PKIPaths:
        """The operator's PKI: CAs, the registry beside them, the first CRL published by
        ``device-pki crl`` (with the CRL lifetime the PKI keeps, when one is given)."""
        lifetime = self.options.crl_lifetime_s
        paths = pki.init_pki(directory, crl_lifetime=None if lifetime is None
                             else dt.timedelta(seconds=lifetime))
        device_pki("crl", "--pki", str(paths.base))
        return paths

    def _backend_files(self, name: str = BACKEND_ID) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.authority.issue_client(name, key.public_key(), dt.timedelta(days=1))
        directory = self.directory / "backend"
        directory.mkdir(exist_ok=True)
        return (write_private(directory / f"{name}.pem",
                              pki.cert_pem(cert, *self.authority.chain[:-1]), 0o644),
                write_private(directory / f"{name}.key", pki.key_pem(key)))

    def _devices(self) -> None:
        started = time.monotonic()
        factory = LocalFactoryCA(self.pki)
        register = registrar(self.est.registry_path)
        attesting = self.options.key_attestation != "off"
        maker = Manufacturer(self.directory / "manufacturer", "fleet-sim") if attesting else None
        for device_id in device_ids(self.options.devices):
            directory = self.directory / "devices" / device_id
            if self.options.keystore == "file":
                tcti, env = f"file:{directory / 'keys'}", {}
            else:
                tpm = self.enter_context(SoftwareTPM(directory / "tpm", self.bus, device_id,
                                                     max_transients=3, manufacturer=maker))
                tcti, env = tpm.tcti, dict(tpm.env)
            line = LineSettings(est_url=self.est.base_url, recovery_url=self.est.recovery_url,
                                broker_host="127.0.0.1", broker_port=self.broker.port,
                                server_trust=self.pki.server_trust,
                                state_dir=directory / "state", api_socket=directory / "api.sock",
                                manufacturer_roots=(maker.root,) if maker else (),
                                manufacturer_intermediates=(maker.issuer,) if maker else ())
            provision(device_id, tcti, directory / "etc", factory, line, register)
            config_path = self._tune(directory / "etc" / "agent.toml")
            if self.options.faketime:
                env.update(self._fake_clock(directory))
            self.agents[device_id] = AgentProcess(config_path, env)
        self.callback(self.stop_agents, list(self.agents))  # before the TPMs go
        keys = ("file-backed keys (SIMULATION ONLY, no TPM, no key attestation)"
                if self.options.keystore == "file" else "its own swtpm + tpm2-abrmd")
        if maker is not None:
            keys += (", the TPM manufactured with EK certificates and an attestation key "
                     "certified by the Factory CA")
        step(f"{len(self.agents)} devices provisioned by the factory code, each with {keys}, "
             f"in {time.monotonic() - started:.1f}s")

    def _fake_clock(self, directory: Path) -> dict[str, str]:
        """libfaketime reading the device's time from ``clock`` (re-read every second),
        which starts as the real time: :meth:`set_clock` moves it."""
        set_clock(directory / "clock", REAL_TIME)
        return {"LD_PRELOAD": require_library(FAKETIME),
                "FAKETIME_TIMESTAMP_FILE": str(directory / "clock"),
                "FAKETIME_CACHE_DURATION": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}

    def clock_file(self, device_id: str) -> Path:
        return self.directory / "devices" / device_id / "clock"

    def _tune(self, path: Path) -> Path:
        """The factory's agent.toml with simulation-speed knobs only (keepalive, telemetry
        period, retry cap); where a device enrolls, recovers and publishes is the factory's."""
        config = AgentConfig.load(path)
        config = dataclasses.replace(
            config,
            mqtt=dataclasses.replace(config.mqtt, keepalive=10,
                                     telemetry_interval=self.options.interval_s),
            renewal=dataclasses.replace(config.renewal, retry_max=4.0))
        path.write_text(render_toml(config))
        return path

    # --- the running fleet ---------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, label: str) -> None:
        self.events.append((self.now(), label))
        step(label)

    def start_sampling(self) -> None:
        self.t0 = time.monotonic()
        self.sampler = self.enter_context(Sampler(self.t0, self.connected_count,
                                                  lambda: self.monitor.received))

    def start_agents(self, ids: Iterable[str]) -> None:
        for device_id in ids:
            self.started_wall[device_id] = time.time()
            self.agents[device_id].start()

    def stop_agents(self, ids: Sequence[str], timeout: float = 20.0) -> None:
        """SIGTERM them all at once (each drains its outbox), then reap each."""
        running = [self.agents[i] for i in ids if self.agents[i].running()]
        for agent in running:
            assert agent.process is not None
            agent.process.send_signal(signal.SIGTERM)
        for agent in running:
            agent.stop(timeout)

    def status(self, device_id: str) -> dict[str, Any]:
        return self.agents[device_id].status()

    def connected_count(self) -> int:
        statuses = [self.status(i) for i in self.agents]
        return sum(1 for s in statuses if s.get("running") and s.get("connected"))

    def wait_all(self, ids: Iterable[str], condition: Callable[[str, dict[str, Any]], bool],
                 timeout: float) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Poll until ``condition(id, status)`` holds for each; (statuses met, ids that never)."""
        waiting, met = set(ids), {}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            for device_id in sorted(waiting):
                status = self.status(device_id)
                if status.get("running") and condition(device_id, status):
                    met[device_id] = status
                    waiting.discard(device_id)
            time.sleep(0.2)
        return met, sorted(waiting)

    def revoke(self, ids: Sequence[str], command: str = "revoke-device") -> float:
        """``device-pki revoke-device`` (or ``decommission``) for each, on this broker.

        The shipped command suspends the device, revokes every unexpired operational
        certificate (a renewal may have just replaced the one its status showed),
        publishes the CRL and bans and kicks the device on the broker, so neither
        renewal nor the bootstrap brings it back. Returns the seconds taken.
        """
        started = time.monotonic()
        for device_id in ids:
            extra = ["--reason", "keyCompromise"] if command == "revoke-device" else []
            device_pki(command, device_id, *extra, "--broker", str(self.broker_layout.base),
                       "--pki", str(self.pki.base))
        return time.monotonic() - started


def _keep_copy(source: Path, target: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.copyfile(source, target)


def device_ids(count: int) -> tuple[str, ...]:
    return tuple(f"sim-{index + 1:03d}" for index in range(count))


def device_pki(*argv: str) -> str:
    """Run the operator's ``device-pki`` command; its output, or an error with it."""
    result = subprocess.run([str(BIN / "device-pki"), *argv], capture_output=True, text=True,
                            timeout=120, check=False)
    if result.returncode != 0:
        raise ComponentError(f"device-pki {' '.join(argv)}: exit {result.returncode}: "
                             f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def set_clock(timestamp_file: Path, setting: str) -> None:
    """Replace the file whole: libfaketime never reads a half-written setting."""
    partial = timestamp_file.with_suffix(".partial")
    partial.write_text(setting + "\n")
    os.replace(partial, timestamp_file)


def parser() -> argparse.ArgumentParser:
    from .scenarios import SCENARIOS

    top = argparse.ArgumentParser(prog="fleet-sim", description=__doc__.splitlines()[0])
    top.add_argument("--devices", type=int, help="real device-agent processes (or --swarm)")
    top.add_argument("--swarm", type=int, metavar="N",
                     help="SIMULATION: N devices in this one process (asyncio, file keys, "
                          "no agent processes), scenarios steady and broker-restart")
    top.add_argument("--monitors", type=int, default=4,
                     help="swarm: back-end subscribers sharing the telemetry subscription")
    top.add_argument("--reconnect-window", type=float, default=None,
                     help="swarm: the agents' [mqtt] reconnect_window (default: the agent's)")
    top.add_argument("--scenario", required=True, choices=sorted([*SCENARIOS, "soak"]),
                     help="soak: seeded random faults over --duration, then a verdict")
    top.add_argument("--duration", type=float, default=None,
                     help="soak: seconds of faults and settling (default 600); "
                          "swarm: seconds of steady telemetry (default 20)")
    top.add_argument("--seed", type=int, help="soak: the fault schedule's seed (default: random)")
    top.add_argument("--json", type=Path, help="write the report as JSON here")
    top.add_argument("--plot", type=Path, help="write a PNG plot here")
    top.add_argument("--keystore", choices=("tpm", "file"), default="tpm",
                     help="file: software keys in files, SIMULATION ONLY, for large N "
                          f"(up to {MAX_FILE_DEVICES}; tpm: up to 500)")
    top.add_argument("--lifetime", type=int, default=None,
                     help="certificate lifetime in seconds (default: 30, more for large N)")
    top.add_argument("--interval", type=float, default=1.0, help="telemetry period (s)")
    top.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    return top


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_in_work_directory(prefix: str, keep: bool, body: Callable[[Path], bool], *,
                          refusals: tuple[type[Exception], ...] = ()) -> int:
    """The run wrapper of every fleet-sim mode; the exit code.

    ``body`` runs in a new work directory and says whether the run passed: 0 if it
    did, 1 if not, 2 for one of ``refusals`` (said as ``fleet-sim: ...``), 130 on
    Ctrl-C or SIGTERM (``body`` has stopped what it started by then). The directory
    is kept with ``keep`` or when the run did not pass, and removed otherwise.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    ok = False
    try:
        ok = body(directory)
        return 0 if ok else 1
    except refusals as exc:
        print(f"fleet-sim: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        step("interrupted: every process stopped")
        return 130
    finally:
        if keep or not ok:
            step(f"work directory kept: {directory}")
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(directory, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    from .report import build_report, print_table, write_json, write_plot
    from .scenarios import run

    args = parser().parse_args(argv)
    if args.swarm is not None:
        from .swarm_run import main_swarm

        return main_swarm(args)
    if args.devices is None:
        parser().error("--devices or --swarm is required")
    if args.scenario == "soak":
        if args.duration is None:
            args.duration = 600.0
        return _soak(args)
    try:
        options = FleetOptions(args.devices, args.lifetime or max(30, 10 + args.devices),
                               args.interval, keystore=args.keystore,
                               key_attestation="required" if args.keystore == "tpm" else "off")
    except ValueError as exc:
        print(f"fleet-sim: {exc}", file=sys.stderr)
        return 2

    def scenario(directory: Path) -> bool:
        with Fleet(directory, options) as fleet:
            findings = run(fleet, args.scenario)
            report = build_report(fleet, findings, args.scenario, mode=args.keystore)
        print_table(report)
        if args.json:
            write_json(report, args.json)
        if args.plot:
            write_plot(fleet, report, args.plot)
        return not report["failures"]

    return run_in_work_directory("fleet-sim-", args.keep, scenario)


def _soak(args: argparse.Namespace) -> int:
    from .soak_run import main_soak

    return run_in_work_directory("fleet-soak-", args.keep,
                                 lambda directory: main_soak(args, directory),
                                 refusals=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
