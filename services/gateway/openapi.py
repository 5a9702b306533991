"""The HTTP facade's OpenAPI 3.1 description, served at /openapi.json."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}


def _op(summary: str, ok: str, body: str | None = None, **extra: Any) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": ok},
            "401": {
                "description": "no API key, or one that is unknown or revoked",
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": _ERROR}},
            },
            "403": {
                "description": "the key lacks the scope, or a cross-site Origin",
                "content": {"application/json": {"schema": _ERROR}},
            },
            "404": {
                "description": "unknown run (another tenant's is unknown too)",
                "content": {"application/json": {"schema": _ERROR}},
            },
            "413": {
                "description": "body over 1 MiB (refused before it is read)",
                "content": {"application/json": {"schema": _ERROR}},
            },
            "422": {
                "description": "bad field",
                "content": {"application/json": {"schema": _ERROR}},
                "x-policy": "a prompt the content policy refuses is a 422 whose error carries"
                " policy_violation {category, field}: never queued, cached or charged",
            },
            "429": {
                "description": "a limit: the key's rate (Retry-After, RateLimit-Policy,"
                " RateLimit, RateLimit-Limit/-Remaining/-Reset) or concurrent jobs, or the"
                " tenant's budget; quota_violation.subject names which",
                "headers": {
                    "Retry-After": {"schema": {"type": "integer"}},
                    "RateLimit-Policy": {"schema": {"type": "string"}},
                    "RateLimit": {"schema": {"type": "string"}},
                },
                "content": {"application/json": {"schema": _ERROR}},
            },
            "503": {
                "description": "the job store is unavailable; retry after the Retry-After header",
                "headers": {"Retry-After": {"schema": {"type": "integer"}}},
                "content": {"application/json": {"schema": _ERROR}},
            },
        },
        **extra,
    }
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    return op


_RUN_ID = [{"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "imagegen", "version": "1"},
    # Every route needs a key but the page, /healthz and /files (authorized by the URL's
    # signature, or GET with the owning tenant's key).
    "security": [{"apiKey": []}],
    "paths": {
        "/api/generate/text-to-image": {
            "post": _op(
                "Create a generation job (or answer from the cache)",
                "the job",
                "GenerateRequest",
                parameters=[
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "a retry with the same key and body returns the first job"
                        " for IDEMPOTENCY_TTL_SECONDS (default a day); another body gets 409",
                        "schema": {"type": "string", "maxLength": 200},
                    }
                ],
            )
        },
        "/api/status/{run_id}": {"get": _op("Read a job", "the job", parameters=_RUN_ID)},
        "/api/status/stream/{run_id}": {
            "get": _op(
                "Server-sent events of a job: progress, artifact, evaluation, final, error",
                "text/event-stream; resumes after the Last-Event-ID header",
                parameters=_RUN_ID,
            )
        },
        "/api/jobs": {
            "get": _op(
                "List jobs, newest first (page_size, page_token, status)",
                "{jobs, next_page_token}",
            )
        },
        "/api/jobs/{run_id}/cancel": {"post": _op("Cancel a job", "the job", parameters=_RUN_ID)},
        "/api/cost/estimate": {
            "post": _op(
                "Price a request",
                "{est_cost_cents, breakdown: {base_cents, steps_factor, controlnet_cents,"
                " guidance_cents, model_multiplier}}: est_cost_cents is (base_cents x steps_factor"
                " + controlnet_cents + guidance_cents) x model_multiplier, rounded up, at least 1",
                "GenerateRequest",
            )
        },
        "/api/cache/lookup": {
            "post": _op("Look a request up in the prompt cache", "hit or miss", "GenerateRequest")
        },
        "/api/models": {
            "get": _op(
                "List the served models",
                "the models, with what each can honour: guidance_roles and controlnets",
            )
        },
        "/api/evaluate": {
            "post": _op(
                "Score images against a prompt: CLIP score per image, LPIPS between them and to"
                " a reference; which models scored and whether they are calibrated",
                "{evaluations[{semantic_score, perceptual_score, lpips_to_reference,"
                " clip_model, clip_calibrated, lpips_model, lpips_calibrated}], primary_index,"
                " scoring_models[{name, role, calibrated}]}",
                "EvaluateRequest",
            )
        },
        "/api/admin/safety": {
            "get": _op(
                "Refused prompts and withheld images per day, kind and category (?days=30)",
                "{days, counts[{day, kind, category, count}]}",
            )
        },
        "/api/admin/queue": {
            "get": _op(
                "The job queue's depth (admin): what KEDA scales generators on",
                "{backlog, claimed, waiting_by_tenant}",
            )
        },
        "/api/admin/stats": {
            "get": _op(
                "The admin dashboard's data (admin), from the jobs in Postgres: every gateway's,"
                " across restarts. Per bucket (aligned to the epoch; the first and last may"
                " reach outside the range): jobs admitted and cache results by creation time;"
                " jobs rendered, answered from the cache, failed by reason and cancelled, and"
                " cents estimated and charged, by end time; the queue's peak and end depth."
                " Over the range: duration histograms (end to end and per stage) with"
                " p50/p95/p99, per-model usage, and refusals (counted per day)",
                "{from, to, bucket_seconds, buckets[], totals{admitted, completed, rendered,"
                " cache_hits, cache_lookups, hit_ratio, failed, failed_by_reason{}, cancelled,"
                " throughput_per_minute, estimated_cents, actual_cents, queue_peak},"
                " jobs{admitted[], rendered[], cache_hits[], failed{reason: []}, cancelled[],"
                " throughput_per_minute[]}, cache{hit_seed[], hit_seedless[], miss[], off[],"
                " hit_ratio[]}, queue{depth_peak[], depth_end[]}, cost{estimated_cents[],"
                " actual_cents[]}, durations{bounds_seconds[], end_to_end, end_to_end_all,"
                " stages{name: histogram}}, models[{model, jobs, images, rendered, cache_hits,"
                " failed, cancelled, charged_cents}], refusals{from_day, to_day,"
                " by_category[{kind, category, count}], daily[{day, kind, category, count}]}};"
                " a histogram is {count, sum_seconds, p50, p95, p99, counts[]}, counts[i]"
                " holding the samples in [bounds_seconds[i-1], bounds_seconds[i])",
                parameters=[
                    {
                        "name": "from",
                        "in": "query",
                        "required": False,
                        "description": "RFC 3339 time with an offset; default: an hour before"
                        " `to`; at most 366 days before it",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "to",
                        "in": "query",
                        "required": False,
                        "description": "RFC 3339 time with an offset, excluded; default: now",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                    {
                        "name": "bucket",
                        "in": "query",
                        "required": False,
                        "description": "bucket size in seconds; default: a round size giving"
                        " at most 60 buckets; at most 1000 buckets over the range",
                        "schema": {"type": "integer", "minimum": 1},
                    },
                ],
            )
        },
        "/admin": {
            "get": {
                "summary": "The admin dashboard page (open: it asks for an admin key)",
                "security": [],
                "responses": {"200": {"description": "text/html"}},
            }
        },
        "/static/{path}": {
            "get": {
                "summary": "The pages' scripts and the vendored Chart.js (vendor/: cached for"
                " a year, its folder names carry its version)",
                "security": [],
                "parameters": [
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {"description": "text/javascript or text/css"},
                    "404": {
                        "description": "no such file",
                        "content": {"application/json": {"schema": _ERROR}},
                    },
                },
            }
        },
        "/api/uploads/presign": {
            "post": _op(
                "Presign the upload of a guidance image ({content_type, sha256, size_bytes})",
                "{key, method, upload_url, headers, fields, max_bytes, expires_at}: for PUT,"
                " send the bytes with `headers`; for POST (S3), a multipart form of `fields`"
                " then `file`. Bound to the tenant, the content type and size_bytes",
            )
        },
    },
    "components": {
        "securitySchemes": {
            "apiKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "an API key (`python -m services.gateway keys create`)",
            }
        },
        "schemas": {
            "GenerateRequest": {
                "type": "object",
                "properties": {
                    "prompt": {"type": "string", "maxLength": 2000},
                    "fibo_json": {"type": "object"},
                    "negative_prompt": {"type": "string"},
                    "model": {"type": "string"},
                    "seed": {"type": "integer", "minimum": 0},
                    "width": {"type": "integer"},
                    "height": {"type": "integer"},
                    "num_variants": {"type": "integer", "minimum": 1},
                    "steps": {"type": "integer", "minimum": 1},
                    "guidance_scale": {"type": "number"},
                    "guidance_images": {
                        "type": "array",
                        "maxItems": 5,
                        "items": {
                            "type": "object",
                            "properties": {
                                "key": {"type": "string"},
                                "role": {"enum": ["reference", "style", "texture"]},
                            },
                        },
                    },
                    "controlnet": {
                        "type": "object",
                        "properties": {
                            "name": {"enum": ["canny", "depth", "recoloring", "color_grid"]},
                            "weight": {"type": "number", "minimum": 0, "maximum": 1},
                            "mask": {
                                "type": "string",
                                "description": "no served model takes a mask: refused",
                            },
                        },
                        "description": "needs a reference guidance image, which the control"
                        " image is made from; the names a model has are in /api/models",
                    },
                    "strength": {
                        "type": "number",
                        "exclusiveMinimum": 0,
                        "maximum": 1,
                        "description": "img2img: how much of the reference guidance image is"
                        " re-noised; only with a reference image (default 0.75 then)",
                    },
                    "preview_every": {
                        "type": "integer",
                        "minimum": 0,
                        "default": 0,
                        "description": "a `preview` SSE event (a small PNG data URL of the"
                        " latents, no VAE decode) every that many steps; 0: none",
                    },
                    "cache": {
                        "enum": ["use", "refresh", "off"],
                        "default": "use",
                        "description": "use: answer from the cache when it can and store what is"
                        " rendered; refresh: do not read, render and replace the cached result;"
                        " off: neither read nor write",
                    },
                    "seed_agnostic_cache": {
                        "type": "boolean",
                        "description": "with cache=use, accept a cached result of any seed",
                    },
                    "skip_cache": {
                        "type": "boolean",
                        "deprecated": True,
                        "description": "the older spelling of cache=refresh; refused with"
                        " another cache mode",
                    },
                    "priority": {
                        "enum": ["high", "normal", "low"],
                        "default": "normal",
                        "description": "the job's lane within its tenant's fair share",
                    },
                    "max_cost_cents": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "refused (422) when the estimate is higher",
                    },
                    "webhook_url": {
                        "type": "string",
                        "description": "told of the job's end (Standard Webhooks, signed with"
                        " the tenant's secret); default: the tenant's webhook. Private and"
                        " loopback addresses are refused unless the operator allows them",
                    },
                    "webhook_events": {
                        "type": "array",
                        "items": {"enum": ["job.completed", "job.failed", "job.cancelled"]},
                        "description": "default: all three",
                    },
                    "refine_mode": {"type": "string"},
                    "meta": {"type": "object"},
                },
            },
            "EvaluateRequest": {
                "type": "object",
                "required": ["prompt"],
                "properties": {
                    "prompt": {"type": "string", "maxLength": 2000},
                    "image_keys": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "keys of verified uploads (POST /api/uploads/presign)",
                    },
                    "images": {
                        "type": "array",
                        "items": {"type": "string", "contentEncoding": "base64"},
                        "description": "image files inline (PNG, JPEG or WebP); 1..16 images in"
                        " all with image_keys",
                    },
                    "reference_key": {"type": "string"},
                },
            },
            "Error": {
                "type": "object",
                "properties": {
                    "error": {
                        "type": "object",
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "field_violations": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "field": {"type": "string"},
                                        "description": {"type": "string"},
                                    },
                                },
                            },
                            "quota_violation": {
                                "type": "object",
                                "properties": {"subject": {"type": "string"}},
                            },
                            "policy_violation": {
                                "type": "object",
                                "description": "a request the content policy refused: the"
                                " category and the field, never the matched text",
                                "properties": {
                                    "category": {"type": "string"},
                                    "field": {"type": "string"},
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}
