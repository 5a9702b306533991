"""The HTTP facade: the replaced system's JSON API and SSE, translated onto JobService.

It parses JSON into the domain request, calls the same JobService the gRPC API calls, and renders
the result with the field names existing clients use. Errors use the status table in
services.common.errors. It holds no logic of its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from google.protobuf import json_format
from imagegen.v1 import events_pb2, types_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common import metrics, tracing
from services.common.convert import (
    STATUS_FROM_PB,
    artifact_to_pb,
    message_to_json,
    signed_job,
    with_urls,
)
from services.common.errors import FieldViolation, Forbidden, InvalidArgument, NotFound
from services.common.objectstore import LocalStore
from services.common.spec import ControlNet, GuidanceImage, Spec, json_path
from services.gateway.admin import AdminStats, admin_page, static_file, stats_endpoint
from services.gateway.auth import (
    Authenticator,
    HostOriginGuard,
    authorized,
    caller_of,
)
from services.gateway.cost import Cost
from services.gateway.http_input import (
    MAX_JSON_BYTES,
    JsonObject,
    RequestContext,
    ascii_digits,
    http_exception,
    json_flag,
    parse_json_object,
    query_count,
    query_text,
    read_body,
    resume_after,
)
from services.gateway.http_metrics import HttpMetrics, HttpTracing, metrics_endpoint
from services.gateway.jobs import JobService, Options
from services.gateway.openapi import OPENAPI
from services.jobs.records import CacheMode, JobRecord, Priority, Webhook
from services.tenants.keys import Scope

STATIC = Path(__file__).parent / "static"
# POST /api/evaluate carries images inline (base64): room for several.
MAX_EVALUATE_JSON_BYTES = 24 * 1024 * 1024


def spec_from_json(body: dict[str, Any]) -> Spec:
    """The replaced system's request fields (and the new ones) as a domain Spec; every field of
    the wrong type is named by its path (`controlnet.weight`, `guidance_images[1].role`)."""
    fields = JsonObject(body)
    images = []
    for item in fields.objects("guidance_images"):
        if "key" not in item.value and "url" in item.value:
            item.violation("url", "give the key returned by /api/uploads/presign")
        images.append(GuidanceImage(key=item.get("key", str, ""), role=item.get("role", str, "")))
    controlnet = None
    if (raw := fields.object("controlnet")) is not None:
        controlnet = ControlNet(
            name=raw.get("name", str, ""),
            weight=float(raw.get("weight", (int, float), 1.0)),
            mask_key=raw.get("mask", str, ""),
        )
    guidance = fields.get("guidance_scale", (int, float), None)
    strength = fields.get("strength", (int, float), None)
    spec = Spec(
        prompt=fields.get("prompt", str, ""),
        fibo_json=fields.get("fibo_json", dict, None),
        negative_prompt=fields.get("negative_prompt", str, ""),
        model=fields.get("model", str, ""),
        seed=fields.get("seed", int, None),
        width=fields.get("width", int, 0),
        height=fields.get("height", int, 0),
        num_variants=fields.get("num_variants", int, 0),
        steps=fields.get("steps", int, 0),
        guidance_scale=float(guidance) if guidance is not None else None,
        guidance_images=tuple(images),
        controlnet=controlnet,
        strength=float(strength) if strength is not None else None,
        preview_every=fields.get("preview_every", int, 0),
    )
    fields.raise_if_bad()
    return spec


def cache_mode_from_json(body: dict[str, Any]) -> CacheMode | None:
    """The body's `cache`: "use", "refresh" or "off"; None when absent or null."""
    fields = JsonObject(body)
    value = fields.get("cache", str, None)
    fields.raise_if_bad()
    if value is None:
        return None
    if value not in CacheMode.__members__.values():
        raise InvalidArgument.one("cache", f"one of {', '.join(m.value for m in CacheMode)}")
    return CacheMode(value)


def options_from_json(jobs: JobService, body: dict[str, Any], idempotency_key: str) -> Options:
    """How to run the job: cache mode, lane, cost ceiling and webhook, from the body."""
    fields = JsonObject(body)
    priority = fields.get("priority", str, None)
    max_cost = fields.get("max_cost_cents", int, None)
    webhook_url = fields.get("webhook_url", str, None)
    events = fields.get("webhook_events", list, [])
    for i, event in enumerate(events):
        if not isinstance(event, str):
            fields.bad.append(FieldViolation(json_path("webhook_events", i), "must be a string"))
    fields.raise_if_bad()
    if priority is not None and priority not in Priority.__members__.values():
        raise InvalidArgument.one("priority", f"one of {', '.join(p.value for p in Priority)}")
    if max_cost is not None and max_cost < 0:
        raise InvalidArgument.one("max_cost_cents", "must not be negative")
    webhook: Webhook | None = None
    if webhook_url is not None:
        webhook = jobs.check_webhook(webhook_url, events, "webhook")
    elif events:
        raise InvalidArgument.one("webhook_events", "give webhook_url with them")
    return Options(
        idempotency_key=idempotency_key,
        seed_agnostic_cache=json_flag(body, "seed_agnostic_cache"),
        skip_cache=json_flag(body, "skip_cache"),
        cache=cache_mode_from_json(body),
        priority=Priority(priority) if priority else Priority.NORMAL,
        max_cost_cents=max_cost,
        webhook=webhook,
    )


