"""The admin dashboard's API through the real gateway, cache, generator and evaluator: after jobs
that render, hit the cache (seed-aware and seed-agnostic), fail, are cancelled and are refused,
`GET /api/admin/stats` answers the counts, hit ratio, queue depth, cost and duration histograms
(with p50/p95/p99) that the jobs' rows in Postgres hold, and that the test saw happen. It needs
the admin scope; bad parameters are 422 naming the field. The page and the vendored Chart.js
are served by the gateway itself.

The module's database is its own (tests/conftest.py), so every job in it is one this module ran.
"""

from __future__ import annotations

import bisect
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio

from services.common.settings import CommonSettings
from services.gateway.admin import DURATION_BOUNDS, STAGE_NAMES
from services.tenants.keys import Scope
from tests.conftest import ROOT, Mesh, ServiceEnv, bearer, new_key, start_in_process
from tests.helpers import png_bytes, stored_upload

WAIT = 60.0
BUCKET = 60


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mesh(env: ServiceEnv) -> AsyncIterator[Mesh]:
    started = await start_in_process(env, ("cache", "evaluator", "generator", "gateway"))
    yield started
    await started.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def http(mesh: Mesh) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=WAIT) as client:
        yield client


def body(prompt: str, **fields: Any) -> dict[str, Any]:
    return {"prompt": prompt, "width": 64, "height": 64, "steps": 4, "seed": 7, **fields}


@dataclass
class Ran:
    """What the test did and saw: jobs by how they ended, with the estimate each was given and
    the wall-clock seconds from its request to its final event as the client saw them."""

    hits: list[str] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    rendered: dict[str, float] = field(default_factory=dict)  # run id -> seconds seen
    estimates: dict[str, int] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    refused: int = 0


async def generate(http: httpx.AsyncClient, mesh: Mesh, ran: Ran, request: dict[str, Any]) -> str:
    response = await http.post("/api/generate/text-to-image", json=request, headers=mesh.auth)
    assert response.status_code == 201, response.text
    job = response.json()
    (ran.hits if job["cached_hit"] else ran.misses).append(job["run_id"])
    ran.estimates[job["run_id"]] = job["est_cost_cents"]
    return str(job["run_id"])


async def final_status(http: httpx.AsyncClient, mesh: Mesh, run_id: str) -> str:
    """Follows the job's SSE stream to its final event; the job's status then."""
    async with http.stream("GET", f"/api/status/stream/{run_id}", headers=mesh.auth) as stream:
        async for line in stream.aiter_lines():
            if line == "event: final":
                break
    status = await http.get(f"/api/status/{run_id}", headers=mesh.auth)
    return str(status.json()["status"])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def ran(mesh: Mesh, http: httpx.AsyncClient, env: ServiceEnv) -> Ran:
    """Two jobs that render, a seed-aware and a seed-agnostic cache hit, a job that fails (its
    reference image disappears after admission), a slow job and one queued behind it (the
    generator has one worker), both cancelled, and a prompt the content policy refuses."""
    ran = Ran()
    request = body(f"a lighthouse {uuid.uuid4()}")
    for prompt in (request, body(f"a windmill {uuid.uuid4()}", seed=3)):
        began = time.monotonic()
        run_id = await generate(http, mesh, ran, prompt)
        assert await final_status(http, mesh, run_id) == "completed"
        ran.rendered[run_id] = time.monotonic() - began
    await generate(http, mesh, ran, request)
    await generate(http, mesh, ran, {**request, "seed": 8, "seed_agnostic_cache": True})
    assert len(ran.hits) == 2

    key = await stored_upload(env, png_bytes())
    guided = body(
        f"a guided lamp {uuid.uuid4()}",
        width=256,
        height=256,
        steps=60,
        guidance_images=[{"key": key, "role": "reference"}],
    )
    doomed = await generate(http, mesh, ran, guided)
    (env.settings(CommonSettings).objects_root() / key).unlink()
    assert await final_status(http, mesh, doomed) == "failed"
    ran.failed.append(doomed)

    slow = await generate(
        http, mesh, ran, body(f"a slow harbour {uuid.uuid4()}", width=512, height=512, steps=100)
    )
    queued = await generate(http, mesh, ran, body(f"a queued pier {uuid.uuid4()}"))
    for run_id in (queued, slow):
        cancel = await http.post(f"/api/jobs/{run_id}/cancel", headers=mesh.auth)
        assert cancel.json()["status"] == "cancelled"
        ran.cancelled.append(run_id)

    refused = await http.post(
        "/api/generate/text-to-image", json=body("a gory battlefield"), headers=mesh.auth
    )
    assert refused.status_code == 422
    assert refused.json()["error"]["policy_violation"]["category"] == "violence"
    ran.refused += 1
    return ran


