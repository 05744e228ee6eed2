"""Durable store-and-forward queue: a message leaves only when the broker has it.

Every message is committed to SQLite (WAL, ``synchronous=FULL``: the WAL is
fsynced at each commit) before ``put`` or ``put_many`` returns, so whatever a
caller was told is stored survives ``kill -9`` and power loss. ``put_many``
stores several messages in one transaction, one fsync: the group commit of
``device_agent.committer`` is built on it. It is deleted only by ``ack``,
on PUBACK, so delivery is at-least-once and the per-device sequence number
lets a consumer de-duplicate. The sequence counter is a row of its own, not
``max(seq)``: a number is never handed out twice, even after every message has
been acknowledged or the process restarted, and a dropped message leaves a gap
a consumer can see.

Threads: one connection, serialised by a lock, so ``put`` from the telemetry
and local-API threads and ``ack`` from paho's network thread are safe. One
process owns the file at a time (an exclusive ``flock``); a second opener gets
``OutboxError`` instead of a second sender of the same messages.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Literal

from ._files import fsync_dir
from .errors import OutboxCorruptError, OutboxError, OutboxFullError

__all__ = ["Draft", "Message", "Outbox", "OutboxCorruptError", "OutboxError", "OutboxFullError"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    topic_suffix TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('last_seq', 0), ('dropped', 0);
CREATE TABLE IF NOT EXISTS set_aside (
    seq INTEGER PRIMARY KEY,
    topic_suffix TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    reason TEXT NOT NULL,
    set_aside_at REAL NOT NULL
);
"""

DropPolicy = Literal["oldest", "newest"]


@dataclass(frozen=True, slots=True)
class Message:
    """One stored message; ``payload`` is exactly the bytes to publish."""

    seq: int
    topic_suffix: str
    payload: bytes
    created: float


@dataclass(frozen=True, slots=True)
class Draft:
    """A message checked and encoded by ``Outbox.draft``: the JSON data of an envelope,
    or bytes stored as given."""

    topic_suffix: str
    body: bytes
    enveloped: bool


def room_for(depth: int, max_messages: int, policy: DropPolicy, count: int) -> tuple[int, int]:
    """(how many of ``count`` new messages are kept, how many of the oldest stored go).

    The same as ``count`` puts one after another: "newest" keeps the first
    ones that fit and refuses the rest; "oldest" keeps all and drops the
    oldest stored messages (or the first new ones) beyond ``max_messages``.
    """
    if policy == "newest":
        kept = max(0, min(count, max_messages - depth))
        return kept, 0
    return count, max(0, depth + count - max_messages)


