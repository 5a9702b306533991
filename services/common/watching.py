"""What each RPC is watched with, when metrics or tracing are on: its metric series (calls by
the code they ended with, their time, those in flight) and, on a server, its span.

Made once per method and reused by every call (the label children, the span's name and
attributes), so a watched call costs a few counter updates and one span. The interceptors
(services.common.interceptors) ask for a `ServerWatch` / `ClientWatch` and get None when
neither is on: an unwatched service spends nothing on it.

In-mesh calls make no client span: the caller sends its current span as `traceparent`, and the
callee's server span, a child of it, times the call where the work is done. A failed call is
still seen in the caller's trace, as an `rpc failed` event on its current span, and in the
client metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.common import metrics, tracing

# Probes and reflection are not traced: a kubelet's health check every few seconds would bury
# the jobs' traces (they are counted in the metrics all the same).
_UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def names(method: str) -> tuple[str, str]:
    """("imagegen.v1.ImageService", "CreateJob") from "/imagegen.v1.ImageService/CreateJob"."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class _Series:
    """One method's metric children (None when metrics are off) and span naming."""

    __slots__ = (
        "_family",
        "_handled",
        "attributes",
        "in_flight",
        "labels",
        "seconds",
        "span_name",
        "traced",
    )

    def __init__(self, method: str, side: str, measured: bool) -> None:
        service, name = self.labels = names(method)
        self.span_name = method.lstrip("/")
        self.attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        self.traced = not method.startswith(_UNTRACED)
        server = side == "server"
        self._family = metrics.GRPC_SERVER_HANDLED if server else metrics.GRPC_CLIENT_HANDLED
        self._handled: dict[grpc.StatusCode, Any] = {}
        self.seconds: Any = None
        self.in_flight: Any = None
        if measured:
            seconds = metrics.GRPC_SERVER_SECONDS if server else metrics.GRPC_CLIENT_SECONDS
            self.seconds = seconds.labels(*self.labels)
            if server:
                self.in_flight = metrics.GRPC_SERVER_IN_FLIGHT.labels(*self.labels)

    def count(self, code: grpc.StatusCode) -> None:
        counter = self._handled.get(code)
        if counter is None:
            counter = self._handled[code] = self._family.labels(*self.labels, code.name)
        counter.inc()


class Watched:
    """One call being watched: `end` it once, with the code it ended with."""

    __slots__ = ("_series", "_started", "span")

    def __init__(self, series: _Series, span: Span | None) -> None:
        self._series, self.span = series, span
        self._started = time.perf_counter()
        if series.in_flight is not None:
            series.in_flight.inc()

    def end(self, code: grpc.StatusCode) -> None:
        series = self._series
        if series.seconds is not None:
            series.seconds.observe(time.perf_counter() - self._started)
            series.count(code)
            if series.in_flight is not None:
                series.in_flight.dec()
        if self.span is not None:
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                self.span.set_status(Status(StatusCode.ERROR, code.name))
            self.span.end()


class _Watch:
    def __init__(self, side: str, traced: bool, measured: bool) -> None:
        self._side, self._traced, self._measured = side, traced, measured
        self._series: dict[str, _Series] = {}

    def _of(self, method: str) -> _Series:
        series = self._series.get(method)
        if series is None:
            series = self._series[method] = _Series(method, self._side, self._measured)
        return series


class ServerWatch(_Watch):
    """The calls a server handles: a server span each (a child of the caller's `traceparent`)
    when tracing is on, the server metrics when metrics are on."""

    def __init__(self, service: str, traced: bool, measured: bool) -> None:
        super().__init__("server", traced, measured)
        self._tracer = tracing.tracer(service)

    @classmethod
    def of(cls, service: str) -> ServerWatch | None:
        """This process's watch for `service`'s server, or None when nothing is on."""
        traced, measured = tracing.enabled(), metrics.collecting()
        return cls(service, traced, measured) if traced or measured else None

    def start(self, method: str, metadata: Sequence[tuple[str, Any]] | None) -> Watched:
        series = self._of(method)
        span = None
        if self._traced and series.traced:
            span = self._tracer.start_span(
                series.span_name,
                context=tracing.parent_of_metadata(metadata),
                kind=SpanKind.SERVER,
                attributes=series.attributes,
            )
        return Watched(series, span)


class ClientWatch(_Watch):
    """The calls a process makes to its peers: the client metrics when metrics are on; with
    tracing on, the current span goes along as `traceparent` and a failed call is an event on
    it."""

    @classmethod
    def of(cls) -> ClientWatch | None:
        traced, measured = tracing.enabled(), metrics.collecting()
        return cls("client", traced, measured) if traced or measured else None

    def headers(self) -> list[tuple[str, str]]:
        """What the call carries for the trace (nothing outside a span, or when untraced)."""
        if not self._traced:
            return []
        parent = tracing.traceparent()
        return [("traceparent", parent)] if parent else []

    def start(self, method: str) -> Watched:
        return Watched(self._of(method), None)

    def failed(self, method: str, code: grpc.StatusCode) -> None:
        if self._traced and code is not grpc.StatusCode.OK:
            trace.get_current_span().add_event(
                "rpc failed",
                {**self._of(method).attributes, "rpc.grpc.status_code": code.value[0]},
            )


def client_code(error: BaseException) -> grpc.StatusCode:
    """The code a client call ended with, from what it raised."""
    if isinstance(error, grpc.aio.AioRpcError):
        return error.code()
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