async def job_rows(env: ServiceEnv) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(env.database_url)
    try:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        return list(
            await conn.fetch(
                "SELECT id::text AS id, status, cache_hit, cache_result, failure_reason,"
                " created_at, started_at, ended_at, estimated_cents, cost_cents, stage_seconds,"
                " spec->>'model' AS model, (spec->>'num_variants')::int AS images FROM jobs"
            )
        )
    finally:
        await conn.close()


def percentile(values: list[float], q: float) -> float:
    """Postgres's percentile_cont: linear interpolation between the closest ranks."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low, high = math.floor(at), math.ceil(at)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def histogram(values: list[float]) -> list[int]:
    counts = [0] * (len(DURATION_BOUNDS) + 1)
    for value in values:
        counts[bisect.bisect_right(DURATION_BOUNDS, value)] += 1
    return counts


def check_histogram(answer: dict[str, Any], values: list[float]) -> None:
    assert answer["count"] == len(values)
    assert answer["counts"] == histogram(values)
    assert answer["sum_seconds"] == pytest.approx(sum(values), abs=1e-5)
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        assert answer[name] == pytest.approx(percentile(values, q), abs=1e-5), name


def seconds(interval: timedelta) -> float:
    return interval.total_seconds()


def bucket_of(at: datetime, start: datetime) -> int:
    step = BUCKET * 1_000_000
    return int(at.timestamp() * 1_000_000) // step - int(start.timestamp() * 1_000_000) // step


def queue_depths(
    rows: list[asyncpg.Record], start: datetime, n: int
) -> tuple[list[int], list[int]]:
    """The peak and end-of-bucket queue depth, by walking the jobs' waits in time order."""
    moves = []
    for r in rows:
        if r["cache_hit"]:
            continue
        moves.append((r["created_at"], 1))
        left = r["started_at"] or r["ended_at"]
        if left is not None:
            moves.append((left, -1))
    moves.sort()  # at one instant, departures first
    peaks, ends, depth, i = [0] * n, [0] * n, 0, 0
    while i < len(moves) and bucket_of(moves[i][0], start) < 0:
        depth += moves[i][1]
        i += 1
    for b in range(n):
        peak = depth
        while i < len(moves) and bucket_of(moves[i][0], start) <= b:
            depth += moves[i][1]
            peak = max(peak, depth)
            i += 1
        peaks[b], ends[b] = peak, depth
    return peaks, ends


async def stats(http: httpx.AsyncClient, key: str, **params: Any) -> httpx.Response:
    return await http.get("/api/admin/stats", params=params, headers=bearer(key))


