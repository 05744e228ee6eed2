"""Credential jobs started ahead of their work (issue 15: a first boot's spawn to first
PUBACK): the real job process, its order on stdin."""

from __future__ import annotations

import json
import os
from pathlib import Path

from device_agent import job_process
from provisioning import pki
from simulator.seed import write_agent_config


def config_file(tmp_path: Path, pki_dir: pki.PKIPaths) -> Path:
    return write_agent_config(tmp_path / "dev", "ahead-1", f"file:{tmp_path / 'keys'}",
                              pki_dir, broker_port=9)


def test_a_device_without_a_credential_gets_a_job_that_leaves_quietly_if_never_ordered(
    tmp_path: Path, pki_dir: pki.PKIPaths,
) -> None:
    job = job_process.ahead_of_first_boot(config_file(tmp_path, pki_dir))
    assert job is not None
    output, _ = job.communicate("", timeout=30)
    assert (job.returncode, output) == (0, "")


def test_a_device_with_a_current_credential_gets_no_job_ahead(
    tmp_path: Path, pki_dir: pki.PKIPaths,
) -> None:
    config = config_file(tmp_path, pki_dir)
    credentials = tmp_path / "dev" / "state" / "credentials"
    credentials.mkdir(parents=True)
    os.symlink("gen-000001", credentials / "current")
    assert job_process.ahead_of_first_boot(config) is None


def test_a_configuration_that_does_not_load_gets_no_job_ahead(tmp_path: Path) -> None:
    broken = tmp_path / "agent.toml"
    broken.write_text("[device\n")
    assert job_process.ahead_of_first_boot(broken) is None


def test_a_bad_work_order_is_answered_as_a_failure(tmp_path: Path,
                                                   pki_dir: pki.PKIPaths) -> None:
    config = config_file(tmp_path, pki_dir)
    job = job_process.start()
    output, _ = job.communicate(json.dumps({"work": "steal-keys"}) + "\n"
                                + config.read_text(), timeout=30)
    answer = json.loads(output)
    assert job.returncode == 0
    assert answer["outcome"] == "failed" and "work order" in answer["error"]
