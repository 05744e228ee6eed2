"""Reconnect storms: the backoff decision as a pure function, then real agents against a
Mosquitto that is stopped for longer than the old backoff tolerated and started again."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from device_agent.config import AgentConfig, render_toml
from device_agent.errors import ConfigError
from device_agent.lifecycle import (
    UNREACHABLE_CAP,
    Backoff,
    Hint,
    Reached,
    ReconnectPolicy,
    next_reconnect,
)
from device_agent.mqtt import reached_by
from provisioning import pki
from simulator.device import AgentProcess
from simulator.processes import SoftwareTPM, free_port

from .conftest import RenderedBroker, seed_operational, write_agent_config

POLICY = ReconnectPolicy(window=2.0, cap=10.0, base=0.5)
LOST = Backoff()  # the state after an admitted connection


def run(outcomes: list[tuple[Reached, Hint | None]], draw: float = 0.999) -> list[float]:
    state, waits = LOST, []
    for reached, hint in outcomes:
        state, wait = next_reconnect(state, reached, hint, POLICY, draw)
        waits.append(wait)
    return waits


# --- the decision ------------------------------------------------------------------------

def test_a_lost_connection_tries_again_within_the_window_not_at_once() -> None:
    waits = [next_reconnect(LOST, Reached.ADMITTED, None, POLICY, d)[1] for d in (0, .5, .99)]
    assert waits == [0.0, 1.0, pytest.approx(1.98)]


def test_a_broker_that_stays_away_is_retried_at_most_every_cap_not_every_minute() -> None:
    """The old link doubled towards 60 s while the broker restarted; refused TCP is cheap
    for the broker's host, so the ceiling stays at ``cap``."""
    waits = run([(Reached.HOST, None)] * 12)
    assert waits[:4] == pytest.approx([0.999, 1.998, 3.996, 7.992])
    assert max(waits) <= POLICY.cap


def test_no_answer_at_all_backs_off_towards_the_minute() -> None:
    waits = run([(Reached.NOTHING, None)] * 12)
    assert max(waits) == pytest.approx(UNREACHABLE_CAP * 0.999)


def test_a_completed_handshake_restarts_the_doubling() -> None:
    state = Backoff(Reached.HOST, 9)
    state, wait = next_reconnect(state, Reached.BROKER, None, POLICY, 0.999)
    assert state == Backoff(Reached.BROKER, 1) and wait == pytest.approx(0.999)
    # the broker keeps closing after the handshake: the doubling goes on from there
    state, wait = next_reconnect(state, Reached.BROKER, None, POLICY, 0.999)
    assert state.failures == 2 and wait == pytest.approx(1.998)


def test_a_broker_that_admits_and_drops_us_at_once_is_backed_off_from() -> None:
    state = LOST
    waits = []
    for _ in range(8):
        state, wait = next_reconnect(state, Reached.ADMITTED, None, POLICY, 0.999, held=0.2)
        waits.append(wait)
    assert state == Backoff(Reached.BROKER, 8) and waits[-1] == pytest.approx(9.99)
    assert next_reconnect(state, Reached.ADMITTED, None, POLICY, 0.5, held=60)[0] == LOST


def test_an_attempt_that_got_less_far_keeps_counting() -> None:
    state, _ = next_reconnect(Backoff(Reached.BROKER, 4), Reached.HOST, None, POLICY, 0.5)
    assert state == Backoff(Reached.HOST, 5)


def test_busy_and_refused_wait_half_the_cap_to_the_cap() -> None:
    for hint in (Hint.BUSY, Hint.REFUSED):
        waits = [next_reconnect(LOST, Reached.BROKER, hint, POLICY, d)[1] for d in (0, .999)]
        assert waits == [5.0, pytest.approx(9.995)]


def test_moved_goes_to_the_new_server_within_the_window() -> None:
    state, wait = next_reconnect(Backoff(Reached.BROKER, 7), Reached.BROKER, Hint.MOVED,
                                 POLICY, 0.5)
    assert state == LOST and wait == 1.0


def test_a_policy_and_a_draw_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        ReconnectPolicy(window=20, cap=10)
    with pytest.raises(ValueError, match="draw"):
        next_reconnect(LOST, Reached.HOST, None, POLICY, 1.0)


outcomes = st.lists(st.tuples(st.sampled_from(list(Reached)),
                              st.none() | st.sampled_from(list(Hint))).map(
    lambda o: o if o[0] in (Reached.LISTENER, Reached.BROKER) else (o[0], None)),  # as the link
    max_size=40)
draws = st.floats(0, 1, exclude_max=True)
policies = st.builds(lambda cap, w, b: ReconnectPolicy(window=w * cap, cap=cap, base=b * cap),
                     st.floats(1, 600), st.floats(0, 1), st.floats(0.001, 1))


@given(outcomes, policies, st.lists(draws, min_size=41, max_size=41))
def test_never_above_the_cap_while_the_broker_answers(
    history: list[tuple[Reached, Hint | None]], policy: ReconnectPolicy, jitter: list[float],
) -> None:
    state = Backoff()
    for (reached, hint), draw in zip(history, jitter, strict=False):
        state, wait = next_reconnect(state, reached, hint, policy, draw)
        assert 0 <= wait <= max(policy.cap, UNREACHABLE_CAP)
        if reached is not Reached.NOTHING or hint is not None:
            assert wait <= policy.cap
        if hint is Hint.BUSY:
            assert wait >= policy.cap / 2  # the broker asked for room