class Outbox:
    """The device's durable queue of messages waiting for a PUBACK."""

    def __init__(self, path: Path, device_id: str, max_messages: int = 100_000,
                 drop_policy: DropPolicy = "oldest") -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        if drop_policy not in ("oldest", "newest"):
            raise ValueError(f"drop_policy must be 'oldest' or 'newest', got {drop_policy!r}")
        self.path = Path(path)
        self.device_id = device_id
        self.max_messages = max_messages
        self.drop_policy: DropPolicy = drop_policy
        self._device_json = json.dumps(device_id)
        self._lock = threading.Lock()
        self._lock_fd = _create_and_lock(self.path)
        self._closed = False
        try:
            self._db = _connect(self.path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        try:
            self._depth = self._scalar("SELECT count(*) FROM messages")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (checkpointing the WAL) and release the file; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.close()
            finally:
                os.close(self._lock_fd)

    @staticmethod
    def draft(topic_suffix: str, data: Mapping[str, object] | bytes) -> Draft:
        """A message checked and encoded, not yet numbered or stored.

        A topic suffix MQTT cannot carry or data that is not a JSON object
        (NaN and infinities included) raises ``ValueError`` or ``TypeError``.
        """
        _check_topic_suffix(topic_suffix)
        if isinstance(data, bytes | bytearray):
            return Draft(topic_suffix, bytes(data), enveloped=False)
        return Draft(topic_suffix, _encode(data), enveloped=True)

    def put(self, topic_suffix: str, data: Mapping[str, object] | bytes) -> Message:
        """Store a message durably and return it with its sequence number.

        A mapping becomes the JSON envelope consumers de-duplicate on; bytes
        are kept as given. When the outbox is full, the drop policy decides:
        "oldest" deletes the oldest messages to make room, "newest" refuses
        this one with ``OutboxFullError``. Either way the dropped sequence
        number is consumed, counted and logged, so the loss is visible.
        """
        [outcome] = self.put_many([self.draft(topic_suffix, data)])
        if isinstance(outcome, OutboxFullError):
            raise outcome
        return outcome

    def put_many(self, drafts: Sequence[Draft]) -> list[Message | OutboxFullError]:
        """Store several messages in one transaction (one fsync); an outcome for each, in order.

        Numbered in the order given. Each is a ``Message`` once this returns,
        or the ``OutboxFullError`` of the "newest" drop policy (its number
        consumed and counted, as ``put`` does). If the transaction fails,
        ``OutboxError`` is raised and none of them was stored.
        """
        if not drafts:
            return []
        with self._lock, self._transaction():
            kept, drop = room_for(self._depth, self.max_messages, self.drop_policy, len(drafts))
            last = self._scalar("UPDATE counters SET value = value + ? WHERE name = 'last_seq' "
                                "RETURNING value", (len(drafts),))
            created = time.time()
            first = last - len(drafts) + 1
            stored = [Message(seq, draft.topic_suffix, self._payload(draft, seq, created),
                              created)
                      for seq, draft in zip(range(first, first + kept), drafts, strict=False)]
            self._db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?)",
                                 [(m.seq, m.topic_suffix, m.payload, created) for m in stored])
            removed: list[int] = []
            if drop:
                removed = [row[0] for row in self._db.execute(
                    "DELETE FROM messages WHERE seq IN "
                    "(SELECT seq FROM messages ORDER BY seq LIMIT ?) RETURNING seq", (drop,))]
            refused = list(range(first + kept, last + 1))
            if refused or removed:
                self._count_dropped(len(refused) + len(removed))
            self._db.execute("COMMIT")
            depth_before, self._depth = self._depth, self._depth + kept - len(removed)
        if removed:
            log.warning("outbox full (%d messages): dropped oldest %s", self.max_messages,
                        _describe(sorted(removed)))
        if refused:
            log.warning("outbox full (%d messages): refused new message %s", depth_before,
                        _describe(refused))
        full = [OutboxFullError(f"outbox {self.path} is full ({depth_before} messages); "
                                f"message seq {seq} dropped", seq) for seq in refused]
        return [*stored, *full]

    def pending(self, limit: int = 100, after_seq: int | None = None) -> list[Message]:
        """Messages still waiting for a PUBACK, oldest first, after ``after_seq`` if given."""
        with self._lock, self._translated():
            rows = self._db.execute(
                "SELECT seq, topic_suffix, payload, created FROM messages WHERE seq > ? "
                "ORDER BY seq LIMIT ?", (-1 if after_seq is None else after_seq, limit))
            return [Message(seq, topic, bytes(payload), created)
                    for seq, topic, payload, created in rows]

    def ack(self, seq: int) -> None:
        """Forget a message the broker has acknowledged; acking twice is harmless."""
        self.ack_many((seq,))

    def ack_many(self, seqs: Iterable[int]) -> int:
        """Forget several acknowledged messages in one commit; returns how many were present."""
        params = [(seq,) for seq in seqs]
        if not params:
            return 0
        with self._lock, self._unsynced(), self._transaction():
            before = self._db.total_changes
            self._db.executemany("DELETE FROM messages WHERE seq = ?", params)
            removed = self._db.total_changes - before
            self._db.execute("COMMIT")
            self._depth -= removed
        return removed

    def set_aside(self, seq: int, reason: str) -> bool:
        """Move a message MQTT cannot carry out of the queue, kept with the reason.

        It no longer blocks the messages behind it, and it is not lost: the
        ``set_aside`` table keeps it for an operator. Returns whether it was queued.
        """
        with self._lock, self._transaction():
            moved = self._db.execute(
                "INSERT INTO set_aside SELECT seq, topic_suffix, payload, created, ?, ? "
                "FROM messages WHERE seq = ?", (reason, time.time(), seq)).rowcount
            self._db.execute("DELETE FROM messages WHERE seq = ?", (seq,))
            self._db.execute("COMMIT")
            self._depth -= moved
        if moved:
            log.error("outbox: message seq %d set aside: %s", seq, reason)
        return bool(moved)

    def set_aside_count(self) -> int:
        """Messages set aside because MQTT could not carry them."""
        with self._lock:
            return self._scalar("SELECT count(*) FROM set_aside")

    def depth(self) -> int:
        """Messages waiting for a PUBACK."""
        with self._lock:
            self._check_open()
            return self._depth

    def dropped(self) -> int:
        """Messages lost to the drop policy over the outbox's whole life."""
        with self._lock:
            return self._scalar("SELECT value FROM counters WHERE name = 'dropped'")

    def last_seq(self) -> int:
        """The last sequence number handed out (0 before the first message)."""
        with self._lock:
            return self._scalar("SELECT value FROM counters WHERE name = 'last_seq'")

    @staticmethod
    def quarantine(path: Path) -> Path:
        """Move a corrupt outbox and its -wal/-shm aside and return the new database path.

        Nothing is deleted: the evidence stays next to the fresh outbox the
        agent starts, under ``<name>.corrupt-<UTC timestamp>``.
        """
        path = Path(path)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = path.with_name(f"{path.name}.corrupt-{stamp}")
        try:
            if target.exists():
                raise FileExistsError(f"{target} already exists")
            os.rename(path, target)
            for suffix in ("-wal", "-shm"):
                companion = path.with_name(path.name + suffix)
                if companion.exists():
                    os.rename(companion, target.with_name(target.name + suffix))
            fsync_dir(path.parent)
        except OSError as exc:
            raise OutboxError(f"cannot move outbox {path} aside: {exc}") from exc
        log.warning("outbox %s moved aside to %s", path, target.name)
        return target

    def _payload(self, draft: Draft, seq: int, created: float) -> bytes:
        if not draft.enveloped:
            return draft.body
        head = f'{{"device":{self._device_json},"seq":{seq},"ts":{created!r},"data":'
        return head.encode() + draft.body + b"}"

    def _count_dropped(self, n: int) -> None:
        self._db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (n,))

    def _scalar(self, sql: str, params: tuple[object, ...] = ()) -> int:
        with self._translated():
            row = self._db.execute(sql, params).fetchone()
        return int(row[0])

    def _check_open(self) -> None:
        if self._closed:
            raise OutboxError(f"outbox {self.path} is closed")

    def _translated(self) -> _Translate:
        self._check_open()
        return _Translate(self.path, None)

    @contextmanager
    def _unsynced(self) -> Iterator[None]:
        """A transaction committed without an fsync of its own (``synchronous=NORMAL``).

        For deletions only: one lost to a power cut brings a message back, sent
        again (at-least-once; the seq lets consumers drop the copy). A process
        crash loses nothing, and the next FULL commit's fsync carries it anyway.
        The connection's own setting (FULL) is back once the transaction is over.
        """
        with self._translated():
            mode = int(self._db.execute("PRAGMA synchronous").fetchone()[0])
            self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            with self._translated():
                self._db.execute(f"PRAGMA synchronous={mode:d}")

    def _transaction(self) -> _Translate:
        self._check_open()
        with _Translate(self.path, None):
            self._db.execute("BEGIN IMMEDIATE")
        return _Translate(self.path, self._db)


