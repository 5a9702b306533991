"""Prometheus metrics: every service serves its registry on its metrics port, the gateway also on
`GET /metrics`, and jobs run over HTTP move the counters they should.

The registry is the process's and these services share it (and other modules' services counted
into it before): every check compares a scrape after the jobs with one before them.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from imagegen.v1 import image_service_pb2, image_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.common.server import PortInUse
from services.common.settings import CacheSettings, CommonSettings
from tests.conftest import Mesh, ServiceEnv, start_in_process
from tests.helpers import png_bytes, stored_upload

WAIT = 30.0
Samples = list[tuple[str, dict[str, str], float]]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as client:
        yield client


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        response = await client.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    ]


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(v for n, lbls, v in samples if n == name and labels.items() <= lbls.items())


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def body(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, "width": 64, "height": 64, "steps": 4, "seed": 7, **fields}


async def generate(http: httpx.AsyncClient, mesh: Mesh, request: dict[str, Any]) -> Any:
    response = await http.post("/api/generate/text-to-image", json=request, headers=mesh.auth)
    assert response.status_code == 201, response.text
    return response.json()


async def final_status(http: httpx.AsyncClient, mesh: Mesh, run_id: str) -> str:
    """Follows the job's SSE stream to its final event; the job's status then."""
    url = f"/api/status/stream/{run_id}"
    async with http.stream("GET", url, headers=mesh.auth) as stream:
        async for line in stream.aiter_lines():
            if line == "event: final":
                break
    status = await http.get(f"/api/status/{run_id}", headers=mesh.auth)
    return str(status.json()["status"])


async def test_jobs_over_http_move_the_counters_every_service_serves(
    mesh: Mesh, http: httpx.AsyncClient, env: ServiceEnv
) -> None:
    ports = {name: service.metrics_port for name, service in mesh.services.items()}
    assert all(port > 0 for port in ports.values()), ports
    gateway_metrics = f"{mesh.http_url}/metrics"
    before = await scrape(gateway_metrics)

    # One that renders, the same request again (a cache hit), one that fails (its reference
    # image disappears after admission: no retry can help), a slow one and one queued behind
    # it, both cancelled (the second while queued), and a bad gRPC CreateJob.
    request = body(f"a lighthouse {uuid.uuid4()}")
    first = await generate(http, mesh, request)
    assert await final_status(http, mesh, first["run_id"]) == "completed"
    again = await generate(http, mesh, request)
    assert again["cached_hit"] is True
    key = await stored_upload(env, png_bytes())
    guided = body(
        f"a guided lamp {uuid.uuid4()}",
        width=256,
        height=256,
        steps=60,
        guidance_images=[{"key": key, "role": "reference"}],
    )
    doomed = await generate(http, mesh, guided)
    (env.settings(CommonSettings).objects_root() / key).unlink()
    assert await final_status(http, mesh, doomed["run_id"]) == "failed"
    slow = await generate(
        http, mesh, body(f"a slow harbour {uuid.uuid4()}", width=512, height=512, steps=100)
    )
    queued = await generate(http, mesh, body(f"a queued pier {uuid.uuid4()}"))
    for job in (queued, slow):
        cancel = await http.post(f"/api/jobs/{job['run_id']}/cancel", headers=mesh.auth)
        assert cancel.json()["status"] == "cancelled"
    async with grpc.aio.insecure_channel(
        mesh.addr("gateway"), interceptors=mesh.auth_interceptors
    ) as channel:
        images = image_service_pb2_grpc.ImageServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await images.CreateJob(image_service_pb2.CreateJobRequest())
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    after = await scrape(gateway_metrics)
    assert delta(before, after, "imagegen_jobs_admitted_total", cache="hit") == 1
    assert delta(before, after, "imagegen_jobs_admitted_total", cache="miss") == 4
    finished = "imagegen_jobs_finished_total"
    assert delta(before, after, finished, status="completed", reason="") == 1
    assert delta(before, after, finished, status="failed", reason="invalid") == 1
    assert delta(before, after, finished, status="failed") == 1
    assert delta(before, after, finished, status="cancelled") == 2
    assert delta(before, after, "imagegen_job_duration_seconds_count") == 4
    assert delta(before, after, "imagegen_cache_lookups_total", result="hit_seed_aware") == 1
    assert delta(before, after, "imagegen_cache_lookups_total", result="miss") == 4
    assert delta(before, after, "imagegen_job_stage_seconds_count", stage="queue_wait") >= 1
    assert delta(before, after, "imagegen_job_stage_seconds_count", stage="denoise") >= 1
    assert delta(before, after, "imagegen_job_stage_seconds_count", stage="evaluate") == 1
    assert delta(before, after, "imagegen_engine_batch_rows_count") >= 1
    assert delta(before, after, "imagegen_evaluator_batch_images_count") >= 1
    assert delta(before, after, "imagegen_cost_cents_total", kind="estimated") >= 1

    lookup = {"grpc_service": "imagegen.v1.CacheService", "grpc_method": "Lookup"}
    assert delta(before, after, "imagegen_grpc_server_handled_total", grpc_code="OK", **lookup) == 5
    assert delta(before, after, "imagegen_grpc_client_handled_total", grpc_code="OK", **lookup) == 5
    create = {"grpc_service": "imagegen.v1.ImageService", "grpc_method": "CreateJob"}
    handled = "imagegen_grpc_server_handled_total"
    assert delta(before, after, handled, grpc_code="INVALID_ARGUMENT", **create) == 1
    assert value(after, "imagegen_grpc_server_in_flight", **create) == 0

    generate_route = {"route": "/api/generate/text-to-image", "method": "POST"}
    assert delta(before, after, "imagegen_http_requests_total", status="201", **generate_route) == 5
    stream_route = {"route": "/api/status/stream/{run_id}", "method": "GET"}
    assert delta(before, after, "imagegen_http_request_seconds_count", **stream_route) == 2
    assert value(after, "imagegen_sse_watchers") == 0
    assert value(after, "process_resident_memory_bytes") > 0

    # Each service's own metrics port answers the same registry (one process here).
    for port in set(ports.values()):
        served = await scrape(f"http://127.0.0.1:{port}/metrics")
        assert value(served, "imagegen_jobs_admitted_total", cache="hit") >= 1
        assert value(served, "process_resident_memory_bytes") > 0


async def test_an_unmatched_path_counts_as_unmatched_not_by_its_path(
    mesh: Mesh, http: httpx.AsyncClient
) -> None:
    before = await scrape(f"{mesh.http_url}/metrics")
    assert (await http.get(f"/no/such/{uuid.uuid4()}")).status_code == 404
    after = await scrape(f"{mesh.http_url}/metrics")
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert delta(before, after, "imagegen_http_requests_total", **unmatched) == 1
    assert not any("/no/such" in lbls.get("route", "") for _, lbls, _ in after)


async def test_the_queue_gauges_report_every_lane(mesh: Mesh) -> None:
    samples = await scrape(f"http://127.0.0.1:{mesh.services['generator'].metrics_port}/metrics")
    lanes = {lbls["lane"] for n, lbls, _ in samples if n == "imagegen_queue_waiting_jobs"}
    assert lanes == {"high", "normal", "low"}


async def test_a_service_whose_metrics_port_is_taken_refuses_to_start(env: ServiceEnv) -> None:
    from services.cache.service import start as start_cache

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=str(port)):
            await start_cache(env.settings(CacheSettings, metrics_port=port))
