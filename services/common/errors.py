"""Domain errors and the one table that maps them to gRPC and HTTP statuses.

Domain code raises these; the gRPC interceptor and the HTTP facade translate them. Errors coming
back from another service are turned into the same classes by `from_rpc_error`, so a bad field
found by the cache service reaches the client as the same INVALID_ARGUMENT with the same details.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from imagegen.v1 import types_pb2


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: `field` is its path in the request (e.g. `spec.width_px`)."""

    field: str
    description: str


class ServiceError(Exception):
    """Base of every error a client may see. Anything else becomes INTERNAL."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[Any]:
        """Rich `google.rpc` detail messages carried with the status."""
        return []


class InvalidArgument(ServiceError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 422

    def __init__(self, violations: list[FieldViolation]) -> None:
        fields = ", ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {fields}")
        self.violations = violations

    @classmethod
    def one(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field, description)])

    def details(self) -> list[Any]:
        return [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=v.field, description=v.description
                    )
                    for v in self.violations
                ]
            )
        ]


class PolicyRefused(InvalidArgument):
    """A request the content policy refused: names the category and the field that carried it,
    never the text that matched."""

    def __init__(self, category: str, field: str) -> None:
        super().__init__([FieldViolation(field, f"refused by the content policy ({category})")])
        self.category = category
        self.field = field

    def details(self) -> list[Any]:
        violation = types_pb2.PolicyViolation(category=self.category, field=self.field)
        return [*super().details(), violation]


class NotFound(ServiceError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class Unauthenticated(ServiceError):
    """No API key, or one that is malformed, unknown or revoked (one answer for all)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class Forbidden(ServiceError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class FailedPrecondition(ServiceError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class PayloadTooLarge(InvalidArgument):
    """A request body (or upload) over its size limit, refused before it is read in full."""

    http_status = 413

    def __init__(self, field: str, limit_bytes: int) -> None:
        super().__init__([FieldViolation(field, f"at most {limit_bytes} bytes")])
        self.limit_bytes = limit_bytes


class DisallowedHost(InvalidArgument):
    """An HTTP request for a host name this server does not answer to (DNS rebinding)."""

    http_status = 400

    def __init__(self) -> None:
        super().__init__([FieldViolation("Host", "this server does not answer to that host name")])


class Conflict(ServiceError):
    """The request clashes with one already made (an idempotency key reused for another body)."""

    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class MethodNotAllowed(ServiceError):
    """An HTTP route asked with a method it does not serve."""

    grpc_code = grpc.StatusCode.UNIMPLEMENTED
    http_status = 405


class Unavailable(ServiceError):
    """A store or peer is away; the same request may succeed after `retry_after_seconds`."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503

    def __init__(self, message: str, retry_after_seconds: int = 2) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds

    def details(self) -> list[Any]:
        delay = duration_pb2.Duration(seconds=self.retry_after_seconds)
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class Cancelled(ServiceError):
    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 409


class QuotaExceeded(ServiceError):
    """A limit refused the request: `subject` names it (`key:<id>/rate`, `tenant:<name>/budget`).
    A limit that frees up with time says when (`retry_after_seconds`); a rate limit also says
    its size (`limit` requests a `window_seconds`) for the RateLimit headers."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429

    def __init__(
        self,
        subject: str,
        description: str,
        retry_after_seconds: int | None = None,
        limit: int | None = None,
        window_seconds: int = 60,
    ) -> None:
        super().__init__(description)
        self.subject = subject
        self.retry_after_seconds = retry_after_seconds
        self.limit = limit
        self.window_seconds = window_seconds

    def details(self) -> list[Any]:
        failure = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=self.subject, description=self.message
                )
            ]
        )
        if self.retry_after_seconds is None:
            return [failure]
        delay = duration_pb2.Duration(seconds=self.retry_after_seconds)
        return [failure, error_details_pb2.RetryInfo(retry_delay=delay)]


_BY_CODE: dict[grpc.StatusCode, type[ServiceError]] = {
    cls.grpc_code: cls
    for cls in (
        NotFound,
        Unauthenticated,
        Forbidden,
        FailedPrecondition,
        Conflict,
        Unavailable,
        Cancelled,
        ServiceError,
    )
}


def to_rpc_status(error: ServiceError) -> grpc.Status:
    """The `grpc.Status` (with packed details) to abort a call with."""
    packed = []
    for detail in error.details():
        message = any_pb2.Any()
        message.Pack(detail)
        packed.append(message)
    status = status_pb2.Status(
        code=getattr(code_pb2, error.grpc_code.name), message=error.message, details=packed
    )
    result: grpc.Status = rpc_status.to_status(status)
    return result


def to_http_body(error: ServiceError) -> dict[str, Any]:
    """The JSON error body the HTTP facade answers with."""
    body: dict[str, Any] = {"code": error.grpc_code.name, "message": error.message}
    if isinstance(error, InvalidArgument):
        body["field_violations"] = [
            {"field": v.field, "description": v.description} for v in error.violations
        ]
    if isinstance(error, QuotaExceeded):
        body["quota_violation"] = {"subject": error.subject}
    if isinstance(error, PolicyRefused):
        body["policy_violation"] = {"category": error.category, "field": error.field}
    return {"error": body}


def from_rpc_error(error: grpc.aio.AioRpcError) -> ServiceError:
    """Turns another service's error back into the domain error it was raised as."""
    code = error.code()
    message = error.details() or code.name
    status = rpc_status.from_call(error)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = []
        for detail in status.details if status else []:
            policy = types_pb2.PolicyViolation()
            if detail.Unpack(policy):
                return PolicyRefused(policy.category, policy.field)
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):
                violations += [
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                ]
        return InvalidArgument(violations or [FieldViolation("", message)])
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
        return Unavailable(message)
    return _BY_CODE.get(code, ServiceError)(message)
