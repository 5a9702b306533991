"""Retention against real Postgres and Redis and a local folder store, each test on stores of its
own: what is past its time goes, what is still named by something stays. Rows are made old by
moving their timestamps back with SQL."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from services.common.db import connect
from services.common.events import EventLog
from services.common.objectstore import LocalStore
from services.common.queue import DEAD_LETTERS, JobQueue
from services.common.spec import ControlNet, GuidanceImage
from services.gateway.retention import CleanupReport, Retention, clean, clean_forever
from services.gateway.uploads import Uploads
from services.jobs.lifecycle import Idempotency, JobLifecycle
from services.jobs.records import ArtifactRecord, JobRecord, JobStatus, encode_artifact
from services.mesh import free_port
from services.tenants.keys import KeyStore
from tests.conftest import ServiceEnv
from tests.helpers import queued_job

RETENTION = Retention(artifact_days=30, upload_days=7, dead_letter_days=14)
DAY_MS = 86_400_000
WAIT = 10.0


@dataclass
class Rig:
    lifecycle: JobLifecycle
    pool: asyncpg.Pool
    redis: aioredis.Redis
    objects: LocalStore

    async def clean(self, retention: Retention = RETENTION) -> CleanupReport:
        return await clean(self.lifecycle, self.pool, self.redis, self.objects, retention)


@pytest_asyncio.fixture
async def rig(private_env: ServiceEnv, tmp_path: Path) -> AsyncIterator[Rig]:
    pool = await connect(private_env.database_url, max_size=4)
    redis = aioredis.from_url(private_env.redis_url)
    await KeyStore(pool).ensure_tenant("tenant-a")
    objects = LocalStore(tmp_path / "objects", b"test-signing-key", "http://gateway.test", 60)
    lifecycle = JobLifecycle(pool, redis, EventLog(redis, 600), JobQueue(redis))
    try:
        yield Rig(lifecycle, pool, redis, objects)
    finally:
        await redis.aclose()
        await pool.close()


async def stored_image(objects: LocalStore) -> str:
    """A new content-addressed image object; its key."""
    data = uuid.uuid4().bytes
    digest = hashlib.sha256(data).hexdigest()
    key = f"images/{digest[:2]}/{digest}.png"
    await objects.put(key, data, "image/png")
    return key


def artifact(job_id: str, index: int, key: str) -> ArtifactRecord:
    return ArtifactRecord(job_id, index, key, key.rsplit("/", 1)[-1][:64], 64, 64, seed=3)


async def ended_job(rig: Rig, keys: list[str]) -> JobRecord:
    """A job admitted already completed with artifacts at `keys`, as a cache hit is."""
    job = replace(queued_job(), tenant="tenant-a")
    job = replace(
        job,
        status=JobStatus.COMPLETED,
        stage="cached",
        progress_percent=100.0,
        cost_cents=0,
        cache_hit=True,
        artifacts=[artifact(job.id, i, key) for i, key in enumerate(keys)],
    )
    return (await rig.lifecycle.admit(job)).job


async def age_job(pool: asyncpg.Pool, job_id: str, days: float) -> None:
    await pool.execute(
        "UPDATE jobs SET updated_at = now() - make_interval(secs => $2) WHERE id = $1",
        uuid.UUID(job_id),
        days * 86400,
    )


async def cache_entry(pool: asyncpg.Pool, key: str, expires_in_days: float) -> str:
    """A prompt cache row naming the object at `key`; its cache key."""
    cache_key = uuid.uuid4().hex
    await pool.execute(
        "INSERT INTO cache_entries (key, seedless_key, job_id, seed, artifacts, expires_at)"
        " VALUES ($1, $2, $3, 3, $4, now() + make_interval(secs => $5))",
        cache_key,
        "seedless-" + cache_key,
        uuid.uuid4(),
        [encode_artifact(artifact(str(uuid.uuid4()), 0, key))],
        expires_in_days * 86400,
    )
    return cache_key


# Artifacts


async def test_an_old_jobs_artifacts_and_unshared_objects_go_and_its_reads_stop_listing_them(
    rig: Rig,
) -> None:
    own, shared_with_job, shared_with_cache = [await stored_image(rig.objects) for _ in range(3)]
    old = await ended_job(rig, [own, shared_with_job, shared_with_cache])
    recent = await ended_job(rig, [shared_with_job])
    await cache_entry(rig.pool, shared_with_cache, expires_in_days=1)
    await age_job(rig.pool, old.id, days=31)

    report = await rig.clean()

    assert (report.jobs_trimmed, report.artifacts, report.objects) == (1, 3, 1)
    assert not await rig.objects.exists(own)
    assert await rig.objects.exists(shared_with_job)
    assert await rig.objects.exists(shared_with_cache)
    assert (await rig.lifecycle.snapshot(old.id)).artifacts == []
    assert (await rig.lifecycle.get(old.id)).artifacts == []
    assert (await rig.lifecycle.snapshot(old.id)).status == (
        await rig.lifecycle.snapshot(recent.id)
    ).status
    assert [a.key for a in (await rig.lifecycle.snapshot(recent.id)).artifacts] == [shared_with_job]
    again = await rig.clean()
    assert (again.artifacts, again.objects) == (0, 0)


async def test_an_object_goes_once_its_last_naming_job_is_past_retention(rig: Rig) -> None:
    shared = await stored_image(rig.objects)
    first, second = await ended_job(rig, [shared]), await ended_job(rig, [shared])
    await age_job(rig.pool, first.id, days=40)
    await age_job(rig.pool, second.id, days=29)
    assert (await rig.clean()).objects == 0
    assert await rig.objects.exists(shared)

    await age_job(rig.pool, second.id, days=31)
    report = await rig.clean()
    assert (report.artifacts, report.objects) == (1, 1)
    assert not await rig.objects.exists(shared)


async def test_a_running_jobs_artifacts_are_kept_however_old(rig: Rig) -> None:
    key = await stored_image(rig.objects)
    job = await ended_job(rig, [key])
    await rig.pool.execute(
        "UPDATE jobs SET status = 'running', updated_at = now() - interval '90 days' WHERE id = $1",
        uuid.UUID(job.id),
    )
    assert (await rig.clean()).artifacts == 0
    assert await rig.objects.exists(key)


# The prompt cache


async def test_expired_cache_rows_go_with_objects_nothing_else_names_and_live_ones_stay(
    rig: Rig,
) -> None:
    expired_only, expired_but_in_a_job, live = [await stored_image(rig.objects) for _ in range(3)]
    gone = [
        await cache_entry(rig.pool, expired_only, expires_in_days=-1),
        await cache_entry(rig.pool, expired_but_in_a_job, expires_in_days=-2),
    ]
    kept = await cache_entry(rig.pool, live, expires_in_days=1)
    await ended_job(rig, [expired_but_in_a_job])

    report = await rig.clean()

    assert (report.cache_entries, report.objects) == (2, 1)
    left = {r["key"] for r in await rig.pool.fetch("SELECT key FROM cache_entries")}
    assert left == {kept} and not left & set(gone)
    assert not await rig.objects.exists(expired_only)
    assert await rig.objects.exists(expired_but_in_a_job)
    assert await rig.objects.exists(live)


async def test_cache_rows_are_removed_in_batches_until_none_is_left(rig: Rig) -> None:
    key = await stored_image(rig.objects)
    for _ in range(5):
        await cache_entry(rig.pool, key, expires_in_days=-1)
    report = await clean(rig.lifecycle, rig.pool, rig.redis, rig.objects, RETENTION, batch=2)
    assert report.cache_entries == 5
    assert await rig.pool.fetchval("SELECT count(*) FROM cache_entries") == 0


# Uploads


async def test_old_uploads_go_unless_a_queued_or_running_job_names_them(rig: Rig) -> None:
    uploads = Uploads(rig.objects, rig.pool, ttl_seconds=60)
    keys = []
    for color in range(5):
        data = uuid.uuid4().bytes + bytes([color])
        digest = hashlib.sha256(data).hexdigest()
        upload = await uploads.presign("tenant-a", "image/png", digest, len(data))
        await rig.objects.put(upload.key, data, "image/png")
        keys.append(upload.key)
    unused, guiding_queued, masking_running, guiding_ended, recent = keys
    await rig.pool.execute(
        "UPDATE uploads SET created_at = now() - interval '8 days' WHERE key <> $1", recent
    )
    queued = replace(queued_job(), tenant="tenant-a")
    queued.spec = replace(queued.spec, guidance_images=(GuidanceImage(guiding_queued, "style"),))
    await rig.lifecycle.admit(queued)
    running = replace(queued_job(), tenant="tenant-a")
    running.spec = replace(running.spec, controlnet=ControlNet("canny", 1.0, masking_running))
    await rig.lifecycle.admit(running)
    assert await rig.lifecycle.start_attempt(running.id) is not None
    ended = replace(queued_job(), tenant="tenant-a")
    ended.spec = replace(ended.spec, guidance_images=(GuidanceImage(guiding_ended, "style"),))
    await rig.lifecycle.admit(replace(ended, status=JobStatus.COMPLETED, cache_hit=True))

    report = await rig.clean()

    assert (report.uploads, report.objects) == (2, 2)
    left = {r["key"] for r in await rig.pool.fetch("SELECT key FROM uploads")}
    assert left == {guiding_queued, masking_running, recent}
    for key in (unused, guiding_ended):
        assert not await rig.objects.exists(key)
    for key in (guiding_queued, masking_running, recent):
        assert await rig.objects.exists(key)


# Idempotency keys, dead letters, queue consumers


async def test_expired_idempotency_keys_go_and_live_ones_stay(rig: Rig) -> None:
    for name in ("expired", "live"):
        job = replace(queued_job(), tenant="tenant-a", status=JobStatus.COMPLETED)
        await rig.lifecycle.admit(job, Idempotency(name, "digest-" + name))
    await rig.pool.execute(
        "UPDATE idempotency_keys SET expires_at = now() - interval '2 hours' WHERE key = 'expired'"
    )
    report = await rig.clean()
    assert report.idempotency_keys == 1
    assert [r["key"] for r in await rig.pool.fetch("SELECT key FROM idempotency_keys")] == ["live"]


async def test_dead_letters_past_retention_go_and_recent_ones_stay(rig: Rig) -> None:
    seconds, microseconds = await rig.redis.time()
    now_ms = seconds * 1000 + microseconds // 1000
    for job, age_days in (("old-1", 20), ("old-2", 15), ("recent", 13)):
        entry: dict[Any, Any] = {b"job_id": job.encode(), b"reason": b"gave up"}
        await rig.redis.xadd(DEAD_LETTERS, entry, id=f"{now_ms - age_days * DAY_MS}-0")

    report = await rig.clean()

    assert report.dead_letters == 2
    left: Any = await rig.redis.xrange(DEAD_LETTERS)
    assert [fields[b"job_id"] for _, fields in left] == [b"recent"]


async def test_queue_consumers_idle_past_the_limit_are_forgotten(rig: Rig) -> None:
    await JobQueue(rig.redis).claim("worker-1", block_ms=1)
    assert (await rig.clean()).consumers == []
    idle_limit_passed = replace(RETENTION, stale_consumer_seconds=0.0)
    assert (await rig.clean(idle_limit_passed)).consumers == ["worker-1"]


# The round and the loop


async def test_a_round_logs_what_it_removed(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    await cache_entry(rig.pool, await stored_image(rig.objects), expires_in_days=-1)
    with caplog.at_level(logging.INFO, logger="imagegen.retention"):
        report = await rig.clean()
    assert report.cache_entries == 1 and report.removed_anything
    logged = [r.getMessage() for r in caplog.records if r.name == "imagegen.retention"]
    assert any(report.summary() in message for message in logged)


class Warnings(logging.Handler):
    """Sets `reached` once `wanted` warnings were logged."""

    def __init__(self, wanted: int) -> None:
        super().__init__(logging.WARNING)
        self.wanted = wanted
        self.reached = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.wanted -= 1
        if self.wanted <= 0:
            self.reached.set()


async def test_a_store_blip_does_not_end_the_cleanup_loop(rig: Rig) -> None:
    away = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    stop = asyncio.Event()
    warnings = Warnings(3)  # three rounds failed on the blip, and the loop goes on
    logger = logging.getLogger("imagegen.retention")
    logger.addHandler(warnings)
    loop = asyncio.create_task(
        clean_forever(rig.lifecycle, rig.pool, away, rig.objects, RETENTION, 0.01, stop)
    )
    try:
        await asyncio.wait_for(warnings.reached.wait(), WAIT)
        assert not loop.done()
    finally:
        logger.removeHandler(warnings)
        stop.set()
        await asyncio.wait_for(loop, WAIT)
        await away.aclose()
