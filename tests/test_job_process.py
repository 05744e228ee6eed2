"""Credential jobs started ahead of their work (issue 15: a first boot's spawn to first
PUBACK): the real job process, its order on stdin."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import pytest

from device_agent import credential_job, job_process
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


def test_a_renewal_order_without_a_generation_is_a_bad_work_order(
    tmp_path: Path, pki_dir: pki.PKIPaths,
) -> None:
    """Refused before the work starts (no TPM opened): an answer, not a traceback."""
    config = config_file(tmp_path, pki_dir)
    for work in ("renew", "recovery"):
        job = job_process.start()
        output, _ = job.communicate(json.dumps({"work": work}) + "\n" + config.read_text(),
                                    timeout=30)
        assert job.returncode == 0
        assert json.loads(output) == {"outcome": "failed", "retry_after": None,
                                      "error": f"bad work order: {work} needs a generation"}


def test_what_the_work_raises_is_not_answered_as_a_bad_work_order(
    tmp_path: Path, pki_dir: pki.PKIPaths, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A ValueError from inside the work is a defect there, not a fault in the order: it
    is not dressed up as a refused order."""
    config = config_file(tmp_path, pki_dir)
    monkeypatch.setattr(credential_job.signal, "signal", lambda *_: None)
    monkeypatch.setenv("TSS2_LOG", "all+none")

    def broken(*_: object) -> dict[str, object]:
        raise ValueError("a defect in the work")

    monkeypatch.setattr(credential_job, "run_work", broken)
    monkeypatch.setattr(credential_job, "preload", lambda: None)
    monkeypatch.setattr(sys, "stdin", io.StringIO(
        job_process.order("enroll", None, True, tmp_path / "agent.toml", config.read_text())))
    with pytest.raises(ValueError, match="a defect in the work"):
        credential_job.main([])
    assert "bad work order" not in capsys.readouterr().out
