"""The job queue: one Redis Stream read by a consumer group of generator workers.

The queue is a hint, not the record: Postgres says which jobs are queued and who runs what
(services/jobs). A queue entry only tells a worker where to look, so a lost entry is put back by
the reconciler (`missing` finds them) and a duplicate one is harmless. A worker that dies leaves
its entry pending; another worker reclaims it after `claim_idle_ms`. If Redis loses the consumer
group (FLUSHALL, a failover to an empty replica), every call recreates it at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

STREAM = "imagegen:queue"
DEAD_LETTERS = "imagegen:queue:dead"
# job id -> the id of its newest queue entry: lets the reconciler see which queued jobs Redis
# no longer holds.
INDEX = "imagegen:queue:index"
GROUP = "generators"

T = TypeVar("T")

# The entry and its index row in one step.
_ENQUEUE = (
    "local id = redis.call('XADD', KEYS[1], '*', 'job_id', ARGV[1])"
    " redis.call('HSET', KEYS[2], ARGV[1], id) return id"
)


@dataclass(frozen=True)
class Delivery:
    message_id: str
    job_id: str
    reclaimed: bool


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

    async def _grouped(self, call: Callable[[], Awaitable[T]]) -> T:
        """Runs a consumer-group command, recreating the group once if Redis lost it."""
        try:
            return await call()
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
        await self.ensure_group()
        return await call()

    async def enqueue(self, job_id: str) -> str:
        message_id: Any = await self._redis.eval(_ENQUEUE, 2, STREAM, INDEX, job_id)
        return str(message_id.decode())

    async def missing(self, job_ids: Sequence[str]) -> list[str]:
        """The jobs among `job_ids` that have no queue entry."""
        if not job_ids:
            return []
        found: Any = await self._redis.hmget(INDEX, list(job_ids))
        return [job_id for job_id, entry in zip(job_ids, found, strict=True) if entry is None]

    async def claim(self, consumer: str, block_ms: int) -> Delivery | None:
        """A reclaimed abandoned message first, else a new one (waiting up to `block_ms`)."""
        claimed: Any = await self._grouped(
            lambda: self._redis.xautoclaim(
                STREAM, GROUP, consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=1
            )
        )
        for message_id, fields in claimed[1]:
            if fields:  # a message deleted while pending comes back without fields
                return Delivery(message_id.decode(), fields[b"job_id"].decode(), True)
            await self._redis.xack(STREAM, GROUP, message_id)
        response: Any = await self._grouped(
            lambda: self._redis.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=1, block=block_ms)
        )
        for _, entries in response or ():
            for message_id, fields in entries:
                return Delivery(message_id.decode(), fields[b"job_id"].decode(), False)
        return None

    async def ack(self, delivery: Delivery) -> None:
        """Done with this entry; the index forgets the job if this was its newest entry."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xack(STREAM, GROUP, delivery.message_id)
            pipe.xdel(STREAM, delivery.message_id)
            await pipe.execute()
        await self._redis.eval(
            "if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then"
            " return redis.call('HDEL', KEYS[1], ARGV[1]) end return 0",
            1,
            INDEX,
            delivery.job_id,
            delivery.message_id,
        )

    async def dead_letter(self, job_id: str, reason: str) -> None:
        """Records a job that failed for good, for operators to look into."""
        await self._redis.xadd(
            DEAD_LETTERS, {b"job_id": job_id.encode(), b"reason": reason.encode()}, maxlen=100_000
        )

    async def backlog(self) -> int:
        """Messages not yet delivered plus those delivered and not acknowledged."""
        await self.ensure_group()
        groups: Any = await self._redis.xinfo_groups(STREAM)
        for group in groups:
            if group["name"].decode() == GROUP:
                return int(group.get("lag") or 0) + int(group["pending"])
        return 0
