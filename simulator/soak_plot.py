"""The soak's plot: connected devices, message rate and issuances per second over time,
with every fault marked on a timeline of its own (one row per kind)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .report import keys_label
from .soak import FaultKind

if TYPE_CHECKING:
    from .fleet import Fleet


def write_soak_plot(fleet: Fleet, report: dict[str, Any], issued_at: list[float],
                    path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = fleet.sampler.samples if fleet.sampler else []
    arrivals = [t - fleet.t0 for t in fleet.monitor.arrivals if t >= fleet.t0]
    end = max([s.at for s in samples] + arrivals + [1.0])
    seconds = list(range(int(end) + 1))
    rate, issued = Counter(int(t) for t in arrivals), Counter(int(t) for t in issued_at)
    kinds = [kind.value for kind in FaultKind]
    figure, (connected, messages, issuance, faults) = plt.subplots(
        4, 1, sharex=True, figsize=(12, 10), gridspec_kw={"height_ratios": [2, 2, 1.3, 2.6]})
    connected.step([s.at for s in samples], [s.connected for s in samples], where="post")
    connected.set_ylabel("devices connected\n(status files)")
    connected.set_ylim(0, report["devices"] * 1.1 + 0.5)
    messages.plot(seconds, [rate.get(s, 0) for s in seconds], color="tab:green")
    messages.set_ylabel("messages/s\nat the monitor")
    messages.set_ylim(bottom=0)
    issuance.bar(seconds, [issued.get(s, 0) for s in seconds], width=1.0, color="tab:purple")
    issuance.set_ylabel("issuances/s\n(registry)")
    for start, stop, kind, _device in report.get("fault_spans", []):
        row = kinds.index(kind)
        faults.broken_barh([(start, max(stop - start, 0.6))], (row - 0.35, 0.7),
                           color=f"C{row % 10}", alpha=0.8)
        for axis in (connected, messages, issuance):
            axis.axvline(start, color=f"C{row % 10}", alpha=0.25, linewidth=0.7)
    for crash in report.get("broker_crashes", []):
        for axis in (connected, messages, issuance, faults):
            axis.axvline(crash["at_s"], color="red", linestyle=":", linewidth=1.2)
    for start, stop in report.get("crl_lapses", []):
        for axis in (connected, messages, issuance, faults):
            axis.axvspan(start, stop, color="red", alpha=0.2)
    faults.set_yticks(range(len(kinds)), kinds, fontsize=7)
    faults.set_ylim(-0.6, len(kinds) - 0.4)
    faults.set_ylabel("faults")
    for label, at in (("faults", report.get("faults_started_s")),
                      ("settle", report.get("settle_started_s"))):
        if at is not None:
            for axis in (connected, messages, issuance, faults):
                axis.axvline(at, color="black", linestyle="--", linewidth=0.8)
            connected.annotate(label, (at, connected.get_ylim()[1]), fontsize=8, va="top",
                               xytext=(3, -2), textcoords="offset points")
    faults.set_xlabel("seconds since the enrollment storm began (red: broker CRL expired; "
                      "red dotted: broker crashed and was restarted)")
    verdict = "PASS" if not report["failures"] else "FAIL"
    connected.set_title(
        f"fleet-sim soak, seed {report['seed']}: {report['devices']} devices, "
        f"{keys_label(report)}, {sum(report['faults'].values())} faults, "
        f"{report['messages_sent']} sent, {report['messages_lost']} lost, issuances/device "
        f"max {report['issuances_per_device_max']} (justified {report['issuances_expected_max']})"
        f" ({verdict})", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
