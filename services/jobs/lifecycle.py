"""Every change of a job's state, in one place, each with the event that announces it.

Postgres is the record: each transition is one guarded SQL statement (`WHERE status = ...`, and
for a worker's writes `AND attempts = <its attempt>`, a fencing token) in a transaction that also
rewrites the job's snapshot, the answer every status read returns. The event goes to the job's
Redis stream after the commit. Redis is a hint: a lost event or queue entry is repaired from
Postgres (the reconciler re-queues, watchers fall back to the record), never the other way round.

    admit ──▶ queued ──start_attempt──▶ running ──complete──▶ completed
                ▲  │                      │ │ └──retry_or_fail──▶ failed
                │  └──cancel──▶ cancelled ◀─┘ (cancel)
                └──── retry_or_fail / expire_leases (the worker's lease ran out)

A worker holds a running job through its `Attempt`: a lease it renews, and the attempt number
that guards its writes, so a worker that lost its lease (or whose job was cancelled) can change
nothing. A job is charged only when it completes, and completes at most once.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from imagegen.v1 import events_pb2, types_pb2

from services.common import metrics
from services.common.convert import artifact_to_pb, job_to_pb
from services.common.errors import Conflict, NotFound, QuotaExceeded
from services.common.events import EventLog
from services.common.queue import JobQueue
from services.common.retry import STORE_ERRORS, StoreUnavailable, is_blip
from services.jobs.records import (
    ArtifactRecord,
    Attempt,
    CacheMode,
    JobRecord,
    JobStatus,
    Priority,
    Webhook,
    Withheld,
    decode_spec,
    encode_spec,
    parse_job_id,
)

log = logging.getLogger("imagegen.jobs")


class FailureCause(enum.StrEnum):
    """Why a job failed, as a small fixed set: the metrics' `reason` (the job's `error` keeps
    the full text)."""

    GENERATOR_ERROR = "generator_error"  # the render, a store or the evaluator failed
    INVALID = "invalid"  # the request cannot be rendered (bad input, a model not there)
    WITHHELD = "withheld"  # the image safety policy kept back every variant
    INTERRUPTED = "interrupted"  # generators stopped with it in hand, its last attempt
    GAVE_UP = "gave_up"  # its attempts ran out (workers died or lost their leases)


CANCEL_CHANNEL = "imagegen:cancel"
ACQUIRE_TIMEOUT_SECONDS = 5.0

_JOB_COLUMNS = (
    "id, status, stage, progress_percent, spec, cache_key, cost_cents, cache_hit, cache_mode,"
    " error, retryable, attempts, engine_version, evaluator_models, created_at, updated_at,"
    " tenant, api_key_id, priority, cache_namespace, webhook_url, webhook_events,"
    " estimated_cents, cache_result, trace_parent"
)
_ARTIFACT_COLUMNS = (
    "id, job_id, variant_index, key, sha256, width_px, height_px, seed, clip_score,"
    " lpips_diversity, lpips_to_reference, nsfw, is_primary, clip_model, clip_calibrated,"
    " lpips_model, lpips_calibrated"
)
# A worker's write: only while the job is running its attempt.
_HELD = "id = $1 AND status = 'running' AND attempts = $2"
# Adds the seconds of the stage a running job was in to its `stage_seconds` (the right-hand
# sides of an UPDATE read the row as it was); the next stage's clock is `stage_started_at`.
_CLOSE_STAGE = (
    "stage_seconds = CASE WHEN stage_started_at IS NULL OR stage = '' THEN stage_seconds"
    " ELSE jsonb_set(stage_seconds, ARRAY[stage], to_jsonb("
    "coalesce((stage_seconds->>stage)::float8, 0)"
    " + extract(epoch FROM clock_timestamp() - stage_started_at)::float8)) END"
)
# A job that ended: its end time, its last stage closed.
_ENDED = f"ended_at = now(), {_CLOSE_STAGE}, stage_started_at = NULL"
# Ends a held job `failed` ($3 the reason, $4 retryable), not charged.
_FAIL = (
    f"UPDATE jobs SET {_ENDED}, status = 'failed', stage = 'failed', error = $3,"
    " retryable = $4, failure_reason = $5, cost_cents = 0, lease_expires_at = NULL,"
    f" updated_at = now() WHERE {_HELD} RETURNING {_JOB_COLUMNS}"
)
# A read by a client (`tenant` given) sees only its tenant's jobs; internal reads pass None.
_OF_TENANT = "($2::text IS NULL OR tenant = $2)"
_RUNNING = types_pb2.JOB_STATUS_RUNNING
_QUEUED = types_pb2.JOB_STATUS_QUEUED


@dataclass(frozen=True)
class SafetyCount:
    day: date
    kind: str  # "prompt" (refused) or "image" (withheld)
    category: str
    count: int


@dataclass(frozen=True)
class Limits:
    """What admission checks, in the transaction that stores the job: the admitting key's
    concurrent jobs (queued or running) and the tenant's spend (queued, running and completed
    jobs) against its budget. None means no limit."""

    max_concurrent: int | None = None
    budget_cents: int | None = None


@dataclass(frozen=True)
class Idempotency:
    """A client's idempotency key and a digest of the request it came with."""

    key: str
    request_sha256: str


