"""The public API's domain: admission, job reads, watching and cancelling.

Both the gRPC `ImageService` and the HTTP facade call this; it knows nothing of either.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime

from imagegen.v1 import events_pb2, types_pb2

from services.cache.client import CacheClient
from services.cache.entry import CacheEntry
from services.common.convert import job_to_pb
from services.common.errors import FieldViolation, InvalidArgument, Unavailable
from services.common.events import EventLog, check_event_id
from services.common.jobstore import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    JobRecord,
    JobStore,
)
from services.common.models import ModelSpec, Registry
from services.common.objectstore import ObjectStore
from services.common.queue import JobQueue
from services.common.spec import ENGINE_VERSION, Spec, cache_keys, resolve
from services.gateway.cost import Cost, estimate
from services.gateway.hub import EventHub

WATCH_IDLE_SECONDS = 5.0
MAX_PAGE_SIZE = 100
STATUS_NAMES = ("queued", "running", "completed", "failed", "cancelled")


@dataclass(frozen=True)
class Admission:
    job: JobRecord
    estimate: Cost
    created: bool


class JobService:
    def __init__(
        self,
        store: JobStore,
        events: EventLog,
        hub: EventHub,
        queue: JobQueue,
        cache: CacheClient,
        registry: Registry,
        objects: ObjectStore,
        url_ttl_seconds: int = 3600,
    ) -> None:
        self._store = store
        self._events = events
        self._hub = hub
        self._queue = queue
        self._cache = cache
        self._registry = registry
        self.objects = objects
        self.url_ttl_seconds = url_ttl_seconds

    def estimate(self, spec: Spec) -> Cost:
        resolved = resolve(spec, self._registry)
        return estimate(resolved, self._registry.get(resolved.model))

    async def create(
        self,
        spec: Spec,
        idempotency_key: str = "",
        seed_agnostic_cache: bool = False,
        skip_cache: bool = False,
    ) -> Admission:
        """Prices the request, answers from the cache when it can, else queues a job."""
        if len(idempotency_key) > 200:
            raise InvalidArgument.one("idempotency_key", "at most 200 characters")
        resolved = resolve(spec, self._registry)
        await self._check_uploads(resolved)
        model = self._registry.get(resolved.model)
        cost = estimate(resolved, model)
        key, _ = cache_keys(resolved, model)
        job = JobRecord(
            id=str(uuid.uuid4()),
            status=QUEUED,
            spec=resolved,
            cache_key=key,
            cost_cents=cost.total_cents,
            engine_version=ENGINE_VERSION,
        )
        hit = None if skip_cache else await self._cache.lookup(resolved, seed_agnostic_cache)
        if hit is not None:
            # The cached images were made with the hit's seed: record that one.
            job = replace(
                job,
                status=COMPLETED,
                stage="cached",
                progress_percent=100.0,
                cost_cents=0,
                cache_hit=True,
                spec=replace(resolved, seed=hit.seed),
                cache_key=hit.key,
            )
            artifacts = [replace(a, id=str(uuid.uuid4()), job_id=job.id) for a in hit.artifacts]
            stored, created = await self._store.create(job, idempotency_key, artifacts)
            if created:
                await self._events.append_final(stored)
            return Admission(stored, cost, created)
        stored, created = await self._store.create(job, idempotency_key)
        if created:
            await self._events.append(
                stored.id,
                events_pb2.JobEvent(
                    status=events_pb2.StatusEvent(status=types_pb2.JOB_STATUS_QUEUED)
                ),
            )
            try:
                await self._queue.enqueue(stored.id)
            except Exception as error:
                if await self._store.finish(stored.id, FAILED, "could not be queued"):
                    await self._events.append_final(await self._store.get(stored.id))
                raise Unavailable("the job queue is unavailable") from error
            # Were this lost (a crash right here), the generators' sweep would queue it again;
            # a second queue entry for a job is harmless.
            await self._store.mark_enqueued(stored.id)
        return Admission(stored, cost, created)

    async def _check_uploads(self, spec: Spec) -> None:
        """Every guidance image and ControlNet mask must have been uploaded."""
        keys = [(f"guidance_images[{i}].key", g.key) for i, g in enumerate(spec.guidance_images)]
        if spec.controlnet is not None and spec.controlnet.mask_key:
            keys.append(("controlnet.mask", spec.controlnet.mask_key))
        missing = [
            FieldViolation(field, "no such upload")
            for field, key in keys
            if not await self.objects.exists(key)
        ]
        if missing:
            raise InvalidArgument(missing)

    async def lookup_cache(self, spec: Spec, seed_agnostic: bool) -> CacheEntry | None:
        return await self._cache.lookup(resolve(spec, self._registry), seed_agnostic)

    def models(self) -> tuple[list[ModelSpec], str]:
        """The served models and the default model's id."""
        return list(self._registry.models.values()), self._registry.default

    async def get(self, job_id: str) -> JobRecord:
        return await self._store.get(job_id)

    async def list(
        self, page_size: int, page_token: str, status: str
    ) -> tuple[list[JobRecord], str]:
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument.one("page_size", f"must be 0..{MAX_PAGE_SIZE}")
        if status and status not in STATUS_NAMES:
            raise InvalidArgument.one("status", f"one of {STATUS_NAMES}")
        size = page_size or 20
        jobs = await self._store.page(size, _decode_token(page_token), status or None)
        token = ""
        if len(jobs) == size and (created := jobs[-1].created_at) is not None:
            raw = f"{created.isoformat()}|{jobs[-1].id}".encode()
            token = base64.urlsafe_b64encode(raw).decode()
        return jobs, token

    async def cancel(self, job_id: str) -> JobRecord:
        """A queued job ends at once; a running one at the generator's next step."""
        job = await self._store.get(job_id)
        if job.finished:
            return job
        await self._queue.request_cancel(job_id)
        if job.status == QUEUED and await self._store.finish(job_id, CANCELLED, stage="cancelled"):
            job = await self._store.get(job_id)
            await self._events.append_final(job)
        return await self._store.get(job_id)

    async def watch(self, job_id: str, after_event_id: str) -> AsyncIterator[events_pb2.JobEvent]:
        """Events after `after_event_id`, then live ones, ending with the final event."""
        after = check_event_id(after_event_id, "after_event_id")
        job = await self._store.get(job_id)  # NotFound before the stream starts
        if job.finished and after != "0-0" and not await self._events.read(job_id, after):
            return  # resumed after the final event: nothing more will come
        async for event in self._hub.follow(job_id, after, WATCH_IDLE_SECONDS):
            if event is not None:
                after = event.id
                yield self.with_urls(event)
                if event.HasField("final"):
                    return
                continue
            job = await self._store.get(job_id)
            if job.finished and not await self._events.read(job_id, after):
                # The stream expired (or was never written): end with the record itself.
                final = events_pb2.JobEvent(id=after, job_id=job_id)
                final.final.job.CopyFrom(self.job_pb(job))
                yield final
                return

    def job_pb(self, job: JobRecord) -> types_pb2.Job:
        return job_to_pb(job, self.objects.download_url)

    def with_urls(self, event: events_pb2.JobEvent) -> events_pb2.JobEvent:
        """Fills in fresh download URLs: events carry keys, URLs expire."""
        artifacts = []
        if event.HasField("artifact"):
            artifacts = [event.artifact.artifact]
        elif event.HasField("evaluation"):
            artifacts = list(event.evaluation.artifacts)
        elif event.HasField("final"):
            artifacts = list(event.final.job.artifacts)
        for artifact in artifacts:
            artifact.url = self.objects.download_url(artifact.key)
        return event


def _decode_token(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        created, job_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument.one("page_token", "not a token from this service") from None
