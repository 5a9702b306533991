"""Cross-cutting RPC work: request ids, the exception-to-status table and, when on, metrics and
traces (services.common.watching), in one server interceptor and one client interceptor.

Handlers raise domain errors (services.common.errors); this is the only place that turns them
into gRPC statuses. Anything unexpected becomes INTERNAL with a generic message, and the detail
goes to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common import tracing
from services.common.errors import ServiceError, Unavailable, to_rpc_status
from services.common.retry import is_blip
from services.common.watching import ClientWatch, ServerWatch, Watched, client_code

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


class CallInterceptor(HandlerInterceptor):
    """Every call's cross-cutting work, in one layer: the request id, the exception-to-status
    table, and, when metrics or tracing are on, its watch (services.common.watching: counted by
    the code it ended with, timed, a server span current while the handler runs). One wrapper
    for all of it, outermost: each layer of a grpc.aio interceptor chain costs an await and a
    closure per call, and admission is made of small calls."""

    def __init__(self, watch: ServerWatch | None = None) -> None:
        self._watch = watch

    def wrap_unary(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        method, watch = call.method, self._watch

        async def handled(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request_id.set(_request_id_from(context))
            watched = watch.start(method, call.invocation_metadata) if watch else None
            error: BaseException | None = None
            with _current(watched):  # the error's log line belongs to the call's span too
                try:
                    return await behaviour(request, context)
                except BaseException as raised:
                    error = raised
                    await _map_error(context, method, raised)
                    raise
                finally:
                    if watched is not None:
                        watched.end(_ended_with(context, error))

        return handled

    def wrap_stream(self, call: grpc.HandlerCallDetails, behaviour: Any) -> Any:
        method, watch = call.method, self._watch

        async def handled(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            request_id.set(_request_id_from(context))
            watched = watch.start(method, call.invocation_metadata) if watch else None
            responses = behaviour(request, context).__aiter__()
            error: BaseException | None = None
            try:
                while True:
                    # The span is current only while the handler runs, never across a yield.
                    with _current(watched):
                        try:
                            response = await responses.__anext__()
                        except StopAsyncIteration:
                            break
                    yield response
            except BaseException as raised:
                error = raised
                with _current(watched):
                    await _map_error(context, method, raised)
                raise
            finally:
                if watched is not None:
                    watched.end(_ended_with(context, error))

        return handled


async def _map_error(
    context: grpc.aio.ServicerContext[Any, Any], method: str, raised: BaseException
) -> None:
    """The one place that maps every error: an exception a handler raised ends the call with
    its status (`_abort` raises); an abort already made, a cancellation or an exit passes."""
    if isinstance(raised, Exception) and not isinstance(raised, grpc.aio.AbortError):
        await _abort(context, method, raised)


_NOT_TRACED = contextlib.nullcontext()


def _current(watched: Watched | None) -> contextlib.AbstractContextManager[None]:
    if watched is None or watched.span is None:
        return _NOT_TRACED
    return tracing.current(watched.span)


def _ended_with(
    context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None
) -> grpc.StatusCode:
    """The code a call ended with: the one it aborted with or set, CANCELLED when the client
    went away, else INTERNAL for an error and OK without one."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(error, ServiceError):
        return error.grpc_code
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.INTERNAL


ClientInterceptor = grpc.aio.UnaryUnaryClientInterceptor | grpc.aio.UnaryStreamClientInterceptor


class _MeshCalls:
    """What a call to a mesh peer carries (the request id; the trace's `traceparent`) and, when
    on, how it is watched (client metrics; a failure as an event on the current span)."""

    def __init__(self, watch: ClientWatch | None) -> None:
        self._watch = watch

    def _details(self, details: Any) -> Any:
        headers = self._watch.headers() if self._watch is not None else []
        current = request_id.get()
        if current:
            headers.append((REQUEST_ID_HEADER, current))
        return with_metadata(details, *headers)

    def _end(self, watched: Watched, method: str, code: grpc.StatusCode) -> None:
        watched.end(code)
        if self._watch is not None:
            self._watch.failed(method, code)


class _UnaryUnaryMesh(_MeshCalls, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        details = self._details(details)
        if self._watch is None:
            return await continuation(details, request)
        method = _text(details.method)
        watched = self._watch.start(method)
        try:
            call = await continuation(details, request)
        except BaseException as error:
            self._end(watched, method, client_code(error))
            raise
        try:
            await call  # the caller awaits the same call again: its answer or its error
        except BaseException as error:
            self._end(watched, method, client_code(error))
            if not isinstance(error, grpc.aio.AioRpcError):
                raise
            return call
        self._end(watched, method, grpc.StatusCode.OK)
        return call


class _UnaryStreamMesh(_MeshCalls, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        details = self._details(details)
        if self._watch is None:
            return await continuation(details, request)
        method = _text(details.method)
        watched = self._watch.start(method)
        try:
            call = await continuation(details, request)
        except BaseException as error:
            self._end(watched, method, client_code(error))
            raise

        async def responses() -> AsyncIterator[Any]:
            code = grpc.StatusCode.OK
            try:
                async for response in call:
                    yield response
            except BaseException as error:
                code = client_code(error)
                raise
            finally:
                self._end(watched, method, code)

        return responses()


def mesh_interceptors() -> list[ClientInterceptor]:
    """For a channel to a mesh peer: the request id and trace context go along, and the calls
    are counted and timed when metrics are on (one object per call kind, as below)."""
    watch = ClientWatch.of()
    return [_UnaryUnaryMesh(watch), _UnaryStreamMesh(watch)]


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


def bearer_interceptors(key: str) -> list[ClientInterceptor]:
    """Send an API key with every call (`authorization: Bearer <key>`): for clients of the
    gateway's public API."""
    return _metadata_interceptors(lambda: ("authorization", f"Bearer {key}"))
