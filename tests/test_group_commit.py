"""Group commit: the local API's lines and the telemetry tick share outbox transactions,
and no caller hears "stored" before its transaction is durable.

The outbox is the real SQLite file; the last test runs the real agent against
Mosquitto and kills it with SIGKILL in the middle of a burst.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from device_agent.committer import Committer, batch_length
from device_agent.errors import OutboxError, OutboxFullError
from device_agent.localapi import LocalAPI
from device_agent.outbox import Draft, Message, Outbox, room_for
from simulator.device import AgentProcess
from simulator.monitor import TelemetryMonitor

SAMPLE = {"load": [0.12, 0.3, 0.25], "temperature_c": 48.5}


def commits_of(box: Outbox) -> list[str]:
    """Every COMMIT the outbox's connection executes from now on (each one an fsync)."""
    seen: list[str] = []
    box._db.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


class SlowDisk(Outbox):
    """An outbox on a slow flash chip: every transaction of new messages takes 0.1 s."""

    def put_many(self, drafts: Sequence[Draft]) -> list[Message | OutboxFullError]:
        time.sleep(0.1)
        return super().put_many(drafts)


class Poisoned(Outbox):
    """A transaction holding a message with data {"poison": true} fails, as on a full disk."""

    def put_many(self, drafts: Sequence[Draft]) -> list[Message | OutboxFullError]:
        if any(b'"poison":true' in draft.body for draft in drafts):
            raise OutboxError("database or disk is full")
        return super().put_many(drafts)


class SlowPoisoned(Poisoned, SlowDisk):
    """Both: messages queue up behind each transaction, and the poison sinks a batch."""


# --- decisions ------------------------------------------------------------------------


def test_a_batch_takes_at_least_one_message_then_what_fits_both_bounds() -> None:
    assert batch_length([], 10, 100) == 0
    assert batch_length([500], 10, 100) == 1  # one oversized message still goes alone
    assert batch_length([10] * 20, 10, 1000) == 10
    assert batch_length([40, 40, 40], 10, 100) == 2
    assert batch_length([40, 70, 10], 10, 100) == 1  # in order: nothing jumps the queue


@pytest.mark.parametrize(("depth", "policy", "count", "expected"), [
    (0, "oldest", 3, (3, 0)), (4, "oldest", 3, (3, 2)), (7, "oldest", 2, (2, 4)),
    (0, "newest", 3, (3, 0)), (4, "newest", 3, (1, 0)), (7, "newest", 2, (0, 0)),
])
def test_room_for_a_batch_is_that_of_as_many_puts_in_a_row(
    depth: int, policy: Any, count: int, expected: tuple[int, int],
) -> None:
    assert room_for(depth, 5, policy, count) == expected


# --- the outbox: many messages, one transaction ---------------------------------------


def test_put_many_stores_a_batch_in_one_commit_numbered_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        box.put("t", {"first": 1})
        commits = commits_of(box)
        stored = box.put_many([Outbox.draft("t", {"i": i}) for i in range(50)])
        assert commits == ["COMMIT"]
        assert [m.seq for m in stored if isinstance(m, Message)] == list(range(2, 52))
        assert [json.loads(m.payload)["data"] for m in box.pending(limit=100)][1:] == [
            {"i": i} for i in range(50)]


