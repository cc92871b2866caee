"""The one error family of the server core; transport/errors.py maps it to gRPC status codes."""

from __future__ import annotations


class ServingError(Exception):
    """Base of every error the core raises on purpose; the message is safe to return to callers."""


class InvalidInput(ServingError):
    """Malformed rows: wrong feature count, unknown or missing feature, non-numeric, +/-inf, empty."""


class RequestTooLarge(ServingError):
    """More rows (or bytes) than the configured limit."""


class ModelUnavailable(ServingError):
    """No model loaded yet, or the server is shutting down; callers may retry."""


class ModelNotFound(ServingError):
    """The request names a model or version that is not the one served."""


class Unauthenticated(ServingError):
    """A control call without credentials."""


class PermissionDenied(ServingError):
    """A control call with wrong credentials, or a caller outside the allow-list."""


class DeadlineExceeded(ServingError):
    """The caller's deadline passed before the work could finish."""


class DecisionNotRecorded(ServingError):
    """Required decision log: the call's record could not be written, so its decision is not given (retry later)."""


class ModelLoadError(Exception):
    """A model version could not be resolved, downloaded, loaded or validated (never served).

    `reason` is the bounded label the load-failure metric counts it under.
    """

    reason = "refused"


class DigestMismatch(ModelLoadError):
    """The model file's sha256 is not the one its version's `tabserve.sha256` tag states (replaced or truncated)."""


class RegistryUnavailable(ModelLoadError):
    """The MLflow tracking/registry server could not be reached."""

    reason = "registry_unreachable"


class VerifierFailed(ModelLoadError):
    """The process that verifies a new artifact died (signal, abort, out-of-memory kill) or ran out of time."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason  # "crash" or "timeout"
