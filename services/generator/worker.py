"""Queue workers: claim a job from the Redis Stream, render it, store and score the images,
record the result in the cache, and end the job, appending events all the way.

A failure puts the job back on the queue until `max_attempts`, then fails it and dead-letters
the message. A worker that dies mid-job leaves its message pending; another worker reclaims it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import replace

from imagegen.v1 import events_pb2, types_pb2

from services.cache.client import CacheClient
from services.common.convert import artifact_to_pb
from services.common.errors import InvalidArgument, NotFound
from services.common.events import EventLog
from services.common.jobstore import (
    CANCELLED,
    COMPLETED,
    FAILED,
    ArtifactRecord,
    JobRecord,
    JobStore,
)
from services.common.objectstore import ObjectStore
from services.common.queue import Delivery, JobQueue
from services.evaluator.client import EvaluatorClient
from services.generator.engine import Engine, Step, progress_event, save_image
from services.generator.pipeline import StepCancelled

log = logging.getLogger("imagegen.worker")

CANCEL_POLL_SECONDS = 0.1
PROGRESS_DB_INTERVAL_SECONDS = 0.5


class QueueWorker:
    def __init__(
        self,
        engine: Engine,
        store: JobStore,
        events: EventLog,
        queue: JobQueue,
        objects: ObjectStore,
        evaluator: EvaluatorClient,
        cache: CacheClient,
        consumer: str,
        max_attempts: int,
    ) -> None:
        self._engine = engine
        self._store = store
        self._events = events
        self._queue = queue
        self._objects = objects
        self._evaluator = evaluator
        self._cache = cache
        self.consumer = consumer
        self._max_attempts = max_attempts

    async def run(self, stop: asyncio.Event) -> None:
        """Claims and processes jobs until `stop` is set (finishing the job in hand)."""
        await self._queue.ensure_group()
        while not stop.is_set():
            try:
                delivery = await self._queue.claim(self.consumer, block_ms=1000)
            except Exception:  # Redis away: wait and try again
                log.exception("claim failed")
                await asyncio.sleep(1)
                continue
            if delivery is not None:
                await self.process(delivery)

    async def process(self, delivery: Delivery) -> None:
        job_id = delivery.job_id
        attempt = await self._store.start_attempt(job_id, delivery.reclaimed)
        if attempt is None:  # ended (cancelled while queued), or a duplicate entry: nothing to do
            await self._queue.ack(delivery)
            return
        if attempt > self._max_attempts:
            await self._end(job_id, FAILED, f"gave up after {attempt - 1} attempts")
            await self._queue.dead_letter(delivery, "too many attempts")
            return
        await self._append(
            job_id,
            status=events_pb2.StatusEvent(
                status=types_pb2.JOB_STATUS_RUNNING, stage="generating", attempt=attempt
            ),
        )
        cancel = threading.Event()
        keeper = asyncio.create_task(self._keep_alive(delivery, cancel))
        try:
            job = await self._store.get(job_id)
            await self._generate(job, cancel)
        except StepCancelled:
            await self._end(job_id, CANCELLED, stage="cancelled")
        except Exception as error:  # any failure is retried, then fails the job
            log.exception("job %s attempt %d failed", job_id, attempt)
            await self._retry_or_fail(delivery, attempt, error)
            return
        finally:
            keeper.cancel()
        await self._queue.ack(delivery)

    async def _generate(self, job: JobRecord, cancel: threading.Event) -> None:
        spec = job.spec
        artifacts: list[ArtifactRecord] = []
        last_db_write = 0.0
        async for item in self._engine.render(spec, cancel):
            if isinstance(item, Step):
                await self._append(job.id, progress=progress_event(item))
                if time.monotonic() - last_db_write > PROGRESS_DB_INTERVAL_SECONDS:
                    last_db_write = time.monotonic()
                    await self._store.set_stage(job.id, "generating", item.percent)
            else:
                started = time.perf_counter()
                artifact = await self._store.add_artifact(
                    await save_image(self._objects, item, job.id)
                )
                artifacts.append(artifact)
                await self._append(
                    job.id,
                    artifact=events_pb2.ArtifactEvent(
                        artifact=artifact_to_pb(artifact),
                        render_ms=item.render_ms,
                        encode_ms=item.encode_ms,
                        store_ms=(time.perf_counter() - started) * 1e3,
                    ),
                )
        await self._store.set_stage(job.id, "evaluating", 100.0)
        artifacts = await self._evaluate(job, artifacts)
        try:
            await self._cache.store(spec, job.id, artifacts)
        except Exception:  # the images are safe; only their reuse is lost
            log.warning("job %s: cache store failed", job.id, exc_info=True)
        await self._end(job.id, COMPLETED, stage="done")

    async def _evaluate(
        self, job: JobRecord, artifacts: list[ArtifactRecord]
    ) -> list[ArtifactRecord]:
        started = time.perf_counter()
        result = await self._evaluator.evaluate(
            [a.key for a in artifacts], job.spec.text_prompt(), job.spec.reference_key()
        )
        evaluate_ms = (time.perf_counter() - started) * 1e3
        scored = [
            replace(
                a,
                clip_score=s.clip_score,
                lpips_diversity=s.lpips_diversity,
                lpips_to_reference=s.lpips_to_reference,
                nsfw=s.nsfw,
                is_primary=i == result.primary_index,
            )
            for i, (a, s) in enumerate(zip(artifacts, result.scores, strict=True))
        ]
        await self._store.set_scores(job.id, scored, result.models)
        ordered = sorted(scored, key=lambda a: (not a.is_primary, a.variant_index))
        await self._append(
            job.id,
            evaluation=events_pb2.EvaluationEvent(
                artifacts=[artifact_to_pb(a) for a in ordered],
                models=result.models,
                evaluate_ms=evaluate_ms,
            ),
        )
        return scored

    async def _retry_or_fail(self, delivery: Delivery, attempt: int, error: Exception) -> None:
        """Puts the job back on the queue, unless retrying cannot help or it has had its
        attempts: then it fails and its message goes to the dead letters."""
        message = f"{type(error).__name__}: {error}"[:500]
        permanent = isinstance(error, InvalidArgument | NotFound)
        retrying = not permanent and attempt < self._max_attempts
        await self._append(
            delivery.job_id, error=events_pb2.ErrorEvent(message=message, retrying=retrying)
        )
        if retrying and await self._store.requeue(delivery.job_id, message):
            await self._queue.enqueue(delivery.job_id)
            await self._store.mark_enqueued(delivery.job_id)
            await self._queue.ack(delivery)
            await self._append(
                delivery.job_id,
                status=events_pb2.StatusEvent(status=types_pb2.JOB_STATUS_QUEUED, attempt=attempt),
            )
            return
        await self._end(delivery.job_id, FAILED, message)
        await self._queue.dead_letter(delivery, message)

    async def _end(self, job_id: str, status: str, error: str = "", stage: str = "") -> None:
        if await self._store.finish(job_id, status, error, stage):
            await self._events.append_final(await self._store.get(job_id))

    async def _append(self, job_id: str, **payload: object) -> None:
        await self._events.append(job_id, events_pb2.JobEvent(**payload))  # type: ignore[arg-type]

    async def _keep_alive(self, delivery: Delivery, cancel: threading.Event) -> None:
        """Watches for a cancel request and keeps the message from being reclaimed."""
        touch_every = self._queue.claim_idle_ms / 3000
        last_touch = time.monotonic()
        while not cancel.is_set():
            if await self._queue.cancel_requested(delivery.job_id):
                cancel.set()
                return
            if time.monotonic() - last_touch > touch_every:
                await self._queue.touch(self.consumer, delivery)
                last_touch = time.monotonic()
            await asyncio.sleep(CANCEL_POLL_SECONDS)


async def sweep_unqueued(store: JobStore, queue: JobQueue, older_than_seconds: float) -> int:
    """Queues the jobs whose creator died between their row and their queue entry."""
    job_ids = await store.unqueued(older_than_seconds)
    for job_id in job_ids:
        log.warning("job %s was never queued; queueing it now", job_id)
        await queue.enqueue(job_id)
        await store.mark_enqueued(job_id)
    return len(job_ids)
