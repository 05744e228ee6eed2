"""Revocation that bites on a running Mosquitto: refuse new sessions, end the live one.

A new CRL goes to the broker's CRL file and to its hashed CRL directory, which
OpenSSL reads at every handshake (crl_dir.py): new handshakes with a revoked
certificate fail at once, with no reload. The broker is never sent SIGHUP: on
Mosquitto 2.0 a reload throws away offline persistent sessions and corrupts its
session-expiry list (crl_dir.py says how); only a broker rendered before the CRL
directory existed is still reloaded, with a warning to render it again.

Live sessions are untouched by a CRL; the dynamic security plugin ends them: its
``disableClient`` kicks every session whose username (our certificate CN) matches.
With ``use_identity_as_username`` the plugin is never asked to authenticate, so
"disabled" alone would not stop a reconnect; the CRL does that, and the deny-all
role given to the revoked name is the second wall.

Order matters: CRL first, then the kick, so the device's reconnect meets the CRL.
OpenSSL picks, among current CRLs of one issuer, the one with the latest
thisUpdate: a new CRL must therefore carry a strictly later thisUpdate than the
installed one, or it may be ignored. It must not drop an unexpired revoked
certificate either (crl.py).

A broker that is not running cannot be told anything, and need not be: the CRL
is installed for its start, and :func:`follow_registry` (run by every
``refresh-crl`` given the registry) brings its bans in line with the registry's
device states once it runs again. A pid file left by a broker that crashed is
told from a running one by the process's start time.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from ._install import Owner, install, make_dir
from .crl import ExpiryLookup, accept_crl, crl_lock, crl_number
from .crl_dir import publish
from .deploy import BrokerLayout, Manifest
from .dynsec import AdminCredentials, DynSecSession, admin_session
from .errors import BrokerConfigError, RevocationError

if TYPE_CHECKING:
    from provisioning.registry import DeviceState

log = logging.getLogger(__name__)

REVOKED_ROLE = "revoked"
_DENY_ALL = [{"acltype": kind, "topic": "#", "priority": 0, "allow": False}
             for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")]


@dataclass(frozen=True)
class Enforcement:
    """What ``enforce`` did, with its wall-clock cost."""

    device_id: str
    crl_number: int | None
    broker_pid: int | None   # None: not running; the CRL waits for its start
    seconds: float


@dataclass(frozen=True)
class Refreshed:
    """What ``refresh_crl`` did."""

    installed: bool          # the CRL file changed
    running: bool
    banned: tuple[str, ...] = ()
    lifted: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = ["CRL installed" if self.installed else "CRL already installed"]
        if not self.running:
            parts.append("broker not running: it reads the CRL when it starts")
        if self.banned:
            parts.append(f"banned {', '.join(self.banned)}")
        if self.lifted:
            parts.append(f"ban lifted for {', '.join(self.lifted)}")
        return "; ".join(parts)


def check_crl(layout: BrokerLayout, crl_pem: bytes, serial: int | None = None, *,
              expiries: ExpiryLookup | None = None, force: bool = False,
              ) -> x509.CertificateRevocationList:
    """Refuse a CRL the broker would not use (wrong signer, stale, not newer) or that
    would roll the installed one back (``crl.accept_crl``)."""
    issuer = x509.load_pem_x509_certificates(layout.client_ca.read_bytes())[0]
    installed = layout.crl.read_bytes() if layout.crl.exists() else None
    return accept_crl(crl_pem, issuer, installed, serial=serial, expiries=expiries, force=force)


def install_crl(layout: BrokerLayout, crl_pem: bytes) -> None:
    """Replace the broker's CRL atomically, keeping its owner and mode (no checks), and
    add it to the hashed directory a running broker reads at every handshake."""
    stat = layout.crl.stat()
    owner, mode = Owner(stat.st_uid, stat.st_gid), stat.st_mode & 0o777
    install(layout.crl, crl_pem, owner, mode)
    if not layout.crl_dir.is_dir():
        make_dir(layout.crl_dir, owner, 0o750)
    publish(layout.crl_dir, crl_pem, owner, mode, empty_first=running_pid(layout) is None)


def reads_crl_dir(layout: BrokerLayout) -> bool:
    """Whether the broker's configuration names the hashed CRL directory (rendered since it
    exists); one rendered before reads a new CRL only when reloaded."""
    try:
        return f"capath {layout.crl_dir}" in layout.conf.read_text().splitlines()
    except OSError:
        return False


def _reload_legacy(layout: BrokerLayout, pid: int) -> None:
    """SIGHUP for a broker rendered before the CRL directory, with the warning it deserves."""
    log.warning("%s was rendered without the CRL directory: reloading it (a reload drops "
                "offline sessions); run broker-config render and restart the broker",
                layout.conf)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise RevocationError(f"cannot signal broker {pid}: {exc.strerror}", "signal") from exc


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


def running_pid(layout: BrokerLayout) -> int | None:
    """The pid of the broker running from ``layout``; None if none is.

    A broker that crashed leaves its pid file behind: a pid with no process, or
    one now used by a process started after the file was written, is not it.
    """
    try:
        written = layout.pid_file.stat().st_mtime
        pid = int(layout.pid_file.read_text().strip())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RevocationError(f"cannot read {layout.pid_file}: {exc}", "pid-file") from exc
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        started = _process_started(pid)
    except (OSError, ValueError):
        return None
    return pid if comm == "mosquitto" and started <= written + 2.0 else None


def _process_started(pid: int) -> float:
    """When ``pid`` started, in seconds since the epoch (to the boot time's second)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                if line.startswith("btime "))
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def broker_pid(layout: BrokerLayout) -> int:
    """The running broker's pid; raises if none is running."""
    pid = running_pid(layout)
    if pid is None:
        raise RevocationError(f"no running broker for {layout.base}", "pid-file")
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


def lift(broker_dir: Path, device_id: str, timeout: float = 5.0) -> bool:
    """Lift ``device_id``'s ban on the broker in ``broker_dir``; a no-op without one.
    False if the broker is not running (:func:`follow_registry` lifts it later)."""
    layout = BrokerLayout(Path(broker_dir))
    if running_pid(layout) is None:
        return False
    run_commands(layout, device_id, lift_commands(device_id), timeout)
    return True


def ban(broker_dir: Path, device_id: str, timeout: float = 5.0) -> bool:
    """Ban ``device_id`` (deny-all, sessions ended) without touching the CRL: a suspension.
    False if the broker is not running (:func:`follow_registry` bans it later)."""
    layout = BrokerLayout(Path(broker_dir))
    if running_pid(layout) is None:
        return False
    kick(layout, device_id, timeout)
    return True


def enforce(broker_dir: Path, device_id: str, crl_pem: bytes, *, serial: int | None = None,
            timeout: float = 5.0, expiries: ExpiryLookup | None = None,
            keep_banned: bool = True) -> Enforcement:
    """Make a revocation bite on the broker rendered in ``broker_dir``.

    Installs ``crl_pem`` (the Device CA's CRL listing the revoked certificate,
    ``serial`` if given), which new handshakes meet at once, then ends the
    device's live sessions; ``keep_banned`` leaves the device a
    deny-all role until :func:`lift` (a device no longer active), otherwise
    nothing stays behind (one certificate revoked, the device still active).
    A broker that is not running gets the CRL for its start and nothing else
    (``broker_pid`` None). Safe to repeat with the same CRL.
    ``expiries`` tells pruned entries from un-revoked ones (``crl.accept_crl``).
    Raises ``RevocationError`` whose ``step`` says how far it got.
    """
    started = time.monotonic()
    layout = BrokerLayout(Path(broker_dir))
    crl, _ = replace_crl(layout, crl_pem, serial, expiries=expiries)
    pid = running_pid(layout)
    if pid is None:
        return Enforcement(device_id, crl_number(crl), None, time.monotonic() - started)
    if not reads_crl_dir(layout):
        _reload_legacy(layout, pid)
    run_commands(layout, device_id,
                 block_commands(device_id) if keep_banned else end_commands(device_id), timeout)
    return Enforcement(device_id, crl_number(crl), pid, time.monotonic() - started)


def refresh_crl(broker_dir: Path, crl_pem: bytes, *, expiries: ExpiryLookup | None = None,
                force: bool = False, states: Mapping[str, DeviceState] | None = None,
                timeout: float = 5.0) -> Refreshed:
    """Install a re-issued CRL before the old one's nextUpdate (the next handshake reads
    it); with ``states`` (the registry's), bring the broker's bans in line
    (:func:`follow_registry`). A CRL that would roll the installed one back raises
    ``CRLRefused`` unless ``force``.
    """
    layout = BrokerLayout(Path(broker_dir))
    _, changed = replace_crl(layout, crl_pem, expiries=expiries, force=force)
    pid = running_pid(layout)
    if pid is None:
        return Refreshed(changed, running=False)
    if changed and not reads_crl_dir(layout):
        _reload_legacy(layout, pid)
    banned, lifted = follow_registry(layout, states, timeout) if states is not None else ((), ())
    return Refreshed(changed, True, banned, lifted)


def banned(broker_dir: Path, timeout: float = 5.0) -> set[str]:
    """The names the running broker's plugin holds banned (the deny-all role)."""
    layout = BrokerLayout(Path(broker_dir))
    try:
        with admin_session(admin_credentials(layout), Manifest.read(layout).admin_identity,
                           timeout) as session:
            return _banned(session, timeout)
    except BrokerConfigError as exc:
        raise RevocationError(f"cannot list the broker's bans: {exc}", "kick") from exc


def _banned(session: DynSecSession, timeout: float) -> set[str]:
    listing = session.run([{"command": "listClients", "verbose": True, "count": -1}],
                          timeout)[0]
    if listing.error or listing.data is None:
        raise RevocationError(f"listClients: {listing.error or 'no data'}", "kick")
    return {client["username"] for client in listing.data.get("clients", [])
            if any(role.get("rolename") == REVOKED_ROLE for role in client.get("roles", []))}


def follow_registry(layout: BrokerLayout, states: Mapping[str, DeviceState],
                    timeout: float = 5.0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Ban every device the registry does not hold active and lift the ban of every
    active one; the devices banned and lifted.

    This is what makes a ban follow the device's state when the broker could not be
    told at the time (it was down): run with every refresh, it converges.
    """
    creds = admin_credentials(layout)
    try:
        with admin_session(creds, Manifest.read(layout).admin_identity, timeout) as session:
            banned = _banned(session, timeout)
            to_ban = tuple(sorted(device for device, state in states.items()
                                  if state != "active" and device not in banned))
            to_lift = tuple(sorted(device for device in banned
                                   if states.get(device) == "active"))
            commands = [command for device in to_ban for command in block_commands(device)]
            commands += [command for device in to_lift for command in lift_commands(device)]
            replies = session.run(commands, timeout) if commands else []
    except BrokerConfigError as exc:
        raise RevocationError(f"bans against the registry failed: {exc}", "kick") from exc
    for reply in replies:
        if reply.error and reply.error != _TOLERATED.get(reply.command):
            raise RevocationError(f"{reply.command}: {reply.error}", "kick")
    return to_ban, to_lift
