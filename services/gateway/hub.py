"""Live job events for many watchers from one Redis reader per gateway process.

Each watcher replays what it missed from the job's stream, then takes live events from a queue
the hub fills: one blocking XREAD over every watched stream serves them all, so a thousand
watchers cost one Redis connection, not a thousand. Watchers drop ids they have already seen,
so the hand-over from replay to live has no gaps and no duplicates. The XREAD also reads a wake
stream of the hub's own: a newly watched job is added to it at once, not when the block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from imagegen.v1 import events_pb2

from services.common.events import EventLog, decode_entries, stream_key

log = logging.getLogger("imagegen.hub")

BLOCK_MS = 5_000
BATCH = 512


def _newer(event_id: str, than: str) -> bool:
    def key(i: str) -> tuple[int, int]:
        ms, _, seq = i.partition("-")
        return int(ms), int(seq or 0)

    return key(event_id) > key(than)


class EventHub:
    def __init__(self, redis: aioredis.Redis, events: EventLog) -> None:
        self._redis = redis
        self._events = events
        self._queues: dict[str, set[asyncio.Queue[events_pb2.JobEvent]]] = {}
        self._cursors: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake_key = f"imagegen:hub:{uuid.uuid4().hex}:wake"
        self._wake_cursor = "0-0"

    async def follow(
        self, job_id: str, after: str, idle_seconds: float
    ) -> AsyncIterator[events_pb2.JobEvent | None]:
        """Events after `after`: the stored ones, then live ones. Yields None after
        `idle_seconds` without an event, so the caller can check on the job."""
        queue: asyncio.Queue[events_pb2.JobEvent] = asyncio.Queue()
        await self._subscribe(job_id, queue)
        try:
            while True:  # replay, in batches, until caught up
                stored = await self._events.read(job_id, after, count=BATCH)
                for event in stored:
                    after = event.id
                    yield event
                if len(stored) < BATCH:
                    break
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), idle_seconds)
                except TimeoutError:
                    # Quiet: look at the stream itself before telling the caller.
                    missed = await self._events.read(job_id, after, count=BATCH)
                    for event in missed:
                        after = event.id
                        yield event
                    if not missed:
                        yield None
                    continue
                if _newer(event.id, after):
                    after = event.id
                    yield event
        finally:
            self._unsubscribe(job_id, queue)

    async def _subscribe(self, job_id: str, queue: asyncio.Queue[events_pb2.JobEvent]) -> None:
        first = job_id not in self._queues
        self._queues.setdefault(job_id, set()).add(queue)
        if first:
            # The shared read starts at the stream's newest event: older ones are replayed.
            # Until the cursor is set the loop leaves the job out.
            last: Any = await self._redis.xrevrange(stream_key(job_id), count=1)
            if job_id in self._queues:
                self._cursors[job_id] = last[0][0].decode() if last else "0-0"
                await self._wake()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._read_loop())

    async def _wake(self) -> None:
        """Ends the shared read's current block, so that it picks up the new job."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self._wake_key, {b"w": b""}, maxlen=1)
            pipe.expire(self._wake_key, 60)
            await pipe.execute()

    def _unsubscribe(self, job_id: str, queue: asyncio.Queue[events_pb2.JobEvent]) -> None:
        queues = self._queues.get(job_id)
        if queues is None:
            return
        queues.discard(queue)
        if not queues:
            del self._queues[job_id]
            self._cursors.pop(job_id, None)

    async def _read_loop(self) -> None:
        while self._queues:
            streams: dict[Any, Any] = {stream_key(j): c for j, c in self._cursors.items()}
            streams[self._wake_key] = self._wake_cursor
            try:
                response: Any = await self._redis.xread(streams, count=BATCH, block=BLOCK_MS)
            except Exception:  # Redis away: watchers wait, the loop retries
                log.exception("shared event read failed")
                await asyncio.sleep(0.5)
                continue
            wake = self._wake_key.encode()
            for key, entries in response or ():
                if key == wake:
                    self._wake_cursor = entries[-1][0].decode()
            jobs = [(key, entries) for key, entries in response or () if key != wake]
            for job_id, event in decode_entries(jobs):
                if job_id in self._cursors:
                    self._cursors[job_id] = event.id
                for queue in self._queues.get(job_id, ()):
                    queue.put_nowait(event)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.delete(self._wake_key)
