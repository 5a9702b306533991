"""The Redis client every service uses (bytes in, bytes out)."""

from __future__ import annotations

import redis.asyncio as aioredis


def connect_redis(url: str) -> aioredis.Redis:
    if not url:
        raise RuntimeError("REDIS_URL is not set (make run sets it for the embedded mode)")
    return aioredis.from_url(url, decode_responses=False, health_check_interval=30)
