"""The public API's domain: admission, job reads, watching and cancelling.

Both the gRPC `ImageService` and the HTTP facade call this; it knows nothing of either, and
signs no URLs (the edges do). Every change of a job goes through the JobLifecycle.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from imagegen.v1 import events_pb2, types_pb2

from services.cache.client import CacheClient
from services.cache.entry import CacheEntry
from services.common import metrics, tracing
from services.common.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    PolicyRefused,
    Unavailable,
)
from services.common.events import EventLog, check_event_id
from services.common.logs import job_id as current_job
from services.common.models import ModelSpec, Registry
from services.common.objectstore import ObjectStore
from services.common.queue import JobQueue
from services.common.spec import (
    ENGINE_VERSION,
    MAX_PROMPT_CHARS,
    Spec,
    cache_keys,
    resolve,
    text_problem,
)
from services.evaluator.client import MAX_IMAGES_PER_CALL, Evaluation, EvaluatorClient
from services.gateway.cost import Cost, estimate
from services.gateway.hub import EventHub
from services.gateway.outbound import check_webhook_url
from services.gateway.uploads import Upload, Uploads, upload_tenant
from services.jobs.lifecycle import Idempotency, JobLifecycle, Limits, SafetyCount
from services.jobs.records import (
    WEBHOOK_EVENTS,
    CacheMode,
    JobRecord,
    JobStatus,
    Priority,
    Webhook,
    encode_spec,
)
from services.safety.prompts import PromptModerator, fibo_texts
from services.tenants.keys import Caller, KeyStore
from services.tenants.limits import RateLimiter

log = logging.getLogger("imagegen.gateway")

WATCH_IDLE_SECONDS = 5.0
MAX_PAGE_SIZE = 100
MAX_IDEMPOTENCY_KEY_CHARS = 200


@dataclass(frozen=True)
class Options:
    """How a job is to be run, beside what it renders."""

    idempotency_key: str = ""
    seed_agnostic_cache: bool = False
    skip_cache: bool = False
    cache: CacheMode | None = None
    priority: Priority = Priority.NORMAL
    max_cost_cents: int | None = None
    # None: the tenant's default webhook.
    webhook: Webhook | None = None


@dataclass(frozen=True)
class QueueDepth:
    backlog: int  # waiting and claimed-not-done: what generators have to get through
    claimed: int
    waiting_by_tenant: dict[str, int]


@dataclass(frozen=True)
class Admission:
    job: JobRecord
    estimate: Cost
    created: bool


class JobService:
    """Every method takes the Caller: what it reads or changes is the caller's tenant's."""

    def __init__(
        self,
        lifecycle: JobLifecycle,
        events: EventLog,
        hub: EventHub,
        cache: CacheClient,
        registry: Registry,
        objects: ObjectStore,
        moderator: PromptModerator,
        evaluator: EvaluatorClient,
        keys: KeyStore,
        limiter: RateLimiter,
        uploads: Uploads,
        queue: JobQueue,
        *,
        url_ttl_seconds: int = 3600,
        shared_cache: bool = False,
        webhook_allow_private: bool = False,
    ) -> None:
        self._keys = keys
        self._limiter = limiter
        self.uploads = uploads
        self._queue = queue
        self._shared_cache = shared_cache
        self._webhook_allow_private = webhook_allow_private
        self._moderator = moderator
        self._evaluator = evaluator
        self._lifecycle = lifecycle
        self._events = events
        self._hub = hub
        self._cache = cache
        self._registry = registry
        self.objects = objects
        self.url_ttl_seconds = url_ttl_seconds

    def estimate(self, spec: Spec) -> Cost:
        resolved = resolve(spec, self._registry)
        return estimate(resolved, self._registry.get(resolved.model))

    async def create(self, caller: Caller, spec: Spec, options: Options | None = None) -> Admission:
        """Prices the request, answers from the cache when it can (`cache` USE, the default),
        else admits a queued job that stores its result unless `cache` is OFF. Admitted means
        stored in Postgres: the job will run even if Redis is away right now. The key's rate
        limit is taken first; its concurrency limit and the tenant's budget are checked as the
        job is stored; `max_cost_cents` refuses a dearer estimate."""
        options = options or Options()
        await self._limiter.take(caller)
        mode = cache_mode(options.cache, options.skip_cache)
        idempotency = _idempotency(spec, options, mode)
        resolved = resolve(spec, self._registry)
        await self.moderate(spec)
        await self._check_uploads(caller, resolved)
        model = self._registry.get(resolved.model)
        cost = estimate(resolved, model)
        if options.max_cost_cents is not None and cost.total_cents > options.max_cost_cents:
            raise InvalidArgument.one(
                "max_cost_cents",
                f"the estimate is {cost.total_cents} cents,"
                f" over the {options.max_cost_cents} given",
            )
        tenant = await self._keys.tenant(caller.tenant)
        webhook = options.webhook
        if webhook is None:
            webhook = Webhook(tenant.webhook_url, tenant.webhook_events or WEBHOOK_EVENTS)
        namespace = self._namespace(caller)
        key, _ = cache_keys(resolved, model, namespace)
        job = JobRecord(
            id=str(uuid.uuid4()),
            status=JobStatus.QUEUED,
            spec=resolved,
            cache_key=key,
            cost_cents=cost.total_cents,
            cache_mode=mode,
            engine_version=ENGINE_VERSION,
            tenant=caller.tenant,
            api_key_id=caller.key_id,
            priority=options.priority,
            cache_namespace=namespace,
            webhook=webhook,
            estimated_cents=cost.total_cents,
            cache_result="miss" if mode is CacheMode.USE else "off",
            trace_parent=tracing.traceparent(),
        )
        hit = None
        if mode is CacheMode.USE:
            hit = await self._lookup(resolved, options.seed_agnostic_cache, namespace)
        if hit is not None:
            # The cached images were made with the hit's seed: record that one.
            job = replace(
                job,
                status=JobStatus.COMPLETED,
                stage="cached",
                progress_percent=100.0,
                cost_cents=0,
                cache_hit=True,
                cache_result="hit_seed" if hit.key == key else "hit_seedless",
                spec=replace(resolved, seed=hit.seed),
                cache_key=hit.key,
                artifacts=[replace(a, id=str(uuid.uuid4()), job_id=job.id) for a in hit.artifacts],
            )
        limits = Limits(caller.max_concurrent, tenant.budget_cents)
        admitted = await self._lifecycle.admit(job, idempotency, limits, tenant.weight)
        current_job.set(admitted.job.id)  # the rest of this call's log lines name it
        if admitted.created:
            answered = "off" if mode is not CacheMode.USE else "hit" if hit else "miss"
            metrics.JOBS_ADMITTED.labels(resolved.model, answered).inc()
            metrics.COST_CENTS.labels(resolved.model, "estimated").inc(admitted.job.cost_cents)
        return Admission(admitted.job, cost, admitted.created)

    def check_webhook(
        self, url: str, events: list[str], url_field: str, events_field: str
    ) -> Webhook:
        """A job's webhook from the request: a URL the SSRF guard accepts and known events
        (none given: all); a refusal names the field as the request spells it."""
        check_webhook_url(url, self._webhook_allow_private, url_field)
        unknown = [e for e in events if e not in WEBHOOK_EVENTS]
        if unknown:
            raise InvalidArgument.one(events_field, f"each one of {list(WEBHOOK_EVENTS)}")
        return Webhook(url, tuple(dict.fromkeys(events)) or WEBHOOK_EVENTS)

    def _namespace(self, caller: Caller) -> str:
        """The prompt cache a caller reads and writes: its tenant's, unless it is shared."""
        return "" if self._shared_cache else caller.tenant

    async def _lookup(self, spec: Spec, seed_agnostic: bool, namespace: str) -> CacheEntry | None:
        """A cache that cannot answer is a miss: the job is rendered instead."""
        try:
            return await self._cache.lookup(spec, seed_agnostic, namespace)
        except Unavailable as error:
            log.warning("cache lookup failed (%s); treating it as a miss", error.message)
            return None

    async def _check_uploads(self, caller: Caller, spec: Spec) -> None:
        """Every guidance image and ControlNet mask must be a verified upload of the tenant."""
        keys = [(f"guidance_images[{i}].key", g.key) for i, g in enumerate(spec.guidance_images)]
        if spec.controlnet is not None and spec.controlnet.mask_key:
            keys.append(("controlnet.mask", spec.controlnet.mask_key))
        await self._verify_uploads(caller, keys)

    async def _verify_uploads(self, caller: Caller, keys: list[tuple[str, str]]) -> None:
        """InvalidArgument naming every (field, key) that is not a verified upload of the
        caller's tenant (another tenant's is "no such upload", as a missing one)."""
        bad = []
        for field, key in keys:
            try:
                await self.uploads.verify(key, field, caller.tenant)
            except InvalidArgument as error:
                bad += error.violations
        if bad:
            raise InvalidArgument(bad)

    async def presign_upload(
        self, caller: Caller, content_type: str, sha256: str, size_bytes: int
    ) -> Upload:
        await self._limiter.take(caller)
        return await self.uploads.presign(caller.tenant, content_type, sha256, size_bytes)

    async def read_object(self, caller: Caller, key: str) -> bytes:
        """An object of the caller's tenant (an upload, or an image of one of its jobs);
        anything else is NotFound, as a key that does not exist."""
        owned = upload_tenant(key) == caller.tenant or await self._lifecycle.owns_object(
            caller.tenant, key
        )
        if not owned:
            raise NotFound("no such file")
        return await self.objects.get(key)

    async def lookup_cache(
        self, caller: Caller, spec: Spec, seed_agnostic: bool
    ) -> CacheEntry | None:
        resolved = resolve(spec, self._registry)
        await self.moderate(spec)
        return await self._cache.lookup(resolved, seed_agnostic, self._namespace(caller))

    async def moderate(self, spec: Spec) -> None:
        """Refuses (PolicyRefused, counted) a request whose text the content policy does not
        allow: the prompt, the negative prompt and every string of the FIBO JSON, as sent."""
        texts = [("prompt", spec.prompt), ("negative_prompt", spec.negative_prompt)]
        if spec.fibo_json is not None:
            texts += fibo_texts(spec.fibo_json)
        texts = [(field, text) for field, text in texts if text]
        if self._moderator.runs_a_model:
            refusal = await asyncio.to_thread(self._moderator.check, texts)
        else:
            refusal = self._moderator.check(texts)  # tens of microseconds: no thread hop
        if refusal is not None:
            log.info("prompt refused: %s in %s", refusal.category, refusal.field)
            metrics.SAFETY_REFUSALS.labels("prompt", refusal.category).inc()
            await self._lifecycle.count_refusal(refusal.category)
            raise PolicyRefused(refusal.category, refusal.field)

    async def evaluate_images(
        self,
        caller: Caller,
        prompt: str,
        image_keys: list[str],
        images: list[bytes],
        reference_key: str,
    ) -> Evaluation:
        """Scores any images against a prompt: verified uploads (by key) and inline files."""
        await self._limiter.take(caller)
        bad = []
        if not prompt.strip():
            bad.append(FieldViolation("prompt", "must not be empty"))
        elif len(prompt) > MAX_PROMPT_CHARS:
            bad.append(FieldViolation("prompt", f"at most {MAX_PROMPT_CHARS} characters"))
        elif problem := text_problem(prompt, multiline=True):
            bad.append(FieldViolation("prompt", problem))
        if not 1 <= len(image_keys) + len(images) <= MAX_IMAGES_PER_CALL:
            bad.append(FieldViolation("images", f"give 1..{MAX_IMAGES_PER_CALL} images in all"))
        if bad:
            raise InvalidArgument(bad)
        keys = [(f"image_keys[{i}]", k) for i, k in enumerate(image_keys)]
        if reference_key:
            keys.append(("reference_key", reference_key))
        await self._verify_uploads(caller, keys)
        return await self._evaluator.evaluate(image_keys, prompt, reference_key, images=images)

    async def queue_depth(self) -> QueueDepth:
        """The queue's backlog, for operators and autoscalers (KEDA's metrics-api scaler)."""
        claimed, waiting = await self._queue.depth()
        return QueueDepth(claimed + sum(waiting.values()), claimed, waiting)

    async def safety_counts(self, days: int) -> list[SafetyCount]:
        if not 1 <= days <= 366:
            raise InvalidArgument.one("days", "must be 1..366")
        return await self._lifecycle.safety_counts(days)

    def models(self) -> tuple[list[ModelSpec], str]:
        """The served models and the default model's id."""
        return list(self._registry.models.values()), self._registry.default

    async def get(self, caller: Caller, job_id: str) -> types_pb2.Job:
        """The job's snapshot: what a status read returns, without URLs."""
        current_job.set(job_id)
        return await self._lifecycle.snapshot(job_id, caller.tenant)

    async def list(
        self, caller: Caller, page_size: int, page_token: str, status: str
    ) -> tuple[list[types_pb2.Job], str]:
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument.one("page_size", f"must be 0..{MAX_PAGE_SIZE}")
        if status and status not in JobStatus.__members__.values():
            raise InvalidArgument.one("status", f"one of {[s.value for s in JobStatus]}")
        size = page_size or 20
        before = _decode_token(page_token)
        jobs = await self._lifecycle.page(
            caller.tenant, size, before, JobStatus(status) if status else None
        )
        token = ""
        if len(jobs) == size:
            created = jobs[-1].create_time.ToDatetime(tzinfo=UTC).isoformat()
            token = base64.urlsafe_b64encode(f"{created}|{jobs[-1].id}".encode()).decode()
        return jobs, token

    async def cancel(self, caller: Caller, job_id: str) -> JobRecord:
        """A queued or running job ends cancelled at once; its worker stops at its next step."""
        current_job.set(job_id)
        return await self._lifecycle.cancel(job_id, caller.tenant)

    async def watch(
        self, caller: Caller, job_id: str, after_event_id: str
    ) -> AsyncIterator[events_pb2.JobEvent | None]:
        """Events after `after_event_id`, then live ones, ending with the final event; None
        after each WATCH_IDLE_SECONDS without one (a stream can say it is alive). When the event
        stream was lost (Redis restarted empty), the record supplies the final event."""
        current_job.set(job_id)
        after = check_event_id(after_event_id, "after_event_id")
        # NotFound (another tenant's job too) before the stream starts.
        job = await self._lifecycle.snapshot(job_id, caller.tenant)
        if _finished(job) and after != "0-0" and not await self._events.read(job_id, after):
            return  # resumed after the final event: nothing more will come
        async for event in self._hub.follow(job_id, after, WATCH_IDLE_SECONDS):
            if event is not None:
                after = event.id
                yield event
                if event.HasField("final"):
                    return
                continue
            job = await self._lifecycle.snapshot(job_id)
            if _finished(job) and not await self._events.read(job_id, after):
                # An id of its own, after the last one seen: clients deduplicate by id.
                final = events_pb2.JobEvent(id=_next_event_id(after), job_id=job_id)
                final.final.job.CopyFrom(job)
                yield final
                return
            yield None


