"""Operational credentials as numbered generations on disk, switched atomically.

::

    <state_dir>/credentials/
        gen-000001/key.tss, cert.pem     one generation: TPM key blob (0600) and certificate,
                   facts.json            and what the daemon needs of the certificate
        gen-000002/...
        current  -> gen-000002           what the agent uses
        previous -> gen-000001           the way back until the new one has reached the broker
        failed-gen-000003-<time>/        refused by the broker, set aside
        broken-gen-000004-<time>/        unreadable, set aside

A generation is written in full (files fsynced) before any link points at it;
a link is switched by renaming a fresh symlink over it, then the directory is
fsynced. A crash at any point leaves ``current`` naming a complete generation,
and :meth:`CredentialStore.repair` rolls forward to the newest complete one.

Like certbot's archive, no decision deletes a generation: one that failed is
renamed aside, and only :meth:`CredentialStore.prune` removes the oldest beyond
a count, with a log line for each.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ._files import fsync_dir, write_private
from .errors import CredentialError, FileStoreError

if TYPE_CHECKING:
    from cryptography import x509

    from .keystore import Key

log = logging.getLogger(__name__)

_GENERATION = re.compile(r"gen-(\d{6})")
_ASIDE = re.compile(r"[a-z]+-gen-(\d{6})-.*")
KEEP_GENERATIONS = 5  # besides current and previous
KEEP_ASIDE = 10  # of each kind set aside: failed, broken, incomplete


@dataclass(frozen=True)
class CertificateFacts:
    """What the daemon needs of a certificate, kept beside it in ``facts.json``.

    The long-running agent never parses X.509 (so it never loads ``cryptography``):
    the credential job that obtains a certificate writes these with it.
    """

    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    key_sha256: str  # of the SubjectPublicKeyInfo

    @classmethod
    def of(cls, certificate_pem: bytes) -> CertificateFacts:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        cert = x509.load_pem_x509_certificate(certificate_pem)
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        return cls(cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc,
                   hashlib.sha256(spki).hexdigest())

    def to_json(self) -> bytes:
        return json.dumps({"serial": f"{self.serial:x}", "not_before": self.not_before.isoformat(),
                           "not_after": self.not_after.isoformat(),
                           "key_sha256": self.key_sha256}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> CertificateFacts:
        fields = json.loads(data)
        facts = cls(int(fields["serial"], 16), dt.datetime.fromisoformat(fields["not_before"]),
                    dt.datetime.fromisoformat(fields["not_after"]), str(fields["key_sha256"]))
        if facts.not_after.tzinfo is None or facts.not_before.tzinfo is None:
            raise ValueError("times without a zone")
        return facts


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

    @property
    def facts_path(self) -> Path:
        return self.directory / "facts.json"

    def certificate(self) -> x509.Certificate:
        from cryptography import x509

        try:
            return x509.load_pem_x509_certificate(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CredentialError(f"generation {self.number}: unreadable certificate: {exc}") \
                from exc

    def facts(self) -> CertificateFacts:
        """The certificate's facts; a generation written before they were kept (or whose
        file is damaged) has them derived from the certificate once, and written."""
        try:
            return CertificateFacts.from_json(self.facts_path.read_bytes())
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("generation %d: facts.json unusable (%s); reading the certificate",
                        self.number, exc)
        try:
            facts = CertificateFacts.of(self.cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CredentialError(f"generation {self.number}: unreadable certificate: {exc}") \
                from exc
        try:
            write_private(self.facts_path, facts.to_json(), 0o644)
        except FileStoreError as exc:  # a read-only or full disk: derived again next time
            log.warning("generation %d: facts not kept: %s", self.number, exc)
        return facts

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

    def generation(self, number: int) -> Generation | None:
        """Generation ``number``, if its directory exists."""
        found = Generation(number, self.root / f"gen-{number:06d}")
        return found if found.directory.is_dir() else None

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

    def _highest_number(self) -> int:
        """The highest number ever used, aside generations included: never used twice."""
        numbers = [0]
        for entry in self.root.iterdir():
            match = _GENERATION.fullmatch(entry.name) or _ASIDE.fullmatch(entry.name)
            if match:
                numbers.append(int(match.group(1)))
        return max(numbers)

    def stage(self, key: Key, certificate_pem: bytes, facts: CertificateFacts) -> Generation:
        """Write a new, complete generation that nothing points at yet."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        number = self._highest_number() + 1
        generation = Generation(number, self.root / f"gen-{number:06d}")
        generation.directory.mkdir(mode=0o700)
        key.write(generation.key_path)
        write_private(generation.cert_path, certificate_pem, 0o644)
        write_private(generation.facts_path, facts.to_json(), 0o644)
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
        """The current generation reached the broker: no way back is needed any more."""
        self._point("previous", None)
        self.prune()

    def rollback(self) -> Generation:
        """The broker refused the current generation: back to the previous, the refused one
        kept aside."""
        previous, failed = self.previous(), self.current()
        if previous is None or not previous.complete():
            raise CredentialError("no previous generation to roll back to")
        self._point("current", previous)
        self._point("previous", None)
        if failed is not None and failed != previous:
            self.set_aside(failed, "failed")
        return previous

    def set_aside(self, generation: Generation, kind: str) -> Path:
        """Rename a generation out of the ``gen-`` namespace; kept for inspection."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        kept = self.root / f"{kind}-{generation.directory.name}-{stamp}"
        suffix = 1
        while kept.exists():
            suffix += 1
            kept = self.root / f"{kind}-{generation.directory.name}-{stamp}.{suffix}"
        os.replace(generation.directory, kept)
        fsync_dir(self.root)
        log.warning("credential generation %d set aside as %s", generation.number, kept.name)
        return kept

    def quarantine(self, generation: Generation) -> Path:
        """Set an unusable generation aside, kept for inspection; fall back to the previous."""
        previous = self.previous()
        kept = self.set_aside(generation, "broken")
        if self.current() == generation:
            usable = previous if previous is not None and previous.complete() else None
            self._point("current", usable)
        if previous is not None and previous == self.current():
            self._point("previous", None)
        fsync_dir(self.root)
        return kept

    def prune(self) -> None:
        """Remove the oldest generations beyond the counts kept, saying so for each."""
        linked = {g.number for g in (self.current(), self.previous()) if g is not None}
        spare = [g for g in self._generations() if g.number not in linked and g.complete()]
        for generation in spare[:max(0, len(spare) - KEEP_GENERATIONS)]:
            log.info("pruning credential generation %d (keeping the newest %d)",
                     generation.number, KEEP_GENERATIONS)
            shutil.rmtree(generation.directory, ignore_errors=True)
        by_kind: dict[str, list[Path]] = {}
        for path in self.root.iterdir():
            if _ASIDE.fullmatch(path.name) and path.is_dir():
                by_kind.setdefault(path.name.split("-gen-")[0], []).append(path)
        for kind, paths in by_kind.items():
            paths.sort(key=lambda p: int(_ASIDE.fullmatch(p.name).group(1)))  # type: ignore[union-attr]
            for path in paths[:max(0, len(paths) - KEEP_ASIDE)]:
                log.info("pruning %s (keeping the newest %d %s)", path.name, KEEP_ASIDE, kind)
                shutil.rmtree(path, ignore_errors=True)

    def repair(self) -> Generation | None:
        """Finish what a crash interrupted: roll forward to the newest complete generation.

        A generation staged but not made current (a crash between the two) holds the
        certificate the EST server issued last, so it becomes current, with the old one
        as previous until the broker confirms it. Incomplete generations are set aside.
        """
        if not self.root.is_dir():
            return None
        for stale in (self.root / ".current.tmp", self.root / ".previous.tmp"):
            if stale.is_symlink():
                stale.unlink()
        current, previous = self.current(), self.previous()
        for generation in self._generations():
            if not generation.complete():
                log.warning("credential generation %d is incomplete", generation.number)
                self.set_aside(generation, "incomplete")
        complete = self._generations()
        if current is not None and not current.complete():
            current = None
            self._point("current", None)
        if previous is not None and not previous.complete():
            previous = None
            self._point("previous", None)
        newest = complete[-1] if complete else None
        if newest is not None and (current is None or newest.number > current.number):
            if current is None:
                fallback = previous if previous is not None and previous != newest else None
                self._point("current", newest)
                self._point("previous", fallback)
            else:
                log.warning("rolling forward to credential generation %d (staged before a "
                            "crash)", newest.number)
                self.activate(newest)
        self.prune()
        fsync_dir(self.root)
        return self.current()
