"""Queue workers: take a job from the queue, render what it lacks, store and score the images,
record the result in the cache, and end the job. Every change of the job goes through the
JobLifecycle, guarded by this worker's attempt.

Nothing a store does kills a worker: a blip is retried with backoff (services/common/retry.py); a
job whose attempt cannot go on is left to its lease, which runs out and lets the reconciler queue
it again. An attempt resumes where the last one stopped: variants already stored are not
rendered again, and a job already scored is not scored again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import TypeVar

from imagegen.v1 import events_pb2
from opentelemetry.trace import SpanKind

from services.cache.client import CacheClient
from services.common import metrics, tracing
from services.common.errors import InvalidArgument, NotFound
from services.common.logs import job_id as current_job
from services.common.objectstore import ObjectStore
from services.common.queue import Delivery, JobQueue
from services.common.retry import is_blip, through_blips
from services.evaluator.client import EvaluatorClient
from services.generator.engine import (
    Engine,
    Preview,
    Stage,
    Step,
    progress_event,
    save_image,
)
from services.generator.guidance import load_guidance
from services.generator.pipeline import StepCancelled
from services.jobs.cancels import CancelListener, CancelToken
from services.jobs.lifecycle import FailureCause, JobLifecycle
from services.jobs.records import ArtifactRecord, Attempt, CacheMode

log = logging.getLogger("imagegen.worker")

PROGRESS_DB_INTERVAL_SECONDS = 0.5
T = TypeVar("T")


class AttemptLost(Exception):
    """The attempt no longer holds its job: it was cancelled, or another worker took it."""


class QueueWorker:
    def __init__(
        self,
        engine: Engine,
        lifecycle: JobLifecycle,
        queue: JobQueue,
        objects: ObjectStore,
        evaluator: EvaluatorClient,
        cache: CacheClient,
        cancels: CancelListener,
        consumer: str,
    ) -> None:
        self._engine = engine
        self._lifecycle = lifecycle
        self._queue = queue
        self._objects = objects
        self._evaluator = evaluator
        self._cache = cache
        self._cancels = cancels
        self.consumer = consumer
        self.busy_with = ""
        self._in_hand: CancelToken | None = None
        self._stages = tracing.Stages("generator")
        self._abandoned = False

    def abandon(self) -> None:
        """Stops the job in hand at its next step and puts it back on the queue (shutdown)."""
        self._abandoned = True
        if self._in_hand is not None:
            self._in_hand.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Takes and runs jobs until `stop` is set (finishing the job in hand). Nothing a job
        or a store does ends this loop."""
        delay = 0.1
        while not stop.is_set():
            try:
                delivery = await self._queue.claim(self.consumer, block_ms=1000)
                if delivery is not None and stop.is_set():
                    # Claimed while stopping: a fresh entry for the next generator, no attempt.
                    await self._queue.enqueue(delivery.job_id, delivery.tenant, delivery.priority)
                    await self._queue.ack(delivery)
                elif delivery is not None:
                    await self.process(delivery)
                delay = 0.1
            except Exception as error:
                if is_blip(error):
                    log.warning("%s: stores away (%s); trying again", self.consumer, error)
                else:
                    log.exception("%s: unexpected error; going on", self.consumer)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 2.0)

    async def process(self, delivery: Delivery) -> None:
        job_id = delivery.job_id
        named = current_job.set(job_id)
        try:
            attempt = await through_blips(
                lambda: self._lifecycle.start_attempt(job_id), f"job {job_id}: start"
            )
            if attempt is not None:
                _observe_queue_wait(attempt)
                self.busy_with = job_id
                try:
                    with _traced(attempt):
                        await self._attempt(attempt)
                finally:
                    self.busy_with = ""
        finally:
            current_job.reset(named)
        # Done with the entry: the job ended, waits in the queue again under a new entry, or
        # was not this entry's to run (a duplicate, or another worker holds it).
        await through_blips(lambda: self._queue.ack(delivery), f"job {job_id}: ack")

    async def _attempt(self, attempt: Attempt) -> None:
        with self._cancels.track(attempt.job_id) as token:
            self._in_hand = token
            self._stages = tracing.Stages("generator")
            if self._abandoned:
                token.set()
            keeper = asyncio.create_task(self._keep_lease(attempt, token))
            try:
                await self._run(attempt, token)
            except (StepCancelled, AttemptLost):
                if self._abandoned:  # shutting down: another generator takes it from here
                    reason = "the generator stopped; queued again"
                    stopped = FailureCause.INTERRUPTED
                    with contextlib.suppress(AttemptLost):
                        await self._write(
                            attempt,
                            lambda: self._lifecycle.retry_or_fail(attempt, reason, False, stopped),
                        )
                log.info("job %s attempt %d: stopped (cancelled or taken over)", *_ids(attempt))
            except Exception as error:
                if is_blip(error):
                    # The stores stayed away past the retries: the lease runs out and the
                    # reconciler queues the job again, to resume where this attempt stopped.
                    log.error("job %s attempt %d: stores away; left to its lease", *_ids(attempt))
                    return
                log.exception("job %s attempt %d failed", *_ids(attempt))
                permanent = isinstance(error, InvalidArgument | NotFound)
                reason = f"{type(error).__name__}: {error}"
                cause = FailureCause.INVALID if permanent else FailureCause.GENERATOR_ERROR
                await self._write(
                    attempt,
                    lambda: self._lifecycle.retry_or_fail(attempt, reason, permanent, cause),
                )
            finally:
                self._in_hand = None
                self._stages.close()
                token.set()  # stops a render still in flight
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper

    async def _run(self, attempt: Attempt, token: CancelToken) -> None:
        job = attempt.job
        stored = {a.variant_index: a for a in job.artifacts}
        withheld = {w.variant_index for w in job.withheld}
        missing = [i for i in range(job.spec.num_variants) if i not in stored and i not in withheld]
        if missing:
            await self._render(attempt, missing, token, stored, withheld)
        artifacts = [stored[i] for i in range(job.spec.num_variants) if i in stored]
        if not artifacts:
            reason = "every image was withheld by the image safety policy"
            withheld_all = FailureCause.WITHHELD
            await self._write(
                attempt,
                lambda: self._lifecycle.retry_or_fail(attempt, reason, True, withheld_all),
            )
            return
        if not all(a.scored for a in artifacts):
            await self._stage(attempt, "evaluating")
            artifacts = await self._until_cancelled(self._evaluate(attempt, artifacts), token)
        if withheld:
            log.info("job %s: not cached, %d variant(s) withheld", job.id, len(withheld))
        elif job.cache_mode is not CacheMode.OFF:
            try:
                await self._cache.store(job.spec, job.id, artifacts, job.cache_namespace)
            except Exception:  # the images are safe; only their reuse is lost
                log.warning("job %s: cache store failed", job.id, exc_info=True)
        await self._write(attempt, lambda: self._lifecycle.complete(attempt))
        log.info("job %s attempt %d: completed, %d image(s)", *_ids(attempt), len(artifacts))

    async def _render(
        self,
        attempt: Attempt,
        variants: list[int],
        token: CancelToken,
        stored: dict[int, ArtifactRecord],
        withheld: set[int],
    ) -> None:
        spec = attempt.job.spec
        guidance = await through_blips(
            partial(load_guidance, spec, self._objects), f"job {attempt.job_id}: guidance images"
        )
        last_persisted, uploading = 0.0, False
        renders = self._engine.render(spec, token.flag, variants, guidance, spec.preview_every)
        async for item in renders:
            if isinstance(item, Step):
                persist = time.monotonic() - last_persisted > PROGRESS_DB_INTERVAL_SECONDS
                if persist:
                    last_persisted = time.monotonic()
                await _best_effort(self._lifecycle.progress(attempt, progress_event(item), persist))
                continue
            if isinstance(item, Stage):
                uploading = False  # a later batch of the job's variants
                await self._stage(attempt, item.name)
                continue
            if isinstance(item, Preview):
                preview = events_pb2.PreviewEvent(
                    variant_index=item.variant_index, step=item.step, image_png=item.png
                )
                await _best_effort(self._lifecycle.preview(attempt, preview))
                continue
            if not uploading:
                uploading = True
                await self._stage(attempt, "uploading")
            # Nothing is stored unscreened: an evaluator that cannot answer fails the attempt.
            category = await self._evaluator.withheld_category(item.png)
            if category:
                await self._write(
                    attempt,
                    partial(self._lifecycle.withhold, attempt, item.variant_index, category),
                )
                withheld.add(item.variant_index)
                continue
            started = time.perf_counter()
            artifact = await through_blips(
                partial(save_image, self._objects, item, attempt.job_id),
                f"job {attempt.job_id}: store image",
            )
            store_seconds = time.perf_counter() - started
            metrics.JOB_STAGE_SECONDS.labels("upload").observe(store_seconds)
            timings = events_pb2.ArtifactEvent(
                render_ms=item.render_ms,
                encode_ms=item.encode_ms,
                store_ms=store_seconds * 1e3,
            )
            await self._write(
                attempt, partial(self._lifecycle.record_artifact, attempt, artifact, timings)
            )
            stored[artifact.variant_index] = artifact

    async def _evaluate(
        self, attempt: Attempt, artifacts: list[ArtifactRecord]
    ) -> list[ArtifactRecord]:
        spec = attempt.job.spec
        started = time.perf_counter()
        result = await self._evaluator.evaluate(
            [a.key for a in artifacts], spec.scoring_text(), spec.reference_key()
        )
        evaluate_seconds = time.perf_counter() - started
        metrics.JOB_STAGE_SECONDS.labels("evaluate").observe(evaluate_seconds)
        evaluate_ms = evaluate_seconds * 1e3
        scored = [
            replace(
                a,
                clip_score=s.clip_score,
                lpips_diversity=s.lpips_diversity,
                lpips_to_reference=s.lpips_to_reference,
                nsfw=s.nsfw,
                is_primary=i == result.primary_index,
                clip_model=s.clip_model,
                clip_calibrated=s.clip_calibrated,
                lpips_model=s.lpips_model,
                lpips_calibrated=s.lpips_calibrated,
            )
            for i, (a, s) in enumerate(zip(artifacts, result.scores, strict=True))
        ]
        await self._write(
            attempt,
            lambda: self._lifecycle.record_scores(attempt, scored, result.models, evaluate_ms),
        )
        return scored

    async def _stage(self, attempt: Attempt, name: str) -> None:
        """The attempt entered stage `name`: its span starts, the lifecycle records it."""
        self._stages.enter(name)
        await _best_effort(self._lifecycle.stage(attempt, name))

    async def _write(self, attempt: Attempt, transition: Callable[[], Awaitable[bool]]) -> None:
        """A guarded transition through store blips; AttemptLost when the guard refused it."""
        if not await through_blips(transition, f"job {attempt.job_id}"):
            raise AttemptLost(attempt.job_id)

    @staticmethod
    async def _until_cancelled(work: Awaitable[T], token: CancelToken) -> T:
        """Awaits `work`, abandoning it (AttemptLost) as soon as the token is set."""
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(token.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise AttemptLost("cancelled")
        return task.result()

    async def _keep_lease(self, attempt: Attempt, token: CancelToken) -> None:
        """Renews the lease while the attempt runs; sets the token when the job is no longer
        this attempt's (cancelled, or taken over after the lease ran out)."""
        every = self._lifecycle.lease_seconds / 3
        while True:
            await asyncio.sleep(every)
            try:
                held = await self._lifecycle.renew(attempt)
            except Exception as error:  # noqa: BLE001 - the lease has time left: next turn
                log.warning("job %s: lease not renewed (%s)", attempt.job_id, error)
                continue
            if not held:
                token.set()
                return


async def _best_effort(announcement: Awaitable[None]) -> None:
    """Progress, stages and previews: a store blip loses the announcement, not the job."""
    try:
        await announcement
    except Exception as error:
        if not is_blip(error):
            raise


@contextlib.contextmanager
def _traced(attempt: Attempt) -> Iterator[None]:
    """The attempt's span, current while it runs: a child of the span that admitted the job
    (its traceparent travels in the job), so the trace crosses the queue. A first attempt also
    gets a span for its wait in the queue, from admission to its start."""
    job = attempt.job
    parent = tracing.context_of(job.trace_parent)
    tracer = tracing.tracer("generator")
    if attempt.number == 1 and job.created_at is not None and job.updated_at is not None:
        waited = tracer.start_span(
            "queue wait",
            context=parent,
            kind=SpanKind.CONSUMER,
            start_time=tracing.nanos(job.created_at),
        )
        waited.end(end_time=tracing.nanos(job.updated_at))
    attributes: dict[str, str | int] = {
        "imagegen.job_id": job.id,
        "imagegen.attempt": attempt.number,
        "imagegen.model": job.spec.model,
        "imagegen.variants": job.spec.num_variants,
    }
    with tracer.start_as_current_span(
        "job attempt", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
    ):
        yield


def _observe_queue_wait(attempt: Attempt) -> None:
    """A first attempt waited from admission to its start (both the database's clock: the
    start stamped `updated_at`); a later one's wait is not known, so not counted."""
    job = attempt.job
    if attempt.number == 1 and job.created_at is not None and job.updated_at is not None:
        waited = (job.updated_at - job.created_at).total_seconds()
        metrics.JOB_STAGE_SECONDS.labels("queue_wait").observe(max(waited, 0.0))


def _ids(attempt: Attempt) -> tuple[str, int]:
    return attempt.job_id, attempt.number


class Supervisor:
    """Keeps the workers running: one that still dies (a bug: `run` survives every store
    error) is logged and started again. `any_alive` is a health check."""

    def __init__(self, workers: list[QueueWorker], stop: asyncio.Event) -> None:
        self._workers = workers
        self._stop = stop
        self._alive: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> list[asyncio.Task[None]]:
        self._tasks = [asyncio.create_task(self._supervise(w)) for w in self._workers]
        return self._tasks

    async def stop(self, grace: float) -> None:
        """Lets the workers finish the jobs in hand for up to `grace` seconds, then stops those
        jobs at their next step and puts them back on the queue; a worker still busy after
        another `grace` (a store call that does not return) is cancelled: its job's lease
        runs out and the reconciler queues it again."""
        self._stop.set()
        if not self._tasks:
            return
        _, running = await asyncio.wait(self._tasks, timeout=grace)
        if running:
            for worker in self._workers:
                worker.abandon()
            _, running = await asyncio.wait(running, timeout=grace)
        if running:
            busy = [w.busy_with for w in self._workers if w.busy_with]
            log.warning("workers still busy (jobs %s) at shutdown: cancelled", busy)
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)

    async def any_alive(self) -> bool:
        return bool(self._alive)

    async def _supervise(self, worker: QueueWorker) -> None:
        while not self._stop.is_set():
            self._alive.add(worker.consumer)
            try:
                await worker.run(self._stop)
            except Exception:
                log.exception("%s died; starting it again", worker.consumer)
            finally:
                self._alive.discard(worker.consumer)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 1.0)
