"""No silent deaths: what a caller sends, a full outbox or a full disk never stops the agent.

Real agent, swtpm behind tpm2-abrmd, Mosquitto and an independent subscriber.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent.config import AgentConfig, render_toml
from device_agent.outbox import Outbox
from provisioning import pki
from simulator.device import AgentProcess
from simulator.monitor import TelemetryMonitor
from simulator.processes import Mosquitto, SoftwareTPM, free_port, require

from .conftest import seed_operational, write_agent_config

pytestmark = pytest.mark.integration


def publish(agent: AgentProcess, topic: str, data: str = "{}") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "--config", str(agent.config_path),
         "publish", "--topic", topic, "--data", data],
        capture_output=True, text=True, timeout=30, check=False)


def seq_of(result: subprocess.CompletedProcess[str]) -> int:
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split('"seq": ')[1].rstrip("}\n"))


def tune(config_path: Path, **outbox: object) -> None:
    config = AgentConfig.load(config_path)
    config = dataclasses.replace(config, outbox=dataclasses.replace(config.outbox, **outbox))
    config_path.write_text(render_toml(config))


def test_a_100k_character_topic_is_refused_and_the_telemetry_after_it_arrives(
    operational_device: AgentProcess, monitor: TelemetryMonitor,
) -> None:
    """Before: accepted, then paho raised on the link thread at every start: a silent device."""
    with operational_device as agent:
        agent.wait_for(lambda s: bool(s.get("connected")), 20, "broker connection")
        refused = publish(agent, "t" * 100_000)
        assert refused.returncode == 2 and "at most 128" in refused.stderr
        after = seq_of(publish(agent, "telemetry", '{"after": 1}'))
        assert monitor.wait_until(lambda: after in monitor.seqs(agent.device_id), 15)
        assert agent.running()


def test_a_message_mqtt_cannot_carry_in_the_outbox_is_set_aside_not_blocking(
    operational_device: AgentProcess, monitor: TelemetryMonitor,
) -> None:
    """An outbox written before the API refused such topics: the poison does not block."""
    config = AgentConfig.load(operational_device.config_path)
    with Outbox(config.paths.state_dir / "outbox.db", config.device.id) as outbox:
        poison = outbox.put("t" * 70_000, {"poison": True}).seq
        behind = [outbox.put("telemetry", {"behind": n}).seq for n in range(3)]
    with operational_device as agent:
        status = agent.wait_for(lambda s: s.get("outbox_set_aside") == 1, 20, "the set-aside")
        assert monitor.wait_until(
            lambda: set(behind) <= set(monitor.seqs(agent.device_id)), 15)
        assert status["running"] and poison not in monitor.seqs(agent.device_id)
        assert "set aside" in agent.log_text()


def test_a_full_outbox_with_newest_keeps_the_agent_running_and_counts_drops(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, device_ca: pki.Authority,
) -> None:
    """Before: OutboxFullError escaped the telemetry tick; the agent exited, every restart."""
    nobody = free_port()  # no broker: nothing leaves, the outbox fills
    config = write_agent_config(tmp_path / "dev", "full-newest", swtpm.tcti, pki_dir, nobody)
    tune(config, max_messages=3, drop_policy="newest")
    seed_operational(config, swtpm.tcti, device_ca)
    with AgentProcess(config, swtpm.env) as agent:
        status = agent.wait_for(lambda s: s.get("outbox_dropped", 0) >= 5, 30, "drops counted")
        assert status["outbox_depth"] == 3
        assert any("telemetry not stored" in e for e in status["errors"])
        refused = publish(agent, "telemetry")
        assert refused.returncode == 2 and "full" in refused.stderr
        assert agent.running()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run([require("mount"), "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                    str(mount_point)], check=True)
    try:
        yield mount_point
    finally:
        subprocess.run([require("umount"), "-l", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Take every free block of the filesystem under ``directory``."""
    filler = directory / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_a_full_state_filesystem_keeps_the_agent_running_and_nothing_acknowledged_is_lost(
    tmp_path: Path, small_tmpfs: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths,
    device_ca: pki.Authority, broker: Mosquitto, monitor: TelemetryMonitor,
) -> None:
    """Before: the agent died (exit 2) on the first write and could not start again."""
    config = write_agent_config(tmp_path / "dev", "full-disk", swtpm.tcti, pki_dir, broker.port)
    loaded = AgentConfig.load(config)
    moved = dataclasses.replace(loaded, paths=dataclasses.replace(loaded.paths,
                                                                  state_dir=small_tmpfs))
    config.write_text(render_toml(moved))
    seed_operational(config, swtpm.tcti, device_ca)
    with AgentProcess(config, swtpm.env) as agent:
        agent.wait_for(lambda s: bool(s.get("connected")), 20, "broker connection")
        accepted = [seq_of(publish(agent, "telemetry", '{"before": 1}'))]
        filler = fill(small_tmpfs)
        during = [publish(agent, "telemetry", '{"during": 1}') for _ in range(20)]
        refused = [r for r in during if r.returncode != 0]
        assert refused, "the disk never filled: this test proved nothing"
        assert all(r.returncode == 2 and "full" in r.stderr for r in refused)
        accepted += [seq_of(r) for r in during if r.returncode == 0]  # must arrive too
        # the agent lives on, connected, its identity usable, while the disk is full
        with pytest.raises(subprocess.TimeoutExpired):
            agent.process.popen.wait(5)  # type: ignore[union-attr]
        assert "telemetry not stored" in agent.log_text()
        filler.unlink()
        accepted.append(seq_of(publish(agent, "telemetry", '{"after": 1}')))
        status = agent.wait_for(lambda s: bool(s.get("connected")), 20, "still connected")
        assert status["generation"] == 1
        assert monitor.wait_until(
            lambda: set(accepted) <= set(monitor.seqs(agent.device_id)), 20)
