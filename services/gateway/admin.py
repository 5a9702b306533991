"""The admin dashboard: its page, the charting library it draws with, and its data.

`AdminStats` answers, for a time range cut into buckets, what the jobs table and the safety
counts say: jobs admitted and how they ended (failures by reason), what the prompt cache
answered, the queue's depth, cost estimated against charged, per-model usage, refusals, and
duration histograms with p50/p95/p99, end to end and per stage. Every figure comes from
Postgres, so history survives restarts and covers every gateway replica (the Prometheus
metrics are the live view of one process); the queries are few, read one snapshot and scan the
jobs by their created_at and ended_at indexes.

The routes: `GET /admin` (the page; open, it asks for a key as `/` does), `GET /static/...`
(the page's script and the vendored Chart.js, served from the project, never a CDN) and
`GET /api/admin/stats?from=&to=&bucket=` (admin scope).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.common.metrics import JOB_BUCKETS
from services.common.retry import StoreUnavailable, is_blip
from services.gateway.http_input import query_count, query_text
from services.jobs.lifecycle import FailureCause, SafetyCount

STATIC = Path(__file__).parent / "static"
# What /static serves: scripts and styles (not the pages, which have routes of their own).
_ASSET_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

DEFAULT_RANGE = timedelta(hours=1)
MAX_RANGE = timedelta(days=366)
MAX_BUCKETS = 1000
# The times `from` and `to` may name.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9999, 12, 30, tzinfo=UTC)
# Without `bucket`: the smallest of these that cuts the range into at most TARGET_BUCKETS.
TARGET_BUCKETS = 60
BUCKET_CHOICES = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
# Queue depth counts the jobs created up to this long before the range (and every job still
# queued): one that waited longer than this before it started is missed.
QUEUE_LOOKBACK = timedelta(days=1)
# Histogram bounds, seconds: the Prometheus job histograms', so the two views agree.
DURATION_BOUNDS = tuple(float(b) for b in JOB_BUCKETS)
FAILURE_REASONS = tuple(cause.value for cause in FailureCause)
CACHE_RESULTS = ("hit_seed", "hit_seedless", "miss", "off")
# Lifecycle stage names as the Prometheus stage metric names them; the others keep their names.
STAGE_NAMES = {
    "loading_model": "model_load",
    "denoising": "denoise",
    "decoding": "decode",
    "uploading": "upload",
    "evaluating": "evaluate",
}
STAGE_ORDER = (
    "queue_wait",
    "starting",
    "model_load",
    "encoding_prompt",
    "denoise",
    "decode",
    "encoding_png",
    "upload",
    "evaluate",
)
ACQUIRE_TIMEOUT_SECONDS = 5.0
STATEMENT_TIMEOUT = "15s"
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", re.IGNORECASE
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# $1 from, $2 to, $3 bucket seconds, $4 the number of the range's first bucket (epoch-aligned).
_BUCKET = "floor(extract(epoch FROM {}) / $3)::bigint - $4"
_BY_CREATION = f"""
SELECT {_BUCKET.format("created_at")} AS i, count(*) AS admitted,
       count(*) FILTER (WHERE cache_result = 'hit_seed') AS hit_seed,
       count(*) FILTER (WHERE cache_result = 'hit_seedless') AS hit_seedless,
       count(*) FILTER (WHERE cache_result = 'miss') AS miss,
       count(*) FILTER (WHERE cache_result = 'off') AS off
FROM jobs WHERE created_at >= $1 AND created_at < $2 GROUP BY 1
"""
_BY_END = f"""
SELECT {_BUCKET.format("ended_at")} AS i, status, failure_reason, cache_hit, count(*) AS jobs,
       sum(estimated_cents)::bigint AS estimated, sum(cost_cents)::bigint AS charged
