"""The test bed's own processes: a software TPM starts even when its first ports were taken."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from device_agent.tpm import TPM
from simulator import processes
from simulator.processes import SoftwareTPM

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("taken_port", ["server", "control"])
def test_a_software_tpm_whose_ports_were_taken_starts_on_others_and_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken_port: str,
) -> None:
    real = processes.free_port_pair
    offered: list[int] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1] - (taken_port == "control")

        def first_the_taken_one() -> int:
            offered.append(busy if not offered else real())
            return offered[-1]

        monkeypatch.setattr(processes, "free_port_pair", first_the_taken_one)
        with SoftwareTPM(tmp_path / "tpm", None, "taken") as tpm:
            assert offered[0] == busy
            assert tpm.port == offered[-1] != busy
            with TPM(tpm.tcti) as device:
                device.ping()
            tcti = tpm.tcti
            tpm.stop()
            tpm.start()
            assert tpm.tcti == tcti
            assert len(offered) == 2
            with TPM(tcti) as device:
                device.ping()
