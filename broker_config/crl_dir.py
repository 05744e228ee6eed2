"""The broker's hashed CRL directory: a new CRL reaches Mosquitto without a reload.

Mosquitto 2.0 re-checks every client's credentials on SIGHUP, offline sessions
too, and refuses them (they have no TLS connection to take the identity from):
a session restored after a restart is thrown away with what was queued for it,
and one that went offline while the broker ran is added to the expiry list a
second time, which later crashes the broker (upstream #2934, #3418; still so in
2.0.21). Every CRL refresh used to reload the broker, so every refresh did that
to every offline device and to a back end that was reconnecting.

OpenSSL consults a ``capath`` directory for CRLs at every certificate check, not
only at start: a file ``<issuer hash>.r<N>`` with the next free N is read by the
next handshake, and of the CRLs it holds for one issuer OpenSSL uses a current
one with the latest thisUpdate. ``crlfile`` stays (it turns CRL checking on and
is what a starting broker reads first). Files are only added while the broker
runs (its lookup continues from the last N it read); a broker that is not running
gets the directory emptied, so it starts from the CRL file alone.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from ._install import Owner, install
from .errors import BrokerConfigError

_HASH = re.compile(r"^[0-9a-f]{8}$")


def issuer_hash(crl_pem: bytes) -> str:
    """OpenSSL's hash of the CRL issuer's canonical name, the directory's lookup key."""
    try:
        result = subprocess.run(["openssl", "crl", "-hash", "-noout"], input=crl_pem,
                                capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerConfigError(f"cannot run openssl (Debian package openssl): {exc}") from exc
    value = result.stdout.decode("ascii", "replace").strip()
    if result.returncode != 0 or not _HASH.match(value):
        raise BrokerConfigError("openssl could not read the CRL's issuer")
    return value


def publish(directory: Path, crl_pem: bytes, owner: Owner | None, mode: int, *,
            empty_first: bool) -> Path:
    """Add ``crl_pem`` as the issuer's next ``.rN`` file; ``empty_first`` (the broker is
    not running) removes every CRL there before. Returns the file written."""
    if empty_first:
        for old in directory.glob("*.r[0-9]*"):
            old.unlink(missing_ok=True)
    prefix = issuer_hash(crl_pem)
    index = 0
    while (directory / f"{prefix}.r{index}").exists():
        index += 1
    return install(directory / f"{prefix}.r{index}", crl_pem, owner, mode)
