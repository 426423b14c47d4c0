"""The platform's error vocabulary.

Every error a caller can see is a ``LambentError``: it carries a human sentence, an HTTP status
and a stable ``type`` name that clients match on. Domain errors live beside their service and
subclass one of the classes below; one handler in ``app.main`` renders them as
``{"type": ..., "message": ...}``. The data layer raises these, never HTTP exceptions.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LambentError(Exception):
    status_code: ClassVar[int] = 500
    type: ClassVar[str] = "ServiceException"

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def body(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.message}

    def headers(self) -> dict[str, str] | None:
        return None


class InvalidParameterValue(LambentError):
    status_code = 400
    type = "InvalidParameterValueException"


class InvalidRequestContent(LambentError):
    status_code = 400
    type = "InvalidRequestContentException"


class Unauthorized(LambentError):
    status_code = 401
    type = "Unauthorized"


class AccessDenied(LambentError):
    status_code = 403
    type = "AccessDenied"


class ResourceNotFound(LambentError):
    """Raised for anything the caller cannot see, including another tenant's resources."""

    status_code = 404
    type = "ResourceNotFound"


class ResourceConflict(LambentError):
    status_code = 409
    type = "ResourceConflictException"


class PayloadTooLarge(LambentError):
    status_code = 413
    type = "RequestTooLargeException"


class TooManyRequests(LambentError):
    status_code = 429
    type = "TooManyRequestsException"

    def __init__(self, message: str, *, retry_after_s: int = 1, **context: Any) -> None:
        super().__init__(message, **context)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class ServiceUnavailable(LambentError):
    status_code = 503
    type = "ServiceUnavailableException"