@given(outcomes, policies, draws)
def test_the_first_attempt_after_a_lost_connection_is_within_the_window(
    history: list[tuple[Reached, Hint | None]], policy: ReconnectPolicy, draw: float,
) -> None:
    state = Backoff()
    for reached, hint in history:
        state, _ = next_reconnect(state, reached, hint, policy, 0.5)
    state, wait = next_reconnect(state, Reached.ADMITTED, None, policy, draw)
    assert state == Backoff() and 0 <= wait <= policy.window


# --- how far an attempt got, from real sockets ------------------------------------------------

def test_a_closed_port_is_the_host_answering_and_a_listener_that_hangs_up_is_further() -> None:
    closed = free_port()
    with pytest.raises(OSError) as refused:
        socket.create_connection(("127.0.0.1", closed), timeout=2)
    assert reached_by(refused.value) is Reached.HOST

    server = socket.create_server(("127.0.0.1", 0))
    hang_up = threading.Thread(target=lambda: server.accept()[0].close(), daemon=True)
    hang_up.start()
    context = ssl.create_default_context()
    with socket.create_connection(server.getsockname(), timeout=2) as raw:
        with pytest.raises(OSError) as closed_early:
            context.wrap_socket(raw, server_hostname="broker")
    server.close()
    assert reached_by(closed_early.value) is Reached.LISTENER

    with pytest.raises(OSError) as unknown:
        socket.create_connection(("no-such-host.invalid", 8883), timeout=2)
    assert reached_by(unknown.value) is Reached.NOTHING


# --- configuration -----------------------------------------------------------------------

CONFIG = """
[device]
id = "dev-0001"
[paths]
state_dir = "/var/lib/device-agent"
bootstrap_cert = "/etc/device-agent/bootstrap.pem"
bootstrap_key = "/etc/device-agent/bootstrap.tss"
server_trust = "/etc/device-agent/trust.pem"
[est]
url = "https://est.example:8443"
[mqtt]
host = "broker.example"
"""


def test_reconnect_keys_default_validate_and_round_trip() -> None:
    config = AgentConfig.from_toml(CONFIG)
    assert (config.mqtt.reconnect_window, config.mqtt.reconnect_max) == (2.0, 10.0)
    tuned = AgentConfig.from_toml(CONFIG + "reconnect_window = 30\nreconnect_max = 120\n")
    assert AgentConfig.from_toml(render_toml(tuned)) == tuned
    with pytest.raises(ConfigError, match=r"\[mqtt\] reconnect_window"):
        AgentConfig.from_toml(CONFIG + "reconnect_window = 11\n")
    with pytest.raises(ConfigError, match=r"\[mqtt\] reconnect_max"):
        AgentConfig.from_toml(CONFIG + "reconnect_max = 0.5\n")


# --- real agents, a real broker restart --------------------------------------------------------

OUTAGE = 25.0  # the old backoff's ceilings reached 32 s after five failures and then 60 s


@pytest.mark.integration
def test_agents_come_back_within_the_cap_after_a_long_outage_with_spread_attempts(
    tmp_path: Path, swtpm: SoftwareTPM, pki_dir: pki.PKIPaths, device_ca: pki.Authority,
    revocable_broker: RenderedBroker,
) -> None:
    broker = revocable_broker.mosquitto
    agents = []
    for n in range(4):
        config = write_agent_config(tmp_path / f"dev{n}", f"storm-{n}", swtpm.tcti, pki_dir,
                                    broker.port, telemetry_interval=1.0)
        seed_operational(config, swtpm.tcti, device_ca)
        agents.append(AgentProcess(config, swtpm.env))
    try:
        for agent in agents:
            agent.start()
        for agent in agents:
            agent.wait_for(lambda s: bool(s.get("connected")), 30, "first connection")
        stopped = time.time()
        broker.stop()
        time.sleep(OUTAGE)
        broker.start()
        back = time.time()
        deadline = back + 10.0 + 5.0  # the cap, then the handshake on a busy 2-core machine
        statuses = [agent.wait_for(
            lambda s: bool(s.get("connected") and s["link"]["connected_since"] > stopped),
            deadline - time.time(), "reconnection within the cap") for agent in agents]
    finally:
        for agent in agents:
            agent.stop()
    links = [status["link"] for status in statuses]
    assert max(link["connected_since"] for link in links) - back < 30.0  # bounds, not speed
    during = [[t for t in link["attempts"] if stopped < t < back] for link in links]
    assert all(len(tries) >= 2 for tries in during), during  # kept trying, at most every cap
    assert all(max(b - a for a, b in zip(tries, tries[1:], strict=False)) <= 10.0 + 5.0
               for tries in during), during  # the cap, plus a slow machine's connect
    first_after_loss = sorted(tries[0] for tries in during)
    # the window, plus noticing the loss (slow on a loaded machine): never a backoff's wait
    assert first_after_loss[-1] - stopped < 10.0, first_after_loss
    assert first_after_loss[-1] - first_after_loss[0] > 0.05, first_after_loss  # spread
    first_after_restart = sorted(min(t for t in link["attempts"] if t >= back)
                                 for link in links)
    assert first_after_restart[-1] - first_after_restart[0] > 0.05, first_after_restart