async def test_the_stats_match_the_jobs_that_ran(
    mesh: Mesh, http: httpx.AsyncClient, env: ServiceEnv, ran: Ran
) -> None:
    rows = await job_rows(env)
    by_id = {r["id"]: r for r in rows}
    assert len(rows) == len(ran.hits) + len(ran.misses)
    # The lifecycle recorded what the dashboard reads.
    for run_id in ran.rendered:
        row = by_id[run_id]
        assert row["started_at"] is not None and row["ended_at"] is not None
        assert row["stage_seconds"]
    assert all(by_id[h]["cache_result"] in ("hit_seed", "hit_seedless") for h in ran.hits)
    assert by_id[ran.failed[0]]["failure_reason"] == "invalid"

    start = min(r["created_at"] for r in rows) - timedelta(seconds=1)
    end = max(r["ended_at"] for r in rows) + timedelta(seconds=1)
    answer = await stats(
        http, mesh.key, **{"from": start.isoformat(), "to": end.isoformat(), "bucket": BUCKET}
    )
    assert answer.status_code == 200, answer.text
    got = answer.json()
    n = len(got["buckets"])
    assert n == bucket_of(end - timedelta(microseconds=1), start) + 1
    assert got["bucket_seconds"] == BUCKET

    # Totals: what the test did, and what the rows say.
    totals = got["totals"]
    assert totals["admitted"] == len(rows)
    assert totals["rendered"] == len(ran.rendered)
    assert totals["cache_hits"] == len(ran.hits)
    assert totals["completed"] == len(ran.rendered) + len(ran.hits)
    assert totals["cache_lookups"] == len(ran.hits) + len(ran.misses)
    assert totals["hit_ratio"] == pytest.approx(len(ran.hits) / (len(ran.hits) + len(ran.misses)))
    assert totals["failed"] == len(ran.failed)
    assert totals["failed_by_reason"]["invalid"] == len(ran.failed)
    assert totals["cancelled"] == len(ran.cancelled)
    # Only a rendered job is charged, its estimate; every ended job had an estimate.
    assert totals["actual_cents"] == sum(ran.estimates[r] for r in ran.rendered)
    assert totals["estimated_cents"] == sum(ran.estimates.values())

    # Series, bucket by bucket: cache results by creation time, ends by end time.
    def series(rows_: list[asyncpg.Record], column: str) -> list[int]:
        counts = [0] * n
        for r in rows_:
            counts[bucket_of(r[column], start)] += 1
        return counts

    for result in ("hit_seed", "hit_seedless", "miss"):
        chosen = [r for r in rows if r["cache_result"] == result]
        assert got["cache"][result] == series(chosen, "created_at"), result
    assert sum(got["cache"]["hit_seed"]) == sum(got["cache"]["hit_seedless"]) == 1
    for i, ratio in enumerate(got["cache"]["hit_ratio"]):
        hits = got["cache"]["hit_seed"][i] + got["cache"]["hit_seedless"][i]
        lookups = hits + got["cache"]["miss"][i]
        assert ratio == (pytest.approx(hits / lookups) if lookups else None)
    assert got["jobs"]["admitted"] == series(rows, "created_at")
    ended = {
        "rendered": [r for r in rows if r["status"] == "completed" and not r["cache_hit"]],
        "cache_hits": [r for r in rows if r["cache_hit"]],
        "cancelled": [r for r in rows if r["status"] == "cancelled"],
    }
    for name, chosen in ended.items():
        assert got["jobs"][name] == series(chosen, "ended_at"), name
    failed = [r for r in rows if r["status"] == "failed"]
    assert got["jobs"]["failed"]["invalid"] == series(failed, "ended_at")
    assert got["cost"]["actual_cents"] == [
        sum(r["cost_cents"] for r in rows if r["ended_at"] and bucket_of(r["ended_at"], start) == i)
        for i in range(n)
    ]

    # The queue: the job queued behind the slow one waited, so the depth reached at least 1.
    peaks, ends = queue_depths(rows, start, n)
    assert got["queue"] == {"depth_peak": peaks, "depth_end": ends}
    assert totals["queue_peak"] >= 1

    # Durations: end to end of the rendered jobs, each within what the client saw.
    rendered = {r["id"]: seconds(r["ended_at"] - r["created_at"]) for r in ended["rendered"]}
    for run_id, seen in ran.rendered.items():
        assert 0 < rendered[run_id] <= seen
    durations = got["durations"]
    assert durations["bounds_seconds"] == list(DURATION_BOUNDS)
    check_histogram(durations["end_to_end"], list(rendered.values()))
    every = [seconds(r["ended_at"] - r["created_at"]) for r in rows if not r["cache_hit"]]
    check_histogram(durations["end_to_end_all"], every)
    waits = [seconds(r["started_at"] - r["created_at"]) for r in rows if r["started_at"]]
    check_histogram(durations["stages"]["queue_wait"], waits)
    stages = {stage for r in rows for stage in r["stage_seconds"]}
    assert {STAGE_NAMES.get(s, s) for s in stages} | {"queue_wait"} == {
        name for name, h in durations["stages"].items() if h["count"]
    }
    for stage in stages:
        values = [r["stage_seconds"][stage] for r in rows if stage in r["stage_seconds"]]
        check_histogram(durations["stages"][STAGE_NAMES.get(stage, stage)], values)

    assert got["models"] == [
        {
            "model": rows[0]["model"],
            "jobs": len(rows),
            "images": sum(r["images"] for r in rows),
            "rendered": len(ran.rendered),
            "cache_hits": len(ran.hits),
            "failed": len(ran.failed),
            "cancelled": len(ran.cancelled),
            "charged_cents": totals["actual_cents"],
        }
    ]
    assert got["refusals"]["by_category"] == [
        {"kind": "prompt", "category": "violence", "count": ran.refused}
    ]


