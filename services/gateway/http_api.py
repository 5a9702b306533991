"""The HTTP facade: the replaced system's JSON API and SSE, translated onto JobService.

It parses JSON into the domain request, calls the same JobService the gRPC API calls, and renders
the result with the field names existing clients use. Errors use the status table in
services.common.errors. It holds no logic of its own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from imagegen.v1 import events_pb2, types_pb2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common.convert import STATUS_FROM_PB, artifact_to_pb, message_to_json
from services.common.errors import (
    Forbidden,
    InvalidArgument,
    NotFound,
    ServiceError,
    to_http_body,
)
from services.common.objectstore import LocalStore
from services.common.spec import ControlNet, GuidanceImage, Spec
from services.gateway.cost import Cost
from services.gateway.jobs import JobService
from services.gateway.openapi import OPENAPI
from services.gateway.uploads import check_upload, presign

STATIC = Path(__file__).parent / "static"
Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise InvalidArgument.one(name, "has the wrong type")
    if not isinstance(value, kind):
        raise InvalidArgument.one(name, "has the wrong type")
    return value


def spec_from_json(body: Any) -> Spec:
    """The replaced system's request fields (and the new ones) as a domain Spec."""
    if not isinstance(body, dict):
        raise InvalidArgument.one("", "the body must be a JSON object")
    images = []
    for i, item in enumerate(_field(body, "guidance_images", list, [])):
        if not isinstance(item, dict) or not isinstance(item.get("key", ""), str):
            raise InvalidArgument.one(f"guidance_images[{i}]", "must be {key, role}")
        if "key" not in item and "url" in item:
            raise InvalidArgument.one(
                f"guidance_images[{i}].url", "give the key returned by /api/uploads/presign"
            )
        images.append(GuidanceImage(key=item.get("key", ""), role=str(item.get("role", ""))))
    controlnet = None
    if (raw := _field(body, "controlnet", dict, None)) is not None:
        controlnet = ControlNet(
            name=str(raw.get("name", "")),
            weight=float(_field(raw, "weight", (int, float), 1.0)),
            mask_key=str(raw.get("mask") or ""),
        )
    guidance = _field(body, "guidance_scale", (int, float), None)
    return Spec(
        prompt=_field(body, "prompt", str, ""),
        fibo_json=_field(body, "fibo_json", dict, None),
        negative_prompt=_field(body, "negative_prompt", str, ""),
        model=_field(body, "model", str, ""),
        seed=_field(body, "seed", int, None),
        width=_field(body, "width", int, 0),
        height=_field(body, "height", int, 0),
        num_variants=_field(body, "num_variants", int, 0),
        steps=_field(body, "steps", int, 0),
        guidance_scale=float(guidance) if guidance is not None else None,
        guidance_images=tuple(images),
        controlnet=controlnet,
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
            "negative_prompt": job.spec.negative_prompt,
        },
        "artifacts": [artifact_json(a) for a in job.artifacts],
        "created_at": job.create_time.ToJsonString() if job.HasField("create_time") else None,
        "updated_at": job.update_time.ToJsonString() if job.HasField("update_time") else None,
    }