@dataclass(frozen=True)
class Admitted:
    job: JobRecord
    created: bool


class JobLifecycle:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        events: EventLog,
        queue: JobQueue,
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        idempotency_ttl_seconds: int = 24 * 3600,
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._events = events
        self._queue = queue
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.idempotency_ttl_seconds = idempotency_ttl_seconds

    # Reads

    async def get(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """The whole record, artifacts included. With `tenant`, another tenant's job is
        NotFound, as one that does not exist."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1 AND {_OF_TENANT}",
                parse_job_id(job_id),
                tenant,
            )
            if row is None:
                raise NotFound("no such job")
            return await self._with_artifacts(conn, row)

    async def snapshot(self, job_id: str, tenant: str | None = None) -> types_pb2.Job:
        """The job as clients see it (without URLs): one indexed read of a stored message.
        With `tenant`, another tenant's job is NotFound, as one that does not exist."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT snapshot, progress_percent FROM jobs WHERE id = $1 AND {_OF_TENANT}",
                parse_job_id(job_id),
                tenant,
            )
        if row is None:
            raise NotFound("no such job")
        return self._from_snapshot(row["snapshot"], row["progress_percent"]) or job_to_pb(
            await self.get(job_id)
        )

    async def owns_object(self, tenant: str, key: str) -> bool:
        """Whether an artifact of one of `tenant`'s jobs is stored under `key`."""
        async with self._connection() as conn:
            found = await conn.fetchval(
                "SELECT true FROM artifacts a JOIN jobs j ON j.id = a.job_id"
                " WHERE a.key = $1 AND j.tenant = $2 LIMIT 1",
                key,
                tenant,
            )
        return bool(found)

    async def page(
        self,
        tenant: str,
        limit: int,
        before: tuple[datetime, str] | None,
        status: JobStatus | None,
    ) -> list[types_pb2.Job]:
        """The tenant's jobs newest first, strictly older than the `before` cursor."""
        where = ["tenant = $1", "($2::text IS NULL OR status = $2)"]
        args: list[Any] = [tenant, status.value if status else None]
        if before is not None:
            where.append("(created_at, id) < ($3, $4)")
            args += [before[0], parse_job_id(before[1])]
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT id, snapshot, progress_percent FROM jobs WHERE {' AND '.join(where)}"
                f" ORDER BY created_at DESC, id DESC LIMIT {int(limit)}",
                *args,
            )
        jobs = []
        for row in rows:
            job = self._from_snapshot(row["snapshot"], row["progress_percent"])
            jobs.append(job or job_to_pb(await self.get(str(row["id"]))))
        return jobs

    # Transitions

    async def admit(
        self,
        job: JobRecord,
        idempotency: Idempotency | None = None,
        limits: Limits | None = None,
        weight: int | None = None,
    ) -> Admitted:
        """Stores a new job: `queued` and put on the queue, or (a cache hit) already `completed`
        with its artifacts. An idempotency key already used (by the job's tenant) for the same
        request returns that request's job; used for another request, it is refused
        (Conflict). `limits` are checked in the same transaction (QuotaExceeded); a replay is
        not checked again. `weight` is the tenant's share of the generators."""
        async with self._transaction() as conn:
            if idempotency is not None:
                first = await self._claim_key(conn, idempotency, job)
                if first is not None:
                    row = await conn.fetchrow(
                        f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1", first
                    )
                    if row is not None:
                        return Admitted(await self._with_artifacts(conn, row), False)
            if limits is not None and job.status is JobStatus.QUEUED:
                await _check_limits(conn, job, limits)
            row = await conn.fetchrow(
                "INSERT INTO jobs (id, status, stage, progress_percent, spec, cache_key,"
                " cost_cents, cache_hit, cache_mode, engine_version, tenant, api_key_id,"
                " priority, cache_namespace, webhook_url, webhook_events, estimated_cents,"
                " cache_result, trace_parent, ended_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,"
                " $17, $18, $19, CASE WHEN $2 = 'completed' THEN now() END)"
                f" RETURNING {_JOB_COLUMNS}",
                parse_job_id(job.id),
                job.status.value,
                job.stage,
                job.progress_percent,
                encode_spec(job.spec),
                job.cache_key,
                job.cost_cents,
                job.cache_hit,
                job.cache_mode.value,
                job.engine_version,
                job.tenant,
                uuid.UUID(job.api_key_id) if job.api_key_id else None,
                job.priority.value,
                job.cache_namespace,
                job.webhook.url,
                list(job.webhook.events),
                job.estimated_cents,
                job.cache_result,
                job.trace_parent,
            )
            for artifact in job.artifacts:
                await _upsert_artifact(conn, artifact)
            stored = await self._refresh(conn, row)
        if stored.status is JobStatus.QUEUED:
            await self._announce(stored.id, status=events_pb2.StatusEvent(status=_QUEUED))
            await self._hint_queue(stored, weight)
        else:
            await self._announce_final(stored)
        return Admitted(stored, True)

    async def start_attempt(self, job_id: str) -> Attempt | None:
        """Takes a queued job (or one whose worker's lease ran out) for a new attempt; None when
        there is nothing to run: it ended, another worker holds it, or it had its attempts (then
        it fails here)."""
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE jobs SET status = 'running', stage = 'starting', error = '',"
                " attempts = attempts + 1, updated_at = now(),"
                " started_at = coalesce(started_at, now()), stage_started_at = clock_timestamp(),"
                " lease_expires_at = now() + make_interval(secs => $2)"
                " WHERE id = $1 AND (status = 'queued'"
                " OR (status = 'running' AND lease_expires_at < now()))"
                f" RETURNING {_JOB_COLUMNS}",
                parse_job_id(job_id),
                self.lease_seconds,
            )
            if row is None:
                return None
            if row["attempts"] > self.max_attempts:
                reason = f"gave up after {row['attempts'] - 1} attempts"
                row = await conn.fetchrow(
                    _FAIL, row["id"], row["attempts"], reason, True, FailureCause.GAVE_UP.value
                )
                ended = await self._refresh(conn, row)
            else:
                job = await self._refresh(conn, row)
                ended = None
        if ended is not None:
            _count_end(ended, FailureCause.GAVE_UP)
            await self._dead_letter(job_id, ended.error)  # recorded before anyone sees the end
            await self._announce_final(ended)
            return None
        await self._announce(
            job.id,
            status=events_pb2.StatusEvent(
                status=_RUNNING, stage="generating", attempt=job.attempts
            ),
        )
        return Attempt(job.id, job.attempts, job)

    async def renew(self, attempt: Attempt) -> bool:
        """Extends the attempt's lease; False when the attempt no longer holds the job (it was
        cancelled, or its lease ran out and another worker took it)."""
        async with self._connection() as conn:
            held = await conn.fetchval(
                "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)"
                f" WHERE {_HELD} RETURNING true",
                parse_job_id(attempt.job_id),
                attempt.number,
                self.lease_seconds,
            )
        return bool(held)

    async def progress(
        self, attempt: Attempt, event: events_pb2.ProgressEvent, persist: bool
    ) -> None:
        """Announces a denoising step; `persist` also records the percentage (callers
        throttle it: status reads see it, the snapshot is not rewritten)."""
        await self._announce(attempt.job_id, progress=event)
        if persist:
            async with self._connection() as conn:
                await conn.execute(
                    f"UPDATE jobs SET progress_percent = $3, updated_at = now() WHERE {_HELD}",
                    parse_job_id(attempt.job_id),
                    attempt.number,
                    event.percent,
                )

    async def stage(self, attempt: Attempt, stage: str) -> None:
        """Records and announces the stage the attempt entered (loading_model, denoising,
        uploading, evaluating...)."""
        async with self._connection() as conn:
            held = await conn.fetchval(
                f"UPDATE jobs SET {_CLOSE_STAGE}, stage_started_at = clock_timestamp(),"
                f" stage = $3, updated_at = now() WHERE {_HELD} RETURNING true",
                parse_job_id(attempt.job_id),
                attempt.number,
                stage,
            )
        if held:
            status = events_pb2.StatusEvent(status=_RUNNING, stage=stage, attempt=attempt.number)
            await self._announce(attempt.job_id, status=status)

    async def preview(self, attempt: Attempt, event: events_pb2.PreviewEvent) -> None:
        """Announces a preview (events only: a preview is not part of the record)."""
        await self._announce(attempt.job_id, preview=event)

    async def record_artifact(
        self, attempt: Attempt, artifact: ArtifactRecord, timings: events_pb2.ArtifactEvent
    ) -> bool:
        """Records a stored image (a variant rendered again replaces its row)."""
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                f"UPDATE jobs SET updated_at = now() WHERE {_HELD} RETURNING {_JOB_COLUMNS}",
                parse_job_id(attempt.job_id),
                attempt.number,
            )
            if row is None:
                return False
            await _upsert_artifact(conn, artifact)
            await self._refresh(conn, row)
        timings.artifact.CopyFrom(artifact_to_pb(artifact))
        await self._announce(attempt.job_id, artifact=timings)
        return True

    async def withhold(self, attempt: Attempt, variant_index: int, category: str) -> bool:
        """Records a variant the image safety check kept back (it was never stored), so no
        later attempt renders it again, and counts it under its category."""
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                f"UPDATE jobs SET updated_at = now() WHERE {_HELD} RETURNING {_JOB_COLUMNS}",
                parse_job_id(attempt.job_id),
                attempt.number,
            )
            if row is None:
                return False
            added = await conn.fetchval(
                "INSERT INTO withheld_variants (job_id, variant_index, category)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true",
                row["id"],
                variant_index,
                category,
            )
            if added:
                await _count_safety(conn, "image", category)
            await self._refresh(conn, row)
        if added:
            metrics.SAFETY_REFUSALS.labels("image", category).inc()
        return True

    async def count_refusal(self, category: str) -> None:
        """Counts a prompt the content policy refused (best effort: a store blip loses the
        count, never the refusal)."""
        try:
            async with self._connection() as conn:
                await _count_safety(conn, "prompt", category)
        except StoreUnavailable:
            log.warning("a refusal (%s) was not counted: the job store is away", category)

    async def safety_counts(self, days: int) -> list[SafetyCount]:
        """Refused prompts and withheld images per day, kind and category, newest first."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT day, kind, category, count FROM safety_counts"
                " WHERE day > current_date - $1::int ORDER BY day DESC, kind, category",
                days,
            )
        return [SafetyCount(r["day"], r["kind"], r["category"], r["count"]) for r in rows]

    async def record_scores(
        self,
        attempt: Attempt,
        scored: Sequence[ArtifactRecord],
        models: Sequence[str],
        evaluate_ms: float,
    ) -> bool:
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                "UPDATE jobs SET evaluator_models = $3, updated_at = now()"
                f" WHERE {_HELD} RETURNING {_JOB_COLUMNS}",
                parse_job_id(attempt.job_id),
                attempt.number,
                list(models),
            )
            if row is None:
                return False
            await conn.executemany(
                "UPDATE artifacts SET clip_score = $3, lpips_diversity = $4,"
                " lpips_to_reference = $5, nsfw = $6, is_primary = $7, clip_model = $8,"
                " clip_calibrated = $9, lpips_model = $10, lpips_calibrated = $11"
                " WHERE job_id = $1 AND variant_index = $2",
                [
                    (
                        parse_job_id(attempt.job_id),
                        a.variant_index,
                        a.clip_score,
                        a.lpips_diversity,
                        a.lpips_to_reference,
                        a.nsfw,
                        a.is_primary,
                        a.clip_model,
                        a.clip_calibrated,
                        a.lpips_model,
                        a.lpips_calibrated,
                    )
                    for a in scored
                ],
            )
            job = await self._refresh(conn, row)
        await self._announce(
            attempt.job_id,
            evaluation=events_pb2.EvaluationEvent(
                artifacts=[artifact_to_pb(a) for a in job.artifacts],
                models=list(models),
                evaluate_ms=evaluate_ms,
            ),
        )
        return True

    async def complete(self, attempt: Attempt) -> bool:
        """Ends the attempt's job `completed` (and charged); False when it no longer held it."""
        return await self._end(
            attempt,
            f"UPDATE jobs SET {_ENDED}, status = 'completed', stage = 'done',"
            f" progress_percent = 100, lease_expires_at = NULL, updated_at = now() WHERE {_HELD}"
            f" RETURNING {_JOB_COLUMNS}",
        )

    async def retry_or_fail(
        self,
        attempt: Attempt,
        reason: str,
        permanent: bool,
        cause: FailureCause = FailureCause.GENERATOR_ERROR,
    ) -> bool:
        """After a failed attempt: back on the queue while attempts remain and retrying can
        help, else `failed` (not charged), counted under `cause`. False when the attempt no
        longer held the job."""
        reason = reason[:500]
        retrying = not permanent and attempt.number < self.max_attempts
        error = events_pb2.ErrorEvent(message=reason, retrying=retrying)
        if not retrying:
            return await self._end(
                attempt,
                _FAIL,
                reason,
                not permanent,
                cause.value,
                error=error,
                cause=cause,
                dead_letter=True,
            )
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                f"UPDATE jobs SET {_CLOSE_STAGE}, stage_started_at = NULL, status = 'queued',"
                " stage = '', error = $3, progress_percent = 0, lease_expires_at = NULL,"
                f" updated_at = now() WHERE {_HELD}"
                f" RETURNING {_JOB_COLUMNS}",
                parse_job_id(attempt.job_id),
                attempt.number,
                reason,
            )
            if row is None:
                return False
            await self._refresh(conn, row)
        await self._announce(attempt.job_id, error=error)
        await self._announce(
            attempt.job_id,
            status=events_pb2.StatusEvent(status=_QUEUED, attempt=attempt.number),
        )
        await self._hint_queue(attempt.job)
        return True

    async def cancel(self, job_id: str, tenant: str | None = None) -> JobRecord:
        """Ends a queued or running job `cancelled` at once; the worker running it is told
        and stops at its next step. A job that already ended is returned as it is. With
        `tenant`, another tenant's job is NotFound."""
        job_uuid = parse_job_id(job_id)
        async with self._transaction() as conn:
            prior = await conn.fetchval(
                f"SELECT status FROM jobs WHERE id = $1 AND {_OF_TENANT} FOR UPDATE",
                job_uuid,
                tenant,
            )
            if prior is None:
                raise NotFound("no such job")
            row = await conn.fetchrow(
                f"UPDATE jobs SET {_ENDED}, status = 'cancelled', stage = 'cancelled',"
                " cost_cents = 0, lease_expires_at = NULL, updated_at = now()"
                f" WHERE id = $1 AND status IN ('queued', 'running') RETURNING {_JOB_COLUMNS}",
                job_uuid,
            )
            job = await self._refresh(conn, row) if row is not None else None
        if job is None:
            return await self.get(job_id)
        _count_end(job)
        if prior == JobStatus.RUNNING:
            await self._blip_tolerant(self._redis.publish(CANCEL_CHANNEL, job_id), "cancel")
        await self._announce_final(job)
        return job

    async def expire_leases(self, limit: int = 100) -> list[str]:
        """Puts back on the queue the running jobs whose worker stopped renewing its lease
        (it died, or lost its stores for longer than the lease)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id FROM jobs WHERE status = 'running' AND lease_expires_at < now()"
                " ORDER BY lease_expires_at LIMIT $1",
                limit,
            )
        expired = []
        for (job_uuid,) in rows:
            async with self._transaction() as conn:
                row = await conn.fetchrow(
                    f"UPDATE jobs SET {_CLOSE_STAGE}, stage_started_at = NULL, status = 'queued',"
                    " stage = '', progress_percent = 0, error = 'its worker stopped',"
                    " lease_expires_at = NULL, updated_at = now()"
                    " WHERE id = $1 AND status = 'running' AND lease_expires_at < now()"
                    f" RETURNING {_JOB_COLUMNS}",
                    job_uuid,
                )
                job = await self._refresh(conn, row) if row is not None else None
            if job is None:
                continue
            log.warning("job %s: lease of attempt %d ran out; queued again", job.id, job.attempts)
            await self._announce(
                job.id, status=events_pb2.StatusEvent(status=_QUEUED, attempt=job.attempts)
            )
            await self._hint_queue(job)
            expired.append(job.id)
        return expired

    async def repair_queue(self, older_than_seconds: float, limit: int = 1000) -> list[str]:
        """Queues again the queued jobs that Redis has no entry for (lost in a restart without
        persistence, a FLUSHALL, a failover, or never written because Redis was away)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, tenant, priority FROM jobs WHERE status = 'queued'"
                " AND updated_at < now() - make_interval(secs => $1)"
                " ORDER BY updated_at LIMIT $2",
                older_than_seconds,
                limit,
            )
        lanes = {str(r["id"]): (r["tenant"], Priority(r["priority"])) for r in rows}
        missing = await self._queue.missing(list(lanes))
        for job_id in missing:
            log.warning("job %s is queued but not on the queue; queueing it again", job_id)
            await self._queue.enqueue(job_id, *lanes[job_id])
        return missing

    async def announce_missing_finals(
        self, older_than_seconds: float = 2.0, limit: int = 100
    ) -> list[str]:
        """Writes the final event of the jobs that ended while Redis was away (their watchers
        would otherwise wait for ever); a stream that already ends with one is only marked."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id FROM jobs WHERE NOT final_announced"
                " AND status IN ('completed', 'failed', 'cancelled')"
                " AND updated_at < now() - make_interval(secs => $1)"
                " ORDER BY updated_at LIMIT $2",
                older_than_seconds,
                limit,
            )
        announced = []
        for (job_uuid,) in rows:
            job = await self.get(str(job_uuid))
            if await self._events.ends_with_final(job.id):
                async with self._connection() as conn:
                    await conn.execute(
                        "UPDATE jobs SET final_announced = true WHERE id = $1", job_uuid
                    )
                continue
            log.warning("job %s ended without a final event; announcing it", job.id)
            await self._write_final(job)
            announced.append(job.id)
        return announced

    async def forget_expired_keys(self) -> int:
        async with self._connection() as conn:
            status = await conn.execute(
                "DELETE FROM idempotency_keys WHERE expires_at < now() - interval '1 hour'"
            )
        return int(status.split()[-1])

    async def drop_artifacts(self, job_id: str) -> list[str]:
        """Deletes the job's artifact rows (retention: they are past their time) and rewrites its
        snapshot so that reads no longer list them; returns the keys the rows held. The objects
        are the caller's to delete: keys are content-addressed, and other rows may share them."""
        async with self._transaction() as conn:
            row = await conn.fetchrow(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1 FOR UPDATE", parse_job_id(job_id)
            )
            if row is None:
                return []
            removed = await conn.fetch(
                "DELETE FROM artifacts WHERE job_id = $1 RETURNING key", row["id"]
            )
            await self._refresh(conn, row)
        return [r["key"] for r in removed]

    # Parts

    async def _end(
        self,
        attempt: Attempt,
        sql: str,
        *args: Any,
        error: events_pb2.ErrorEvent | None = None,
        cause: FailureCause | None = None,
        dead_letter: bool = False,
    ) -> bool:
        """Ends the attempt's job by `sql`; a job that failed for good is dead-lettered before
        its end is announced, so whoever sees the final event finds the dead letter too."""
        async with self._transaction() as conn:
            row = await conn.fetchrow(sql, parse_job_id(attempt.job_id), attempt.number, *args)
            if row is None:
                return False
            job = await self._refresh(conn, row)
        _count_end(job, cause)
        if dead_letter:
            await self._dead_letter(job.id, job.error)
        if error is not None:
            await self._announce(job.id, error=error)
        await self._announce_final(job)
        return True

    async def _claim_key(
        self, conn: asyncpg.Connection, idempotency: Idempotency, job: JobRecord
    ) -> uuid.UUID | None:
        """Takes the tenant's key for `job`; or, when it is in use, the job it was used for."""
        taken = await conn.fetchval(
            "INSERT INTO idempotency_keys (tenant, key, request_sha256, job_id, expires_at)"
            " VALUES ($5, $1, $2, $3, now() + make_interval(secs => $4))"
            " ON CONFLICT (tenant, key) DO UPDATE SET request_sha256 = EXCLUDED.request_sha256,"
            " job_id = EXCLUDED.job_id, expires_at = EXCLUDED.expires_at"
            " WHERE idempotency_keys.expires_at < now() RETURNING true",
            idempotency.key,
            idempotency.request_sha256,
            parse_job_id(job.id),
            float(self.idempotency_ttl_seconds),
            job.tenant,
        )
        if taken:
            return None
        row = await conn.fetchrow(
            "SELECT request_sha256, job_id FROM idempotency_keys WHERE tenant = $1 AND key = $2",
            job.tenant,
            idempotency.key,
        )
        if row["request_sha256"] not in ("", idempotency.request_sha256):
            raise Conflict(
                "idempotency_key: this key was used for a different request"
                f" within the last {self.idempotency_ttl_seconds} seconds"
            )
        first: uuid.UUID = row["job_id"]
        return first

    async def _refresh(self, conn: asyncpg.Connection, row: asyncpg.Record) -> JobRecord:
        """The record after a change, with its snapshot rewritten to match; a job that just
        ended gets its webhook delivery, in the same transaction."""
        job = await self._with_artifacts(conn, row)
        await conn.execute(
            "UPDATE jobs SET snapshot = $2 WHERE id = $1",
            row["id"],
            job_to_pb(job).SerializeToString(),
        )
        event = f"job.{job.status.value}"
        if job.finished and job.webhook.url and event in job.webhook.events:
            await conn.execute(
                "INSERT INTO webhook_deliveries (id, tenant, job_id, event_type, url)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (job_id, event_type) DO NOTHING",
                uuid.uuid4(),
                job.tenant,
                row["id"],
                event,
                job.webhook.url,
            )
            await conn.execute("NOTIFY imagegen_webhooks")
        return job

    @staticmethod
    async def _with_artifacts(conn: asyncpg.Connection, row: asyncpg.Record) -> JobRecord:
        job = _job(row)
        rows = await conn.fetch(
            f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE job_id = $1"
            " ORDER BY is_primary DESC, variant_index",
            row["id"],
        )
        job.artifacts = [_artifact(r) for r in rows]
        withheld = await conn.fetch(
            "SELECT variant_index, category FROM withheld_variants WHERE job_id = $1"
            " ORDER BY variant_index",
            row["id"],
        )
        job.withheld = [Withheld(r["variant_index"], r["category"]) for r in withheld]
        return job

    @staticmethod
    def _from_snapshot(data: bytes | None, progress_percent: float) -> types_pb2.Job | None:
        if data is None:
            return None  # a row from before snapshots: built from the record instead
        job = types_pb2.Job.FromString(data)
        job.progress_percent = progress_percent
        return job

    async def _announce(self, job_id: str, **payload: Any) -> None:
        await self._blip_tolerant(
            self._events.append(job_id, events_pb2.JobEvent(**payload)), "event"
        )

    async def _announce_final(self, job: JobRecord) -> None:
        """The final event, then the mark that it was written; a job left unmarked (Redis was
        away) is announced again by `announce_missing_finals`."""
        await self._blip_tolerant(self._write_final(job), "final event")

    async def _write_final(self, job: JobRecord) -> None:
        final = events_pb2.JobEvent()
        final.final.job.CopyFrom(job_to_pb(job))
        await self._events.append(job.id, final)
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE jobs SET final_announced = true WHERE id = $1", parse_job_id(job.id)
            )

    async def _hint_queue(self, job: JobRecord, weight: int | None = None) -> None:
        await self._blip_tolerant(
            self._queue.enqueue(job.id, job.tenant, job.priority, weight), "queue entry"
        )

    async def _dead_letter(self, job_id: str, reason: str) -> None:
        await self._blip_tolerant(self._queue.dead_letter(job_id, reason), "dead letter")

    @staticmethod
    async def _blip_tolerant(write: Any, what: str) -> None:
        """A Redis write after the commit: Postgres already holds the change, so a blip loses
        only the hint (the reconciler re-queues; watchers fall back to the record)."""
        try:
            await write
        except Exception as error:
            if not is_blip(error):
                raise
            log.warning("%s not written to Redis (%s); Postgres has the change", what, error)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; a blip becomes StoreUnavailable. The release is apart from the
        outcome: once the body ran (a transaction committed), a connection that breaks while it
        is reset for the pool (asyncpg raises, and drops it) must not turn a done operation into
        a reported failure."""
        with _blips_unavailable():
            conn = await self._pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS)
        try:
            with _blips_unavailable(conn):
                yield conn
        finally:
            try:
                await self._pool.release(conn)
            except (asyncpg.InternalClientError, *STORE_ERRORS) as error:
                # The pool has closed it; the next acquire opens another.
                log.warning("a connection broke on release (%s: %s)", type(error).__name__, error)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn


@contextlib.contextmanager
def _blips_unavailable(conn: asyncpg.Connection | None = None) -> Iterator[None]:
    """A blip raised inside becomes the domain's StoreUnavailable; any other error passes. On a
    connection that broke mid-operation asyncpg can also raise InternalClientError (its state
    machine still busy); with `conn` closed, that is a blip too."""
    try:
        yield
    except Exception as error:
        broke = (
            isinstance(error, asyncpg.InternalClientError) and conn is not None and conn.is_closed()
        )
        if isinstance(error, StoreUnavailable) or not (is_blip(error) or broke):
            raise
        raise StoreUnavailable("the job store is unavailable") from error


def _job(row: asyncpg.Record) -> JobRecord:
    return JobRecord(
        id=str(row["id"]),
        status=JobStatus(row["status"]),
        stage=row["stage"],
        progress_percent=row["progress_percent"],
        spec=decode_spec(row["spec"]),
        cache_key=row["cache_key"],
        cost_cents=row["cost_cents"],
        cache_hit=row["cache_hit"],
        cache_mode=CacheMode(row["cache_mode"]),
        error=row["error"],
        retryable=row["retryable"],
        attempts=row["attempts"],
        engine_version=row["engine_version"],
        evaluator_models=list(row["evaluator_models"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        tenant=row["tenant"],
        api_key_id=str(row["api_key_id"]) if row["api_key_id"] else None,
        priority=Priority(row["priority"]),
        cache_namespace=row["cache_namespace"],
        webhook=Webhook(row["webhook_url"], tuple(row["webhook_events"])),
        estimated_cents=row["estimated_cents"],
        cache_result=row["cache_result"],
        trace_parent=row["trace_parent"],
    )


def _count_end(job: JobRecord, cause: FailureCause | None = None) -> None:
    """The metrics of a job that just ended (once: only the transition that ended it calls)."""
    model = job.spec.model
    reason = str(cause) if job.status is JobStatus.FAILED and cause is not None else ""
    metrics.JOBS_FINISHED.labels(model, job.status.value, reason).inc()
    if job.created_at is not None and job.updated_at is not None:
        seconds = (job.updated_at - job.created_at).total_seconds()
        metrics.JOB_SECONDS.labels(model, job.status.value).observe(max(seconds, 0.0))
    if job.status is JobStatus.COMPLETED:
        metrics.COST_CENTS.labels(model, "actual").inc(job.cost_cents)


async def _check_limits(conn: asyncpg.Connection, job: JobRecord, limits: Limits) -> None:
    """QuotaExceeded when admitting `job` would pass its key's concurrency limit or its
    tenant's budget. A transaction-scoped lock per tenant makes concurrent admissions of one
    tenant count one after another (other tenants are not held up)."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('imagegen:tenant:' || $1))", job.tenant
    )
    if limits.max_concurrent is not None and job.api_key_id is not None:
        active = await conn.fetchval(
            "SELECT count(*) FROM jobs WHERE api_key_id = $1 AND status IN ('queued', 'running')",
            uuid.UUID(job.api_key_id),
        )
        if active >= limits.max_concurrent:
            raise QuotaExceeded(
                f"key:{job.api_key_id}/concurrent",
                f"this key has {active} jobs queued or running, its limit; retry when one ends",
                retry_after_seconds=5,
            )
    if limits.budget_cents is not None:
        spent = await conn.fetchval(
            "SELECT coalesce(sum(cost_cents), 0) FROM jobs WHERE tenant = $1"
            " AND status IN ('queued', 'running', 'completed')",
            job.tenant,
        )
        if spent + job.cost_cents > limits.budget_cents:
            raise QuotaExceeded(
                f"tenant:{job.tenant}/budget",
                f"this job ({job.cost_cents} cents) would take the tenant's spend from {spent} past"
                f" its budget of {limits.budget_cents} cents",
            )


