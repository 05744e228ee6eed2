"""The back office's branch of the project's exceptions.

A caller catches the branch it can act on: the CLI turns any of them into one
line on stderr, the EST server turns :class:`EnrollmentRefused` into an HTTP
answer without having to know which check failed.
"""

from __future__ import annotations

from device_agent.errors import IdentityError


class ProvisioningError(IdentityError):
    """Root of the PKI, registry and enrollment errors."""


class PKIError(ProvisioningError):
    """A CA could not be read, unlocked or used, or a CRL could not be published."""


class RegistryError(ProvisioningError):
    """The registry refused a change (unknown device, conflicting record) or failed."""


class EnrollmentRefused(ProvisioningError):
    """An enrollment request was refused or held; carries the HTTP answer to give.

    ``status`` is the HTTP status, ``reason`` the short text the client reads,
    ``retry_after`` the seconds to send in ``Retry-After`` (202, 429, 503).
    """

    def __init__(self, status: int, reason: str, retry_after: int | None = None) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
