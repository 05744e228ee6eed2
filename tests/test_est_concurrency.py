"""Many devices at once: every enrollment succeeds, serials are distinct, the registry agrees."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from provisioning import pki
from provisioning.registry import CertKind, serial_hex

from .est_support import ESTServer, Identity, Reply, bootstrap_identity, enroll, new_key

pytestmark = pytest.mark.integration
DEVICES = 200


def test_200_simultaneous_enrollments(est_server: ESTServer, factory_ca: pki.Authority,
                                      tmp_path: Path) -> None:
    devices = [bootstrap_identity(tmp_path, factory_ca, f"crowd-{i:03d}") for i in range(DEVICES)]
    with est_server.registry() as registry, registry.transaction():
        for boot in devices:
            registry.register_device(boot.device_id, boot.certificate)
    start = threading.Barrier(DEVICES, timeout=60)

    def one(boot: Identity) -> Reply:
        key = new_key()
        start.wait()
        return enroll(est_server, boot, key)

    with ThreadPoolExecutor(DEVICES) as pool:
        replies = list(pool.map(one, devices))

    assert Counter(r.status for r in replies) == {200: DEVICES}, \
        [r.text for r in replies if r.status != 200][:3]
    issued = {boot.device_id: reply.certificates()[0] for boot, reply in zip(devices, replies,
                                                                           strict=True)}
    assert len({c.serial_number for c in issued.values()}) == DEVICES
    with est_server.registry() as registry:
        for device_id, cert in issued.items():
            operational = [r for r in registry.certificates(device_id)
                           if r.kind is CertKind.OPERATIONAL]
            assert [r.serial for r in operational] == [serial_hex(cert.serial_number)]
        decisions = Counter((e.device_id, e.decision) for e in registry.audit_log(limit=10000)
                            if e.device_id and e.device_id.startswith("crowd-"))
    assert decisions == Counter({(d.device_id, "allowlisted"): 1 for d in devices}
                                | {(d.device_id, "issued"): 1 for d in devices})