def artifact_json(a: types_pb2.Artifact) -> dict[str, Any]:
    e = a.evaluation
    return {
        "id": a.id,
        "url": a.url,
        "key": a.key,
        "sha256": a.sha256,
        "width": a.width_px,
        "height": a.height_px,
        "variant_index": a.variant_index,
        "seed": a.seed,
        "semantic_score": e.clip_score if e.HasField("clip_score") else None,
        "perceptual_score": e.lpips_diversity if e.HasField("lpips_diversity") else None,
        "lpips_to_reference": e.lpips_to_reference if e.HasField("lpips_to_reference") else None,
        "nsfw": e.nsfw,
        "is_primary": a.is_primary,
        "clip_model": e.clip_model,
        "clip_calibrated": e.clip_calibrated,
        "lpips_model": e.lpips_model,
        "lpips_calibrated": e.lpips_calibrated,
    }


def job_json(job: types_pb2.Job) -> dict[str, Any]:
    return {
        "run_id": job.id,
        "status": STATUS_FROM_PB[job.status],
        "stage": job.stage,
        "progress_percent": round(job.progress_percent, 2),
        "seed": job.spec.seed,
        "cost_cents": job.cost_cents,
        "cached_hit": job.cache_hit,
        "error": job.error,
        "attempts": job.attempts,
        "notices": list(job.notices),
        "request": {
            "prompt": job.spec.text,
            "fibo_json": (
                json_format.MessageToDict(job.spec.fibo_json)
                if job.spec.HasField("fibo_json")
                else None
            ),
            "model": job.spec.model,
            "width": job.spec.width_px,
            "height": job.spec.height_px,
            "steps": job.spec.steps,
            "num_variants": job.spec.num_variants,
            "guidance_scale": round(job.spec.guidance_scale, 4),
            "strength": round(job.spec.strength, 4) if job.spec.HasField("strength") else None,
            "negative_prompt": job.spec.negative_prompt,
        },
        "artifacts": [artifact_json(a) for a in job.artifacts],
        "withheld": [
            {"variant_index": w.variant_index, "category": w.category} for w in job.withheld
        ],
        "created_at": job.create_time.ToJsonString() if job.HasField("create_time") else None,
        "updated_at": job.update_time.ToJsonString() if job.HasField("update_time") else None,
    }


def cost_json(cost: Cost) -> dict[str, Any]:
    return {
        "est_cost_cents": cost.total_cents,
        "breakdown": {
            "base_cents": cost.base_cents,
            "steps_factor": cost.steps_factor,
            "controlnet_cents": cost.controlnet_cents,
            "guidance_cents": cost.guidance_cents,
            "model_multiplier": cost.model_multiplier,
        },
    }


def event_json(event: events_pb2.JobEvent) -> tuple[str, dict[str, Any]]:
    """(SSE event name, data) of a job event."""
    kind = event.WhichOneof("payload") or "unknown"
    if kind == "final":
        return kind, job_json(event.final.job)
    if kind == "artifact":
        a = event.artifact
        timings = {"render_ms": a.render_ms, "encode_ms": a.encode_ms, "store_ms": a.store_ms}
        return kind, {**artifact_json(a.artifact), **timings}
    if kind == "evaluation":
        return kind, {
            "artifacts": [artifact_json(a) for a in event.evaluation.artifacts],
            "models": list(event.evaluation.models),
            "evaluate_ms": event.evaluation.evaluate_ms,
        }
    if kind == "progress":
        p = event.progress
        return kind, {
            "variant_index": p.variant_index,
            "step": p.step,
            "total_steps": p.total_steps,
            "percent": round(p.percent, 2),
            "eta_ms": p.eta_ms,
        }
    if kind == "preview":
        v = event.preview
        return kind, {
            "variant_index": v.variant_index,
            "step": v.step,
            "image": "data:image/png;base64," + base64.b64encode(v.image_png).decode(),
        }
    if kind == "status":
        return kind, {
            "status": STATUS_FROM_PB.get(event.status.status, ""),
            "stage": event.status.stage,
        }
    return kind, message_to_json(getattr(event, kind))


