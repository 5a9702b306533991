"""What counts as a store blip, and retrying through one.

A blip (Postgres or Redis restarting, a dropped connection, a timeout) is never a reason to give
up on a job or to let a worker die: the operation is tried again with backoff. Anything else is a
real error and is raised at once.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import redis.exceptions

from services.common.errors import Unavailable

log = logging.getLogger("imagegen.retry")

T = TypeVar("T")


class StoreUnavailable(Unavailable):
    """Postgres or Redis cannot be reached (the domain's form of a blip)."""


STORE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08: the connection broke
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutting down, starting up
    asyncpg.exceptions.InterfaceError,  # a pool or connection closed under the call
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    StoreUnavailable,
)


def is_blip(error: BaseException) -> bool:
    if isinstance(error, redis.exceptions.ResponseError):
        # Redis answering while it loads its data, or a replica that cannot serve yet.
        return str(error).startswith(("LOADING", "MASTERDOWN", "TRYAGAIN"))
    return isinstance(error, STORE_ERRORS)


async def through_blips(
    operation: Callable[[], Awaitable[T]],
    what: str,
    *,
    give_up_after: float = 120.0,
    first_delay: float = 0.05,
    max_delay: float = 2.0,
) -> T:
    """Runs `operation` until it succeeds or fails for a reason that is not a blip; blips are
    retried with jittered exponential backoff for up to `give_up_after` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    delay = first_delay
    while True:
        try:
            return await operation()
        except Exception as error:
            if not is_blip(error) or loop.time() + delay > deadline:
                raise
            log.warning("%s: %s: %s; trying again", what, type(error).__name__, error)
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, max_delay)
