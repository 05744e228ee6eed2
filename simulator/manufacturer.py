"""A TPM maker for tests and the fleet simulator: swtpm_localca writing EK certificates.

A real TPM leaves its factory with endorsement keys and their certificates in
NV, signed by the maker's CA. :class:`Manufacturer` is that factory in a
directory of its own: a ``swtpm_setup`` configuration that points at
``swtpm_localca`` with a CA state directory, so every TPM state it
:meth:`~Manufacturer.manufacture`\\ s gets an RSA 2048 and an ECC P-384 EK with
certificates (swtpm-tools 0.7). swtpm_localca creates its root and issuing CA
on first use; two Manufacturer directories are two unrelated makers.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509

from .processes import ComponentError, require

SETUP_TIMEOUT = 60.0


class Manufacturer:
    """swtpm_localca's CA under ``directory``; configuration files written on creation."""

    def __init__(self, directory: Path, name: str = "swtpm-test") -> None:
        self.directory = directory.absolute()
        self.name = name
        self.ca_dir = self.directory / "ca"
        self.setup_conf = self.directory / "swtpm_setup.conf"
        self.ca_dir.mkdir(parents=True, exist_ok=True)
        localca_conf = self.directory / "swtpm-localca.conf"
        localca_conf.write_text(
            f"statedir = {self.ca_dir}\n"
            f"signingkey = {self.ca_dir / 'signkey.pem'}\n"
            f"issuercert = {self.ca_dir / 'issuercert.pem'}\n"
            f"certserial = {self.ca_dir / 'certserial'}\n")
        options = self.directory / "swtpm-localca.options"
        options.write_text(f"--platform-manufacturer {name}\n--platform-version 2.1\n"
                           "--platform-model swtpm\n")
        self.setup_conf.write_text(
            f"create_certs_tool = {require('swtpm_localca')}\n"
            f"create_certs_tool_config = {localca_conf}\n"
            f"create_certs_tool_options = {options}\n"
            "active_pcr_banks = sha256\n")

    def manufacture(self, state_dir: Path) -> None:
        """Write a new TPM 2.0 state with EKs and EK certificates into ``state_dir``."""
        state_dir.mkdir(parents=True, exist_ok=True)
        log = state_dir.parent / f"{state_dir.name}-swtpm_setup.log"
        argv = [require("swtpm_setup"), "--tpm2", "--tpmstate", str(state_dir),
                "--create-ek-cert", "--config", str(self.setup_conf),
                "--tpm", f"{require('swtpm')} socket", "--logfile", str(log)]
        try:
            result = subprocess.run(argv, capture_output=True, text=True,
                                    timeout=SETUP_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as exc:
            raise ComponentError(f"swtpm_setup did not finish in {SETUP_TIMEOUT:.0f}s") from exc
        if result.returncode != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ComponentError(f"swtpm_setup failed ({result.returncode}): "
                                 f"{result.stderr.strip()}\n{tail}")

    @property
    def root(self) -> x509.Certificate:
        """The maker's root certificate (what a factory is configured to trust)."""
        return self._load("swtpm-localca-rootca-cert.pem")

    @property
    def issuer(self) -> x509.Certificate:
        """The issuing CA under the root that signs the EK certificates."""
        return self._load("issuercert.pem")

    def _load(self, name: str) -> x509.Certificate:
        path = self.ca_dir / name
        if not path.exists():
            raise ComponentError(f"{path} does not exist yet: swtpm_localca creates its CA "
                                 "when the first TPM is manufactured")
        return x509.load_pem_x509_certificate(path.read_bytes())
