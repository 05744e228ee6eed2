"""The registry's two databases behind one small surface: execute, begin, commit, rollback.

:class:`provisioning.registry.Registry` writes its SQL once, in the dialect both
databases share (``?`` parameters, ``ON CONFLICT`` upserts, ``CAST(? AS TEXT)``
where a parameter's type must be known, text timestamps and serials). Everything
that differs is here:

- SQLite (a path, the embedded default): WAL, a busy timeout, and ``BEGIN
  IMMEDIATE`` so one writer at a time holds the file.
- PostgreSQL (a ``postgresql://`` URL; several EST servers share it): ``?`` becomes
  ``%s``; a write transaction is ``BEGIN`` then a transaction-scoped advisory lock,
  the same one for every writer, so writers are serialized exactly as SQLite's
  ``BEGIN IMMEDIATE`` serializes them, across hosts; every statement after the lock
  reads what the previous writer committed (READ COMMITTED takes a snapshot per
  statement), so a decision (a daily budget, a first enrollment) is read and written
  under the lock, never in a process's memory. ``busy_timeout`` is the lock wait
  (``lock_timeout``), ``synchronous = "normal"`` is ``synchronous_commit = off``.

Each backend's own errors are the caller's ``errors`` tuple; the registry turns them
into :class:`~provisioning.errors.RegistryError` where it executes. A database that
cannot be reached is a RegistryError ("cannot open the registry") from either.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from ._registry_schema import migrate
from .errors import RegistryError

URL_SCHEMES = ("postgresql", "postgres")
SYNCHRONOUS = ("full", "normal")

RegistryLocation = str | os.PathLike[str]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...  # None: the statement returns no rows

    def fetchall(self) -> list[Any]: ...


class Database(Protocol):
    """One connection to the registry's database, in autocommit outside a transaction."""

    errors: tuple[type[Exception], ...]
    name: str

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor: ...

    def begin(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


def is_url(location: RegistryLocation) -> bool:
    """Whether ``location`` names a PostgreSQL database rather than a SQLite file."""
    return isinstance(location, str) and urlsplit(location).scheme in URL_SCHEMES


def location(text: str) -> str | Path:
    """A registry named in a configuration file or on a command line: a URL stays text,
    anything else is a path."""
    return text if is_url(text) else Path(text)


def redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def connect(where: RegistryLocation, busy_timeout: float, synchronous: str) -> Database:
    """The database at ``where``, its schema created or migrated; RegistryError if not."""
    if synchronous not in SYNCHRONOUS:
        raise RegistryError(f"synchronous must be full or normal, not {synchronous!r}")
    if is_url(where):
        try:
            from . import _registry_pg
        except ImportError as exc:  # psycopg comes with the server extra
            raise RegistryError(f"a PostgreSQL registry needs psycopg ({exc}): "
                                "pip install 'tpm-device-identity[server]'") from exc
        return _registry_pg.PostgresDatabase(str(where), busy_timeout, synchronous)
    return SQLiteDatabase(Path(where), busy_timeout, synchronous)


def prepare(database: Database, step: Callable[[], None]) -> None:
    """Run ``step`` (settings, schema) on a new connection; closed again if it fails."""
    try:
        step()
    except database.errors as exc:
        database.close()
        raise RegistryError(f"cannot prepare the registry {database.name}: {exc}") from exc
    except BaseException:
        database.close()
        raise


class SQLiteDatabase:
    """A SQLite file in WAL mode; ``BEGIN IMMEDIATE`` takes the write lock up front.

    Writers take turns on an ``flock`` of ``REGISTRY.lock`` first: a writer that finds
    the write lock taken otherwise waits in SQLite's busy handler, which sleeps and
    polls (1, 2, 5 ... 100 ms), so two EST workers committing batch after batch
    spent more time asleep than writing. The kernel wakes a waiter the moment the
    holder's transaction ends. Every holder is a transaction of this class, which
    ends; a writer without the turn (another program) still meets ``busy_timeout``.
    """

    errors: tuple[type[Exception], ...] = (sqlite3.Error,)

    def __init__(self, path: Path, busy_timeout: float, synchronous: str) -> None:
        self.name = str(path)
        try:
            # read-only: whoever may read the registry can take a turn, whoever created it
            self._turn = os.open(f"{path}.lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC,
                                 0o644)
        except OSError as exc:
            raise RegistryError(f"cannot open the registry's lock file {path}.lock: "
                                f"{exc.strerror}") from exc
        try:
            self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        except sqlite3.Error as exc:
            os.close(self._turn)
            raise RegistryError(f"cannot open the registry {path}: {exc}") from exc
        prepare(self, lambda: self._prepare(path, busy_timeout, synchronous))

    def _prepare(self, path: Path, busy_timeout: float, synchronous: str) -> None:
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        self._db.execute("PRAGMA foreign_keys = ON")
        migrate(self._db, path)

    def execute(self, sql: str, params: Sequence[object] = ()) -> Cursor:
        return self._db.execute(sql, params)

    def begin(self) -> None:
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            fcntl.flock(self._turn, fcntl.LOCK_UN)
            raise

    def commit(self) -> None:
        """The turn is kept when COMMIT fails: the transaction is still open, and the
        caller's rollback ends it."""
        self._db.execute("COMMIT")
        fcntl.flock(self._turn, fcntl.LOCK_UN)

    def rollback(self) -> None:
        try:
            self._db.rollback()
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            os.close(self._turn)


@functools.lru_cache(maxsize=256)
def pyformat(sql: str) -> str:
    """The registry's ``?`` parameters as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")
