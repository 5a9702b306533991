"""The fair job queue on a real Redis: the order claims follow (round-robin between tenants,
weights, priority lanes within a tenant), reclaiming what a stopped worker held, the ack rule and
`missing` the reconciler relies on, blocking claims; then a real generator serving two tenants,
one with 200 jobs queued ahead of the other's one."""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest_asyncio
import redis.asyncio as aioredis
from imagegen.v1 import events_pb2, types_pb2

from services.common import db
from services.common.events import EventLog, decode_entries, stream_key
from services.common.queue import Delivery, JobQueue
from services.jobs.lifecycle import JobLifecycle
from services.jobs.records import CacheMode, JobRecord, Priority
from tests.conftest import ServiceEnv, start_in_process
from tests.helpers import queued_job

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW
log = logging.getLogger("tests.queue")


@pytest_asyncio.fixture(loop_scope="session")
async def redis(env: ServiceEnv) -> AsyncIterator[aioredis.Redis]:
    """A client on the module's Redis db, emptied for each test."""
    client = aioredis.from_url(env.redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


async def claim_all(queue: JobQueue, consumer: str = "worker-1") -> list[Delivery]:
    """Claims (and acks) until the queue has nothing left waiting."""
    claimed = []
    while (delivery := await queue.claim(consumer, block_ms=0)) is not None:
        await queue.ack(delivery)
        claimed.append(delivery)
    return claimed


async def test_one_tenants_jobs_in_one_lane_are_claimed_first_in_first_out(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    jobs = [f"job-{n}" for n in range(10)]
    tokens = [await queue.enqueue(job, "tenant-a") for job in jobs]
    claimed = await claim_all(queue)
    assert [d.job_id for d in claimed] == jobs
    assert [d.message_id for d in claimed] == tokens
    assert all(d.tenant == "tenant-a" and d.priority is NORMAL for d in claimed)
    assert not any(d.reclaimed for d in claimed)


async def test_a_tenants_high_jobs_go_before_its_normal_ones_and_those_before_its_low_ones(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    for job, lane in [("l1", LOW), ("n1", NORMAL), ("h1", HIGH), ("n2", NORMAL), ("h2", HIGH)]:
        await queue.enqueue(job, "tenant-a", lane)
    claimed = await claim_all(queue)
    assert [(d.job_id, d.priority) for d in claimed] == [
        ("h1", HIGH),
        ("h2", HIGH),
        ("n1", NORMAL),
        ("n2", NORMAL),
        ("l1", LOW),
    ]


async def test_a_tenant_with_200_queued_jobs_lets_another_tenants_job_in_within_two_claims(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    # Lanes buy no share: A's high jobs do not keep B's low one waiting.
    for n in range(200):
        await queue.enqueue(f"a-{n}", "tenant-a", HIGH)
    await queue.enqueue("b-0", "tenant-b", LOW)
    claimed = await claim_all(queue)
    assert "b-0" in [d.job_id for d in claimed[:2]]
    assert [d.job_id for d in claimed if d.tenant == "tenant-a"] == [f"a-{n}" for n in range(200)]


async def test_a_weight_3_tenant_gets_3_claims_per_round_against_a_weight_1_tenant(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    await queue.enqueue("a-0", "tenant-a", weight=3)
    await queue.enqueue("b-0", "tenant-b", weight=1)
    for n in range(1, 12):  # no weight: the stored one holds
        await queue.enqueue(f"a-{n}", "tenant-a")
        await queue.enqueue(f"b-{n}", "tenant-b")
    claimed = await claim_all(queue)
    order = "".join(d.tenant[-1] for d in claimed[:16])
    assert order == "aaab" * 4
    # Once A has nothing left, B has every claim.
    assert "".join(d.tenant[-1] for d in claimed[16:]) == "b" * 8


async def test_an_unacked_delivery_is_reclaimed_by_another_consumer_after_claim_idle_ms_only(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis, claim_idle_ms=200)
    await queue.enqueue("job-1", "tenant-a", LOW)
    held = await queue.claim("worker-1", block_ms=0)
    assert held is not None and not held.reclaimed
    await asyncio.sleep(0.1)
    assert await queue.claim("worker-2", block_ms=0) is None  # held for less than 200 ms
    await asyncio.sleep(0.15)
    reclaimed = await queue.claim("worker-2", block_ms=0)
    assert reclaimed == Delivery(held.message_id, "job-1", True, "tenant-a", LOW)
    # Stamped again: a third worker does not take it from the second straight away.
    assert await queue.claim("worker-3", block_ms=0) is None
    await queue.ack(reclaimed)
    assert await queue.backlog() == 0
    assert await queue.missing(["job-1"]) == ["job-1"]


async def test_an_acked_job_is_reported_missing_and_a_waiting_or_claimed_one_is_not(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    await queue.enqueue("job-1", "tenant-a")
    await queue.enqueue("job-2", "tenant-a")
    delivery = await queue.claim("worker-1", block_ms=0)
    assert delivery is not None and delivery.job_id == "job-1"
    assert await queue.missing(["job-1", "job-2", "job-3"]) == ["job-3"]
    await queue.ack(delivery)
    assert await queue.missing(["job-1", "job-2", "job-3"]) == ["job-1", "job-3"]


async def test_a_job_queued_again_between_claim_and_ack_is_not_forgotten_by_the_ack(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    await queue.enqueue("job-1", "tenant-a")
    first = await queue.claim("worker-1", block_ms=0)
    assert first is not None
    again = await queue.enqueue("job-1", "tenant-a")
    await queue.ack(first)
    assert await queue.missing(["job-1"]) == []
    second = await queue.claim("worker-1", block_ms=0)
    assert second is not None and (second.job_id, second.message_id) == ("job-1", again)


async def test_after_redis_is_flushed_every_queued_job_is_missing(redis: aioredis.Redis) -> None:
    queue = JobQueue(redis)
    jobs = ["job-1", "job-2", "job-3"]
    for job in jobs:
        await queue.enqueue(job, f"tenant-{job}")
    assert await queue.missing(jobs) == []
    await redis.flushdb()
    assert await queue.missing(jobs) == jobs
    assert await queue.claim("worker-1", block_ms=0) is None
    assert await queue.backlog() == 0


async def test_a_discarded_entry_is_never_claimed_and_its_job_is_missing(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    await queue.enqueue("job-1", "tenant-a")
    await queue.enqueue("job-2", "tenant-a")
    assert await queue.discard("job-1")
    assert not await queue.discard("job-1")
    assert await queue.missing(["job-1", "job-2"]) == ["job-1"]
    assert await queue.waiting_by_tenant() == {"tenant-a": 1}
    assert [d.job_id for d in await claim_all(queue)] == ["job-2"]


async def test_a_claim_finds_nothing_when_every_waiting_entry_was_discarded(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    for tenant in ("tenant-a", "tenant-b", "tenant-c"):
        await queue.enqueue(f"job-of-{tenant}", tenant)
        await queue.discard(f"job-of-{tenant}")
    assert await queue.claim("worker-1", block_ms=0) is None  # the ring empties as it goes
    await queue.enqueue("job-after", "tenant-b")
    assert [d.job_id for d in await claim_all(queue)] == ["job-after"]


async def test_a_claim_on_an_empty_queue_returns_none_after_block_ms(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    # An entry enqueued and claimed earlier leaves its wake-up behind: it must not cut the
    # next wait short.
    await queue.enqueue("job-1", "tenant-a")
    await queue.enqueue("job-2", "tenant-a")
    assert len(await claim_all(queue)) == 2
    started = time.monotonic()
    assert await queue.claim("worker-1", block_ms=300) is None
    assert 0.28 <= time.monotonic() - started < 1.0


async def test_a_waiting_claim_returns_as_soon_as_an_entry_is_enqueued(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    started = time.monotonic()
    waiting = asyncio.create_task(queue.claim("worker-1", block_ms=5000))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await queue.enqueue("job-1", "tenant-a")
    delivery = await asyncio.wait_for(waiting, 1.0)
    assert delivery is not None and delivery.job_id == "job-1"
    assert time.monotonic() - started < 1.0


async def test_forget_consumers_forgets_only_those_idle_that_long_and_keeps_their_entries(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis, claim_idle_ms=200)
    await queue.enqueue("job-1", "tenant-a")
    held = await queue.claim("worker-old", block_ms=0)
    await asyncio.sleep(0.3)
    assert await queue.claim("worker-new", block_ms=0) is not None  # the abandoned entry
    assert await queue.forget_consumers(idle_seconds=0.2) == ["worker-old"]
    assert await queue.forget_consumers(idle_seconds=0.2) == []
    assert await queue.forget_consumers(idle_seconds=0) == ["worker-new"]
    assert held is not None and await queue.backlog() == 1


async def test_backlog_counts_waiting_and_unacked_entries_and_waiting_by_tenant_the_waiting(
    redis: aioredis.Redis,
) -> None:
    queue = JobQueue(redis)
    assert (await queue.backlog(), await queue.waiting_by_tenant()) == (0, {})
    for n in range(3):
        await queue.enqueue(f"a-{n}", "tenant-a", HIGH if n else LOW)
    for n in range(2):
        await queue.enqueue(f"b-{n}", "tenant-b")
    assert await queue.backlog() == 5
    assert await queue.waiting_by_tenant() == {"tenant-a": 3, "tenant-b": 2}
    delivery = await queue.claim("worker-1", block_ms=0)
    assert delivery is not None and delivery.tenant == "tenant-a"
    assert await queue.backlog() == 5  # claimed, not acked
    assert await queue.waiting_by_tenant() == {"tenant-a": 2, "tenant-b": 2}
    await queue.ack(delivery)
    assert await queue.backlog() == 4
    await claim_all(queue)
    assert (await queue.backlog(), await queue.waiting_by_tenant()) == (0, {})


# A real generator serving two tenants


@dataclass(frozen=True)
class Timeline:
    """When a job was queued, started running and ended (event times, in seconds)."""

    queued: float
    started: float | None
    ended: float | None
    status: types_pb2.JobStatus.ValueType | None


async def timeline(events: EventLog, job_id: str) -> Timeline:
    recorded = await events.read(job_id, "0-0")

    def first(matches: Callable[[events_pb2.JobEvent], bool]) -> events_pb2.JobEvent | None:
        return next((e for e in recorded if matches(e)), None)

    queued = first(lambda e: e.status.status == types_pb2.JOB_STATUS_QUEUED)
    running = first(lambda e: e.status.status == types_pb2.JOB_STATUS_RUNNING)
    final = first(lambda e: e.HasField("final"))
    assert queued is not None
    return Timeline(
        queued.time.ToNanoseconds() / 1e9,
        running.time.ToNanoseconds() / 1e9 if running else None,
        final.time.ToNanoseconds() / 1e9 if final else None,
        final.final.job.status if final else None,
    )


async def until_ended(redis: aioredis.Redis, job_id: str, within: float) -> None:
    """Waits on the job's event stream for its final event."""
    deadline, after = time.monotonic() + within, "0-0"
    while (remaining := deadline - time.monotonic()) > 0:
        response: Any = await redis.xread(
            {stream_key(job_id): after}, block=max(1, int(min(remaining, 1.0) * 1000))
        )
        for _, event in decode_entries(response):
            after = event.id
            if event.HasField("final"):
                return
    raise AssertionError(f"job {job_id} did not end within {within} s")


def tiny_job(tenant: str, seed: int) -> JobRecord:
    """A 64x64, 2-step tiny-sd job (tens of ms to render), not cached."""
    job = queued_job()
    return replace(
        job, tenant=tenant, cache_mode=CacheMode.OFF, spec=replace(job.spec, seed=seed, steps=2)
    )


async def test_a_tenant_with_200_queued_jobs_delays_another_tenants_job_by_one_render_at_most(
    env: ServiceEnv, redis: aioredis.Redis
) -> None:
    pool = await db.connect(env.database_url, max_size=8)
    events = EventLog(redis, 600)
    queue = JobQueue(redis)
    lifecycle = JobLifecycle(pool, redis, events, queue)
    a_jobs = [tiny_job("tenant-a", seed) for seed in range(200)]
    b_job = tiny_job("tenant-b", 0)
    try:
        mesh = await start_in_process(env, ("evaluator", "generator"), workers=1)
        try:
            for job in a_jobs:
                await lifecycle.admit(job)
            # The generator is warm and busy with A's jobs, and most of them still wait.
            await until_ended(redis, a_jobs[4].id, within=30.0)
            assert (await queue.waiting_by_tenant())["tenant-a"] >= 100
            await lifecycle.admit(b_job)
            await until_ended(redis, b_job.id, within=20.0)
        finally:
            active = await pool.fetch("SELECT id FROM jobs WHERE status IN ('queued', 'running')")
            await asyncio.gather(*(lifecycle.cancel(str(row["id"])) for row in active))
            await mesh.stop()
        b = await timeline(events, b_job.id)
        a = [await timeline(events, job.id) for job in a_jobs]
    finally:
        await pool.close()

    assert b.status == types_pb2.JOB_STATUS_COMPLETED and b.started is not None
    # B's job is the next one the worker takes: it waits for the job of A in hand when it
    # arrived, or for the one the worker was claiming while B's admission was being written.
    started_meanwhile = [t for t in a if t.started and b.queued < t.started < b.started]
    assert len(started_meanwhile) <= 1
    # One job's slot on the worker (claim, render, score, record, ack): the typical time
    # between two of A's completions while the worker was never idle.
    ends = sorted(t.ended for t in a if t.status == types_pb2.JOB_STATUS_COMPLETED and t.ended)
    assert len(ends) >= 5
    slot = statistics.median(later - earlier for earlier, later in itertools.pairwise(ends))
    wait = b.started - b.queued
    log.info("B waited %.3f s; one job takes %.3f s (%d of A's completed)", wait, slot, len(ends))
    # That wait is at most one slot. Slots vary (by a quarter either way here) with the one
    # event loop the test, generator and evaluator share and the CPU the renders compete for,
    # hence half a slot of slack. A FIFO queue would make B wait for the 100+ jobs of A.
    assert wait <= 1.5 * slot, f"B waited {wait:.3f} s; one job takes {slot:.3f} s"
