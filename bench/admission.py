"""Admission: CreateJob/s through gRPC and through HTTP with the generator stopped (queueing
only), against a floor: the same store writes (JobLifecycle.admit: the job row and its snapshot,
the queue entry, the first event) made directly from this process with no RPC, no validation and
no cache lookup."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import grpc
import httpx
from imagegen.v1 import image_service_pb2, image_service_pb2_grpc, types_pb2

from bench.stats import median, percentile
from services.common import db
from services.common.events import EventLog
from services.common.queue import JobQueue
from services.common.redis import connect_redis
from services.common.spec import Spec
from services.jobs.lifecycle import JobLifecycle
from services.jobs.records import JobRecord, JobStatus
from services.mesh import Mesh

CONCURRENCY = 32


async def _drive(count: int, call: Any) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        nonlocal errors
        async with semaphore:
            started = time.perf_counter()
            try:
                await call(random.randrange(2**31))
                latencies.append((time.perf_counter() - started) * 1e3)
            except Exception:  # noqa: BLE001 - counted, reported
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    wall = time.perf_counter() - started
    return {
        "per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "errors": errors,
    }


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {k: median([r[k] for r in runs]) for k in ("per_s", "p50_ms", "p99_ms")}
    out["errors"] = sum(r["errors"] for r in runs)
    return out


async def run(mesh: Mesh, count: int, repeats: int) -> dict[str, Any]:
    mesh.stop_service("generator")  # queueing only: nothing consumes the queue
    spec = {"prompt": "a quiet street", "width": 64, "height": 64, "steps": 4}

    async with grpc.aio.insecure_channel(
        mesh.addr("gateway"), interceptors=mesh.auth_interceptors
    ) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)

        async def grpc_call(seed: int) -> None:
            message = types_pb2.GenerationSpec(
                text="a quiet street", width_px=64, height_px=64, steps=4, seed=seed
            )
            await stub.CreateJob(image_service_pb2.CreateJobRequest(spec=message), timeout=30)

        await _drive(50, grpc_call)
        grpc_runs = [await _drive(count, grpc_call) for _ in range(repeats)]

    limits = httpx.Limits(max_connections=CONCURRENCY + 4)
    async with httpx.AsyncClient(
        base_url=mesh.http_url, headers=mesh.auth, timeout=30, limits=limits
    ) as client:

        async def http_call(seed: int) -> None:
            response = await client.post("/api/generate/text-to-image", json={**spec, "seed": seed})
            response.raise_for_status()

        await _drive(50, http_call)
        http_runs = [await _drive(count, http_call) for _ in range(repeats)]

    pool = await db.connect(mesh.env["DATABASE_URL"], max_size=CONCURRENCY)
    redis = connect_redis(mesh.env["REDIS_URL"])
    lifecycle = JobLifecycle(pool, redis, EventLog(redis, 3600), JobQueue(redis))

    async def direct_call(seed: int) -> None:
        job = JobRecord(
            id=str(uuid.uuid4()),
            status=JobStatus.QUEUED,
            cache_key="bench",
            cost_cents=1,
            spec=Spec(
                prompt="a quiet street",
                width=64,
                height=64,
                steps=4,
                seed=seed,
                num_variants=1,
                model="tiny-sd",
                guidance_scale=7.5,
            ),
        )
        await lifecycle.admit(job)  # the row and its snapshot, the first event, the queue entry

    try:
        await _drive(50, direct_call)
        direct_runs = [await _drive(count, direct_call) for _ in range(repeats)]
    finally:
        await pool.close()
        await redis.aclose()
    grpc_summary, http_summary = _summary(grpc_runs), _summary(http_runs)
    direct_summary = _summary(direct_runs)
    return {
        "requests": count,
        "concurrency": CONCURRENCY,
        "repeats": repeats,
        "grpc": grpc_summary,
        "http": http_summary,
        "direct_store_writes": direct_summary,
        "grpc_vs_direct": grpc_summary["per_s"] / direct_summary["per_s"],
        "http_vs_direct": http_summary["per_s"] / direct_summary["per_s"],
    }
