"""Per-key rate limits: a token bucket in Redis, shared by every gateway replica.

A key allowed N requests a minute has a bucket of N tokens that refills at N/60 a second; each
limited request takes one. The bucket is one Redis hash updated by one script (Redis's clock, so
replicas with skewed clocks agree). When Redis is away the request is let through and the blip
logged: a limit is protection, not the record, and refusing every request while Redis restarts
would turn a blip into an outage.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis.asyncio as aioredis

from services.common.errors import QuotaExceeded
from services.common.retry import is_blip
from services.tenants.keys import Caller

log = logging.getLogger("imagegen.limits")

WINDOW_SECONDS = 60
_KEY = "imagegen:rate:{}"

# KEYS[1] the bucket; ARGV: capacity, refill per millisecond. Returns {allowed, tokens left
# (floored), milliseconds until one token is there}.
_TAKE = """
local capacity = tonumber(ARGV[1])
local per_ms = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * per_ms)
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / per_ms) + 1000)
local wait = 0
if tokens < 1 then wait = math.ceil((1 - tokens) / per_ms) end
return {allowed, math.floor(tokens), wait}
"""


class RateLimiter:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis

    async def take(self, caller: Caller) -> None:
        """Takes a token from the caller's bucket; QuotaExceeded (with when to retry) when it
        is empty. Keys without a rate limit are not counted."""
        rate = caller.rate_per_minute
        if rate is None:
            return
        try:
            result: Any = await self._redis.eval(
                _TAKE, 1, _KEY.format(caller.key_id), rate, rate / (WINDOW_SECONDS * 1000)
            )
        except Exception as error:
            if not is_blip(error):
                raise
            log.warning(
                "rate limit of key %s not checked: Redis is away (%s)", caller.key_id, error
            )
            return
        allowed, _, wait_ms = (int(v) for v in result)
        if not allowed:
            raise QuotaExceeded(
                f"key:{caller.key_id}/rate",
                f"rate limit of {rate} requests a minute reached; retry after the Retry-After"
                " header",
                retry_after_seconds=max(1, math.ceil(wait_ms / 1000)),
                limit=rate,
                window_seconds=WINDOW_SECONDS,
            )
