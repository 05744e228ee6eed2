"""The provider version decides the property query; nothing else differs."""

from __future__ import annotations

import pytest

from device_agent.tls import SIGNATURE_ONLY_QUERY, ProviderInfo, property_query_for


@pytest.mark.parametrize("version", ["1.1.1", "1.1.0", "unknown", ""])
def test_providers_that_export_public_halves_get_the_signature_only_query(version: str) -> None:
    assert property_query_for(version) == SIGNATURE_ONLY_QUERY


@pytest.mark.parametrize("version", ["1.2.0", "1.3.0", "1.3.1-rc1", "2.0"])
def test_providers_with_fixed_export_need_no_query(version: str) -> None:
    assert property_query_for(version) == ""


def test_file_keys_stay_usable_only_without_a_query() -> None:
    assert ProviderInfo("1.3.0", "device:", "").file_keys_usable
    assert not ProviderInfo("1.1.1", "device:", SIGNATURE_ONLY_QUERY).file_keys_usable
