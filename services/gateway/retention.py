"""Retention: the periodic cleanup of what has outlived its use, and what it removed.

Each round removes, in batches (no transaction holds many rows):
- expired prompt cache rows (their Redis copies expire on their own);
- the artifacts of jobs that ended more than `artifact_days` ago: the rows go through the job
  lifecycle, which rewrites the job's snapshot so reads stop listing them;
- uploads granted more than `upload_days` ago (row and object), unless a queued or running job
  names them;
- idempotency keys past their lifetime;
- dead letters older than `dead_letter_days`;
- queue consumers that have not asked for work in `stale_consumer_seconds`.

Objects are content-addressed and shared (a cache hit's job points at the objects the first job
stored), so an artifact's object is deleted only when no artifact row and no live cache entry
still names its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis

from services.common.objectstore import ObjectStore
from services.common.queue import DEAD_LETTERS, JobQueue
from services.common.retry import is_blip
from services.common.settings import GatewaySettings
from services.jobs.lifecycle import JobLifecycle

log = logging.getLogger("imagegen.retention")

BATCH = 500
DAY_SECONDS = 86400.0


@dataclass(frozen=True)
class Retention:
    """How long each kind of thing is kept."""

    artifact_days: float
    upload_days: float
    dead_letter_days: float
    stale_consumer_seconds: float = DAY_SECONDS

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> Retention:
        return cls(
            artifact_days=settings.artifact_retention_days,
            upload_days=settings.upload_retention_days,
            dead_letter_days=settings.dead_letter_retention_days,
        )


@dataclass
class CleanupReport:
    """What one round removed, by kind."""

    cache_entries: int = 0
    jobs_trimmed: int = 0  # jobs whose artifacts were removed
    artifacts: int = 0
    uploads: int = 0
    objects: int = 0  # artifact, cache and upload objects no longer named by anything
    idempotency_keys: int = 0
    dead_letters: int = 0
    consumers: list[str] = field(default_factory=list)

    @property
    def removed_anything(self) -> bool:
        return bool(
            self.cache_entries
            or self.artifacts
            or self.uploads
            or self.objects
            or self.idempotency_keys
            or self.dead_letters
            or self.consumers
        )

    def summary(self) -> str:
        return (
            f"cache_entries={self.cache_entries} artifacts={self.artifacts}"
            f" (of {self.jobs_trimmed} jobs) uploads={self.uploads} objects={self.objects}"
            f" idempotency_keys={self.idempotency_keys} dead_letters={self.dead_letters}"
            f" consumers={len(self.consumers)}"
        )


async def clean(
    lifecycle: JobLifecycle,
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    objects: ObjectStore,
    retention: Retention,
    batch: int = BATCH,
) -> CleanupReport:
    """One round of cleanup; logs and returns what it removed."""
    report = CleanupReport()
    await _expired_cache_entries(pool, objects, report, batch)
    await _old_artifacts(lifecycle, pool, objects, retention.artifact_days, report, batch)
    await _old_uploads(pool, objects, retention.upload_days, report, batch)
    report.idempotency_keys = await lifecycle.forget_expired_keys()
    report.dead_letters = await _old_dead_letters(redis, retention.dead_letter_days)
    report.consumers = await JobQueue(redis).forget_consumers(retention.stale_consumer_seconds)
    log.info("cleanup removed %s", report.summary())
    if report.consumers:
        log.info("forgot stale queue consumers: %s", ", ".join(report.consumers))
    return report


async def clean_forever(
    lifecycle: JobLifecycle,
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    objects: ObjectStore,
    retention: Retention,
    interval_seconds: float,
    stop: asyncio.Event,
) -> None:
    """`clean` every `interval_seconds` until `stop` is set; a failed round (a store away, or
    anything else) is logged and the next round tries again."""
    while not stop.is_set():
        try:
            await clean(lifecycle, pool, redis, objects, retention)
        except Exception as error:
            if is_blip(error):
                log.warning("cleanup: stores away (%s); trying again next round", error)
            else:
                log.exception("cleanup failed; trying again next round")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_seconds)


# The kinds


async def _expired_cache_entries(
    pool: asyncpg.Pool, objects: ObjectStore, report: CleanupReport, batch: int
) -> None:
    while True:
        rows = await pool.fetch(
            "DELETE FROM cache_entries WHERE key IN (SELECT key FROM cache_entries"
            " WHERE expires_at < now() ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            " RETURNING artifacts",
            batch,
        )
        report.cache_entries += len(rows)
        # An entry can outlive its job's artifact rows: then the last reference goes with it.
        keys = [
            a["key"] for r in rows for a in r["artifacts"] if isinstance(a, dict) and "key" in a
        ]
        report.objects += await _delete_unreferenced(pool, objects, keys)
        if len(rows) < batch:
            return


async def _old_artifacts(
    lifecycle: JobLifecycle,
    pool: asyncpg.Pool,
    objects: ObjectStore,
    days: float,
    report: CleanupReport,
    batch: int,
) -> None:
    while True:
        jobs = await pool.fetch(
            "SELECT j.id FROM jobs j WHERE j.status IN ('completed', 'failed', 'cancelled')"
            " AND j.updated_at < now() - make_interval(secs => $1)"
            " AND EXISTS (SELECT 1 FROM artifacts a WHERE a.job_id = j.id)"
            " ORDER BY j.updated_at LIMIT $2",
            days * DAY_SECONDS,
            batch,
        )
        keys: list[str] = []
        for (job_id,) in jobs:
            dropped = await lifecycle.drop_artifacts(str(job_id))  # [] if another gateway did
            report.jobs_trimmed += bool(dropped)
            report.artifacts += len(dropped)
            keys += dropped
        report.objects += await _delete_unreferenced(pool, objects, keys)
        if len(jobs) < batch:
            return


async def _old_uploads(
    pool: asyncpg.Pool, objects: ObjectStore, days: float, report: CleanupReport, batch: int
) -> None:
    while True:
        # The "in use" test is in the DELETE itself, so a job admitted a moment ago counts.
        rows = await pool.fetch(
            "DELETE FROM uploads WHERE key IN (SELECT u.key FROM uploads u"
            " WHERE u.created_at < now() - make_interval(secs => $1)"
            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.status IN ('queued', 'running')"
            " AND (j.spec -> 'guidance_images'"
            " @> jsonb_build_array(jsonb_build_object('key', u.key))"
            " OR j.spec -> 'controlnet' ->> 'mask_key' = u.key))"
            " ORDER BY u.created_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
            " RETURNING key",
            days * DAY_SECONDS,
            batch,
        )
        for (key,) in rows:
            await objects.delete(key)
        report.uploads += len(rows)
        report.objects += len(rows)
        if len(rows) < batch:
            return


async def _old_dead_letters(redis: aioredis.Redis, days: float) -> int:
    """Trims the dead-letter stream to the entries of the last `days`, by the millisecond time
    in their ids (Redis's own clock, which wrote them)."""
    seconds, microseconds = await redis.time()
    now_ms = seconds * 1000 + microseconds // 1000
    oldest_kept = max(now_ms - int(days * DAY_SECONDS * 1000), 0)
    trimmed: int = await redis.xtrim(DEAD_LETTERS, minid=f"{oldest_kept}-0", approximate=False)
    return trimmed


async def _delete_unreferenced(
    pool: asyncpg.Pool, objects: ObjectStore, keys: Sequence[str]
) -> int:
    """Deletes the objects among `keys` that no artifact row and no live cache entry names;
    returns how many."""
    if not keys:
        return 0
    unreferenced = await pool.fetch(
        "WITH wanted AS (SELECT DISTINCT k FROM unnest($1::text[]) AS k),"
        " cached AS (SELECT DISTINCT e ->> 'key' AS k FROM cache_entries c,"
        " jsonb_array_elements(c.artifacts) e"
        " WHERE c.expires_at >= now() AND e ->> 'key' = ANY($1::text[]))"
        " SELECT w.k FROM wanted w"
        " WHERE NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.key = w.k)"
        " AND NOT EXISTS (SELECT 1 FROM cached WHERE cached.k = w.k)",
        list(keys),
    )
    for (key,) in unreferenced:
        await objects.delete(key)
    return len(unreferenced)
