"""Faults as operators cause them, against real processes: the four services run as separate
processes on a dedicated Redis and Postgres (tests/faults.py) that each test stops, restarts,
flushes or kills -9, or it kills -9 a service.

Every test checks what a client must be able to rely on: every accepted job reaches a terminal
state exactly once (one final event, artifacts neither lost nor duplicated, charged only when
completed), and no refused submission runs.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2

from services.common import db
from services.common.events import EventLog, stream_key
from services.common.queue import JobQueue
from services.common.retry import StoreUnavailable
from services.jobs.lifecycle import JobLifecycle
from services.mesh import Mesh
from tests.faults import (  # noqa: F401 - fixtures
    FaultEnv,
    fault_env,
    fault_mesh,
    fault_stores,
    kill_service,
    restart_service,
    start_service,
)
from tests.helpers import queued_job

pytestmark = pytest.mark.faults

# The bar: every accepted job ends within this long after the stores are back.
SETTLE_SECONDS = 60.0
TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class Burst:
    """Submissions and what the client was told."""

    accepted: dict[str, str] = field(default_factory=dict)  # prompt -> job id
    refused: list[str] = field(default_factory=list)  # prompts answered 503
    unknown: list[str] = field(default_factory=list)  # the connection broke: no answer


def job_body(prompt: str, steps: int = 4, variants: int = 2, size: int = 64) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "width": size,
        "height": size,
        "steps": steps,
        "num_variants": variants,
        "seed": 7,
        "skip_cache": True,
    }


async def submit(http: httpx.AsyncClient, burst: Burst, prompt: str, **kw: Any) -> None:
    try:
        response = await http.post("/api/generate/text-to-image", json=job_body(prompt, **kw))
    except httpx.TransportError:
        burst.unknown.append(prompt)
        return
    if response.status_code == 201:
        burst.accepted[prompt] = response.json()["run_id"]
        return
    assert response.status_code == 503, response.text  # refused, and said so
    assert response.headers["retry-after"].isdigit()
    assert response.json()["error"]["code"] == "UNAVAILABLE"
    burst.refused.append(prompt)


async def submit_burst(
    http: httpx.AsyncClient, count: int, during: Callable[[], Any], at: int
) -> Burst:
    """`count` submissions one after another; `during()` (a fault) starts before number `at`
    and runs while the rest are submitted."""
    burst = Burst()
    fault: asyncio.Task[Any] | None = None
    tag = uuid.uuid4().hex[:8]
    for i in range(count):
        if i == at:
            fault = asyncio.create_task(during())
        await submit(http, burst, f"burst {tag} {i}")
        await asyncio.sleep(0.05)
    if fault is not None:
        await fault
    return burst


async def settle(database_url: str, job_ids: list[str], within: float) -> dict[str, str]:
    """Waits until every job is terminal; returns their statuses (the test fails on time)."""
    deadline = time.monotonic() + within
    statuses: dict[str, str] = {}
    while True:
        try:
            conn = await asyncpg.connect(database_url)
            try:
                rows = await conn.fetch(
                    "SELECT id::text, status FROM jobs WHERE id = ANY($1::uuid[])", job_ids
                )
            finally:
                await conn.close()
            statuses = {r["id"]: r["status"] for r in rows}
        except (OSError, asyncpg.PostgresError):
            pass  # the store is still away
        if len(statuses) == len(job_ids) and all(s in TERMINAL for s in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            stuck = {j: s for j, s in statuses.items() if s not in TERMINAL}
            pytest.fail(f"{len(stuck)} of {len(job_ids)} jobs not ended in {within}s: {stuck}")
        await asyncio.sleep(0.25)


async def check_exactly_once(
    env: FaultEnv, burst: Burst, events_kept: bool = True, variants: int = 2
) -> dict[str, str]:
    """Every accepted job ended once; no refused submission became a job."""
    job_ids = list(burst.accepted.values())
    statuses = await settle(env.database_url, job_ids, SETTLE_SECONDS)
    conn = await asyncpg.connect(env.database_url)
    redis = aioredis.from_url(env.redis_url)
    try:
        rows = await conn.fetch(
            "SELECT j.id::text, j.status, j.cost_cents, j.spec->>'prompt' AS prompt,"
            " count(a.id) AS artifacts, count(DISTINCT a.variant_index) AS variants"
            " FROM jobs j LEFT JOIN artifacts a ON a.job_id = j.id GROUP BY j.id"
        )
        by_prompt = {r["prompt"]: r for r in rows}
        for prompt in burst.refused:
            assert prompt not in by_prompt, f"refused submission {prompt!r} became a job"
        for job_id in job_ids:
            row = next(r for r in rows if r["id"] == job_id)
            if row["status"] == "completed":
                assert row["artifacts"] == row["variants"] == variants, row
                assert row["cost_cents"] >= 1
            else:
                assert row["cost_cents"] == 0, row  # only completed jobs are charged
            if events_kept:
                entries = await redis.xrange(stream_key(job_id))
                finals = [e for _, e in entries if b"final" in _kind(e)]
                assert len(finals) == 1, f"job {job_id}: {len(finals)} final events"
    finally:
        await redis.aclose()
        await conn.close()
    return statuses


def _kind(fields: dict[bytes, bytes]) -> bytes:
    from imagegen.v1 import events_pb2

    return (events_pb2.JobEvent.FromString(fields[b"e"]).WhichOneof("payload") or "").encode()


async def serving(mesh: Mesh, name: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2_grpc

    async with grpc.aio.insecure_channel(mesh.addr(name)) as channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


async def wait_health(mesh: Mesh, name: str, want: bool, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while await serving(mesh, name) != want:
        assert time.monotonic() < deadline, f"{name} never became serving={want}"
        await asyncio.sleep(0.2)


async def test_a_generator_killed_mid_job_leaves_no_job_unfinished_or_rendered_twice(
    fault_env: FaultEnv, fault_mesh: Any
) -> None:
    mesh: Mesh = await fault_mesh()
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=30) as http:
        burst = Burst()
        for i in range(6):
            await submit(http, burst, f"kill {i}", steps=40, variants=2, size=128)
        await asyncio.sleep(1.5)  # the first job is rendering
        assert await restart_service(mesh, "generator") == -9
        statuses = await check_exactly_once(fault_env, burst)
    assert set(statuses.values()) == {"completed"}
    assert not burst.refused


async def test_an_sse_stream_cut_by_a_gateway_kill_resumes_with_last_event_id_without_gaps(
    fault_env: FaultEnv, fault_mesh: Any
) -> None:
    mesh: Mesh = await fault_mesh()
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=30) as http:
        burst = Burst()
        await submit(http, burst, "resumed", steps=60, variants=2, size=128)
        job_id = burst.accepted["resumed"]
        seen: list[str] = []
        async with http.stream("GET", f"/api/status/stream/{job_id}") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("id: "):
                    seen.append(line[4:])
                if len(seen) >= 5:
                    break
        assert await restart_service(mesh, "gateway") == -9
        names: list[str] = []
        async with http.stream(
            "GET", f"/api/status/stream/{job_id}", headers={"Last-Event-ID": seen[-1]}
        ) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("id: "):
                    seen.append(line[4:])
                elif line.startswith("event: "):
                    names.append(line[7:])
        assert names[-1] == "final"
        await check_exactly_once(fault_env, burst)
        everything = await http.get(f"/api/status/stream/{job_id}")
    replayed = [line[4:] for line in everything.text.splitlines() if line.startswith("id: ")]
    assert seen == replayed  # no gap, no duplicate across the cut


async def test_a_redis_restart_during_a_burst_loses_no_accepted_job(
    fault_env: FaultEnv, fault_mesh: Any
) -> None:
    mesh: Mesh = await fault_mesh()

    async def restart_redis() -> None:
        await asyncio.to_thread(fault_env.redis.restart, 2.0, hard=True)

    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=30) as http:
        burst = await submit_burst(http, 50, restart_redis, at=15)
        # Postgres stayed up: every submission was admitted, Redis or not.
        assert len(burst.accepted) + len(burst.unknown) == 50
        statuses = await check_exactly_once(fault_env, burst)
    assert set(statuses.values()) == {"completed"}
    await wait_health(mesh, "generator", True)


async def test_redis_losing_all_its_data_loses_no_job(fault_env: FaultEnv, fault_mesh: Any) -> None:
    mesh: Mesh = await fault_mesh()
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=30) as http:
        burst = Burst()
        for i in range(20):
            await submit(http, burst, f"flushed {i}", steps=8)
        # A failover to an empty replica: queue, consumer group, events and index all gone.
        await asyncio.to_thread(fault_env.redis.wipe_and_restart)
        statuses = await check_exactly_once(fault_env, burst, events_kept=False)
        # Watching still ends, from the record, though the event streams are gone.
        job_id = burst.accepted["flushed 0"]
        response = await http.get(f"/api/status/stream/{job_id}", timeout=30)
        assert "event: final" in response.text
    assert set(statuses.values()) == {"completed"}


async def test_a_postgres_restart_under_load_refuses_truthfully_and_loses_no_accepted_job(
    fault_env: FaultEnv, fault_mesh: Any
) -> None:
    mesh: Mesh = await fault_mesh()

    async def restart_postgres() -> None:
        await asyncio.to_thread(fault_env.postgres.restart, 3.0, hard=True)

    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=30) as http:
        burst = await submit_burst(http, 40, restart_postgres, at=10)
        assert burst.refused, "Postgres was down: some submissions must have been refused"
        statuses = await check_exactly_once(fault_env, burst)
    assert set(statuses.values()) == {"completed"}
    await wait_health(mesh, "generator", True)
    await wait_health(mesh, "gateway", True)


async def test_postgres_killed_under_concurrent_writes_raises_only_store_unavailable(
    fault_env: FaultEnv,
) -> None:
    """A connection that breaks mid-transaction can leave asyncpg's protocol busy, so that the
    COMMIT or the pool's reset raises InternalClientError: the lifecycle must report that as the
    store being away (503), never as an internal error, and a job it said it admitted exists."""
    pool = await db.connect(fault_env.database_url, max_size=16)
    redis = aioredis.from_url(fault_env.redis_url)
    lifecycle = JobLifecycle(pool, redis, EventLog(redis, 600), JobQueue(redis))
    admitted: list[str] = []
    unavailable = 0
    done = asyncio.Event()

    async def admit_until_done() -> None:
        nonlocal unavailable
        while not done.is_set():
            try:
                admitted.append((await lifecycle.admit(queued_job())).job.id)
            except StoreUnavailable:
                unavailable += 1
                await asyncio.sleep(0.01)

    writers = [asyncio.create_task(admit_until_done()) for _ in range(16)]
    try:
        for _ in range(4):
            await asyncio.sleep(1.0)
            await asyncio.to_thread(fault_env.postgres.restart, 0.5, hard=True)
        await asyncio.sleep(1.0)
    finally:
        done.set()
        outcomes = await asyncio.gather(*writers, return_exceptions=True)
    try:
        assert [o for o in outcomes if o is not None] == []  # nothing but StoreUnavailable
        assert unavailable > 0, "the kills were never noticed"
        rows = await pool.fetch("SELECT id::text FROM jobs WHERE id = ANY($1::uuid[])", admitted)
        assert len(rows) == len(admitted)
    finally:
        await redis.aclose()
        await pool.close()


async def test_health_reports_not_serving_while_postgres_is_away_and_serving_after(
    fault_env: FaultEnv, fault_mesh: Any
) -> None:
    mesh: Mesh = await fault_mesh()
    await asyncio.to_thread(fault_env.postgres.stop)
    try:
        await wait_health(mesh, "generator", False)
        await wait_health(mesh, "gateway", False)
    finally:
        await asyncio.to_thread(fault_env.postgres.start)
    await wait_health(mesh, "generator", True)
    await wait_health(mesh, "gateway", True)


async def test_cancelling_a_running_job_stops_its_render_within_one_step(
    fault_env: FaultEnv, fault_mesh: Any
) -> None:
    mesh: Mesh = await fault_mesh(WORKERS="1")  # one job in hand: the second one waits
    steps = 100
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=30) as http:
        burst = Burst()
        await submit(http, burst, "cancelled", steps=steps, variants=1, size=256)
        await submit(http, burst, "never starts", steps=steps, variants=1, size=256)
        running, waiting = burst.accepted["cancelled"], burst.accepted["never starts"]
        async with http.stream("GET", f"/api/status/stream/{running}") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: progress"):
                    break
        # The waiting job first: once the running one stops, the worker takes the next job.
        queued = await http.post(f"/api/jobs/{waiting}/cancel")
        assert queued.json()["status"] == "cancelled"
        cancelled = await http.post(f"/api/jobs/{running}/cancel")
        assert cancelled.json()["status"] == "cancelled"
        await check_exactly_once(fault_env, burst, variants=0)
        await asyncio.sleep(1.0)  # anything still rendering would report more steps by now
        redis = aioredis.from_url(fault_env.redis_url)
        try:
            entries = await redis.xrange(stream_key(running))
            kinds = [_kind(fields).decode() for _, fields in entries]
            waiting_kinds = [_kind(f).decode() for _, f in await redis.xrange(stream_key(waiting))]
        finally:
            await redis.aclose()
    final_at = kinds.index("final")
    after_cancel = kinds[final_at + 1 :]
    assert set(after_cancel) <= {"progress"} and len(after_cancel) <= 1, kinds
    assert kinds.count("progress") < steps
    assert waiting_kinds == ["status", "final"]  # queued, then cancelled: it never started
    # The worker is free for the next job at once.
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=30) as http:
        burst = Burst()
        await submit(http, burst, "after the cancel")
        assert set((await check_exactly_once(fault_env, burst)).values()) == {"completed"}


async def test_a_generator_stopped_mid_job_exits_in_its_grace_and_its_job_runs_elsewhere(
    fault_env: FaultEnv, fault_mesh: Any
) -> None:
    mesh: Mesh = await fault_mesh(GRACE_SECONDS="2")
    async with httpx.AsyncClient(base_url=mesh.http_url, headers=mesh.auth, timeout=30) as http:
        burst = Burst()
        await submit(http, burst, "interrupted", steps=100, variants=2, size=256)
        job_id = burst.accepted["interrupted"]
        async with http.stream("GET", f"/api/status/stream/{job_id}") as stream:
            async for line in stream.aiter_lines():
                if line.startswith("event: progress"):
                    break
        started = time.monotonic()
        # SIGTERM: the job in hand gets half the grace period, then goes back on the queue.
        assert await asyncio.to_thread(kill_service, mesh, "generator", signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
        job = (await http.get(f"/api/status/{job_id}")).json()
        assert job["status"] == "queued" and job["attempts"] == 1, job
        await start_service(mesh, "generator")
        statuses = await check_exactly_once(fault_env, burst)
    assert statuses == {job_id: "completed"}
