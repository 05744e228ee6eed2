"""The back office's one way to revoke: the registry, the CRL and the brokers in one call.

``device-pki`` (revoke, revoke-device, suspend, activate, decommission) and the
EST server (every supersede, :mod:`provisioning.crl_publisher`) go through
here, so no path changes the registry without the CRL following, and a
device's ban on the broker follows its state in the registry:

==============  ===============  =====================  ===============================
call            device state     certificates revoked   on each broker
==============  ===============  =====================  ===============================
revoke          unchanged        that one               CRL, reload, sessions ended
revoke_device   suspended        every unexpired one    CRL, reload, sessions ended,
                                                        banned
suspend         suspended        none                   sessions ended, banned
activate        active           none                   ban lifted
decommission    decommissioned   every unexpired one    CRL, reload, banned for good
==============  ===============  =====================  ===============================

The registry changes in one transaction, so a renewal racing a
``revoke_device`` either lands first (and its certificate is revoked with the
rest) or meets the suspended device (and is refused). The CRL is signed from
the registry afterwards, under the CRL's own lock; brokers are changed last,
each independently. A broker that is not running gets the CRL for its start
and its bans at the next ``broker-config refresh-crl --registry`` (the shipped
timer), which makes every broker's bans follow the registry's states; a broker
that is running but cannot be told fails the call after the registry and the
CRL have changed, and the command can be run again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker_config import revocation as broker
from broker_config.crl import registry_expiries

from . import pki
from .errors import PKIError
from .registry import DeviceState, Registry, open_registry


@dataclass(frozen=True)
class Revoked:
    """What one call did."""

    device_id: str
    state: DeviceState
    serials: tuple[str, ...]                     # revoked by this call
    crl: x509.CertificateRevocationList | None   # published by this call
    brokers: tuple[str, ...] = ()                # one line per broker

    def describe(self) -> str:
        parts = [f"{self.device_id} {self.state.value}"]
        if self.serials:
            parts.append(f"revoked {', '.join(self.serials)}")
        if self.crl is not None:
            number = self.crl.extensions.get_extension_for_class(x509.CRLNumber).value
            parts.append(f"CRL {number.crl_number} published")
        return "; ".join(parts + list(self.brokers))


class Revocations:
    """Revocation against one registry and one Device CA, enforced on ``brokers``."""

    def __init__(self, paths: pki.PKIPaths, authority: pki.Authority | None,
                 registry: Path | str | None = None, crl: Path | None = None,
                 brokers: Sequence[Path] = ()) -> None:
        """``authority`` (the unlocked Device CA) may be None for :meth:`suspend` and
        :meth:`activate`, which publish nothing."""
        self.paths = paths
        self.authority = authority
        self.registry_path = registry or paths.registry
        self.crl_path = crl or paths.crl
        self.brokers = tuple(brokers)

    # --- the calls ------------------------------------------------------------------------

    def revoke(self, serial: int | str, reason: x509.ReasonFlags) -> Revoked:
        """One operational certificate; the device keeps its state (and no ban)."""
        with open_registry(self.registry_path) as registry:
            record = registry.revoke(serial, reason, issuer=self._ca().certificate.subject)
            device = registry.device(record.device_id)
            crl = self.publish(registry)
        state = device.state if device else DeviceState.ACTIVE
        return self._enforce(Revoked(record.device_id, state, (record.serial,), crl),
                             banned=state is not DeviceState.ACTIVE)

    def revoke_device(self, device_id: str, reason: x509.ReasonFlags) -> Revoked:
        """Suspend the device and revoke every certificate it could still use."""
        return self._change(device_id, DeviceState.SUSPENDED, reason)

    def decommission(self, device_id: str) -> Revoked:
        """Retire the device for good: its certificates revoked, banned on every broker."""
        return self._change(device_id, DeviceState.DECOMMISSIONED,
                            x509.ReasonFlags.cessation_of_operation)

    def suspend(self, device_id: str) -> Revoked:
        """Refuse its enrollments and its broker sessions until :meth:`activate`; its
        certificates stay valid (a suspension is meant to be lifted)."""
        return self._change(device_id, DeviceState.SUSPENDED, None)

    def activate(self, device_id: str) -> Revoked:
        """Lift a suspension: enrollments accepted again, the broker's ban lifted.

        Certificates revoked meanwhile stay revoked: the device comes back through
        its bootstrap certificate.
        """
        return self._change(device_id, DeviceState.ACTIVE, None)

    def publish(self, registry: Registry) -> x509.CertificateRevocationList:
        """Sign and write the CRL from ``registry``'s revocations (under the CRL's lock)."""
        return pki.publish_crl(self._ca(), registry.revocations, self.crl_path,
                               pki.crl_lifetime(self.paths))

    def _ca(self) -> pki.Authority:
        if self.authority is None:
            raise PKIError("revocation needs the Device CA's key")
        return self.authority

    # --- how ------------------------------------------------------------------------------

    def _change(self, device_id: str, state: DeviceState,
                reason: x509.ReasonFlags | None) -> Revoked:
        now = dt.datetime.now(dt.UTC)
        with open_registry(self.registry_path) as registry:
            with registry.transaction():
                registry.set_state(device_id, state)
                serials = registry.unexpired_operational(device_id, now) \
                    if reason is not None else ()
                for serial in serials:
                    registry.revoke(serial, reason or x509.ReasonFlags.unspecified, now,
                                    issuer=self._ca().certificate.subject)
            crl = self.publish(registry) if serials or reason is not None else None
        return self._enforce(Revoked(device_id, state, serials, crl),
                             banned=state is not DeviceState.ACTIVE)

    def _enforce(self, done: Revoked, banned: bool) -> Revoked:
        lines = []
        crl_pem = done.crl.public_bytes(serialization.Encoding.PEM) if done.crl else None
        later = "not running: {}; its bans follow the registry at the next refresh-crl"
        for base in self.brokers:
            if crl_pem is not None:
                enforced = broker.enforce(base, done.device_id, crl_pem,
                                          expiries=registry_expiries(self.registry_path),
                                          keep_banned=banned)
                lines.append(f"broker {base}: " + (
                    later.format("CRL installed for its start") if enforced.broker_pid is None
                    else f"CRL installed, sessions ended in {enforced.seconds * 1000:.0f} ms"
                    + (", banned" if banned else "")))
            elif banned:
                lines.append(f"broker {base}: " + ("sessions ended, banned"
                             if broker.ban(base, done.device_id) else later.format("no ban")))
            else:
                lines.append(f"broker {base}: " + ("ban lifted" if broker.lift(base, done.device_id)
                             else later.format("ban not lifted")))
        return Revoked(done.device_id, done.state, done.serials, done.crl, tuple(lines))
