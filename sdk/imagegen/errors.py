"""The SDK's exceptions: one hierarchy for both transports.

Every error the server answers becomes one of these, whether it came as an HTTP status with the
JSON error body or as a gRPC status with `google.rpc` details, and carries the request id the
call was made under. Field paths are named as the SDK's `Spec` names them (`width`,
`controlnet.weight`, `fibo_json.lighting`), whichever transport reported them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imagegen.types import Job


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: `field` is its path (`width`, `guidance_images[1].role`)."""

    field: str
    description: str


class ImagegenError(Exception):
    """Base of every error the SDK raises. `code` is the gRPC status name the server answered
    (`INVALID_ARGUMENT`, ...; `UNAVAILABLE` for a network failure), `request_id` the id of the
    call (the server's X-Request-Id; over gRPC the one the SDK sent), `http_status` the HTTP
    status when the call went over HTTP."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "UNKNOWN",
        request_id: str = "",
        http_status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id
        self.http_status = http_status

    def __str__(self) -> str:
        suffix = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.message}{suffix}"


class InvalidArgument(ImagegenError):
    """The request was refused for its content; `violations` name each bad field."""

    def __init__(
        self,
        message: str,
        violations: list[FieldViolation] | None = None,
        *,
        request_id: str = "",
        http_status: int | None = None,
    ) -> None:
        super().__init__(
            message, code="INVALID_ARGUMENT", request_id=request_id, http_status=http_status
        )
        self.violations: list[FieldViolation] = list(violations or [])

    @property
    def fields(self) -> list[str]:
        """The paths of the bad fields, in the order the server gave them."""
        return [v.field for v in self.violations]


class PolicyRefused(InvalidArgument):
    """The content policy refused the request: the category and the field that carried it
    (never the text that matched)."""

    def __init__(
        self,
        message: str,
        category: str,
        field: str,
        *,
        request_id: str = "",
        http_status: int | None = None,
    ) -> None:
        violation = FieldViolation(field, f"refused by the content policy ({category})")
        super().__init__(message, [violation], request_id=request_id, http_status=http_status)
        self.category = category
        self.field = field


class Unauthenticated(ImagegenError):
    """No API key, or one the server does not know (or revoked)."""


class PermissionDenied(ImagegenError):
    """The key lacks the scope the call needs, or the call is not allowed from here."""


class NotFound(ImagegenError):
    """No such job (another tenant's job reads the same), route or object."""


class Conflict(ImagegenError):
    """The request clashes with one already made (an idempotency key reused for another
    request) or with the job's state."""


class QuotaExceeded(ImagegenError):
    """A rate, concurrency or budget limit refused the request. `retry_after` is the seconds
    the server asked to wait (None for a limit that does not free up with time)."""

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        *,
        request_id: str = "",
        http_status: int | None = None,
    ) -> None:
        super().__init__(
            message, code="RESOURCE_EXHAUSTED", request_id=request_id, http_status=http_status
        )
        self.retry_after = retry_after


class Unavailable(ImagegenError):
    """The server or the network is away (connection refused or broken, 502/503/504,
    UNAVAILABLE, a timeout); the same call may succeed later. `retry_after` is the wait the
    server asked for, if it said."""

    def __init__(
        self,
        message: str,
        retry_after: float | None = None,
        *,
        code: str = "UNAVAILABLE",
        request_id: str = "",
        http_status: int | None = None,
    ) -> None:
        super().__init__(message, code=code, request_id=request_id, http_status=http_status)
        self.retry_after = retry_after


class WaitTimeout(Unavailable, TimeoutError):
    """`wait` or `generate` gave up before the job ended (the job goes on)."""

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message, code="DEADLINE_EXCEEDED")
        self.job_id = job_id


class Unsupported(ImagegenError):
    """The call is not offered over this transport (the public gRPC API has no uploads, cache
    lookups or model list: give the client an `http_url` for those)."""


class IntegrityError(ImagegenError):
    """Downloaded bytes do not match the artifact's SHA-256."""


class JobFailed(ImagegenError):
    """The job ended failed or cancelled; `job` is the job as it ended."""

    def __init__(self, job: Job) -> None:
        reason = f": {job.error}" if job.error else ""
        super().__init__(f"job {job.id} {job.status.value}{reason}", code=job.status.name)
        self.job = job


# The gRPC status names the server answers with, and the class each becomes (with
# INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE and DEADLINE_EXCEEDED in `error_for`: the
# one table, which both transports read).
BY_CODE: dict[str, type[ImagegenError]] = {
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "NOT_FOUND": NotFound,
    "ALREADY_EXISTS": Conflict,
    "FAILED_PRECONDITION": Conflict,
    "ABORTED": Conflict,
}


def error_for(
    code: str,
    message: str,
    *,
    request_id: str = "",
    http_status: int | None = None,
    violations: list[FieldViolation] | None = None,
    policy: tuple[str, str] | None = None,
    retry_after: float | None = None,
) -> ImagegenError:
    """The exception for a status the server answered (either transport)."""
    if code == "INVALID_ARGUMENT":
        if policy is not None:
            return PolicyRefused(message, *policy, request_id=request_id, http_status=http_status)
        return InvalidArgument(message, violations, request_id=request_id, http_status=http_status)
    if code == "RESOURCE_EXHAUSTED":
        return QuotaExceeded(message, retry_after, request_id=request_id, http_status=http_status)
    if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return Unavailable(
            message, retry_after, code=code, request_id=request_id, http_status=http_status
        )
    cls = BY_CODE.get(code, ImagegenError)
    return cls(message, code=code, request_id=request_id, http_status=http_status)
