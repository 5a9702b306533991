"""Tenants and their API keys, in Postgres.

A key is shown once, when it is made (`igk_` and 40 random characters); only its SHA-256 is
stored. A key carries its tenant, scopes and limits; `authenticate` turns a presented key into a
`Caller`, the plain record every domain call is confined by. Lookups are cached in the process for
a few seconds (a revoked key stops working within `CACHE_SECONDS`), and `last_used_at` is
written at most once a minute per key.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import re
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from services.common.errors import InvalidArgument, NotFound, Unauthenticated

KEY_PREFIX = "igk_"
CACHE_SECONDS = 5.0
TOUCH_SECONDS = 60.0
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_KEY = re.compile(r"igk_[A-Za-z0-9_-]{40}")


class Scope(enum.StrEnum):
    GENERATE = "generate"  # create jobs, upload guidance images, evaluate images, cancel
    READ = "read"  # read, list, watch and download its tenant's jobs; price requests
    ADMIN = "admin"  # the admin routes (safety counts, ...)


ALL_SCOPES = (Scope.GENERATE, Scope.READ, Scope.ADMIN)


@dataclass(frozen=True)
class Caller:
    """Who is asking: the key's tenant, scopes and limits."""

    tenant: str
    key_id: str
    scopes: frozenset[Scope]
    rate_per_minute: int | None = None
    max_concurrent: int | None = None


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    name: str
    prefix: str
    scopes: tuple[Scope, ...]
    rate_per_minute: int | None
    max_concurrent: int | None
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True)
class Tenant:
    name: str
    budget_cents: int | None
    weight: int
    webhook_url: str
    webhook_events: tuple[str, ...]
    webhook_secret: str


def check_tenant_name(name: str, field: str = "tenant") -> str:
    if not TENANT_NAME.fullmatch(name):
        raise InvalidArgument.one(
            field, "1..63 of a-z, 0-9, '-' and '_', starting with a letter or digit"
        )
    return name


def parse_scopes(values: Sequence[str], field: str = "scopes") -> tuple[Scope, ...]:
    scopes = []
    for value in values:
        if value not in Scope.__members__.values():
            raise InvalidArgument.one(field, f"{value!r} is not one of {[s.value for s in Scope]}")
        scopes.append(Scope(value))
    if not scopes:
        raise InvalidArgument.one(field, "give at least one scope")
    return tuple(dict.fromkeys(scopes))


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


_KEY_COLUMNS = (
    "id, tenant, name, prefix, scopes, rate_per_minute, max_concurrent, created_at,"
    " last_used_at, revoked_at"
)
_TENANT_COLUMNS = "name, budget_cents, weight, webhook_url, webhook_events, webhook_secret"


class KeyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._cache: dict[bytes, tuple[float, Caller | None]] = {}
        self._touched: dict[str, float] = {}
        self._tenants: dict[str, tuple[float, Tenant]] = {}

    # Tenants

    async def ensure_tenant(self, name: str) -> Tenant:
        check_tenant_name(name)
        async with self._pool.acquire() as conn:
            await conn.execute(
                "INSERT INTO tenants (name, webhook_secret) VALUES ($1, $2)"
                " ON CONFLICT (name) DO NOTHING",
                name,
                new_webhook_secret(),
            )
        return await self._read_tenant(name)

    async def tenant(self, name: str) -> Tenant:
        """The tenant (read once per CACHE_SECONDS: admission reads it for every job)."""
        now = time.monotonic()
        cached = self._tenants.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        tenant = await self._read_tenant(name)
        self._tenants[name] = (now + CACHE_SECONDS, tenant)
        return tenant

    async def _read_tenant(self, name: str) -> Tenant:
        row = await self._pool.fetchrow(
            f"SELECT {_TENANT_COLUMNS} FROM tenants WHERE name = $1", name
        )
        if row is None:
            raise NotFound(f"no tenant {name!r}")
        return _tenant(row)

    async def update_tenant(
        self,
        name: str,
        *,
        budget_cents: int | None = None,
        clear_budget: bool = False,
        weight: int | None = None,
        webhook_url: str | None = None,
        webhook_events: Sequence[str] | None = None,
        rotate_secret: bool = False,
    ) -> Tenant:
        current = await self.ensure_tenant(name)
        budget = (
            None
            if clear_budget
            else (budget_cents if budget_cents is not None else current.budget_cents)
        )
        await self._pool.execute(
            "UPDATE tenants SET budget_cents = $2, weight = $3, webhook_url = $4,"
            " webhook_events = $5, webhook_secret = $6 WHERE name = $1",
            name,
            budget,
            weight if weight is not None else current.weight,
            webhook_url if webhook_url is not None else current.webhook_url,
            list(webhook_events) if webhook_events is not None else list(current.webhook_events),
            new_webhook_secret() if rotate_secret else current.webhook_secret,
        )
        self._tenants.pop(name, None)
        return await self._read_tenant(name)

    # Keys

    async def create(
        self,
        tenant: str,
        scopes: Sequence[Scope],
        *,
        name: str = "",
        rate_per_minute: int | None = None,
        max_concurrent: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key of `tenant` (made if new): the record, and the key itself, which is not
        stored and cannot be shown again."""
        if rate_per_minute is not None and rate_per_minute <= 0:
            raise InvalidArgument.one("rate", "must be a positive number of requests a minute")
        if max_concurrent is not None and max_concurrent <= 0:
            raise InvalidArgument.one("concurrent", "must be a positive number of jobs")
        await self.ensure_tenant(tenant)
        secret = KEY_PREFIX + secrets.token_urlsafe(30)
        row = await self._pool.fetchrow(
            "INSERT INTO api_keys (id, tenant, name, key_sha256, prefix, scopes,"
            " rate_per_minute, max_concurrent) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
            f" RETURNING {_KEY_COLUMNS}",
            uuid.uuid4(),
            tenant,
            name,
            _digest(secret),
            secret[:12],
            [s.value for s in scopes],
            rate_per_minute,
            max_concurrent,
        )
        return _key(row), secret

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        rows = await self._pool.fetch(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE ($1::text IS NULL OR tenant = $1)"
            " ORDER BY tenant, created_at",
            tenant,
        )
        return [_key(r) for r in rows]

    async def revoke(self, key_id_or_prefix: str) -> ApiKey:
        """Revokes one key, named by its id or its listed prefix (which must be unambiguous)."""
        rows = await self._pool.fetch(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id::text = $1 OR prefix = $1",
            key_id_or_prefix,
        )
        if len(rows) != 1:
            problem = "no such key" if not rows else "the prefix names several keys: give the id"
            raise InvalidArgument.one("key", problem)
        row = await self._pool.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1"
            f" RETURNING {_KEY_COLUMNS}",
            rows[0]["id"],
        )
        self._cache.clear()
        return _key(row)

    async def authenticate(self, presented: str) -> Caller:
        """The caller a key stands for; Unauthenticated when it is malformed, unknown or
        revoked (one answer for all three)."""
        if not _KEY.fullmatch(presented):
            raise Unauthenticated("a valid API key is required")
        digest = _digest(presented)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is None or cached[0] < now:
            row = await self._pool.fetchrow(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_sha256 = $1", digest
            )
            caller = None
            if row is not None and row["revoked_at"] is None:
                key = _key(row)
                caller = Caller(
                    key.tenant,
                    key.id,
                    frozenset(key.scopes),
                    key.rate_per_minute,
                    key.max_concurrent,
                )
            if len(self._cache) > 10_000:
                self._cache.clear()
            cached = (now + CACHE_SECONDS, caller)
            self._cache[digest] = cached
        caller = cached[1]
        if caller is None:
            raise Unauthenticated("a valid API key is required")
        if self._touched.get(caller.key_id, 0.0) < now:
            self._touched[caller.key_id] = now + TOUCH_SECONDS
            await self._pool.execute(
                "UPDATE api_keys SET last_used_at = now() WHERE id = $1", uuid.UUID(caller.key_id)
            )
        return caller


def _key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=str(row["id"]),
        tenant=row["tenant"],
        name=row["name"],
        prefix=row["prefix"],
        scopes=tuple(Scope(s) for s in row["scopes"]),
        rate_per_minute=row["rate_per_minute"],
        max_concurrent=row["max_concurrent"],
        created_at=row["created_at"],
        last_used_at=row["last_used_at"],
        revoked_at=row["revoked_at"],
    )


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(
        name=row["name"],
        budget_cents=row["budget_cents"],
        weight=row["weight"],
        webhook_url=row["webhook_url"],
        webhook_events=tuple(row["webhook_events"]),
        webhook_secret=row["webhook_secret"],
    )
