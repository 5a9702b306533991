"""A real OTLP/gRPC trace receiver on 127.0.0.1 (the collector's TraceService/Export): what
service processes configured by OTEL_EXPORTER_OTLP_ENDPOINT send, kept to be looked at."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class ReceivedSpan:
    service: str  # the resource's service.name
    scope: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str


@dataclass
class TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0
    port: int = 0
    _server: grpc.aio.Server | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests += 1
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = attributes.get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                self.spans += [
                    ReceivedSpan(
                        service,
                        scope_spans.scope.name,
                        s.name,
                        s.trace_id.hex(),
                        s.span_id.hex(),
                        s.parent_span_id.hex(),
                    )
                    for s in scope_spans.spans
                ]
        self._arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def start(self) -> str:
        """Listens on a free port; the OTEL_EXPORTER_OTLP_ENDPOINT to give the services."""
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)

    async def until(self, count: int, within: float) -> list[ReceivedSpan]:
        """The spans received, once there are at least `count` (or `within` seconds passed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while len(self.spans) < count:
                    self._arrived.clear()
                    await self._arrived.wait()
        return self.spans
