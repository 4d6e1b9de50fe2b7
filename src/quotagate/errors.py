"""One exception root, one subclass per cause. server/status.py maps them to gRPC codes."""

from __future__ import annotations


class QuotagateError(Exception):
    """Root of every error quotagate raises on purpose."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(QuotagateError):
    """The request is malformed; `field` names the offending field. Nothing changed."""


class NotFound(QuotagateError):
    """A referenced entity (reservation, org, team, seat) does not exist."""


class AlreadyExists(QuotagateError):
    """The entity to create exists already."""


class FailedPrecondition(QuotagateError):
    """The request is well formed but the state does not allow it (e.g. extend a committed hold)."""


class Unavailable(QuotagateError):
    """A dependency (Redis) cannot be reached; the caller may retry."""


class Unauthenticated(QuotagateError):
    """No or unknown credentials."""


class PermissionDenied(QuotagateError):
    """The credentials do not allow this call."""


class ConfigError(QuotagateError):
    """A setting or the catalog file is invalid; `field` names the variable or key."""


BY_CODE: dict[str, type[QuotagateError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": AlreadyExists,
    "FAILED_PRECONDITION": FailedPrecondition,
}
