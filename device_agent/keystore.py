"""Where the device's keys live, chosen by ``[device] tcti``: the TPM, or files (simulation).

``file:/dir`` selects :class:`~device_agent.filekeys.FileKeyStore` (SIMULATION ONLY,
private keys on disk); any other value is a TCTI and opens the TPM unchanged.

Nothing heavy is imported here at module level: the long-running agent asks only
which kind of keystore it has, and ``cryptography`` and ``tpm2_pytss`` load in the
credential job that opens one (issue 15: the daemon's memory).
"""

from __future__ import annotations

import base64
import binascii
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .errors import KeyFileError, TPMUnreachableError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from .filekeys import FileKey
    from .tpm import KeyBlob

FILE_PREFIX = "file:"


class Key(Protocol):
    """A key blob as stored in a credential generation: TPM-wrapped or a file key."""

    @property
    def pem(self) -> bytes: ...

    @property
    def source(self) -> str: ...

    def write(self, path: str | os.PathLike[str]) -> Path: ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...


class KeyStore(Protocol):
    def create_key(self) -> Key: ...

    def loaded(self, blob: Any) -> AbstractContextManager[ec.EllipticCurvePrivateKey]: ...

    def ping(self) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> KeyStore: ...

    def __exit__(self, *exc_info: object) -> None: ...


def is_file_keystore(tcti: str) -> bool:
    return tcti.startswith(FILE_PREFIX)


def keystore_kind(tcti: str) -> str:
    return "file (simulation)" if is_file_keystore(tcti) else "tpm"


def open_keystore(tcti: str) -> KeyStore:
    """TPM(tcti), or a FileKeyStore for ``file:/dir`` (simulation only)."""
    if is_file_keystore(tcti):
        from .filekeys import FileKeyStore

        return FileKeyStore(tcti[len(FILE_PREFIX):])
    from .tpm import TPM

    return TPM(tcti)


def probe(tcti: str) -> None:
    """Prove the keystore answers (the watchdog), without opening it as a credential job
    does: the TPM through the OpenSSL provider, a file keystore by its directory."""
    if is_file_keystore(tcti):
        directory = tcti[len(FILE_PREFIX):]
        if not os.access(directory, os.W_OK | os.X_OK):
            raise TPMUnreachableError(f"file keystore {directory} is not accessible")
        return
    from .tls import tpm_answers

    tpm_answers(tcti)


_MARKERS = {True: (b"-----BEGIN PRIVATE KEY-----", "a PKCS#8 private key file"),
            False: (b"-----BEGIN TSS2 PRIVATE KEY-----", "a TSS2 private key")}


def check_key_file(path: str | os.PathLike[str], tcti: str) -> None:
    """A clear error for a missing or damaged key file before OpenSSL's ("PEM lib"),
    without parsing it (that needs the TSS binding; the agent leaves it to the job)."""
    marker, kind = _MARKERS[is_file_keystore(tcti)]
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    body = data.strip().splitlines()
    try:
        if not data.lstrip().startswith(marker) or len(body) < 3 or \
                not body[-1].startswith(b"-----END "):
            raise ValueError("no PEM block")
        base64.b64decode(b"".join(body[1:-1]), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise KeyFileError(f"{path} is not {kind}: {exc}") from exc


def read_key(path: str | os.PathLike[str], tcti: str) -> KeyBlob | FileKey:
    """The key file at ``path`` as the keystore ``tcti`` selects would load it."""
    if is_file_keystore(tcti):
        from .filekeys import FileKey

        return FileKey.read(path)
    from .tpm import KeyBlob

    return KeyBlob.read(path)
