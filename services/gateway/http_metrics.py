"""The HTTP facade's metrics: an ASGI middleware that counts and times every request by its
route's template (never the raw path: ids would make a series per job), and `GET /metrics`."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common import metrics

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


def _template(route: BaseRoute | None) -> str:
    return route.path if isinstance(route, Route) else UNMATCHED


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: the process's registry, in Prometheus's text format."""
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
