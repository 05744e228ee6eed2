"""Revocation that bites on a running Mosquitto: refuse new sessions, end the live one.

Measured on Mosquitto 2.0.11 (Debian 12, OpenSSL 3.0): SIGHUP re-reads
``crlfile`` into the listener's existing X509 store, so new handshakes with a
revoked certificate fail while other clients keep connecting; but a reload
never touches live sessions. The dynamic security plugin can end them: its
``disableClient`` kicks every session whose username (our certificate CN)
matches. With ``use_identity_as_username`` the plugin is never asked to
authenticate, so "disabled" alone would not stop a reconnect; the CRL does
that, and the deny-all role given to the revoked name is the second wall if a
CRL reload were ever lost.

Order matters: CRL first, then SIGHUP, then the kick. The admin session needs
a TLS handshake (several turns of the broker's loop) before its command is
read, and the broker applies a pending reload at the end of every turn, so
by the time the device is kicked its reconnect already meets the new CRL.

Mosquitto adds each reloaded CRL to the store and OpenSSL picks, among CRLs
of one issuer, the one with the latest thisUpdate: a new CRL must therefore
carry a strictly later thisUpdate than the installed one, or it may be ignored.
It must not drop an unexpired revoked certificate either (crl.py).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ._install import Owner, install
from .crl import ExpiryLookup, accept_crl, crl_lock, crl_number
from .deploy import BrokerLayout, Manifest
from .dynsec import AdminCredentials, admin_session
from .errors import BrokerConfigError, RevocationError

REVOKED_ROLE = "revoked"
_DENY_ALL = [{"acltype": kind, "topic": "#", "priority": 0, "allow": False}
             for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")]


@dataclass(frozen=True)
class Enforcement:
    """What ``enforce`` did, with its wall-clock cost."""

    device_id: str
    crl_number: int | None
    broker_pid: int
    seconds: float


def check_crl(layout: BrokerLayout, crl_pem: bytes, serial: int | None = None, *,
              expiries: ExpiryLookup | None = None, force: bool = False,
              ) -> x509.CertificateRevocationList:
    """Refuse a CRL the broker would not use (wrong signer, stale, not newer) or that
    would roll the installed one back (``crl.accept_crl``)."""
    issuer = x509.load_pem_x509_certificates(layout.client_ca.read_bytes())[0]
    installed = layout.crl.read_bytes() if layout.crl.exists() else None
    return accept_crl(crl_pem, issuer, installed, serial=serial, expiries=expiries, force=force)


def install_crl(layout: BrokerLayout, crl_pem: bytes) -> None:
    """Replace the broker's CRL atomically, keeping its owner and mode (no checks)."""
    stat = layout.crl.stat()
    install(layout.crl, crl_pem, Owner(stat.st_uid, stat.st_gid), stat.st_mode & 0o777)


def replace_crl(layout: BrokerLayout, crl_pem: bytes, serial: int | None = None, *,
                expiries: ExpiryLookup | None = None, force: bool = False,
                ) -> tuple[x509.CertificateRevocationList, bool]:
    """Check and install under the broker's CRL lock; the CRL and whether the file changed.

    The CRL already installed is a no-op: the file is not touched.
    """
    with crl_lock(layout.crl_lock):
        crl = check_crl(layout, crl_pem, serial, expiries=expiries, force=force)
        if layout.crl.exists() and layout.crl.read_bytes() == crl_pem:
            return crl, False
        install_crl(layout, crl_pem)
    return crl, True


def broker_pid(layout: BrokerLayout) -> int:
    """The running broker's pid from its pid file, checked against /proc."""
    try:
        pid = int(layout.pid_file.read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError) as exc:
        raise RevocationError(f"no running broker for {layout.base}: {exc}", "reload") from exc
    if comm != "mosquitto":
        raise RevocationError(f"pid {pid} in {layout.pid_file} is {comm!r}", "reload")
    return pid


def reload_broker(layout: BrokerLayout) -> int:
    """SIGHUP: the broker re-reads config, ACL, certificates and CRL; returns its pid."""
    pid = broker_pid(layout)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise RevocationError(f"cannot signal broker {pid}: {exc.strerror}", "reload") from exc
    return pid


