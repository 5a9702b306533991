"""What the HTTP facade tells about itself: an ASGI middleware that counts and times every
request by its route's template (never the raw path: ids would make a series per job) and
traces it (a server span, the child of the caller's `traceparent`), and `GET /metrics`."""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common import metrics, tracing

UNMATCHED = "unmatched"


class HttpWatch:
    """Outermost middleware, installed when metrics or tracing are on, one layer for both:
    requests counted by route template, method and status and timed (an SSE stream: until it
    closes; a request no route matched counts as "unmatched"); a server span per request, the
    child of the caller's `traceparent`, named by its route's template once routed and current
    while the route runs, so the gRPC calls and the job it admits belong to the caller's
    trace."""

    def __init__(self, app: ASGIApp, traced: bool, measured: bool) -> None:
        self.app = app
        self._tracer = tracing.tracer("gateway") if traced else None
        self._measured = measured
        self._series: dict[tuple[str, str], tuple[Any, dict[int, Any]]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, started, status = scope["method"], time.perf_counter(), 500
        span = None
        if self._tracer is not None:
            span = self._tracer.start_span(
                method,
                context=tracing.parent_of(Headers(scope=scope)),
                kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": scope["path"]},
            )

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            if span is None:
                await self.app(scope, receive, send_status)
            else:
                with tracing.current(span):
                    await self.app(scope, receive, send_status)
        finally:
            route = _template(scope.get("route"))
            if self._measured:
                self._count(route, method, status, time.perf_counter() - started)
            if span is not None:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()

    def _count(self, route: str, method: str, status: int, seconds: float) -> None:
        series = self._series.get((route, method))
        if series is None:
            series = self._series[route, method] = (metrics.HTTP_SECONDS.labels(route, method), {})
        timer, counters = series
        timer.observe(seconds)
        counter = counters.get(status)
        if counter is None:
            counter = counters[status] = metrics.HTTP_REQUESTS.labels(route, method, str(status))
        counter.inc()


def _template(route: BaseRoute | None) -> str:
    return route.path if isinstance(route, Route) else UNMATCHED


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: the process's registry, in Prometheus's text format."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
