"""Operational credentials as numbered generations on disk, switched atomically.

::

    <state_dir>/credentials/
        gen-000001/key.tss, cert.pem     one generation: TPM key blob (0600) and certificate
        gen-000002/...
        current  -> gen-000002           what the agent uses
        previous -> gen-000001           kept until the new generation has reached the broker

A generation is written in full (files fsynced) before any link points at it;
a link is switched by renaming a fresh symlink over it, then the directory is
fsynced. A crash at any point leaves ``current`` naming a complete generation,
and :meth:`CredentialStore.repair` removes what a crash left half-done.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from ._files import fsync_dir, write_private
from .errors import CredentialError

if TYPE_CHECKING:
    from .keystore import Key

log = logging.getLogger(__name__)

_GENERATION = re.compile(r"gen-(\d{6})")


@dataclass(frozen=True)
class Generation:
    number: int
    directory: Path

    @property
    def key_path(self) -> Path:
        return self.directory / "key.tss"

    @property
    def cert_path(self) -> Path:
        return self.directory / "cert.pem"

    def certificate(self) -> x509.Certificate:
        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CredentialError(f"generation {self.number}: unreadable certificate: {exc}") \
                from exc

    def complete(self) -> bool:
        return self.key_path.is_file() and self.cert_path.is_file()


class CredentialStore:
    """The generations under ``<state_dir>/credentials``."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "credentials"

    def _link(self, name: str) -> Generation | None:
        link = self.root / name
        if not link.is_symlink():
            return None
        target = os.readlink(link)
        match = _GENERATION.fullmatch(target)
        if match is None:
            raise CredentialError(f"{link} points at {target!r}, not a generation")
        return Generation(int(match.group(1)), self.root / target)

    def current(self) -> Generation | None:
        return self._link("current")

    def previous(self) -> Generation | None:
        return self._link("previous")

    def _generations(self) -> list[Generation]:
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _GENERATION.fullmatch(entry.name)
            if match and entry.is_dir():
                found.append(Generation(int(match.group(1)), entry))
        return sorted(found, key=lambda g: g.number)

    def stage(self, key: Key, certificate_pem: bytes) -> Generation:
        """Write a new, complete generation that nothing points at yet."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        generations = self._generations()
        number = (generations[-1].number if generations else 0) + 1
        generation = Generation(number, self.root / f"gen-{number:06d}")
        generation.directory.mkdir(mode=0o700)
        key.write(generation.key_path)
        write_private(generation.cert_path, certificate_pem, 0o644)
        fsync_dir(self.root)
        return generation

    def _point(self, name: str, generation: Generation | None) -> None:
        link = self.root / name
        if generation is None:
            if link.is_symlink():
                link.unlink()
                fsync_dir(self.root)
            return
        temporary = self.root / f".{name}.tmp"
        if temporary.is_symlink() or temporary.exists():
            temporary.unlink()
        os.symlink(generation.directory.name, temporary)
        os.replace(temporary, link)
        fsync_dir(self.root)

    def activate(self, generation: Generation) -> None:
        """Make ``generation`` current; the one it replaces becomes ``previous``."""
        if not generation.complete():
            raise CredentialError(f"generation {generation.number} is incomplete")
        old = self.current()
        if old is not None and old.number != generation.number:
            self._point("previous", old)
        self._point("current", generation)

    def commit(self) -> None:
        """The current generation reached the broker: forget the previous one."""
        previous = self.previous()
        self._point("previous", None)
        if previous is not None and previous != self.current():
            shutil.rmtree(previous.directory, ignore_errors=True)

    def rollback(self) -> Generation:
        """The current generation could not connect: go back to the previous one."""
        previous, failed = self.previous(), self.current()
        if previous is None or not previous.complete():
            raise CredentialError("no previous generation to roll back to")
        self._point("current", previous)
        self._point("previous", None)
        if failed is not None and failed != previous:
            shutil.rmtree(failed.directory, ignore_errors=True)
        return previous

    def quarantine(self, generation: Generation) -> Path:
        """Set an unusable generation aside, kept for inspection; fall back to the previous.

        Renamed out of the ``gen-`` namespace so :meth:`repair` never deletes it.
        """
        kept = self.root / f"broken-{generation.directory.name}-{time.strftime('%Y%m%dT%H%M%S')}"
        previous = self.previous()
        os.replace(generation.directory, kept)
        if self.current() == generation:
            usable = previous if previous is not None and previous.complete() else None
            self._point("current", usable)
        if previous is not None and previous == self.current():
            self._point("previous", None)
        fsync_dir(self.root)
        return kept

    def repair(self) -> Generation | None:
        """Finish or undo what a crash interrupted; returns the usable current generation."""
        if not self.root.is_dir():
            return None
        for stale in (self.root / ".current.tmp", self.root / ".previous.tmp"):
            if stale.is_symlink():
                stale.unlink()
        current = self.current()
        if current is not None and not current.complete():
            log.warning("current credential generation %d is incomplete", current.number)
            previous = self.previous()
            if previous is not None and previous.complete():
                self._point("current", previous)
                self._point("previous", None)
                current = previous
            else:
                self._point("current", None)
                current = None
        keep = {g.number for g in (current, self.previous()) if g is not None}
        for generation in self._generations():
            if generation.number not in keep:
                log.info("removing unused credential generation %d", generation.number)
                shutil.rmtree(generation.directory, ignore_errors=True)
        fsync_dir(self.root)
        return current
