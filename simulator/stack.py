"""The whole back office and one device TPM on 127.0.0.1, for the demo and benchmarks."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from broker_config.deploy import render_broker
from provisioning import pki

from .processes import DBusSession, Mosquitto, SoftwareTPM, free_port
from .seed import issue_file_client

BACKEND_ID = "backend"


@dataclass(frozen=True)
class Credential:
    """A certificate file and the key file TLS loads with it."""

    cert: Path
    key: Path


class LocalStack(contextlib.ExitStack):
    """D-Bus, one swtpm behind tpm2-abrmd, a fresh PKI and a Mosquitto broker."""

    def __init__(self, directory: Path, *, max_transients: int | None = 3) -> None:
        super().__init__()
        self.directory = directory
        self.max_transients = max_transients

    def __enter__(self) -> LocalStack:
        super().__enter__()
        try:
            self.bus = self.enter_context(DBusSession(self.directory / "dbus"))
            os.environ["DBUS_SESSION_BUS_ADDRESS"] = self.bus.address
            self.tpm = self.enter_context(SoftwareTPM(
                self.directory / "tpm", self.bus, "device", max_transients=self.max_transients))
            self.pki = pki.init_pki(self.directory / "pki")
            self.device_ca = pki.read_authority(self.pki.device_ca)
            port = free_port()
            # The broker drops to the mosquitto user, which must traverse to its directory.
            broker_parent = Path(tempfile.mkdtemp(prefix="broker-"))
            self.callback(shutil.rmtree, broker_parent, ignore_errors=True)
            broker_parent.chmod(0o755)  # noqa: S103 - holds only the broker's own directory
            self.broker_layout = render_broker(self.pki, broker_parent / "broker", port=port,
                                               backend_identity=BACKEND_ID)
            self.broker = self.enter_context(
                Mosquitto(broker_parent, self.broker_layout.conf, port))
        except BaseException:
            self.close()
            raise
        return self

    def file_client(self, name: str, lifetime: dt.timedelta = dt.timedelta(days=1)) -> Credential:
        """A client certificate from the Device CA with a software key (back end, baselines)."""
        return Credential(*issue_file_client(self.directory / "clients", self.device_ca, name,
                                             lifetime))
