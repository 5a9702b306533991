"""Health that tells the truth: a service reports SERVING only while what it needs answers.

A monitor runs the service's checks every second (each with a short timeout) and sets the gRPC
health status of every service the server serves: NOT_SERVING while a store is unreachable or
no worker is alive, SERVING again once they are back. Probes (Kubernetes, Envoy) then take the
replica out of rotation instead of sending it work it cannot do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import asyncpg
import redis.asyncio as aioredis

from services.common.server import RunningServer

log = logging.getLogger("imagegen.health")

Check = Callable[[], Awaitable[bool]]
CHECK_TIMEOUT_SECONDS = 2.0


def postgres_check(pool: asyncpg.Pool) -> Check:
    async def check() -> bool:
        return bool(await pool.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_SECONDS))

    return check


def redis_check(redis: aioredis.Redis) -> Check:
    async def check() -> bool:
        return bool(await redis.ping())

    return check


async def monitor(server: RunningServer, checks: dict[str, Check], interval: float = 1.0) -> None:
    """Runs until cancelled, keeping the server's health status in step with `checks`."""
    failing: set[str] | None = None  # unknown: the first round sets the status either way
    while True:
        now_failing = set()
        for name, check in checks.items():
            try:
                ok = await asyncio.wait_for(check(), CHECK_TIMEOUT_SECONDS)
            except Exception:  # noqa: BLE001 - any failure of a check means not serving
                ok = False
            if not ok:
                now_failing.add(name)
        if now_failing != failing:
            if now_failing:
                log.warning("NOT_SERVING: %s failing", ", ".join(sorted(now_failing)))
            else:
                log.info("SERVING: every check passes again")
            failing = now_failing
            await server.set_serving(not failing)
        await asyncio.sleep(interval)
