"""The reconciler: repairs from Postgres whatever Redis lost or a dead worker left behind.

Every generator runs it; every repair is a guarded transition or a harmless duplicate queue
entry, so any number of them may run at once. Each round:
- queues again the running jobs whose worker's lease ran out (the worker died, or lost its
  stores for longer than the lease): the next attempt resumes where that one stopped;
- queues again the queued jobs that have no queue entry (Redis restarted without its data, was
  flushed, failed over to an empty replica, or was away when the job was admitted);
- writes the final event of jobs that ended while Redis was away;
- forgets idempotency keys past their lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from services.common.queue import JobQueue
from services.common.retry import is_blip
from services.jobs.lifecycle import JobLifecycle

log = logging.getLogger("imagegen.reconciler")


@dataclass(frozen=True)
class Repairs:
    leases_expired: int
    requeued: int
    announced: int = 0


async def reconcile_once(
    lifecycle: JobLifecycle, queue: JobQueue, queued_grace_seconds: float
) -> Repairs:
    expired = await lifecycle.expire_leases()
    # Jobs just admitted or requeued get their entry from whoever changed them; only those
    # queued for longer than the grace are checked.
    requeued = await lifecycle.repair_queue(queued_grace_seconds)
    announced = await lifecycle.announce_missing_finals()
    await lifecycle.forget_expired_keys()
    return Repairs(len(expired), len(requeued), len(announced))


async def reconcile_forever(
    lifecycle: JobLifecycle,
    queue: JobQueue,
    stop: asyncio.Event,
    interval_seconds: float,
    queued_grace_seconds: float,
) -> None:
    while not stop.is_set():
        try:
            repairs = await reconcile_once(lifecycle, queue, queued_grace_seconds)
            if repairs.leases_expired or repairs.requeued or repairs.announced:
                log.warning("repaired: %s", repairs)
        except Exception as error:  # the next round tries again
            if is_blip(error):
                log.warning("reconcile: stores away (%s)", error)
            else:
                log.exception("reconcile failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_seconds)
