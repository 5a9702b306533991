"""Cross-cutting RPC work: request ids, logging, metrics and the exception-to-status table.

Handlers raise domain errors (services.common.errors); this is the only place that turns them
into gRPC statuses. Anything unexpected becomes INTERNAL with a generic message, and the detail
goes to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common import metrics
from services.common.errors import ServiceError, Unavailable, to_rpc_status
from services.common.retry import is_blip

log = logging.getLogger("imagegen.rpc")

REQUEST_ID_HEADER = "x-request-id"
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def _request_id_from(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str):
            return value
    return uuid.uuid4().hex


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], method: str, error: BaseException
) -> None:
    if not isinstance(error, ServiceError) and is_blip(error):
        error = Unavailable("a store is unavailable; try again shortly")
    if isinstance(error, ServiceError):
        log.info("%s -> %s: %s", method, error.grpc_code.name, error.message)
        await context.abort_with_status(to_rpc_status(error))
    log.exception("%s failed", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps the behaviour of unary and server-streaming handlers:
    subclasses say how (`wrap_unary`, `wrap_stream`; unchanged by default)."""

    def wrap_unary(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        return behaviour

    def wrap_stream(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        return behaviour

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        # Generated handlers are namedtuples: swap the behaviour, keep the (de)serializers.
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary is not None:
            wrapped = self.wrap_unary(handler_call_details, handler.unary_unary)
            return handler._replace(unary_unary=wrapped)
        if handler.unary_stream is not None:
            wrapped = self.wrap_stream(handler_call_details, handler.unary_stream)
            return handler._replace(unary_stream=wrapped)
        return handler


class ErrorInterceptor(HandlerInterceptor):
    """Sets the request id, logs each call, and maps exceptions to statuses."""

    def wrap_unary(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        return _wrap_unary(call.method, behaviour)

    def wrap_stream(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        return _wrap_stream(call.method, behaviour)


def _wrap_unary(method: str, behaviour: Any) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request_id.set(_request_id_from(context))
        started = time.perf_counter()
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - the one place that maps every error
            await _abort(context, method, error)
        finally:
            log.debug("%s took %.1f ms", method, (time.perf_counter() - started) * 1e3)

    return wrapped


def _wrap_stream(method: str, behaviour: Any) -> Any:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        request_id.set(_request_id_from(context))
        try:
            async for response in behaviour(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - the one place that maps every error
            await _abort(context, method, error)

    return wrapped


def _names(method: str) -> tuple[str, str]:
    """("imagegen.v1.ImageService", "CreateJob") from "/imagegen.v1.ImageService/CreateJob"."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _ended_with(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None) -> str:
    """The status code name a call ended with: the one it aborted with or set, a domain error's,
    CANCELLED when the client went away, else INTERNAL for an error and OK without one."""
    if isinstance(error, ServiceError):
        return error.grpc_code.name
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is not None:
        return grpc.StatusCode.INTERNAL.name
    return grpc.StatusCode.OK.name


class MetricsInterceptor(HandlerInterceptor):
    """Counts each call by the status it ended with, times it (a stream: to its last message)
    and keeps the calls in flight. Outermost, so the error interceptor has mapped the error."""

    def wrap_unary(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        return _measure_unary(_names(call.method), behaviour)

    def wrap_stream(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        return _measure_stream(_names(call.method), behaviour)


def _record(names: tuple[str, str], started: float, code: str) -> None:
    metrics.GRPC_SERVER_HANDLED.labels(*names, code).inc()
    metrics.GRPC_SERVER_SECONDS.labels(*names).observe(time.perf_counter() - started)
    metrics.GRPC_SERVER_IN_FLIGHT.labels(*names).dec()


def _measure_unary(names: tuple[str, str], behaviour: Any) -> Any:
    async def measured(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        metrics.GRPC_SERVER_IN_FLIGHT.labels(*names).inc()
        started, error = time.perf_counter(), None
        try:
            return await behaviour(request, context)
        except BaseException as raised:
            error = raised
            raise
        finally:
            _record(names, started, _ended_with(context, error))

    return measured


def _measure_stream(names: tuple[str, str], behaviour: Any) -> Any:
    async def measured(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        metrics.GRPC_SERVER_IN_FLIGHT.labels(*names).inc()
        started, error = time.perf_counter(), None
        try:
            async for response in behaviour(request, context):
                yield response
        except BaseException as raised:
            error = raised
            raise
        finally:
            _record(names, started, _ended_with(context, error))

    return measured


ClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor | grpc.aio.UnaryStreamClientInterceptor


def _observe_client(names: tuple[str, str], started: float, code: grpc.StatusCode) -> None:
    metrics.GRPC_CLIENT_HANDLED.labels(*names, code.name).inc()
    metrics.GRPC_CLIENT_SECONDS.labels(*names).observe(time.perf_counter() - started)


def _client_code(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code()
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _UnaryUnaryMetrics(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        names, started = _names(_text(details.method)), time.perf_counter()
        call = await continuation(details, request)
        try:
            await call  # the caller awaits the same call again: its answer or its error
        except BaseException as error:
            _observe_client(names, started, _client_code(error))
            if not isinstance(error, grpc.aio.AioRpcError):
                raise
        else:
            _observe_client(names, started, grpc.StatusCode.OK)
        return call


class _UnaryStreamMetrics(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        names, started = _names(_text(details.method)), time.perf_counter()
        call = await continuation(details, request)

        async def responses() -> AsyncIterator[Any]:
            code = grpc.StatusCode.OK
            try:
                async for response in call:
                    yield response
            except BaseException as error:
                code = _client_code(error)
                raise
            finally:
                _observe_client(names, started, code)

        return responses()


def metrics_interceptors() -> list[ClientInterceptor]:
    """Count and time the calls this process makes (one object per call kind, as below)."""
    return [_UnaryUnaryMetrics(), _UnaryStreamMetrics()]


def _text(method: str | bytes) -> str:
    return method.decode() if isinstance(method, bytes) else method


class _UnaryUnaryMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, header: Callable[[], tuple[str, str] | None]) -> None:
        self._header = header

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_header(details, self._header()), request)


class _UnaryStreamMetadata(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, header: Callable[[], tuple[str, str] | None]) -> None:
        self._header = header

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_header(details, self._header()), request)


def with_metadata(details: Any, *headers: tuple[str, str]) -> Any:
    """A client call's details with `headers` added to its metadata."""
    if not headers:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in headers:
        metadata.add(key, value)
    return details._replace(metadata=metadata)


def _with_header(details: Any, header: tuple[str, str] | None) -> Any:
    return details if header is None else with_metadata(details, header)


def _metadata_interceptors(header: Callable[[], tuple[str, str] | None]) -> list[ClientInterceptor]:
    """One interceptor per call kind: a grpc.aio channel files an interceptor under the first
    kind it is an instance of, so one object serving both would never see server streams."""
    return [_UnaryUnaryMetadata(header), _UnaryStreamMetadata(header)]


def request_id_interceptors() -> list[ClientInterceptor]:
    """Carry the current request id to the services this one calls."""

    def header() -> tuple[str, str] | None:
        current = request_id.get()
        return (REQUEST_ID_HEADER, current) if current else None

    return _metadata_interceptors(header)


def bearer_interceptors(key: str) -> list[ClientInterceptor]:
    """Send an API key with every call (`authorization: Bearer <key>`): for clients of the
    gateway's public API."""
    return _metadata_interceptors(lambda: ("authorization", f"Bearer {key}"))
