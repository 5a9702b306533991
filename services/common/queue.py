"""The job queue: tenants served in weighted round-robin, each tenant's jobs by priority lane.

Fairness: every tenant with waiting jobs has a place in a ring. A claim gives the tenant at the
head of the ring its next job (its "high" lane before "normal" before "low", first in first out
within a lane); once it has had `weight` claims in a row (1 unless it was given more) its turn is
over and the next claim moves it to the back. A tenant that had nothing waiting joins at the back.
So a tenant's job waits for at most `weight` claims of each tenant ahead of it: behind a single
tenant of weight 1, however many jobs that one has queued, it waits only for a worker to finish
the job in hand, one render time. Lanes order a tenant's own jobs; they buy no larger share.

The queue is a hint, not the record: Postgres says which jobs are queued and who runs what
(services/jobs). An entry only tells a worker where to look, so a lost entry is put back by the
reconciler (`missing` finds them) and a duplicate one is harmless. A worker claims an entry, runs
its job and acks it; a worker that dies leaves its entry claimed, and another worker reclaims it
once it has been held for `claim_idle_ms`. An ack forgets the job only if the entry was the job's
newest, so a job queued again while its older entry was being run is not lost. Every step that
touches more than one key is one Lua script (atomic in Redis), timed by Redis's clock.

Keys (one Redis, not a cluster: the scripts name per-tenant lane lists themselves):
  imagegen:fq:lane:<tenant>:<lane>  list of entry tokens waiting, oldest first
  imagegen:fq:ring / :ringed        the tenants with waiting entries, in turn order / as a set
  imagegen:fq:weights / :turns      tenant -> its share / claims taken in its current turn
  imagegen:fq:entries               token -> the entry (JSON: job, tenant, lane, at: enqueued, in
                                    ms by Redis's clock), waiting or claimed
  imagegen:fq:claimed               sorted set: token -> when it was (re)claimed, in ms
  imagegen:fq:index                 job id -> its newest entry's token (`missing`, the ack rule)
  imagegen:fq:consumers             consumer -> when it last asked for work, in ms
  imagegen:fq:wake                  a short list pushed on every enqueue; idle claims block on it
A later layout takes new key names, as this one did: entries an older version left under other
names are simply missing to the reconciler, which queues their jobs again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.jobs.records import Priority

PREFIX = "imagegen:fq:"
LANES = PREFIX + "lane:"
RING = PREFIX + "ring"
RINGED = PREFIX + "ringed"
WEIGHTS = PREFIX + "weights"
TURNS = PREFIX + "turns"
ENTRIES = PREFIX + "entries"
CLAIMED = PREFIX + "claimed"
INDEX = PREFIX + "index"
CONSUMERS = PREFIX + "consumers"
WAKE = PREFIX + "wake"
DEAD_LETTERS = "imagegen:queue:dead"
MAX_WEIGHT = 100
WAKE_LENGTH = 64

_NOW_MS = (
    "local clock = redis.call('TIME')"
    " local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)\n"
)

# KEYS: entries, index, ring, ringed, weights, wake.
# ARGV: lane prefix, token, job, tenant, lane, weight ('' keeps the stored one), wake length.
_ENQUEUE = (
    _NOW_MS
    + """
local token, tenant = ARGV[2], ARGV[4]
local entry = {job = ARGV[3], tenant = tenant, lane = ARGV[5], at = now}
redis.call('HSET', KEYS[1], token, cjson.encode(entry))
redis.call('HSET', KEYS[2], ARGV[3], token)
redis.call('RPUSH', ARGV[1] .. tenant .. ':' .. ARGV[5], token)
if ARGV[6] ~= '' then redis.call('HSET', KEYS[5], tenant, ARGV[6]) end
if redis.call('SADD', KEYS[4], tenant) == 1 then redis.call('RPUSH', KEYS[3], tenant) end
redis.call('LPUSH', KEYS[6], 1)
redis.call('LTRIM', KEYS[6], 0, ARGV[7] - 1)
"""
)

# KEYS: entries, claimed, consumers, ring, ringed, weights, turns.
# ARGV: lane prefix, consumer, claim_idle_ms. Returns {token, entry, reclaimed} or nil.
_CLAIM = (
    _NOW_MS
    + """
redis.call('HSET', KEYS[3], ARGV[2], now)
while true do  -- an entry held past claim_idle_ms first, stamped again for its new holder
  local held = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ARGV[3], 'LIMIT', 0, 1)[1]
  if not held then break end
  local entry = redis.call('HGET', KEYS[1], held)
  if entry then
    redis.call('ZADD', KEYS[2], now, held)
    return {held, entry, 1}
  end
  redis.call('ZREM', KEYS[2], held)  -- its entry was deleted by hand or evicted
