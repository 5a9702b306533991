"""The Redis client every service uses (bytes in, bytes out).

The pool is bounded and blocking: under a burst, a command waits for a free connection instead of
failing with "Too many connections"."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

# Reads wait longer than the longest blocking command (a WatchJob poll blocks for 5 s); the
# client's default of 5 s would abort those reads with a TimeoutError.
SOCKET_TIMEOUT_SECONDS = 30.0
CONNECT_TIMEOUT_SECONDS = 5.0
MAX_CONNECTIONS = 64
POOL_WAIT_SECONDS = 20.0


def connect_redis(url: str) -> aioredis.Redis:
    if not url:
        raise RuntimeError("REDIS_URL is not set (make run sets it for the embedded mode)")
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=POOL_WAIT_SECONDS,
        decode_responses=False,
        health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT_SECONDS,
        socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
        # A connection the server closed (a restart) is replaced and the command sent again;
        # a server that stays away fails fast, and the caller decides what that means.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=3),
        retry_on_error=[ConnectionError, TimeoutError],
    )
    return aioredis.Redis.from_pool(pool)
