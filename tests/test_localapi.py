"""The local API over its real Unix socket; the outbox behind it is faked at the boundary.

Each refusal is proven by its answer and by nothing having reached the outbox.
"""

from __future__ import annotations

import json
import resource
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from device_agent.errors import OutboxError
from device_agent.localapi import MAX_LINE, LocalAPI
from device_agent.outbox import Draft, Message


class Recorder:
    """Stands in for the committer: records what was submitted, or fails like a full disk."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.fail: OutboxError | None = None
        self.lock = threading.Lock()

    def __call__(self, draft: Draft) -> Future[Message]:
        future: Future[Message] = Future()
        if self.fail is not None:
            future.set_exception(self.fail)
            return future
        with self.lock:
            self.published.append((draft.topic_suffix, json.loads(draft.body)))
            future.set_result(Message(len(self.published), draft.topic_suffix, b"", 0.0))
        return future


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def api(tmp_path: Path, recorder: Recorder) -> Iterator[LocalAPI]:
    server = LocalAPI(tmp_path / "api.sock", recorder, max_payload=1024)
    yield server
    server.close()


def exchange(api: LocalAPI, *lines: bytes) -> list[dict[str, Any]]:
    """Send ``lines`` on one connection, half-close, read every answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(api.path))
        sock.sendall(b"".join(lines))
        sock.shutdown(socket.SHUT_WR)
        answers = sock.makefile("rb").read().splitlines()
    return [json.loads(answer) for answer in answers]


def request(topic: str = "telemetry", **data: object) -> bytes:
    return json.dumps({"topic": topic, "data": data}).encode() + b"\n"


def test_a_valid_request_is_published_and_answered_with_its_seq(api: LocalAPI,
                                                                  recorder: Recorder) -> None:
    assert exchange(api, request("telemetry/engine", rpm=900)) == [{"ok": True, "seq": 1}]
    assert recorder.published == [("telemetry/engine", {"rpm": 900})]


@pytest.mark.parametrize("topic", ["t" * 100_000, "t" * 129, "bad topic", "a/+/b", "a/#",
                                   "commands/x", "status", "a//b", "é"])
def test_a_topic_mqtt_or_the_acl_cannot_carry_is_refused(api: LocalAPI, recorder: Recorder,
                                                         topic: str) -> None:
    [answer] = exchange(api, request(topic, x=1))
    assert answer["ok"] is False
    assert recorder.published == []


def test_a_payload_over_the_limit_is_refused_and_one_at_it_is_taken(
    api: LocalAPI, recorder: Recorder,
) -> None:
    at_limit = {"v": "x" * (1024 - len('{"v":""}'))}
    over = {"v": "x" * (1025 - len('{"v":""}'))}
    answers = exchange(api, request(**over), request(**at_limit))
    assert [a["ok"] for a in answers] == [False, True]
    assert recorder.published == [("telemetry", at_limit)]


def test_an_oversized_line_is_refused_whole_and_the_next_request_still_served(
    api: LocalAPI, recorder: Recorder,
) -> None:
    """Before: the tail beyond the first 256 KiB was read as a request of its own."""
    huge = b'{"topic": "telemetry", "data": {"v": "' + b"x" * (MAX_LINE + 10) + \
        b'"}}\n' + request("telemetry", after=1)
    tail_as_request = b"x" * (MAX_LINE * 2) + b'{"topic": "t", "data": {"sneaked": 1}}\n'
    answers = exchange(api, huge, tail_as_request, request(last=2))
    assert [a["ok"] for a in answers] == [False, True, False, True]
    assert recorder.published == [("telemetry", {"after": 1}), ("telemetry", {"last": 2})]


@pytest.mark.parametrize("line", [b"[" * 100_000 + b"\n", b'{"data": ' * 50_000 + b"\n",
                                  b"not json\n", b"[]\n", b'{"topic": "t"}\n', b"\xff\xfe\n"])
def test_malformed_requests_get_an_answer(api: LocalAPI, recorder: Recorder,
                                          line: bytes) -> None:
    [answer] = exchange(api, line)
    assert answer["ok"] is False and answer["error"]
    assert recorder.published == []


def test_an_outbox_that_cannot_take_the_message_is_a_refusal(api: LocalAPI,
                                                             recorder: Recorder) -> None:
    recorder.fail = OutboxError("database or disk is full")
    [answer] = exchange(api, request(x=1))
    assert answer == {"ok": False, "error": "database or disk is full"}


def test_a_thousand_clients_at_once_are_all_served_without_a_thread_each(
    api: LocalAPI, recorder: Recorder,
) -> None:
    """Before: a listen backlog of 5 (838 of 1,000 calls failed) and a thread per client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    threads_before = threading.active_count()
    clients = []
    try:
        for _ in range(1000):  # connect all before any is served: the backlog holds them
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(60)
            sock.connect(str(api.path))
            clients.append(sock)
        assert threading.active_count() <= threads_before + 8  # the pool, not one per client
        for number, sock in enumerate(clients):
            sock.sendall(request(n=number))
        answers = [json.loads(sock.makefile("rb").readline()) for sock in clients]
    finally:
        for sock in clients:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert all(a["ok"] for a in answers)
    assert sorted(d["n"] for _, d in recorder.published) == list(range(1000))


def test_pipelined_answers_keep_the_order_of_the_lines_whatever_settles_first(
    tmp_path: Path,
) -> None:
    """Outcomes settled last-first (and a refusal among them) still answer line by line."""
    held: list[Future[Message]] = []

    def hold(draft: Draft) -> Future[Message]:
        held.append(Future())
        return held[-1]

    server = LocalAPI(tmp_path / "api.sock", hold, max_payload=1024)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30)
            sock.connect(str(server.path))
            sock.sendall(request(i=0) + request(i=1) + b"not json\n" + request(i=3))
            while len(held) < 3:
                threading.Event().wait(0.01)
            for seq, future in reversed(list(enumerate(held, start=10))):
                future.set_result(Message(seq, "telemetry", b"", 0.0))
            replies = sock.makefile("rb")
            answers = [json.loads(replies.readline()) for _ in range(4)]
    finally:
        server.close()
    assert [a.get("seq") for a in answers] == [10, 11, None, 12]
    assert answers[2]["ok"] is False


def test_more_lines_than_the_pipeline_in_one_write_are_all_answered_in_order(
    api: LocalAPI, recorder: Recorder,
) -> None:
    answers = exchange(api, *(request(n=n) for n in range(500)))
    assert [a["seq"] for a in answers] == list(range(1, 501))
    assert [d["n"] for _, d in recorder.published] == list(range(500))


def test_a_blank_tail_at_end_of_file_is_no_request_and_the_connection_ends(
    api: LocalAPI, recorder: Recorder,
) -> None:
    answers = exchange(api, request(n=1), b"  \t ")
    assert [a["ok"] for a in answers] == [True]
    assert recorder.published == [("telemetry", {"n": 1})]


def test_a_client_that_leaves_without_reading_has_every_line_stored(
    api: LocalAPI, recorder: Recorder,
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(api.path))
        sock.sendall(b"".join(request(n=n) for n in range(300)))
    for _ in range(500):
        if len(recorder.published) == 300:
            break
        threading.Event().wait(0.01)
    assert [d["n"] for _, d in recorder.published] == list(range(300))