end
local lanes = {'high', 'normal', 'low'}
local function leave(tenant)  -- the head of the ring has nothing left waiting
  redis.call('LPOP', KEYS[4])
  redis.call('SREM', KEYS[5], tenant)
  redis.call('HDEL', KEYS[7], tenant)
end
for _ = 1, 2 * redis.call('LLEN', KEYS[4]) do  -- each tenant passes at most once, then leaves
  local tenant = redis.call('LINDEX', KEYS[4], 0)
  if not tenant then break end  -- every tenant left: nothing is waiting
  local weight = tonumber(redis.call('HGET', KEYS[6], tenant) or 1)
  if tonumber(redis.call('HGET', KEYS[7], tenant) or 0) >= weight then
    redis.call('RPUSH', KEYS[4], redis.call('LPOP', KEYS[4]))  -- turn over: to the back
    redis.call('HDEL', KEYS[7], tenant)
  else
    local left = 0
    for _, lane in ipairs(lanes) do
      local key = ARGV[1] .. tenant .. ':' .. lane
      local token = redis.call('LPOP', key)
      while token do
        local entry = redis.call('HGET', KEYS[1], token)
        if entry then
          redis.call('HINCRBY', KEYS[7], tenant, 1)
          for _, later in ipairs(lanes) do
            left = left + redis.call('LLEN', ARGV[1] .. tenant .. ':' .. later)
          end
          if left == 0 then leave(tenant) end
          redis.call('ZADD', KEYS[2], now, token)
          return {token, entry, 0}
        end
        token = redis.call('LPOP', key)
      end
    end
    leave(tenant)
  end
end
return nil
"""
)

# KEYS: entries, claimed, index. ARGV: token, job.
_ACK = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[3], ARGV[2]) end
"""

# KEYS: entries, claimed, index. ARGV: lane prefix, job.
_DISCARD = """
local token = redis.call('HGET', KEYS[3], ARGV[2])
if not token then return 0 end
local entry = redis.call('HGET', KEYS[1], token)
if entry then
  local fields = cjson.decode(entry)
  redis.call('LREM', ARGV[1] .. fields.tenant .. ':' .. fields.lane, 1, token)
end
redis.call('HDEL', KEYS[1], token)
redis.call('ZREM', KEYS[2], token)
return redis.call('HDEL', KEYS[3], ARGV[2])
"""

# KEYS: ringed, claimed. ARGV: lane prefix. Returns {claimed, tenant, waiting, tenant, ...}.
_COUNTS = """
local counts = {redis.call('ZCARD', KEYS[2])}
for _, tenant in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local waiting = 0
  for _, lane in ipairs({'high', 'normal', 'low'}) do
    waiting = waiting + redis.call('LLEN', ARGV[1] .. tenant .. ':' .. lane)
  end
  table.insert(counts, tenant)
  table.insert(counts, waiting)
end
return counts
"""

# KEYS: ringed, entries. ARGV: lane prefix. Returns {now, lane, waiting, oldest, lane, ...}:
# per lane, the entries waiting and when the oldest head of a tenant's lane was enqueued (ms;
# -1 when none waits or the entries predate the `at` field).
_LANES = (
    _NOW_MS
    + """
local result = {now}
for _, lane in ipairs({'high', 'normal', 'low'}) do
  local waiting, oldest = 0, -1
  for _, tenant in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local key = ARGV[1] .. tenant .. ':' .. lane
    waiting = waiting + redis.call('LLEN', key)
    local head = redis.call('LINDEX', key, 0)
    local entry = head and redis.call('HGET', KEYS[2], head)
    if entry then
      local at = cjson.decode(entry).at
      if at and (oldest < 0 or at < oldest) then oldest = at end
    end
  end
  table.insert(result, lane)
  table.insert(result, waiting)
  table.insert(result, oldest)
end
return result
"""
)

# KEYS: consumers. ARGV: idle ms. Returns the consumers forgotten.
_FORGET = (
    _NOW_MS
    + """
local seen, gone = redis.call('HGETALL', KEYS[1]), {}
for i = 1, #seen, 2 do
  if tonumber(seen[i + 1]) <= now - ARGV[1] then
    redis.call('HDEL', KEYS[1], seen[i])
    table.insert(gone, seen[i])
  end
end
return gone
"""
)


@dataclass(frozen=True)
class Delivery:
    message_id: str  # the entry's token, unique per enqueue
    job_id: str
    reclaimed: bool
    tenant: str
    priority: Priority


