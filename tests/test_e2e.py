"""The whole mesh as separate processes (what `make run` starts), driven through HTTP/SSE and
through gRPC, against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import hashlib
import io
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from imagegen.v1 import image_service_pb2, image_service_pb2_grpc, types_pb2
from PIL import Image

from services.demo import sse_events
from services.mesh import Mesh, Ports, start_mesh, wait_serving
from tests.conftest import ROOT, ServiceEnv

SERVICES = {
    "gateway": ["imagegen.v1.ImageService", "imagegen.v1.CostService"],
    "cache": ["imagegen.v1.CacheService"],
    "generator": ["imagegen.v1.GeneratorService"],
    "evaluator": ["imagegen.v1.EvaluatorService"],
}
REQUEST = {
    "prompt": "A lighthouse on a cliff at dusk",
    "seed": 1234,
    "width": 96,
    "height": 64,
    "num_variants": 2,
    "steps": 6,
}


@pytest.fixture(scope="module")
def mesh(env: ServiceEnv) -> Iterator[Mesh]:
    ports = Ports.free()
    running = start_mesh(
        env.data_dir,
        ports,
        extra_env={
            "DATABASE_URL": env.database_url,
            "REDIS_URL": env.redis_url,
            "MODEL_DIR": str(env.model_dir),
            "LOG_LEVEL": "WARNING",
            "CLAIM_IDLE_MS": "2000",
        },
        log_dir=env.data_dir / "logs",
    )
    yield running
    codes = {name: running.stop_service(name) for name in reversed(list(running.processes))}
    running.stop()
    assert codes == dict.fromkeys(codes, 0), f"services did not stop cleanly: {codes}"


async def test_every_service_is_serving_and_reflects_its_services(mesh: Mesh) -> None:
    for name, services in SERVICES.items():
        async with grpc.aio.insecure_channel(mesh.addr(name)) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ["", *services]:
                response = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert response.status == health_pb2.HealthCheckResponse.SERVING, (name, service)
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for answer in reflection.ServerReflectionInfo(iter([request])):
                listed = {s.name for s in answer.list_services_response.service}
                assert set(services) | {"grpc.health.v1.Health"} <= listed
                break


async def test_http_job_streams_progress_then_scored_pngs_then_a_byte_identical_cache_hit(
    mesh: Mesh,
) -> None:
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=60) as client:
        created = await client.post("/api/generate/text-to-image", json=REQUEST)
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["cached_hit"] is False and job["seed"] == REQUEST["seed"]
        assert job["est_cost_cents"] == 1

        stream_path = f"/api/status/stream/{job['run_id']}"
        async with client.stream("GET", stream_path) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
        events = [e async for e in sse_events(client, stream_path)]
        kinds = [e["event"] for e in events]
        # The two variants share a batch: their steps are reported together, in order.
        steps = [e["data"]["step"] for e in events if e["event"] == "progress"]
        assert sorted(set(steps)) == list(range(1, REQUEST["steps"] + 1))
        assert steps == sorted(steps)
        assert kinds.count("artifact") == 2 and kinds.count("evaluation") == 1
        assert kinds[-1] == "final" and events[-1]["data"]["status"] == "completed"
        ids = [tuple(map(int, e["id"].split("-"))) for e in events]
        assert ids == sorted(set(ids))

        final = events[-1]["data"]
        digests = {}
        for artifact in final["artifacts"]:
            assert artifact["semantic_score"] is not None
            assert artifact["perceptual_score"] is not None
            png = (await client.get(artifact["url"])).content
            assert Image.open(io.BytesIO(png)).size == (REQUEST["width"], REQUEST["height"])
            assert hashlib.sha256(png).hexdigest() == artifact["sha256"]
            digests[artifact["variant_index"]] = artifact["sha256"]
        assert sum(a["is_primary"] for a in final["artifacts"]) == 1

        again = await client.post(
            "/api/generate/text-to-image",
            json={**REQUEST, "prompt": "  a LIGHTHOUSE on a cliff at dusk "},
        )
        hit = again.json()
        assert hit["cached_hit"] is True and hit["cost_cents"] == 0 and hit["status"] == "completed"
        for artifact in hit["artifacts"]:
            png = (await client.get(artifact["url"])).content
            assert hashlib.sha256(png).hexdigest() == digests[artifact["variant_index"]]
        replay = [e async for e in sse_events(client, f"/api/status/stream/{hit['run_id']}")]
        assert [e["event"] for e in replay] == ["final"]


async def test_grpc_job_is_watched_to_completion_and_resumes_without_gaps(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(
        mesh.addr("gateway"), interceptors=mesh.auth_interceptors
    ) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)
        spec = types_pb2.GenerationSpec(
            text="a red bicycle", seed=7, width_px=64, height_px=64, steps=4, num_variants=1
        )
        created = await stub.CreateJob(
            image_service_pb2.CreateJobRequest(spec=spec, skip_cache=True)
        )
        job_id = created.job.id
        seen: asyncio.Queue[Any] = asyncio.Queue()
        async for response in stub.WatchJob(image_service_pb2.WatchJobRequest(job_id=job_id)):
            await seen.put(response.event)
        events = [seen.get_nowait() for _ in range(seen.qsize())]
        assert events[-1].WhichOneof("payload") == "final"
        assert events[-1].final.job.status == types_pb2.JOB_STATUS_COMPLETED
        middle = events[len(events) // 2]
        resumed = [
            r.event
            async for r in stub.WatchJob(
                image_service_pb2.WatchJobRequest(job_id=job_id, after_event_id=middle.id)
            )
        ]
        assert [e.id for e in resumed] == [e.id for e in events[len(events) // 2 + 1 :]]
        got = await stub.GetJob(image_service_pb2.GetJobRequest(job_id=job_id))
        assert len(got.job.artifacts) == 1 and got.job.artifacts[0].evaluation.HasField(
            "clip_score"
        )


async def test_a_job_whose_generator_is_killed_mid_run_is_reclaimed_and_completed(
    mesh: Mesh, env: ServiceEnv
) -> None:
    request = {
        **REQUEST,
        "prompt": "a ship in a storm",
        "width": 256,
        "height": 256,
        "steps": 100,
        "num_variants": 1,
        "skip_cache": True,
    }
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=60) as client:
        job = (await client.post("/api/generate/text-to-image", json=request)).json()
        path = f"/api/status/stream/{job['run_id']}"
        async for event in sse_events(client, path):
            if event["event"] == "progress":
                break  # the job is running on the generator
        assert mesh.stop_service("generator", signal.SIGKILL) == -signal.SIGKILL
        mesh.start_service("generator", env.data_dir / "logs")
        await wait_serving(mesh.addr("generator"), 60, mesh.processes["generator"])

        events = [e async for e in sse_events(client, path)]
        final = events[-1]["data"]
        assert final["status"] == "completed" and final["attempts"] == 2
        # Two attempts started (stage changes are status events too).
        started = [
            e
            for e in events
            if e["event"] == "status" and e["data"] == {"status": "running", "stage": "generating"}
        ]
        assert len(started) == 2
        assert len(final["artifacts"]) == 1


async def test_the_web_page_is_served_and_drives_the_http_api(mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth) as client:
        page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for route in (
        "/api/generate/text-to-image",
        "/api/status/stream/",
        "/api/cost/estimate",
        "/api/uploads/presign",
        "/api/models",
        "Authorization",
    ):
        assert route in page.text, route


def test_gateway_and_cache_import_no_torch() -> None:
    code = (
        "import sys, services.gateway.service, services.cache.service; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'diffusers', 'transformers', 'open_clip', 'lpips')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