FROM jobs WHERE ended_at >= $1 AND ended_at < $2 GROUP BY 1, 2, 3, 4
"""
# The queue's depth: +1 when a job is admitted to wait, -1 when it starts (or ends unstarted);
# the running sum after each instant's moves (departures first). Moves before the range fall
# in bucket -1, whose last depth is the depth the range starts with.
_QUEUE = f"""
WITH waits AS (
    SELECT created_at AS arrived, coalesce(started_at, ended_at) AS left_at FROM jobs
    WHERE NOT cache_hit AND created_at < $2
      AND (created_at >= $1::timestamptz - make_interval(secs => $5::float8)
           OR status = 'queued')
), moves AS (
    SELECT arrived AS at, 1 AS change FROM waits
    UNION ALL SELECT left_at, -1 FROM waits WHERE left_at < $2
), depths AS (
    SELECT at, change, sum(change) OVER (ORDER BY at, change) AS depth FROM moves
)
SELECT greatest({_BUCKET.format("at")}, -1) AS i, max(depth)::bigint AS peak,
       ((array_agg(depth ORDER BY at DESC, change DESC))[1])::bigint AS last
FROM depths GROUP BY 1
"""
# Seconds per job that ended in the range (cache hits never ran): end to end for the completed
# ones and for all, the wait in the queue, and each stage (summed over attempts).
_DURATIONS = """
WITH ended AS (
    SELECT status, created_at, started_at, ended_at, stage_seconds FROM jobs
    WHERE ended_at >= $1 AND ended_at < $2 AND NOT cache_hit
), samples AS (
    SELECT 'end_to_end' AS name, extract(epoch FROM ended_at - created_at)::float8 AS s
    FROM ended WHERE status = 'completed'
    UNION ALL SELECT 'end_to_end_all', extract(epoch FROM ended_at - created_at)::float8 FROM ended
    UNION ALL SELECT 'queue_wait', extract(epoch FROM started_at - created_at)::float8
    FROM ended WHERE started_at IS NOT NULL
    UNION ALL SELECT 'stage:' || stage.key, stage.value::float8
    FROM ended, jsonb_each_text(stage_seconds) AS stage
)
SELECT name, width_bucket(s, $3::float8[]) AS b, GROUPING(width_bucket(s, $3::float8[])) AS whole,
       count(*) AS n, sum(s) AS seconds,
       percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY s) AS pct
FROM samples GROUP BY GROUPING SETS ((name), (name, width_bucket(s, $3::float8[])))
"""
_MODELS = """
SELECT coalesce(spec->>'model', '') AS model, count(*) AS jobs,
       coalesce(sum((spec->>'num_variants')::int), 0)::bigint AS images,
       count(*) FILTER (WHERE status = 'completed' AND NOT cache_hit) AS rendered,
       count(*) FILTER (WHERE cache_hit) AS cache_hits,
       count(*) FILTER (WHERE status = 'failed') AS failed,
       count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
       coalesce(sum(cost_cents) FILTER (WHERE status = 'completed'), 0)::bigint AS charged
FROM jobs WHERE created_at >= $1 AND created_at < $2 GROUP BY 1 ORDER BY jobs DESC, model
"""
# Counted per day (of the database's time zone, as current_date counts them).
_REFUSALS = """
SELECT day, kind, category, count FROM safety_counts
WHERE day BETWEEN $1::timestamptz::date
    AND ($2::timestamptz - interval '1 microsecond')::date
ORDER BY day, kind, category
"""


@dataclass(frozen=True)
class Window:
    """[start, end) cut into buckets of `bucket_seconds`, aligned to the epoch (so the first and
    the last may be partly outside the range)."""

    start: datetime
    end: datetime
    bucket_seconds: int

    @property
    def first(self) -> int:
        """The number (since the epoch) of the bucket `start` falls in."""
        return _micros(self.start) // (self.bucket_seconds * 1_000_000)

    @property
    def count(self) -> int:
        last = (_micros(self.end) - 1) // (self.bucket_seconds * 1_000_000)
        return last - self.first + 1

    def starts(self) -> list[datetime]:
        return [
            _EPOCH + timedelta(seconds=(self.first + i) * self.bucket_seconds)
            for i in range(self.count)
        ]


@dataclass(frozen=True)
class Histogram:
    """Samples in seconds: `counts[i]` are those in [DURATION_BOUNDS[i-1], DURATION_BOUNDS[i])
    (from 0, and to infinity for the last); percentiles interpolate (percentile_cont)."""

    counts: list[int]
    count: int = 0
    sum_seconds: float = 0.0
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class ModelUsage:
    model: str
    jobs: int
    images: int
    rendered: int
    cache_hits: int
    failed: int
    cancelled: int
    charged_cents: int


@dataclass
class Stats:
    """Per bucket: `admitted` and `cache` by creation time; `rendered`, `cache_hits`, `failed`
    (by reason), `cancelled` and the cents by end time; the queue's peak depth in the bucket and
    its depth at the bucket's end. Durations, models and refusals are over the whole range."""

    window: Window
    admitted: list[int]
    cache: dict[str, list[int]]
    rendered: list[int]
    cache_hits: list[int]
    failed: dict[str, list[int]]
    cancelled: list[int]
    estimated_cents: list[int]
    actual_cents: list[int]
    queue_peak: list[int]
    queue_end: list[int]
    durations: dict[str, Histogram] = field(default_factory=dict)
    stages: dict[str, Histogram] = field(default_factory=dict)
    models: list[ModelUsage] = field(default_factory=list)
    refusals: list[SafetyCount] = field(default_factory=list)


