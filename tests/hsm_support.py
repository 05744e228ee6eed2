"""A SoftHSM2 token per test: its own directory, configuration, token, PIN file.

SoftHSM2 reads ``SOFTHSM2_CONF`` when the module is initialized, so the fixture sets it
in this process's environment (processes the test starts inherit it) and hsm.py
finalizes the module once its last session closes: each test reads its own tokens.
A machine without SoftHSM2 fails the test; it never skips.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from simulator.processes import ComponentError, require, require_library

MISSING = "install softhsm2 (scripts/setup.sh)"


@dataclass(frozen=True)
class SoftHSM:
    """One initialized token; ``uri()`` names it with its module and PIN file."""

    directory: Path
    conf: Path
    module: str
    label: str
    pin: str
    so_pin: str

    @property
    def pin_file(self) -> Path:
        return self.directory / "pin"

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}

    def uri(self, *path: str, pin: str | None = None) -> str:
        """``pkcs11:token=LABEL[;path...]?module-path=...&pin-source=file:...``; ``pin``
        gives the PIN inline (pin-value) instead."""
        secret = f"pin-value={pin}" if pin is not None else f"pin-source=file:{self.pin_file}"
        return (f"pkcs11:{';'.join((f'token={self.label}', *path))}"
                f"?module-path={self.module}&{secret}")

    def tool(self, *args: str) -> str:
        """pkcs11-tool on this token, logged in; its stdout."""
        result = subprocess.run(
            [require("pkcs11-tool"), "--module", self.module, "--login", "--pin", self.pin,
             *args], capture_output=True, text=True, timeout=60, check=True,
            env={"SOFTHSM2_CONF": str(self.conf), "PATH": "/usr/bin:/bin"})
        return result.stdout


def softhsm_token(directory: Path, label: str = "ca", pin: str = "4711-pin",
                  so_pin: str = "so-0815") -> SoftHSM:
    try:
        util = require("softhsm2-util")
        module = require_library("softhsm/libsofthsm2.so")
    except ComponentError as exc:
        pytest.fail(f"{MISSING}: {exc}")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
                    "log.level = ERROR\nslots.removable = false\n")
    subprocess.run([util, "--init-token", "--free", "--label", label, "--pin", pin,
                    "--so-pin", so_pin], check=True, capture_output=True, timeout=60,
                   env={"SOFTHSM2_CONF": str(conf), "PATH": "/usr/bin:/bin"})
    hsm = SoftHSM(directory, conf, module, label, pin, so_pin)
    hsm.pin_file.write_text(pin + "\n")
    hsm.pin_file.chmod(0o600)
    return hsm


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SoftHSM]:
    """A fresh token labelled "ca" with SOFTHSM2_CONF pointing at it for this test."""
    hsm = softhsm_token(tmp_path / "softhsm")
    monkeypatch.setenv("SOFTHSM2_CONF", str(hsm.conf))
    yield hsm
