"""Throughput under load: 1, 8 and 32 concurrent clients submitting tiny-model jobs, through the
mesh (HTTP + SSE to the final event) and through the baseline server (bench/baseline_server.py)."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.client import MODEL_DIR, ROOT, sse
from bench.stats import median, percentile
from services.mesh import Mesh, free_port

LEVELS = (1, 8, 32)
JOBS = {1: 8, 8: 24, 32: 64}
PARAMS = {"prompt": "a red bicycle leaning on a wall", "width": 128, "height": 128, "steps": 10}

Submit = Callable[[httpx.AsyncClient, int], Awaitable[None]]


async def load(
    submit: Submit,
    base_url: str,
    clients: int,
    jobs: int,
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for _ in range(jobs):
        queue.put_nowait(random.randrange(2**31))

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while not queue.empty():
            seed = queue.get_nowait()
            started = time.perf_counter()
            try:
                await submit(client, seed)
                latencies.append((time.perf_counter() - started) * 1e3)
            except Exception:  # noqa: BLE001 - counted, reported
                errors += 1

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=300, limits=limits
    ) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    return {
        "images_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "errors": errors,
        "jobs": jobs,
    }


def mesh_submit(mesh: Mesh) -> Submit:
    async def submit(client: httpx.AsyncClient, seed: int) -> None:
        body = {**PARAMS, "seed": seed, "skip_cache": True}
        response = (await client.post("/api/generate/text-to-image", json=body)).raise_for_status()
        path = f"/api/status/stream/{response.json()['run_id']}"
        async for event in sse("127.0.0.1", mesh.ports.http, path, key=mesh.key):
            if event.event == "final" and event.data["status"] != "completed":
                raise RuntimeError(event.data["error"])

    return submit


async def baseline_submit(client: httpx.AsyncClient, seed: int) -> None:
    body = {**PARAMS, "seed": seed}
    (await client.post("/v1/images/generations", json=body)).raise_for_status()


def _medians(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("images_per_s", "p50_ms", "p95_ms", "p99_ms")
    summary = {k: median([r[k] for r in repeats]) for k in keys}
    summary["errors"] = sum(r["errors"] for r in repeats)
    summary["jobs"] = sum(r["jobs"] for r in repeats)
    return summary


async def run(mesh: Mesh, repeats: int) -> dict[str, Any]:
    results: dict[str, Any] = {"params": PARAMS, "repeats": repeats, "mesh": {}, "baseline": {}}
    submit = mesh_submit(mesh)
    await load(submit, mesh.http_url, 1, 2, mesh.auth)  # warm-up
    for clients in LEVELS:
        runs = [
            await load(submit, mesh.http_url, clients, JOBS[clients], mesh.auth)
            for _ in range(repeats)
        ]
        results["mesh"][clients] = _medians(runs)

    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        log = (Path(out) / "baseline.log").open("wb")
        server = subprocess.Popen(  # noqa: ASYNC220 - started once, before the timed part
            [
                sys.executable,
                "-m",
                "bench.baseline_server",
                str(MODEL_DIR / "tiny-sd"),
                str(port),
                out,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()  # the server holds its own copy
        try:
            base_url = f"http://127.0.0.1:{port}"
            await _wait_http(base_url, server)
            await load(baseline_submit, base_url, 1, 2)  # warm-up
            for clients in LEVELS:
                runs = [
                    await load(baseline_submit, base_url, clients, JOBS[clients])
                    for _ in range(repeats)
                ]
                results["baseline"][clients] = _medians(runs)
        finally:
            server.terminate()
            server.wait(20)
    return results


async def _wait_http(base_url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base_url) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError("the baseline server exited")
            try:
                await client.get("/")
                return
            except httpx.TransportError:
                await asyncio.sleep(0.2)
    raise TimeoutError("the baseline server did not start")
