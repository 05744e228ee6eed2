"""The broker-configuration branch of the project's exceptions."""

from __future__ import annotations

from device_agent.errors import IdentityError


class BrokerConfigError(IdentityError):
    """A broker configuration could not be rendered, installed or applied."""


class RevocationError(BrokerConfigError):
    """A revocation could not be enforced on the running broker.

    ``step`` names what failed so the caller knows whether the device may still
    hold a session: ``crl`` (the CRL was refused: nothing installed), ``pid-file``
    (the broker's pid file could not be read, or names no running broker),
    ``signal`` (the SIGHUP a legacy broker without the CRL directory gets failed),
    ``kick`` (the plugin did not end the device's sessions).
    """

    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


class CRLRefused(RevocationError):
    """A CRL that would roll back the installed one (fewer revoked certificates, an
    older thisUpdate or a lower CRL number); nothing was written.

    ``dropped`` lists the revoked serials it would have let back in.
    """

    def __init__(self, message: str, dropped: tuple[int, ...] = ()) -> None:
        super().__init__(message, "crl")
        self.dropped = dropped
