"""How a device is named in certificates, CSRs and MQTT: one convention for both sides."""

from __future__ import annotations

import re

DEVICE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
DEVICE_URI_PREFIX = "urn:device:"


def validate_device_id(device_id: str) -> str:
    """Device IDs become MQTT usernames and topic levels: no wildcards, no slashes."""
    if not isinstance(device_id, str) or not DEVICE_ID_PATTERN.fullmatch(device_id):
        # shown short: a CSR's name reaches answers, audit rows and logs from here
        if not isinstance(device_id, str):
            shown = f"of type {type(device_id).__name__}"
        else:
            shown = repr(device_id[:64]) + (f" (+{len(device_id) - 64} characters)"
                                            if len(device_id) > 64 else "")
        raise ValueError(
            f"malformed device ID {shown}: 1-64 characters of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return device_id


def device_uri(device_id: str) -> str:
    """The URI SAN that names the device beside its CN."""
    return DEVICE_URI_PREFIX + validate_device_id(device_id)


SERVICE_IDENTITIES = frozenset({"backend", "broker-admin"})
"""Names the broker grants service rights (broker_config): never a device's."""


BACKEND_WORKER = re.compile(r"backend-[0-9]+")
"""Further back-end subscribers (broker_config ``backend_workers``): never a device's either."""


def is_service_identity(name: str) -> bool:
    return name in SERVICE_IDENTITIES or BACKEND_WORKER.fullmatch(name) is not None
