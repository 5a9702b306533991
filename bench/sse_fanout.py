"""SSE fan-out: a thousand concurrent SSE watchers on running jobs against one gateway process.
Checks that every watcher receives every event, and measures the lag from an event's append
(its Redis Stream id) to its receipt, and the gateway's memory."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import psutil

from bench.client import sse
from bench.stats import percentile
from services.mesh import Mesh

PARAMS = {
    "prompt": "a crowded harbour at noon",
    "width": 128,
    "height": 128,
    "steps": 40,
    "skip_cache": True,
}


async def run(mesh: Mesh, watchers: int, jobs: int) -> dict[str, Any]:
    gateway = psutil.Process(mesh.processes["gateway"].pid)
    rss_before = gateway.memory_info().rss
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=60) as client:
        run_ids = []
        for i in range(jobs):
            body = {**PARAMS, "seed": 1000 + i}
            response = await client.post("/api/generate/text-to-image", json=body)
            run_ids.append(response.raise_for_status().json()["run_id"])

        lags: list[float] = []
        cut_short: list[int] = []
        received: dict[int, list[str]] = {}
        peak = rss_before
        done = asyncio.Event()

        async def watch(index: int, run_id: str) -> None:
            connected = asyncio.Event()
            ids = received.setdefault(index, [])
            connected_at = 0.0
            path = f"/api/status/stream/{run_id}"
            try:
                async for event in sse("127.0.0.1", mesh.ports.http, path, connected, key=mesh.key):
                    if not connected_at:
                        connected_at = time.time()
                    ids.append(event.id)
                    if event.appended >= connected_at:  # live, not replayed
                        lags.append((event.received - event.appended) * 1e3)
            except (ConnectionError, RuntimeError):
                cut_short.append(index)

        async def sample_memory() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, gateway.memory_info().rss)
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample_memory())
        started = time.perf_counter()
        await asyncio.gather(*(watch(i, run_ids[i % jobs]) for i in range(watchers)))
        wall = time.perf_counter() - started
        done.set()
        await sampler

        truth = {}
        for run_id in run_ids:
            truth[run_id] = [
                e.id
                async for e in sse(
                    "127.0.0.1", mesh.ports.http, f"/api/status/stream/{run_id}", key=mesh.key
                )
            ]
    complete = sum(received[i] == truth[run_ids[i % jobs]] for i in range(watchers))
    return {
        "watchers": watchers,
        "jobs": jobs,
        "params": PARAMS,
        "events_per_job": [len(truth[r]) for r in run_ids],
        "watchers_with_every_event": complete,
        "streams_cut_short": len(cut_short),
        "live_events_measured": len(lags),
        "lag_p50_ms": percentile(lags, 50),
        "lag_p99_ms": percentile(lags, 99),
        "wall_s": wall,
        "gateway_rss_before_mb": rss_before / 2**20,
        "gateway_rss_peak_mb": peak / 2**20,
    }