def test_put_many_refuses_what_newest_cannot_keep_and_counts_it(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1", max_messages=3, drop_policy="newest") as box:
        box.put("t", {})
        outcomes = box.put_many([Outbox.draft("t", {"i": i}) for i in range(4)])
        assert [type(o).__name__ for o in outcomes] == ["Message", "Message",
                                                        "OutboxFullError", "OutboxFullError"]
        assert [o.seq for o in outcomes] == [2, 3, 4, 5]
        assert box.depth() == 3 and box.dropped() == 2 and box.last_seq() == 5


def test_an_acknowledgement_leaves_new_messages_fully_synchronous(tmp_path: Path) -> None:
    """Deletions commit without an fsync of their own; puts keep synchronous=FULL (2)."""
    with Outbox(tmp_path / "o.db", "dev-1") as box:
        box.ack_many([box.put("t", {}).seq, 99])
        assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert box.depth() == 0


# --- the committer --------------------------------------------------------------------


def test_concurrent_callers_share_transactions_and_get_their_own_seq(tmp_path: Path) -> None:
    with SlowDisk(tmp_path / "o.db", "dev-1") as box, Committer(box) as committer:
        commits = commits_of(box)
        results: list[int] = []
        lock = threading.Lock()

        def caller(n: int) -> None:
            seq = committer.put("telemetry", {"n": n}).seq
            with lock:
                results.append(seq)

        threads = [threading.Thread(target=caller, args=(n,)) for n in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(results) == list(range(1, 101))
        assert len(commits) <= 10, f"{len(commits)} commits for 100 callers"
        assert committer.commits == len(commits)


def test_one_callers_messages_are_numbered_in_the_order_submitted(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1") as box, Committer(box, max_messages=7) as committer:
        futures = [committer.submit(Outbox.draft("t", {"i": i})) for i in range(100)]
        assert [f.result(10).seq for f in futures] == list(range(1, 101))
        assert [json.loads(m.payload)["data"]["i"] for m in box.pending(limit=200)] == list(
            range(100))


def test_a_failed_transaction_fails_only_the_callers_whose_messages_cannot_be_stored(
    tmp_path: Path,
) -> None:
    with SlowPoisoned(tmp_path / "o.db", "dev-1") as box, Committer(box) as committer:
        hold = committer.submit(Outbox.draft("t", {"first": 1}))  # the others queue behind
        futures = [committer.submit(Outbox.draft("t", {"n": n, "poison": n == 3}))
                   for n in range(6)]
        assert hold.result(10).seq == 1
        with pytest.raises(OutboxError, match="disk is full"):
            futures[3].result(10)
        stored = [f.result(10) for n, f in enumerate(futures) if n != 3]
        assert len({m.seq for m in stored}) == 5
        assert committer.commits == 1 + 1 + 6  # the first, the shared batch, one by one
        data = [json.loads(m.payload)["data"] for m in box.pending(limit=100)]
        assert {"n": 3, "poison": True} not in data and len(data) == 6


def test_a_full_outbox_refusal_reaches_the_caller(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", "dev-1", max_messages=1, drop_policy="newest") as box, \
            Committer(box) as committer:
        committer.put("telemetry", {})
        with pytest.raises(OutboxFullError) as refused:
            committer.put("telemetry", {})
        assert refused.value.seq == 2


def test_close_commits_what_is_queued_and_refuses_what_comes_after(tmp_path: Path) -> None:
    with SlowDisk(tmp_path / "o.db", "dev-1") as box:
        committer = Committer(box)
        futures = [committer.submit(Outbox.draft("t", {"i": i})) for i in range(20)]
        committer.close()
        committer.close()
        assert all(f.done() for f in futures) and box.depth() == 20
        with pytest.raises(OutboxError, match="closed"):
            committer.submit(Outbox.draft("t", {})).result(1)


# --- the local API on the real outbox ---------------------------------------------------


@pytest.fixture
def slow_api(tmp_path: Path) -> Iterator[tuple[LocalAPI, Outbox, list[str]]]:
    with SlowDisk(tmp_path / "outbox.db", "dev-1") as box, Committer(box) as committer:
        commits = commits_of(box)
        api = LocalAPI(tmp_path / "api.sock", committer.submit)
        try:
            yield api, box, commits
        finally:
            api.close()


def stored_seqs(path: Path) -> set[int]:
    """What another reader of the file sees committed."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT seq FROM messages")}
    finally:
        db.close()


def test_lines_from_many_clients_share_commits_and_each_is_answered_once_committed(
    slow_api: tuple[LocalAPI, Outbox, list[str]],
) -> None:
    """Before: one transaction, one fsync, per line: 100 clients, 100 COMMITs."""
    api, box, commits = slow_api
    answers: list[dict[str, Any]] = []
    seen_stored: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(100)

    def client(n: int) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(api.path))
            start.wait(10)
            sock.sendall(json.dumps({"topic": "telemetry", "data": {"n": n}}).encode() + b"\n")
            answer = json.loads(sock.makefile("rb").readline())
        committed = answer["seq"] in stored_seqs(box.path)  # at the moment it was told
        with lock:
            answers.append(answer)
            seen_stored.append(committed)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(a["seq"] for a in answers) == list(range(1, 101))
    assert all(seen_stored)
    assert len(commits) <= 10, f"{len(commits)} commits for 100 lines"


def test_pipelined_lines_share_commits_and_are_answered_in_order(
    slow_api: tuple[LocalAPI, Outbox, list[str]],
) -> None:
    api, _, commits = slow_api
    lines = [json.dumps({"topic": "telemetry", "data": {"i": i}}).encode() + b"\n"
             for i in range(300)]
    lines[150] = b"not json\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(api.path))
        sock.sendall(b"".join(lines))
        sock.shutdown(socket.SHUT_WR)
        answers = [json.loads(line) for line in sock.makefile("rb").read().splitlines()]
    assert [a["ok"] for a in answers] == [i != 150 for i in range(300)]
    assert [a["seq"] for a in answers if a["ok"]] == list(range(1, 300))
    assert len(commits) <= 30, f"{len(commits)} commits for 299 lines"


# --- the real agent, killed mid-burst ---------------------------------------------------


def burst(socket_path: Path, stop: threading.Event, acknowledged: list[int],
          lock: threading.Lock, window: int = 8) -> None:
    """One client: keeps ``window`` lines in flight, records every seq it is told."""
    line = json.dumps({"topic": "telemetry", "data": SAMPLE}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(socket_path))
            replies = sock.makefile("rb")
            sock.sendall(line * window)
            while True:
                reply = replies.readline()
                if not reply:
                    return
                answer = json.loads(reply)
                if answer.get("ok"):
                    with lock:
                        acknowledged.append(answer["seq"])
                if not stop.is_set():
                    sock.sendall(line)
    except OSError:
        return  # the agent died under us: what it told us is in ``acknowledged``


@pytest.mark.integration
def test_every_seq_acknowledged_before_sigkill_arrives_after_restart(
    operational_device: AgentProcess, monitor: TelemetryMonitor,
) -> None:
    """32 clients keep 8 lines each in flight; SIGKILL once 3,000 are acknowledged."""
    agent = operational_device
    socket_path = agent.config.api.socket
    assert socket_path is not None
    acknowledged: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    with agent:
        agent.wait_for(lambda s: bool(s.get("connected")), 20, "broker connection")
        clients = [threading.Thread(target=burst, args=(socket_path, stop, acknowledged, lock))
                   for _ in range(32)]
        for client in clients:
            client.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 3000 and time.monotonic() < deadline:
            time.sleep(0.01)
        agent.kill()  # mid-burst: lines in flight, a transaction perhaps half-written
        stop.set()
        for client in clients:
            client.join(15)
        with lock:
            told = set(acknowledged)
        assert len(told) >= 3000, f"only {len(told)} acknowledged before the kill"
        assert len(told) == len(acknowledged)  # no seq told twice
        with Outbox(agent.config.paths.state_dir / "outbox.db", agent.device_id) as outbox:
            kept = {m.seq for m in outbox.pending(limit=1_000_000)}
            last = outbox.last_seq()
        delivered = set(monitor.seqs(agent.device_id))
        assert told <= kept | delivered, f"lost: {sorted(told - kept - delivered)[:10]}"
        assert max(told) <= last
    with agent:  # restarted: what was kept leaves now
        assert monitor.wait_until(lambda: told <= set(monitor.seqs(agent.device_id)), 60), (
            f"missing at the broker: {sorted(told - set(monitor.seqs(agent.device_id)))[:10]}")
