"""Cancel requests reaching the worker that runs the job, within one denoising step.

The cancel itself is a transition in Postgres (JobLifecycle.cancel); this is how the worker hears
of it at once: one Redis pub/sub subscription per generator process sets the job's token, which
the render checks after every step. If the message is lost (Redis away), the worker's next lease
renewal finds the job no longer held and sets the same token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis

from services.jobs.lifecycle import CANCEL_CHANNEL

log = logging.getLogger("imagegen.cancels")


class CancelToken:
    """Set once: by a cancel, a lost lease, or the consumer giving up. Readable from the
    device thread (`is_set`) and awaitable in the event loop (`wait`)."""

    def __init__(self) -> None:
        self._thread_flag = threading.Event()
        self._loop_flag = asyncio.Event()

    def set(self) -> None:
        self._thread_flag.set()
        self._loop_flag.set()

    def is_set(self) -> bool:
        return self._thread_flag.is_set()

    @property
    def flag(self) -> threading.Event:
        return self._thread_flag

    async def wait(self) -> None:
        await self._loop_flag.wait()


class CancelListener:
    """The tokens of the jobs this process runs, set when a cancel for one is published."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._tokens: dict[str, CancelToken] = {}
        self.connected = asyncio.Event()

    @contextlib.contextmanager
    def track(self, job_id: str) -> Iterator[CancelToken]:
        token = self._tokens[job_id] = CancelToken()
        try:
            yield token
        finally:
            self._tokens.pop(job_id, None)

    def cancel(self, job_id: str) -> None:
        token = self._tokens.get(job_id)
        if token is not None:
            log.info("job %s: cancel received", job_id)
            token.set()

    async def run(self) -> None:
        """Listens until cancelled, subscribing again after any Redis blip."""
        delay = 0.1
        while True:
            try:
                async with self._redis.pubsub() as pubsub:
                    await pubsub.subscribe(CANCEL_CHANNEL)
                    self.connected.set()
                    delay = 0.1
                    while True:
                        message: Any = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None and message["type"] == "message":
                            self.cancel(message["data"].decode())
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - whatever broke it, subscribe again
                self.connected.clear()
                log.warning("cancel subscription lost (%s); subscribing again", error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