async def _count_safety(conn: asyncpg.Connection, kind: str, category: str) -> None:
    await conn.execute(
        "INSERT INTO safety_counts (day, kind, category, count) VALUES (current_date, $1, $2, 1)"
        " ON CONFLICT (day, kind, category) DO UPDATE SET count = safety_counts.count + 1",
        kind,
        category,
    )


def _artifact(row: asyncpg.Record) -> ArtifactRecord:
    return ArtifactRecord(
        id=str(row["id"]),
        job_id=str(row["job_id"]),
        variant_index=row["variant_index"],
        key=row["key"],
        sha256=row["sha256"],
        width=row["width_px"],
        height=row["height_px"],
        seed=row["seed"],
        clip_score=row["clip_score"],
        lpips_diversity=row["lpips_diversity"],
        lpips_to_reference=row["lpips_to_reference"],
        nsfw=row["nsfw"],
        is_primary=row["is_primary"],
        clip_model=row["clip_model"],
        clip_calibrated=row["clip_calibrated"],
        lpips_model=row["lpips_model"],
        lpips_calibrated=row["lpips_calibrated"],
    )


async def _upsert_artifact(conn: asyncpg.Connection, a: ArtifactRecord) -> None:
    await conn.execute(
        f"INSERT INTO artifacts ({_ARTIFACT_COLUMNS})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
        " ON CONFLICT (job_id, variant_index) DO UPDATE SET id = EXCLUDED.id,"
        " key = EXCLUDED.key, sha256 = EXCLUDED.sha256, width_px = EXCLUDED.width_px,"
        " height_px = EXCLUDED.height_px, seed = EXCLUDED.seed",
        uuid.UUID(a.id),
        parse_job_id(a.job_id),
        a.variant_index,
        a.key,
        a.sha256,
        a.width,
        a.height,
        a.seed,
        a.clip_score,
        a.lpips_diversity,
        a.lpips_to_reference,
        a.nsfw,
        a.is_primary,
        a.clip_model,
        a.clip_calibrated,
        a.lpips_model,
        a.lpips_calibrated,
    )
