"""The shipped package and unit under a real systemd, as a device maker installs them.

A fresh Debian root ($DIST, else this machine's release) is booted with systemd as PID 1; the
device-agent .deb from ``make deb`` is installed with apt; swtpm behind the Debian
tpm2-abrmd service stands in for the device's TPM chip; the device is provisioned
inside the container with the shipped ``device-provision`` against a back office on
this machine (PKI, est-server, Mosquitto as ``broker-config`` renders it, and an
independent subscriber). The tests run in order on one booted device; each step
records the unit's state and the journal lines that prove it in a transcript
(build/systemd-transcript-DIST.txt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from device_agent._files import write_private
from provisioning import pki
from simulator.est import ESTServer, running_est_server
from simulator.monitor import TelemetryMonitor
from simulator.processes import free_port_pair
from tests.conftest import BACKEND_ID, rendered_broker
from tests.conftest import issue_file_client as backend_client

from .booted import RELEASES, REPO, BootedRoot, fresh_root, run_in_root, target_release

DEVICE = "sysd-1"
CONFIG = "/etc/device-agent/agent.toml"
UNIT = "device-agent.service"
def transcript_path() -> Path:
    return REPO / "build" / f"systemd-transcript-{target_release()}.txt"


def agent_deb(dist: str) -> Path:
    """The package for ``dist``: a virtualenv is tied to that release's python3."""
    found = sorted((REPO / "dist").glob(f"device-agent_*~deb{RELEASES[dist]}_*.deb"))
    assert found, (f"no device-agent .deb for {dist} in dist/: make deb on {dist}, or "
                   f"make test-fresh DIST={dist} (which builds it there)")
    return found[-1]


@dataclass
class Device:
    box: BootedRoot
    monitor: TelemetryMonitor
    est: ESTServer
    root: Path
    lines: list[str] = field(default_factory=list)
    journal_seen: int = 0

    def record(self, step: str, journal_grep: tuple[str, ...] = ()) -> dict[str, str]:
        state = self.unit()
        self.lines.append(f"== {step}: ActiveState={state['ActiveState']} "
                          f"SubState={state['SubState']} MainPID={state['MainPID']} "
                          f"NRestarts={state['NRestarts']} Result={state['Result']}")
        journal = self.box.journal(UNIT).splitlines()
        new, self.journal_seen = journal[self.journal_seen:], len(journal)
        self.lines += [f"   {line}" for line in new if any(word in line for word in journal_grep)]
        return state

    def unit(self) -> dict[str, str]:
        return self.box.unit(UNIT, "ActiveState", "SubState", "MainPID", "NRestarts", "Result",
                             "StatusText")

    def wait_unit(self, check: Callable[[dict[str, str]], bool], timeout: float,
                  what: str) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        state = self.unit()
        while time.monotonic() < deadline:
            state = self.unit()
            if check(state):
                return state
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {timeout:.0f} s; unit: {state}\n"
                             f"{self.box.journal(UNIT)[-3000:]}")

    def publish(self, count: int, tag: str) -> list[int]:
        """``count`` messages through the agent's local API; their sequence numbers."""
        out = self.box.sh("sh", "-c", f'for i in $(seq {count}); do device-agent publish '
                          f'--config {CONFIG} --data "{{\\"{tag}\\": $i}}" || exit 1; done')
        return [int(json.loads(line)["seq"]) for line in out.splitlines() if line.strip()]

    def write_config(self, text: str) -> None:
        """As an operator edits it: same owner, group and mode as the factory wrote."""
        path = self.root / CONFIG.lstrip("/")
        stat = path.stat()
        write_private(path, text.encode(), 0o640)
        os.chown(path, stat.st_uid, stat.st_gid)

    def delivered(self, seqs: list[int], timeout: float = 30) -> bool:
        return self.monitor.wait_until(lambda: set(seqs) <= set(self.monitor.seqs(DEVICE)),
                                       timeout)


