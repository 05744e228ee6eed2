"""What every key file type shares: read with a clear error, written atomically 0600."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Self

from ._files import write_private
from .errors import KeyFileError


class KeyFile:
    """Mixin for frozen dataclasses constructed as ``cls(pem, source)``."""

    pem: bytes

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Self:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
        return cls(data, str(path))  # type: ignore[call-arg]

    def write(self, path: str | os.PathLike[str]) -> Path:
        return write_private(path, self.pem)