async def _json_body(request: Request, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
    data = await read_body(request, limit)
    # Parsing and checking a large body takes a while: not on the event loop.
    return await asyncio.to_thread(parse_json_object, data)


def build_app(
    jobs: JobService,
    authenticator: Authenticator,
    hosts: list[str],
    origins: list[str],
    pool: asyncpg.Pool,
) -> Starlette:
    admin_stats = AdminStats(pool)

    def signed(job: JobRecord | types_pb2.Job) -> types_pb2.Job:
        return signed_job(job, jobs.objects.download_url)

    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        spec = spec_from_json(body)
        options = options_from_json(jobs, body, request.headers.get("idempotency-key", ""))
        admission = await jobs.create(caller_of(request), spec, options)
        job = signed(admission.job)
        return JSONResponse(
            {
                **job_json(job),
                **cost_json(admission.estimate),
                "idempotent_replay": not admission.created,
            },
            status_code=201 if admission.created else 200,
        )

    async def status(request: Request) -> Response:
        job = await jobs.get(caller_of(request), request.path_params["run_id"])
        return JSONResponse(job_json(signed(job)))

    async def stream(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        after = resume_after(request)
        events = jobs.watch(caller_of(request), run_id, after)
        # Errors (unknown job, bad id) become a JSON status here, before the stream starts.
        first = await anext(events, None)
        if first is None:  # resumed after the final event; 204 tells EventSource to stop
            return Response(status_code=204)

        async def sse() -> AsyncIterator[bytes]:
            event: events_pb2.JobEvent | None = first
            metrics.SSE_WATCHERS.inc()
            try:
                while event is not None:
                    name, data = event_json(with_urls(event, jobs.objects.download_url))
                    yield f"id: {event.id}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()
                    event = await anext(events, None)
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
        return JSONResponse(cost_json(jobs.estimate(spec_from_json(await _json_body(request)))))

    async def cache_lookup(request: Request) -> Response:
        body = await _json_body(request)
        entry = await jobs.lookup_cache(
            caller_of(request), spec_from_json(body), json_flag(body, "seed_agnostic")
        )
        if entry is None:
            return JSONResponse({"hit": False})
        return JSONResponse(
            {
                "hit": True,
                "run_id": entry.job_id,
                "seed": entry.seed,
                "hit_count": entry.hit_count,
                "expires_at": entry.expires_at.isoformat(),
                "artifacts": [
                    artifact_json(artifact_to_pb(a, jobs.objects.download_url))
                    for a in entry.artifacts
                ],
            }
        )

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
        fields = JsonObject(await _json_body(request))
        content_type = fields.get("content_type", str, "")
        sha256 = fields.get("sha256", str, "")
        size_bytes = fields.get("size_bytes", int, 0)
        fields.raise_if_bad()
        upload = await jobs.presign_upload(caller_of(request), content_type, sha256, size_bytes)
        return JSONResponse(
            {
                "key": upload.key,
                "method": upload.method,
                "upload_url": upload.upload_url,
                "headers": upload.headers,
                "fields": upload.fields,
                "max_bytes": upload.max_bytes,
                "expires_at": upload.expires_at,
            }
        )

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
        fields = JsonObject(await _json_body(request, MAX_EVALUATE_JSON_BYTES))
        prompt = fields.get("prompt", str, "")
        keys = fields.get("image_keys", list, [])
        for i, key in enumerate(keys):
            if not isinstance(key, str):
                fields.bad.append(FieldViolation(json_path("image_keys", i), "must be a string"))
        images = []
        for i, encoded in enumerate(fields.get("images", list, [])):
            try:
                images.append(base64.b64decode(encoded, validate=True))
            except (TypeError, ValueError):
                problem = FieldViolation(json_path("images", i), "must be a base64-encoded image")
                fields.bad.append(problem)
        reference_key = fields.get("reference_key", str, "")
        fields.raise_if_bad()
        result = await jobs.evaluate_images(caller_of(request), prompt, keys, images, reference_key)
        return JSONResponse(
            {
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
        )

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
        return JSONResponse(OPENAPI)

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
    # Errors of every kind, from every route and from the router itself (unknown route, wrong
    # method), answer the one JSON error body with the request's id. The Host/Origin guard
    # runs before any route, open ones included.
    app = Starlette(
        routes=routes,
        middleware=[
            *([Middleware(HttpTracing)] if tracing.enabled() else []),
            *([Middleware(HttpMetrics)] if metrics.collecting() else []),
            Middleware(RequestContext),
            Middleware(HostOriginGuard, hosts=hosts, origins=origins),
        ],
        exception_handlers={HTTPException: http_exception},
    )
    # A trailing slash is an unknown route (a JSON 404), not a redirect to another route:
    # /api/status/stream/ would otherwise land on /api/status/{run_id} with run_id "stream".
    app.router.redirect_slashes = False
    return app
