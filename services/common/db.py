"""Postgres: an asyncpg pool, with the ordered SQL migrations applied at start-up.

Migrations are `migrations/NNNN_name.sql`, applied in order, each once, under an advisory lock
so that several replicas starting together apply them exactly once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import asyncpg

log = logging.getLogger("imagegen.db")

MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_ID = 0x1A6E6E11


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def connect(url: str, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool on `url` with the schema migrated."""
    if not url:
        raise RuntimeError("DATABASE_URL is not set (make run sets it for the embedded mode)")
    pool: asyncpg.Pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        # asyncpg's reset query on release stays: it costs a round trip per use, but a
        # connection broken mid-query (a Postgres restart) fails it and is closed instead of
        # going back to the pool half-way through an operation.
        init=_init_connection,
    )
    await migrate(pool)
    return pool


async def migrate(pool: asyncpg.Pool) -> list[str]:
    """Applies the migrations not applied yet; returns their names."""
    applied: list[str] = []
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for path in sorted(MIGRATIONS.glob("*.sql")):
                if path.name in done:
                    continue
                async with conn.transaction():
                    await conn.execute(path.read_text())
                    await conn.execute(
                        "INSERT INTO schema_migrations (name) VALUES ($1)", path.name
                    )
                applied.append(path.name)
                log.info("applied migration %s", path.name)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    return applied
