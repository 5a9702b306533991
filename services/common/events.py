"""A job's event stream in Redis: the one event schema (`imagegen.v1.JobEvent`), appended by
whoever changes the job and read by every watcher.

Each job has a Redis Stream; an event's id is its stream id, so a watcher resumes after the last
id it saw with no gaps and no duplicates. A `final` event ends the stream, which then expires.
"""

from __future__ import annotations

import re
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp
from imagegen.v1 import events_pb2

from services.common.errors import InvalidArgument

_FIELD = b"e"
_EVENT_ID = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
MAX_EVENT_ID_PART = 2**64 - 1  # Redis stream ids are two unsigned 64-bit integers


def stream_key(job_id: str) -> str:
    return f"imagegen:job:{job_id}:events"


def check_event_id(event_id: str, field: str) -> str:
    """'' means the start; anything else must be an id this service handed out."""
    if not event_id:
        return "0-0"
    # fullmatch and [0-9]: `$` would let a trailing newline through, `\d` any Unicode digit.
    match = _EVENT_ID.fullmatch(event_id)
    if match is None or any(int(part) > MAX_EVENT_ID_PART for part in match.groups()):
        raise InvalidArgument.one(field, "not an event id")
    return event_id


class EventLog:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: int, max_len: int = 10_000) -> None:
        self._redis = redis
        self._ttl = ttl_seconds
        self._max_len = max_len

    async def append(self, job_id: str, event: events_pb2.JobEvent) -> str:
        """Appends `event` and returns its id; a final event starts the stream's expiry."""
        event.job_id = job_id
        if not event.HasField("time"):
            now = Timestamp()
            now.GetCurrentTime()
            event.time.CopyFrom(now)
        key = stream_key(job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.xadd(key, {_FIELD: event.SerializeToString()}, maxlen=self._max_len)
            pipe.expire(key, self._ttl)
            added, _ = await pipe.execute()
        event_id = str(added.decode())
        event.id = event_id
        return event_id

    async def ends_with_final(self, job_id: str) -> bool:
        """Whether the job's stream holds its final event (always its last)."""
        response: Any = await self._redis.xrevrange(stream_key(job_id), count=1)
        return any(
            events_pb2.JobEvent.FromString(fields[_FIELD]).HasField("final")
            for _, fields in response or ()
        )

    async def read(self, job_id: str, after: str, count: int = 256) -> list[events_pb2.JobEvent]:
        """Stored events after `after` (live ones come through the gateway's EventHub)."""
        response: Any = await self._redis.xread({stream_key(job_id): after}, count=count)
        return [event for _, event in decode_entries(response)]


def decode_entries(response: Any) -> list[tuple[str, events_pb2.JobEvent]]:
    """(job id, event) pairs of an XREAD response, ids filled in from the stream."""
    decoded = []
    for key, entries in response or ():
        job_id = key.decode().split(":")[2]
        for entry_id, fields in entries:
            event = events_pb2.JobEvent.FromString(fields[_FIELD])
            event.id = entry_id.decode()
            decoded.append((job_id, event))
    return decoded
