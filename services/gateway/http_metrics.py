"""What the HTTP facade tells about itself: ASGI middlewares that count and time every request
by its route's template (never the raw path: ids would make a series per job) and trace it
(a server span, the child of the caller's `traceparent`), and `GET /metrics`."""

from __future__ import annotations

import time

from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common import metrics, tracing

UNMATCHED = "unmatched"


class HttpMetrics:
    """Outermost middleware: requests by route template, method and status; their time (an
    SSE stream: until it closes). A request no route matched counts as "unmatched"."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route, method = _template(scope.get("route")), scope["method"]
            metrics.HTTP_REQUESTS.labels(route, method, str(status)).inc()
            metrics.HTTP_SECONDS.labels(route, method).observe(time.perf_counter() - started)


class HttpTracing:
    """Outermost middleware when tracing is on: a server span per request, named by its
    route's template once routed, current while the route runs (an SSE stream: until it
    closes), so the gRPC calls and the job it admits belong to the caller's trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._tracer = tracing.tracer("gateway")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        span = self._tracer.start_span(
            method,
            context=tracing.parent_of(Headers(scope=scope)),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            with tracing.current(span):
                await self.app(scope, receive, send_status)
        finally:
            route = _template(scope.get("route"))
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()


def _template(route: BaseRoute | None) -> str:
    return route.path if isinstance(route, Route) else UNMATCHED


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: the process's registry, in Prometheus's text format."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