def _next_event_id(event_id: str) -> str:
    """The id right after `event_id` ("ms-seq": the same millisecond, the next sequence)."""
    millis, _, sequence = event_id.partition("-")
    return f"{millis}-{int(sequence or 0) + 1}"


def _finished(job: types_pb2.Job) -> bool:
    return job.status in (
        types_pb2.JOB_STATUS_COMPLETED,
        types_pb2.JOB_STATUS_FAILED,
        types_pb2.JOB_STATUS_CANCELLED,
    )


def cache_mode(requested: CacheMode | None, skip_cache: bool) -> CacheMode:
    """The request's cache mode: `requested` (None when not given: USE), or REFRESH for the
    older `skip_cache`, which always rendered and stored; both given must agree."""
    if not skip_cache:
        return requested or CacheMode.USE
    if requested not in (None, CacheMode.REFRESH):
        raise InvalidArgument.one(
            "skip_cache",
            f"is the older spelling of cache={CacheMode.REFRESH}; it contradicts cache={requested}",
        )
    return CacheMode.REFRESH


def _idempotency(spec: Spec, options: Options, mode: CacheMode) -> Idempotency | None:
    """The key with a digest of the request as the client sent it (before defaults and a
    random seed are filled in), so that a retry matches and another request does not. The
    cache mode counts as resolved: `skip_cache` and `cache=refresh` are the same request."""
    key = options.idempotency_key
    if not key:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidArgument.one(
            "idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY_CHARS} characters"
        )
    if (problem := text_problem(key)) is not None:
        raise InvalidArgument.one("idempotency_key", problem)
    # USE and REFRESH digest as they did as `skip` false and true before modes existed, so
    # that a key taken then still matches its retry.
    request: dict[str, object] = {
        "spec": encode_spec(spec),
        "seed_agnostic": options.seed_agnostic_cache,
        "skip": mode is CacheMode.REFRESH,
    }
    if mode is CacheMode.OFF:
        request["cache"] = mode.value
    # Written only when not the default, so that a key taken before they existed still matches.
    if options.priority is not Priority.NORMAL:
        request["priority"] = options.priority.value
    if options.max_cost_cents is not None:
        request["max_cost_cents"] = options.max_cost_cents
    if options.webhook is not None:
        request["webhook"] = [options.webhook.url, list(options.webhook.events)]
    digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()
    return Idempotency(key, digest)


def _decode_token(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        created, job_id = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        if str(uuid.UUID(job_id)) != job_id:
            raise ValueError(job_id)
        return datetime.fromisoformat(created), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError, OverflowError):
        raise InvalidArgument.one("page_token", "not a token from this service") from None
