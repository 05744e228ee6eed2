"""fleet-sim soak: the plan as pure functions (hypothesis), and a short soak end to end."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from provisioning import pki
from simulator.crl_refresh import CRLWatch, service_commands
from simulator.fleet import device_ids
from simulator.soak import (
    BROKER_KINDS,
    REMOVALS,
    FaultKind,
    Figures,
    Timing,
    daily_budget,
    justified_issuances,
    plan,
    replay_command,
    violations,
)

FLEET_SIM = str(Path(sys.executable).parent / "fleet-sim")
SOAK_KEYS = ("seed", "faults", "issuances_per_device_max", "issuances_expected_max",
             "est_requests_per_device_max", "stranded_devices", "revoked_reconnected",
             "crl_lapsed_s", "messages_lost", "messages_duplicate")

runs = st.tuples(st.integers(0, 2**32), st.integers(1, 40), st.floats(150, 3600))


# --- timing ------------------------------------------------------------------------------


@given(st.floats(60, 7200), st.integers(1, 500))
def test_timing_compresses_lifetimes_to_tens_of_seconds_and_spans_many(duration: float,
                                                                       devices: int) -> None:
    assume(duration >= 2.5 * max(20, 10 + devices, round(duration / 20)) + 10)
    timing = Timing.for_run(duration, devices)
    assert 20 <= timing.lifetime and timing.crl_lifetime >= 20
    assert timing.crl_refresh * 4 <= timing.crl_lifetime  # the refresh runs well inside
    assert timing.grace == timing.lifetime
    assert 0 < timing.settle < duration
    assert timing.settle >= 1.5 * timing.lifetime  # time to recover from the last fault


def test_timing_refuses_a_run_too_short_to_hold_a_lifetime() -> None:
    with pytest.raises(ValueError, match="at least 60 seconds for a soak with 20s"):
        Timing.for_run(59, 5)
    with pytest.raises(ValueError, match="at least 135 seconds"):
        Timing.for_run(120, 40)
    assert Timing.for_run(60, 5).faults_end == 20


# --- the schedule ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(runs)
def test_a_plan_is_a_function_of_its_seed(run: tuple[int, int, float]) -> None:
    seed, devices, duration = run
    timing = Timing.for_run(duration, devices)
    ids = device_ids(devices)
    assert plan(seed, ids, timing) == plan(seed, ids, timing)


@settings(max_examples=80, deadline=None)
@given(runs)
@example((1602, 35, 773.59375))  # a time rounded up past the fault phase's end, once
def test_faults_stay_inside_the_fault_phase_and_never_collide(run: tuple[int, int, float]
                                                               ) -> None:
    seed, devices, duration = run
    timing = Timing.for_run(duration, devices)
    faults = plan(seed, device_ids(devices), timing).faults
    assert list(faults) == sorted(faults, key=lambda f: f.at)
    for fault in faults:
        assert 0 < fault.at
        reserve = timing.reserve(fault.kind) if fault.device and fault.kind not in REMOVALS \
            else fault.hold
        assert fault.at + reserve <= timing.faults_end, fault
    for kinds in (BROKER_KINDS, (FaultKind.EST_STOP,)):  # a server's never overlap
        server = [f for f in faults if f.kind in kinds]
        for first, second in zip(server, server[1:], strict=False):
            assert first.until <= second.at, (first, second)
    for device in device_ids(devices):
        mine = [f for f in faults if f.device == device]
        for first, second in zip(mine, mine[1:], strict=False):
            assert first.kind not in REMOVALS, (first, second)  # nothing after a removal
            assert first.at + timing.reserve(first.kind) <= second.at, (first, second)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(4, 40))
def test_a_few_devices_are_revoked_and_decommissioned_never_all(seed: int, devices: int
                                                                ) -> None:
    soak = plan(seed, device_ids(devices), Timing.for_run(600, devices))
    counts = soak.counts()
    assert counts[FaultKind.REVOKE] == counts[FaultKind.DECOMMISSION] == max(1, devices // 10)
    assert len(set(soak.removed())) == len(soak.removed()) < devices


def test_a_long_soak_overlaps_every_kind_of_fault() -> None:
    soak = plan(7, device_ids(20), Timing.for_run(600, 20))
    assert all(count > 0 for count in soak.counts().values()), soak.counts()
    spans = sorted((f.at, f.until) for f in soak.faults if f.hold)
    overlapping = sum(1 for (_, end), (start, _) in zip(spans, spans[1:], strict=False)
                      if start < end)
    assert overlapping >= 10
    long = [f for f in soak.faults if f.kind is FaultKind.BROKER_STOP_LONG]
    short = [f for f in soak.faults if f.kind is FaultKind.BROKER_STOP]
    assert all(f.hold > soak.timing.lifetime for f in long)
    assert all(f.hold < soak.timing.lifetime for f in short)


def test_the_ci_soak_has_faults_on_the_broker_the_est_server_and_devices() -> None:
    counts = plan(1, device_ids(5), Timing.for_run(90, 5)).counts()
    assert counts[FaultKind.EST_STOP] and counts[FaultKind.REVOKE]
    assert counts[FaultKind.DECOMMISSION]
    assert sum(counts[k] for k in BROKER_KINDS) >= 2


# --- what a device may be issued, and the verdict ----------------------------------------


def test_justified_issuances_grow_with_time_and_with_the_faults_a_device_lived_through(
) -> None:
    soak = plan(7, device_ids(20), Timing.for_run(600, 20))
    lifetime = soak.timing.lifetime
    quiet = plan(7, device_ids(20), Timing.for_run(600, 20)).__class__(
        7, soak.devices, soak.timing, ())
    assert justified_issuances(quiet, "sim-001", 10 * lifetime) == 1 + 17
    busy = max(soak.devices, key=lambda d: justified_issuances(soak, d, 600))
    assert justified_issuances(soak, busy, 600) > justified_issuances(quiet, busy, 600)
    assert daily_budget(soak) >= 3


def test_every_invariant_fails_the_run_on_its_own() -> None:
    clean = Figures(messages_lost=0, stranded=(), revoked_reconnected=(), crl_lapsed_s=0.0,
                    over_issued={})
    assert violations(clean) == []
    broken = {
        "lost": Figures(3, (), (), 0.0, {}),
        "stranded": Figures(0, ("sim-002",), (), 0.0, {}),
        "reconnected": Figures(0, (), ("sim-003",), 0.0, {}),
        "expired CRL": Figures(0, (), (), 0.5, {}),
        "more certificates": Figures(0, (), (), 0.0, {"sim-001": (40, 12)}),
        "never enrolled": Figures(0, (), (), 0.0, {}, ("sim-004",)),
    }
    for words, figures in broken.items():
        (found,) = violations(figures)
        assert words in found, (words, found)


def test_the_replay_command_names_everything_the_plan_came_from() -> None:
    soak = plan(42, device_ids(5), Timing.for_run(90, 5))
    assert replay_command(soak) == \
        "fleet-sim --devices 5 --scenario soak --duration 90 --seed 42"
    assert replay_command(soak, 25, 0.5, "file").endswith(
        "--seed 42 --lifetime 25 --interval 0.5 --keystore file")


def test_the_refresh_runs_the_shipped_units_commands(tmp_path: Path) -> None:
    publish, refresh = service_commands(tmp_path / "pki", tmp_path / "broker", Path("/venv"))
    assert publish == ["/venv/device-pki", "crl", "--pki", str(tmp_path / "pki")]
    assert refresh[:4] == ["/venv/broker-config", "refresh-crl", "--broker",
                           str(tmp_path / "broker")]
    assert str(tmp_path / "pki" / "registry.sqlite3") in refresh


def test_the_crl_watch_counts_only_time_a_running_broker_held_an_expired_crl(
    tmp_path: Path,
) -> None:
    authority = pki.new_root("Device CA", pki.CA_LIFETIME, ecdsa=True)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    crl = tmp_path / "device-ca.crl"
    crl.write_bytes(pki.build_crl(authority, [], 1, now - dt.timedelta(seconds=30),
                                  dt.timedelta(seconds=10)).public_bytes(Encoding.PEM))
    clock = time.monotonic
    running = [False]
    with CRLWatch(crl, lambda: running[0], clock, period=0.05) as watch:
        time.sleep(0.3)
        assert watch.lapsed_s == 0  # the broker was down: it held nothing
        running[0] = True
        time.sleep(0.5)
        crl.write_bytes(pki.build_crl(authority, [], 2, now, dt.timedelta(hours=1))
                        .public_bytes(Encoding.PEM))
        time.sleep(0.3)
    assert 0.3 <= watch.lapsed_s <= 0.8
    assert len(watch.windows) == 1


# --- the real thing ----------------------------------------------------------------------


# --- end to end: the CI soak ---------------------------------------------------------------


@pytest.mark.integration
def test_a_short_soak_of_real_agents_passes_every_invariant(tmp_path: Path) -> None:
    """5 TPM-backed agents, 90 s, seed 1: the fault kinds the plan test above requires,
    injected into the real processes; the run's own verdict and its report agree."""
    report_path = tmp_path / "soak.json"
    result = subprocess.run([FLEET_SIM, "--devices", "5", "--scenario", "soak", "--duration",
                             "90", "--seed", "1", "--json", str(report_path)],
                            capture_output=True, text=True, timeout=540, check=False)
    report = json.loads(report_path.read_text())
    assert result.returncode == 0, (report["failures"], result.stdout[-4000:])
    assert set(SOAK_KEYS) <= report.keys()
    assert report["failures"] == []
    assert report["messages_lost"] == 0 and report["messages_sent"] > 0
    assert report["stranded_devices"] == {} and report["revoked_reconnected"] == []
    assert report["crl_lapsed_s"] == 0
    assert report["issuances_per_device_max"] <= report["issuances_expected_max"]
    assert report["revoked_devices"] and report["faults"]["est-stop"] >= 1