def cost_json(cost: Cost) -> dict[str, Any]:
    return {
        "est_cost_cents": cost.total_cents,
        "breakdown": {
            "base_cents": cost.base_cents,
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
    if kind == "status":
        return kind, {
            "status": STATUS_FROM_PB.get(event.status.status, ""),
            "stage": event.status.stage,
        }
    return kind, message_to_json(getattr(event, kind))


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidArgument.one("", "the body is not valid JSON") from None


def _errors(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ServiceError as error:
            return JSONResponse(to_http_body(error), status_code=error.http_status)

    return wrapped


def build_app(jobs: JobService) -> Starlette:
    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        admission = await jobs.create(
            spec_from_json(body),
            idempotency_key=request.headers.get("idempotency-key", ""),
            seed_agnostic_cache=bool(body.get("seed_agnostic_cache", False)),
            skip_cache=bool(body.get("skip_cache", False)),
        )
        job = jobs.job_pb(admission.job)
        return JSONResponse(
            {
                **job_json(job),
                **cost_json(admission.estimate),
                "idempotent_replay": not admission.created,
            },
            status_code=201 if admission.created else 200,
        )

    async def status(request: Request) -> Response:
        job = await jobs.get(request.path_params["run_id"])
        return JSONResponse(job_json(jobs.job_pb(job)))

    async def stream(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        after = request.headers.get("last-event-id") or request.query_params.get("after", "")
        events = jobs.watch(run_id, after)
        # Errors (unknown job, bad id) become a JSON status here, before the stream starts.
        first = await anext(events, None)
        if first is None:  # resumed after the final event; 204 tells EventSource to stop
            return Response(status_code=204)

        async def sse() -> AsyncIterator[bytes]:
            event: events_pb2.JobEvent | None = first
            while event is not None:
                name, data = event_json(event)
                yield f"id: {event.id}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()
                event = await anext(events, None)

        return StreamingResponse(
            sse(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def list_jobs(request: Request) -> Response:
        q = request.query_params
        size = q.get("page_size", "0")
        if not size.isdigit():
            raise InvalidArgument.one("page_size", "must be a whole number")
        found, token = await jobs.list(int(size), q.get("page_token", ""), q.get("status", ""))
        return JSONResponse(
            {"jobs": [job_json(jobs.job_pb(j)) for j in found], "next_page_token": token}
        )

    async def cancel(request: Request) -> Response:
        job = await jobs.cancel(request.path_params["run_id"])
        return JSONResponse(job_json(jobs.job_pb(job)))

    async def estimate(request: Request) -> Response:
        return JSONResponse(cost_json(jobs.estimate(spec_from_json(await _json_body(request)))))

    async def cache_lookup(request: Request) -> Response:
        body = await _json_body(request)
        entry = await jobs.lookup_cache(
            spec_from_json(body), bool(body.get("seed_agnostic", False))
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
                        "controlnets": list(m.controlnets),
                    }
                    for m in served
                ]
            }
        )

    def _signed_local(request: Request, method: str) -> tuple[LocalStore, str]:
        store, key, q = jobs.objects, request.path_params["key"], request.query_params
        if not isinstance(store, LocalStore):
            raise NotFound("files are served by the object store")
        if not store.verify(method, key, q.get("expires", ""), q.get("signature", "")):
            raise Forbidden("the URL's signature is invalid or expired")
        return store, key

    async def files(request: Request) -> Response:
        store, key = _signed_local(request, "GET")
        data = await store.get(key)
        return Response(
            data,
            media_type="image/png" if key.endswith(".png") else "application/octet-stream",
            headers={"Cache-Control": "private, max-age=3600, immutable"},
        )

    async def presign_upload(request: Request) -> Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise InvalidArgument.one("", "the body must be a JSON object")
        upload = presign(
            jobs.objects,
            content_type=_field(body, "content_type", str, ""),
            sha256=_field(body, "sha256", str, ""),
            size_bytes=_field(body, "size_bytes", int, 0),
            ttl_seconds=jobs.url_ttl_seconds,
        )
        return JSONResponse(
            {
                "key": upload.key,
                "upload_url": upload.upload_url,
                "method": "PUT",
                "headers": {"Content-Type": upload.content_type},
                "expires_at": upload.expires_at,
            }
        )

    async def put_file(request: Request) -> Response:
        store, key = _signed_local(request, "PUT")
        if not key.startswith("uploads/"):
            raise InvalidArgument.one("key", "only uploads are written through this route")
        data = await request.body()
        check_upload(key, data)
        await store.put(key, data, request.headers.get("content-type", ""))
        return JSONResponse({"key": key}, status_code=201)

    async def openapi(request: Request) -> Response:
        return JSONResponse(OPENAPI)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def index(request: Request) -> Response:
        return Response((STATIC / "index.html").read_bytes(), media_type="text/html")

    routes = [
        Route("/", _errors(index)),
        Route("/api/generate/text-to-image", _errors(generate), methods=["POST"]),
        Route("/api/status/stream/{run_id}", _errors(stream)),
        Route("/api/status/{run_id}", _errors(status)),
        Route("/api/jobs", _errors(list_jobs)),
        Route("/api/jobs/{run_id}/cancel", _errors(cancel), methods=["POST"]),
        Route("/api/cost/estimate", _errors(estimate), methods=["POST"]),
        Route("/api/cache/lookup", _errors(cache_lookup), methods=["POST"]),
        Route("/api/models", _errors(models)),
        Route("/api/uploads/presign", _errors(presign_upload), methods=["POST"]),
        Route("/files/{key:path}", _errors(files), methods=["GET"]),
        Route("/files/{key:path}", _errors(put_file), methods=["PUT"]),
        Route("/openapi.json", openapi),
        Route("/healthz", healthz),
    ]
    return Starlette(routes=routes)
