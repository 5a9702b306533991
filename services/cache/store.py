"""The prompt cache: Postgres rows are the record, Redis holds the hot index.

Keys are content addresses of everything that decides the pixels (services.common.spec.cache_keys).
A seed-aware lookup matches the seed; a seed-agnostic one returns the newest live result made with
any seed. Entries live for a TTL (30 days by default) and count their hits.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from services.cache.entry import CacheEntry
from services.common import metrics
from services.common.models import Registry
from services.common.spec import Spec, cache_keys
from services.jobs.records import ArtifactRecord, decode_artifact

_HOT = "imagegen:cache:key:"
_SEEDLESS = "imagegen:cache:seedless:"
_HITS, _MISSES = "imagegen:cache:stats:hits", "imagegen:cache:stats:misses"
_COLUMNS = "key, seedless_key, job_id, seed, artifacts, hit_count, created_at, expires_at"


def _entry(row: asyncpg.Record) -> CacheEntry:
    data = dict(row)
    data["job_id"] = str(data["job_id"])
    data["artifacts"] = [decode_artifact(a) for a in data["artifacts"]]
    return CacheEntry(**data)


def _to_json(entry: CacheEntry) -> str:
    """The hot index's copy of an entry (version 1)."""
    return json.dumps(
        {
            "v": 1,
            "key": entry.key,
            "seedless_key": entry.seedless_key,
            "job_id": entry.job_id,
            "seed": entry.seed,
            "artifacts": entry.artifacts_json(),
            "created_at": entry.created_at.isoformat(),
            "expires_at": entry.expires_at.isoformat(),
            "hit_count": entry.hit_count,
        }
    )


def _from_json(blob: bytes) -> CacheEntry:
    data = json.loads(blob)
    return CacheEntry(
        key=data["key"],
        seedless_key=data["seedless_key"],
        job_id=data["job_id"],
        seed=data["seed"],
        artifacts=[decode_artifact(a) for a in data["artifacts"]],
        created_at=datetime.fromisoformat(data["created_at"]),
        expires_at=datetime.fromisoformat(data["expires_at"]),
        hit_count=data.get("hit_count", 0),
    )


class PromptCache:
    def __init__(
        self, pool: asyncpg.Pool, redis: aioredis.Redis, registry: Registry, ttl_seconds: int
    ) -> None:
        self._pool = pool
        self._redis = redis
        self._registry = registry
        self._ttl = ttl_seconds

    def keys(self, spec: Spec, namespace: str = "") -> tuple[str, str]:
        return cache_keys(spec, self._registry.get(spec.model), namespace)

    async def lookup(
        self, spec: Spec, seed_agnostic: bool, namespace: str = ""
    ) -> tuple[str, CacheEntry | None]:
        """(seed-aware key of the request, the live entry found or None) in `namespace` (a
        tenant's cache, or "" the shared one): the namespace is part of the key."""
        key, seedless = self.keys(spec, namespace)
        entry = await self._find(seedless if seed_agnostic else key, seed_agnostic)
        if entry is None:
            metrics.CACHE_LOOKUPS.labels("miss").inc()
            await self._redis.incr(_MISSES)
            return key, None
        hits = await self._pool.fetchval(
            "UPDATE cache_entries SET hit_count = hit_count + 1 WHERE key = $1 RETURNING hit_count",
            entry.key,
        )
        await self._redis.incr(_HITS)
        metrics.CACHE_LOOKUPS.labels(
            "hit_seed_agnostic" if seed_agnostic else "hit_seed_aware"
        ).inc()
        return key, replace(entry, hit_count=hits or entry.hit_count + 1)

    async def _find(self, key: str, seedless: bool) -> CacheEntry | None:
        hot_key = key
        if seedless:
            found: Any = await self._redis.get(_SEEDLESS + key)
            hot_key = found.decode() if found else ""
        if hot_key:
            blob: Any = await self._redis.get(_HOT + hot_key)
            if blob:
                return _from_json(blob)
        column = "seedless_key" if seedless else "key"
        row = await self._pool.fetchrow(
            f"SELECT {_COLUMNS} FROM cache_entries WHERE {column} = $1 AND expires_at > now()"
            " ORDER BY created_at DESC LIMIT 1",
            key,
        )
        if row is None:
            return None
        entry = _entry(row)
        await self._warm(entry)
        return entry

    async def _warm(self, entry: CacheEntry) -> None:
        ttl_ms = int((entry.expires_at - datetime.now(UTC)).total_seconds() * 1000)
        if ttl_ms <= 0:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.set(_HOT + entry.key, _to_json(entry), px=ttl_ms)
            pipe.set(_SEEDLESS + entry.seedless_key, entry.key, px=ttl_ms)
            await pipe.execute()

    async def store(
        self,
        spec: Spec,
        job_id: str,
        artifacts: list[ArtifactRecord],
        ttl_seconds: int = 0,
        namespace: str = "",
    ) -> CacheEntry:
        key, seedless = self.keys(spec, namespace)
        assert spec.seed is not None
        ttl = ttl_seconds if ttl_seconds > 0 else self._ttl
        now = datetime.now(UTC)
        entry = CacheEntry(
            key, seedless, job_id, spec.seed, artifacts, now, now + timedelta(seconds=ttl)
        )
        row = await self._pool.fetchrow(
            f"INSERT INTO cache_entries ({_COLUMNS}, namespace)"
            " VALUES ($1, $2, $3, $4, $5, 0, $6, $7, $8)"
            " ON CONFLICT (key) DO UPDATE SET job_id = EXCLUDED.job_id,"
            " artifacts = EXCLUDED.artifacts, created_at = EXCLUDED.created_at,"
            f" expires_at = EXCLUDED.expires_at RETURNING {_COLUMNS}",
            entry.key,
            entry.seedless_key,
            entry.job_id,
            entry.seed,
            entry.artifacts_json(),
            entry.created_at,
            entry.expires_at,
            namespace,
        )
        stored = _entry(row)
        await self._warm(stored)
        return stored

    async def invalidate(self, key: str | None) -> int:
        """Removes one entry (by seed-aware key) or, with None, all of them."""
        if key is None:
            rows = await self._pool.fetch("DELETE FROM cache_entries RETURNING key, seedless_key")
        else:
            rows = await self._pool.fetch(
                "DELETE FROM cache_entries WHERE key = $1 RETURNING key, seedless_key", key
            )
        if rows:
            await self._redis.delete(
                *[_HOT + r["key"] for r in rows], *[_SEEDLESS + r["seedless_key"] for r in rows]
            )
        return len(rows)

    async def stats(self) -> dict[str, int]:
        row = await self._pool.fetchrow(
            "SELECT count(*) AS entries, coalesce(sum(hit_count), 0) AS total_hit_count"
            " FROM cache_entries WHERE expires_at > now()"
        )
        hits, misses = await self._redis.mget(_HITS, _MISSES)
        return {
            "entries": int(row["entries"]),
            "total_hit_count": int(row["total_hit_count"]),
            "hits": int(hits or 0),
            "misses": int(misses or 0),
        }
