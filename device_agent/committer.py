"""Group commit: many writers, one outbox transaction, each answered once it is durable.

The local API's connections and the telemetry tick hand their messages to one
committer thread instead of each waiting for a commit (an fsync) of its own.
Whatever arrives while a transaction commits goes into the next one, so under
load one fsync carries many messages, and an idle device still commits a
lone message at once: there is no waiting for company.

A batch is bounded in messages and in bytes, so no caller waits behind more
than the commit in progress and one bounded commit of its own. Each caller's
``Future`` is resolved only after the COMMIT that holds its message has
returned (``synchronous=FULL``: the WAL is fsynced), in the order the messages
were submitted, so sequence numbers follow submission order. When a batch
cannot be committed (a full disk), nothing of it was stored; its messages are
tried again one by one, so one message too big for the space left does not
sink the others, and each caller whose message still fails gets the
``OutboxError``.

Single writer: only the committer's thread calls ``Outbox.put_many``; the
outbox's own lock and exclusive ``flock`` are unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType

from .errors import OutboxError
from .outbox import Draft, Message, Outbox

__all__ = ["Committer", "batch_length"]

log = logging.getLogger(__name__)

MAX_BATCH = 512  # messages per transaction
MAX_BATCH_BYTES = 4 * 1024 * 1024  # payload bytes per transaction


def batch_length(sizes: Iterable[int], max_messages: int, max_bytes: int) -> int:
    """How many of the queued messages (their sizes, oldest first) the next transaction takes.

    At least one, whatever its size; then as many as fit both bounds.
    """
    taken = total = 0
    for size in sizes:
        if taken and (taken == max_messages or total + size > max_bytes):
            break
        taken += 1
        total += size
    return taken


@dataclass(frozen=True, slots=True)
class _Waiting:
    draft: Draft
    future: Future[Message]


class Committer:
    """The outbox's one writer of new messages; ``submit`` from any thread."""

    def __init__(self, outbox: Outbox, max_messages: int = MAX_BATCH,
                 max_bytes: int = MAX_BATCH_BYTES) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(f"batch bounds must be positive, got {max_messages} messages, "
                             f"{max_bytes} bytes")
        self.outbox = outbox
        self.max_messages, self.max_bytes = max_messages, max_bytes
        self.commits = 0  # transactions attempted, for tests and benchmarks
        self._queue: deque[_Waiting] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="outbox-commit", daemon=True)
        self._thread.start()

    def __enter__(self) -> Committer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def submit(self, draft: Draft) -> Future[Message]:
        """Queue a message (``Outbox.draft``); the future holds it once durable, or the
        ``OutboxError``."""
        waiting = _Waiting(draft, Future())
        with self._wake:
            if self._closing:
                waiting.future.set_exception(OutboxError("the outbox committer is closed"))
            else:
                self._queue.append(waiting)
                self._wake.notify()
        return waiting.future

    def put(self, topic_suffix: str, data: Mapping[str, object] | bytes) -> Message:
        """Store a message durably through the group commit, as ``Outbox.put`` does alone.

        ``ValueError`` or ``TypeError`` for what the outbox could never store,
        ``OutboxFullError`` or ``OutboxError`` when it cannot store it now.
        """
        return self.submit(Outbox.draft(topic_suffix, data)).result()

    def close(self) -> None:
        """Commit what is queued, then stop; idempotent. Later submissions are refused."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._closing:
                    self._wake.wait()
                if not self._queue:
                    return
                count = batch_length((len(w.draft.body) for w in self._queue),
                                     self.max_messages, self.max_bytes)
                batch = [self._queue.popleft() for _ in range(count)]
            # a caller that gave up before its transaction began is not written
            self._commit([w for w in batch if w.future.set_running_or_notify_cancel()])

    def _commit(self, batch: list[_Waiting]) -> None:
        if not batch:
            return
        self.commits += 1
        try:
            outcomes = self.outbox.put_many([w.draft for w in batch])
        except OutboxError as exc:
            if len(batch) > 1:
                for waiting in batch:  # nothing of the batch was stored: each on its own
                    self._commit([waiting])
                return
            batch[0].future.set_exception(exc)
            return
        except Exception as exc:  # noqa: BLE001 - per batch: its callers hear, the writer lives
            log.exception("outbox commit of %d message(s) failed", len(batch))
            error = OutboxError(f"outbox commit failed: {exc!r}")
            error.__cause__ = exc
            for waiting in batch:
                waiting.future.set_exception(error)
            return
        for waiting, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Message):
                waiting.future.set_result(outcome)
            else:
                waiting.future.set_exception(outcome)