def block_commands(device_id: str) -> list[dict[str, Any]]:
    """Plugin commands that fence ``device_id`` off and end its sessions; idempotent."""
    return [
        {"command": "createRole", "rolename": REVOKED_ROLE, "acls": _DENY_ALL,
         "textdescription": "revoked certificate: no access"},
        {"command": "deleteClient", "username": device_id},
        {"command": "createClient", "username": device_id,
         "roles": [{"rolename": REVOKED_ROLE, "priority": 1000}],
         "textdescription": "device not active in the registry"},
        {"command": "disableClient", "username": device_id},
    ]


def end_commands(device_id: str) -> list[dict[str, Any]]:
    """End ``device_id``'s live sessions and leave nothing behind (its CRL keeps the
    revoked certificate out; a certificate it gets later works)."""
    return block_commands(device_id) + lift_commands(device_id)


def lift_commands(device_id: str) -> list[dict[str, Any]]:
    """Forget ``device_id`` in the plugin: the ACL file decides for it again."""
    return [{"command": "deleteClient", "username": device_id}]


_TOLERATED = {"createRole": "Role already exists", "deleteClient": "Client not found"}


def admin_credentials(layout: BrokerLayout) -> AdminCredentials:
    manifest = Manifest.read(layout)
    return AdminCredentials(manifest.host, manifest.port, layout.admin_cert, layout.admin_key,
                            layout.server_trust)


def run_commands(layout: BrokerLayout, device_id: str, commands: list[dict[str, Any]],
                 timeout: float = 5.0) -> None:
    """Send ``commands`` about ``device_id`` in one admin session; raise on any error."""
    creds = admin_credentials(layout)
    try:
        with admin_session(creds, Manifest.read(layout).admin_identity, timeout) as session:
            replies = session.run(commands, timeout)
    except BrokerConfigError as exc:
        raise RevocationError(f"dynsec commands for {device_id} failed: {exc}", "kick") from exc
    for reply in replies:
        if reply.error and reply.error != _TOLERATED.get(reply.command):
            raise RevocationError(f"{reply.command} for {device_id}: {reply.error}", "kick")


def kick(layout: BrokerLayout, device_id: str, timeout: float = 5.0) -> None:
    """End every live session of ``device_id`` and leave it a deny-all role (a ban)."""
    run_commands(layout, device_id, block_commands(device_id), timeout)


def lift(broker_dir: Path, device_id: str, timeout: float = 5.0) -> None:
    """Lift ``device_id``'s ban on the broker in ``broker_dir``; a no-op without one."""
    run_commands(BrokerLayout(Path(broker_dir)), device_id, lift_commands(device_id), timeout)


def ban(broker_dir: Path, device_id: str, timeout: float = 5.0) -> None:
    """Ban ``device_id`` (deny-all, sessions ended) without touching the CRL: a suspension."""
    kick(BrokerLayout(Path(broker_dir)), device_id, timeout)


def enforce(broker_dir: Path, device_id: str, crl_pem: bytes, *, serial: int | None = None,
            timeout: float = 5.0, expiries: ExpiryLookup | None = None,
            keep_banned: bool = True) -> Enforcement:
    """Make a revocation bite on the broker rendered in ``broker_dir``.

    Installs ``crl_pem`` (the Device CA's CRL listing the revoked certificate,
    ``serial`` if given), reloads the broker so new handshakes meet it, then
    ends the device's live sessions; ``keep_banned`` leaves the device a
    deny-all role until :func:`lift` (a device no longer active), otherwise
    nothing stays behind (one certificate revoked, the device still active).
    Safe to repeat with the same CRL.
    ``expiries`` tells pruned entries from un-revoked ones (``crl.accept_crl``).
    Raises ``RevocationError`` whose ``step`` says how far it got.
    """
    started = time.monotonic()
    layout = BrokerLayout(Path(broker_dir))
    crl, _ = replace_crl(layout, crl_pem, serial, expiries=expiries)
    pid = reload_broker(layout)
    run_commands(layout, device_id,
                 block_commands(device_id) if keep_banned else end_commands(device_id), timeout)
    return Enforcement(device_id, crl_number(crl), pid, time.monotonic() - started)


def refresh_crl(broker_dir: Path, crl_pem: bytes, *, expiries: ExpiryLookup | None = None,
                force: bool = False) -> int | None:
    """Install a re-issued CRL before the old one's nextUpdate and reload; the broker's pid,
    or None when that CRL was already installed (nothing written, no reload).

    A CRL that would roll the installed one back raises ``CRLRefused`` unless ``force``.
    """
    layout = BrokerLayout(Path(broker_dir))
    _, changed = replace_crl(layout, crl_pem, expiries=expiries, force=force)
    return reload_broker(layout) if changed else None