class _Translate:
    """Turns sqlite3 errors into the outbox's own, rolling back an open transaction."""

    def __init__(self, path: Path, db: sqlite3.Connection | None) -> None:
        self.path, self.db = path, db

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and self.db is not None and self.db.in_transaction:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback failed on %s", self.path)
        if isinstance(exc, sqlite3.Error):
            raise _translate(exc, self.path) from exc


def _translate(exc: sqlite3.Error, path: Path) -> OutboxError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _CORRUPT_CODES:
        return OutboxCorruptError(f"outbox {path} is corrupt: {exc}", str(path))
    return OutboxError(f"outbox {path}: {exc}")


def _create_and_lock(path: Path) -> int:
    if not path.parent.is_dir():
        raise OutboxError(f"outbox directory {path.parent} does not exist")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise OutboxError(f"cannot open outbox {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        os.close(fd)
        raise OutboxError(f"outbox {path} is in use by another process") from exc
    except OSError as exc:
        os.close(fd)
        raise OutboxError(f"cannot lock outbox {path}: {exc.strerror}") from exc
    return fd


def _check(path: Path) -> None:
    # Read-only, so a corrupt file and its WAL are left byte for byte as found:
    # a read-write connection would checkpoint into them or delete the WAL on close.
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                         check_same_thread=False)
    try:
        with _Translate(path, None):
            check = [row[0] for row in db.execute("PRAGMA quick_check")]
            version = db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()
    if check != ["ok"]:
        raise OutboxCorruptError(
            f"outbox {path} is corrupt: quick_check says {'; '.join(check[:3])}", str(path))
    if version not in (0, SCHEMA_VERSION):
        raise OutboxError(f"{path} has schema version {version}, expected {SCHEMA_VERSION}: "
                          "not an outbox of this version")


def _connect(path: Path) -> sqlite3.Connection:
    _check(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        with _Translate(path, None):
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise OutboxError(f"outbox {path} cannot use write-ahead logging")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION};"
                             " COMMIT;")
    except BaseException:
        db.close()
        raise
    return db


def _encode(data: Mapping[str, object]) -> bytes:
    if not isinstance(data, Mapping):
        raise TypeError(f"data must be a mapping or bytes, not {type(data).__name__}")
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def _check_topic_suffix(topic_suffix: str) -> None:
    if not topic_suffix or topic_suffix.startswith("/") or any(
            ch in topic_suffix for ch in "+#\0"):
        raise ValueError(f"topic suffix must be a non-empty MQTT topic without wildcards "
                         f"or a leading '/', got {topic_suffix!r}")


def _describe(seqs: list[int]) -> str:
    if len(seqs) == 1:
        return f"seq {seqs[0]}"
    return f"{len(seqs)} messages, seq {seqs[0]}..{seqs[-1]}"
