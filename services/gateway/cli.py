"""The gateway's operator commands: `python -m services.gateway keys|tenants|cleanup ...`.

Run from the project folder they use the stores of a running `make run` (its embedded Postgres
and Redis under DATA_DIR, default .data) with no setup; elsewhere they use DATABASE_URL and
REDIS_URL, as the services do.

    keys create --tenant NAME [--name TEXT] [--scopes generate,read,admin] [--rate N]
                [--concurrent N] [--budget CENTS]      prints the new key as its last line
    keys list [--tenant NAME]
    keys revoke ID_OR_PREFIX
    tenants set NAME [--budget CENTS|none] [--weight N] [--webhook-url URL]
                [--webhook-events job.completed,...] [--rotate-secret]
    tenants show NAME                                  with the webhook signing secret
    cleanup                                            one retention pass, and what it removed
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.common import db
from services.common.embedded import start_postgres, start_redis
from services.common.errors import ServiceError
from services.common.events import EventLog
from services.common.objectstore import open_store
from services.common.queue import JobQueue
from services.common.settings import GatewaySettings
from services.gateway.outbound import check_webhook_url
from services.gateway.retention import Retention, clean
from services.jobs.lifecycle import JobLifecycle
from services.jobs.records import WEBHOOK_EVENTS
from services.tenants.keys import ALL_SCOPES, ApiKey, KeyStore, Tenant, parse_scopes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.gateway")
    commands = parser.add_subparsers(dest="command", required=True)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="make a key; it is printed once, as the last line")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name", default="")
    create.add_argument(
        "--scopes",
        default="generate,read",
        help=f"comma-separated, of {[s.value for s in ALL_SCOPES]}",
    )
    create.add_argument(
        "--rate", type=int, help="requests a minute that create work (token bucket)"
    )
    create.add_argument("--concurrent", type=int, help="jobs queued or running at once")
    create.add_argument("--budget", type=int, help="the tenant's spending cap, in cents")
    listing = keys.add_parser("list", help="keys (never the keys themselves)")
    listing.add_argument("--tenant")
    revoke = keys.add_parser("revoke", help="revoke a key by id or listed prefix")
    revoke.add_argument("key")

    tenants = commands.add_parser("tenants", help="tenants").add_subparsers(
        dest="action", required=True
    )
    update = tenants.add_parser("set", help="make or change a tenant")
    update.add_argument("name")
    update.add_argument("--budget", help="cents, or 'none' for no cap")
    update.add_argument("--weight", type=int, help="share of the generators, 1..100")
    update.add_argument("--webhook-url", help="the default webhook of the tenant's jobs ('' none)")
    update.add_argument("--webhook-events", help=f"comma-separated, of {list(WEBHOOK_EVENTS)}")
    update.add_argument("--rotate-secret", action="store_true", help="a new webhook secret")
    show = tenants.add_parser("show", help="a tenant, with its webhook secret")
    show.add_argument("name")

    commands.add_parser("cleanup", help="remove what is past its retention, once")
    return parser


@contextlib.asynccontextmanager
async def _pool(settings: GatewaySettings) -> AsyncIterator[asyncpg.Pool]:
    """DATABASE_URL's pool, else the embedded Postgres of DATA_DIR (joined if `make run` has it
    running, started for the command otherwise)."""
    embedded = None
    url = settings.database_url
    if not url:
        url, embedded = await asyncio.to_thread(start_postgres, settings.data_dir / "postgres")
    pool = await db.connect(url)
    try:
        yield pool
    finally:
        await pool.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.cleanup)


@contextlib.asynccontextmanager
async def _redis(settings: GatewaySettings) -> AsyncIterator[aioredis.Redis]:
    """REDIS_URL's Redis, else the embedded one of DATA_DIR (the running one when it answers)."""
    process = None
    url = settings.redis_url
    if not url:
        socket = (settings.data_dir / "redis" / "redis.sock").resolve()
        url = f"unix://{socket}"
        if not await _answers(url):
            url, process = await asyncio.to_thread(start_redis, settings.data_dir / "redis")
    client = aioredis.from_url(url)
    try:
        yield client
    finally:
        await client.aclose()
        if process is not None:
            process.terminate()
            await asyncio.to_thread(process.wait, 10)


async def _answers(url: str) -> bool:
    client = aioredis.from_url(url)
    try:
        return bool(await client.ping())
    except (OSError, RedisConnectionError):
        return False
    finally:
        await client.aclose()


