"""A broker directory rendered from a PKI: config, its own copies of the TLS files, state.

Mosquitto started as root drops to its ``user`` before it reads anything but
the config file, and re-reads the config, certificates and CRL as that user on
SIGHUP. So the broker gets a directory of its own, never the PKI directory
(which holds CA keys):

* ``mosquitto.conf``  root:<group> 0640, the broker cannot rewrite its own ``user`` line;
* ``acl``             <user>:<group> 0600, as Mosquitto >= 2.0.16 asks of ACL files;
* ``tls/``            root:<group> 0750, server cert and key, client CA chain, CRL (0640);
* ``tls/crl.d/``      root:<group> 0750, the CRLs by issuer hash (crl_dir.py);
* ``data/``           <user>:<group> 0700, persistence, dynamic-security state, pid file;
* ``admin/``          root 0700, the admin identity the revocation path uses;
* ``broker.json``     where everything is, for ``revocation.enforce``.

Ownership is applied only when rendering as root; otherwise files belong to the
caller and ``user`` matters only if the broker is later started as root.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from provisioning import pki
from provisioning.errors import ProvisioningError
from provisioning.registry import open_registry

from ._install import Owner, install, make_dir
from .crl import accept_crl, crl_lock, registry_expiries
from .crl_dir import publish
from .errors import BrokerConfigError
from .mosquitto import BrokerSettings, render_acl, render_conf

DYNSEC_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/mosquitto_dynamic_security.so"),
    Path("/usr/local/lib/mosquitto_dynamic_security.so"),
)
ADMIN_IDENTITY = "broker-admin"
ADMIN_LIFETIME = dt.timedelta(days=397)


@dataclass(frozen=True)
class BrokerLayout:
    """Paths inside one rendered broker directory."""

    base: Path

    @property
    def conf(self) -> Path:
        return self.base / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.base / "acl"

    @property
    def tls(self) -> Path:
        return self.base / "tls"

    @property
    def server_cert(self) -> Path:
        return self.tls / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.tls / "server.key"

    @property
    def client_ca(self) -> Path:
        return self.tls / "client-ca.pem"

    @property
    def crl(self) -> Path:
        return self.tls / "device-ca.crl"

    @property
    def crl_dir(self) -> Path:
        """CRLs by issuer hash, read at every handshake (crl_dir.py): no reload needed."""
        return self.tls / "crl.d"

    @property
    def crl_lock(self) -> Path:
        """Taken by every writer of ``crl`` (crl.crl_lock), on any host sharing the directory."""
        return self.base / ".crl.lock"

    @property
    def data(self) -> Path:
        return self.base / "data"

    @property
    def dynsec(self) -> Path:
        return self.data / "dynamic-security.json"

    @property
    def pid_file(self) -> Path:
        return self.data / "mosquitto.pid"

    @property
    def admin(self) -> Path:
        return self.base / "admin"

    @property
    def admin_cert(self) -> Path:
        return self.admin / "admin.pem"

    @property
    def admin_key(self) -> Path:
        return self.admin / "admin.key"

    @property
    def server_trust(self) -> Path:
        return self.admin / "server-ca.pem"

    @property
    def manifest(self) -> Path:
        return self.base / "broker.json"


@dataclass(frozen=True)
class Manifest:
    """What the revocation path needs to reach a rendered broker."""

    host: str
    port: int
    admin_identity: str
    user: str

    @classmethod
    def read(cls, layout: BrokerLayout) -> Manifest:
        try:
            data = json.loads(layout.manifest.read_text())
            return cls(str(data["host"]), int(data["port"]), str(data["admin_identity"]),
                       str(data["user"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BrokerConfigError(f"{layout.manifest}: not a rendered broker ({exc})") from exc


def find_dynsec_plugin() -> Path:
    """The dynamic security plugin shipped with Debian's mosquitto package."""
    for candidate in DYNSEC_CANDIDATES:
        if candidate.exists():
            return candidate
    raise BrokerConfigError("mosquitto_dynamic_security.so not found: apt-get install mosquitto "
                            "(check its path with dpkg -L mosquitto)")