def install_tpm_services(root: Path, port: int) -> None:
    """swtpm as the chip, the Debian tpm2-abrmd service in front of it (system bus)."""
    units = root / "etc/systemd/system"
    (units / "swtpm.service").write_text(f"""[Unit]
Description=Software TPM standing in for the device's TPM chip
Before=tpm2-abrmd.service
[Service]
ExecStart=/usr/bin/swtpm socket --tpm2 --server type=tcp,port={port},bindaddr=127.0.0.1 \
--ctrl type=tcp,port={port + 1},bindaddr=127.0.0.1 --flags not-need-init,startup-clear \
--tpmstate dir=/var/lib/swtpm-test
StateDirectory=swtpm-test
[Install]
WantedBy=multi-user.target
""")
    # The Debian unit requires dev-tpm0.device (a chip); with swtpm it is replaced whole,
    # as its own comment says to, keeping everything else.
    (units / "tpm2-abrmd.service").write_text(f"""[Unit]
Description=TPM2 Access Broker and Resource Management Daemon (on swtpm)
Requires=swtpm.service
After=swtpm.service
[Service]
Type=dbus
BusName=com.intel.tss2.Tabrmd
ExecStart=/usr/sbin/tpm2-abrmd --tcti=swtpm:host=127.0.0.1,port={port} --max-transients=3
User=tss
[Install]
WantedBy=multi-user.target
""")
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    for name in ("swtpm.service", "tpm2-abrmd.service"):
        (wants / name).unlink(missing_ok=True)
        (wants / name).symlink_to(f"/etc/systemd/system/{name}")


@pytest.fixture(scope="module")
def device() -> Iterator[Device]:
    dist = target_release()
    deb = agent_deb(dist)
    work = Path(tempfile.mkdtemp(prefix="systemd-unit-", dir="/var/tmp"))
    work.chmod(0o755)
    lines = [f"release: {dist}; package: {deb.name}"]
    try:
        root = fresh_root(dist, work / "roots")
        shutil.copy(deb, root / "root" / deb.name)  # nspawn mounts a tmpfs on /tmp
        run_in_root(root, "sh", "-c", "apt-get update -qq && apt-get install -y -qq "
                    f"--no-install-recommends systemd-sysv dbus swtpm tpm2-abrmd "
                    f"/root/{deb.name} >/dev/null")
        lines.append(f"apt install ./{deb.name}: "
                     + run_in_root(root, "dpkg-query", "-W", "-f=${Status} ${Version}",
                                   "device-agent"))
        install_tpm_services(root, free_port_pair())

        office = work / "backoffice"
        paths = pki.init_pki(office / "pki")
        backend = backend_client(office / "backend", pki.read_authority(paths.device_ca),
                                 BACKEND_ID)
        with rendered_broker(paths) as broker, \
                running_est_server(office / "est", paths) as est, \
                TelemetryMonitor(port=broker.port, cafile=paths.server_trust,
                                 cert=backend.cert, key=backend.key) as monitor, \
                BootedRoot(root, work / "boot.log", {office: "/backoffice"}) as box:
            box.sh("systemctl", "start", "tpm2-abrmd.service", check=False)
            state = box.unit("tpm2-abrmd.service", "ActiveState")["ActiveState"]
            assert state == "active", box.sh("journalctl", "--no-pager", "-u", "swtpm",
                                             "-u", "tpm2-abrmd", check=False)[-3000:]
            summary = box.sh(
                "device-provision", "--pki", "/backoffice/pki",
                "--registry", "/backoffice/est/registry.sqlite3",
                "--est-url", est.base_url, "--broker", f"127.0.0.1:{broker.port}",
                "--device-id", DEVICE, "--tcti", "tabrmd:bus_type=system",
                "--out", "/etc/device-agent")
            lines.append(f"device-provision: {json.loads(summary)['device_id']} provisioned")
            lines.append("  " + box.sh("stat", "-c", "%A %U:%G %n", "/etc/device-agent",
                                       "/etc/device-agent/bootstrap.tss", CONFIG)
                         .replace("\n", "\n  ").rstrip())
            result = Device(box, monitor, est, root, lines)
            yield result
    finally:
        transcript = transcript_path()
        transcript.parent.mkdir(exist_ok=True)
        transcript.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        if not os.environ.get("KEEP_ROOT"):
            shutil.rmtree(work, ignore_errors=True)


def test_the_provisioned_agent_starts_ready_and_its_telemetry_arrives(device: Device) -> None:
    device.box.sh("systemctl", "start", UNIT)  # Type=notify: returns once READY=1 arrived
    state = device.record("systemctl start", ("Started", "enrolled", "connected"))
    assert (state["ActiveState"], state["SubState"]) == ("active", "running")
    journal = device.box.journal(UNIT)
    # the factory's modes are the unit's: no permission error, no mode warning (systemd 257)
    assert "Permission denied" not in journal and "mode is different" not in journal, journal
    assert device.delivered(device.publish(3, "start"))
    device.lines.append(f"   monitor: {len(device.monitor.seqs(DEVICE))} message(s) from "
                        f"{DEVICE}")