class AdminStats:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def read(self, window: Window) -> Stats:
        """Everything the dashboard shows for `window`, from one snapshot of the database."""
        n = window.count
        stats = Stats(
            window=window,
            admitted=[0] * n,
            cache={name: [0] * n for name in CACHE_RESULTS},
            rendered=[0] * n,
            cache_hits=[0] * n,
            failed={reason: [0] * n for reason in FAILURE_REASONS},
            cancelled=[0] * n,
            estimated_cents=[0] * n,
            actual_cents=[0] * n,
            queue_peak=[0] * n,
            queue_end=[0] * n,
        )
        bucketed = (window.start, window.end, window.bucket_seconds, window.first)
        async with self._snapshot() as conn:
            for row in await conn.fetch(_BY_CREATION, *bucketed):
                i = row["i"]
                stats.admitted[i] += row["admitted"]
                for name in CACHE_RESULTS:
                    stats.cache[name][i] += row[name]
            for row in await conn.fetch(_BY_END, *bucketed):
                _count_end(stats, row)
            queue = await conn.fetch(_QUEUE, *bucketed, QUEUE_LOOKBACK.total_seconds())
            _fill_queue(stats, queue)
            durations = await conn.fetch(
                _DURATIONS, window.start, window.end, list(DURATION_BOUNDS)
            )
            stats.durations, stats.stages = _histograms(durations)
            stats.models = [
                ModelUsage(
                    r["model"],
                    r["jobs"],
                    r["images"],
                    r["rendered"],
                    r["cache_hits"],
                    r["failed"],
                    r["cancelled"],
                    r["charged"],
                )
                for r in await conn.fetch(_MODELS, window.start, window.end)
            ]
            stats.refusals = [
                SafetyCount(r["day"], r["kind"], r["category"], r["count"])
                for r in await conn.fetch(_REFUSALS, window.start, window.end)
            ]
        return stats

    @contextlib.asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[asyncpg.Connection]:
        """A read-only, repeatable-read transaction (every query sees the same jobs), under a
        statement timeout; a store blip is StoreUnavailable (503 with Retry-After)."""
        try:
            async with (
                self._pool.acquire(timeout=ACQUIRE_TIMEOUT_SECONDS) as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                await conn.execute(f"SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'")
                yield conn
        except asyncpg.QueryCanceledError as error:
            raise Unavailable(
                "the statistics took too long; ask for a shorter range or larger buckets"
            ) from error
        except Exception as error:
            if isinstance(error, StoreUnavailable) or not is_blip(error):
                raise
            raise StoreUnavailable("the job store is unavailable") from error


def _count_end(stats: Stats, row: asyncpg.Record) -> None:
    i, status = row["i"], row["status"]
    if status == "completed":
        (stats.cache_hits if row["cache_hit"] else stats.rendered)[i] += row["jobs"]
    elif status == "failed":
        reason = row["failure_reason"] or "unknown"  # failed before reasons were kept
        stats.failed.setdefault(reason, [0] * len(stats.rendered))[i] += row["jobs"]
    elif status == "cancelled":
        stats.cancelled[i] += row["jobs"]
    stats.estimated_cents[i] += row["estimated"]
    stats.actual_cents[i] += row["charged"]


def _fill_queue(stats: Stats, rows: Sequence[asyncpg.Record]) -> None:
    """Peak and end depth per bucket; a bucket without moves keeps the depth it started with."""
    by_bucket = {r["i"]: (r["peak"], r["last"]) for r in rows}
    depth = by_bucket.get(-1, (0, 0))[1]
    for i in range(len(stats.queue_peak)):
        peak, last = by_bucket.get(i, (depth, depth))
        stats.queue_peak[i] = max(peak, depth)
        depth = last
        stats.queue_end[i] = depth


def _histograms(
    rows: Sequence[asyncpg.Record],
) -> tuple[dict[str, Histogram], dict[str, Histogram]]:
    """(end-to-end histograms, stage histograms) from the GROUPING SETS rows of _DURATIONS."""
    counts: dict[str, list[int]] = {}
    wholes: dict[str, asyncpg.Record] = {}
    for row in rows:
        name = row["name"].removeprefix("stage:")
        name = STAGE_NAMES.get(name, name)
        if row["whole"]:
            wholes[name] = row
        else:
            counts.setdefault(name, [0] * (len(DURATION_BOUNDS) + 1))[row["b"]] += row["n"]

    def histogram(name: str) -> Histogram:
        whole = wholes.get(name)
        if whole is None:
            return Histogram([0] * (len(DURATION_BOUNDS) + 1))
        p50, p95, p99 = whole["pct"]
        return Histogram(counts[name], whole["n"], whole["seconds"], p50, p95, p99)

    overall = ("end_to_end", "end_to_end_all")
    stages = [*STAGE_ORDER, *sorted(set(wholes) - set(STAGE_ORDER) - set(overall))]
    return {n: histogram(n) for n in overall}, {n: histogram(n) for n in stages}


# HTTP


def window_from_query(params: QueryParams, now: datetime) -> Window:
    """`from` and `to` (RFC 3339; default: the hour before now) and `bucket` (seconds; default:
    a round size that gives at most TARGET_BUCKETS), each bad one named."""
    end = _query_time(params, "to") or now
    start = _query_time(params, "from") or end - DEFAULT_RANGE
    if start >= end:
        raise InvalidArgument.one("from", "must be before `to`")
    if end - start > MAX_RANGE:
        raise InvalidArgument.one("from", f"at most {MAX_RANGE.days} days before `to`")
    if "bucket" not in params:
        span = (end - start).total_seconds()
        bucket = next((b for b in BUCKET_CHOICES if span / b <= TARGET_BUCKETS), 604800)
        return Window(start, end, bucket)
    bucket = query_count(params, "bucket", 7)
    if bucket < 1:
        raise InvalidArgument.one("bucket", "must be at least 1 second")
    window = Window(start, end, bucket)
    if window.count > MAX_BUCKETS:
        raise InvalidArgument.one(
            "bucket",
            f"cuts the range into {window.count} buckets, more than {MAX_BUCKETS}:"
            " choose a larger bucket or a shorter range",
        )
    return window


def _query_time(params: QueryParams, name: str) -> datetime | None:
    raw = query_text(params, name, 64)
    if not raw:
        return None
    try:
        if not _RFC3339.fullmatch(raw):
            raise ValueError(raw)
        # OverflowError: a time in year 1 or 9999 that its offset moves out of range.
        time = datetime.fromisoformat(raw.upper()).astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument.one(
            name, "must be an RFC 3339 time with an offset, e.g. 2025-01-31T12:00:00Z"
        ) from None
    # Room for the range's arithmetic (an hour back, a day of queue lookback) on either side.
    if not EARLIEST <= time <= LATEST:
        raise InvalidArgument.one(name, f"must be between {_iso(EARLIEST)} and {_iso(LATEST)}")
    return time


def stats_json(stats: Stats) -> dict[str, Any]:
    window = stats.window
    minutes = window.bucket_seconds / 60
    completed = [r + c for r, c in zip(stats.rendered, stats.cache_hits, strict=True)]
    hits = [
        s + a for s, a in zip(stats.cache["hit_seed"], stats.cache["hit_seedless"], strict=True)
    ]
    lookups = [h + m for h, m in zip(hits, stats.cache["miss"], strict=True)]
    failed_by_reason = {reason: sum(series) for reason, series in stats.failed.items()}
    by_category: dict[tuple[str, str], int] = {}
    for c in stats.refusals:
        by_category[c.kind, c.category] = by_category.get((c.kind, c.category), 0) + c.count
    range_minutes = (window.end - window.start).total_seconds() / 60
    return {
        "from": _iso(window.start),
        "to": _iso(window.end),
        "bucket_seconds": window.bucket_seconds,
        "buckets": [_iso(t) for t in window.starts()],
        "totals": {
            "admitted": sum(stats.admitted),
            "completed": sum(completed),
            "rendered": sum(stats.rendered),
            "cache_hits": sum(hits),
            "cache_lookups": sum(lookups),
            "hit_ratio": _ratio(sum(hits), sum(lookups)),
            "failed": sum(failed_by_reason.values()),
            "failed_by_reason": failed_by_reason,
            "cancelled": sum(stats.cancelled),
            "throughput_per_minute": round(sum(completed) / range_minutes, 4),
            "estimated_cents": sum(stats.estimated_cents),
            "actual_cents": sum(stats.actual_cents),
            "queue_peak": max(stats.queue_peak, default=0),
        },
        "jobs": {
            "admitted": stats.admitted,
            "rendered": stats.rendered,
            "cache_hits": stats.cache_hits,
            "failed": stats.failed,
            "cancelled": stats.cancelled,
            "throughput_per_minute": [round(c / minutes, 4) for c in completed],
        },
        "cache": {
            **stats.cache,
            "hit_ratio": [_ratio(h, n) for h, n in zip(hits, lookups, strict=True)],
        },
        "queue": {"depth_peak": stats.queue_peak, "depth_end": stats.queue_end},
        "cost": {"estimated_cents": stats.estimated_cents, "actual_cents": stats.actual_cents},
        "durations": {
            "bounds_seconds": list(DURATION_BOUNDS),
            **{name: _histogram_json(h) for name, h in stats.durations.items()},
            "stages": {name: _histogram_json(h) for name, h in stats.stages.items()},
        },
        "models": [
            {
                "model": m.model,
                "jobs": m.jobs,
                "images": m.images,
                "rendered": m.rendered,
                "cache_hits": m.cache_hits,
                "failed": m.failed,
                "cancelled": m.cancelled,
                "charged_cents": m.charged_cents,
            }
            for m in stats.models
        ],
        "refusals": {
            # Counted per day: the days the range touches, whole.
            "from_day": window.start.date().isoformat(),
            "to_day": (window.end - timedelta(microseconds=1)).date().isoformat(),
            "by_category": [
                {"kind": kind, "category": category, "count": count}
                for (kind, category), count in sorted(by_category.items(), key=lambda kv: -kv[1])
            ],
            "daily": [
                {"day": c.day.isoformat(), "kind": c.kind, "category": c.category, "count": c.count}
                for c in stats.refusals
            ],
        },
    }


def _histogram_json(h: Histogram) -> dict[str, Any]:
    return {
        "count": h.count,
        "sum_seconds": h.sum_seconds,
        "p50": h.p50,
        "p95": h.p95,
        "p99": h.p99,
        "counts": h.counts,
    }


Endpoint = Callable[[Request], Awaitable[Response]]


def stats_endpoint(stats: AdminStats) -> Endpoint:
    """GET /api/admin/stats."""

    async def endpoint(request: Request) -> Response:
        window = window_from_query(request.query_params, datetime.now(UTC))
        return JSONResponse(stats_json(await stats.read(window)))

    return endpoint


async def admin_page(request: Request) -> Response:
    return FileResponse(
        STATIC / "admin.html", media_type="text/html", headers={"Cache-Control": "no-cache"}
    )


async def static_file(request: Request) -> Response:
    """A script or style under static/: the vendored libraries (their folder names carry
    their versions) cached for a year, the project's own revalidated."""
    path = request.path_params["path"]
    file = (STATIC / path).resolve()
    media_type = _ASSET_TYPES.get(file.suffix)
    if media_type is None or not file.is_relative_to(STATIC.resolve()) or not file.is_file():
        raise NotFound("no such file")
    vendored = path.startswith("vendor/")
    return FileResponse(
        file,
        media_type=media_type,
        headers={
            "Cache-Control": "public, max-age=31536000, immutable" if vendored else "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _micros(t: datetime) -> int:
    return (t - _EPOCH) // timedelta(microseconds=1)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None
