"""The agent's health as operators watch it: counters for the status file, and a Prometheus
textfile for node_exporter's textfile collector (``[metrics] textfile``).

Standard library only, like the rest of the daemon: the text format is a few
lines, and the daemon's resident memory is measured (issue 15). Every name
starts ``device_agent_``; a label is the device ID, a state, a work kind or an
outcome, never free text. :func:`textfile` is a pure function of the status the
agent writes anyway, so what ``status --json`` says and what Prometheus sees
cannot disagree.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ._files import write_private
from ._prometheus import exposition, sample

# (type, help) per metric, in the order they are written
_METRICS = {
    "device_agent_info": ("gauge", "Always 1; the labels say who and in which state"),
    "device_agent_status_timestamp_seconds": ("gauge", "When the agent wrote this file"),
    "device_agent_certificate_expiry_seconds": ("gauge", "Seconds until the current "
                                                         "certificate expires (negative: expired)"),
    "device_agent_certificate_generation": ("gauge", "The credential generation in use"),
    "device_agent_connected": ("gauge", "1 while connected to the broker"),
    "device_agent_reconnects_total": ("counter", "Broker connections after the first"),
    "device_agent_outbox_depth": ("gauge", "Messages waiting in the outbox"),
    "device_agent_outbox_dropped_total": ("counter", "Messages the full outbox dropped"),
    "device_agent_tpm_errors_total": ("counter", "TPM errors: probes, key loads, "
                                                 "credential jobs"),
    "device_agent_credential_jobs_total": ("counter", "Credential jobs (enroll, renew, "
                                                      "recovery, bootstrap) by outcome"),
    "device_agent_last_renewal_timestamp_seconds": ("gauge", "When the last credential job "
                                                             "answered"),
    "device_agent_last_renewal_success": ("gauge", "1 if the last credential job was issued "
                                                   "a certificate"),
    "device_agent_errors": ("gauge", "Recent errors kept in the status (at most 10)"),
}
CREDENTIAL_WORK = ("enroll", "renew", "recovery", "bootstrap")


class Health:
    """What the agent counts for operators; safe to call from its threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tpm_errors = 0
        self.jobs: Counter[tuple[str, str]] = Counter()
        self.last_renewal: dict[str, Any] | None = None
        self._connects_before = 0  # by the links of earlier generations

    def tpm_error(self) -> None:
        with self._lock:
            self.tpm_errors += 1

    def job_done(self, work: str, outcome: str, detail: str = "",
                 at: float | None = None) -> None:
        """A credential job answered: ``outcome`` is issued, refused or failed."""
        if work not in CREDENTIAL_WORK:
            return  # a clock question is not a renewal
        when = time.time() if at is None else at
        with self._lock:
            self.jobs[(work, outcome)] += 1
            self.last_renewal = {"work": work, "outcome": outcome, "detail": detail[:200],
                                 "at": _iso(when), "at_ts": round(when, 3)}

    def link_closed(self, connects: int) -> None:
        """A link is replaced (a new generation): keep the connections it made."""
        with self._lock:
            self._connects_before += connects

    def fields(self, connects_now: int) -> dict[str, Any]:
        """The status file's health keys (``connects_now``: the current link's count)."""
        with self._lock:
            connects = self._connects_before + connects_now
            return {"tpm_errors": self.tpm_errors, "connects": connects,
                    "reconnects": max(0, connects - 1),
                    "last_renewal": dict(self.last_renewal) if self.last_renewal else None,
                    "credential_jobs": {f"{work}:{outcome}": n
                                        for (work, outcome), n in sorted(self.jobs.items())}}


def job_tpm_error(output: str) -> bool:
    """Whether a credential job's answer (its last stdout line) says the TPM failed."""
    lines = output.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else None
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("tpm") is True


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def textfile(status: dict[str, Any]) -> str:
    """The Prometheus text for ``status`` (the agent's :meth:`status` with health keys).

    A value the status does not have (no certificate yet) is left out, never
    written as 0, which would read as "expires now".
    """
    samples: dict[str, list[str]] = {name: [] for name in _METRICS}
    device = status.get("device_id") or ""
    samples["device_agent_info"].append(sample(
        "device_agent_info", 1, {"device_id": device, "state": status.get("state") or "",
                                 "keystore": status.get("keystore") or ""}.items()))
    plain = {
        "device_agent_status_timestamp_seconds": status.get("updated", time.time()),
        "device_agent_certificate_expiry_seconds": status.get("cert_expires_in_s"),
        "device_agent_certificate_generation": status.get("generation"),
        "device_agent_connected": 1 if status.get("connected") else 0,
        "device_agent_reconnects_total": status.get("reconnects"),
        "device_agent_outbox_depth": status.get("outbox_depth"),
        "device_agent_outbox_dropped_total": status.get("outbox_dropped"),
        "device_agent_tpm_errors_total": status.get("tpm_errors"),
        "device_agent_errors": len(status.get("errors") or ()),
    }
    for name, value in plain.items():
        if isinstance(value, int | float) and not isinstance(value, bool) \
                and math.isfinite(value):
            samples[name].append(sample(name, value))
    for key, count in (status.get("credential_jobs") or {}).items():
        work, _, outcome = key.partition(":")
        samples["device_agent_credential_jobs_total"].append(sample(
            "device_agent_credential_jobs_total", count,
            {"work": work, "outcome": outcome}.items()))
    last = status.get("last_renewal")
    if last:
        samples["device_agent_last_renewal_timestamp_seconds"].append(sample(
            "device_agent_last_renewal_timestamp_seconds", last["at_ts"]))
        samples["device_agent_last_renewal_success"].append(sample(
            "device_agent_last_renewal_success", 1 if last["outcome"] == "issued" else 0))
    return exposition(samples, _METRICS)


def write_textfile(path: Path, status: dict[str, Any]) -> None:
    """Atomically, readable by node_exporter (0644): it never reads half a file
    (the collector's own advice: write elsewhere, then rename)."""
    write_private(path, textfile(status).encode(), 0o644)
