"""The HTTP facade: the replaced system's JSON API and SSE, translated onto JobService.

It validates each JSON body with its request model (services/gateway/contract.py) into the domain
request, calls the same JobService the gRPC API calls, and renders the result into the response
shapes of services/gateway/http_json.py, with the field names existing clients use; the OpenAPI
document is generated from both. Errors use the status table in services.common.errors. It holds
no logic of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from imagegen.v1 import events_pb2, types_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common import metrics, tracing
from services.common.convert import artifact_to_pb, signed_job, with_urls
from services.common.errors import Forbidden, InvalidArgument, NotFound
from services.common.objectstore import LocalStore
from services.gateway.admin import AdminStats, admin_page, static_file, stats_endpoint
from services.gateway.auth import (
    Authenticator,
    HostOriginGuard,
    authorized,
    caller_of,
)
from services.gateway.contract import (
    Body,
    CacheLookupRequest,
    EstimateRequest,
    EvaluateRequest,
    GenerateRequest,
    PresignUploadRequest,
    parse,
)
from services.gateway.http_input import (
    MAX_EVALUATE_JSON_BYTES,
    MAX_JSON_BYTES,
    RequestContext,
    ascii_digits,
    http_exception,
    parse_json_object,
    query_count,
    query_text,
    read_body,
    resume_after,
)
from services.gateway.http_json import (
    AdmissionJson,
    CacheHitJson,
    CacheMissJson,
    EvaluationJson,
    PresignedUploadJson,
    artifact_json,
    cost_json,
    event_json,
    job_json,
)
from services.gateway.http_metrics import HttpWatch, metrics_endpoint
from services.gateway.jobs import JobService, Options
from services.gateway.openapi import openapi_document
from services.jobs.records import JobRecord, Priority, Webhook
from services.tenants.keys import Scope

STATIC = Path(__file__).parent / "static"


# An SSE comment: what a stream sends after a quiet while (jobs.WATCH_IDLE_SECONDS).
KEEPALIVE = b": keep-alive\n\n"


def options_from_request(jobs: JobService, body: GenerateRequest, idempotency_key: str) -> Options:
    """How to run the job: cache mode, lane, cost ceiling and webhook, from the body."""
    webhook: Webhook | None = None
    events: list[str] = list(body.webhook_events or ())
    if body.webhook_url is not None:
        webhook = jobs.check_webhook(body.webhook_url, events, "webhook_url", "webhook_events")
    elif events:
        raise InvalidArgument.one("webhook_events", "give webhook_url with them")
    return Options(
        idempotency_key=idempotency_key,
        seed_agnostic_cache=bool(body.seed_agnostic_cache),
        skip_cache=bool(body.skip_cache),
        cache=body.cache,
        priority=body.priority or Priority.NORMAL,
        max_cost_cents=body.max_cost_cents,
        webhook=webhook,
    )


BodyT = TypeVar("BodyT", bound=Body)


async def _json_body(request: Request, model: type[BodyT], limit: int = MAX_JSON_BYTES) -> BodyT:
    """The body as `model`, every bad field named (contract.parse)."""
    data = await read_body(request, limit)
    # Parsing and checking a large body takes a while: not on the event loop.
    return await asyncio.to_thread(lambda: parse(model, parse_json_object(data)))


def build_app(
    jobs: JobService,
    authenticator: Authenticator,
    hosts: list[str],
    origins: list[str],
    pool: asyncpg.Pool,
) -> Starlette:
    admin_stats = AdminStats(pool)
    document: list[bytes] = []  # made at the first request for it

    def signed(job: JobRecord | types_pb2.Job) -> types_pb2.Job:
        return signed_job(job, jobs.objects.download_url)

    async def generate(request: Request) -> Response:
        body = await _json_body(request, GenerateRequest)
        options = options_from_request(jobs, body, request.headers.get("idempotency-key", ""))
        admission = await jobs.create(caller_of(request), body.spec(), options)
        answer: AdmissionJson = {
            **job_json(signed(admission.job)),
            **cost_json(admission.estimate),
            "idempotent_replay": not admission.created,
        }
        return JSONResponse(answer, status_code=201 if admission.created else 200)

    async def status(request: Request) -> Response:
        job = await jobs.get(caller_of(request), request.path_params["run_id"])
        return JSONResponse(job_json(signed(job)))

    async def stream(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        after = resume_after(request)
        events = jobs.watch(caller_of(request), run_id, after)
        # Errors (unknown job, bad id) become a JSON status here, before the stream starts.
        try:
            first = await anext(events)
        except StopAsyncIteration:  # resumed after the final event; 204 tells EventSource to stop
            return Response(status_code=204)

        def message(event: events_pb2.JobEvent | None) -> bytes:
            if event is None:  # a quiet while (a queued job): proxies cut idle connections
                return KEEPALIVE
            name, data = event_json(with_urls(event, jobs.objects.download_url))
            return f"id: {event.id}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()

        async def sse() -> AsyncIterator[bytes]:
            metrics.SSE_WATCHERS.inc()
            try:
                yield message(first)
                async for event in events:
                    yield message(event)
            finally:
                metrics.SSE_WATCHERS.dec()

        return StreamingResponse(
            sse(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def list_jobs(request: Request) -> Response:
        q = request.query_params
        size, page_token = query_count(q, "page_size"), query_text(q, "page_token")
        found, token = await jobs.list(
            caller_of(request), size, page_token, query_text(q, "status")
        )
        return JSONResponse(
            {"jobs": [job_json(signed(j)) for j in found], "next_page_token": token}
        )

    async def cancel(request: Request) -> Response:
        job = await jobs.cancel(caller_of(request), request.path_params["run_id"])
        return JSONResponse(job_json(signed(job)))

    async def estimate(request: Request) -> Response:
        body = await _json_body(request, EstimateRequest)
        return JSONResponse(cost_json(jobs.estimate(body.spec())))

    async def cache_lookup(request: Request) -> Response:
        body = await _json_body(request, CacheLookupRequest)
        entry = await jobs.lookup_cache(caller_of(request), body.spec(), bool(body.seed_agnostic))
        if entry is None:
            miss: CacheMissJson = {"hit": False}
            return JSONResponse(miss)
        hit: CacheHitJson = {
            "hit": True,
            "run_id": entry.job_id,
            "seed": entry.seed,
            "hit_count": entry.hit_count,
            "expires_at": entry.expires_at.isoformat(),
            "artifacts": [
                artifact_json(artifact_to_pb(a, jobs.objects.download_url)) for a in entry.artifacts
            ],
        }
        return JSONResponse(hit)

    async def models(request: Request) -> Response:
        served, default = jobs.models()
        return JSONResponse(
            {
                "models": [
                    {
                        "id": m.id,
                        "family": m.family,
                        "version": m.version,
                        "default_guidance": m.default_guidance,
                        "is_default": m.id == default,
                        "default_steps": m.default_steps,
                        "default_width": m.default_width,
                        "default_height": m.default_height,
                        "min_size": m.min_size,
                        "max_size": m.max_size,
                        "size_multiple": m.size_multiple,
                        "max_steps": m.max_steps,
                        "max_variants": m.max_variants,
                        "price_multiplier": m.price_multiplier,
                        "guidance_roles": list(m.guidance_roles),
                        "controlnets": sorted(m.controlnets),
                    }
                    for m in served
                ]
            }
        )

    async def files(request: Request) -> Response:
        """A file by its signed URL (a capability, as S3's presigned URLs: no key needed, so
        that <img> tags work), or by key with the API key of the tenant that owns it."""
        key, q = request.path_params["key"], request.query_params
        if "signature" in q or "expires" in q:
            store = jobs.objects
            if not isinstance(store, LocalStore):
                raise NotFound("files are served by the object store")
            expires, signature = q.get("expires", ""), q.get("signature", "")
            # verify's int() and compare_digest raise on non-ASCII digits and text.
            well_formed = ascii_digits(expires, 20) and signature.isascii()
            if not well_formed or not store.verify("GET", key, expires, signature):
                raise Forbidden("the URL's signature is invalid or expired")
            data = await store.get(key)
        else:
            caller = await authenticator.caller(
                request.headers.get("authorization", ""), Scope.READ
            )
            data = await jobs.read_object(caller, key)
        return Response(
            data,
            media_type="image/png" if key.endswith(".png") else "application/octet-stream",
            headers={"Cache-Control": "private, max-age=3600, immutable"},
        )

    async def presign_upload(request: Request) -> Response:
        body = await _json_body(request, PresignUploadRequest)
        upload = await jobs.presign_upload(
            caller_of(request), body.content_type, body.sha256, body.size_bytes
        )
        presigned: PresignedUploadJson = {
            "key": upload.key,
            "method": upload.method,
            "upload_url": upload.upload_url,
            "headers": upload.headers,
            "fields": upload.fields,
            "max_bytes": upload.max_bytes,
            "expires_at": upload.expires_at,
        }
        return JSONResponse(presigned)

    async def put_file(request: Request) -> Response:
        """The local store's presigned upload: authorized by its signature, which binds the
        key (and so the tenant), the content type and the size."""
        key = request.path_params["key"]
        await jobs.uploads.receive_put(
            key,
            request.query_params,
            request.headers.get("content-type", ""),
            lambda limit: read_body(request, limit),
        )
        return JSONResponse({"key": key}, status_code=201)

    async def evaluate(request: Request) -> Response:
        body = await _json_body(request, EvaluateRequest, MAX_EVALUATE_JSON_BYTES)
        # The schema's pattern admits only what b64decode reads.
        images = [base64.b64decode(encoded, validate=True) for encoded in body.images or ()]
        result = await jobs.evaluate_images(
            caller_of(request), body.prompt, body.image_keys or [], images, body.reference_key or ""
        )
        scores: EvaluationJson = {
            "evaluations": [
                {
                    "semantic_score": s.clip_score,
                    "perceptual_score": s.lpips_diversity,
                    "lpips_to_reference": s.lpips_to_reference,
                    "clip_model": s.clip_model,
                    "clip_calibrated": s.clip_calibrated,
                    "lpips_model": s.lpips_model,
                    "lpips_calibrated": s.lpips_calibrated,
                }
                for s in result.scores
            ],
            "primary_index": result.primary_index,
            "scoring_models": [
                {"name": m.name, "role": m.role, "calibrated": m.calibrated}
                for m in result.scoring_models
            ],
        }
        return JSONResponse(scores)

    async def safety(request: Request) -> Response:
        days = query_count(request.query_params, "days", 3) or 30
        counts = await jobs.safety_counts(days)
        return JSONResponse(
            {
                "days": days,
                "counts": [
                    {
                        "day": c.day.isoformat(),
                        "kind": c.kind,
                        "category": c.category,
                        "count": c.count,
                    }
                    for c in counts
                ],
            }
        )

    async def queue(request: Request) -> Response:
        depth = await jobs.queue_depth()
        return JSONResponse(
            {
                "backlog": depth.backlog,
                "claimed": depth.claimed,
                "waiting_by_tenant": depth.waiting_by_tenant,
            }
        )

    async def openapi(request: Request) -> Response:
        if not document:
            document.append(json.dumps(openapi_document(*jobs.models())).encode())
        return Response(document[0], media_type="application/json")

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def index(request: Request) -> Response:
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html")

    def key(scope: Scope, endpoint: Any) -> Any:
        return authorized(authenticator, scope, endpoint)

    generate_, read, admin = Scope.GENERATE, Scope.READ, Scope.ADMIN
    routes = [
        # Open: the pages (they ask for a key) and their scripts, health, metrics (Prometheus
        # scrapes without a key), and files by signed URL (the signature authorizes; without
        # one, /files wants the owner's key).
        Route("/", index),
        Route("/admin", admin_page),
        Route("/static/{path:path}", static_file, methods=["GET"]),
        Route("/healthz", healthz),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/files/{key:path}", files, methods=["GET"]),
        Route("/files/{key:path}", put_file, methods=["PUT"]),
        Route("/api/generate/text-to-image", key(generate_, generate), methods=["POST"]),
        Route("/api/status/stream/{run_id}", key(read, stream)),
        Route("/api/status/{run_id}", key(read, status)),
        Route("/api/jobs", key(read, list_jobs)),
        Route("/api/jobs/{run_id}/cancel", key(generate_, cancel), methods=["POST"]),
        Route("/api/cost/estimate", key(read, estimate), methods=["POST"]),
        Route("/api/cache/lookup", key(read, cache_lookup), methods=["POST"]),
        Route("/api/models", key(read, models)),
        Route("/api/uploads/presign", key(generate_, presign_upload), methods=["POST"]),
        Route("/api/evaluate", key(generate_, evaluate), methods=["POST"]),
        Route("/api/admin/safety", key(admin, safety)),
        Route("/api/admin/queue", key(admin, queue)),
        Route("/api/admin/stats", key(admin, stats_endpoint(admin_stats))),
        Route("/openapi.json", key(read, openapi)),
    ]
    traced, measured = tracing.enabled(), metrics.collecting()
    watching = [Middleware(HttpWatch, traced=traced, measured=measured)]
    if not (traced or measured):
        watching = []
    # Errors of every kind, from every route and from the router itself (unknown route, wrong
    # method), answer the one JSON error body with the request's id. The Host/Origin guard
    # runs before any route, open ones included.
    app = Starlette(
        routes=routes,
        middleware=[
            *watching,
            Middleware(RequestContext),
            Middleware(HostOriginGuard, hosts=hosts, origins=origins),
        ],
        exception_handlers={HTTPException: http_exception},
    )
    # A trailing slash is an unknown route (a JSON 404), not a redirect to another route:
    # /api/status/stream/ would otherwise land on /api/status/{run_id} with run_id "stream".
    app.router.redirect_slashes = False
    return app
