"""A real OTLP/gRPC trace receiver for the benchmarks: the collector's TraceService/Export on
127.0.0.1, served by its own thread and event loop (so it answers while the benchmark's loop
is busy driving load), keeping each span's start time, service and name."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

# (start, unix ns), the resource's service.name, the span's name
Span = tuple[int, str, str]


class TraceSink(trace_service_pb2_grpc.TraceServiceServicer):
    """`with TraceSink() as sink:` serves on `sink.port` for the block."""

    def __init__(self) -> None:
        self.port = 0
        self._spans: list[Span] = []
        self._exports: list[tuple[int, int]] = []  # (arrival, unix ns), spans in the export
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otlp-sink")
        self._server: grpc.aio.Server | None = None

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[
            trace_service_pb2.ExportTraceServiceRequest,
            trace_service_pb2.ExportTraceServiceResponse,
        ],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        arrived = time.time_ns()
        spans: list[Span] = []
        for resource in request.resource_spans:
            names = [a.value.string_value for a in resource.resource.attributes]
            keys = [a.key for a in resource.resource.attributes]
            service = names[keys.index("service.name")] if "service.name" in keys else ""
            for scope in resource.scope_spans:
                spans += [(span.start_time_unix_nano, service, span.name) for span in scope.spans]
        with self._lock:
            self._spans += spans
            self._exports.append((arrived, len(spans)))
        return trace_service_pb2.ExportTraceServiceResponse()

    async def _start(self) -> int:
        self._server = grpc.aio.server()
        # The generated module has no type stubs.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def __enter__(self) -> TraceSink:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def received(self) -> tuple[int, int]:
        """How many spans and exports have arrived so far (a mark for `since`)."""
        with self._lock:
            return len(self._spans), len(self._exports)

    def since(self, mark: tuple[int, int]) -> tuple[list[Span], list[tuple[int, int]]]:
        """The spans, and the exports (arrival, spans), that arrived after `mark`."""
        with self._lock:
            return self._spans[mark[0] :], self._exports[mark[1] :]

    async def idle(self, for_s: float, within_s: float) -> None:
        """Returns once no export has arrived for `for_s` seconds (or after `within_s`): the
        services' span processors have sent what they held."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with self._lock:
                last = self._exports[-1][0] if self._exports else 0
            if time.time_ns() - last >= for_s * 1e9:
                return
            await asyncio.sleep(0.1)