def _key_line(key: ApiKey) -> str:
    limits = []
    if key.rate_per_minute:
        limits.append(f"rate={key.rate_per_minute}/min")
    if key.max_concurrent:
        limits.append(f"concurrent={key.max_concurrent}")
    used = key.last_used_at.isoformat(timespec="seconds") if key.last_used_at else "never"
    state = "revoked" if key.revoked_at else "active"
    return (
        f"{key.id}  {key.prefix}…  tenant={key.tenant}  name={key.name or '-'}"
        f"  scopes={','.join(key.scopes)}  {' '.join(limits) or 'no limits'}"
        f"  created={key.created_at.isoformat(timespec='seconds')}  last_used={used}  {state}"
    )


def _tenant_lines(tenant: Tenant) -> list[str]:
    budget = "none" if tenant.budget_cents is None else f"{tenant.budget_cents} cents"
    return [
        f"tenant: {tenant.name}",
        f"budget: {budget}",
        f"weight: {tenant.weight}",
        f"webhook_url: {tenant.webhook_url or '-'}",
        f"webhook_events: {','.join(tenant.webhook_events) or ','.join(WEBHOOK_EVENTS)}",
        f"webhook_secret: {tenant.webhook_secret}",
    ]


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


async def _run(args: argparse.Namespace, settings: GatewaySettings) -> list[str]:
    """The command's output lines."""
    if args.command == "cleanup":
        async with _pool(settings) as pool, _redis(settings) as redis:
            lifecycle = JobLifecycle(pool, redis, EventLog(redis, 3600), JobQueue(redis))
            retention = Retention.from_settings(settings)
            report = await clean(lifecycle, pool, redis, open_store(settings), retention)
            return [report.summary()]
    async with _pool(settings) as pool:
        keys = KeyStore(pool)
        if args.command == "keys" and args.action == "create":
            scopes = parse_scopes(_split(args.scopes))
            if args.budget is not None:
                await keys.update_tenant(args.tenant, budget_cents=args.budget)
            key, secret = await keys.create(
                args.tenant,
                scopes,
                name=args.name,
                rate_per_minute=args.rate,
                max_concurrent=args.concurrent,
            )
            return [_key_line(key), "the key (shown once; store it now):", secret]
        if args.command == "keys" and args.action == "list":
            return [_key_line(k) for k in await keys.list(args.tenant)] or ["no keys"]
        if args.command == "keys" and args.action == "revoke":
            return [f"revoked: {_key_line(await keys.revoke(args.key))}"]
        if args.command == "tenants" and args.action == "set":
            events = _split(args.webhook_events) if args.webhook_events is not None else None
            unknown = [e for e in events or () if e not in WEBHOOK_EVENTS]
            if unknown:
                raise SystemExit(f"unknown webhook events {unknown}: use {list(WEBHOOK_EVENTS)}")
            if args.webhook_url:
                check_webhook_url(args.webhook_url, settings.webhook_allow_private, "webhook-url")
            budget: dict[str, Any] = {}
            if args.budget is not None:
                clear = args.budget.lower() == "none"
                budget = {"clear_budget": True} if clear else {"budget_cents": int(args.budget)}
            tenant = await keys.update_tenant(
                args.name,
                weight=args.weight,
                webhook_url=args.webhook_url,
                webhook_events=events,
                rotate_secret=args.rotate_secret,
                **budget,
            )
            return _tenant_lines(tenant)
        return _tenant_lines(await keys.tenant(args.name))


def main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    settings = GatewaySettings()
    try:
        lines = asyncio.run(_run(args, settings))
    except ServiceError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


async def ensure_dev_key(database_url: str, path: Path) -> str:
    """The embedded default's admin key: the one in `path` while it still works, else a new
    key of tenant `local` with every scope, written to `path` (mode 0600)."""
    kept = await asyncio.to_thread(_read_key, path)
    pool = await db.connect(database_url)
    try:
        keys = KeyStore(pool)
        if kept:
            with contextlib.suppress(ServiceError):
                await keys.authenticate(kept)
                return kept
        _, secret = await keys.create("local", ALL_SCOPES, name="make run (dev.key)")
    finally:
        await pool.close()
    await asyncio.to_thread(_write_key, path, secret)
    return secret


def _read_key(path: Path) -> str:
    return path.read_text().strip() if path.exists() else ""


def _write_key(path: Path, key: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    tmp.touch(mode=0o600)
    tmp.write_text(key + "\n")
    tmp.replace(path)
