"""Traces and structured logs: a job submitted with the caller's `traceparent` is one trace with
spans from all four services, linked across the queue, and the log lines name the job, the
request and the trace; a service process configured by the OTEL_* variables exports its spans
over OTLP to a real receiver.

The mesh's spans are collected in memory: this module installs an SDK tracer provider before it
starts its own mesh (the services trace only when the process has one, or OTEL_* ask).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import grpc
import httpx
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagegen.v1 import (
    cache_service_pb2,
    cache_service_pb2_grpc,
    image_service_pb2,
    image_service_pb2_grpc,
    types_pb2,
)
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common import tracing
from services.common.interceptors import bearer_interceptors, request_id
from services.common.logs import JsonFormatter, job_id
from services.common.settings import GatewaySettings
from services.mesh import free_port
from tests.conftest import Mesh, ServiceEnv, new_key, start_in_process
from tests.otlp import TraceSink

WAIT = 30.0
SERVICES = ("gateway", "cache", "generator", "evaluator")


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """Every span this process records from now on, in memory (shut down after the module:
    later modules' spans are not kept)."""
    memory = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": "imagegen-tests"}))
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield memory
    memory.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(exporter: InMemorySpanExporter, env: ServiceEnv) -> AsyncIterator[Mesh]:
    assert tracing.enabled()
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
    yield started
    await started.stop()


def new_traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def of_trace(exporter: InMemorySpanExporter, trace_id: str) -> list[ReadableSpan]:
    wanted = int(trace_id, 16)
    return [
        s
        for s in exporter.get_finished_spans()
        if s.context is not None and s.context.trace_id == wanted
    ]


def scope(span: ReadableSpan) -> str:
    return span.instrumentation_scope.name if span.instrumentation_scope else ""


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[ReadableSpan]:
    chain, current = [], parent_id(span)
    while current is not None and current in by_id:
        chain.append(by_id[current])
        current = parent_id(by_id[current])
    return chain


async def until_spans(
    exporter: InMemorySpanExporter, trace_id: str, names: set[str]
) -> list[ReadableSpan]:
    """The trace's spans once every one of `names` has ended (spans end just after the final
    event a test waits for)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        spans = of_trace(exporter, trace_id)
        if names <= {s.name for s in spans} or loop.time() > deadline:
            return spans
        await asyncio.sleep(0.05)


async def follow_to_final(http: httpx.AsyncClient, mesh: Mesh, run_id: str) -> None:
    async with http.stream("GET", f"/api/status/stream/{run_id}", headers=mesh.auth) as stream:
        async for line in stream.aiter_lines():
            if line == "event: final":
                return


async def test_a_job_over_http_is_one_trace_across_the_four_services_and_the_queue(
    mesh: Mesh, exporter: InMemorySpanExporter
) -> None:
    header, trace_id, caller_span = new_traceparent()
    request = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4}
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
        created = await http.post(
            "/api/generate/text-to-image",
            json={**request, "seed": 11, "num_variants": 2},
            headers={**mesh.auth, "traceparent": header},
        )
        assert created.status_code == 201, created.text
        run_id = created.json()["run_id"]
        await follow_to_final(http, mesh, run_id)
        status = await http.get(f"/api/status/{run_id}", headers=mesh.auth)
        assert status.json()["status"] == "completed"

    spans = await until_spans(exporter, trace_id, {"job attempt", "queue wait"})
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    assert {scope(s) for s in spans} >= {f"imagegen.{name}" for name in SERVICES}

    # The gateway's server span is the caller's child; the rest descend from it.
    (http_span,) = [s for s in spans if s.name == "POST /api/generate/text-to-image"]
    assert http_span.kind is SpanKind.SERVER
    assert parent_id(http_span) == int(caller_span, 16)
    assert http_span.attributes is not None
    assert http_span.attributes["http.response.status_code"] == 201
    for span in spans:
        if span is not http_span and parent_id(span) != int(caller_span, 16):
            assert http_span in ancestors(span, by_id), span.name

    # The admission looked up the cache: a gRPC hop whose server span is the HTTP span's child
    # (in-mesh calls send their current span along; they make no client span of their own).
    (lookup,) = [s for s in spans if s.name == "imagegen.v1.CacheService/Lookup"]
    assert scope(lookup) == "imagegen.cache" and lookup.kind is SpanKind.SERVER
    assert http_span.context is not None and parent_id(lookup) == http_span.context.span_id
    assert not [s.name for s in spans if s.kind is SpanKind.CLIENT]

    # Across the queue: the attempt continues the admission's trace, after its wait.
    (attempt,) = [s for s in spans if s.name == "job attempt"]
    (waited,) = [s for s in spans if s.name == "queue wait"]
    assert scope(attempt) == "imagegen.generator" and attempt.kind is SpanKind.CONSUMER
    assert attempt.attributes is not None and attempt.attributes["imagegen.job_id"] == run_id
    assert http_span in ancestors(attempt, by_id)
    assert parent_id(waited) == parent_id(attempt)
    assert waited.end_time is not None and attempt.start_time is not None
    assert waited.end_time <= attempt.start_time + 50_000_000  # the wait ends as the run starts

    # The generator's stages, and its calls to the evaluator and the cache, are the attempt's.
    stages = {s.name for s in spans if parent_id(s) == attempt.context.span_id}
    assert {"stage denoising", "stage uploading", "stage evaluating"} <= stages, stages
    for name, service in (
        ("imagegen.v1.EvaluatorService/Screen", "evaluator"),
        ("imagegen.v1.EvaluatorService/Evaluate", "evaluator"),
        ("imagegen.v1.CacheService/Store", "cache"),
    ):
        served = [s for s in spans if s.name == name and s.kind is SpanKind.SERVER]
        assert served, f"no {name} span in the trace"
        for span in served:
            assert scope(span) == f"imagegen.{service}"
            assert attempt in ancestors(span, by_id), name


async def test_a_grpc_call_continues_the_callers_trace(
    mesh: Mesh, exporter: InMemorySpanExporter
) -> None:
    header, trace_id, caller_span = new_traceparent()
    async with grpc.aio.insecure_channel(
        mesh.addr("gateway"), interceptors=mesh.auth_interceptors
    ) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)
        spec = types_pb2.GenerationSpec(text="a red kite", width_px=64, height_px=64, steps=4)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetJob(
                image_service_pb2.GetJobRequest(job_id="not-a-job"),
                metadata=(("traceparent", header),),
            )
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        job = await stub.CreateJob(
            image_service_pb2.CreateJobRequest(spec=spec), metadata=(("traceparent", header),)
        )
        await stub.CancelJob(image_service_pb2.CancelJobRequest(job_id=job.job.id))
    spans = await until_spans(
        exporter,
        trace_id,
        {"imagegen.v1.ImageService/CreateJob", "imagegen.v1.ImageService/GetJob"},
    )
    served = {
        s.name: s for s in spans if s.kind is SpanKind.SERVER and scope(s) == "imagegen.gateway"
    }
    created, read = (
        served["imagegen.v1.ImageService/CreateJob"],
        served["imagegen.v1.ImageService/GetJob"],
    )
    assert parent_id(created) == parent_id(read) == int(caller_span, 16)
    assert created.status.is_ok
    assert not read.status.is_ok  # the refusal is marked on its span, with its code
    assert read.attributes is not None
    assert read.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_a_failed_call_to_a_peer_is_an_event_on_the_callers_span(
    env: ServiceEnv, exporter: InMemorySpanExporter
) -> None:
    from services.gateway.service import start as start_gateway

    # A gateway whose cache is not there: its lookups fail (UNAVAILABLE, after the channel's
    # retries), admission goes on as on a miss, and the trace says what failed.
    nowhere = f"127.0.0.1:{free_port()}"
    gateway = await start_gateway(
        env.settings(GatewaySettings, http_port=free_port(), cache_addr=nowhere)
    )
    header, trace_id, _ = new_traceparent()
    key = await new_key(env.database_url)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{gateway.port}", interceptors=bearer_interceptors(key)
        ) as channel:
            stub = image_service_pb2_grpc.ImageServiceStub(channel)
            spec = types_pb2.GenerationSpec(text="a paper boat", width_px=64, height_px=64, steps=4)
            job = await stub.CreateJob(
                image_service_pb2.CreateJobRequest(spec=spec), metadata=(("traceparent", header),)
            )
            await stub.CancelJob(image_service_pb2.CancelJobRequest(job_id=job.job.id))
    finally:
        await gateway.stop(1.0)
    spans = await until_spans(exporter, trace_id, {"imagegen.v1.ImageService/CreateJob"})
    (created,) = [s for s in spans if s.name == "imagegen.v1.ImageService/CreateJob"]
    assert created.status.is_ok  # a missing cache is a miss, not a failed admission
    failures = [e.attributes for e in created.events if e.name == "rpc failed"]
    assert failures == [
        {
            "rpc.system": "grpc",
            "rpc.service": "imagegen.v1.CacheService",
            "rpc.method": "Lookup",
            "rpc.grpc.status_code": grpc.StatusCode.UNAVAILABLE.value[0],
        }
    ]
    assert not [s.name for s in spans if s.kind is SpanKind.CLIENT]


async def test_log_lines_are_json_with_the_job_request_and_trace_ids(
    mesh: Mesh, exporter: InMemorySpanExporter
) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("tests"))
    root = logging.getLogger("imagegen")
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    header, trace_id, _ = new_traceparent()
    try:
        async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as http:
            created = await http.post(
                "/api/generate/text-to-image",
                json={"prompt": "a paper boat", "width": 64, "height": 64, "steps": 4},
                headers={**mesh.auth, "traceparent": header, "X-Request-Id": "req-logs-1"},
            )
            assert created.status_code == 201, created.text
            assert created.headers["X-Request-Id"] == "req-logs-1"
            run_id = created.json()["run_id"]
            await follow_to_final(http, mesh, run_id)
        await until_spans(exporter, trace_id, {"job attempt"})
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines and all({"time", "level", "service", "logger", "message"} <= set(x) for x in lines)
    ran = [x for x in lines if x.get("job_id") == run_id and x["logger"] == "imagegen.worker"]
    assert ran, lines
    assert all(x["trace_id"] == trace_id for x in ran)
    assert all(len(x["span_id"]) == 16 for x in ran)

    # Outside any job, span or request, a line carries none of the ids.
    request_id.set("")
    job_id.set("")
    record = logging.LogRecord("imagegen.x", logging.INFO, __file__, 1, "plain %s", ("line",), None)
    assert set(json.loads(JsonFormatter("tests").format(record))) == {
        "time",
        "level",
        "service",
        "logger",
        "message",
    }


def service_environment(env: ServiceEnv, **extra: str) -> dict[str, str]:
    """The environment of a service process on the module's stores (OTEL_* left out but for
    `extra`: the test process's own must not leak in)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {
        **base,
        "DATABASE_URL": env.database_url,
        "REDIS_URL": env.redis_url,
        "MODEL_DIR": str(env.model_dir),
        "DATA_DIR": str(env.data_dir),
        "URL_SIGNING_KEY": secrets.token_hex(32),
        "LISTEN_ADDR": f"127.0.0.1:{free_port()}",
        "METRICS_PORT": "-1",
        "LOG_LEVEL": "INFO",
        **extra,
    }