def test_reload_applies_a_valid_config_and_keeps_the_running_one_if_invalid(
    device: Device,
) -> None:
    before = device.unit()
    # edited as an operator would, as text: the installed agent may be another version
    factory_written = (device.root / CONFIG.lstrip("/")).read_text()
    good = re.sub(r"(?m)^telemetry_interval = .*$", "telemetry_interval = 1.0", factory_written)
    assert good != factory_written
    device.write_config(good)
    device.box.sh("systemctl", "reload", UNIT)
    seen = len(device.monitor.seqs(DEVICE))
    # the new interval took effect: ticks every second without any publish of ours
    assert device.monitor.wait_until(lambda: len(device.monitor.seqs(DEVICE)) >= seen + 4, 20)
    state = device.record("systemctl reload (valid: telemetry_interval 60 -> 1)", ("eload",))
    assert (state["ActiveState"], state["MainPID"]) == ("active", before["MainPID"])

    device.write_config(good + "\n[mqtt\nthis is not TOML\n")
    device.box.sh("systemctl", "reload", UNIT)
    time.sleep(2)
    seen = len(device.monitor.seqs(DEVICE))
    assert device.monitor.wait_until(lambda: len(device.monitor.seqs(DEVICE)) >= seen + 3, 20)
    state = device.record("systemctl reload (invalid config)", ("eload", "invalid", "keep"))
    assert (state["ActiveState"], state["SubState"], state["MainPID"]) == \
        ("active", "running", before["MainPID"])
    device.write_config(good)


def test_the_watchdog_restarts_a_hung_agent(device: Device) -> None:
    before = device.unit()
    device.box.sh("systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", UNIT)
    state = device.wait_unit(
        lambda s: s["MainPID"] not in ("0", before["MainPID"]) and s["SubState"] == "running"
        and int(s["NRestarts"]) > int(before["NRestarts"]), 75, "restart by the watchdog")
    device.record("SIGSTOP of the agent, 30 s watchdog", ("atchdog", "Started", "Scheduled"))
    assert "Watchdog timeout" in device.box.journal(UNIT)
    assert device.delivered(device.publish(2, "after-watchdog"))
    assert state["ActiveState"] == "active"


def test_stop_drains_the_outbox(device: Device) -> None:
    sent = device.publish(20, "drain")
    device.box.sh("systemctl", "stop", UNIT)
    state = device.record("20 publishes, then systemctl stop", ("outbox", "Stopped", "Stopping"))
    assert (state["ActiveState"], state["Result"]) == ("inactive", "success")
    assert "0 message(s) left in the outbox" in device.box.journal(UNIT)
    assert device.delivered(sent, timeout=5)
    first = min(device.monitor.seqs(DEVICE))
    assert device.monitor.missing(DEVICE, first, max(sent)) == []


def test_the_agent_comes_back_after_the_tpm_resource_manager_goes_away(device: Device) -> None:
    device.box.sh("systemctl", "start", UNIT)
    before = device.unit()
    device.box.sh("systemctl", "stop", "tpm2-abrmd.service")
    device.wait_unit(lambda s: int(s["NRestarts"]) > int(before["NRestarts"]) or
                     s["ActiveState"] != "active", 75, "the agent notices the TPM is gone")
    device.record("tpm2-abrmd stopped", ("atchdog", "TPM", "tpm", "Scheduled", "Failed"))
    device.box.sh("systemctl", "start", "tpm2-abrmd.service")
    state = device.wait_unit(lambda s: s["SubState"] == "running"
                             and s["MainPID"] not in ("0", before["MainPID"]), 60,
                             "the agent back after tpm2-abrmd returned")
    device.record("tpm2-abrmd started again", ("Started",))
    assert device.delivered(device.publish(2, "after-tpm"))
    assert state["ActiveState"] == "active"


def test_the_package_removes_cleanly(device: Device) -> None:
    device.box.sh("apt-get", "remove", "-y", "-qq", "device-agent")
    status = device.box.sh("dpkg-query", "-W", "-f=${Status}", "device-agent", check=False)
    leftovers = device.box.sh("sh", "-c", "ls -d /opt/device-agent /usr/bin/device-agent "
                              "/usr/lib/systemd/system/device-agent.service 2>/dev/null",
                              check=False)
    device.lines.append(f"== apt-get remove: dpkg status {status!r}, left: {leftovers!r}")
    assert leftovers == ""
    assert status in ("", "deinstall ok config-files", "unknown ok not-installed")
    assert device.box.sh("systemctl", "is-active", UNIT, check=False).strip() == "inactive"
    device.box.sh("apt-get", "purge", "-y", "-qq", "device-agent")
    assert not (device.root / "var/lib/device-agent").exists()
    assert (device.root / CONFIG.lstrip("/")).exists()  # the factory identity stays
    device.lines.append("== apt-get purge: /var/lib/device-agent gone, /etc/device-agent kept")
