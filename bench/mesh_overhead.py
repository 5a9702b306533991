"""Mesh overhead: one job through HTTP -> gateway -> queue -> generator -> store -> evaluate ->
SSE final, against the same pipeline called directly in this process (same model, size, steps,
seed), with the overhead split by stage from the job's own events."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from bench.client import MODEL_DIR, sse
from bench.stats import median
from services.common.torch_compat import prepare_torch
from services.mesh import Mesh

PARAMS = {
    "prompt": "a lighthouse on a cliff at dusk",
    "width": 256,
    "height": 256,
    "steps": 20,
    "num_variants": 1,
    "seed": 1234,
    "skip_cache": True,
}
STAGES = (
    "admission",
    "queue_wait",
    "generation",
    "encode",
    "store",
    "evaluate",
    "event_delivery",
    "other",
)


async def one_job(mesh: Mesh, client: httpx.AsyncClient) -> dict[str, float]:
    started = time.time()
    response = (await client.post("/api/generate/text-to-image", json=PARAMS)).raise_for_status()
    admitted = time.time()
    run_id = response.json()["run_id"]
    events = [
        e
        async for e in sse(
            "127.0.0.1", mesh.ports.http, f"/api/status/stream/{run_id}", key=mesh.key
        )
    ]
    by_kind: dict[str, Any] = {}
    for event in events:
        by_kind.setdefault(event.event, []).append(event)
    queued, running = by_kind["status"][0], by_kind["status"][1]
    artifact, evaluation, final = (
        by_kind["artifact"][0],
        by_kind["evaluation"][0],
        by_kind["final"][0],
    )
    stages = {
        "admission": (admitted - started) * 1e3,
        "queue_wait": (running.appended - queued.appended) * 1e3,
        "generation": artifact.data["render_ms"],
        "encode": artifact.data["encode_ms"],
        "store": artifact.data["store_ms"],
        "evaluate": evaluation.data["evaluate_ms"],
        "event_delivery": (final.received - final.appended) * 1e3,
    }
    total = (final.received - started) * 1e3
    stages["other"] = total - sum(stages.values())
    stages["total"] = total
    return stages


def direct_runs(runs: int) -> list[dict[str, float]]:
    """The same render and PNG encode, in this process, with no service in between."""
    prepare_torch()
    from services.generator.pipeline import RenderRequest, SdRunner, encode_png

    runner = SdRunner(Path(MODEL_DIR) / "tiny-sd")
    request = RenderRequest(
        prompt=str(PARAMS["prompt"]),
        negative_prompt="",
        width=256,
        height=256,
        steps=20,
        guidance_scale=7.5,
        seed=1234,
    )
    results = []
    for _ in range(runs + 2):  # two warm-up runs, as for the mesh
        started = time.perf_counter()
        image = runner.render_one(request, lambda step, total: None, lambda: False)
        rendered = time.perf_counter()
        encode_png(image)
        done = time.perf_counter()
        results.append(
            {
                "generation": (rendered - started) * 1e3,
                "encode": (done - rendered) * 1e3,
                "total": (done - started) * 1e3,
            }
        )
    return results[2:]


async def run(mesh: Mesh, runs: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=120) as client:
        for _ in range(2):
            await one_job(mesh, client)  # warm-up: lazy imports, first allocations
        mesh_runs = [await one_job(mesh, client) for _ in range(runs)]
    direct = direct_runs(runs)
    mesh_total = median([r["total"] for r in mesh_runs])
    direct_total = median([r["total"] for r in direct])
    return {
        "params": PARAMS,
        "runs": runs,
        "mesh_total_ms": mesh_total,
        "direct_total_ms": direct_total,
        "ratio": mesh_total / direct_total,
        "overhead_ms": mesh_total - direct_total,
        "stages_ms": {s: median([r[s] for r in mesh_runs]) for s in STAGES},
        "direct_stages_ms": {s: median([r[s] for r in direct]) for s in ("generation", "encode")},
    }
