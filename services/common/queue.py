"""The durable job queue: one Redis Stream read by a consumer group of generator workers.

A worker claims a message, keeps it fresh while it works (`touch`), and acknowledges it when the
job has ended. A message whose worker died stays pending and is reclaimed by another worker once
it has been idle for `claim_idle_ms`. Cancel requests are flags the worker checks at every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

STREAM = "imagegen:queue"
DEAD_LETTERS = "imagegen:queue:dead"
GROUP = "generators"


@dataclass(frozen=True)
class Delivery:
    message_id: str
    job_id: str
    reclaimed: bool


def _cancel_key(job_id: str) -> str:
    return f"imagegen:job:{job_id}:cancel"


class JobQueue:
    def __init__(self, redis: aioredis.Redis, claim_idle_ms: int = 60_000) -> None:
        self._redis = redis
        self.claim_idle_ms = claim_idle_ms

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def enqueue(self, job_id: str) -> str:
        message_id: Any = await self._redis.xadd(STREAM, {b"job_id": job_id.encode()})
        return str(message_id.decode())

    async def claim(self, consumer: str, block_ms: int) -> Delivery | None:
        """A reclaimed abandoned message first, else a new one (waiting up to `block_ms`)."""
        claimed: Any = await self._redis.xautoclaim(
            STREAM, GROUP, consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=1
        )
        reclaimed = claimed[1]
        for message_id, fields in reclaimed:
            if fields:  # a message deleted while pending comes back without fields
                return Delivery(message_id.decode(), fields[b"job_id"].decode(), True)
            await self._redis.xack(STREAM, GROUP, message_id)
        response: Any = await self._redis.xreadgroup(
            GROUP, consumer, {STREAM: ">"}, count=1, block=block_ms
        )
        for _, entries in response or ():
            for message_id, fields in entries:
                return Delivery(message_id.decode(), fields[b"job_id"].decode(), False)
        return None

    async def touch(self, consumer: str, delivery: Delivery) -> None:
        """Resets the message's idle time so no other worker reclaims a job still running."""
        await self._redis.xclaim(
            STREAM,
            GROUP,
            consumer,
            min_idle_time=0,
            message_ids=[delivery.message_id],
            justid=True,
        )

    async def ack(self, delivery: Delivery) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(STREAM, GROUP, delivery.message_id)
            pipe.xdel(STREAM, delivery.message_id)
            await pipe.execute()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self._redis.xadd(
            DEAD_LETTERS, {b"job_id": delivery.job_id.encode(), b"reason": reason.encode()}
        )
        await self.ack(delivery)

    async def backlog(self) -> int:
        """Messages not yet delivered plus those delivered and not acknowledged."""
        await self.ensure_group()
        groups: Any = await self._redis.xinfo_groups(STREAM)
        for group in groups:
            if group["name"].decode() == GROUP:
                return int(group.get("lag") or 0) + int(group["pending"])
        return 0

    async def request_cancel(self, job_id: str, ttl_seconds: int = 24 * 3600) -> None:
        await self._redis.set(_cancel_key(job_id), b"1", ex=ttl_seconds)

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self._redis.exists(_cancel_key(job_id)))
