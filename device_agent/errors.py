"""One root for every error the project raises, one branch per subsystem.

Callers catch the branch they can act on; each carries the data needed to act
(the TPM response code, the HTTP status and Retry-After). Third-party
exceptions are translated where they enter, with ``raise ... from``.
"""

from __future__ import annotations


class IdentityError(Exception):
    """Root of the project's exceptions."""


class ConfigError(IdentityError):
    """A configuration file or value is malformed; the message names the key."""


class FileStoreError(IdentityError):
    """A state or credential file could not be written or read back."""


class TPMError(IdentityError):
    """The TPM refused or could not be reached. ``rc`` is the TSS2 response code."""

    def __init__(self, message: str, rc: int | None = None) -> None:
        super().__init__(message)
        self.rc = rc


class TPMUnreachableError(TPMError):
    """No TPM answers on the configured TCTI."""


class ResourceManagerAbsentError(TPMError):
    """The TCTI reaches no resource manager (tpm2-abrmd or the kernel's /dev/tpmrm0)."""


class TPMOutOfMemoryError(TPMError):
    """TPM_RC_OBJECT_MEMORY persisted after flushing our transient objects and one retry."""


class KeyFileError(TPMError):
    """A TSS2 key file is unreadable or not a TSS2 private key."""


class ForeignKeyError(KeyFileError):
    """A TSS2 key file was wrapped by another TPM's storage key."""


class TLSSetupError(IdentityError):
    """A TLS context could not be built (provider, certificate or key problem)."""


class ESTError(IdentityError):
    """The EST server refused or could not be reached.

    ``status`` is the HTTP status (None when no answer came), ``retry_after``
    the seconds the server asked us to wait, ``reason`` its short text.
    """

    def __init__(self, message: str, status: int | None = None, reason: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        """Worth trying again later: no answer, busy, pending, or a server fault."""
        return self.status is None or self.status in (202, 408, 429) or self.status >= 500


class ESTPendingError(ESTError):
    """202: the server holds the request until an operator decides (RFC 7030 4.2.3)."""


class CredentialError(IdentityError):
    """The credential store on disk is missing, inconsistent or unusable."""


class BrokerError(IdentityError):
    """The MQTT broker refused us or could not be reached."""


class OutboxError(IdentityError):
    """The durable outbox could not store, read or acknowledge a message."""


class OutboxCorruptError(OutboxError):
    """The outbox file is not a usable SQLite database; ``path`` names it."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class OutboxFullError(OutboxError):
    """The outbox is full and its policy refuses new messages; ``seq`` was not kept."""

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq
