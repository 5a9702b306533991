"""The HTTP facade's edge: what comes in is read and checked here, and every error goes out here.

Bodies are read under a size limit (413 before they are buffered, whether or not they declare a
length) and parsed as strict JSON: no NaN or Infinity, no integer longer than any field could
need, no number that overflows, no string with a control character or a lone surrogate. Each
problem is named by its JSON path (`controlnet.weight`, `fibo_json.objects[2].description`).
`RequestContext` gives every request an id and answers every exception with the one JSON error
body of services.common.errors.
"""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import (
    FieldViolation,
    InvalidArgument,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    ServiceError,
    Unauthenticated,
    Unavailable,
    to_http_body,
)
from services.common.events import check_event_id
from services.common.interceptors import request_id
from services.common.retry import is_blip
from services.common.spec import (
    MAX_REPORTED,
    Where,
    json_nodes,
    json_value_problem,
    path_of,
    text_problem,
)

log = logging.getLogger("imagegen.http")

MAX_JSON_BYTES = 1024 * 1024
# POST /api/evaluate carries images inline (base64): room for several.
MAX_EVALUATE_JSON_BYTES = 24 * 1024 * 1024
MAX_JSON_DEPTH = 64  # room for a FIBO prompt's 32 levels (resolve checks those) and the request
MAX_INT_DIGITS = 30  # no field needs more; Python refuses to parse past 4300
# Values in one body: a FIBO prompt holds at most 32769 (MAX_FIBO_BYTES // 2), the other fields
# a few dozen. Stopping here bounds the walk over a body of tiny values.
MAX_JSON_VALUES = 40_000
MAX_QUERY_CHARS = 512
_FREE_TEXT = frozenset({"prompt", "negative_prompt", "fibo_json"})  # may hold tabs, line breaks
_DIGITS = re.compile(r"[0-9]+")
REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_REQUEST_ID = re.compile(REQUEST_ID_PATTERN[1:-1])


# Bodies


async def read_body(request: Request, limit: int, field: str = "body") -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes: at once for a
    declared length, else while it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not _DIGITS.fullmatch(declared):
            raise InvalidArgument.one("Content-Length", "not a byte count")
        if len(declared) > 19 or int(declared) > limit:
            raise PayloadTooLarge(field, limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(field, limit)
        chunks.append(chunk)
    return b"".join(chunks)


class _Rejected:
    """A number `json.loads` met that no field can hold; reported with its path afterwards."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _constant(name: str) -> _Rejected:
    return _Rejected(f"{name} is not a JSON number; numbers must be finite")


def _integer(text: str) -> int | _Rejected:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        return _Rejected(f"an integer of more than {MAX_INT_DIGITS} digits")
    return int(text)


def _number(text: str) -> float | _Rejected:
    value = float(text)
    return value if math.isfinite(value) else _Rejected("a number too large to represent")


def _top_key(where: Where) -> Any:
    """The body field a node is (or is inside of); None for the body itself."""
    while isinstance(where, tuple) and isinstance(where[0], tuple):
        where = where[0]
    return where[1] if isinstance(where, tuple) else None


def parse_json_object(data: bytes) -> dict[str, Any]:
    """`data` as a JSON object, every value in it checked; raises InvalidArgument naming each
    bad value by its path."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument.one("body", f"not UTF-8 (byte {error.start})") from None
    try:
        value = json.loads(text, parse_constant=_constant, parse_int=_integer, parse_float=_number)
    except json.JSONDecodeError as error:
        at = f"line {error.lineno} column {error.colno}"
        raise InvalidArgument.one("body", f"not valid JSON: {error.msg} at {at}") from None
    except RecursionError:
        raise InvalidArgument.one("body", f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if not isinstance(value, dict):
        raise InvalidArgument.one("body", "must be a JSON object")
    bad: list[FieldViolation] = []
    for count, (where, depth, node) in enumerate(json_nodes(value, "", MAX_JSON_DEPTH)):
        if count >= MAX_JSON_VALUES:
            raise InvalidArgument.one("body", f"more than {MAX_JSON_VALUES} values")
        if isinstance(node, _Rejected):
            problem: str | None = node.reason
        else:
            free_text = isinstance(node, str) and _top_key(where) in _FREE_TEXT
            problem = json_value_problem(node, depth, MAX_JSON_DEPTH, multiline=free_text)
        if problem is not None:
            bad.append(FieldViolation(path_of(where) or "body", problem))
            if len(bad) >= MAX_REPORTED:
                break
    if bad:
        raise InvalidArgument(bad)
    return value


# Query parameters and headers


def query_count(params: QueryParams, name: str, max_digits: int = 6) -> int:
    """A whole number of ASCII digits (str.isdigit would let '²' through to int())."""
    raw = params.get(name)
    if raw is None:
        return 0
    if not _DIGITS.fullmatch(raw) or len(raw) > max_digits:
        raise InvalidArgument.one(name, f"must be a whole number of at most {max_digits} digits")
    return int(raw)


def query_text(params: QueryParams, name: str, max_chars: int = MAX_QUERY_CHARS) -> str:
    raw = params.get(name, "")
    if len(raw) > max_chars:
        raise InvalidArgument.one(name, f"at most {max_chars} characters")
    if problem := text_problem(raw):
        raise InvalidArgument.one(name, problem)
    return raw


def resume_after(request: Request) -> str:
    """The event id an SSE client resumes after: its Last-Event-ID header, else `?after=`;
    checked here so that the error names the one the client sent."""
    header = request.headers.get("last-event-id")
    if header:
        field, value = "Last-Event-ID", header
    else:
        field, value = "after", request.query_params.get("after", "")
    check_event_id(value, field)
    return value


def ascii_digits(value: str, max_digits: int) -> bool:
    return len(value) <= max_digits and _DIGITS.fullmatch(value) is not None


# Request ids and errors


def error_response(error: BaseException) -> JSONResponse:
    """The one JSON error answer: a ServiceError by the status table, Starlette's own 404 and
    405 alike, anything else a 500 whose detail goes to the log, never to the client."""
    headers = None
    if isinstance(error, HTTPException):
        headers = error.headers
        if error.status_code == 405:
            error = MethodNotAllowed("method not allowed on this route")
        elif error.status_code == 404:
            error = NotFound("no such route")
        else:
            error = ServiceError(str(error.detail))
    if not isinstance(error, ServiceError) and is_blip(error):
        error = Unavailable("a store is unavailable; try again shortly")
    if isinstance(error, ServiceError):
        log.info("HTTP %d %s: %s", error.http_status, error.grpc_code.name, error.message)
    else:
        log.exception("unhandled error (request %s)", request_id.get(), exc_info=error)
        error = ServiceError("internal error")
    if isinstance(error, Unavailable):
        headers = {**(headers or {}), "Retry-After": str(error.retry_after_seconds)}
    if isinstance(error, Unauthenticated):
        headers = {**(headers or {}), "WWW-Authenticate": 'Bearer realm="imagegen"'}
    if isinstance(error, QuotaExceeded):
        headers = {**(headers or {}), **rate_limit_headers(error)}
    body = to_http_body(error)
    body["error"]["request_id"] = request_id.get()
    return JSONResponse(body, status_code=error.http_status, headers=headers)


def rate_limit_headers(error: QuotaExceeded) -> dict[str, str]:
    """Retry-After, and for a rate limit the RateLimit headers (IETF httpapi draft: the
    policy's size and window, what is left of it now, and when that changes)."""
    headers = {}
    if error.retry_after_seconds is not None:
        headers["Retry-After"] = str(error.retry_after_seconds)
    if error.limit is not None:
        reset = error.retry_after_seconds or 0
        headers["RateLimit-Policy"] = f"{error.limit};w={error.window_seconds}"
        headers["RateLimit"] = f"limit={error.limit}, remaining=0, reset={reset}"
        headers["RateLimit-Limit"] = str(error.limit)
        headers["RateLimit-Remaining"] = "0"
        headers["RateLimit-Reset"] = str(reset)
    return headers


async def http_exception(request: Request, error: Exception) -> Response:
    """Starlette's exception handler for its own HTTPException (unknown route, wrong method)."""
    return error_response(error)


class RequestContext:
    """Outermost middleware: the request id (from a sane `X-Request-Id`, else a new one) goes
    into the ContextVar the gRPC clients forward and onto every response; an exception that
    escapes a route becomes the JSON error body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        current = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = request_id.set(current)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message)["X-Request-Id"] = current
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            log.info("client went away before its request was read (request %s)", current)
        except Exception as error:
            if started:  # too late for an error body: the client sees the stream break
                log.exception("failed after its response started (request %s)", current)
                raise
            await error_response(error)(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
