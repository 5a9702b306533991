"""Traces: one per job, from the HTTP or gRPC request that admitted it, through the cache and
evaluator calls, across the queue (the admitting span's W3C `traceparent` is kept with the job
and the generator continues it) and through the generator's stages.

Off unless configured, by the standard OpenTelemetry variables: `OTEL_TRACES_EXPORTER`
(`otlp`, `console` or `none`) or an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT` /
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, gRPC protocol) turns it on; `OTEL_SDK_DISABLED=true` keeps
it off; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)` and the
exporter's own variables are read by the SDK as usual. A process that installed its own SDK
provider before the services start (the tests, with an in-memory exporter) is traced too.
When off, nothing is spent on spans. The RPC spans are made by services.common.watching (a
server span per call; no client span: the caller's current span goes along as `traceparent`)
and the HTTP facade's middleware; this module holds the process's setup and the primitives.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("imagegen.tracing")

_PROPAGATOR = TraceContextTextMapPropagator()
_configured = False


class TracingConfigError(ValueError):
    """An OTEL_* variable this process cannot act on (the service stops at start, naming it)."""


def configure(service: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Installs the process's tracer provider from the OTEL_* variables (once per process);
    whether this process traces."""
    global _configured
    if _configured:
        return enabled()
    _configured = True
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = environ.get("OTEL_TRACES_EXPORTER")
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if names is None and not endpoint:
        return enabled()  # off by default, unless the process installed a provider itself
    exporters = [_exporter(name.strip(), environ) for name in (names or "otlp").split(",")]
    chosen = [e for e in exporters if e is not None]
    if not chosen:
        return enabled()
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": f"imagegen-{service}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in chosen:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on: %s", ", ".join(type(e).__name__ for e in chosen))
    return True


def _exporter(name: str, environ: Mapping[str, str]) -> SpanExporter | None:
    if name in ("", "none"):
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER: {name!r} is not one of otlp, console, none"
        )
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
    )
    if protocol != "grpc":
        raise TracingConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; use grpc"
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def enabled() -> bool:
    """Whether spans are recorded: an SDK provider is installed in this process."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def flush() -> None:
    """Exports the spans still buffered (a stopping service calls it last)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis=2000)


def tracer(service: str) -> Tracer:
    return trace.get_tracer(f"imagegen.{service}")


def traceparent() -> str:
    """The current span as a W3C traceparent ("" when there is none): kept with a job so the
    generator continues the trace of the request that admitted it."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def context_of(traceparent: str) -> Context | None:
    """The parent context a traceparent names (None for "": a new trace)."""
    if not traceparent:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})


def trace_ids() -> tuple[str, str]:
    """(trace id, span id) of the current span, as hex; ("", "") outside one."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def nanos(moment: datetime | None) -> int | None:
    return int(moment.timestamp() * 1e9) if moment is not None else None


@contextlib.contextmanager
def current(span: Span) -> Iterator[None]:
    """Makes `span` current in this task for the block (for a span that outlives one block)."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


class Stages:
    """Spans for the stages a job goes through, one after another, as children of the span
    current when it was made: `enter` ends the stage before and starts the next."""

    def __init__(self, service: str) -> None:
        self._tracer = tracer(service)
        self._parent = otel_context.get_current()
        self._span: Span | None = None
        self._name = ""

    def enter(self, name: str) -> None:
        if name == self._name:
            return
        self.close()
        self._name = name
        self._span = self._tracer.start_span(f"stage {name}", context=self._parent)

    def close(self) -> None:
        if self._span is not None:
            self._span.end()
            self._span, self._name = None, ""


# gRPC


def parent_of(headers: Mapping[str, str]) -> Context:
    """The caller's context from its `traceparent` / `tracestate` headers (a new trace when
    there are none or they do not parse)."""
    carrier = {k: headers[k] for k in ("traceparent", "tracestate") if k in headers}
    return _PROPAGATOR.extract(carrier)


def parent_of_metadata(metadata: Any) -> Context:
    """As parent_of, from a gRPC call's invocation metadata."""
    return parent_of({key: value for key, value in (metadata or ()) if isinstance(value, str)})
