"""SIMULATION ONLY: software signing keys in plain files, for fleet-scale tests.

Selected by ``[device] tcti = "file:/some/dir"``. The private keys are
unencrypted PKCS#8 PEM files on disk (0600): anyone who can read them can be
the device. There is no TPM, no hardware binding, no protection at rest. This
exists so ``fleet-sim --keystore file`` can push the broker and the EST server
to thousands of devices with the same agent code when TPM-backed (swtpm)
devices run out. Never configure it on a real device; the agent logs a warning
at start and reports ``"keystore": "file (simulation)"`` in its status.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ._keyfile import KeyFile
from .errors import KeyFileError, TPMUnreachableError
from .keystore import FILE_PREFIX

PKCS8_MARKER = b"-----BEGIN PRIVATE KEY-----"


@dataclass(frozen=True)
class FileKey(KeyFile):
    """An EC P-256 private key as an unencrypted PKCS#8 PEM (simulation only)."""

    pem: bytes
    source: str = "<memory>"
    _key: ec.EllipticCurvePrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.pem.lstrip().startswith(PKCS8_MARKER):
            raise KeyFileError(f"{self.source} is not a PKCS#8 private key file")
        try:
            key = serialization.load_pem_private_key(self.pem, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{self.source} is not a usable private key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise KeyFileError(f"{self.source} is not an EC P-256 private key")
        object.__setattr__(self, "_key", key)

    @classmethod
    def generate(cls) -> FileKey:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._key


class FileKeyStore:
    """The TPM's surface (create_key, loaded, ping) over software keys. SIMULATION ONLY.

    ``directory`` stands in for the chip: it is created 0700 and must stay
    reachable (``ping``); the key files themselves are written where the caller
    stores them (the credential store, the factory's output), 0600.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.tcti = f"{FILE_PREFIX}{self.directory}"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise TPMUnreachableError(
                f"file keystore {self.directory} unusable: {exc.strerror}") from exc

    def close(self) -> None:
        pass

    def __enter__(self) -> FileKeyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create_key(self) -> FileKey:
        return FileKey.generate()

    def ping(self) -> None:
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise TPMUnreachableError(f"file keystore {self.directory} is not accessible")

    @contextmanager
    def loaded(self, blob: FileKey) -> Iterator[ec.EllipticCurvePrivateKey]:
        if not isinstance(blob, FileKey):
            raise KeyFileError(f"{getattr(blob, 'source', blob)} is not a file key "
                               "(a TPM key given to the file keystore)")
        yield blob.private_key