class JobQueue:
    def __init__(self, redis: aioredis.Redis, claim_idle_ms: int = 60_000) -> None:
        self._redis = redis
        self.claim_idle_ms = claim_idle_ms

    async def enqueue(
        self,
        job_id: str,
        tenant: str,
        priority: Priority = Priority.NORMAL,
        weight: int | None = None,
    ) -> str:
        """Adds an entry for the job to its tenant's lane and returns its token. `weight` (the
        tenant's share, 1 to 100; out of range is brought within) replaces the stored one;
        None keeps it (1 for a tenant never given one)."""
        token = uuid.uuid4().hex
        share = "" if weight is None else str(min(max(weight, 1), MAX_WEIGHT))
        keys = (ENTRIES, INDEX, RING, RINGED, WEIGHTS, WAKE)
        args = (LANES, token, job_id, tenant, priority.value, share, WAKE_LENGTH)
        await self._redis.eval(_ENQUEUE, len(keys), *keys, *args)
        return token

    async def claim(self, consumer: str, block_ms: int) -> Delivery | None:
        """An entry held past `claim_idle_ms` by a worker that stopped (reclaimed) first, else
        the next one in the fair order, waiting up to `block_ms` for one to be enqueued."""
        deadline = time.monotonic() + block_ms / 1000
        while True:
            keys = (ENTRIES, CLAIMED, CONSUMERS, RING, RINGED, WEIGHTS, TURNS)
            args = (LANES, consumer, self.claim_idle_ms)
            found: Any = await self._redis.eval(_CLAIM, len(keys), *keys, *args)
            if found:
                token, entry, reclaimed = found
                fields = json.loads(entry)
                return Delivery(
                    _text(token),
                    fields["job"],
                    bool(reclaimed),
                    fields["tenant"],
                    Priority(fields["lane"]),
                )
            # Every enqueue pushes to WAKE; a push left over from earlier only costs a round.
            remaining = deadline - time.monotonic()
            if remaining < 0.001:  # BLPOP's timeout 0 would wait forever
                return None
            await self._redis.blpop([WAKE], timeout=remaining)

    async def ack(self, delivery: Delivery) -> None:
        """Done with this entry; the index forgets the job if this was its newest entry."""
        keys = (ENTRIES, CLAIMED, INDEX)
        await self._redis.eval(_ACK, len(keys), *keys, delivery.message_id, delivery.job_id)

    async def discard(self, job_id: str) -> bool:
        """Drops the job's newest entry, waiting or claimed, as a Redis that lost it would (the
        reconciler queues the job again); False when it had none."""
        keys = (ENTRIES, CLAIMED, INDEX)
        dropped: Any = await self._redis.eval(_DISCARD, len(keys), *keys, LANES, job_id)
        return bool(dropped)

    async def missing(self, job_ids: Sequence[str]) -> list[str]:
        """The jobs among `job_ids` that have no queue entry."""
        if not job_ids:
            return []
        found: Any = await self._redis.hmget(INDEX, list(job_ids))
        return [job_id for job_id, entry in zip(job_ids, found, strict=True) if entry is None]

    async def dead_letter(self, job_id: str, reason: str) -> None:
        """Records a job that failed for good, for operators to look into."""
        await self._redis.xadd(
            DEAD_LETTERS, {b"job_id": job_id.encode(), b"reason": reason.encode()}, maxlen=100_000
        )

    async def backlog(self) -> int:
        """Entries waiting plus entries claimed and not acked."""
        claimed, waiting = await self._counts()
        return claimed + sum(waiting.values())

    async def waiting_by_tenant(self) -> dict[str, int]:
        """How many entries wait, by tenant (tenants with none are left out)."""
        _, waiting = await self._counts()
        return waiting

    async def depth(self) -> tuple[int, dict[str, int]]:
        """(entries claimed and not acked, entries waiting by tenant), read at one moment."""
        return await self._counts()

    async def lanes(self) -> dict[Priority, tuple[int, float]]:
        """Per priority lane, over every tenant: (entries waiting, age in seconds of the oldest
        one, 0 when none waits). One script: O(tenants waiting), cheap enough to poll."""
        found: Any = await self._redis.eval(_LANES, 2, RINGED, ENTRIES, LANES)
        now = int(found[0])
        rows = zip(found[1::3], found[2::3], found[3::3], strict=True)
        return {
            Priority(_text(lane)): (int(n), max(now - int(at), 0) / 1000 if int(at) >= 0 else 0.0)
            for lane, n, at in rows
        }

    async def forget_consumers(self, idle_seconds: float) -> list[str]:
        """Forgets the consumers that have not asked for work in `idle_seconds`, and names them.
        Entries one of them still holds stay claimed, to be reclaimed as any other."""
        gone: Any = await self._redis.eval(_FORGET, 1, CONSUMERS, int(idle_seconds * 1000))
        return sorted(_text(consumer) for consumer in gone)

    async def _counts(self) -> tuple[int, dict[str, int]]:
        counts: Any = await self._redis.eval(_COUNTS, 2, RINGED, CLAIMED, LANES)
        pairs = zip(counts[1::2], counts[2::2], strict=True)
        return int(counts[0]), {_text(tenant): int(n) for tenant, n in pairs if n}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