def broker_owner(user: str) -> Owner | None:
    """Who the broker runs as, if we are root and can hand files over; else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError as exc:
        raise BrokerConfigError(f"no system user {user!r}: apt-get install mosquitto") from exc
    return Owner(entry.pw_uid, entry.pw_gid)


def initial_dynsec_state() -> bytes:
    """Plugin state that never grants: every default defers to the ACL file.

    The plugin only ever holds deny roles for revoked names (revocation.py).
    """
    state = {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": False},
        "clients": [], "groups": [], "roles": [],
    }
    return json.dumps(state, indent=2).encode()


def current_crl(paths: pki.PKIPaths, registry: Path | None,
                passphrase: bytes | None = None) -> bytes:
    """The CRL a render installs: the PKI's current Device CA CRL (``device-pki crl``).

    Only a PKI that never published one (made by ``pki.init_pki``, not ``device-pki
    init``) gets a CRL signed here, for the broker alone: the registry's revocations
    if there is a registry, else an empty list. It carries no CRL number, so the
    PKI's own numbering, which starts at its first publication, never clashes with it.
    """
    if paths.crl.exists():
        return paths.crl.read_bytes()
    authority = pki.read_authority(paths.device_ca, passphrase)
    revocations: list[pki.Revocation] = []
    if registry is not None and registry.is_file():
        try:
            with open_registry(registry) as opened:
                revocations = opened.revocations()
        except ProvisioningError as exc:
            raise BrokerConfigError(f"cannot read the registry {registry}: {exc}") from exc
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    crl = pki.build_crl(authority, revocations, None, now, pki.crl_lifetime(paths))
    return crl.public_bytes(serialization.Encoding.PEM)


def _admin_files(paths: pki.PKIPaths, name: str, passphrase: bytes | None) -> tuple[bytes, bytes]:
    authority = pki.read_authority(paths.device_ca, passphrase)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = authority.issue_client(name, key.public_key(), ADMIN_LIFETIME)
    return pki.cert_pem(cert, *authority.chain[:-1]), pki.key_pem(key)


def render_broker(
    paths: pki.PKIPaths,
    out: Path,
    *,
    port: int = 8883,
    backend_identity: str | None = "backend",
    user: str = "mosquitto",
    crl: Path | None = None,
    passphrase: bytes | None = None,
    bind: str = "127.0.0.1",
    registry: Path | None = None,
    force: bool = False,
    backend_workers: int = 1,
    max_queued_messages: int | None = None,
) -> BrokerLayout:
    """Render a complete broker directory from the PKI; returns its layout.

    ``crl`` is a Device CA CRL (PEM) to install; by default the PKI's current one
    (:func:`current_crl`). Re-rendering never rolls the installed CRL back: one that
    would un-revoke a certificate or is older raises ``CRLRefused`` before anything
    is written, unless ``force`` (``crl.accept_crl``; ``registry``, by default the
    PKI's, tells expired certificates from un-revoked ones). Re-rendering keeps the
    plugin state (revocations already enforced) and the persistence database.
    """
    layout = BrokerLayout(out.resolve())
    if registry is None and paths.registry.is_file():
        registry = paths.registry
    crl_pem = crl.read_bytes() if crl else current_crl(paths, registry, passphrase)
    device_ca = pki.load_certs(paths.device_ca / "chain.pem")[0]
    expiries = registry_expiries(registry) if registry is not None else None
    owner = broker_owner(user)
    settings = BrokerSettings(
        port=port, client_ca=layout.client_ca, certfile=layout.server_cert,
        keyfile=layout.server_key, data_dir=layout.data, crlfile=layout.crl,
        crl_dir=layout.crl_dir,
        backend_identity=backend_identity, bind=bind, user=user,
        admin_identity=ADMIN_IDENTITY, dynsec_plugin=find_dynsec_plugin(),
        dynsec_config=layout.dynsec, pid_file=layout.pid_file, clientid_from_identity=True,
        backend_workers=backend_workers, max_queued_messages=max_queued_messages,
    )
    make_dir(layout.base, Owner(0, owner.gid) if owner else None, 0o750)
    with crl_lock(layout.crl_lock):
        installed = layout.crl.read_bytes() if layout.crl.exists() else None
        accept_crl(crl_pem, device_ca, installed, expiries=expiries, force=force)
        _write_broker(paths, layout, settings, crl_pem, owner, passphrase)
    return layout


def _write_broker(paths: pki.PKIPaths, layout: BrokerLayout, settings: BrokerSettings,
                  crl_pem: bytes, owner: Owner | None, passphrase: bytes | None) -> None:
    root = Owner(0, owner.gid) if owner else None
    make_dir(layout.tls, root, 0o750)
    make_dir(layout.data, owner, 0o700)
    make_dir(layout.admin, Owner(0, 0) if owner else None, 0o700)
    install(layout.server_cert, paths.server_cert("broker").read_bytes(), root, 0o640)
    install(layout.server_key, paths.server_key("broker").read_bytes(), root, 0o640)
    install(layout.client_ca, (paths.device_ca / "chain.pem").read_bytes(), root, 0o640)
    make_dir(layout.crl_dir, root, 0o750)
    if not layout.crl.exists() or layout.crl.read_bytes() != crl_pem:
        install(layout.crl, crl_pem, root, 0o640)
        publish(layout.crl_dir, crl_pem, root, 0o640, empty_first=False)
    if not layout.dynsec.exists():
        install(layout.dynsec, initial_dynsec_state(), owner, 0o600)
    if not layout.admin_key.exists():
        cert_pem, key_pem = _admin_files(paths, ADMIN_IDENTITY, passphrase)
        install(layout.admin_key, key_pem, None, 0o600)
        install(layout.admin_cert, cert_pem, None, 0o644)
    install(layout.server_trust, paths.server_trust.read_bytes(), None, 0o644)
    install(layout.acl, render_acl(settings).encode(), owner, 0o600)
    install(layout.conf, render_conf(settings, layout.acl).encode(), root, 0o640)
    manifest = {"host": settings.bind, "port": settings.port, "admin_identity": ADMIN_IDENTITY,
                "user": settings.user}
    install(layout.manifest, json.dumps(manifest, indent=2).encode(), None, 0o644)