async def test_a_service_process_exports_its_spans_over_otlp(env: ServiceEnv) -> None:
    sink = TraceSink()
    endpoint = await sink.start()
    environment = service_environment(
        env,
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_EXPORTER_OTLP_INSECURE="true",
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cache", env=environment, stderr=asyncio.subprocess.PIPE
    )
    try:
        addr = environment["LISTEN_ADDR"]
        header, trace_id, caller_span = new_traceparent()
        async with grpc.aio.insecure_channel(addr) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await wait_serving(health, WAIT)
            cache = cache_service_pb2_grpc.CacheServiceStub(channel)
            spec = types_pb2.GenerationSpec(
                text=f"a tern {uuid.uuid4().hex}", width_px=64, height_px=64, steps=4, seed=3
            )
            answer = await cache.Lookup(
                cache_service_pb2.LookupRequest(spec=spec), metadata=(("traceparent", header),)
            )
            assert not answer.hit
        received = [s for s in await sink.until(1, WAIT) if s.trace_id == trace_id]
        assert [(s.service, s.scope, s.name, s.parent_span_id) for s in received] == [
            ("imagegen-cache", "imagegen.cache", "imagegen.v1.CacheService/Lookup", caller_span)
        ]
        # The probes it answered are not traced.
        assert all(not s.name.startswith("grpc.health") for s in sink.spans)
    finally:
        process.terminate()
        _, stderr = await process.communicate()
        await sink.stop()
    assert process.returncode == 0, stderr.decode()[-2000:]
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    assert any(x["message"].startswith("tracing on") for x in lines), stderr.decode()[-2000:]


async def test_an_unknown_trace_exporter_stops_the_service_at_start_naming_it(
    env: ServiceEnv,
) -> None:
    environment = service_environment(env, OTEL_TRACES_EXPORTER="zipkin")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cache", env=environment, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), WAIT)
    assert process.returncode == 2
    assert "OTEL_TRACES_EXPORTER" in stderr.decode() and "zipkin" in stderr.decode()


async def wait_serving(health: health_pb2_grpc.HealthStub, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            if loop.time() > deadline:
                raise
        await asyncio.sleep(0.1)
