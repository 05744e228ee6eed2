"""Where the device's keys live, chosen by ``[device] tcti``: the TPM, or files (simulation).

``file:/dir`` selects :class:`~device_agent.filekeys.FileKeyStore` (SIMULATION ONLY,
private keys on disk); any other value is a TCTI and opens the TPM unchanged.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric import ec

from .filekeys import FILE_PREFIX, FileKey, FileKeyStore
from .tpm import TPM, KeyBlob


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
        return FileKeyStore(tcti[len(FILE_PREFIX):])
    return TPM(tcti)


def read_key(path: str | os.PathLike[str], tcti: str) -> KeyBlob | FileKey:
    """The key file at ``path`` as the keystore ``tcti`` selects would load it."""
    if is_file_keystore(tcti):
        return FileKey.read(path)
    return KeyBlob.read(path)
