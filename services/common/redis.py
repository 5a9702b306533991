"""The Redis client every service uses (bytes in, bytes out)."""

from __future__ import annotations

import redis.asyncio as aioredis

# Reads wait longer than the longest blocking command (a WatchJob poll blocks for 5 s); the
# client's default of 5 s would abort those reads with a TimeoutError.
SOCKET_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0


def connect_redis(url: str) -> aioredis.Redis:
    if not url:
        raise RuntimeError("REDIS_URL is not set (make run sets it for the embedded mode)")
    return aioredis.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
    )
