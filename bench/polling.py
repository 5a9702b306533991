"""Clients that poll: the CPU a status read costs, and what polling clients get against SSE ones.

1. CPU per status read: `reads` GETs of `/api/status/{id}` (a completed two-variant job) and as
   many gRPC `GetJob`s, one at a time, with the CPU time the gateway and every Postgres process
   spent over them (psutil), per read. `GET /healthz` (the bare HTTP floor of the same server)
   is measured in the same run as the baseline.
2. Throughput at 32 clients: the same jobs watched to the end over SSE, then by polling
   `GET /api/status/{id}` every POLL_INTERVAL_S; images/s of each, median of `repeats` runs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil  # type: ignore[import-untyped]
from imagegen.v1 import image_service_pb2, image_service_pb2_grpc

from bench.stats import median
from bench.throughput import PARAMS, Submit, load, mesh_submit
from services.mesh import Mesh

CLIENTS = 32
POLL_INTERVAL_S = 0.05
TERMINAL = ("completed", "failed", "cancelled")


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """The embedded Postgres server of the mesh (postmaster and every backend)."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if process.info["name"] == "postgres" and str(data_dir.resolve()) in cmdline:
            found.append(process)
            found += process.children(recursive=True)
    return found


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def _cpu_per_call(
    call: Any, count: int, gateway: psutil.Process, postgres_dir: Path
) -> dict[str, float]:
    """CPU milliseconds per call, in the gateway and in Postgres, over `count` calls."""
    postgres = postgres_processes(postgres_dir)
    gateway_before, postgres_before = cpu_seconds([gateway]), cpu_seconds(postgres)
    started = time.perf_counter()
    for _ in range(count):
        await call()
    wall = time.perf_counter() - started
    postgres = postgres_processes(postgres_dir)  # backends opened meanwhile count too
    gateway_ms = (cpu_seconds([gateway]) - gateway_before) * 1e3 / count
    postgres_ms = (cpu_seconds(postgres) - postgres_before) * 1e3 / count
    return {
        "gateway_cpu_ms": gateway_ms,
        "postgres_cpu_ms": postgres_ms,
        "total_cpu_ms": gateway_ms + postgres_ms,
        "wall_ms": wall * 1e3 / count,
    }


async def read_cost(mesh: Mesh, reads: int, repeats: int) -> dict[str, Any]:
    gateway = psutil.Process(mesh.processes["gateway"].pid)
    postgres_dir = mesh.data_dir / "postgres"
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=60) as client:
        body = {**PARAMS, "num_variants": 2, "seed": 11, "skip_cache": True}
        created = (await client.post("/api/generate/text-to-image", json=body)).json()
        job_id = created["run_id"]
        while (await client.get(f"/api/status/{job_id}")).json()["status"] not in TERMINAL:  # noqa: ASYNC110
            await asyncio.sleep(0.1)

        async def status() -> None:
            (await client.get(f"/api/status/{job_id}")).raise_for_status()

        async def healthz() -> None:
            (await client.get("/healthz")).raise_for_status()

        async with grpc.aio.insecure_channel(
            mesh.addr("gateway"), interceptors=mesh.auth_interceptors
        ) as channel:
            stub = image_service_pb2_grpc.ImageServiceStub(channel)

            async def get_job() -> None:
                await stub.GetJob(image_service_pb2.GetJobRequest(job_id=job_id))

            calls = {"http_status": status, "http_healthz": healthz, "grpc_get_job": get_job}
            for call in calls.values():  # warm-up: connections, plans, caches
                for _ in range(50):
                    await call()
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in calls}
            for _ in range(repeats):
                for name, call in calls.items():
                    runs[name].append(await _cpu_per_call(call, reads, gateway, postgres_dir))
    return {
        name: {key: median([r[key] for r in measured]) for key in measured[0]}
        for name, measured in runs.items()
    } | {"reads": reads, "repeats": repeats}


def polling_submit() -> Submit:
    async def submit(client: httpx.AsyncClient, seed: int) -> None:
        body = {**PARAMS, "seed": seed, "skip_cache": True}
        response = (await client.post("/api/generate/text-to-image", json=body)).raise_for_status()
        path = f"/api/status/{response.json()['run_id']}"
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            job = (await client.get(path)).raise_for_status().json()
            if job["status"] in TERMINAL:
                if job["status"] != "completed":
                    raise RuntimeError(job["error"])
                return

    return submit


async def run(mesh: Mesh, reads: int, jobs: int, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {
        "read_cost": await read_cost(mesh, reads, repeats),
        "clients": CLIENTS,
        "poll_interval_s": POLL_INTERVAL_S,
    }
    sse_runs, poll_runs = [], []
    sse, poll = mesh_submit(mesh), polling_submit()
    for _ in range(repeats):  # interleaved, so drift hits both alike
        sse_runs.append(await load(sse, mesh.http_url, CLIENTS, jobs, mesh.auth))
        poll_runs.append(await load(poll, mesh.http_url, CLIENTS, jobs, mesh.auth))
    for name, runs in (("sse", sse_runs), ("polling", poll_runs)):
        results[name] = {
            "images_per_s": median([r["images_per_s"] for r in runs]),
            "p50_ms": median([r["p50_ms"] for r in runs]),
            "errors": sum(r["errors"] for r in runs),
            "jobs": sum(r["jobs"] for r in runs),
        }
    results["polling_vs_sse"] = results["polling"]["images_per_s"] / results["sse"]["images_per_s"]
    return results
