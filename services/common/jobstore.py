"""Jobs and their artifacts in Postgres: the durable record every service reads and updates.

State changes are guarded in SQL (`WHERE status IN ...`) so that two replicas, a retried worker
and a cancel racing each other can never move a finished job again.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from services.common.errors import InvalidArgument, NotFound
from services.common.spec import Spec

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "queued",
    "running",
    "completed",
    "failed",
    "cancelled",
)
TERMINAL = (COMPLETED, FAILED, CANCELLED)


@dataclass
class ArtifactRecord:
    job_id: str
    variant_index: int
    key: str
    sha256: str
    width: int
    height: int
    seed: int
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    clip_score: float | None = None
    lpips_diversity: float | None = None
    lpips_to_reference: float | None = None
    nsfw: bool = False
    is_primary: bool = False


@dataclass
class JobRecord:
    id: str
    status: str
    spec: Spec
    cache_key: str
    cost_cents: int
    stage: str = ""
    progress_percent: float = 0.0
    cache_hit: bool = False
    error: str = ""
    attempts: int = 0
    engine_version: str = ""
    evaluator_models: list[str] = field(default_factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    artifacts: list[ArtifactRecord] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


_JOB_COLUMNS = (
    "id, status, stage, progress_percent, spec, cache_key, cost_cents, cache_hit, error, "
    "attempts, engine_version, evaluator_models, created_at, updated_at"
)
_ARTIFACT_COLUMNS = (
    "id, job_id, variant_index, key, sha256, width_px, height_px, seed, clip_score, "
    "lpips_diversity, lpips_to_reference, nsfw, is_primary"
)


def _job(row: asyncpg.Record) -> JobRecord:
    data = dict(row)
    data["id"] = str(data["id"])
    data["spec"] = Spec.from_json(data["spec"])
    data["evaluator_models"] = list(data["evaluator_models"])
    return JobRecord(**data)


def _artifact(row: asyncpg.Record) -> ArtifactRecord:
    data = dict(row)
    data["id"], data["job_id"] = str(data["id"]), str(data["job_id"])
    data["width"], data["height"] = data.pop("width_px"), data.pop("height_px")
    return ArtifactRecord(**data)


def _uuid(job_id: str, field_name: str = "job_id") -> uuid.UUID:
    try:
        return uuid.UUID(job_id)
    except ValueError:
        raise InvalidArgument.one(field_name, "not a job id") from None


class JobStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(
        self, job: JobRecord, idempotency_key: str = "", artifacts: Sequence[ArtifactRecord] = ()
    ) -> tuple[JobRecord, bool]:
        """Inserts `job` (with `artifacts`, for a cache hit); returns (job, created). With an
        idempotency key already used, returns the first job and False."""
        first = None
        async with self.pool.acquire() as conn, conn.transaction():
            row = await self._insert_job(conn, job, idempotency_key)
            if row is None:
                first = await conn.fetchval(
                    "SELECT id FROM jobs WHERE idempotency_key = $1", idempotency_key
                )
            for artifact in artifacts if row is not None else ():
                await self._insert_artifact(conn, artifact)
        if row is None:
            return await self.get(str(first)), False
        if artifacts:
            return await self.get(job.id), True
        return _job(row), True  # the row as stored (RETURNING): no second read

    @staticmethod
    async def _insert_job(conn: Any, job: JobRecord, idempotency_key: str) -> Any:
        return await conn.fetchrow(
            f"INSERT INTO jobs (id, status, stage, progress_percent, spec, cache_key,"
            f" cost_cents, cache_hit, engine_version, idempotency_key)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULLIF($10, ''))"
            f" ON CONFLICT (idempotency_key) DO NOTHING RETURNING {_JOB_COLUMNS}",
            _uuid(job.id),
            job.status,
            job.stage,
            job.progress_percent,
            job.spec.to_json(),
            job.cache_key,
            job.cost_cents,
            job.cache_hit,
            job.engine_version,
            idempotency_key,
        )

    async def get(self, job_id: str) -> JobRecord:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = $1", _uuid(job_id)
            )
            if row is None:
                raise NotFound(f"job {job_id} not found")
            job = _job(row)
            rows = await conn.fetch(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts WHERE job_id = $1"
                " ORDER BY is_primary DESC, variant_index",
                job.id,
            )
        job.artifacts = [_artifact(r) for r in rows]
        return job

    async def page(
        self, limit: int, before: tuple[datetime, str] | None, status: str | None
    ) -> list[JobRecord]:
        """Jobs newest first, strictly older than the `before` cursor, without artifacts."""
        where: list[str] = ["($1::text IS NULL OR status = $1)"]
        args: list[Any] = [status]
        if before is not None:
            where.append("(created_at, id) < ($2, $3)")
            args += [before[0], _uuid(before[1], "page_token")]
        rows = await self.pool.fetch(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)}"
            f" ORDER BY created_at DESC, id DESC LIMIT {int(limit)}",
            *args,
        )
        return [_job(r) for r in rows]

    async def start_attempt(self, job_id: str, reclaimed: bool) -> int | None:
        """Marks a queued job running and returns its attempt number. Only a reclaimed delivery
        (its worker died) may restart a job that is already running; any other delivery of a
        job that is running or has ended gets None, so a duplicate queue entry is harmless."""
        attempts: int | None = await self.pool.fetchval(
            "UPDATE jobs SET status = 'running', stage = 'starting', attempts = attempts + 1,"
            " updated_at = now() WHERE id = $1"
            " AND (status = 'queued' OR (status = 'running' AND $2))"
            " RETURNING attempts",
            _uuid(job_id),
            reclaimed,
        )
        return attempts

    async def mark_enqueued(self, job_id: str) -> None:
        await self.pool.execute("UPDATE jobs SET enqueued_at = now() WHERE id = $1", _uuid(job_id))

    async def unqueued(self, older_than_seconds: float, limit: int = 100) -> list[str]:
        """Queued jobs created more than `older_than_seconds` ago that never reached the queue."""
        rows = await self.pool.fetch(
            "SELECT id FROM jobs WHERE status = 'queued' AND enqueued_at IS NULL"
            " AND created_at < now() - make_interval(secs => $1) ORDER BY created_at LIMIT $2",
            older_than_seconds,
            limit,
        )
        return [str(r["id"]) for r in rows]

    async def set_stage(self, job_id: str, stage: str, percent: float | None = None) -> None:
        await self.pool.execute(
            "UPDATE jobs SET stage = $2, progress_percent = COALESCE($3, progress_percent),"
            " updated_at = now() WHERE id = $1 AND status = 'running'",
            _uuid(job_id),
            stage,
            percent,
        )

    async def requeue(self, job_id: str, error: str) -> bool:
        status = await self.pool.fetchval(
            "UPDATE jobs SET status = 'queued', stage = '', error = $2, updated_at = now()"
            " WHERE id = $1 AND status = 'running' RETURNING status",
            _uuid(job_id),
            error,
        )
        return status is not None

    async def finish(self, job_id: str, status: str, error: str = "", stage: str = "") -> bool:
        """Ends a job that has not ended yet; False when it already had. Only a completed job
        is charged: a failed or cancelled one costs 0."""
        assert status in TERMINAL
        done = await self.pool.fetchval(
            "UPDATE jobs SET status = $2, error = $3, stage = $4, updated_at = now(),"
            " progress_percent = CASE WHEN $2 = 'completed' THEN 100 ELSE progress_percent END,"
            " cost_cents = CASE WHEN $2 = 'completed' THEN cost_cents ELSE 0 END"
            " WHERE id = $1 AND status IN ('queued', 'running') RETURNING id",
            _uuid(job_id),
            status,
            error,
            stage,
        )
        return done is not None

    async def add_artifact(self, artifact: ArtifactRecord) -> ArtifactRecord:
        """Records a stored image; a retried attempt replaces the variant's earlier row."""
        async with self.pool.acquire() as conn:
            await self._insert_artifact(conn, artifact)
        return artifact

    @staticmethod
    async def _insert_artifact(conn: Any, a: ArtifactRecord) -> None:
        await conn.execute(
            f"INSERT INTO artifacts ({_ARTIFACT_COLUMNS})"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            " ON CONFLICT (job_id, variant_index) DO UPDATE SET id = EXCLUDED.id,"
            " key = EXCLUDED.key, sha256 = EXCLUDED.sha256, width_px = EXCLUDED.width_px,"
            " height_px = EXCLUDED.height_px, seed = EXCLUDED.seed",
            _uuid(a.id),
            _uuid(a.job_id),
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
        )

    async def set_scores(
        self, job_id: str, artifacts: Sequence[ArtifactRecord], models: list[str]
    ) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "UPDATE artifacts SET clip_score = $2, lpips_diversity = $3,"
                " lpips_to_reference = $4, nsfw = $5, is_primary = $6 WHERE id = $1",
                [
                    (
                        _uuid(a.id),
                        a.clip_score,
                        a.lpips_diversity,
                        a.lpips_to_reference,
                        a.nsfw,
                        a.is_primary,
                    )
                    for a in artifacts
                ],
            )
            await conn.execute(
                "UPDATE jobs SET evaluator_models = $2, updated_at = now() WHERE id = $1",
                _uuid(job_id),
                models,
            )