async def test_a_rendered_job_has_the_seconds_of_each_stage_it_went_through(
    env: ServiceEnv, ran: Ran
) -> None:
    """The stages a worker announces for a render that starts with its model loaded (the
    generator warmed it up), each timed under its own name (the stage histograms' input), and
    together the whole attempt."""
    rows = {r["id"]: r for r in await job_rows(env)}
    expected = {
        "starting",
        "encoding_prompt",
        "denoising",
        "decoding",
        "encoding_png",
        "uploading",
        "evaluating",
    }
    for run_id in ran.rendered:
        recorded = rows[run_id]["stage_seconds"]
        assert expected <= set(recorded), sorted(recorded)
        assert all(seconds >= 0 for seconds in recorded.values())
        total = seconds(rows[run_id]["ended_at"] - rows[run_id]["started_at"])
        assert sum(recorded.values()) == pytest.approx(total, abs=0.05)


async def test_the_default_range_is_the_last_hour(
    mesh: Mesh, http: httpx.AsyncClient, ran: Ran
) -> None:
    answer = await stats(http, mesh.key)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    span = datetime.fromisoformat(got["to"]) - datetime.fromisoformat(got["from"])
    assert span == timedelta(hours=1)
    assert abs(datetime.fromisoformat(got["to"]) - datetime.now(UTC)) < timedelta(minutes=1)
    assert got["bucket_seconds"] == 60 and len(got["buckets"]) in (60, 61)
    assert got["totals"]["admitted"] == len(ran.hits) + len(ran.misses)


async def test_a_key_without_the_admin_scope_is_forbidden(
    mesh: Mesh, http: httpx.AsyncClient, env: ServiceEnv
) -> None:
    key = await new_key(env.database_url, "tests", (Scope.READ, Scope.GENERATE))
    answer = await stats(http, key)
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "PERMISSION_DENIED"
    assert (await http.get("/api/admin/stats")).status_code == 401


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "yesterday"}, "from"),
        ({"from": "2025-01-31T12:00:00"}, "from"),  # no offset
        ({"to": "2025-01-31"}, "to"),
        ({"from": "2025-01-31T12:00:00Z", "to": "2025-01-31T11:00:00Z"}, "from"),
        ({"from": "2020-01-01T00:00:00Z", "to": "2025-01-01T00:00:00Z"}, "from"),
        ({"bucket": "0"}, "bucket"),
        ({"bucket": "-5"}, "bucket"),
        ({"bucket": "1"}, "bucket"),  # 3600 buckets in the default hour
    ],
)
async def test_a_bad_parameter_is_422_naming_it(
    mesh: Mesh, http: httpx.AsyncClient, params: dict[str, str], field: str
) -> None:
    answer = await stats(http, mesh.key, **params)
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert [v["field"] for v in error["field_violations"]] == [field]
    assert error["request_id"]


async def test_the_page_and_its_charting_library_come_from_the_gateway(
    http: httpx.AsyncClient,
) -> None:
    page = await http.get("/admin")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    scripts = [line.split('"')[1] for line in page.text.splitlines() if "<script src=" in line]
    assert all(src.startswith("/static/") for src in scripts) and len(scripts) == 2
    for src in scripts:
        script = await http.get(src)
        assert script.status_code == 200, src
        assert script.headers["content-type"].startswith("text/javascript")
        assert script.headers["x-content-type-options"] == "nosniff"
    library = await http.get(scripts[0])
    assert library.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert library.text.startswith("/*!\n * Chart.js v")
    own = await http.get(scripts[1])
    assert own.headers["cache-control"] == "no-cache"
    for missing in ("/static/admin.html", "/static/../admin.py", "/static/%2e%2e/admin.py"):
        assert (await http.get(missing)).status_code == 404, missing


def test_the_vendored_library_is_the_version_web_package_json_pins() -> None:
    version = json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]["chart.js"]
    folder = ROOT / "services" / "gateway" / "static" / "vendor" / f"chart.js-{version}"
    library = (folder / "chart.umd.min.js").read_text()
    assert library.startswith(f"/*!\n * Chart.js v{version}\n")
    assert "MIT" in (folder / "LICENSE.md").read_text()
    page = (ROOT / "services" / "gateway" / "static" / "admin.html").read_text()
    assert f'src="/static/vendor/chart.js-{version}/chart.umd.min.js"' in page
    assert sorted(p.name for p in folder.parent.iterdir()) == [f"chart.js-{version}"]
    assert not any(Path(folder).glob("*.map"))
