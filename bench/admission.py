"""Admission: CreateJob/s through gRPC and through HTTP with the generator stopped (queueing
only), against a floor: the same store writes (JobLifecycle.admit: the job row and its snapshot,
the queue entry, the first event) made directly from this process with no RPC, no validation and
no cache lookup."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
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
WARMUP = 50  # calls before the measured runs: lazy imports, connections, first allocations
SPEC = {"prompt": "a quiet street", "width": 64, "height": 64, "steps": 4}

# One CreateJob with the given seed (a different seed each: no two jobs are the same).
Call = Callable[[int], Awaitable[None]]


async def drive(count: int, call: Call) -> dict[str, float]:
    """`count` calls, CONCURRENCY at a time: calls/s, latency percentiles, errors."""
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
        "admitted": len(latencies),
        "per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "errors": errors,
    }


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    out = {k: median([r[k] for r in runs]) for k in ("per_s", "p50_ms", "p99_ms")}
    out["errors"] = sum(r["errors"] for r in runs)
    return out


@asynccontextmanager
async def grpc_create_job(mesh: Mesh) -> AsyncIterator[Call]:
    """CreateJob over gRPC on one channel to the gateway, open for the block."""
    async with grpc.aio.insecure_channel(
        mesh.addr("gateway"), interceptors=mesh.auth_interceptors
    ) as channel:
        stub = image_service_pb2_grpc.ImageServiceStub(channel)

        async def call(seed: int) -> None:
            message = types_pb2.GenerationSpec(
                text="a quiet street", width_px=64, height_px=64, steps=4, seed=seed
            )
            await stub.CreateJob(image_service_pb2.CreateJobRequest(spec=message), timeout=30)

        yield call


@asynccontextmanager
async def http_create_job(mesh: Mesh) -> AsyncIterator[Call]:
    """POST /api/generate/text-to-image on one connection pool, open for the block."""
    limits = httpx.Limits(max_connections=CONCURRENCY + 4)
    async with httpx.AsyncClient(
        base_url=mesh.http_url, headers=mesh.auth, timeout=30, limits=limits
    ) as client:

        async def call(seed: int) -> None:
            response = await client.post("/api/generate/text-to-image", json={**SPEC, "seed": seed})
            response.raise_for_status()

        yield call


async def run(mesh: Mesh, count: int, repeats: int) -> dict[str, Any]:
    mesh.stop_service("generator")  # queueing only: nothing consumes the queue

    async with grpc_create_job(mesh) as grpc_call:
        await drive(WARMUP, grpc_call)
        grpc_runs = [await drive(count, grpc_call) for _ in range(repeats)]

    async with http_create_job(mesh) as http_call:
        await drive(WARMUP, http_call)
        http_runs = [await drive(count, http_call) for _ in range(repeats)]

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
        await drive(WARMUP, direct_call)
        direct_runs = [await drive(count, direct_call) for _ in range(repeats)]
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
