"""The Prometheus text exposition format (version 0.0.4), written by hand.

Two writers share it: the agent's textfile for node_exporter (health.py) and the
est-server supervisor's ``/metrics`` (provisioning/_est_metrics.py). Neither takes
``prometheus_client``: the daemon's resident memory is measured (issue 15), and the
server sums its workers' counts itself. Standard library only and in device_agent,
since the device never imports provisioning while provisioning may import this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

Labels = Iterable[tuple[str, object]]


def number(value: float) -> str:
    """A sample value as Prometheus reads it: ``3`` for 3.0, ``0.25``, ``+Inf``."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _braces(labels: Sequence[tuple[str, object]]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels) + "}"


def sample(name: str, value: float, labels: Labels = ()) -> str:
    """One counter or gauge sample line, its labels sorted by name."""
    return f"{name}{_braces(sorted(labels))} {number(value)}"


def histogram(name: str, labels: Labels, bounds: Sequence[float], counts: Sequence[float],
              total: float) -> list[str]:
    """A histogram's sample lines from per-bucket ``counts`` (one per bound, then one for
    +Inf; not cumulative) and the ``total`` observed: the cumulative ``_bucket`` lines
    with ``le`` after the other labels, then ``_sum`` and ``_count``."""
    base = sorted(labels)
    lines = []
    running = 0.0
    for bound, count in zip((*bounds, math.inf), counts, strict=True):
        running += count
        lines.append(f"{name}_bucket{_braces([*base, ('le', number(bound))])} "
                     f"{number(running)}")
    lines.append(f"{name}_sum{_braces(base)} {number(total)}")
    lines.append(f"{name}_count{_braces(base)} {number(running)}")
    return lines


def exposition(families: Mapping[str, Sequence[str]],
               described: Mapping[str, tuple[str, str]]) -> str:
    """The whole text: each family that has samples, in the order given, under its HELP and
    TYPE lines. ``described`` maps a name to its (type, help); a name it lacks is written
    as ``untyped`` with its name for help."""
    out: list[str] = []
    for name, lines in families.items():
        if lines:
            kind, text = described.get(name, ("untyped", name))
            out += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", *lines]
    return "\n".join(out) + "\n"
