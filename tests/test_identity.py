"""Device IDs name MQTT users and topic levels, so only safe characters pass."""

from __future__ import annotations

import pytest

from device_agent.identity import device_uri, validate_device_id


@pytest.mark.parametrize("device_id", ["dev-1", "A", "sensor_042.line-3", "x" * 64])
def test_accepted_device_ids(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


@pytest.mark.parametrize("device_id", ["", "-dev", "dev/1", "dev+", "dev#", "a b", "x" * 65,
                                       "dév", "dev\n"])
def test_refused_device_ids(device_id: str) -> None:
    with pytest.raises(ValueError, match="malformed device ID"):
        validate_device_id(device_id)


def test_device_uri_names_the_device() -> None:
    assert device_uri("dev-1") == "urn:device:dev-1"


def test_a_huge_name_is_not_echoed_whole() -> None:
    """A CSR's CN reaches answers, audit rows and logs through this message."""
    with pytest.raises(ValueError) as refused:
        validate_device_id("A" * 100_000 + "/")
    assert len(str(refused.value)) < 300 and "99937 characters" in str(refused.value)
    with pytest.raises(ValueError):
        validate_device_id(None)  # type: ignore[arg-type]
