"""The fleet run's figures: counted from the agents' final status, the monitor and the registry.

Lost messages are sequence numbers in 1..last_seq that the independent monitor
never received and that are not still waiting in the device's outbox (a
revoked device keeps what it could not send: queued, not lost).
"""

from __future__ import annotations

import json
import sqlite3
import statistics
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provisioning.registry import CertKind, open_registry

from .scenarios import Findings

if TYPE_CHECKING:
    from .fleet import Fleet


def queued_seqs(state_dir: Path) -> set[int]:
    """Sequence numbers still in a stopped agent's outbox."""
    path = state_dir / "outbox.db"
    if not path.exists():
        return set()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {row[0] for row in db.execute("SELECT seq FROM messages")}


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[
        round(fraction * 100) - 1], 3)


def issuance(fleet: Fleet) -> Counter[str]:
    """Certificates issued, by EST operation, from the registry's audit log."""
    with open_registry(fleet.est.registry_path) as registry:
        log = registry.audit_log(limit=1_000_000)
    return Counter(e.action for e in log if e.decision == "issued")


def attested(fleet: Fleet) -> tuple[int, int]:
    """(operational certificates whose key the EST server verified TPM-resident, all of them),
    from the registry's ``certificates.attested``."""
    with open_registry(fleet.est.registry_path) as registry:
        operational = [c for c in registry.certificates() if c.kind is CertKind.OPERATIONAL]
    return sum(c.attested for c in operational), len(operational)


def build_report(fleet: Fleet, found: Findings, scenario: str, mode: str) -> dict[str, Any]:
    sent = lost = queued_total = 0
    lost_by_device: dict[str, int] = {}
    for device_id, status in found.final.items():
        last = status.get("last_seq") or 0
        sent += last
        missing = set(fleet.monitor.missing(device_id, 1, last))
        queued = queued_seqs(fleet.agents[device_id].config.paths.state_dir)
        queued_total += len(queued & missing)
        if missing - queued:
            lost_by_device[device_id] = len(missing - queued)
            lost += len(missing - queued)
    issued = issuance(fleet)
    enrolled = len(fleet.agents) - len(found.not_enrolled)
    failures = list(found.failures)
    if lost:
        failures.append(f"{lost} message(s) lost: {lost_by_device}")
    attested_count, operational = attested(fleet)
    if fleet.options.key_attestation == "required" and attested_count < operational:
        failures.append(f"key attestation required, yet {operational - attested_count} "
                        "certificate(s) issued for unattested keys")
    colds = list(found.cold_starts.values())
    return {
        "scenario": scenario,
        "mode": mode,
        "devices": len(fleet.agents),
        "enrolled": enrolled,
        "connected": found.connected_at_end,
        "connected_peak": max((s.connected for s in _samples(fleet)), default=0),
        "messages_sent": sent,
        "messages_received": fleet.monitor.unique_received(),
        "messages_duplicate": fleet.monitor.received - fleet.monitor.unique_received(),
        "messages_lost": lost,
        "messages_queued": queued_total,
        "key_attestation": fleet.options.key_attestation,
        "certificates_issued": operational,
        "certificates_attested": attested_count,
        "renewals": issued["simplereenroll"],
        "recoveries": issued["recovery"] + max(0, issued["simpleenroll"] - enrolled),
        "offline_devices": len(found.offline),
        "recovered": len(found.recovered),
        "revoked": len(found.revoked),
        "revoked_disconnected": len(found.revoked_disconnected),
        "cold_start_p50_s": percentile(colds, 0.50),
        "cold_start_p95_s": percentile(colds, 0.95),
        "reconnect_all_s": None if found.reconnect_all_s is None
        else round(found.reconnect_all_s, 3),
        "reconnects_per_s_peak": found.reconnects_per_s_peak,
        "certificate_lifetime_s": fleet.options.lifetime_s,
        "telemetry_interval_s": fleet.options.interval_s,
        "duration_s": round(fleet.now(), 1),
        "events": [{"at_s": round(at, 2), "event": label} for at, label in fleet.events],
        "failures": failures,
    }


def _samples(fleet: Fleet) -> list[Any]:
    return fleet.sampler.samples if fleet.sampler else []


def keys_label(report: dict[str, Any]) -> str:
    if report.get("mode") == "file":
        return "file-backed keys (simulation), no key attestation"
    return f"TPM-backed, key attestation {report.get('key_attestation', 'off')}"


def print_table(report: dict[str, Any]) -> None:
    print(f"fleet-sim {report['scenario']}: {report['devices']} devices, {keys_label(report)}")
    keys = [k for k in report if k not in ("events", "failures")]
    width = max(map(len, keys))
    print("-" * (width + 20))
    for key in keys:
        value = report[key]
        print(f"{key:<{width}}  {'-' if value is None else value}")
    print("-" * (width + 20))
    for failure in report["failures"]:
        print(f"FAIL {failure}")
    print("PASS" if not report["failures"] else f"FAILED ({len(report['failures'])})")


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_plot(fleet: Fleet, report: dict[str, Any], path: Path) -> None:
    """Connected devices and the monitor's message rate over time, events marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = _samples(fleet)
    arrivals = [t - fleet.t0 for t in fleet.monitor.arrivals if t >= fleet.t0]
    end = max([s.at for s in samples] + arrivals + [1.0])
    rate = Counter(int(t) for t in arrivals)
    seconds = list(range(int(end) + 1))
    height = 6.5 + 0.13 * len(fleet.events)
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, height))
    top.step([s.at for s in samples], [s.connected for s in samples], where="post")
    top.set_ylabel("devices connected\n(status files, 2 s)")
    top.set_ylim(0, report["devices"] * 1.1 + 0.5)
    bottom.plot(seconds, [rate.get(s, 0) for s in seconds], color="tab:green")
    bottom.set_ylabel("messages/s at the monitor")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("seconds since the enrollment storm began")
    for number, (at, _label) in enumerate(fleet.events, 1):
        for axis in (top, bottom):
            axis.axvline(at, color="tab:red", alpha=0.35, linewidth=0.8)
        top.annotate(str(number), (at, top.get_ylim()[1]), fontsize=7, va="top", ha="right",
                     xytext=(-1, -2 - 8 * (number % 2)), textcoords="offset points")
    legend = "\n".join(f"{n}. {at:6.1f}s  {label}" for n, (at, label) in
                       enumerate(fleet.events, 1))
    figure.text(0.01, 0.01, legend, fontsize=7, family="monospace", va="bottom")
    verdict = "PASS" if not report["failures"] else "FAIL"
    top.set_title(f"fleet-sim {report['scenario']}: {report['devices']} devices, "
                  f"{keys_label(report)}, "
                  f"{report['messages_sent']} sent, {report['messages_lost']} lost ({verdict})")
    figure.tight_layout(rect=(0, 0.13 * len(fleet.events) / height + 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
