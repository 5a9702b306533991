"""When and how long to wait before trying a call again.

Only what may succeed later is retried: the network or the server being away (connection
refused or broken, a timeout, 502/503/504, UNAVAILABLE) and a limit that frees up with time
(429 / RESOURCE_EXHAUSTED with Retry-After or RetryInfo). Never another 4xx. The waits grow
exponentially with full jitter up to a cap; a server's Retry-After is the least wait.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from imagegen.errors import ImagegenError, QuotaExceeded, Unavailable, WaitTimeout

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries in all (the first included); waits of up to `initial_backoff` x
    `multiplier`^n seconds (jittered), at most `max_backoff`. A Retry-After longer than
    `max_retry_after` is not waited out: the error is raised."""

    attempts: int = 6
    initial_backoff: float = 0.2
    max_backoff: float = 8.0
    multiplier: float = 2.0
    max_retry_after: float = 60.0

    def delay(self, failures: int, error: BaseException) -> float | None:
        """Seconds to wait after the `failures`-th failure in a row; None: give up."""
        if failures >= self.attempts or not retryable(error):
            return None
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (failures - 1))
        wait = random.uniform(0, ceiling)
        asked = getattr(error, "retry_after", None)
        if asked is not None:
            if asked > self.max_retry_after:
                return None
            wait = asked + random.uniform(0, min(1.0, ceiling))
        return wait


NO_RETRY = RetryPolicy(attempts=1)


def retryable(error: BaseException) -> bool:
    if isinstance(error, WaitTimeout):
        return False
    if isinstance(error, Unavailable):
        return True
    # A rate or concurrency limit says when to come back; a spent budget does not.
    return isinstance(error, QuotaExceeded) and error.retry_after is not None


async def with_retries(policy: RetryPolicy, call: Callable[[], Awaitable[T]]) -> T:
    """`call()`, tried again as `policy` says while it raises a retryable ImagegenError."""
    failures = 0
    while True:
        try:
            return await call()
        except ImagegenError as error:
            failures += 1
            wait = policy.delay(failures, error)
            if wait is None:
                raise
        await asyncio.sleep(wait)
